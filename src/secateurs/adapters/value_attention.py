"""HARP's transformed attention, materialised (arXiv 2507.01900).

In a HARP layer the attention matrix is the identity: every token attends only to itself, so
softmax(QK^T) V collapses to V and the block computes alpha * W_O expand(W_V x). Q, K, rotary
and the layer's KV cache disappear. With G query heads per KV head, expand() repeats each KV
head's value G times, so W_O expand(W_V x) = (W_O summed over the heads of each group) W_V x:
one hidden x hidden matrix, fewer parameters than v_proj + o_proj for any head layout
(hidden * hidden vs hidden * (KV + H) * d), and one matmul instead of two. alpha is folded into it
(Gemma 2: into the post-attention norm, w' = alpha * (1 + w) - 1). alpha = 0 removes the block:
the attention returns zeros and the norms that only feed it become Identity.

Such a layer keeps no keys or values, yet transformers reads the past length, the positions and
each attention kind's mask sizes from the KV-cache slot of a layer (layer 0; the first layer of
each kind in `layer_types`), whichever layer that is. So when a cache is passed, a HARP layer
writes zero-width keys and values (batch, 0, tokens, head_dim) into its own slot: no bytes, and
every length the slot reports (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer,
StaticSlidingWindowLayer) counts the tokens seen, as a dense layer's slot would.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

MODES = ("value", "removed")


class ZeroWidthDynamicLayer(DynamicLayer):
    """A growing full-attention cache slot that holds zero-width keys and values. DynamicLayer reports
    length 0 for a tensor without elements; this slot reads the length from the sequence axis."""

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0


def record_tokens(cache: Cache | None, layer_idx: int, hidden_states: torch.Tensor, head_dim: int) -> None:
    """Advance the layer's cache slot by the tokens of hidden_states without storing any of them."""
    if cache is None:
        return
    if cache.layer_class_to_replicate is not None:  # a cache that appends its slots on first use
        while len(cache.layers) <= layer_idx:
            cache.layers.append(cache.layer_class_to_replicate())
    slot = cache.layers[layer_idx]
    if not isinstance(slot, CacheLayerMixin):  # a slot that tracks no sequence (shared or recurrent state)
        return
    if type(slot) is DynamicLayer:
        cache.layers[layer_idx] = replacement = ZeroWidthDynamicLayer()
        replacement.__dict__.update(slot.__dict__)
    keys = cache.layers[layer_idx].keys
    # a slot allocated ahead of time (a static cache's early initialisation) takes its own head layout
    heads, width = (keys.shape[1], keys.shape[-1]) if keys is not None and keys.dim() == 4 else (0, head_dim)
    empty = hidden_states.new_zeros(hidden_states.shape[0], heads, hidden_states.shape[1], width)
    cache.update(empty, empty, layer_idx)


class ValueOnlyAttention(nn.Module):
    """Identity-matrix attention: out = fused(x), fused = alpha * W_O expand(W_V)."""

    def __init__(self, fused: nn.Linear, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int):
        super().__init__()
        self.fused = fused
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values: Cache | None = None, **kwargs):
        record_tokens(past_key_values, self.layer_idx, hidden_states, self.head_dim)
        return self.fused(hidden_states), None


class RemovedAttention(nn.Module):
    """alpha = 0: the attention block contributes nothing and holds no weights."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values: Cache | None = None, **kwargs):
        record_tokens(past_key_values, self.layer_idx, hidden_states, self.head_dim)
        return torch.zeros_like(hidden_states), None


def is_replaced(attn: nn.Module) -> bool:
    return isinstance(attn, (ValueOnlyAttention, RemovedAttention))


def fused_value_output(v: torch.Tensor, v_bias: torch.Tensor | None, o: torch.Tensor, o_bias: torch.Tensor | None,
                       num_heads: int, num_kv_heads: int,
                       scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of x -> scale * (W_O expand(W_V x + b_V) + b_O), computed in float64."""
    hidden = o.shape[0]
    d = v.shape[0] // num_kv_heads
    group = num_heads // num_kv_heads
    o_grouped = o.detach().double().reshape(hidden, num_kv_heads, group, d).sum(2).reshape(hidden, num_kv_heads * d)
    weight = scale * (o_grouped @ v.detach().double())
    bias = None
    if v_bias is not None or o_bias is not None:
        bias = torch.zeros(hidden, dtype=torch.float64, device=o.device)
        if v_bias is not None:
            bias += o_grouped @ v_bias.detach().double()
        if o_bias is not None:
            bias += o_bias.detach().double()
        bias = scale * bias
    return weight.to(o.dtype), None if bias is None else bias.to(o.dtype)
