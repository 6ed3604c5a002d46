"""A removed MLP (a plan's `mlp = {"mode": "removed"}`: the layer keeps its attention only).

The plan field is validated like HARP's attention (one mode, nothing else; a user file), saved and
loaded in JSON, reported by every shape query (0 neurons). Surgery equals the dense model with the
MLP's output zeroed by a hook, to 1e-10 in float64, for every family (Gemma 3 included), alone and
combined in one model with an attention-free layer, a HARP value layer, a layer removed whole and
mixed widths; with and without KV cache and through generate. A pruned folder reloads with
load_pruned to the same logits and re-applying its plan gives byte-identical weights, in memory
and shard by shard. Accounting counts no parameters or FLOPs for a removed MLP.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FAMILIES, input_ids, masked_reference, padded_calibration, tiny_model
from safetensors.torch import load_file
from test_gemma3 import gemma3, gemma3_multimodal
from test_harp import IdentityMatrixAttention

from secateurs.adapters import get_adapter
from secateurs.adapters.removed_mlp import RemovedMLP
from secateurs.errors import PlanError, SecateursError
from secateurs.methods import prune
from secateurs.planning.accounting import model_stats
from secateurs.planning.geometry import identity_plan, plan_base
from secateurs.planning.plan import PLAN_FILENAME, LayerPlan, PruningPlan
from secateurs.storage.checkpoint import prune_checkpoint
from secateurs.storage.pruned import load_pruned, read_plan, save_pruned
from secateurs.surgery.apply import apply_plan

NAMES = [*sorted(FAMILIES), "gemma3", "gemma3-multimodal"]
GEMMA = ("gemma2", "gemma3_text", "gemma3")


def _model(name: str):
    if name == "gemma3":
        return gemma3()
    if name == "gemma3-multimodal":
        return gemma3_multimodal()
    return tiny_model(name)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def combined_plan(model) -> PruningPlan:
    """Every per-layer form in one model of 4 layers: 0 narrower (one KV group, or one head, fewer; a third of
    the neurons kept), 1 a narrower attention with its MLP removed, 2 attention-free with half its neurons,
    3 a HARP value path with its MLP removed.

    transformers sizes each kind of attention's mask (and the positions) from the KV cache of the first layer
    of that kind (layer_types), and HARP layers hold none: in every family here the layers that keep
    attention include the first of each kind they share with a HARP layer."""
    plan = identity_plan(model)
    heads, kv, inter = plan.layer_shape(0)
    group = heads // kv
    kept_heads = [h for h in range(heads) if h // group != 0] if kv > 1 else list(range(1, heads))
    plan.layers[0].heads = kept_heads
    plan.layers[0].neurons = list(range(0, inter, 3))
    plan.layers[1].heads = kept_heads
    plan.layers[1].mlp = {"mode": "removed"}
    plan.layers[2].attention = {"mode": "removed"}
    plan.layers[2].neurons = list(range(inter // 2))
    plan.layers[3].attention = {"mode": "value", "alpha": 0.6}
    plan.layers[3].mlp = {"mode": "removed"}
    return plan


def combined_reference(model, plan):
    """masked_reference (heads, neurons, removed MLPs), with HARP layers' attention matrix forced to the
    identity and scaled by alpha (Gemma: after the post-attention norm, where the block's output is)."""
    ref = masked_reference(model, plan)
    adapter = get_adapter(ref)
    gemma = ref.config.model_type in GEMMA
    for lp in plan.layers:
        if lp.attention is None:
            continue
        alpha = lp.attention.get("alpha", 0.0)
        layer = adapter.decoder_layers(ref)[lp.index]
        adapter.set_attention(layer, IdentityMatrixAttention(adapter, layer, 1.0 if gemma else alpha))
        if gemma:
            layer.post_attention_layernorm.register_forward_hook(lambda m, a, out, alpha=alpha: alpha * out)
    return ref


def _tolerance(model) -> float:
    # Gemma's RMSNorm computes in float32 whatever the model's dtype, and a HARP alpha sits in its weight there
    return 1e-6 if model.config.model_type in GEMMA else 1e-10


def _check_equal(pruned, reference, atol: float) -> None:
    """Same logits without and with KV cache (9 tokens, then 5: past the sliding windows of 6), same
    greedy tokens and step logits through generate."""
    ids = input_ids(length=14)
    want = _logits(reference, ids)
    torch.testing.assert_close(_logits(pruned, ids), want, atol=atol, rtol=0)
    with torch.no_grad():
        first = pruned(ids[:, :9], use_cache=True)
        step = pruned(ids[:, 9:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, step.logits], 1), want, atol=atol, rtol=0)
    kwargs = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=0)
    got, expected = pruned.generate(ids[:1, :5], **kwargs), reference.generate(ids[:1, :5], **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=10 * atol, rtol=0)


# -- the plan ---------------------------------------------------------------------------------


def test_the_plan_field_round_trips_and_every_shape_query_reports_it():
    model = tiny_model("llama-gqa")
    plan = identity_plan(model)
    plan.layers[1].mlp = {"mode": "removed"}
    plan.layers[2].removed = True
    plan.layers[3].mlp = {"mode": "removed"}
    again = PruningPlan.from_dict(json.loads(plan.to_json()))
    assert again.layers[1] == LayerPlan(index=1, mlp={"mode": "removed"}) and again.to_json() == plan.to_json()
    assert '"mlp": {"mode": "removed"}' in plan.to_json()
    assert again.resolve_layer(again.layers[1])[2] == []
    assert again.pruned_shapes() == [(8, 2, 48), (8, 2, 0), (8, 2, 0)]
    assert again.removed_mlp_layers() == [1, 2]  # the pruned model's layer numbers (layer 2 is gone)
    lines = again.summary().splitlines()
    assert [line.split() for line in lines[-5:-1]] == [
        ["0", "8/8", "2/2", "48/48"], ["1", "8/8", "2/2", "0/48", "mlp", "removed"], ["2", "removed"],
        ["3", "8/8", "2/2", "0/48", "mlp", "removed"]]


@pytest.mark.parametrize("mlp,match", [
    ({"mode": "narrow"}, "'mlp' must be"), ({"mode": "removed", "alpha": 0.5}, "'mlp' must be"),
    ("removed", "'mlp' must be"), ({}, "'mlp' must be"), ([{"mode": "removed"}], "'mlp' must be")])
def test_a_malformed_mlp_entry_is_refused(mlp, match):
    data = json.loads(identity_plan(tiny_model("llama-gqa")).to_json())
    data["layers"][1]["mlp"] = mlp
    with pytest.raises(PlanError, match=match):
        PruningPlan.from_dict(data)


def test_a_removed_mlp_keeps_no_neurons_and_no_compensation():
    plan = identity_plan(tiny_model("llama-gqa"))
    data = json.loads(plan.to_json())
    data["layers"][1].update(mlp={"mode": "removed"}, neurons=[0, 1])
    with pytest.raises(PlanError, match="layer 1: the MLP is removed, so it keeps no neurons"):
        PruningPlan.from_dict(data)
    data["layers"][1].update(neurons=[], compensation={"mlp": [0.0] * 48})
    with pytest.raises(PlanError, match="removed MLP has no output projection"):
        PruningPlan.from_dict(data)
    data["layers"][1].pop("compensation")
    assert PruningPlan.from_dict(data).pruned_shapes()[1] == (8, 2, 0)
    data["layers"][1].pop("mlp")  # no neurons without the mode: refused, saying how to write it
    with pytest.raises(PlanError, match='keeps no MLP neurons.*"mode": "removed"'):
        PruningPlan.from_dict(data)


def _mixed_plan(model) -> PruningPlan:
    """Layer 1 removed, layer 2's MLP removed and its attention replaced, layer 3 narrower: the forms a search
    mixes, beside a block the re-fit has work to do on."""
    plan = identity_plan(model)
    plan.layers[1].removed = True
    plan.layers[2].mlp = {"mode": "removed"}
    plan.layers[2].attention = {"mode": "removed"}
    plan.layers[3].neurons = list(range(0, 48, 2))
    return plan


def test_the_sequential_refit_passes_removed_layers_and_blocks_through():
    """Removed layers and blocks are applied as they are; a narrower block above them is re-fitted on the
    inputs they produce: the same model as with the removed layer kept as an identity (both blocks removed)."""
    model = tiny_model("llama-gqa").double()
    calibration = padded_calibration(seed=5)
    plan = _mixed_plan(model)
    removed, _ = prune(copy.deepcopy(model), plan=plan, calibration=calibration, reconstruct="sequential",
                       progress=False)
    kept = PruningPlan.from_dict(plan.to_dict())
    kept.layers[1] = LayerPlan(index=1, attention={"mode": "removed"}, mlp={"mode": "removed"})
    identity, _ = prune(copy.deepcopy(model), plan=kept, calibration=calibration, reconstruct="sequential",
                        progress=False)
    assert removed.config.num_hidden_layers == 3 and identity.config.num_hidden_layers == 4
    ids = input_ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(removed(ids).logits, identity(ids).logits, rtol=0, atol=1e-10)
        plain = apply_plan(copy.deepcopy(model), plan)
        assert (removed(ids).logits - plain(ids).logits).abs().max() > 1e-6  # layer 3 was re-fitted


# -- surgery equals masking ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_removed_mlp_equals_its_output_zeroed(name):
    dense = _model(name)
    plan = identity_plan(dense)
    plan.layers[1].mlp = plan.layers[3].mlp = {"mode": "removed"}  # the last layer's among them
    pruned = apply_plan(copy.deepcopy(dense), plan)
    adapter = get_adapter(pruned)
    layer = adapter.decoder_layers(pruned)[1]
    assert isinstance(adapter.mlp(layer), RemovedMLP) and not list(adapter.mlp(layer).parameters())
    assert all(isinstance(getattr(layer, n), torch.nn.Identity) for n in adapter.mlp_only_norms)
    assert [adapter.layer_shape(x).intermediate_size for x in adapter.decoder_layers(pruned)] == [48, 0, 48, 0]
    _check_equal(pruned, masked_reference(dense, plan), atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_every_per_layer_form_in_one_model_equals_masking(name, tmp_path):
    dense = _model(name)
    plan = combined_plan(dense)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    _check_equal(pruned, combined_reference(dense, plan), atol=_tolerance(dense))
    with torch.no_grad():  # the attention-free and HARP layers hold no KV cache
        cache = pruned(input_ids(), use_cache=True).past_key_values
    assert all(cache.layers[i].keys is None or cache.layers[i].keys.numel() == 0 for i in (2, 3))


@pytest.mark.parametrize("name", ["llama-gqa", "phi"])
def test_a_layer_without_attention_and_mlp_is_the_identity(name):
    """Both blocks gone: every norm of the layer goes too (Phi's shared input norm included)."""
    dense = tiny_model(name)
    plan = identity_plan(dense)
    plan.layers[1].attention, plan.layers[1].mlp = {"mode": "removed"}, {"mode": "removed"}
    pruned = apply_plan(copy.deepcopy(dense), plan)
    layer = get_adapter(pruned).decoder_layers(pruned)[1]
    assert not list(layer.parameters())
    skipped = copy.deepcopy(dense)
    skipped.model.layers[1].forward = lambda hidden_states, *args, **kwargs: hidden_states
    ids = input_ids()
    torch.testing.assert_close(_logits(pruned, ids), _logits(skipped, ids), atol=0, rtol=0)


# -- save, reload, re-apply ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_save_reload_and_reapply_byte_identically(name, tmp_path):
    dense = _model(name)
    plan = combined_plan(dense)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    out = save_pruned(pruned, plan, tmp_path / "pruned")
    info = json.loads((out / "config.json").read_text())["secateurs"]
    assert info["replaced_mlp"] == {"1": "removed", "3": "removed"} and info["stock_loadable"] is False
    assert info["replaced_attention"] == {"2": "removed", "3": "value"}
    assert [s["intermediate_size"] for s in info["layer_shapes"]] == [16, 0, 24, 0]
    reloaded = load_pruned(out)
    ids = input_ids(length=14)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pruned, ids), atol=0, rtol=0)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(ids[:1, :5], **kwargs), pruned.generate(ids[:1, :5], **kwargs))
    assert read_plan(out).to_json() == plan.to_json()
    again = save_pruned(apply_plan(_model(name), PruningPlan.load(out / PLAN_FILENAME)), plan, tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    resaved = save_pruned(reloaded, read_plan(out), tmp_path / "resaved")
    assert (resaved / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("name", ["llama-bias", "gemma2", "phi", "phi3"])
def test_shard_by_shard_surgery_writes_the_same_weights(name, tmp_path):
    dense = tiny_model(name)
    dense.save_pretrained(tmp_path / "dense")
    plan = combined_plan(dense)
    streamed = prune_checkpoint(tmp_path / "dense", plan, tmp_path / "streamed")
    in_memory = save_pruned(apply_plan(copy.deepcopy(dense), plan), plan, tmp_path / "memory")
    want, got = load_file(in_memory / "model.safetensors"), load_file(streamed / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    ids = input_ids()
    torch.testing.assert_close(_logits(load_pruned(streamed), ids), _logits(load_pruned(in_memory), ids),
                               atol=0, rtol=0)


def test_every_mlp_removed_is_one_shape_and_still_needs_load_pruned(tmp_path):
    dense = tiny_model("llama-gqa")
    plan = identity_plan(dense)
    for lp in plan.layers:
        lp.mlp = {"mode": "removed"}
    pruned = apply_plan(copy.deepcopy(dense), plan)
    out = save_pruned(pruned, plan, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 0 and config["secateurs"]["heterogeneous"] is False
    assert config["secateurs"]["stock_loadable"] is False
    ids = input_ids()
    torch.testing.assert_close(_logits(load_pruned(out), ids), _logits(pruned, ids), atol=0, rtol=0)
    torch.testing.assert_close(_logits(pruned, ids), _logits(masked_reference(dense, plan), ids), atol=1e-10, rtol=0)


def test_an_edited_config_or_plan_is_refused(tmp_path):
    dense = tiny_model("llama-gqa")
    plan = identity_plan(dense)
    plan.layers[1].mlp = {"mode": "removed"}
    out = save_pruned(apply_plan(copy.deepcopy(dense), plan), plan, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    for value in ({"9": "removed"}, {"1": "narrow"}, ["1"]):
        edited = copy.deepcopy(config)
        edited["secateurs"]["replaced_mlp"] = value
        (out / "config.json").write_text(json.dumps(edited))
        with pytest.raises(SecateursError, match="replaced_mlp must map"):
            load_pruned(out)
    edited = copy.deepcopy(config)
    edited["secateurs"]["replaced_mlp"] = {}
    (out / "config.json").write_text(json.dumps(edited))
    with pytest.raises(SecateursError, match="0 neurons where replaced_mlp lists the layer"):
        load_pruned(out)
    (out / "config.json").write_text(json.dumps(config))
    other = identity_plan(dense)
    other.layers[2].mlp = {"mode": "removed"}
    other.save(out / PLAN_FILENAME)
    with pytest.raises(SecateursError, match="does not describe the model beside it"):
        read_plan(out)


# -- accounting and geometry --------------------------------------------------------------------------


def test_accounting_counts_nothing_for_a_removed_mlp():
    dense = tiny_model("llama-bias")
    plan = identity_plan(dense)
    plan.layers[1].mlp = {"mode": "removed"}
    pruned = apply_plan(copy.deepcopy(dense), plan)
    before, after = model_stats(dense).layers[1], model_stats(pruned).layers[1]
    mlp_params = 3 * 32 * 48 + 48 + 48 + 32  # gate, up, down and their biases
    assert (after.mlp_params, after.intermediate_size, before.mlp_params) == (0, 0, mlp_params)
    assert after.other_params == before.other_params - 32  # the post-attention norm went with it
    assert after.linear_flops_per_token == before.linear_flops_per_token - 2 * 3 * 32 * 48
    assert after.kv_cache_bytes_per_token == before.kv_cache_bytes_per_token == 2 * 2 * 8 * 8
    assert model_stats(dense).total_params - model_stats(pruned).total_params == mlp_params + 32


def test_a_pruned_model_reports_its_shapes_and_its_identity_plan_keeps_the_mlp_removed():
    dense = tiny_model("llama-gqa")
    plan = identity_plan(dense)
    plan.layers[2].mlp = {"mode": "removed"}
    pruned = apply_plan(copy.deepcopy(dense), plan)
    base = plan_base(pruned)
    assert base["layer_shapes"][2] == [8, 2, 0]
    again = identity_plan(pruned)
    assert again.layers[2].mlp == {"mode": "removed"}
    assert PruningPlan.from_dict(json.loads(again.to_json())).pruned_shapes()[2] == (8, 2, 0)
    ids = input_ids()
    want = _logits(pruned, ids)
    torch.testing.assert_close(_logits(apply_plan(pruned, again), ids), want, atol=0, rtol=0)
