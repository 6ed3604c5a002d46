"""Uniform width pruning: every layer keeps its budgeted number of heads and neurons, the
best-scored ones."""

from __future__ import annotations

from secateurs.adapters import LayerShape
from secateurs.criteria import StructureScores
from secateurs.planning.budget import KeepCounts
from secateurs.planning.geometry import identity_plan
from secateurs.planning.plan import PruningPlan
from secateurs.planning.selection import select_heads, top_indices


def uniform_width_plan(model, scores: StructureScores, counts: list[KeepCounts]) -> PruningPlan:
    plan = identity_plan(model)
    for lp, keep, head_scores, neuron_scores in zip(plan.layers, counts, scores.heads, scores.neurons):
        shape = LayerShape(*plan.layer_shape(lp.index))
        if keep.num_heads < shape.num_heads:
            lp.heads, lp.kv_heads = select_heads(head_scores, shape.num_kv_heads, keep.num_heads, keep.num_kv_heads)
        if keep.intermediate_size < shape.intermediate_size:
            lp.neurons = top_indices(neuron_scores, keep.intermediate_size)
    return plan
