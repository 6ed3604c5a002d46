"""PruningPlan JSON, validation (GQA rule, bad plans), budgets, and parameter accounting."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

from secateurs.adapters import LayerShape, get_adapter
from secateurs.errors import PlanError, SecateursError, UnsupportedModelError
from secateurs.methods import make_plan, prune
from secateurs.planning.accounting import compare_stats, model_stats
from secateurs.planning.budget import KeepCounts, uniform_keep_counts
from secateurs.planning.geometry import identity_plan
from secateurs.planning.plan import PruningPlan
from secateurs.surgery.apply import apply_plan


def test_plan_json_round_trip_and_summary(tmp_path):
    model = tiny_model("llama-gqa")
    plan = make_plan(model, "magnitude", 0.5, gqa="in-group", rounding="structures")
    path = plan.save(tmp_path / "plan.json")
    again = PruningPlan.load(path)
    assert again.to_json() == plan.to_json()
    assert again.resolve_layer(again.layers[0]) == plan.resolve_layer(plan.layers[0])
    text = plan.summary()
    assert "4/8" in text and "2/2" in text and "24/48" in text and "  method: magnitude" in text
    assert "..." not in text  # provenance in full
    assert [line.split()[0] for line in text.splitlines() if "24/48" in line] == ["0-3"]  # identical layers: one row


def test_plan_is_deterministic_and_reapplies():
    a = make_plan(tiny_model("qwen3"), "random", 0.4, seed=7)
    b = make_plan(tiny_model("qwen3"), "random", 0.4, seed=7)
    c = make_plan(tiny_model("qwen3"), "random", 0.4, seed=8)
    assert a.to_json() == b.to_json() != c.to_json()
    m1, _ = prune(tiny_model("qwen3"), plan=PruningPlan.from_dict(a.to_dict()))
    m2, _ = prune(tiny_model("qwen3"), method="random", ratio=0.4, seed=7)
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize(
    "heads, kv, message",
    [
        ([0, 1, 2, 4], None, "cannot be represented"),  # 3 heads of group 0, 1 of group 1
        ([0, 1], [0, 1], "do not match"),  # KV head 1 kept without any of its query heads
        ([], None, "keeps no attention heads"),
        ([0, 9], None, r"\[0, 8\)"),
    ],
)
def test_unrepresentable_gqa_plans_are_refused_before_any_change(heads, kv, message):
    model = tiny_model("llama-gqa")  # 8 query heads, 2 KV heads, G = 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = identity_plan(model)
    plan.layers[0].neurons = [0, 1, 2]  # a valid change that must not happen either
    plan.layers[3].heads, plan.layers[3].kv_heads = heads, kv
    with pytest.raises(PlanError, match=message):
        apply_plan(model, plan)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plan_for_another_model_is_refused():
    plan = make_plan(tiny_model("llama-gqa"), "magnitude", 0.5)
    with pytest.raises(PlanError, match="another model"):
        apply_plan(tiny_model("llama-mha"), plan)
    with pytest.raises(PlanError, match="another model"):
        apply_plan(tiny_model("qwen2"), plan)


def test_plan_removing_every_layer_or_all_neurons_is_refused():
    model = tiny_model("phi")
    plan = identity_plan(model)
    for lp in plan.layers:
        lp.removed = True
    with pytest.raises(PlanError, match="every decoder layer"):
        apply_plan(model, plan)
    plan = identity_plan(model)
    plan.layers[1].neurons = []
    with pytest.raises(PlanError, match="no MLP neurons"):
        apply_plan(model, plan)


def test_not_a_plan_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"layers": []}')
    with pytest.raises(PlanError, match="not a secateurs plan"):
        PruningPlan.load(bad)
    with pytest.raises(PlanError, match="not found"):
        PruningPlan.load(tmp_path / "missing.json")


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(SecateursError, match=r"\[0, 1\)"):
        make_plan(tiny_model("llama-mha"), "magnitude", ratio)


def test_unknown_family_and_method():
    model = tiny_model("llama-mha")
    model.config.model_type = "gpt2"
    with pytest.raises(UnsupportedModelError,
                       match="gemma2, gemma3, gemma3_text, llama, mistral, phi, phi3, qwen2, qwen3"):
        get_adapter(model)
    with pytest.raises(SecateursError, match=r"available: amp, .*magnitude, random, search, wanda-sp"):
        make_plan(tiny_model("llama-mha"), "nope", 0.2)


def test_uniform_budget_respects_gqa():
    gqa = LayerShape(num_heads=32, num_kv_heads=8, intermediate_size=14336)
    assert uniform_keep_counts(gqa, 0.25, "groups") == KeepCounts(24, 6, 10752)
    assert uniform_keep_counts(gqa, 0.25, "in-group") == KeepCounts(24, 8, 10752)
    assert uniform_keep_counts(gqa, 0.99, "groups").num_heads == 4  # one whole group survives
    mha = LayerShape(num_heads=9, num_kv_heads=9, intermediate_size=10)
    assert uniform_keep_counts(mha, 0.2, "in-group") == KeepCounts(7, 7, 8)


def test_magnitude_keeps_the_largest_structures():
    model = tiny_model("llama-mha")
    layer = get_adapter(model).decoder_layers(model)[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight[:, 8:16] *= 100  # head 1 of head_dim 8
        layer.mlp.down_proj.weight[:, 5] *= 100
        layer.self_attn.o_proj.weight[:, 16:24] *= 0.001  # head 2
    plan = make_plan(model, "magnitude", 0.5)
    assert 1 in plan.layers[0].heads and 2 not in plan.layers[0].heads
    assert 5 in plan.layers[0].neurons


def _llama2_7b_on_meta():
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_llama2_7b_parameter_accounting_on_meta():
    model = _llama2_7b_on_meta()
    before = model_stats(model)
    assert before.total_params == 6_738_415_616
    plan = identity_plan(model)
    for lp in plan.layers:
        lp.heads = list(range(22))
        lp.neurons = list(range(11008 - 3440))
    apply_plan(model, plan)
    after = model_stats(model)
    assert after.total_params == 4_714_663_936
    assert model.config.num_attention_heads == 22 and model.config.intermediate_size == 7568
    assert model.config.head_dim == 128
    cmp = compare_stats(before, after, tokens=128)
    assert after.weight_bytes == 4 * 4_714_663_936
    assert cmp["ideal_decode_speedup"] == pytest.approx(6_738_415_616 / 4_714_663_936)
    assert 1 < cmp["ideal_prefill_speedup"] < 1.5


def test_tied_embeddings_are_counted_once_and_layers_add_up():
    model = tiny_model("gemma2")  # tied
    stats = model_stats(model)
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert stats.total_params == unique
    embed = model.get_input_embeddings().weight.numel()
    final_norm = get_adapter(model).final_norm(model).weight.numel()
    assert stats.total_params == stats.layer_params + embed + final_norm
    pruned = apply_plan(copy.deepcopy(model), make_plan(model, "magnitude", 0.5))
    assert model_stats(pruned).layers[0].num_heads == 2
