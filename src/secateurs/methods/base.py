"""What a pruning method is: a name, a typed options dataclass, a declaration of what it needs, and
`make_plan(context, options) -> PruningPlan`. Everything a run decides from the method (load the LM
head when streaming? generate calibration data? collect activation statistics?) reads `needs`, so
that no caller branches on method names.

The size asked for (ratio / ratio_of / layers_equivalent), the data (calibration, statistics) and
the seed are the same for every method and travel in the PlanContext; what only some methods
understand is in their options, and an option a method does not have is refused with a message
that says which methods take it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from secateurs.methods.data import resolve_statistics, run_calibration
from secateurs.methods.options import MethodOptions
from secateurs.planning.plan import PruningPlan
from secateurs.version import __version__


@dataclass(frozen=True)
class Needs:
    """What making a plan reads besides the weights of the decoder layers."""

    calibration: bool = False  # calibration data at all
    statistics: bool = False   # per-channel activation statistics of a calibration pass (calibration.statistics)
    lm_head: bool = False      # embeddings, final norm and LM head (scores through the model's output)


@dataclass
class PlanContext:
    """The model and what every method may read: the target size, the data, the seed."""

    model: Any
    tokenizer: Any = None
    ratio: float | None = None
    ratio_of: str = "all"
    layers_equivalent: float | None = None
    calibration: Any = None  # a Calibration, or a source spec loaded on first use
    calibration_options: dict = field(default_factory=dict)
    statistics: Any = None   # a Statistics, a statistics file path, or None
    seed: int = 0
    progress: bool = True
    scores_out: dict | None = None  # receives the StructureScores behind the plan (reports)

    def calibration_data(self):
        """The calibration set, loaded once (from its spec, or as the statistics given were made) and
        kept for the rest of the plan."""
        self.calibration = run_calibration(self.model, self.tokenizer, self.calibration, self.statistics,
                                           self.calibration_options)
        return self.calibration

    def activation_statistics(self, gram: bool = False):
        return resolve_statistics(self.model, self.tokenizer, self.calibration, self.statistics,
                                  self.calibration_options, self.progress, gram=gram)


class Method:
    """One pruning method. Subclasses set the class attributes and implement make_plan."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    options: ClassVar[type[MethodOptions]] = MethodOptions
    needs: ClassVar[Needs] = Needs()

    @property
    def kind(self) -> str:
        """'width' (heads, neurons), 'attention' (HARP) or 'depth' (whole layers): its options class's."""
        return self.options.kind

    def make_plan(self, context: PlanContext, options: MethodOptions) -> PruningPlan:
        raise NotImplementedError

    def check_streamed(self, options: MethodOptions) -> None:
        """Refuse options that need the whole model in memory (streamed runs hold one layer)."""

    def execution(self, options: MethodOptions, memory: str, recovering: bool) -> str:
        """How a run with these options executes: `memory` ('in-memory', 'streamed', 'device-map'), as
        asked and checked, or 'recovering' for a method that prunes and recovers in turns
        (secateurs.recovery.iterative.prune_depth_recovering, given these options)."""
        if memory == "streamed":
            self.check_streamed(options)
        return memory


def provenance(method: str, plan: PruningPlan, seed: int, calibration: dict | None, calibration_hash: str | None,
               head: dict, tail: dict | None = None) -> dict:
    """The plan's record of how it was made, in one order for every method: the method, what it
    chose (head), the seed, the calibration data, the base model, the version, then long details."""
    return {"method": method, **head, "seed": seed, "calibration": calibration, "calibration_hash": calibration_hash,
            "base_model": plan.base.get("name_or_path"), "secateurs_version": __version__, **(tail or {})}
