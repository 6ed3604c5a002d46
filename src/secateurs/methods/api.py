"""The public entry point: secateurs.prune(model, tokenizer, method=..., ratio=...) -> (model, plan).

A width method is a criterion (how heads and neurons are scored) plus which parts it prunes;
the budget (how many go per layer) and the selection mode are shared by all of them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from secateurs.version import __version__
from secateurs.accounting import model_stats
from secateurs.budget import Budget, Geometry, KeepCounts, plan_budget, target_params
from secateurs.calibration import Calibration, load_calibration
from secateurs.criteria import StructureScores
from secateurs.criteria.amp import amp_scores
from secateurs.criteria.magnitude import magnitude_scores
from secateurs.criteria.random import random_scores
from secateurs.criteria.wanda_sp import wanda_sp_scores
from secateurs.errors import SecateursError
from secateurs.identity import model_identity
from secateurs.methods.flap import flap_plan
from secateurs.methods.harp import DEFAULT_GRID, harp_layers_for_ratio, harp_plan
from secateurs.methods.depth import DEPTH_METHODS, depth_plan
from secateurs.methods.uniform import uniform_width_plan
from secateurs.plan import PruningPlan
from secateurs.progress import phase
from secateurs.selection import apply_selection
from secateurs.statistics import Statistics, collect_statistics
from secateurs.surgery import apply_plan


log = logging.getLogger("secateurs")


@dataclass(frozen=True)
class WidthMethod:
    score: Callable[..., StructureScores] | None  # (model, statistics, options) -> scores; None: global method
    needs_statistics: bool
    parts: str = "both"
    summary: str = ""


METHODS: dict[str, WidthMethod] = {
    "amp": WidthMethod(lambda m, s, o: amp_scores(s, o.get("averaging", "prompt")), True, "both",
                       "AMP: heads by L1 of their projected output, neurons by mean |activation|"),
    "amp-heads": WidthMethod(lambda m, s, o: amp_scores(s, o.get("averaging", "prompt")), True, "heads",
                             "AMP on attention heads only (ablation)"),
    "amp-mlp": WidthMethod(lambda m, s, o: amp_scores(s, o.get("averaging", "prompt")), True, "mlp",
                           "AMP on MLP neurons only (ablation)"),
    "wanda-sp": WidthMethod(lambda m, s, o: wanda_sp_scores(m, s), True, "both",
                            "wanda-sp: |W| * ||X|| per output-projection input channel"),
    "wanda-sp-heads": WidthMethod(lambda m, s, o: wanda_sp_scores(m, s), True, "heads",
                                  "wanda-sp on attention heads only"),
    "flap": WidthMethod(None, True, "both",
                        "FLAP: standardised fluctuation, one global threshold, bias compensation (non-uniform)"),
    "magnitude": WidthMethod(lambda m, s, o: magnitude_scores(m), False, "both",
                             "L2 norm of the weights a head or neuron owns (data-free)"),
    "random": WidthMethod(lambda m, s, o: random_scores(m, o.get("seed", 0)), False, "both",
                          "seeded random scores (the floor)"),
}
METHODS["harp"] = WidthMethod(None, True, "attention",
                              "HARP: identity-matrix attention with searched alpha in the top layers")
METHODS.update(DEPTH_METHODS)  # whole-layer methods (secateurs.methods.depth); make_plan branches on them


def resolve_statistics(model, tokenizer, calibration=None, statistics=None, calibration_options: dict | None = None,
                       progress: bool = True) -> Statistics:
    """Statistics from (in order): a Statistics object, a saved statistics file that exists, or a
    calibration pass (a Calibration, or a source spec loaded with calibration_options). A path
    given as `statistics` that does not exist yet is written after the pass, for reuse."""
    if isinstance(statistics, Statistics):
        return statistics
    if statistics is not None and os.path.exists(statistics):
        stats = Statistics.load(statistics)
        check_statistics_source(stats, statistics, model_identity(model), calibration, calibration_options)
        return stats
    if not isinstance(calibration, Calibration):
        calibration = load_calibration(calibration, tokenizer, model=model, **(calibration_options or {}))
    stats = collect_statistics(model, calibration, progress=progress)
    if statistics is not None:
        stats.description["model"] = model_identity(model)
        stats.save(statistics)
    return stats


def warn_if_off_target(report: dict, tolerance: float = 0.02) -> None:
    """Rounding (--round-to, paper shapes, GQA groups) can land far from the requested ratio: say so."""
    asked, got = report.get("requested_ratio_of_all"), report.get("achieved_ratio_of_all")
    if asked is not None and got is not None and abs(asked - got) > tolerance:
        log.warning("secateurs: WARNING: the plan removes %.1f%% of all parameters, not the %.1f%% asked for (the "
                    "rounding settings allow no closer shapes: see --round-to, --rounding, --gqa)", 100 * got,
                    100 * asked)


def check_statistics_source(stats: Statistics, path, identity: str, calibration, calibration_options) -> None:
    """Refuse statistics made on another model or with other calibration settings than asked for."""
    made_on = stats.description.get("model")
    if made_on != identity:
        made_on = made_on or "unrecorded: an older secateurs"
        raise SecateursError(f"statistics file {path} was made on another model ({made_on} vs this model's "
                             f"{identity}); delete it or give another --stats path")
    recorded = stats.description.get("calibration") or {}
    if isinstance(calibration, Calibration):
        if stats.description.get("calibration_hash") != calibration.hash:
            raise SecateursError(f"statistics file {path} was made on other calibration data than the one given")
        return
    options = calibration_options or {}  # only what the caller asked for explicitly is compared
    asked = {**({"source": calibration} if calibration is not None else {}),
             **{k: options[k] for k in ("num_samples", "max_length", "seed") if options.get(k) is not None}}
    differs = {k: (recorded.get(k), v) for k, v in asked.items() if recorded.get(k) != v}
    if differs:
        detail = ", ".join(f"{k}: file {a!r} vs asked {b!r}" for k, (a, b) in differs.items())
        raise SecateursError(f"statistics file {path} was made with other calibration settings ({detail}); delete it, "
                             "give another --stats path, or ask for the settings it was made with")


def make_plan(model, method: str = "amp", ratio: float | None = 0.2, *, tokenizer=None, calibration=None,
              statistics=None, calibration_options: dict | None = None, selection: str = "standard",
              averaging: str = "prompt", gqa: str = "groups", rounding: str = "balanced", ratio_of: str = "all",
              layers_equivalent: float | None = None, round_to: int = 1, seed: int = 0,
              progress: bool = True, harp_layers: int | None = None, alpha_grid=None, flap_ratio: float | None = None,
              scores_out: dict | None = None, **depth_options) -> PruningPlan:
    """Score the model with `method` and return the plan (the model is not modified).

    ratio: fraction of parameters removed (of all parameters, or of attention+MLP with
    ratio_of='prunable'); or layers_equivalent=k decoder layers' worth. See secateurs.budget.
    scores_out: a dict that receives the StructureScores under "scores" (width methods that score
    heads and neurons), so a report can show the importance behind this very plan.
    """
    if method == "harp":
        calib = calibration if isinstance(calibration, Calibration) else load_calibration(
            calibration, tokenizer, model=model, **(calibration_options or {}))
        num_layers = harp_layers if harp_layers is not None else harp_layers_for_ratio(model, ratio)
        return harp_plan(model, calib, num_layers, grid=tuple(alpha_grid or DEFAULT_GRID), flap_ratio=flap_ratio,
                         progress=progress)
    if method in DEPTH_METHODS:  # layers=k, metrics=, iterative=, protect_first/last=, max_tokens=
        return depth_plan(model, method, ratio, tokenizer=tokenizer, calibration=calibration,
                          calibration_options=calibration_options, ratio_of=ratio_of,
                          layers_equivalent=layers_equivalent, seed=seed, progress=progress, **depth_options)
    if depth_options:
        raise SecateursError(f"options {sorted(depth_options)} only apply to depth methods ({', '.join(DEPTH_METHODS)})")
    if method not in METHODS:
        raise SecateursError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    spec = METHODS[method]
    if layers_equivalent is not None:
        ratio = None
    if spec.score is not None:
        budget = plan_budget(model, ratio, ratio_of=ratio_of, layers_equivalent=layers_equivalent, rounding=rounding,
                             gqa=gqa, parts=spec.parts, round_to=round_to)
    else:
        geo = Geometry.of(model)
        target, settings = target_params(geo, ratio, ratio_of, layers_equivalent)
    stats = None
    if spec.needs_statistics:
        stats = resolve_statistics(model, tokenizer, calibration, statistics, calibration_options, progress)
    if spec.score is not None:
        with phase(f"scoring ({method}) and planning"):
            scores = spec.score(model, stats, {"averaging": averaging, "seed": seed})
            if scores_out is not None:
                scores.description.setdefault("criterion", method)
                scores_out["scores"] = scores
            plan = uniform_width_plan(model, apply_selection(scores, selection, seed), budget.counts)
        report = budget.report()
        warn_if_off_target(report)
    else:
        plan = flap_plan(model, stats, target, gqa)
        counts = [KeepCounts(*s) for s in plan.pruned_shapes()]
        report = Budget(counts, geo.total_params, target, geo.removed_params(counts), {**settings, "gqa": gqa}).report()
    calib = stats.description if stats is not None else {}
    plan.provenance = {
        "method": method,
        **({"selection": selection} if spec.score is not None else {}),
        **({"averaging": averaging} if method.startswith("amp") else {}),
        **report,
        "seed": seed,
        "calibration": calib.get("calibration"),
        "calibration_hash": calib.get("calibration_hash"),
        "base_model": plan.base.get("name_or_path"),
        "secateurs_version": __version__,
    }
    return plan


def prune(model, tokenizer=None, method: str = "amp", ratio: float | None = 0.2, *, plan: PruningPlan | None = None,
          **options):
    """Prune `model` in place and return (model, plan). With `plan` given, it is re-applied as is.

    The plan's provenance gains the parameter counts before and after surgery.
    """
    if plan is None:
        plan = make_plan(model, method, ratio, tokenizer=tokenizer, **options)
    before = model_stats(model).total_params
    with phase("surgery"):
        apply_plan(model, plan)
    after = model_stats(model).total_params
    plan.provenance.setdefault("params_before", before)
    plan.provenance.setdefault("params_after", after)
    return model, plan
