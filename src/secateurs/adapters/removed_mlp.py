"""A removed MLP, materialised: the block contributes nothing and holds no weights.

A plan's `mlp = {"mode": "removed"}` keeps the layer's attention and drops its MLP. The MLP module
becomes RemovedMLP, whose output is zeros, and the norms that only feed the MLP (Llama's
post-attention norm, Gemma's pre- and post-feed-forward norms) become Identity, so the layer
computes its residual stream plus its attention: residual + 0 is the residual itself, bit for bit.
In a parallel block (Phi) the MLP's term of attention + MLP + residual is zero. The layer's shape
reports 0 neurons.
"""

from __future__ import annotations

import torch
from torch import nn


class RemovedMLP(nn.Module):
    """The MLP of a layer that keeps only its attention: zeros, no parameters."""

    intermediate_size = 0

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def is_removed_mlp(mlp: nn.Module) -> bool:
    return isinstance(mlp, RemovedMLP)
