"""FLAP's adaptive structure: standardised fluctuation scores of all head units and neurons of
all layers compete under one global threshold, chosen so the removed parameters are as close to
the target as the granularity allows (layers end up with different widths). Removed channels
are replaced by their calibration mean: W[:, removed] @ mean[removed] is added to the
o_proj / down_proj bias (stored in the plan, applied by surgery)."""

from __future__ import annotations

from secateurs.calibration.statistics import Statistics
from secateurs.criteria.flap import flap_scores, standardize
from secateurs.errors import SecateursError
from secateurs.methods.base import Method, Needs, PlanContext, provenance
from secateurs.methods.options import FlapOptions
from secateurs.planning.budget import Budget, Geometry, KeepCounts, target_params
from secateurs.planning.geometry import identity_plan
from secateurs.planning.plan import PruningPlan


class Flap(Method):
    name = "flap"
    summary = "FLAP: standardised fluctuation, one global threshold, bias compensation (non-uniform)"
    options = FlapOptions
    needs = Needs(calibration=True, statistics=True)

    def make_plan(self, context: PlanContext, options: FlapOptions) -> PruningPlan:
        geo = Geometry.of(context.model)
        ratio = None if context.layers_equivalent is not None else context.ratio
        target, settings = target_params(geo, ratio, context.ratio_of, context.layers_equivalent)
        stats = context.activation_statistics()
        plan = flap_plan(context.model, stats, target, options.gqa)
        counts = [KeepCounts(*s) for s in plan.pruned_shapes()]
        report = Budget(counts, geo.total_params, target, geo.removed_params(counts),
                        {**settings, "gqa": options.gqa}).report()
        plan.provenance = provenance(self.name, plan, context.seed, stats.description.get("calibration"),
                                     stats.description.get("calibration_hash"), report)
        return plan


def flap_plan(model, stats: Statistics, target: int, gqa: str = "groups", compensate: bool = True,
              parts: str = "both") -> PruningPlan:
    """parts='mlp' prunes neurons only (HARP + FLAP: attention was handled by HARP)."""
    if gqa != "groups":
        raise SecateursError("FLAP removes whole KV groups on GQA models; use gqa='groups'")
    geo = Geometry.of(model)
    scores = flap_scores(model, stats, heads=parts == "both")
    candidates = []  # (score, layer, kind, index, cost)
    for i, (shape, costs) in enumerate(zip(geo.shapes, geo.costs)):
        g = shape.group_size
        if parts == "both":
            heads = standardize(scores.heads[i]).reshape(shape.num_kv_heads, g).mean(1)
            unit_cost = g * costs.head + costs.kv_head
            candidates += [(float(s), i, 0, k, unit_cost) for k, s in enumerate(heads)]
        candidates += [(float(s), i, 1, j, costs.neuron) for j, s in enumerate(standardize(scores.neurons[i]))]
    candidates.sort()
    left = {(i, kind): n for i, s in enumerate(geo.shapes)
            for kind, n in ((0, s.num_kv_heads), (1, s.intermediate_size))}
    chosen, removed, best = [], 0, (target, 0)  # best = (|removed - target|, prefix length)
    for cand in candidates:
        _, i, kind, _, cost = cand
        if left[(i, kind)] == 1:  # every layer keeps one head unit and one neuron
            continue
        left[(i, kind)] -= 1
        chosen.append(cand)
        removed += cost
        if abs(removed - target) < best[0]:
            best = (abs(removed - target), len(chosen))
        if removed > target:
            break
    gone: dict[tuple[int, int], set[int]] = {}
    for _, i, kind, index, _ in chosen[: best[1]]:
        gone.setdefault((i, kind), set()).add(index)
    plan = identity_plan(model)
    for lp, shape, a, m in zip(plan.layers, geo.shapes, stats.attention, stats.mlp):
        g = shape.group_size
        units = gone.get((lp.index, 0), set())
        neurons = gone.get((lp.index, 1), set())
        compensation = {}
        if units:
            lp.kv_heads = [k for k in range(shape.num_kv_heads) if k not in units]
            lp.heads = [h for h in range(shape.num_heads) if h // g not in units]
            d = a.channel_sum.numel() // shape.num_heads
            removed_channels = [c for h in range(shape.num_heads) if h // g in units for c in range(h * d, (h + 1) * d)]
            compensation["attention"] = a.channel_mean()[removed_channels].tolist()
        if neurons:
            lp.neurons = [j for j in range(shape.intermediate_size) if j not in neurons]
            compensation["mlp"] = m.channel_mean()[sorted(neurons)].tolist()
        if compensate and compensation:
            lp.compensation = compensation
    return plan
