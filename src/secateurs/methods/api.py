"""The public entry point: secateurs.prune(model, tokenizer, method=..., ratio=...) -> (model, plan),
and make_plan, which hands the model to the method the registry names (secateurs.methods.registry).
"""

from __future__ import annotations

import logging
import os

from secateurs.planning.accounting import model_stats
from secateurs.calibration.data import Calibration, as_calibration, load_calibration
from secateurs.errors import SecateursError
from secateurs.storage.identity import model_identity
from secateurs.methods.base import PlanContext
from secateurs.methods.registry import get_method
from secateurs.methods.width import WIDTH_DEFAULTS
from secateurs.planning.plan import PruningPlan
from secateurs.runtime.progress import phase
from secateurs.surgery.reconstruction import DEFAULT_DAMPING, Reconstruction, apply_plan_dense, apply_plan_sequential
from secateurs.calibration.statistics import Statistics, collect_statistics
from secateurs.surgery.apply import apply_plan

log = logging.getLogger("secateurs")


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
    calibration = as_calibration(calibration, tokenizer, model=model, options=calibration_options)
    stats = collect_statistics(model, calibration, progress=progress, gram=gram)
    if statistics is not None:
        stats.description["model"] = model_identity(model)
        stats.save(statistics)
    return stats


def check_statistics_source(stats: Statistics, path, identity: str, calibration, calibration_options) -> None:
    """Refuse statistics made on another model or with other calibration settings than asked for."""
    made_on = stats.description.get("model")
    if made_on != identity:
        made_on = made_on or "unrecorded: an older secateurs"
        raise SecateursError(f"statistics file {path} was made on another model ({made_on} vs this model's "
                             f"{identity}); delete it or give another --stats path")
    recorded = stats.description.get("calibration") or {}
    settings = ("num_samples", "max_length", "seed")
    if isinstance(calibration, Calibration):
        asked = {k: calibration.description.get(k) for k in ("source", *settings)}
    else:
        options = calibration_options or {}  # only what the caller asked for explicitly is compared
        asked = {**({"source": calibration} if calibration is not None else {}),
                 **{k: options[k] for k in settings if options.get(k) is not None}}
    differs = {k: (recorded.get(k), v) for k, v in asked.items() if recorded.get(k) != v}
    if differs:
        detail = ", ".join(f"{k}: file {a!r} vs asked {b!r}" for k, (a, b) in differs.items())
        raise SecateursError(f"statistics file {path} was made with other calibration settings ({detail}); delete it, "
                             "give another --stats path, or ask for the settings it was made with")
    if isinstance(calibration, Calibration) and stats.description.get("calibration_hash") != calibration.hash:
        raise SecateursError(f"statistics file {path} was made on other calibration data than the one given")


def run_calibration(model, tokenizer, calibration=None, statistics=None, options: dict | None = None) -> Calibration:
    """The calibration data of a run: as given; else, when statistics (an object, or a file that
    exists) were made earlier, the very data they were made on, so that a split search and a
    re-fit see what the scores saw (not silently the default source); else the default source."""
    if calibration is None and statistics is not None:
        description = statistics.description if isinstance(statistics, Statistics) else (
            Statistics.read_description(statistics) if os.path.exists(statistics) else None)
        if description is not None:
            return _recorded_calibration(description, statistics, tokenizer, model, options or {})
    return as_calibration(calibration, tokenizer, model=model, options=options)


def _recorded_calibration(description: dict, where, tokenizer, model, options: dict) -> Calibration:
    recorded = description.get("calibration") or {}
    name = where if isinstance(where, str) else "the statistics given"
    if tokenizer is None:
        raise SecateursError(f"this run needs the calibration data behind {name} again (split search, re-fit), and "
                             "no tokenizer was given to read it: pass the tokenizer, or split='balanced' and "
                             "reconstruct='none'")
    if not recorded.get("source"):
        raise SecateursError(f"{name} records no calibration source, and this run needs the calibration data again "
                             "(split search, re-fit): give it with --calib")
    settings = {k: recorded[k] for k in ("num_samples", "max_length", "seed", "batch_size") if k in recorded}
    calibration = load_calibration(recorded["source"], tokenizer, model=model, **{**settings, **options})
    if description.get("calibration_hash") not in (None, calibration.hash):
        raise SecateursError(f"{name} was made on calibration data from {recorded['source']} that no longer reads the "
                             "same (the file changed?); give the calibration data with --calib, or delete the "
                             "statistics file")
    return calibration


PLAN_CONTEXT_KEYS = ("tokenizer", "calibration", "statistics", "calibration_options", "ratio_of",
                     "layers_equivalent", "seed", "progress", "scores_out")


def make_plan(model, method: str = "amp", ratio: float | None = 0.2, **keywords) -> PruningPlan:
    """Score the model with `method` and return the plan (the model is not modified).

    ratio: fraction of parameters removed (of all parameters, or of attention+MLP with
    ratio_of='prunable'); or layers_equivalent=k decoder layers' worth. See secateurs.planning.budget.
    tokenizer, calibration (a Calibration or a source spec), calibration_options, statistics,
    seed, progress and scores_out (a dict receiving the StructureScores behind the plan) go to
    every method; any other keyword is one of the method's options (its `options` dataclass,
    e.g. secateurs.methods.amp.AmpOptions) and is refused by methods that do not take it.
    """
    spec = get_method(method)
    context = PlanContext(model, ratio=ratio, **{k: keywords.pop(k) for k in PLAN_CONTEXT_KEYS if k in keywords})
    return spec.make_plan(context, spec.options.from_keywords(method, keywords))


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


def prune(model, tokenizer=None, method: str = "amp", ratio: float | None = 0.2, *, plan: PruningPlan | None = None,
          reconstruct: str | None = None, damping: float | None = None, reconstruct_bias: bool = False,
          **options):
    """Prune `model` in place and return (model, plan). With `plan` given, it is re-applied as is
    (re-fitted as its provenance records, on the calibration data given).

    reconstruct: 'sequential' or 'dense' least-squares re-fitting of the output projections
    (secateurs.surgery.reconstruction), 'none', or None for the method's default (reconstruction_for);
    damping: ridge toward the original weights (default 0.1); reconstruct_bias: also fit a bias
    where the family has none. The plan's provenance gains the parameter counts before and after
    surgery.
    """
    settings = reconstruction_for(method, plan, reconstruct, damping, reconstruct_bias,
                                  options.get("rounding", "balanced"), options.get("round_to", 1))
    calibration, statistics = options.get("calibration"), options.get("statistics")
    if settings is not None:
        if settings.mode == "sequential":
            calibration = run_calibration(model, tokenizer, calibration, statistics, options.get("calibration_options"))
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
    else:
        plan.mark_reapplied()
        if settings is not None:
            recorded = (plan.provenance.get("reconstruction") or {}).get("calibration_hash")
            used = calibration.hash if settings.mode == "sequential" else statistics.description.get(
                "calibration_hash")
            if recorded is not None and recorded != used:
                log.warning("secateurs: WARNING: the plan was re-fitted on other calibration data (%s) than given "
                            "now (%s); the weights will differ from the recorded run", recorded, used)
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
