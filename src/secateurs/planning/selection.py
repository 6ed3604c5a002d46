"""Selection: scores + keep counts -> kept indices. Ties go to the lower index (deterministic).

Modes: standard (keep the highest scores), reversed (keep the lowest: AMP's coherence check,
which must be far worse), random (ignore the scores; seeded).
"""

from __future__ import annotations

import torch

from secateurs.criteria.scores import StructureScores
from secateurs.errors import SecateursError
from secateurs.settings.names import SELECTIONS


def top_indices(scores: torch.Tensor, k: int) -> list[int]:
    """Sorted indices of the k highest scores; equal scores keep the lower index."""
    order = torch.sort(-scores.float(), stable=True).indices[:k]
    return sorted(order.tolist())


def select_heads(scores: torch.Tensor, num_kv_heads: int, keep_heads: int, keep_kv: int) -> tuple[list[int], list[int]]:
    """Kept query heads and KV heads. Whole groups (scored by the mean of their query heads)
    when keep_kv < num_kv_heads; otherwise the best keep_heads/num_kv_heads heads of every group."""
    group = scores.numel() // num_kv_heads
    by_group = scores.float().reshape(num_kv_heads, group)
    kv = top_indices(by_group.mean(1), keep_kv) if keep_kv < num_kv_heads else list(range(num_kv_heads))
    per_group = keep_heads // keep_kv
    heads = [g * group + h for g in kv for h in top_indices(by_group[g], per_group)]
    return heads, kv


def apply_selection(scores: StructureScores, selection: str, seed: int = 0) -> StructureScores:
    """Scores as the selection mode sees them."""
    if selection == "standard":
        return scores
    if selection == "reversed":
        return StructureScores([-h for h in scores.heads], [-n for n in scores.neurons], scores.description)
    if selection == "random":
        gen = torch.Generator().manual_seed(seed)
        return StructureScores([torch.rand(h.shape, generator=gen) for h in scores.heads],
                               [torch.rand(n.shape, generator=gen) for n in scores.neurons], scores.description)
    raise SecateursError(f"selection must be one of {', '.join(SELECTIONS)}; got {selection!r}")
