"""FLAP: the compensated surgery equals the dense model with removed channels held at their
calibration mean; the global threshold meets the target; biases it adds save and reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import input_ids, padded_calibration, tiny_model

from secateurs.adapters import get_adapter
from secateurs.calibration.statistics import collect_statistics
from secateurs.errors import SecateursError
from secateurs.methods import make_plan
from secateurs.planning.budget import Geometry, KeepCounts
from secateurs.storage.pruned import load_pruned, save_pruned
from secateurs.surgery.apply import apply_plan


@torch.no_grad()
def _mean_held_reference(model, plan):
    """Dense model whose removed o_proj / down_proj input channels are replaced by their mean."""
    ref = copy.deepcopy(model)
    adapter = get_adapter(ref)
    for lp in plan.layers:
        layer = adapter.decoder_layers(ref)[lp.index]
        heads, _, neurons = plan.resolve_layer(lp)
        comp = lp.compensation or {}
        d = adapter.head_dim(layer)
        width = adapter.attention_output_linear(layer).in_features
        kept_channels = [c for h in heads for c in range(h * d, (h + 1) * d)]
        for linear, kept, means in ((adapter.attention_output_linear(layer), kept_channels, comp.get("attention")),
                                    (adapter.mlp_output_linear(layer), neurons, comp.get("mlp"))):
            n = width if linear is adapter.attention_output_linear(layer) else linear.in_features
            removed = sorted(set(range(n)) - set(kept))
            if not removed:
                continue
            value = torch.tensor(means, dtype=linear.weight.dtype)

            def hook(module, args, removed=removed, value=value):
                x = args[0].clone()
                x[..., removed] = value
                return (x,)

            linear.register_forward_pre_hook(hook)
    return ref


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2", "phi", "phi3", "gemma2"])
def test_flap_surgery_equals_mean_held_channels(name, tmp_path):
    model = tiny_model(name)
    stats = collect_statistics(model, padded_calibration(), progress=False)
    plan = make_plan(model, "flap", 0.3, statistics=stats)
    assert any(lp.compensation for lp in plan.layers)
    reference = _mean_held_reference(model, plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference(ids).logits, atol=1e-10, rtol=0)
    out = save_pruned(pruned, plan, tmp_path / "flap")
    info = json.loads((out / "config.json").read_text())["secateurs"]
    assert info["stock_loadable"] is False
    reloaded = load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, atol=0, rtol=0)


def test_flap_global_threshold_meets_target_with_uneven_layers():
    model = tiny_model("llama-mha", num_hidden_layers=4, intermediate_size=96)
    stats = collect_statistics(model, padded_calibration(), progress=False)
    geo = Geometry.of(model)
    for ratio in (0.1, 0.25):
        plan = make_plan(model, "flap", ratio, statistics=stats)
        achieved = geo.removed_params([KeepCounts(*s) for s in plan.pruned_shapes()])
        target = plan.provenance["requested_params_removed"]
        assert abs(achieved - target) <= max(c.head + c.kv_head for c in geo.costs)
        assert plan.provenance["achieved_params_removed"] == achieved
    assert len(set(plan.pruned_shapes())) > 1  # one global threshold, not a uniform budget


def test_flap_refuses_in_group_gqa():
    model = tiny_model("llama-gqa")
    stats = collect_statistics(model, padded_calibration(), progress=False)
    with pytest.raises(SecateursError, match="whole KV groups"):
        make_plan(model, "flap", 0.2, statistics=stats, gqa="in-group")
