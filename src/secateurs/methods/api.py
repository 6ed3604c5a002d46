"""The public entry point: secateurs.prune(model, tokenizer, method=..., ratio=...) -> (model, plan),
and make_plan, which hands the model to the method the registry names (secateurs.methods.registry).
"""

from __future__ import annotations

import dataclasses
import logging

from secateurs.errors import SecateursError
from secateurs.methods.base import PlanContext
from secateurs.methods.data import resolve_statistics, run_calibration
from secateurs.methods.options import MethodOptions
from secateurs.methods.registry import get_method
from secateurs.planning.accounting import model_stats
from secateurs.planning.plan import PruningPlan
from secateurs.runtime.progress import phase
from secateurs.surgery.apply import apply_plan
from secateurs.surgery.reconstruction import DEFAULT_DAMPING, Reconstruction, apply_plan_dense, apply_plan_sequential

__all__ = ["PLAN_CONTEXT_KEYS", "make_plan", "prune", "reconstruction_for", "resolve_statistics", "run_calibration"]

log = logging.getLogger("secateurs")


PLAN_CONTEXT_KEYS = ("tokenizer", "calibration", "statistics", "calibration_options", "ratio_of",
                     "layers_equivalent", "seed", "progress", "scores_out")


def with_method_options(method: str, method_options: MethodOptions | None, keywords: dict) -> dict:
    """`keywords` with a method's options object spread into them: the options it was given, or that
    differ from their defaults. Refused: an object of another method's class, or options given both ways."""
    if method_options is None:
        return keywords
    expected = get_method(method).options
    if type(method_options) is not expected:
        raise SecateursError(f"method {method!r} takes {expected.__name__}, not {type(method_options).__name__}")
    both = sorted(k for k in keywords if k not in PLAN_CONTEXT_KEYS and k in expected.option_names())
    if both:
        raise SecateursError(f"{', '.join(both)} given both in method_options and as keywords; give each once")
    values = {f.name: (getattr(method_options, f.name), f.default) for f in dataclasses.fields(method_options)
              if f.name != "given"}
    set_here = {k: v for k, (v, default) in values.items() if k in method_options.given or v != default}
    return {**keywords, **set_here}


def make_plan(model, method: str = "amp", ratio: float | None = 0.2, *, method_options: MethodOptions | None = None,
              **keywords) -> PruningPlan:
    """Score the model with `method` and return the plan (the model is not modified).

    ratio: fraction of parameters removed (of all parameters, or of attention+MLP with
    ratio_of='prunable'); or layers_equivalent=k decoder layers' worth. See secateurs.planning.budget.
    tokenizer, calibration (a Calibration or a source spec), calibration_options, statistics,
    seed, progress and scores_out (a dict receiving the StructureScores behind the plan) go to
    every method; any other keyword is one of the method's options (its `options` dataclass,
    e.g. secateurs.methods.amp.AmpOptions) and is refused by methods that do not take it; or give them as
    one object, `method_options=AmpOptions(...)`.
    """
    keywords = with_method_options(method, method_options, keywords)
    spec = get_method(method)
    context = PlanContext(model, ratio=ratio, **{k: keywords.pop(k) for k in PLAN_CONTEXT_KEYS if k in keywords})
    return spec.make_plan(context, spec.options.from_keywords(method, keywords))


def reconstruction_for(method: str, given_plan: PruningPlan | None = None, reconstruct: str | None = None,
                       damping: float | None = None, reconstruct_bias: bool = False, rounding: str = "balanced",
                       round_to: int = 1, **_) -> Reconstruction | None:
    """The re-fitting to apply: as asked ('none' = off), else as a given plan records, else the
    method's default (its options class's `reconstruct`; none for re-applied plans that record none,
    and outside balanced rounding with round-to 1)."""
    if reconstruct == "none":
        return None
    if reconstruct is None:
        recorded = given_plan.provenance.get("reconstruction") if given_plan is not None else None
        if recorded:
            return Reconstruction.from_dict(recorded)
        if given_plan is not None or rounding != "balanced" or round_to != 1:
            return None
        reconstruct = get_method(method).options.reconstruct
        if reconstruct is None:
            return None
    return Reconstruction(reconstruct, DEFAULT_DAMPING if damping is None else damping, reconstruct_bias)


def prune(model, tokenizer=None, method: str = "amp", ratio: float | None = 0.2, *, plan: PruningPlan | None = None,
          reconstruct: str | None = None, damping: float | None = None, reconstruct_bias: bool = False,
          method_options: MethodOptions | None = None, **options):
    """Prune `model` in place and return (model, plan). With `plan` given, it is re-applied as is
    (re-fitted as its provenance records, on the calibration data given).

    reconstruct: 'sequential' or 'dense' least-squares re-fitting of the output projections
    (secateurs.surgery.reconstruction), 'none', or None for the method's default (reconstruction_for);
    damping: ridge toward the original weights (default DEFAULT_DAMPING, 0.3); reconstruct_bias: also fit a bias
    where the family has none. The plan's provenance gains the parameter counts before and after
    surgery. The method's options come as keywords or as one object (`method_options=AmpOptions(...)`).
    """
    options = with_method_options(method, method_options, options)
    settings = reconstruction_for(method, plan, reconstruct, damping, reconstruct_bias,
                                  options.get("rounding", "balanced"), options.get("round_to", 1))
    calibration, statistics = options.get("calibration"), options.get("statistics")
    if settings is not None:
        if settings.mode == "sequential":
            calibration = run_calibration(model, tokenizer, calibration, statistics, options.get("calibration_options"))
        if settings.mode == "dense":
            statistics = resolve_statistics(model, tokenizer, calibration, statistics,
                                            options.get("calibration_options"), options.get("progress", True),
                                            gram=True)
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
