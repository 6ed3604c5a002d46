"""HARP: the materialised layer equals the dense layer run with an identity attention matrix and
its output scaled by alpha; alpha = 0 removal and Gemma 2's norm folding are exact; the search
beats alpha = 1 and alpha = 0 on the real model; save -> load_pruned -> identical; generate works.
Wherever HARP layers sit (layer 0, the first layer of each attention kind, the last layer, every
layer), cached decoding through dynamic and static caches equals the uncached model and greedy
generate equals its token-by-token argmax, while the HARP layers' cache slots hold zero bytes."""

from __future__ import annotations

import copy
import json
from unittest import mock

import pytest
import torch
from conftest import FAMILIES, STORIES, TINYSTORIES_TEXT, input_ids, tiny_model
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

from secateurs.adapters import get_adapter
from secateurs.calibration.data import load_calibration
from secateurs.methods.harp import capture_layer_inputs, harp_plan, tail_nll
from secateurs.planning.accounting import model_stats
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
        # the HARP layers' cache slots count every token (the step extended the same cache) and hold no bytes
        cache = first.past_key_values
        assert all(_held_bytes(cache.layers[i]) == 0 and cache.layers[i].get_seq_length() == 14 for i in ALPHAS)
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


# Gemma 3's local/global layout (the first global layer is not layer 1, the last layer is local)
GEMMA3 = ("gemma3_text", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                              query_pre_attn_scalar=24, tie_word_embeddings=True,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                           "sliding_attention"]))
DECODING_FAMILIES = sorted(FAMILIES) + ["gemma3"]


def _family_model(name: str):
    with mock.patch.dict(FAMILIES, {"gemma3": GEMMA3}):
        return tiny_model(name)


def _held_bytes(slot) -> int:
    return sum(t.untyped_storage().nbytes() for t in (slot.keys, slot.values) if t is not None)


def _placements(model) -> list[int]:
    """Layer 0 (the past length is read there), the first layer of each attention kind the cache holds
    (each kind's mask sizes are read there) and the last layer."""
    sliding = DynamicCache(config=model.config).is_sliding
    return sorted({0, len(sliding) - 1} | {sliding.index(kind) for kind in set(sliding)})


def _cached_logits(model, ids, cache=None):
    """Logits of ids fed through one cache as a 4-token prefill, a 3-token chunk, then one token at a
    time: the tiny sliding window (6) fills and slides during decoding."""
    cuts = [0, 4, 7, *range(8, ids.shape[1] + 1)]
    logits = []
    for start, end in zip(cuts, cuts[1:]):
        out = model(ids[:, start:end], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, 1), cache


def _greedy(model, ids, steps: int):
    """Greedy decoding without a cache: the whole sequence re-run for every new token."""
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def _caches(model) -> dict:
    """The caches decoding may run through: the one the model makes (its config's layer kinds), one made
    without a config (slots appended on first use), a static one and a static one allocated ahead of time."""
    early = StaticCache(config=model.config, max_cache_len=16)
    early.early_initialization(batch_size=2, num_heads=model.config.num_key_value_heads,
                               head_dim=get_adapter(model).head_dim(get_adapter(model).decoder_layers(model)[0]),
                               dtype=model.dtype, device=model.device)
    return {"dynamic": None, "dynamic without config": DynamicCache(),
            "static": StaticCache(config=model.config, max_cache_len=16), "static allocated ahead": early}


@torch.no_grad()
def _assert_decoding_exact(model, harp_layers, where: str):
    ids = input_ids(length=14)
    want = model(ids).logits
    for kind, cache in _caches(model).items():
        got, cache = _cached_logits(model, ids, cache)
        # Gemma 2's eager attention takes its softmax in float32, and a static cache's key axis is longer (masked
        # slots): the dense model's own static-cache logits differ from its uncached ones by about 1e-7
        atol = 1e-6 if model.config.model_type == "gemma2" and "static" in kind else 1e-10
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=lambda m, kind=kind: f"{where}, {kind}: {m}")
        assert int(cache.get_seq_length()) == ids.shape[1], f"{where}, {kind}"
        if kind != "static allocated ahead":  # there transformers allocated every slot before the first token
            assert all(_held_bytes(cache.layers[i]) == 0 for i in harp_layers), f"{where}, {kind}"
    prompt = ids[:, :5]
    expected = _greedy(model, prompt, 9)
    for implementation in (None, "static"):  # no end-of-sequence stop: every step is compared
        out = model.generate(prompt, max_new_tokens=9, do_sample=False, eos_token_id=None, pad_token_id=0,
                             cache_implementation=implementation)
        assert torch.equal(out, expected), f"{where}, generate with cache {implementation or 'default'}"


@pytest.mark.parametrize("mode", ["value", "removed"])
@pytest.mark.parametrize("name", DECODING_FAMILIES)
def test_cached_decoding_is_exact_wherever_the_harp_layer_sits(name, mode):
    model = _family_model(name)
    alpha = 0.0 if mode == "removed" else 0.6
    for index in _placements(model):
        pruned = apply_plan(copy.deepcopy(model), _harp(model, {index: alpha}))
        _assert_decoding_exact(pruned, [index], f"{name}, {mode} layer {index}")


@pytest.mark.parametrize("name", DECODING_FAMILIES)
def test_a_model_without_attention_decodes_exactly_and_holds_no_kv_cache(name):
    model = _family_model(name)
    layers = range(len(get_adapter(model).decoder_layers(model)))
    alphas = {i: 0.0 if i % 2 else 0.6 for i in layers}  # value paths and removed attention alternate
    pruned = apply_plan(copy.deepcopy(model), _harp(model, alphas))
    _assert_decoding_exact(pruned, list(alphas), f"{name}, every layer attention-free")
    assert all(layer.kv_cache_bytes_per_token == 0 for layer in model_stats(pruned).layers)
