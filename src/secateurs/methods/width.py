"""What the score-based width methods share: scores for every head and neuron (each method's own
criterion) -> selection mode -> how many go per layer (the stock budget, or the allocation module
for a global threshold and a chosen attention share) -> a plan keeping the best-scored ones."""

from __future__ import annotations

import logging
from typing import ClassVar

from secateurs.criteria import StructureScores
from secateurs.errors import SecateursError
from secateurs.methods.base import Method, MethodOptions, PlanContext, provenance
from secateurs.methods.options import WidthOptions
from secateurs.methods.uniform import uniform_width_plan
from secateurs.planning.allocation import balanced_attention_share, global_counts, uniform_counts
from secateurs.planning.budget import Budget, Geometry, KeepCounts, plan_budget, target_params
from secateurs.planning.plan import PruningPlan
from secateurs.planning.selection import apply_selection
from secateurs.planning.split import CANDIDATE_FRACTIONS, choose_attention_share
from secateurs.runtime.offload import weights_in_memory
from secateurs.runtime.progress import phase, status
from secateurs.settings.names import ALLOCATIONS, SPLITS

log = logging.getLogger("secateurs")

class ScoredWidthMethod(Method):
    """A width method = a criterion (score) + the parts it prunes ('both', 'heads' or 'mlp')."""

    parts: ClassVar[str] = "both"
    options: ClassVar[type[MethodOptions]] = WidthOptions

    def score(self, context: PlanContext, statistics, options) -> StructureScores:
        raise NotImplementedError

    def provenance_head(self, options) -> dict:
        return {"selection": options.selection}

    def make_plan(self, context: PlanContext, options: WidthOptions) -> PruningPlan:
        in_memory = weights_in_memory(context.model)
        allocation, split = width_knobs(options, in_memory)
        allocated = allocation != "uniform" or split != "balanced"  # the allocation module, not the stock budget
        ratio = None if context.layers_equivalent is not None else context.ratio
        budget = None
        if allocated:
            check_allocation(self, allocation, split, options.rounding, options.round_to)
            if split == "search" and self.parts == "both":
                context.calibration_data()
        else:
            budget = plan_budget(context.model, ratio, ratio_of=context.ratio_of,
                                 layers_equivalent=context.layers_equivalent, rounding=options.rounding,
                                 gqa=options.gqa, parts=self.parts, round_to=options.round_to)
        stats = context.activation_statistics() if self.needs.statistics else None
        with phase(f"scoring ({self.name}) and planning"):
            scores = self.score(context, stats, options)
            if context.scores_out is not None:
                scores.description.setdefault("criterion", self.name)
                context.scores_out["scores"] = scores
            selected = apply_selection(scores, options.selection, context.seed)
            if budget is not None:
                plan, report = uniform_width_plan(context.model, selected, budget.counts), budget.report()
            else:
                plan, report = allocated_plan(context, selected, ratio, options.gqa, self.parts, allocation, split,
                                              options.split_samples)
        warn_if_off_target(report)
        calib = stats.description if stats is not None else {}
        plan.provenance = provenance(self.name, plan, context.seed, calib.get("calibration"),
                                     calib.get("calibration_hash"), {**self.provenance_head(options), **report})
        return plan


def width_knobs(options: WidthOptions, in_memory: bool = True) -> tuple[str, str | float]:
    """(allocation, split) as the options say. The defaults a method declares (docs/methods.md, "What secateurs adds
    to AMP") apply with balanced rounding and round-to 1 only: paper rounding keeps the official
    uniform shapes (uniform allocation, balanced split) unless asked otherwise. The split search masks
    weights in place: a model whose weights live elsewhere (device map, streamed skeleton) gets the
    balanced split by default, and a search asked for there is refused before any calibration work."""
    split, allocation = options.split, options.allocation
    if options.rounding != "balanced" or options.round_to != 1:
        split = split if "split" in options.given else "balanced"
        allocation = allocation if "allocation" in options.given else "uniform"
    if split == "search" and not in_memory:
        if "split" in options.given:
            raise SecateursError("--split search masks weights in place and needs the model in memory (not "
                                 "--streamed or --device-map); run it in memory once, or give the share it finds as "
                                 "a number (--split S)")
        status("the attention share search needs the model in memory; using the balanced split "
               "(give --split S with a share found in memory to choose it)")
        split = "balanced"
    return allocation, split


def check_allocation(method: ScoredWidthMethod, allocation: str, split, rounding: str, round_to: int) -> None:
    """What the allocation module can do: score-based width methods, balanced rounding."""
    if allocation not in ALLOCATIONS:
        raise SecateursError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got {allocation!r}")
    if not (split in SPLITS or (isinstance(split, (int, float)) and not isinstance(split, bool) and 0 <= split <= 1)):
        raise SecateursError(f"split must be one of {', '.join(SPLITS)} or an attention share in [0, 1]; got {split!r}")
    if method.parts == "heads":
        raise SecateursError(f"allocation and split apply to width methods that score heads and neurons, not to "
                             f"{method.name!r}")
    if rounding != "balanced" or round_to != 1:
        raise SecateursError("allocation 'global' and the attention split work with rounding 'balanced' and round-to 1 "
                             "(paper mode reproduces the official uniform shapes)")


def allocated_plan(context: PlanContext, scores: StructureScores, ratio, gqa: str, parts: str, allocation: str,
                   split, split_samples: int):
    """(plan, budget report) for a chosen attention share and allocation (secateurs.planning.allocation)."""
    model = context.model
    geo = Geometry.of(model)
    target, settings = target_params(geo, ratio, context.ratio_of, context.layers_equivalent)

    def counts_for(share: float) -> list[KeepCounts]:
        if allocation == "global":
            return global_counts(geo, scores, target, share, gqa)
        return uniform_counts(geo, target, share, gqa)

    balanced = balanced_attention_share(geo, gqa)
    if parts == "mlp":
        share, evidence = 0.0, {"rule": "mlp only"}
    elif split == "balanced":
        share, evidence = balanced, {"rule": "balanced (the same fraction of head units as of neurons)"}
    elif split == "search":
        with phase("choosing the attention share"):
            share, evidence = choose_attention_share(
                model, context.calibration, [f * balanced for f in CANDIDATE_FRACTIONS],
                lambda s: uniform_width_plan(model, scores, counts_for(s)), split_samples, context.progress)
    else:
        share, evidence = float(split), {"rule": "given"}
    counts = counts_for(share)
    plan = uniform_width_plan(model, scores, counts)
    settings = {**settings, "rounding": "balanced", "gqa": gqa, "parts": parts, "allocation": allocation,
                "split": {**evidence, "attention_share": share, "balanced_share": balanced}}
    return plan, Budget(counts, geo.total_params, target, geo.removed_params(counts), settings).report()


def warn_if_off_target(report: dict, tolerance: float = 0.02) -> None:
    """Rounding (--round-to, paper shapes, GQA groups) can land far from the requested ratio: say so."""
    asked, got = report.get("requested_ratio_of_all"), report.get("achieved_ratio_of_all")
    if asked is not None and got is not None and abs(asked - got) > tolerance:
        log.warning("secateurs: WARNING: the plan removes %.1f%% of all parameters, not the %.1f%% asked for (the "
                    "rounding settings allow no closer shapes: see --round-to, --rounding, --gqa)", 100 * got,
                    100 * asked)
