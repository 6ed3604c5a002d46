"""GGUF export, checked in a real engine: every pruned form (dense, uniform widths, FLAP's per-layer
widths and biases, removed layers, HARP layers with alpha > 0 and alpha = 0, removed MLPs beside an
attention-free layer) of the llama family, and
the forms phi3, gemma2 and phi go out in, is exported as f32, loaded by llama.cpp (llama-cpp-python)
and must give transformers' next-token logits (load_pruned, float64) to 1e-3 relative on several
prompts and the same 32 greedy tokens; HARP layers hold no KV cache; what llama.cpp cannot hold is
refused with nothing written."""

from __future__ import annotations

import copy
from unittest import mock

import gguf
import numpy as np
import pytest
import torch
from conftest import STORIES, TINYSTORIES_TEXT, padded_calibration, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateurs.calibration.statistics import collect_statistics
from secateurs.cli.main import main
from secateurs.errors import SecateursError
from secateurs.export import OUTTYPES, export_gguf, gguf_export, plan_export
from secateurs.methods import make_plan
from secateurs.planning.geometry import identity_plan
from secateurs.planning.plan import PruningPlan
from secateurs.settings.names import GGUF_OUTTYPES
from secateurs.storage.pruned import load_pruned, save_pruned
from secateurs.surgery.apply import apply_plan

LOG: list[str] = []
_LLAMA: dict = {}  # llama_cpp, its stock model parameters, the log callback (kept: llama.cpp holds its pointer)


def _llama():
    """llama-cpp-python (tests that use it are marked llama_cpp), its log collected in LOG from the first use on."""
    if not _LLAMA:
        import llama_cpp  # noqa: PLC0415 - optional (the serve extra): without it the llama_cpp tests skip

        @llama_cpp.llama_log_callback
        def collect(level, text, data):
            LOG.append(text.decode("utf-8", "replace"))

        llama_cpp.llama_log_set(collect, None)
        _LLAMA.update(module=llama_cpp, callback=collect, default_params=llama_cpp.llama_cpp.llama_model_default_params)
    return _LLAMA["module"]

MODELS = {  # tiny configs share stories260K's 512-token tokenizer so every file carries a real one
    "stories260K": None,
    "llama-gqa": dict(vocab_size=512),
    "llama-bias": dict(vocab_size=512),  # q/k/v/o and MLP biases
    "mistral": dict(vocab_size=512, sliding_window=None),
    "qwen2": dict(vocab_size=512, use_sliding_window=False, sliding_window=None),
    "phi3": dict(vocab_size=512),
    "phi3-partial": dict(family="phi3", vocab_size=512, partial_rotary_factor=0.5),
    # soft-capping, sliding window 6 (the prompts run to 61 tokens), query_pre_attn_scalar != head_dim (as in 27B)
    "gemma2": dict(vocab_size=512, query_pre_attn_scalar=24),
    "phi": dict(vocab_size=512),  # partial rotary, parallel block, LayerNorm, biases everywhere
}
FORMS = ("dense", "uniform", "in-group", "flap", "depth", "harp-value", "harp-removed", "mlp-removed")
# Families with their own llama.cpp architecture: each form run and the architecture it goes out as.
# "mlp": uniform MLP-only pruning (square attention stays square); "depth-1": layer 1 removed, so
# gemma2's sliding layers no longer alternate.
ARCHS = {
    "phi3": {"dense": "phi3", "mlp": "phi3", "depth": "phi3", "uniform": "deci", "flap": "deci",
             "harp-value": "deci", "harp-removed": "deci", "mlp-removed": "deci"},
    "phi3-partial": {"dense": "phi3", "mlp": "phi3"},
    "gemma2": {"dense": "gemma2", "uniform": "gemma2", "mlp": "gemma2", "depth-1": "gemma2"},
    "phi": {"dense": "phi2", "mlp": "phi2", "depth": "phi2"},
}
BUILT = [(name, form) for name in MODELS for form in ARCHS.get(name, FORMS)]
PROMPTS = ([1, 45, 300, 7, 99], list(range(3, 40, 2)), [1] + [(i * 37) % 509 + 3 for i in range(60)])


def _base(name: str):
    if name == "stories260K":
        return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64).eval()
    overrides = dict(MODELS[name])
    return tiny_model(overrides.pop("family", name), **overrides)


def _plan(model, form: str) -> PruningPlan:
    n = model.config.num_hidden_layers
    if form == "mlp":
        return make_plan(model, "magnitude", 0.1, split=0.0, progress=False)
    if form == "mlp-removed":  # the last layer's MLP among them; an attention-free layer between
        plan = identity_plan(model)
        plan.layers[1].mlp = plan.layers[n - 1].mlp = {"mode": "removed"}
        plan.layers[n - 2].attention = {"mode": "removed"}
        return plan
    if form in ("dense", "depth", "depth-1", "harp-value", "harp-removed"):
        plan = identity_plan(model)
        plan.layers[1].removed = form.startswith("depth")
        plan.layers[2].removed = form == "depth"
        if form == "harp-value":
            plan.layers[n - 2].attention = {"mode": "value", "alpha": 0.6}
            plan.layers[n - 1].attention = {"mode": "value", "alpha": 0.3}
        if form == "harp-removed":
            plan.layers[n - 2].attention = plan.layers[n - 1].attention = {"mode": "removed"}
        return plan
    if form in ("uniform", "in-group"):  # whole KV groups, or the same number of heads in every group
        return make_plan(model, "magnitude", 0.3, gqa="groups" if form == "uniform" else "in-group")
    return make_plan(model, "flap", 0.3, statistics=collect_statistics(model, padded_calibration(), progress=False))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """{(model, form): pruned folder written by save_pruned}, built once."""
    root = tmp_path_factory.mktemp("gguf-models")
    made = {}
    for name, form in BUILT:
        model = _base(name)
        plan = _plan(model, form)
        apply_plan(model, plan)
        made[name, form] = save_pruned(model, plan, root / f"{name}-{form}", tokenizer=tokenizer)
    return made


def _plain_weight_buffers():
    """llama.cpp's defaults with its extra weight buffer types (AMX tiles, repacking) off. On CPUs with AMX
    (Sapphire Rapids) llama-cpp-python 0.3.36 segfaults in decode on the tiny test models' q8_0 weights
    in those buffers; what these tests check is our GGUF files, so every engine here uses plain buffers."""
    params = _LLAMA["default_params"]()
    params.use_extra_bufts = False
    return params


def _engine(path, n_ctx: int = 128, **options):
    llama_cpp = _llama()
    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", _plain_weight_buffers):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True,
                               type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False,
                               seed=0, **options)


def _engine_logits(engine, tokens: list[int]) -> np.ndarray:
    engine.reset()
    engine.eval(tokens)
    return np.array(engine.scores[:len(tokens)], dtype=np.float64)


def _engine_greedy(engine, tokens: list[int], steps: int) -> list[int]:
    engine.reset()
    engine.eval(tokens)
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(engine.scores[engine.n_tokens - 1])))
        engine.eval([out[-1]])
    return out


REFUSED = {("qwen2", "harp-value"), ("llama-bias", "harp-value")}  # a bias on HARP's fused path: see the refusals
CASES = [case for case in BUILT if case not in REFUSED]


@pytest.mark.llama_cpp
@pytest.mark.parametrize("name,form", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_llamacpp_matches_transformers(folders, name, form, tmp_path):
    folder = folders[name, form]
    reference = load_pruned(folder).double()
    gguf_file = export_gguf(folder, tmp_path / "model.gguf", "f32")
    arch, _ = plan_export(reference)
    expected_arch = {"dense": {"llama", "qwen2"}, "uniform": {"llama", "deci"}, "in-group": {"llama", "deci"},
                     "depth": {"llama", "qwen2"}}
    assert arch in ({ARCHS[name][form]} if name in ARCHS else expected_arch.get(form, {"deci"}))
    engine = _engine(gguf_file)
    for prompt in PROMPTS:
        with torch.no_grad():
            want = reference(torch.tensor([prompt])).logits[0].numpy()
        got = _engine_logits(engine, prompt)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max(), (prompt, np.abs(got - want).max())
    prompt = PROMPTS[0]
    with torch.no_grad():
        greedy = reference.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                    pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert _engine_greedy(engine, prompt, 32) == greedy


@pytest.mark.llama_cpp
def test_a_searched_architecture_is_served_by_llamacpp_as_transformers_runs_it(tmp_path):
    """`--method search` at a ratio that mixes block kinds across layers: the export matches transformers."""
    out = tmp_path / "search"
    assert main(["prune", str(STORIES), "--method", "search", "--ratio", "0.4", "--scoring-tokens", "128",
                 "--calib", str(TINYSTORIES_TEXT), "--calib-samples", "8", "--calib-length", "64",
                 "--out", str(out)]) == 0
    plan = PruningPlan.load(out)
    chosen = {(r["attention"], r["mlp"]) for r in plan.provenance["choice"]["layers"]}
    assert len(chosen) > 1, chosen  # layers differ: a per-layer architecture, not one shape
    reference = load_pruned(out).double()
    engine = _engine(export_gguf(out, tmp_path / "model.gguf", "f32"))
    for prompt in PROMPTS:
        with torch.no_grad():
            want = reference(torch.tensor([prompt])).logits[0].numpy()
        got = _engine_logits(engine, prompt)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max(), (prompt, np.abs(got - want).max())


class _GgmlCpuGelu(torch.nn.Module):
    """GELU (tanh) as llama.cpp computes it on CPU: the input rounded to float16 and looked up in a
    float16 table (ggml-cpu/vec.h, GGML_GELU_FP16), identity from 10 and zero below -10."""

    def forward(self, x):
        table = torch.nn.functional.gelu(x.half().double(), approximate="tanh").half().to(x.dtype)
        return torch.where(x >= 10, x, torch.where(x <= -10, torch.zeros_like(x), table))


@pytest.mark.llama_cpp
def test_gemma2_with_46_layers_scales_queries_as_27b(tokenizer, tmp_path):
    """llama.cpp's gemma2 takes a 46-layer model for Gemma 2 27B and scales Q by 1/sqrt(hidden // heads)
    instead of 1/sqrt(head size); the export folds query_pre_attn_scalar against that (unfolded:
    6e-2 to 7e-2 off). 46 layers of float16 GELU drift 1.3e-3 from transformers, so the reference computes
    GELU as llama.cpp does."""
    model = tiny_model("gemma2", vocab_size=512, num_hidden_layers=46, query_pre_attn_scalar=24)
    engine = _engine(export_gguf(model, tmp_path / "g46.gguf", tokenizer=tokenizer))
    for layer in model.model.layers:
        layer.mlp.act_fn = _GgmlCpuGelu()
    for prompt in PROMPTS:
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0].numpy()
        got = _engine_logits(engine, prompt)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max(), (prompt, np.abs(got - want).max())


def _kv_cache_mib(path) -> float:
    """The KV cache size llama.cpp reports when it allocates a 4096-cell cache (flash attention
    on, as llama-cli's default on CPU: every layer's cache has its own width)."""
    LOG.clear()
    _engine(path, n_ctx=4096, flash_attn=True)
    line = next(t for t in LOG if "llama_kv_cache: size =" in t)
    return float(line.split("size =")[1].split("MiB")[0])


@pytest.mark.llama_cpp
def test_harp_layers_hold_no_kv_cache(folders, tmp_path):
    """2 HARP layers of 5 (alpha > 0, alpha = 0): the KV cache shrinks by exactly 2/5."""
    dense = _kv_cache_mib(export_gguf(folders["stories260K", "dense"], tmp_path / "dense.gguf"))
    assert dense == 5 * 4096 * 2 * 4 * 8 * 4 / 2**20  # layers x cells x (K, V) x KV heads x head dim x f32
    for form in ("harp-value", "harp-removed"):
        assert _kv_cache_mib(export_gguf(folders["stories260K", form], tmp_path / f"{form}.gguf")) == dense * 3 / 5


@pytest.mark.llama_cpp
def test_a_removed_mlp_is_a_zero_feed_forward_block(folders, tmp_path):
    """deci's own FFN-free layer (feed_forward_length 0) skips the rest of the layer, its attention's residual
    update included (and aborts llama.cpp when it is the last layer), so a removed MLP goes out as one neuron of
    zero weights: exact in f32, and in q8_0 (its one-column down matrix stays f16) as close as the rest."""
    path = export_gguf(folders["stories260K", "mlp-removed"], tmp_path / "f32.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.get_field("deci.feed_forward_length").contents() == [172, 1, 172, 172, 1]
    assert reader.get_field("deci.attention.head_count").contents()[3] == 0
    tensors = {t.name: t for t in reader.tensors}
    for block in (1, 4):
        assert tensors[f"blk.{block}.ffn_down.weight"].data.shape == (64, 1)
        assert not np.any(tensors[f"blk.{block}.ffn_gate.weight"].data)
        assert not np.any(tensors[f"blk.{block}.ffn_down.weight"].data)
    reference = _engine_logits(_engine(path), PROMPTS[2])
    quantised = export_gguf(folders["stories260K", "mlp-removed"], tmp_path / "q8_0.gguf", "q8_0")
    got = _engine_logits(_engine(quantised), PROMPTS[2])
    assert np.abs(got - reference).max() <= 3e-2 * np.abs(reference).max()
    # a HARP value path and a removed MLP in one layer: deci's linear attention, then the zero block
    model = _base("stories260K")
    plan = identity_plan(model)
    plan.layers[2].attention, plan.layers[2].mlp = {"mode": "value", "alpha": 0.5}, {"mode": "removed"}
    apply_plan(model, plan)
    engine = _engine(export_gguf(model, tmp_path / "harp-mlp.gguf", tokenizer=folders["stories260K", "dense"]))
    for prompt in PROMPTS:
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0].numpy()
        got = _engine_logits(engine, prompt)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


@pytest.mark.llama_cpp
def test_quantised_outputs_load_and_stay_close(folders, tmp_path):
    folder = folders["stories260K", "flap"]
    reference = _engine_logits(_engine(export_gguf(folder, tmp_path / "f32.gguf")), PROMPTS[2])
    sizes = {}
    for outtype, tolerance in (("f16", 5e-3), ("bf16", 3e-2), ("q8_0", 3e-2)):
        path = export_gguf(folder, tmp_path / f"{outtype}.gguf", outtype)
        sizes[outtype] = path.stat().st_size
        got = _engine_logits(_engine(path), PROMPTS[2])
        assert np.abs(got - reference).max() <= tolerance * np.abs(reference).max(), outtype
        assert (got.argmax(-1) == reference.argmax(-1)).mean() >= 0.9, outtype
    assert sizes["q8_0"] < sizes["f16"] == sizes["bf16"] < (tmp_path / "f32.gguf").stat().st_size
    assert set(OUTTYPES) == set(GGUF_OUTTYPES)


@pytest.mark.llama_cpp
def test_tokenizer_chat_and_special_tokens_travel_in_the_file(folders, tokenizer, tmp_path):
    engine = _engine(export_gguf(folders["stories260K", "harp-removed"], tmp_path / "m.gguf"))
    lines = [line for line in TINYSTORIES_TEXT.read_text().splitlines() if line.strip()][:40]
    for text in lines + ["Lily and Tom went to the park!\nThey played.  Twice\t(tabs)"]:
        assert engine.tokenize(text.encode()) == tokenizer(text)["input_ids"], text
    assert engine.token_bos() == tokenizer.bos_token_id and engine.token_eos() == tokenizer.eos_token_id
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    path = export_gguf(load_pruned(folders["stories260K", "flap"]), tmp_path / "chat.gguf", tokenizer=chat)
    assert _engine(path).metadata["tokenizer.chat_template"] == chat.chat_template
    assert engine.detokenize(tokenizer(" The cat sat.")["input_ids"][1:]).decode().strip() == "The cat sat."


def test_cli_export(folders, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["export", str(folders["llama-gqa", "flap"]), "--outtype", "q8_0", "--out", str(out), "--quiet"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and "wrote" in capsys.readouterr().out
    assert main(["export", str(folders["llama-gqa", "flap"]), "--out", str(out), "--quiet"]) == 2  # exists
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(folders["llama-gqa", "flap"]), "--out", str(out), "--force", "--quiet"]) == 0
    assert main(["export", str(folders["llama-gqa", "flap"]), "--out", str(tmp_path / "x.bin"), "--quiet"]) == 2
    assert main(["export", str(folders["llama-gqa", "flap"]), "--outtype", "q4_k", "--out", str(out)]) == 2
    inside = folders["llama-gqa", "flap"] / "m.gguf"  # beside a model secateurs wrote: allowed, input untouched
    assert main(["export", str(folders["llama-gqa", "flap"]), "--out", str(inside), "--quiet"]) == 0
    inside.unlink()
    assert not list(tmp_path.glob(".*tmp*"))


def _refused(model, out, match, tokenizer=None):
    with pytest.raises(SecateursError, match=match):
        export_gguf(model, out, tokenizer=tokenizer)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_refusals_write_nothing(folders, tokenizer, tmp_path):
    out = tmp_path / "refused.gguf"
    # a HARP layer whose fused value/output path has a bias (qwen2's v bias): deci's linear attention has none
    model = _base("qwen2")
    apply_plan(model, _plan(model, "harp-value"))
    _refused(model, out, "HARP layer .* bias", tokenizer)
    # per-layer qwen3 (per-head q/k norms have no slot in deci); uniform qwen3 goes out as qwen3
    model = tiny_model("qwen3", vocab_size=512)
    assert plan_export(model)[0] == "qwen3"
    apply_plan(model, _plan(model, "harp-removed"))
    _refused(model, out, "qwen3", tokenizer)
    # per-layer gemma2 and phi: their own architectures read one width for all layers, deci is llama's layer
    for name, form in (("gemma2", "flap"), ("gemma2", "harp-removed"), ("phi", "flap"), ("phi", "harp-value"),
                       ("gemma2", "mlp-removed"), ("phi", "mlp-removed")):
        model = _base(name)
        apply_plan(model, _plan(model, form))
        _refused(model, out, "sizes every layer from layer 0", tokenizer)
    # uniform phi with fewer heads: phi2's attention is square; per-layer partial rotary: deci rotates whole heads
    for name, match in (("phi", "phi2: layer 0: .* heads x 8 != hidden size 32"), ("phi3-partial", "partial rotary")):
        model = _base(name)
        apply_plan(model, _plan(model, "uniform"))
        _refused(model, out, match, tokenizer)
    # what the architectures cannot compute
    longrope = dict(rope_type="longrope", short_factor=[1.0] * 2, long_factor=[2.0] * 2,
                    original_max_position_embeddings=64)
    for name, overrides, match in (
            ("phi3", dict(rope_scaling=longrope), "longrope.* once per context size"),
            ("gemma2", dict(tie_word_embeddings=False), "not tied to the embeddings"),
            ("gemma2", dict(final_logit_softcapping=None), "always applies both"),
            ("gemma2", dict(hidden_activation="gelu"), "hidden activation 'gelu'"),
            ("phi", dict(qk_layernorm=True), "per-head q/k norms")):
        _refused(tiny_model(name, vocab_size=512, **overrides), out, match, tokenizer)
    # no tokenizer: the file would not be self-contained
    _refused(tiny_model("llama-gqa", vocab_size=512), out, "no tokenizer")
    # a model whose layer 0 has no attention: llama.cpp takes the head size from layer 0
    model = tiny_model("llama-gqa", vocab_size=512)
    plan = identity_plan(model)
    plan.layers[0].attention = {"mode": "removed"}
    apply_plan(model, plan)
    _refused(model, out, "layer 0", tokenizer)
    # a non-finite weight
    model = tiny_model("llama-gqa", vocab_size=512)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    _refused(model, out, "NaN", tokenizer)
    # an existing non-GGUF file is never replaced, even with force
    victim = tmp_path / "victim.gguf"
    victim.write_text("not a model")
    with pytest.raises(SecateursError, match="not a secateurs gguf file"):
        export_gguf(folders["stories260K", "dense"], victim, force=True)
    assert victim.read_text() == "not a model"


def test_a_failure_while_writing_leaves_the_old_file(folders, tmp_path, monkeypatch):
    out = export_gguf(folders["stories260K", "dense"], tmp_path / "m.gguf")
    before = out.read_bytes()
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = gguf_export._add
    monkeypatch.setattr(gguf_export, "_add", failing)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(folders["stories260K", "flap"], out, force=True)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
