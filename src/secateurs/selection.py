"""Selection: scores + keep counts -> kept indices. Ties go to the lower index (deterministic)."""

from __future__ import annotations

import torch


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
