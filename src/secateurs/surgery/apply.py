"""Surgery: apply a PruningPlan physically. Slices weights (q/k/v/o rows and columns per head,
MLP rows and columns per neuron, biases along), replaces attention (HARP) and removes MLPs with
the norms that only feed them, deletes decoder layers, and rewrites the config from the real shapes.
Works on real and on meta tensors (so 70B plans can be sized cheaply).

Each weight is replaced by its slice (index_select, then the old tensor is freed), so peak memory
stays near the model's size plus one matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from secateurs.adapters import AttentionWeights, MLPWeights, ModelAdapter, get_adapter
from secateurs.adapters.base import set_linear
from secateurs.adapters.removed_mlp import RemovedMLP, is_removed_mlp
from secateurs.adapters.value_attention import RemovedAttention, ValueOnlyAttention, fused_value_output, is_replaced
from secateurs.planning.geometry import plan_base
from secateurs.planning.plan import CONFIG_KEY, PLAN_FILENAME, PLAN_FORMAT, PruningPlan
from secateurs.runtime.offload import refuse_offloaded


def _row_index(units: list[int], width: int, device) -> torch.Tensor:
    """Row indices of whole units (heads of `width` rows) in a (units*width, ...) matrix."""
    u = torch.as_tensor(units, dtype=torch.long)
    return (u[:, None] * width + torch.arange(width)).reshape(-1).to(device)


def _take(t: torch.Tensor | None, index: torch.Tensor, dim: int) -> torch.Tensor | None:
    return None if t is None else torch.index_select(t.detach(), dim, index.to(t.device))


def _compensated_bias(out_weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor,
                      means: list[float] | None) -> torch.Tensor | None:
    """bias + W[:, removed] @ mean(removed inputs): removed channels act as their constant mean."""
    if means is None:
        return bias
    removed = torch.ones(out_weight.shape[1], dtype=torch.bool)
    removed[kept] = False
    delta = out_weight.detach()[:, removed.to(out_weight.device)].double() @ torch.tensor(
        means, dtype=torch.float64, device=out_weight.device)
    base = bias.detach().double() if bias is not None else torch.zeros_like(delta)
    return (base + delta).to(out_weight.dtype)


def slice_attention(adapter: ModelAdapter, layer: nn.Module, heads: list[int], kv_heads: list[int],
                    compensation: list[float] | None = None) -> None:
    """Keep only the given query heads and KV heads (already validated for GQA)."""
    w = adapter.attention_weights(layer)
    d = adapter.head_dim(layer)
    q_idx = _row_index(heads, d, "cpu")
    kv_idx = _row_index(kv_heads, d, "cpu")
    adapter.set_attention_weights(
        layer,
        AttentionWeights(
            q=_take(w.q, q_idx, 0), k=_take(w.k, kv_idx, 0), v=_take(w.v, kv_idx, 0), o=_take(w.o, q_idx, 1),
            q_bias=_take(w.q_bias, q_idx, 0), k_bias=_take(w.k_bias, kv_idx, 0),
            v_bias=_take(w.v_bias, kv_idx, 0), o_bias=_compensated_bias(w.o, w.o_bias, q_idx, compensation),
        ),
    )


def slice_mlp(adapter: ModelAdapter, layer: nn.Module, neurons: list[int],
              compensation: list[float] | None = None) -> None:
    """Keep only the given MLP neurons (rows of the input projections, columns of the output)."""
    w = adapter.mlp_weights(layer)
    idx = torch.as_tensor(neurons, dtype=torch.long)
    adapter.set_mlp_weights(
        layer,
        MLPWeights(
            inputs=[(_take(weight, idx, 0), _take(bias, idx, 0)) for weight, bias in w.inputs],
            out=_take(w.out, idx, 1),
            out_bias=_compensated_bias(w.out, w.out_bias, idx, compensation),
        ),
    )


def replace_attention(adapter: ModelAdapter, layer: nn.Module, mode: str, alpha: float = 1.0) -> None:
    """HARP: swap the attention for its identity-matrix value path scaled by alpha ('value'), or
    drop it with the norms that only feed it ('removed'). See secateurs.adapters.value_attention."""
    attn = adapter.attention(layer)
    shape = adapter.layer_shape(layer)
    d = adapter.head_dim(layer)
    if mode == "removed":
        new = RemovedAttention(shape.num_heads, shape.num_kv_heads, d, attn.layer_idx)
    else:
        w = adapter.attention_weights(layer)
        folded = adapter.fold_attention_scale(layer, alpha)
        weight, bias = fused_value_output(w.v, w.v_bias, w.o, w.o_bias, shape.num_heads, shape.num_kv_heads,
                                          1.0 if folded else alpha)
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        set_linear(fused, weight, bias)
        new = ValueOnlyAttention(fused, shape.num_heads, shape.num_kv_heads, d, attn.layer_idx)
    adapter.set_attention(layer, new)
    drop_unused_norms(adapter, layer)


def remove_mlp(adapter: ModelAdapter, layer: nn.Module) -> None:
    """Drop the layer's MLP (a RemovedMLP: zeros, no weights) with the norms that only feed it; the layer
    keeps its attention. See secateurs.adapters.removed_mlp."""
    if not is_removed_mlp(adapter.mlp(layer)):
        adapter.set_mlp(layer, RemovedMLP())
    drop_unused_norms(adapter, layer)


def drop_unused_norms(adapter: ModelAdapter, layer: nn.Module) -> None:
    """Norms whose only readers are gone become Identity: those of a removed attention, of a removed MLP, and
    the norm both blocks share (a parallel block) when both are."""
    attention_gone = isinstance(adapter.attention(layer), RemovedAttention)
    mlp_gone = is_removed_mlp(adapter.mlp(layer))
    names = ((adapter.attention_only_norms if attention_gone else ()) + (adapter.mlp_only_norms if mlp_gone else ())
             + (adapter.shared_norms if attention_gone and mlp_gone else ()))
    for name in names:
        setattr(layer, name, nn.Identity())


def remove_layers(adapter: ModelAdapter, model: nn.Module, kept: list[int]) -> None:
    """Delete decoder layers not in `kept`, re-index the survivors and fix per-layer config lists."""
    layers = adapter.decoder_layers(model)
    if len(kept) == len(layers):
        return
    keep = set(kept)
    for i in reversed(range(len(layers))):
        if i not in keep:
            del layers[i]
    for new_index, layer in enumerate(layers):
        adapter.reindex_layer(layer, new_index)
    adapter.update_config_for_kept_layers(model.config, kept)


def replaced_attention_modes(adapter: ModelAdapter, layers) -> dict[int, str]:
    """{layer index: 'value' | 'removed'} of the HARP layers, read from the modules themselves."""
    return {i: "removed" if isinstance(adapter.attention(layer), RemovedAttention) else "value"
            for i, layer in enumerate(layers) if is_replaced(adapter.attention(layer))}


def removed_mlp_layers(adapter: ModelAdapter, layers) -> list[int]:
    """Indices of the layers whose MLP is removed, read from the modules themselves."""
    return [i for i, layer in enumerate(layers) if is_removed_mlp(adapter.mlp(layer))]


def sync_config(model: nn.Module, plan: PruningPlan | None = None) -> None:
    """Rewrite width fields of the config from real weight shapes.

    Uniform layers: num_attention_heads / num_key_value_heads / intermediate_size describe every
    layer, so stock from_pretrained rebuilds the model. Heterogeneous layers: those fields hold the
    per-field maximum and config.secateurs.layer_shapes lists each layer; load_pruned rebuilds it.
    HARP layers are listed in replaced_attention, removed MLPs (0 neurons) in replaced_mlp.
    head_dim is always written explicitly (it no longer equals hidden / heads).
    """
    adapter = get_adapter(model)
    config = model.config
    text = config.get_text_config()  # widths live in the language model's config (multimodal: text_config)
    layers = adapter.decoder_layers(model)
    shapes = [adapter.layer_shape(layer) for layer in layers]
    text.head_dim = adapter.head_dim(layers[0])
    text.num_attention_heads = max(s.num_heads for s in shapes)
    text.num_key_value_heads = max(s.num_kv_heads for s in shapes)
    text.intermediate_size = max(s.intermediate_size for s in shapes)
    heterogeneous = len(set(shapes)) > 1
    info = {"format": PLAN_FORMAT, "plan": PLAN_FILENAME, "heterogeneous": heterogeneous}
    replaced = {str(i): mode for i, mode in replaced_attention_modes(adapter, layers).items()}
    if replaced:
        info["replaced_attention"] = replaced
    mlp_gone = removed_mlp_layers(adapter, layers)
    if mlp_gone:
        info["replaced_mlp"] = {str(i): "removed" for i in mlp_gone}
    if plan is not None:
        info["base_model"] = plan.base.get("name_or_path")
        info["method"] = plan.provenance.get("method")
    if heterogeneous:
        info["layer_shapes"] = [
            {"num_attention_heads": s.num_heads, "num_key_value_heads": s.num_kv_heads,
             "intermediate_size": s.intermediate_size}
            for s in shapes
        ]
    setattr(config, CONFIG_KEY, info)


def resize_layer(adapter: ModelAdapter, layer: nn.Module, num_heads: int, num_kv_heads: int,
                 intermediate_size: int) -> None:
    """Give a layer empty weights of the given widths (same dtype/device/bias layout).

    Used on meta-device skeletons by load_pruned, which then fills the weights from disk. A removed
    MLP (0 neurons) stays removed.
    """
    def empty(t: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
        return None if t is None else torch.empty(shape, dtype=t.dtype, device=t.device)

    w = adapter.attention_weights(layer)
    d = adapter.head_dim(layer)
    hidden = w.q.shape[1]
    adapter.set_attention_weights(
        layer,
        AttentionWeights(
            q=empty(w.q, num_heads * d, hidden), k=empty(w.k, num_kv_heads * d, hidden),
            v=empty(w.v, num_kv_heads * d, hidden), o=empty(w.o, w.o.shape[0], num_heads * d),
            q_bias=empty(w.q_bias, num_heads * d), k_bias=empty(w.k_bias, num_kv_heads * d),
            v_bias=empty(w.v_bias, num_kv_heads * d), o_bias=w.o_bias,
        ),
    )
    if is_removed_mlp(adapter.mlp(layer)):
        return
    m = adapter.mlp_weights(layer)
    adapter.set_mlp_weights(
        layer,
        MLPWeights(
            inputs=[(empty(wt, intermediate_size, wt.shape[1]), empty(b, intermediate_size)) for wt, b in m.inputs],
            out=empty(m.out, m.out.shape[0], intermediate_size),
            out_bias=m.out_bias,
        ),
    )


@torch.no_grad()
def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Apply `plan` to `model` in place and return it.

    The whole plan is validated before any weight is touched, so a bad plan leaves the model
    as it was.
    """
    refuse_offloaded(model, "in-place surgery")
    adapter = get_adapter(model)
    plan.check_compatible(plan_base(model))
    resolved = {lp.index: (lp, *plan.resolve_layer(lp)) for lp in plan.layers if not lp.removed}
    layers = adapter.decoder_layers(model)
    for index, (lp, heads, kv_heads, neurons) in resolved.items():
        apply_layer_plan(adapter, layers[index], lp, heads, kv_heads, neurons)
    remove_layers(adapter, model, plan.kept_layer_indices())
    sync_config(model, plan)
    return model


def apply_layer_plan(adapter: ModelAdapter, layer: nn.Module, lp, heads: list[int], kv_heads: list[int],
                     neurons: list[int]) -> None:
    """One kept layer's part of a plan (already resolved by PruningPlan.resolve_layer)."""
    shape = adapter.layer_shape(layer)
    comp = lp.compensation or {}
    if len(heads) < shape.num_heads:
        slice_attention(adapter, layer, heads, kv_heads, comp.get("attention"))
    if lp.mlp is not None:
        remove_mlp(adapter, layer)
    elif len(neurons) < shape.intermediate_size:
        slice_mlp(adapter, layer, neurons, comp.get("mlp"))
    if lp.attention is not None:
        replace_attention(adapter, layer, lp.attention["mode"], float(lp.attention.get("alpha", 0.0)))
