"""Budgets: a pruning target -> how many heads, KV heads and neurons each layer keeps.

Targets are parameter counts: `ratio` of all parameters (embeddings included, the AMP paper's
convention), of the prunable attention+MLP parameters, or `layers_equivalent` k decoder layers'
worth (the official AMP code's "iterations"). The removed parameters are spread over layers in
proportion to their prunable size (uniform when layers share one shape). Per layer:

* rounding="balanced" (default): remove the same fraction p of head units, rounded, then as many
  neurons as make the layer's removed parameters closest to its share: achieved within half a
  neuron's worth per layer;
* rounding="paper": remove round(p * heads) heads and round(p * neurons) neurons, which
  reproduces the official AMP shapes (Llama-2-7B, k=10: 22 heads, 7568 neurons);
* rounding="structures": p = ratio directly (fraction of heads and of neurons, not parameters).

Head units respect GQA: gqa="groups" removes whole KV groups (G query heads + their KV head),
gqa="in-group" removes one query head from every group per unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from secateurs.adapters import LayerShape, ModelAdapter, get_adapter
from secateurs.errors import SecateursError
from secateurs.settings.names import GQA_MODES, RATIO_OF, ROUNDINGS  # noqa: F401 - re-exported

PARTS = ("both", "heads", "mlp")


@dataclass(frozen=True)
class KeepCounts:
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class UnitCosts:
    """Parameters owned by one query head (q rows, o columns), one KV head (k, v rows) and one
    neuron (input rows, output column), biases included."""

    head: int
    kv_head: int
    neuron: int


@dataclass
class Budget:
    counts: list[KeepCounts]
    total_params: int
    requested_params: int
    achieved_params: int
    settings: dict = field(default_factory=dict)

    @property
    def achieved_ratio(self) -> float:
        return self.achieved_params / self.total_params

    def report(self) -> dict:
        return {**self.settings, "requested_params_removed": self.requested_params,
                "achieved_params_removed": self.achieved_params,
                "requested_ratio_of_all": round(self.requested_params / self.total_params, 6),
                "achieved_ratio_of_all": round(self.achieved_ratio, 6)}


def check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise SecateursError(f"ratio must lie in [0, 1) (fraction removed), got {ratio}")
    return ratio


def _check_choice(value, choices, what):
    if value not in choices:
        raise SecateursError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


def unit_costs(adapter: ModelAdapter, layer) -> UnitCosts:
    w = adapter.attention_weights(layer)
    d = adapter.head_dim(layer)
    width = lambda t, b: t.shape[1] + (1 if b is not None else 0)  # noqa: E731
    m = adapter.mlp_weights(layer)
    return UnitCosts(
        head=(width(w.q, w.q_bias) + w.o.shape[0]) * d,
        kv_head=(width(w.k, w.k_bias) + width(w.v, w.v_bias)) * d,
        neuron=sum(width(t, b) for t, b in m.inputs) + m.out.shape[0],
    )


def head_unit(shape: LayerShape, costs: UnitCosts, gqa: str) -> tuple[int, int]:
    """(parameters per head unit, number of units there are) in this GQA mode."""
    g = shape.group_size
    if gqa == "groups" or g == 1:
        return g * costs.head + costs.kv_head, shape.num_kv_heads
    return shape.num_kv_heads * costs.head, g


def keep_counts(shape: LayerShape, units_removed: int, neurons_kept: int, gqa: str) -> KeepCounts:
    g = shape.group_size
    if gqa == "groups" or g == 1:
        kv = shape.num_kv_heads - units_removed
        return KeepCounts(kv * g, kv, neurons_kept)
    return KeepCounts(shape.num_kv_heads * (g - units_removed), shape.num_kv_heads, neurons_kept)


def uniform_keep_counts(shape: LayerShape, ratio: float, gqa: str = "groups") -> KeepCounts:
    """rounding='structures': remove round(ratio * n) head units and neurons of a layer."""
    check_ratio(ratio)
    _check_choice(gqa, GQA_MODES, "gqa mode")
    units = shape.num_kv_heads if gqa == "groups" or shape.group_size == 1 else shape.group_size
    removed = min(units - 1, round(ratio * units))
    neurons = max(1, shape.intermediate_size - round(ratio * shape.intermediate_size))
    return keep_counts(shape, removed, neurons, gqa)


def _round_to(kept: int, multiple: int, limit: int) -> int:
    if multiple <= 1:
        return kept
    return min(limit, max(multiple, round(kept / multiple) * multiple))


@dataclass
class Geometry:
    """What a budget needs to know about a model: layer shapes, unit costs, sizes."""

    shapes: list[LayerShape]
    costs: list[UnitCosts]
    total_params: int
    layer_params: list[int]

    @classmethod
    def of(cls, model) -> Geometry:
        adapter = get_adapter(model)
        layers = list(adapter.decoder_layers(model))
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        return cls([adapter.layer_shape(layer) for layer in layers], [unit_costs(adapter, layer) for layer in layers],
                   total, [sum(p.numel() for p in layer.parameters()) for layer in layers])

    @property
    def prunable(self) -> list[int]:
        return [s.num_heads * c.head + s.num_kv_heads * c.kv_head + s.intermediate_size * c.neuron
                for s, c in zip(self.shapes, self.costs)]

    def removed_params(self, counts: list[KeepCounts]) -> int:
        return sum((s.num_heads - k.num_heads) * c.head + (s.num_kv_heads - k.num_kv_heads) * c.kv_head
                   + (s.intermediate_size - k.intermediate_size) * c.neuron
                   for s, c, k in zip(self.shapes, self.costs, counts))


def target_params(geo: Geometry, ratio: float | None, ratio_of: str = "all",
                  layers_equivalent: float | None = None) -> tuple[int, dict]:
    """Parameters to remove: ratio of all / of prunable parameters, or k layers' worth."""
    _check_choice(ratio_of, RATIO_OF, "ratio_of")
    if (ratio is None) == (layers_equivalent is None):
        raise SecateursError("give either a ratio or layers_equivalent (k decoder layers' worth of parameters)")
    if layers_equivalent is not None:
        mean_layer = sum(geo.layer_params) / len(geo.layer_params)
        return round(float(layers_equivalent) * mean_layer), {"layers_equivalent": layers_equivalent}
    ratio = check_ratio(ratio)
    return round(ratio * (geo.total_params if ratio_of == "all" else sum(geo.prunable))), {
        "ratio": ratio, "ratio_of": ratio_of}


def plan_budget(model, ratio: float | None = None, *, ratio_of: str = "all", layers_equivalent: float | None = None,
                rounding: str = "balanced", gqa: str = "groups", parts: str = "both", round_to: int = 1) -> Budget:
    """Per-layer keep counts for a parameter target (see the module docstring)."""
    _check_choice(rounding, ROUNDINGS, "rounding")
    _check_choice(gqa, GQA_MODES, "gqa mode")
    _check_choice(parts, PARTS, "parts")
    geo = Geometry.of(model)
    settings = {"rounding": rounding, "gqa": gqa, "parts": parts, "round_to": round_to}
    if rounding == "structures":
        ratio = check_ratio(ratio if ratio is not None else 0.0)
        counts = [uniform_keep_counts(s, ratio, gqa) for s in geo.shapes]
        target = None
        settings["ratio"] = ratio
    else:
        target, more = target_params(geo, ratio, ratio_of, layers_equivalent)
        settings.update(more)
        prunable = geo.prunable
        counts = [_layer_counts(i, s, c, target * p / sum(prunable), rounding, gqa, parts, round_to)
                  for i, (s, c, p) in enumerate(zip(geo.shapes, geo.costs, prunable))]
    achieved = geo.removed_params(counts)
    return Budget(counts, geo.total_params, target if target is not None else achieved, achieved, settings)


def _layer_counts(index: int, shape: LayerShape, costs: UnitCosts, share: float, rounding: str, gqa: str,
                  parts: str, round_to: int) -> KeepCounts:
    unit_cost, units = head_unit(shape, costs, gqa)
    prunable = units * unit_cost + shape.intermediate_size * costs.neuron
    p = share / prunable
    if parts == "heads":
        removed_units, removed_neurons = round(share / unit_cost), 0
    elif parts == "mlp":
        removed_units, removed_neurons = 0, round(share / costs.neuron)
    elif rounding == "paper":
        removed_units, removed_neurons = round(p * units), round(p * shape.intermediate_size)
    else:
        removed_units = round(p * units)
        removed_neurons = max(0, round((share - removed_units * unit_cost) / costs.neuron))
    if removed_units >= units or removed_neurons >= shape.intermediate_size:
        what = "attention head" if removed_units >= units else "MLP neuron"
        raise SecateursError(
            f"this target would remove every {what} of layer {index} (its share is {share:,.0f} parameters, "
            f"{100 * p:.0f}% of what can be pruned there); lower the ratio"
            + ("" if parts == "both" else " or prune both heads and neurons")
        )
    neurons = _round_to(shape.intermediate_size - removed_neurons, round_to, shape.intermediate_size)
    return keep_counts(shape, removed_units, neurons, gqa)
