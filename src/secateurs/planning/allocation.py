"""Where a parameter target goes: how much to attention (the attention share of the removed
parameters) and how much each layer gives.

* allocation="uniform": every layer gives its proportional share, split between head units and
  neurons by the attention share (the stock-loadable layout);
* allocation="global": scores are standardised within each layer and kind (FLAP's per-layer
  standardisation), then one global threshold per kind removes the lowest head units until the
  attention budget is met and the lowest neurons until the whole target is (within one neuron),
  so some layers keep every KV group and others lose more. Layers then differ in width: such
  models load with load_pruned (or are served through a per-layer-width export), not stock
  from_pretrained.

Head units follow the GQA mode (secateurs.planning.budget): whole KV groups, or one query head of every
group. Every layer keeps at least one head unit and one neuron.
"""

from __future__ import annotations

import torch

from secateurs.criteria.flap import standardize
from secateurs.criteria.scores import StructureScores
from secateurs.errors import SecateursError
from secateurs.planning.budget import Geometry, KeepCounts, head_unit, keep_counts


def balanced_attention_share(geo: Geometry, gqa: str) -> float:
    """The attention share the balanced rule spends (the same fraction of head units as of
    neurons): attention's part of the prunable parameters."""
    attention = sum(head_unit(s, c, gqa)[0] * head_unit(s, c, gqa)[1] for s, c in zip(geo.shapes, geo.costs))
    neurons = sum(s.intermediate_size * c.neuron for s, c in zip(geo.shapes, geo.costs))
    return attention / (attention + neurons)


def unit_scores(head_scores: torch.Tensor, num_kv_heads: int, gqa: str) -> torch.Tensor:
    """One score per removable head unit, ordered as they are removed within the layer: KV groups
    by the mean of their query heads, or (in-group) rank r = the mean over groups of each group's
    r-th lowest query head."""
    by_group = head_scores.float().reshape(num_kv_heads, -1)
    if gqa == "groups" or by_group.shape[1] == 1:
        return by_group.mean(1)
    return torch.sort(by_group, dim=1).values.mean(0)


def uniform_counts(geo: Geometry, target: int, share: float, gqa: str) -> list[KeepCounts]:
    """Every layer gives target * (its prunable size / all prunable), `share` of it in head units."""
    prunable = geo.prunable
    counts = []
    for index, (shape, costs, size) in enumerate(zip(geo.shapes, geo.costs, prunable)):
        layer_target = target * size / sum(prunable)
        unit_cost, units = head_unit(shape, costs, gqa)
        removed_units = min(units - 1, round(layer_target * share / unit_cost))
        removed_neurons = max(0, round((layer_target - removed_units * unit_cost) / costs.neuron))
        if removed_neurons >= shape.intermediate_size:
            raise SecateursError(f"this target would remove every MLP neuron of layer {index}; lower the ratio or "
                                 "give attention a larger share")
        counts.append(keep_counts(shape, removed_units, shape.intermediate_size - removed_neurons, gqa))
    return counts


def _closest_prefix(candidates: list[tuple[float, int, int]], sizes: list[int], budget: float) -> list[int]:
    """Removed units per layer: the lowest-scored (score, layer, cost) first, each layer keeping one,
    stopping at the prefix whose total cost is closest to the budget."""
    removed = [0] * len(sizes)
    taken, total, best = [], 0, (abs(budget), 0)
    for _, layer, cost in sorted(candidates):
        if total >= budget:
            break
        if removed[layer] + 1 >= sizes[layer]:
            continue
        removed[layer] += 1
        taken.append(layer)
        total += cost
        if abs(total - budget) < best[0]:
            best = (abs(total - budget), len(taken))
    out = [0] * len(sizes)
    for layer in taken[: best[1]]:
        out[layer] += 1
    return out


def global_counts(geo: Geometry, scores: StructureScores, target: int, share: float, gqa: str) -> list[KeepCounts]:
    """One global threshold per kind on per-layer standardised scores (see the module docstring)."""
    heads, head_sizes = [], []
    for i, (shape, costs, h) in enumerate(zip(geo.shapes, geo.costs, scores.heads)):
        unit_cost, units = head_unit(shape, costs, gqa)
        heads += [(float(z), i, unit_cost) for z in standardize(unit_scores(h, shape.num_kv_heads, gqa))]
        head_sizes.append(units)
    removed_units = _closest_prefix(heads, head_sizes, share * target) if share > 0 else [0] * len(geo.shapes)
    spent = sum(r * head_unit(s, c, gqa)[0] for r, s, c in zip(removed_units, geo.shapes, geo.costs))
    neurons = [(float(z), i, costs.neuron) for i, (costs, n) in enumerate(zip(geo.costs, scores.neurons))
               for z in standardize(n.float())]
    removed_neurons = _closest_prefix(neurons, [s.intermediate_size for s in geo.shapes], target - spent)
    return [keep_counts(s, u, s.intermediate_size - n, gqa)
            for s, u, n in zip(geo.shapes, removed_units, removed_neurons)]
