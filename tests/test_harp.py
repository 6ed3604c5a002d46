"""HARP: the materialised layer equals the dense layer run with an identity attention matrix and
its output scaled by alpha; alpha = 0 removal and Gemma 2's norm folding are exact; the search
beats alpha = 1 and alpha = 0 on the real model; save -> load_pruned -> identical; generate works."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FAMILIES, STORIES, TINYSTORIES_TEXT, input_ids, tiny_model
from transformers import AutoModelForCausalLM

from secateurs.adapters import get_adapter
from secateurs.calibration.data import load_calibration
from secateurs.methods.harp import capture_layer_inputs, harp_plan, tail_nll
from secateurs.planning.geometry import identity_plan
from secateurs.storage.loading import load_model
from secateurs.storage.pruned import load_pruned, save_pruned
from secateurs.surgery.apply import apply_plan, replace_attention


class IdentityMatrixAttention(torch.nn.Module):
    """The dense attention's own weights, with the attention matrix forced to the identity:
    each token reads only its own value (expanded to every query head)."""

    def __init__(self, adapter, layer, scale: float):
        super().__init__()
        self.w = adapter.attention_weights(layer)
        shape = adapter.layer_shape(layer)
        self.g, self.d, self.scale = shape.group_size, adapter.head_dim(layer), scale

    def forward(self, hidden_states, *args, **kwargs):
        w = self.w
        v = torch.nn.functional.linear(hidden_states, w.v, w.v_bias)
        b, t, _ = v.shape
        v = v.reshape(b, t, -1, self.d).repeat_interleave(self.g, dim=2).reshape(b, t, -1)
        return self.scale * torch.nn.functional.linear(v, w.o, w.o_bias), None


def _reference(model, alphas: dict[int, float]):
    ref = copy.deepcopy(model)
    adapter = get_adapter(ref)
    gemma = ref.config.model_type == "gemma2"
    for index, alpha in alphas.items():
        layer = adapter.decoder_layers(ref)[index]
        adapter.set_attention(layer, IdentityMatrixAttention(adapter, layer, 1.0 if gemma else alpha))
        if gemma:  # HARP scales the block's output, which in Gemma 2 is after the post-attention norm
            layer.post_attention_layernorm.register_forward_hook(lambda m, a, out, alpha=alpha: alpha * out)
    return ref


def _harp(model, alphas):
    plan = identity_plan(model)
    for index, alpha in alphas.items():
        plan.layers[index].attention = {"mode": "removed"} if alpha == 0 else {"mode": "value", "alpha": alpha}
    return plan


ALPHAS = {3: 0.8, 2: 0.0}


def test_materialised_harp_equals_identity_attention(family, tmp_path):
    model = tiny_model(family)
    reference = _reference(model, ALPHAS)
    plan = _harp(model, ALPHAS)
    pruned = apply_plan(copy.deepcopy(model), plan)
    ids = input_ids(length=14)
    # Gemma2RMSNorm computes in float32 whatever the model dtype, and alpha sits in its weight there
    atol = 1e-6 if FAMILIES[family][0] == "gemma2" else 1e-10
    with torch.no_grad():
        want = reference(ids).logits
        torch.testing.assert_close(pruned(ids).logits, want, atol=atol, rtol=0)
        first = pruned(ids[:, :9], use_cache=True)
        step = pruned(ids[:, 9:], past_key_values=first.past_key_values, use_cache=True)
        torch.testing.assert_close(torch.cat([first.logits, step.logits], 1), want, atol=atol, rtol=0)
        # the HARP layers hold no KV cache
        cache = first.past_key_values
        assert all(cache.layers[i].keys is None or cache.layers[i].keys.numel() == 0 for i in ALPHAS)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(pruned.generate(ids[:1, :5], **kwargs), reference.generate(ids[:1, :5], **kwargs))
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    out = save_pruned(pruned, plan, tmp_path / "harp")
    info = json.loads((out / "config.json").read_text())["secateurs"]
    assert info["replaced_attention"] == {"2": "removed", "3": "value"} and info["stock_loadable"] is False
    reloaded = load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, atol=0, rtol=0)


def test_alpha_one_is_identity_attention_and_zero_is_removal():
    model = tiny_model("llama-gqa")
    layer = copy.deepcopy(get_adapter(model).decoder_layers(model)[1])
    adapter = get_adapter(model)
    replace_attention(adapter, layer, "removed")
    assert isinstance(layer.input_layernorm, torch.nn.Identity)
    assert not any("self_attn" in n for n, _ in layer.named_parameters())
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    pos = torch.arange(5)[None]
    emb = model.model.rotary_emb(x, pos)
    dense = get_adapter(model).decoder_layers(model)[1]
    # with the attention removed the layer is the residual stream plus its MLP
    want = x + dense.mlp(dense.post_attention_layernorm(x))
    torch.testing.assert_close(layer(x, position_embeddings=emb), want, atol=1e-12, rtol=0)


def test_gemma2_alpha_folds_into_post_attention_norm():
    model = tiny_model("gemma2")
    adapter = get_adapter(model)
    layer = copy.deepcopy(adapter.decoder_layers(model)[0])
    before = layer.post_attention_layernorm.weight.detach().clone()
    replace_attention(adapter, layer, "value", 0.3)
    torch.testing.assert_close(layer.post_attention_layernorm.weight, 0.3 * (1 + before) - 1)


@pytest.fixture(scope="module")
def stories():
    return load_model(str(STORIES), dtype="float32")


def test_search_on_stories260k_beats_fixed_alphas(stories, tmp_path):
    model, tok = stories
    calib = load_calibration(str(TINYSTORIES_TEXT), tok, num_samples=12, max_length=64, seed=0)
    plan = harp_plan(model, calib, num_layers=2, progress=False)
    alphas = {int(k): v for k, v in plan.provenance["alphas"].items()}
    assert set(alphas) == {3, 4} and all(0 <= a <= 1 for a in alphas.values())
    adapter = get_adapter(model)
    captured = capture_layer_inputs(model, calib, 3)

    def calibration_nll(fixed: dict[int, float]) -> float:
        layers = list(adapter.decoder_layers(model))
        for index, alpha in fixed.items():
            layers[index] = copy.deepcopy(layers[index])
            replace_attention(adapter, layers[index], "removed" if alpha == 0 else "value", alpha)
        return tail_nll(model, adapter, layers, 3, captured, calib)

    searched = calibration_nll(alphas)
    assert searched < calibration_nll({3: 1.0, 4: 1.0})
    assert searched < calibration_nll({3: 0.0, 4: 0.0})
    curve = plan.provenance["search_curves"]["4"]
    assert len(curve) == 11 and min(p for _, p in curve) == pytest.approx(dict(curve)[alphas[4]])
    pruned = apply_plan(AutoModelForCausalLM.from_pretrained(STORIES).eval(), plan)
    out = save_pruned(pruned, plan, tmp_path / "harp", tokenizer=tok)
    reloaded = load_pruned(out)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, atol=0, rtol=0)
    text = tok.decode(reloaded.generate(ids, max_new_tokens=12, do_sample=False)[0], skip_special_tokens=True)
    assert len(text) > len("Once upon a time")


def test_harp_with_flap_mlp_pruning(stories):
    model, tok = stories
    calib = load_calibration(str(TINYSTORIES_TEXT), tok, num_samples=8, max_length=64, seed=0)
    plan = harp_plan(model, calib, num_layers=2, alphas={4: 0.5, 3: 0.2}, flap_ratio=0.1, progress=False)
    assert plan.layers[4].attention == {"mode": "value", "alpha": 0.5}
    assert any(lp.neurons is not None for lp in plan.layers)
    assert all(lp.heads is None for lp in plan.layers)
    pruned = apply_plan(AutoModelForCausalLM.from_pretrained(STORIES).eval(), plan)
    assert pruned.num_parameters() < model.num_parameters()
