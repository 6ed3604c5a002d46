"""Depth pruning: remove whole decoder layers. Consensus (arXiv 2411.14345) and the single-metric
baselines people use today, behind one interface.

=================  ===========================================================================
method             how a layer is chosen
=================  ===========================================================================
consensus          rank sum over several distances between the final-normed output with and
                   without the layer (default: cka, cosine, angular, wasserstein, procrustes,
                   permutation); smallest sum goes
depth-bi           ShortGPT: block influence 1 - cos(layer input, layer output)
depth-angular      Gromov et al.: the contiguous block of k layers whose input and output have the
                   smallest angular distance (one-shot by construction)
depth-cka          1 - linear CKA of the final-normed output with the layer skipped
depth-ppl          Shortened-LLaMA: calibration NLL with the layer skipped
depth-random       seeded random layers (the floor)
=================  ===========================================================================

The target is k layers (`layers=k`), or a parameter ratio / layers_equivalent turned into the
nearest whole number of layers. One-shot removes the k best-scored layers; iterative removes one,
re-scores the rest on the shortened model, and repeats. The first and last layers are protected
by default (embedding-adjacent and output-adjacent layers are rarely redundant). The plan's
provenance holds every round's scores and ranks, so a user can see why a layer went.
"""

from __future__ import annotations

import random
from typing import ClassVar

from secateurs.adapters import get_adapter
from secateurs.calibration.data import Calibration, as_calibration
from secateurs.criteria.consensus import consensus_ranking
from secateurs.criteria.depth_scores import LOCAL_METRICS, capture_traces, check_metrics, score_layers
from secateurs.errors import SecateursError
from secateurs.methods.base import Method, Needs, PlanContext, provenance
from secateurs.methods.options import CONSENSUS_METRICS, DepthOptions
from secateurs.planning.budget import Geometry, target_params
from secateurs.planning.geometry import layer_removal_plan
from secateurs.planning.plan import PruningPlan


class DepthMethod(Method):
    """Whole-layer removal: `choice` is 'rank' (rank-sum of metrics), 'block' (Gromov's contiguous
    block) or 'random'."""

    choice: ClassVar[str] = "rank"
    metrics: ClassVar[tuple[str, ...]] = ()
    custom_metrics: ClassVar[bool] = False
    options = DepthOptions
    parts = "layers"

    @property
    def needs(self) -> Needs:
        scored = self.choice != "random"
        return Needs(calibration=scored, lm_head=scored)

    def make_plan(self, context: PlanContext, options: DepthOptions) -> PruningPlan:
        return layers_plan(context, self.name, options)

    def execution(self, options: DepthOptions, memory: str, recovering: bool) -> str:
        """With recovery, `iterative` recovers after every removed layer (Consensus's pipeline)."""
        if recovering and options.iterative:
            return "recovering"
        return super().execution(options, memory, recovering)


class Consensus(DepthMethod):
    name, metrics, custom_metrics = "consensus", CONSENSUS_METRICS, True
    summary = "Consensus: rank sum of representation distances, layer skipped vs kept"


class DepthBi(DepthMethod):
    name, metrics, summary = "depth-bi", ("bi",), "ShortGPT block influence 1 - cos(layer in, layer out)"


class DepthAngular(DepthMethod):
    name, choice, metrics = "depth-angular", "block", ("block-angular",)
    summary = "Gromov et al.: contiguous block with the smallest angular in/out distance"


class DepthCka(DepthMethod):
    name, metrics, summary = "depth-cka", ("cka",), "1 - linear CKA of the output with the layer skipped"


class DepthPpl(DepthMethod):
    name, metrics, summary = "depth-ppl", ("nll",), "Shortened-LLaMA: calibration NLL with the layer skipped"


class DepthRandom(DepthMethod):
    name, choice, summary = "depth-random", "random", "seeded random layers (the floor)"


DEPTH_METHODS: dict[str, DepthMethod] = {m.name: m() for m in (Consensus, DepthBi, DepthAngular, DepthCka, DepthPpl,
                                                                  DepthRandom)}


def layers_for_target(model, ratio: float | None, ratio_of: str = "all",
                      layers_equivalent: float | None = None) -> tuple[int, dict]:
    """The whole number of layers closest to a parameter target."""
    geo = Geometry.of(model)
    target, settings = target_params(geo, ratio, ratio_of, layers_equivalent)
    mean_layer = sum(geo.layer_params) / len(geo.layer_params)
    k = round(target / mean_layer)
    if k < 1:
        raise SecateursError(f"the target removes {target:,} parameters, less than half a decoder layer "
                             f"({mean_layer:,.0f}); raise it or give layers=k")
    return k, settings


def _round(x: float) -> float:
    return float(f"{x:.8g}")


def _table(scores: dict[str, dict[int, float]], rows) -> list[dict]:
    by_layer = {row.candidate: row for row in rows}
    return [{"layer": c, "rank_sum": by_layer[c].rank_sum,
             "scores": {m: _round(s[c]) for m, s in scores.items()},
             "ranks": by_layer[c].ranks} for c in sorted(by_layer)]


def choose_layers(model, method: str, k: int, *, calibration: Calibration | None, metrics=None,
                  iterative: bool = False, protect_first: int = 1, protect_last: int = 1,
                  max_tokens: int | None = 2048, seed: int = 0, progress: bool = True) -> tuple[list[int], dict]:
    """(layers to remove, details for the provenance)."""
    if method not in DEPTH_METHODS:
        raise SecateursError(f"unknown depth method {method!r}; available: {', '.join(DEPTH_METHODS)}")
    spec = DEPTH_METHODS[method]
    num_layers = len(get_adapter(model).decoder_layers(model))
    if protect_first < 0 or protect_last < 0:
        raise SecateursError("protect_first and protect_last must be >= 0")
    candidates = list(range(protect_first, num_layers - protect_last))
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise SecateursError(f"layers must be a positive whole number, got {k!r}")
    if k >= len(candidates):
        raise SecateursError(f"cannot remove {k} layers: only {len(candidates)} of {num_layers} are candidates "
                             f"(first {protect_first} and last {protect_last} protected); keep at least one")
    if metrics is not None and not spec.custom_metrics:
        raise SecateursError(f"method {method!r} uses the metric {list(spec.metrics)}; metrics= is for 'consensus'")
    metrics = check_metrics(metrics if metrics is not None else spec.metrics) if spec.choice != "random" else ()
    if spec.choice == "rank" and "block-angular" in metrics:
        raise SecateursError("'block-angular' scores blocks, not single layers; use method 'depth-angular'")
    details = {"metrics": list(metrics), "iterative": iterative, "protect_first": protect_first,
               "protect_last": protect_last, "candidates": candidates}
    if spec.choice == "random":
        if iterative:
            raise SecateursError("depth-random has nothing to re-score; drop iterative")
        return sorted(random.Random(seed).sample(candidates, k)), details
    if calibration is None:
        raise SecateursError(f"{method} needs calibration data")
    traces = capture_traces(model, calibration, max_tokens, seed, progress)
    details["scoring_tokens"] = int(sum(int(t.chosen.sum()) for t in traces))
    details["max_tokens"] = max_tokens
    rounds, removed = [], []
    if spec.choice == "block":
        if iterative:
            raise SecateursError("depth-angular removes one contiguous block, chosen at once; drop iterative")
        starts = [c for c in candidates if c + k - 1 <= candidates[-1]]
        result = score_layers(model, traces, starts, metrics, span=k, progress=progress)
        block = result.scores["block-angular"]
        best = min(starts, key=lambda s: (block[s], -s))
        removed = list(range(best, best + k))
        rounds.append({"removed": removed, "block_length": k,
                       "table": [{"first_layer": s, "scores": {"block-angular": _round(block[s])}} for s in starts]})
    else:
        remaining = list(candidates)
        while len(removed) < k:
            result = score_layers(model, traces, remaining, metrics, removed=removed, progress=progress)
            ranking = consensus_ranking(result.scores)
            take = [ranking[0].candidate] if iterative else [row.candidate for row in ranking[:k]]
            rounds.append({"removed": take, "table": _table(result.scores, ranking), **result.extra})
            removed += take
            remaining = [c for c in remaining if c not in take]
    details["rounds"] = rounds  # no timings here: same model + data + seed must give the same plan bytes
    if any(m in LOCAL_METRICS for m in metrics):
        details["note"] = "local metrics compare a layer's input with its output on the current model"
    return sorted(removed), details


def depth_plan(model, method: str = "consensus", ratio: float | None = None, *, tokenizer=None, calibration=None,
               calibration_options: dict | None = None, ratio_of: str = "all", layers_equivalent: float | None = None,
               seed: int = 0, progress: bool = True, **options) -> PruningPlan:
    """A plan that removes whole decoder layers chosen by a depth method (model not modified).
    `options`: secateurs.methods.options.DepthOptions's fields (layers, metrics, iterative, ...).

    `layers=k` takes precedence over `ratio` / `layers_equivalent`, which are rounded to the
    nearest whole number of layers.
    """
    if method not in DEPTH_METHODS:
        raise SecateursError(f"unknown depth method {method!r}; available: {', '.join(DEPTH_METHODS)}")
    context = PlanContext(model, tokenizer, ratio, ratio_of, layers_equivalent, calibration,
                          calibration_options or {}, seed=seed, progress=progress)
    return layers_plan(context, method, DepthOptions.from_keywords(method, options))


def layers_plan(context: PlanContext, method: str, options: DepthOptions) -> PruningPlan:
    """depth_plan on a PlanContext: the target, the calibration data, the chosen layers, the plan."""
    model, target, layers = context.model, {}, options.layers
    if layers is None:
        layers, target = layers_for_target(model, None if context.layers_equivalent is not None else context.ratio,
                                           context.ratio_of, context.layers_equivalent)
    calib = None
    if DEPTH_METHODS[method].choice != "random":
        calib = as_calibration(context.calibration, context.tokenizer, model=model,
                               options=context.calibration_options)
    removed, details = choose_layers(model, method, layers, calibration=calib, metrics=options.metrics,
                                     iterative=options.iterative, protect_first=options.protect_first,
                                     protect_last=options.protect_last, max_tokens=options.max_tokens,
                                     seed=context.seed, progress=context.progress)
    plan = layer_removal_plan(model, removed)
    chosen = {"layers": layers, **target, "layers_removed": removed,
              **{k: v for k, v in details.items() if k != "rounds"}}
    plan.provenance = provenance(method, plan, context.seed, calib.description if calib is not None else None,
                                 calib.hash if calib is not None else None, chosen,
                                 {"rounds": details.get("rounds", [])})
    return plan
