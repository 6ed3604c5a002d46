"""HARP (arXiv 2507.01900): in the top N layers, replace attention by its identity-matrix value
path scaled by alpha, alpha searched greedily from the top layer down on a grid to minimise
calibration perplexity; optionally followed by FLAP MLP pruning on the transformed model.

The search never re-runs the layers below the one being tuned: the dense inputs of the top N
layers (and the keyword arguments each layer needs) are captured in one forward pass; a trial of
alpha at layer l runs layers l..L-1 (those above l already fixed) on the cached input of l.
"""

from __future__ import annotations

import copy
import math

import torch

from secateurs.adapters import get_adapter
from secateurs.calibration.data import Calibration
from secateurs.calibration.runner import run_layer, summed_next_token_nll
from secateurs.calibration.statistics import collect_statistics
from secateurs.calibration.streaming import dense_layer_inputs
from secateurs.errors import SecateursError
from secateurs.methods.base import Method, Needs, PlanContext, provenance
from secateurs.methods.flap import flap_plan
from secateurs.methods.options import ALPHA_GRID, HarpOptions
from secateurs.planning.budget import Geometry, target_params
from secateurs.planning.geometry import identity_plan
from secateurs.planning.plan import ALPHA_MAX, PruningPlan
from secateurs.runtime.offload import detached_copy, input_device
from secateurs.runtime.progress import bar as progress_bar
from secateurs.surgery.apply import apply_plan, replace_attention

DEFAULT_GRID = ALPHA_GRID


def capture_layer_inputs(model, calibration: Calibration, first: int) -> list[list[tuple]]:
    """For every calibration batch: [(hidden_states, kwargs) for layers first..L-1] of the dense
    model, computed by the layer-streamed driver (one layer at a time over all batches)."""
    inputs, kwargs = dense_layer_inputs(model, calibration, first, storage=input_device(model))
    return [[(inputs[i][b], kwargs[i][b]) for i in sorted(inputs)] for b in range(len(calibration.batches))]


@torch.inference_mode()
def tail_nll(model, adapter, layers, start: int, captured, calibration) -> float:
    """Mean next-token NLL of the calibration set running layers[start:] on cached inputs."""
    first = len(adapter.decoder_layers(model)) - len(captured[0])
    total, count = 0.0, 0
    for per_layer, batch in zip(captured, calibration.batches):
        hidden, _ = per_layer[start - first]
        for offset, layer in enumerate(layers[start:]):
            _, kwargs = per_layer[start - first + offset]
            hidden = run_layer(layer, hidden, kwargs, batch["attention_mask"])
        normed = adapter.final_norm(model)(hidden)[:, :-1]
        target = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -1)
        nll, scored = summed_next_token_nll(normed, target, lambda rows: adapter.logits(model, rows))
        total, count = total + nll, count + scored
    return total / max(count, 1)


def _harp_layer(adapter, dense_layer, alpha: float):
    """A copy of the dense layer with HARP attention at `alpha` (a plain module in memory, also
    when the dense layer is offloaded by a device map)."""
    layer = detached_copy(dense_layer)
    replace_attention(adapter, layer, "removed" if alpha == 0 else "value", alpha)
    return layer


def search_alphas(model, calibration: Calibration, num_layers: int, grid=DEFAULT_GRID,
                  progress: bool = True) -> tuple[dict[int, float], dict[int, list]]:
    """Greedy top-down alpha search. Returns ({layer: alpha}, {layer: [[alpha, ppl], ...]})."""
    adapter = get_adapter(model)
    dense_layers = list(adapter.decoder_layers(model))
    total = len(dense_layers)
    if not 1 <= num_layers < total:
        raise SecateursError(f"HARP needs 1 <= layers < {total} (the model has {total} decoder layers)")
    first = total - num_layers
    captured = capture_layer_inputs(model, calibration, first)
    layers = list(dense_layers)  # layers above the one being tuned are replaced as they are fixed
    alphas, curves = {}, {}
    bar = progress_bar(total=num_layers * len(grid), desc="HARP alpha search", disable=not progress)
    for index in range(total - 1, first - 1, -1):
        curve = []
        for alpha in grid:
            layers[index] = _harp_layer(adapter, dense_layers[index], alpha)
            curve.append([alpha, math.exp(tail_nll(model, adapter, layers, index, captured, calibration))])
            bar.update()
        best = min(curve, key=lambda point: (point[1], point[0]))[0]
        layers[index] = _harp_layer(adapter, dense_layers[index], best)
        alphas[index], curves[index] = best, curve
    bar.close()
    return alphas, curves


def harp_layers_for_ratio(model, ratio: float | None) -> int:
    """Fewest top layers whose attention, turned into the fused value path, saves at least
    `ratio` of all parameters (alpha = 0 would save a little more)."""
    if ratio is None:
        raise SecateursError("HARP needs top_layers=N (--top-layers), or a ratio of parameters to remove through "
                             "attention")
    geo = Geometry.of(model)
    adapter = get_adapter(model)
    target, _ = target_params(geo, ratio)
    saved = 0
    for n, layer in enumerate(reversed(list(adapter.decoder_layers(model))), 1):
        s, c = geo.shapes[-n], geo.costs[-n]
        hidden = adapter.attention_weights(layer).o.shape[0]
        saved += s.num_heads * c.head + s.num_kv_heads * c.kv_head - hidden * hidden
        if saved >= target:
            if n >= len(geo.shapes):
                break
            return n
    raise SecateursError(f"HARP on all but one layer cannot remove {ratio:.0%} of the parameters; lower the ratio "
                         "or add flap_ratio for the MLPs")


class Harp(Method):
    name = "harp"
    summary = "HARP: identity-matrix attention with searched alpha in the top layers"
    options = HarpOptions
    needs = Needs(calibration=True, lm_head=True)

    def make_plan(self, context: PlanContext, options: HarpOptions) -> PruningPlan:
        calibration = context.calibration_data()
        num_layers = options.top_layers
        if num_layers is None:
            num_layers = harp_layers_for_ratio(context.model, context.ratio)
        return harp_plan(context.model, calibration, num_layers, grid=tuple(options.alpha_grid),
                         flap_ratio=options.flap_ratio, progress=context.progress, seed=context.seed)

    def check_streamed(self, options: HarpOptions) -> None:
        if options.flap_ratio:
            raise SecateursError("--streamed runs HARP's search; --flap-ratio would need the transformed model in "
                                 "memory (prune with HARP, then FLAP on the result)")


def harp_plan(model, calibration: Calibration, num_layers: int, *, grid=DEFAULT_GRID, alphas: dict | None = None,
              flap_ratio: float | None = None, progress: bool = True, seed: int = 0) -> PruningPlan:
    """A plan with HARP attention in the top `num_layers` layers (alphas searched unless given),
    plus FLAP MLP pruning of `flap_ratio` of all parameters when asked."""
    curves = {}
    grid = tuple(grid)
    if not grid or not all(isinstance(a, (int, float)) and math.isfinite(a) and 0 <= a <= ALPHA_MAX for a in grid):
        raise SecateursError(f"the HARP alpha grid must hold finite numbers in [0, {ALPHA_MAX:g}] (0: attention "
                             f"removed), got {list(grid)}")
    if alphas is not None and not all(isinstance(a, (int, float)) and math.isfinite(a) and 0 <= a <= ALPHA_MAX
                                      for a in alphas.values()):
        raise SecateursError(f"HARP alphas must be finite numbers in [0, {ALPHA_MAX:g}], got {alphas}")
    if alphas is None:
        alphas, curves = search_alphas(model, calibration, num_layers, grid, progress)
    plan = identity_plan(model)
    for index, alpha in alphas.items():
        plan.layers[index].attention = {"mode": "removed"} if alpha == 0 else {"mode": "value", "alpha": alpha}
    flap = {}
    if flap_ratio:
        transformed = apply_plan(copy.deepcopy(model), plan)
        stats = collect_statistics(transformed, calibration, progress=progress, parts=("mlp",))
        target, _ = target_params(Geometry.of(model), flap_ratio)
        mlp = flap_plan(model, stats, target, parts="mlp")
        for lp, m in zip(plan.layers, mlp.layers):
            lp.neurons, lp.compensation = m.neurons, m.compensation
        flap = {"flap_ratio": flap_ratio, "flap_target_params": target}
    chosen = {"harp_layers": num_layers, "grid": list(grid),
              "alphas": {str(k): v for k, v in sorted(alphas.items(), reverse=True)},
              "search_curves": {str(k): v for k, v in sorted(curves.items(), reverse=True)}}
    plan.provenance = provenance("harp", plan, seed, calibration.description, calibration.hash, chosen, flap)
    return plan
