"""The public entry point: secateurs.prune(model, method=..., ratio=...) -> (model, plan)."""

from __future__ import annotations

from typing import Callable

from secateurs import __version__
from secateurs.accounting import model_stats
from secateurs.budget import GQA_MODES, check_ratio
from secateurs.criteria.magnitude import magnitude_scores
from secateurs.criteria.random import random_scores
from secateurs.errors import SecateursError
from secateurs.methods.uniform import uniform_width_plan
from secateurs.plan import PruningPlan
from secateurs.surgery import apply_plan


def _magnitude(model, *, ratio: float, gqa: str, seed: int, **_) -> PruningPlan:
    return uniform_width_plan(model, magnitude_scores(model), ratio, gqa)


def _random(model, *, ratio: float, gqa: str, seed: int, **_) -> PruningPlan:
    return uniform_width_plan(model, random_scores(model, seed), ratio, gqa)


METHODS: dict[str, Callable[..., PruningPlan]] = {"magnitude": _magnitude, "random": _random}


def make_plan(model, method: str = "magnitude", ratio: float = 0.2, *, gqa: str = "groups", seed: int = 0,
              **options) -> PruningPlan:
    """Score the model with `method` and return the plan (the model is not modified)."""
    if method not in METHODS:
        raise SecateursError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    ratio = check_ratio(ratio)
    if gqa not in GQA_MODES:
        raise SecateursError(f"gqa mode must be one of {GQA_MODES}, got {gqa!r}")
    plan = METHODS[method](model, ratio=ratio, gqa=gqa, seed=seed, **options)
    plan.provenance = {
        "method": method,
        "ratio": ratio,
        "ratio_unit": "fraction of heads and of neurons removed in every layer",
        "gqa": gqa,
        "seed": seed,
        "calibration": options.get("calibration_description"),
        "calibration_hash": options.get("calibration_hash"),
        "base_model": plan.base.get("name_or_path"),
        "secateurs_version": __version__,
        **plan.provenance,
    }
    return plan


def prune(model, tokenizer=None, method: str = "magnitude", ratio: float = 0.2, *, plan: PruningPlan | None = None,
          gqa: str = "groups", seed: int = 0, **options):
    """Prune `model` in place and return (model, plan).

    With `plan` given, it is re-applied as is (method and ratio are ignored). The plan's provenance
    gains the achieved fraction of parameters removed.
    """
    if plan is None:
        plan = make_plan(model, method, ratio, gqa=gqa, seed=seed, **options)
    before = model_stats(model).total_params
    apply_plan(model, plan)
    after = model_stats(model).total_params
    plan.provenance.setdefault("params_before", before)
    plan.provenance.setdefault("params_after", after)
    plan.provenance.setdefault("achieved_param_ratio", round(1 - after / before, 6))
    return model, plan
