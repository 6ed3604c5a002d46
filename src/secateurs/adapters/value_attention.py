"""HARP's transformed attention, materialised (arXiv 2507.01900).

In a HARP layer the attention matrix is the identity: every token attends only to itself, so
softmax(QK^T) V collapses to V and the block computes alpha * W_O expand(W_V x). Q, K, rotary
and the layer's KV cache disappear. With G query heads per KV head, expand() repeats each KV
head's value G times, so W_O expand(W_V x) = (W_O summed over the heads of each group) W_V x:
one hidden x hidden matrix, fewer parameters than v_proj + o_proj for any head layout
(hidden * hidden vs hidden * (KV + H) * d), and one matmul instead of two. alpha is folded into it
(Gemma 2: into the post-attention norm, w' = alpha * (1 + w) - 1). alpha = 0 removes the block:
the attention returns zeros and the norms that only feed it become Identity.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("value", "removed")


class ValueOnlyAttention(nn.Module):
    """Identity-matrix attention: out = fused(x), fused = alpha * W_O expand(W_V)."""

    def __init__(self, fused: nn.Linear, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int):
        super().__init__()
        self.fused = fused
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.fused(hidden_states), None


class RemovedAttention(nn.Module):
    """alpha = 0: the attention block contributes nothing and holds no weights."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
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
