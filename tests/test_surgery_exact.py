"""Invariant 1: physical surgery equals masking, for every family, with and without KV cache,
and through generate. "mlp": removed MLPs (the last layer's among them) beside a narrower one,
against the dense model with those MLPs' outputs zeroed."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, input_ids, masked_reference, tiny_model

from secateurs.adapters import get_adapter
from secateurs.planning.geometry import identity_plan
from secateurs.planning.plan import PruningPlan
from secateurs.surgery.apply import apply_plan


def exactness_plan(model, kind: str) -> PruningPlan:
    plan = identity_plan(model)
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(3)
    for lp in plan.layers:
        shape = adapter.layer_shape(adapter.decoder_layers(model)[lp.index])
        g = shape.group_size
        if kind in ("groups", "mixed"):
            # drop one whole KV group (or one head when g == 1), a different one per layer
            gone = lp.index % shape.num_kv_heads
            lp.kv_heads = [k for k in range(shape.num_kv_heads) if k != gone]
            lp.heads = [h for h in range(shape.num_heads) if h // g != gone]
        if kind == "in-group" and g > 1:
            keep = max(1, g // 2)
            lp.heads = [k * g + j for k in range(shape.num_kv_heads)
                        for j in torch.randperm(g, generator=gen)[:keep].sort().values.tolist()]
        if kind in ("neurons", "mixed"):
            n = shape.intermediate_size
            lp.neurons = torch.randperm(n, generator=gen)[: n - 7 - lp.index].sort().values.tolist()
    if kind in ("layers", "mixed"):
        plan.layers[2].removed = True
    if kind == "mlp":
        plan.layers[1].mlp = plan.layers[3].mlp = {"mode": "removed"}
        plan.layers[2].neurons = list(range(0, plan.layer_shape(2)[2], 2))
    return plan


KINDS = ["groups", "in-group", "neurons", "layers", "mixed", "mlp"]


@pytest.mark.parametrize("kind", KINDS)
def test_surgery_matches_masking(family, kind):
    dense = tiny_model(family)
    plan = exactness_plan(dense, kind)
    reference = masked_reference(dense, plan)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    ids = input_ids()
    with torch.no_grad():
        want = reference(ids).logits
        got = pruned(ids).logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # the surgery really removed parameters
    if kind != "in-group" or get_adapter(dense).layer_shape(get_adapter(dense).decoder_layers(dense)[0]).group_size > 1:
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense.parameters())


@pytest.mark.parametrize("kind", ["mixed", "in-group", "mlp"])
def test_surgery_matches_masking_with_kv_cache(family, kind):
    dense = tiny_model(family)
    plan = exactness_plan(dense, kind)
    reference = masked_reference(dense, plan)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    ids = input_ids(length=14)
    with torch.no_grad():
        outs = []
        for model in (reference, pruned):
            first = model(ids[:, :9], use_cache=True)
            step = model(ids[:, 9:], past_key_values=first.past_key_values, use_cache=True)
            outs.append(torch.cat([first.logits, step.logits], dim=1))
        full = pruned(ids).logits
    torch.testing.assert_close(outs[1], outs[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(outs[1], full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["mixed", "mlp"])
def test_generate_matches_masking(family, kind):
    dense = tiny_model(family)
    plan = exactness_plan(dense, kind)
    reference = masked_reference(dense, plan)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    ids = input_ids(batch=1, length=5)
    kwargs = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=0)
    want = reference.generate(ids, **kwargs)
    got = pruned.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-9, rtol=0)


def test_config_follows_real_shapes(family):
    dense = tiny_model(family)
    plan = exactness_plan(dense, "groups")
    pruned = apply_plan(copy.deepcopy(dense), plan)
    adapter = get_adapter(pruned)
    layer = adapter.decoder_layers(pruned)[0]
    shape = adapter.layer_shape(layer)
    assert pruned.config.head_dim == adapter.head_dim(layer)
    assert pruned.config.num_key_value_heads == max(
        adapter.layer_shape(layer).num_kv_heads for layer in adapter.decoder_layers(pruned))
    assert shape.num_kv_heads < get_adapter(dense).layer_shape(get_adapter(dense).decoder_layers(dense)[0]).num_kv_heads


def test_layer_removal_reindexes_and_slices_config(family):
    dense = tiny_model(family)
    plan = identity_plan(dense)
    plan.layers[1].removed = True
    layer_types = getattr(dense.config, "layer_types", None)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    adapter = get_adapter(pruned)
    assert pruned.config.num_hidden_layers == 3
    assert [adapter.attention(layer).layer_idx for layer in adapter.decoder_layers(pruned)] == [0, 1, 2]
    if layer_types is not None:
        assert pruned.config.layer_types == [layer_types[i] for i in (0, 2, 3)]
    if FAMILIES[family][0] == "qwen2":
        assert pruned.config.max_window_layers == 1
