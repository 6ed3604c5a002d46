"""Budgets: a pruning ratio -> how many heads, KV heads and neurons each layer keeps."""

from __future__ import annotations

from dataclasses import dataclass

from secateurs.adapters import LayerShape
from secateurs.errors import SecateursError

GQA_MODES = ("groups", "in-group")


@dataclass(frozen=True)
class KeepCounts:
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


def check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise SecateursError(f"ratio must lie in [0, 1) (fraction removed), got {ratio}")
    return ratio


def uniform_keep_counts(shape: LayerShape, ratio: float, gqa: str = "groups") -> KeepCounts:
    """Remove round(ratio * n) of the layer's heads and of its neurons, respecting GQA.

    gqa="groups": remove whole KV groups (G query heads + their KV head each).
    gqa="in-group": keep every KV head, remove the same number of query heads from each group.
    With plain multi-head attention (G = 1) both mean removing single heads.
    Every layer keeps at least one head and one neuron.
    """
    check_ratio(ratio)
    if gqa not in GQA_MODES:
        raise SecateursError(f"gqa mode must be one of {GQA_MODES}, got {gqa!r}")
    g = shape.group_size
    if gqa == "groups" or g == 1:
        kv = max(1, shape.num_kv_heads - round(ratio * shape.num_kv_heads))
        heads = kv * g
    else:
        kv = shape.num_kv_heads
        heads = kv * max(1, g - round(ratio * g))
    neurons = max(1, shape.intermediate_size - round(ratio * shape.intermediate_size))
    return KeepCounts(heads, kv, neurons)
