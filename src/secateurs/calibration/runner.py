"""Running one decoder layer on captured inputs with padding zeroed, and scoring next tokens: the one
implementation behind activation statistics (as a forward hook), the layer-streamed drivers, depth
scoring, HARP's search and perplexity.

Padded rows whose attention window holds only padding come out NaN in some families (gemma2 with
sliding windows), and NaN values then leak into real tokens through zero attention weights.
Padding is never read, so zeroing it after every layer changes nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NLL_CHUNK_ROWS = 256  # rows turned into logits and losses at a time: the (rows x vocab) temporary stays small


def zero_padding(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`output` (B, T, hidden) with the positions where `mask` (B, T) is 0 set to zero."""
    keep = mask.to(output.device).bool().unsqueeze(-1)
    return torch.where(keep, output, torch.zeros((), dtype=output.dtype, device=output.device))


def run_layer(layer, hidden: torch.Tensor, kwargs: dict, mask: torch.Tensor) -> torch.Tensor:
    """One decoder layer on one captured batch (its keyword arguments as captured), padding zeroed."""
    out = layer(hidden, **kwargs)
    return zero_padding(out[0] if isinstance(out, tuple) else out, mask)


def summed_next_token_nll(rows: torch.Tensor, targets: torch.Tensor,
                          to_logits: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, int]:
    """(sum of -log p(target), number of targets) over the rows whose target is >= 0.

    `rows` are logits, or hidden states that `to_logits` turns into logits (the adapter's `logits`, so
    that family quirks such as soft-capping apply); either way a few rows at a time, so a large
    vocabulary never needs a (tokens x vocab) copy. Losses are logsumexp minus the target logit in
    float32 at least (the logits' dtype when wider), summed in float64.
    """
    rows, targets = rows.reshape(-1, rows.shape[-1]), targets.reshape(-1).to(rows.device)
    scored = targets >= 0
    if not bool(scored.all()):
        rows, targets = rows[scored], targets[scored]
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, rows.shape[0], NLL_CHUNK_ROWS):
        chunk = rows[start:start + NLL_CHUNK_ROWS]
        logits = chunk if to_logits is None else to_logits(chunk)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        target = targets[start:start + NLL_CHUNK_ROWS].to(logits.device)
        nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, target[:, None])[:, 0]
        total += nll.double().sum().cpu()
    return total.item(), int(targets.numel())
