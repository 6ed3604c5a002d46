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
from secateurs.names import ALLOCATIONS, SPLITS
from secateurs.accounting import model_stats
from secateurs.allocation import balanced_attention_share, global_counts, uniform_counts
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
from secateurs.reconstruction import DEFAULT_DAMPING, Reconstruction, apply_plan_dense, apply_plan_sequential
from secateurs.selection import apply_selection
from secateurs.split import CANDIDATE_FRACTIONS, SPLIT_SAMPLES, choose_attention_share
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
                       progress: bool = True, gram: bool = False) -> Statistics:
    """Statistics from (in order): a Statistics object, a saved statistics file that exists, or a
    calibration pass (a Calibration, or a source spec loaded with calibration_options). A path
    given as `statistics` that does not exist yet is written after the pass, for reuse.
    gram=True: the statistics must hold Gram matrices (dense reconstruction)."""
    stats = None
    if isinstance(statistics, Statistics):
        stats = statistics
    elif statistics is not None and os.path.exists(statistics):
        stats = Statistics.load(statistics)
        check_statistics_source(stats, statistics, model_identity(model), calibration, calibration_options)
    if stats is not None:
        if gram and any(s.gram is None for s in stats.mlp):
            raise SecateursError("dense reconstruction needs statistics with Gram matrices; these have none (collect "
                                 "them with gram=True, or use sequential reconstruction)")
        return stats
    if not isinstance(calibration, Calibration):
        calibration = load_calibration(calibration, tokenizer, model=model, **(calibration_options or {}))
    stats = collect_statistics(model, calibration, progress=progress, gram=gram)
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
              scores_out: dict | None = None, allocation: str | None = None, split: str | float | None = None,
              split_samples: int = SPLIT_SAMPLES, **depth_options) -> PruningPlan:
    """Score the model with `method` and return the plan (the model is not modified).

    ratio: fraction of parameters removed (of all parameters, or of attention+MLP with
    ratio_of='prunable'); or layers_equivalent=k decoder layers' worth. See secateurs.budget.
    scores_out: a dict that receives the StructureScores under "scores" (width methods that score
    heads and neurons), so a report can show the importance behind this very plan.
    allocation: 'uniform' (every layer the same widths) or 'global' (one threshold on per-layer
    standardised scores; layers differ); split: the attention share of the removed parameters,
    'balanced' (the same fraction of head units as of neurons), 'search' (the candidate with the
    lowest calibration KL, secateurs.split) or a number in [0, 1]. See secateurs.allocation.
    None: the method's default (WIDTH_DEFAULTS; uniform and balanced outside balanced rounding).
    """
    if (method == "harp" or method in DEPTH_METHODS) and (allocation, split) != (None, None):
        raise SecateursError(f"allocation and split apply to width methods that score heads and neurons, not to "
                             f"{method!r}")
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
    allocation, split = width_knobs(method, allocation, split, rounding, round_to)
    if method not in METHODS:
        raise SecateursError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    spec = METHODS[method]
    if layers_equivalent is not None:
        ratio = None
    allocated = allocation != "uniform" or split != "balanced"  # the allocation module, not the stock budget
    if allocated:
        check_allocation(spec, method, allocation, split, rounding, round_to)
        if split == "search" and spec.parts == "both" and not isinstance(calibration, Calibration):
            calibration = load_calibration(calibration, tokenizer, model=model, **(calibration_options or {}))
    if spec.score is not None and not allocated:
        budget = plan_budget(model, ratio, ratio_of=ratio_of, layers_equivalent=layers_equivalent, rounding=rounding,
                             gqa=gqa, parts=spec.parts, round_to=round_to)
    elif spec.score is not None:
        budget = None
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
            selected = apply_selection(scores, selection, seed)
            if budget is not None:
                plan = uniform_width_plan(model, selected, budget.counts)
                report = budget.report()
            else:
                plan, report = allocated_plan(model, selected, ratio, ratio_of, layers_equivalent, gqa, spec.parts,
                                              allocation, split, calibration, split_samples, progress)
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


# What a width method does when a knob is not given, with balanced rounding (README, "Beyond the
# paper": each default is the measured winner; paper rounding keeps the official uniform shapes).
WIDTH_DEFAULTS: dict[str, dict] = {}


def width_knobs(method: str, allocation, split, rounding: str, round_to: int) -> tuple[str, str | float]:
    """(allocation, split) with the method's defaults filled in."""
    defaults = WIDTH_DEFAULTS.get(method, {}) if rounding == "balanced" and round_to == 1 else {}
    return (allocation if allocation is not None else defaults.get("allocation", "uniform"),
            split if split is not None else defaults.get("split", "balanced"))


def reconstruction_for(method: str, given_plan: PruningPlan | None = None, reconstruct: str | None = None,
                       damping: float | None = None, reconstruct_bias: bool = False, rounding: str = "balanced",
                       round_to: int = 1, **_) -> Reconstruction | None:
    """The re-fitting to apply: as asked ('none' = off), else as a given plan records, else the
    method's default (none for re-applied plans that record none, and outside balanced rounding)."""
    if reconstruct == "none":
        return None
    if reconstruct is None:
        recorded = given_plan.provenance.get("reconstruction") if given_plan is not None else None
        if recorded:
            return Reconstruction.from_dict(recorded)
        if given_plan is not None or rounding != "balanced" or round_to != 1:
            return None
        reconstruct = WIDTH_DEFAULTS.get(method, {}).get("reconstruct")
        if reconstruct is None:
            return None
    return Reconstruction(reconstruct, DEFAULT_DAMPING if damping is None else damping, reconstruct_bias)


def check_allocation(spec: WidthMethod, method: str, allocation: str, split, rounding: str, round_to: int) -> None:
    """What the allocation module can do: score-based width methods, balanced rounding."""
    _choice(allocation, ALLOCATIONS, "allocation")
    if not (split in SPLITS or (isinstance(split, (int, float)) and not isinstance(split, bool) and 0 <= split <= 1)):
        raise SecateursError(f"split must be one of {', '.join(SPLITS)} or an attention share in [0, 1]; got {split!r}")
    if spec.score is None or spec.parts == "heads":
        raise SecateursError(f"allocation and split apply to width methods that score heads and neurons, not to "
                             f"{method!r} (FLAP and HARP choose their own allocation)")
    if rounding != "balanced" or round_to != 1:
        raise SecateursError("allocation 'global' and the attention split work with rounding 'balanced' and round-to 1 "
                             "(paper mode reproduces the official uniform shapes)")


def _choice(value, choices, what):
    if value not in choices:
        raise SecateursError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


def allocated_plan(model, scores: StructureScores, ratio, ratio_of, layers_equivalent, gqa: str, parts: str,
                   allocation: str, split, calibration, split_samples: int, progress: bool):
    """(plan, budget report) for a chosen attention share and allocation (secateurs.allocation)."""
    geo = Geometry.of(model)
    target, settings = target_params(geo, ratio, ratio_of, layers_equivalent)

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
                model, calibration, [f * balanced for f in CANDIDATE_FRACTIONS],
                lambda s: uniform_width_plan(model, scores, counts_for(s)), split_samples, progress)
    else:
        share, evidence = float(split), {"rule": "given"}
    counts = counts_for(share)
    plan = uniform_width_plan(model, scores, counts)
    settings = {**settings, "rounding": "balanced", "gqa": gqa, "parts": parts, "allocation": allocation,
                "split": {**evidence, "attention_share": share, "balanced_share": balanced}}
    return plan, Budget(counts, geo.total_params, target, geo.removed_params(counts), settings).report()


def prune(model, tokenizer=None, method: str = "amp", ratio: float | None = 0.2, *, plan: PruningPlan | None = None,
          reconstruct: str | None = None, damping: float | None = None, reconstruct_bias: bool = False,
          **options):
    """Prune `model` in place and return (model, plan). With `plan` given, it is re-applied as is
    (re-fitted as its provenance records, on the calibration data given).

    reconstruct: 'sequential' or 'dense' least-squares re-fitting of the output projections
    (secateurs.reconstruction), 'none', or None for the method's default (reconstruction_for);
    damping: ridge toward the original weights (default 0.1); reconstruct_bias: also fit a bias
    where the family has none. The plan's provenance gains the parameter counts before and after
    surgery.
    """
    settings = reconstruction_for(method, plan, reconstruct, damping, reconstruct_bias,
                                  options.get("rounding", "balanced"), options.get("round_to", 1))
    calibration, statistics = options.get("calibration"), options.get("statistics")
    if settings is not None:
        if settings.mode == "sequential" and not isinstance(calibration, Calibration):
            calibration = load_calibration(calibration, tokenizer, model=model,
                                           **(options.get("calibration_options") or {}))
        if settings.mode == "dense":
            statistics = resolve_statistics(model, tokenizer, calibration, statistics,
                                            options.get("calibration_options"), options.get("progress", True), gram=True)
        options = {**options, "calibration": calibration, "statistics": statistics}
    if plan is None:
        plan = make_plan(model, method, ratio, tokenizer=tokenizer, **options)
        if settings is not None:
            fit_on = calibration.hash if settings.mode == "sequential" else statistics.description.get(
                "calibration_hash")
            plan.provenance["reconstruction"] = {**settings.to_dict(), "calibration_hash": fit_on}
    elif settings is not None:
        recorded = (plan.provenance.get("reconstruction") or {}).get("calibration_hash")
        used = calibration.hash if settings.mode == "sequential" else statistics.description.get("calibration_hash")
        if recorded is not None and recorded != used:
            log.warning("secateurs: WARNING: the plan was re-fitted on other calibration data (%s) than given now (%s); "
                        "the weights will differ from the recorded run", recorded, used)
    before = model_stats(model).total_params
    with phase("surgery" if settings is None else f"surgery with {settings.mode} reconstruction"):
        if settings is None:
            apply_plan(model, plan)
        elif settings.mode == "dense":
            apply_plan_dense(model, plan, statistics, settings)
        else:
            apply_plan_sequential(model, plan, calibration, settings, progress=options.get("progress", True))
    after = model_stats(model).total_params
    plan.provenance.setdefault("params_before", before)
    plan.provenance.setdefault("params_after", after)
    return model, plan
