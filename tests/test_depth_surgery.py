"""Deleting layers keeps every remaining layer's attention type: gemma2's alternating
sliding/full layers (config.layer_types) and qwen2's max_window_layers split, after re-indexing,
with the KV cache, and after a save / stock from_pretrained round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import input_ids, masked_reference, tiny_model
from transformers import AutoModelForCausalLM

from secateurs.planning.geometry import identity_plan
from secateurs.storage.pruned import save_pruned
from secateurs.surgery.apply import apply_plan

# removal sets that shift the sliding/full pattern: the first layer, two neighbours, both ends
REMOVALS = [(0,), (1, 2), (0, 3, 5)]


def _plan(model, removed):
    plan = identity_plan(model)
    for i in removed:
        plan.layers[i].removed = True
    return plan


def _cached_logits(model, ids, split=9):
    with torch.no_grad():
        first = model(ids[:, :split], use_cache=True)
        step = model(ids[:, split:], past_key_values=first.past_key_values, use_cache=True)
        return torch.cat([first.logits, step.logits], dim=1)


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
@pytest.mark.parametrize("removed", REMOVALS)
def test_layer_removal_keeps_attention_types_with_cache(family, removed, tmp_path):
    dense = tiny_model(family, num_hidden_layers=6)
    types = list(getattr(dense.config, "layer_types", None) or [])
    plan = _plan(dense, removed)
    kept = plan.kept_layer_indices()
    pruned = apply_plan(copy.deepcopy(dense), plan)
    # each surviving layer keeps its own attention type, and re-indexing is contiguous
    if types:
        assert pruned.config.layer_types == [types[i] for i in kept]
    if family == "qwen2":
        assert pruned.config.max_window_layers == sum(1 for i in kept if i < dense.config.max_window_layers)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == list(range(len(kept)))
    # 14 tokens, cached as 9 + 5: longer than the sliding window (6), so the windows matter. (A
    # cached chunk longer than the window is inexact in transformers' dense gemma2 itself, ~2e-7.)
    ids = input_ids(length=14)
    reference = masked_reference(dense, plan)
    want = _cached_logits(reference, ids)
    torch.testing.assert_close(_cached_logits(pruned, ids), want, atol=1e-10, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, want, atol=1e-10, rtol=0)
    # the saved folder rebuilds the same attention types from its config with the stock loader
    out = save_pruned(pruned, plan, tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    if types:
        assert stock.config.layer_types == pruned.config.layer_types
    torch.testing.assert_close(_cached_logits(stock, ids), want, atol=1e-10, rtol=0)
