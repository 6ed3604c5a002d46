"""The block library of the architecture search: for every decoder layer, the attention variants and
the MLP variants a search may choose, each with its LayerPlan fragment and its costs, all built from
one statistics pass (AMP's head and neuron scores and the Gram matrices of the output projections'
inputs, secateurs.calibration.statistics).

Attention: dense; the k best KV groups with their query heads for every k below the layer's count
(a group's score: the sum of AMP's scores of its query heads); HARP's value path (its alpha fitted
by least squares, `fit_value_alpha`); removed. MLP: dense; the best-scored neurons at each width of a
grid of fractions; removed (where plans can say so: LayerPlan's `mlp` field). A narrower block is
re-fitted toward the dense block's outputs by the least-squares re-fit from the dense model's Gram
matrices (secateurs.surgery.reconstruction in its dense mode), which is what applying the final plan
with that re-fit does, so a variant scored here is the block the pruned model holds.

Costs of a block are what it costs when chosen: its parameters (its norms included), its KV-cache bytes
per token, and the shape id a decode-cost table is keyed by (`decode`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from secateurs.adapters import get_adapter
from secateurs.calibration.runner import run_layer
from secateurs.calibration.statistics import Statistics
from secateurs.errors import SecateursError
from secateurs.planning.budget import unit_costs
from secateurs.planning.geometry import identity_plan
from secateurs.planning.plan import ALPHA_MAX, LayerPlan, PruningPlan
from secateurs.runtime.offload import detached_copy, materialized
from secateurs.surgery.apply import replace_attention
from secateurs.surgery.reconstruction import DEFAULT_DAMPING, Reconstruction, prune_and_refit_layer

DEFAULT_MLP_FRACTIONS = tuple(i / 8 for i in range(1, 8))  # 1/8 .. 7/8 of the neurons kept
ALPHA_MIN = 0.01  # a fitted alpha at or below zero (the value path points away from the output) is clipped here
MLP_REMOVAL = "mlp" in {f.name for f in dataclasses.fields(LayerPlan)}  # plans that can remove an MLP alone
REFIT = Reconstruction("dense", DEFAULT_DAMPING)


@dataclass(frozen=True)
class BlockVariant:
    """One way to build one block of one layer. id: unique within its layer and block ("dense",
    "kv2", "value", "removed", "width96"); kind: secateurs.search.choice's kinds; fragment: the
    LayerPlan fields that make it; params: the block's parameters when chosen (norms that serve only
    it included); kv_bytes: its KV-cache bytes per token; size: KV groups (attention) or neurons
    (MLP) kept, 0 for value and removed blocks; decode: the id of its shape in a decode-cost table."""

    layer: int
    block: str
    id: str
    kind: str
    fragment: dict
    params: int
    kv_bytes: int
    size: int
    decode: str


@dataclass
class Library:
    """Every scored layer's variants, and what building them needs (the dense model, its statistics)."""

    model: nn.Module
    stats: Statistics
    variants: dict[int, list[BlockVariant]]
    settings: dict = field(default_factory=dict)
    base: PruningPlan | None = None

    def of(self, layer: int, block: str) -> list[BlockVariant]:
        return [v for v in self.variants[layer] if v.block == block]

    def get(self, layer: int, block: str, variant_id: str) -> BlockVariant:
        for v in self.variants[layer]:
            if v.block == block and v.id == variant_id:
                return v
        raise SecateursError(f"layer {layer} has no {block} variant {variant_id!r}")

    def layer_plan(self, layer: int, attention: str = "dense", mlp: str = "dense") -> LayerPlan:
        """The LayerPlan of one layer built from an attention and an MLP variant (both removed: the
        whole layer removed)."""
        a, m = self.get(layer, "attention", attention), self.get(layer, "mlp", mlp)
        if a.kind == "removed" and m.kind == "removed":
            return LayerPlan(index=layer, removed=True)
        return LayerPlan(index=layer, **{**a.fragment, **m.fragment})

    def module(self, lp: LayerPlan) -> nn.Module:
        """The layer as `lp` makes it: a re-fitted copy of the dense layer (the model is never
        changed), or a pass-through for a removed layer."""
        if lp.removed:
            return PassThrough()
        adapter = get_adapter(self.model)
        layer = detached_copy(adapter.decoder_layers(self.model)[lp.index])
        with torch.no_grad():
            prune_and_refit_layer(adapter, layer, self.base, lp, self.stats.attention[lp.index],
                                  self.stats.mlp[lp.index], REFIT)
        return layer


class PassThrough(nn.Module):
    """A removed decoder layer: what enters it leaves it."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def build_library(model, stats: Statistics, layers: list[int], *, alphas: dict[int, float],
                  mlp_fractions=DEFAULT_MLP_FRACTIONS, sized_only: bool = False) -> Library:
    """The variants of `layers` (indices) from the statistics pass, and the dense blocks alone for
    every other layer; `alphas`: the fitted value-path alpha of each layer (fit_value_alpha).
    sized_only=True leaves out the value path and removed blocks (uniform shapes, which stock
    from_pretrained loads)."""
    check_fractions(mlp_fractions)
    if any(s.gram is None for i in layers for s in (stats.attention[i], stats.mlp[i])):
        raise SecateursError("the search re-fits narrower blocks and needs statistics with Gram matrices "
                             "(collect them with gram=True)")
    adapter = get_adapter(model)
    decoder_layers = adapter.decoder_layers(model)
    variants = {}
    for i, layer in enumerate(decoder_layers):
        with materialized(layer):
            attention = attention_variants(adapter, layer, i, stats, alphas.get(i), sized_only)
            mlp = mlp_variants(adapter, layer, i, stats, mlp_fractions, sized_only)
        variants[i] = attention + mlp if i in layers else [attention[0], mlp[0]]
    settings = {"mlp_fractions": [float(f) for f in mlp_fractions], "mlp_removal": MLP_REMOVAL,
                "sized_only": sized_only, "refit": REFIT.to_dict(), "group_score": "sum of AMP head scores",
                "neuron_score": "AMP mean |activation|"}
    return Library(model, stats, variants, settings, identity_plan(model))


def check_fractions(fractions) -> None:
    if not fractions or not all(isinstance(f, (int, float)) and math.isfinite(f) and 0 < f < 1 for f in fractions):
        raise SecateursError(f"MLP fractions must be numbers strictly between 0 and 1, got {list(fractions)}")


def _numel(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _attention_norms(adapter, layer) -> list[nn.Module]:
    return [getattr(layer, name) for name in adapter.attention_only_norms if hasattr(layer, name)]


def dense_block_params(adapter, layer) -> tuple[int, int]:
    """(attention, MLP) parameters of a dense layer: the attention module and the norms that only feed
    it; everything else of the layer counts with the MLP."""
    attention = _numel(adapter.attention(layer), *_attention_norms(adapter, layer))
    return attention, _numel(layer) - attention


def attention_variants(adapter, layer, index: int, stats: Statistics, alpha: float | None,
                       sized_only: bool = False) -> list[BlockVariant]:
    """dense, kv{k} for k = count-1 .. 1 (the best-scored groups), value (alpha given), removed."""
    shape = adapter.layer_shape(layer)
    costs = unit_costs(adapter, layer)
    w = adapter.attention_weights(layer)
    d, group, kv = adapter.head_dim(layer), shape.group_size, shape.num_kv_heads
    dense, _ = dense_block_params(adapter, layer)
    per_group_bytes = 2 * d * w.k.element_size()
    head_scores = stats.attention[index].unit_mean("prompt").double()
    order = torch.argsort(head_scores.reshape(kv, group).sum(1), descending=True, stable=True).tolist()
    out = [BlockVariant(index, "attention", "dense", "dense", {}, dense, kv * per_group_bytes, kv,
                        f"attention/heads={shape.num_heads},kv={kv}")]
    for k in range(kv - 1, 0, -1):
        groups = sorted(order[:k])
        heads = [g * group + j for g in groups for j in range(group)]
        params = dense - (kv - k) * (group * costs.head + costs.kv_head)
        out.append(BlockVariant(index, "attention", f"kv{k}", "kv", {"heads": heads, "kv_heads": groups}, params,
                                k * per_group_bytes, k, f"attention/heads={k * group},kv={k}"))
    if sized_only:
        return out
    if alpha is not None:
        hidden = w.o.shape[0]
        bias = hidden if (w.v_bias is not None or w.o_bias is not None) else 0
        params = dense - _numel(adapter.attention(layer)) + hidden * hidden + bias
        out.append(BlockVariant(index, "attention", "value", "value", {"attention": {"mode": "value", "alpha": alpha}},
                                params, 0, 0, "attention/value"))
    out.append(BlockVariant(index, "attention", "removed", "removed", {"attention": {"mode": "removed"}}, 0, 0, 0,
                            "attention/removed"))
    return out


def mlp_variants(adapter, layer, index: int, stats: Statistics, fractions,
                 sized_only: bool = False) -> list[BlockVariant]:
    """dense, width{n} for the grid's neuron counts (the best-scored neurons), removed where plans can say so."""
    shape = adapter.layer_shape(layer)
    inter = shape.intermediate_size
    costs = unit_costs(adapter, layer)
    _, dense = dense_block_params(adapter, layer)
    scores = stats.mlp[index].unit_mean("prompt").double()
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    out = [BlockVariant(index, "mlp", "dense", "dense", {}, dense, 0, inter, f"mlp/neurons={inter}")]
    for n in sorted({min(inter - 1, max(1, round(f * inter))) for f in fractions}, reverse=True):
        if n < 1 or n >= inter:
            continue
        out.append(BlockVariant(index, "mlp", f"width{n}", "width", {"neurons": sorted(order[:n])},
                                dense - (inter - n) * costs.neuron, 0, n, f"mlp/neurons={n}"))
    if MLP_REMOVAL and not sized_only:
        out.append(BlockVariant(index, "mlp", "removed", "removed", {"mlp": {"mode": "removed"}}, 0, 0, 0,
                                "mlp/removed"))
    return out


@torch.inference_mode()
def fit_value_alpha(model, index: int, inputs: list[torch.Tensor], kwargs: list[dict],
                    masks: list[torch.Tensor]) -> float:
    """HARP's alpha for layer `index`, training-free: the least-squares scale of the value path
    (alpha = 1) to the dense attention block's output over the real tokens of the cached inputs,
    <V, A> / <V, V>, clipped to [ALPHA_MIN, ALPHA_MAX] and rounded to 6 significant digits."""
    adapter = get_adapter(model)
    dense = detached_copy(adapter.decoder_layers(model)[index])
    value = detached_copy(dense)
    replace_attention(adapter, value, "value", 1.0)
    fused = adapter.attention(value).fused
    seen: dict = {}

    def hook(module, args, keywords, output):
        seen["x"] = keywords["hidden_states"] if "hidden_states" in keywords else args[0]
        seen["y"] = output[0] if isinstance(output, tuple) else output

    handle = adapter.attention(dense).register_forward_hook(hook, with_kwargs=True)
    dot = norm = 0.0
    try:
        for h, kw, mask in zip(inputs, kwargs, masks):
            run_layer(dense, h, kw, mask)
            keep = mask.to(h.device).bool()
            v, a = fused(seen["x"])[keep].double(), seen["y"][keep].double()
            dot += float((v * a).sum())
            norm += float((v * v).sum())
    finally:
        handle.remove()
    alpha = dot / norm if norm > 0 else ALPHA_MIN
    return float(f"{min(ALPHA_MAX, max(ALPHA_MIN, alpha)):.6g}")
