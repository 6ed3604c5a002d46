"""Running one decoder layer on captured inputs with padding zeroed: the one implementation behind
activation statistics (as a forward hook), the layer-streamed drivers, depth scoring and HARP's
search.

Padded rows whose attention window holds only padding come out NaN in some families (gemma2 with
sliding windows), and NaN values then leak into real tokens through zero attention weights.
Padding is never read, so zeroing it after every layer changes nothing else.
"""

from __future__ import annotations

import torch


def zero_padding(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`output` (B, T, hidden) with the positions where `mask` (B, T) is 0 set to zero."""
    keep = mask.to(output.device).bool().unsqueeze(-1)
    return torch.where(keep, output, torch.zeros((), dtype=output.dtype, device=output.device))


def run_layer(layer, hidden: torch.Tensor, kwargs: dict, mask: torch.Tensor) -> torch.Tensor:
    """One decoder layer on one captured batch (its keyword arguments as captured), padding zeroed."""
    out = layer(hidden, **kwargs)
    return zero_padding(out[0] if isinstance(out, tuple) else out, mask)
