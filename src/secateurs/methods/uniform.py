"""Uniform width pruning: every layer keeps the same fraction of its heads and neurons,
chosen by a criterion's scores."""

from __future__ import annotations

from secateurs.adapters import LayerShape
from secateurs.budget import uniform_keep_counts
from secateurs.criteria import StructureScores
from secateurs.plan import LayerPlan, PruningPlan
from secateurs.selection import select_heads, top_indices


def uniform_width_plan(model, scores: StructureScores, ratio: float, gqa: str = "groups",
                       provenance: dict | None = None) -> PruningPlan:
    plan = PruningPlan.identity(model, provenance)
    for lp, head_scores, neuron_scores in zip(plan.layers, scores.heads, scores.neurons):
        shape = LayerShape(*plan.layer_shape(lp.index))
        keep = uniform_keep_counts(shape, ratio, gqa)
        if keep.num_heads < shape.num_heads:
            lp.heads, lp.kv_heads = select_heads(head_scores, shape.num_kv_heads, keep.num_heads, keep.num_kv_heads)
        if keep.intermediate_size < shape.intermediate_size:
            lp.neurons = top_indices(neuron_scores, keep.intermediate_size)
    return plan
