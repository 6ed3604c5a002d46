"""Export a (pruned) model as one self-contained GGUF file that llama.cpp serves.

Which llama.cpp architecture carries which form (read from llama.cpp's loader and graphs, in the
llama.cpp that llama-cpp-python 0.3.36 vendors: src/models/<arch>.cpp; the rules are in
secateurs.export.gguf_arch):

* every layer of one shape, no HARP layer: the family's own architecture, scalar head counts and
  FFN width: llama (llama, mistral), qwen2 and phi3 (when heads x head_dim = hidden: their
  attention is square), qwen3, gemma2, phi2 (phi; square attention);
* anything per-layer (different widths, HARP layers, FLAP's biases where the family's own
  architecture has no slot for them, a uniform qwen2 / phi3 whose attention is no longer square):
  `deci`, with per-layer arrays `head_count`, `head_count_kv`, `feed_forward_length`. A HARP layer
  is deci's "linear attention" (head_count > 0, head_count_kv = 0: only attn_norm and a hidden x
  hidden attn_output, alpha folded in); HARP with alpha = 0 is an attention-free layer (head_count
  0). Neither holds KV cache. A removed MLP is a feed-forward block of ZERO_FFN_WIDTH neuron whose
  gate, up and down weights are zeros (and an ffn_norm of ones): it adds exactly 0 to the residual.
  deci's own FFN-free form (feed_forward_length 0) cannot carry it: llama.cpp's deci graph then skips
  the rest of the layer, residual update included, so the layer's attention output would be dropped.

Phi-3 is llama's layer with fused qkv_proj and gate_up_proj (rotate-half rope over the whole head,
RMSNorm, SiLU gate, 1/sqrt(head_dim)). Square uniform phi3 goes out as llama.cpp's phi3 (fused
[gate; up] as its ffn_up; its NEOX rope also rotates part of a head, partial_rotary_factor < 1,
where llama's and deci's loaders reject n_rot != head size); phi3's loader sizes wq and wo
hidden x hidden and loads no biases, so every other shape splits the fused matrices into deci's
q/k/v and gate/up (the same layer, tested to 1e-7).
Gemma 2 goes out as gemma2 (norm weights + 1 as its converter writes them, soft-capping, post-norms,
one sliding-window flag per layer from config.layer_types, query_pre_attn_scalar folded into Q);
phi as phi2 (LayerNorm, parallel block, partial rotary, biases, LM head bias).
Gemma 3 (and the language model of a multimodal Gemma 3) goes out as gemma3: Gemma 2's layer without
soft-capping, with q/k norms (+ 1 like the other norms); llama.cpp scales scores by 1/sqrt(head size)
after Q's rows are RMS-normalised, so query_pre_attn_scalar is folded into q_norm's weight; one
sliding-window flag per layer and the sliding layers' RoPE base (rope.freq_base_swa).

What llama.cpp cannot hold is refused before anything is written, with the reason: deci's linear
attention has no bias (a HARP layer of a model with v/o biases), llama.cpp derives the head size
from layer 0 (a HARP-removed layer 0), qwen3's per-head q/k norms exist only in its own
architecture (per-layer qwen3), per-layer gemma2 and phi (their own architectures size every layer
from layer 0's head count and FFN width, and deci is llama's layer: no soft-capping, post-norms,
LayerNorm or parallel block), per-layer partial rotary (deci rotates whole heads), longrope (llama.cpp
picks long or short factors once per context size, transformers per sequence length), an untied
gemma2 LM head (gemma2 reads only token_embd), and activations a graph does not compute.

llama and deci apply rotary to interleaved pairs, Hugging Face to halves: Q and K rows (and
biases) are permuted per head as llama.cpp's converter does (`LlamaModel.permute`). gemma2 and phi2
compute GELU on CPU through a float16 table (ggml-cpu/vec.h, GGML_GELU_FP16), so their f32 files
match transformers to about 5e-4 of the largest logit rather than 1e-7.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from secateurs.adapters import get_adapter
from secateurs.adapters.removed_mlp import is_removed_mlp
from secateurs.adapters.value_attention import RemovedAttention, ValueOnlyAttention
from secateurs.errors import SecateursError, UnsupportedModelError
from secateurs.export.gguf_arch import (
    LAYER_NORMS,
    RULES,
    ArchitectureRules,
    LayerForm,
    T,
    head_dim,
    rope_parameters,
    rotary_dims,
    unsupported,
)
from secateurs.export.gguf_vocab import add_tokenizer
from secateurs.export.settings import ExportSettings
from secateurs.files.output import check_finite, check_output_file, writing_file
from secateurs.runtime.progress import phase
from secateurs.storage.loading import load_model
from secateurs.version import __version__

OUTTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_MATRIX_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                 "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}


def export_gguf(model, out: str | os.PathLike, outtype: str | None = None, tokenizer=None, force: bool = False,
                inputs=(), *, settings: ExportSettings | None = None) -> Path:
    """Write `model` (a model in memory, or anything secateurs.storage.loading.load_model takes: a pruned
    folder, HF folder, .gguf or alias) as a GGUF file at `out`; returns its path. `tokenizer`: a
    fast tokenizer or a folder holding tokenizer.json (default: the model's own).

    The file is built beside `out` and renamed into place (secateurs.files.output), so `out` holds either
    the old file or the complete new one; an existing file is replaced only with force. `settings`
    (ExportSettings) or `outtype` (default f32) choose the weights' encoding."""
    outtype = ExportSettings.of(settings, outtype=outtype).outtype
    sources = [*inputs]
    if isinstance(model, (str, os.PathLike)):
        sources.append(model)
    target = check_gguf_output(out, force, sources)
    if isinstance(model, (str, os.PathLike)):
        folder = Path(model).expanduser()
        model, loaded = load_model(str(model), dtype=torch.float32)
        if tokenizer is None:  # the folder's own tokenizer files, as saved, when it has them
            tokenizer = folder if (folder / "tokenizer.json").is_file() else loaded
    arch, layers = plan_export(model)
    with phase(f"writing {arch} GGUF ({outtype}) to {target}"), torch.no_grad():
        check_finite(model.state_dict(), "the model")
        _write(model, tokenizer, arch, layers, outtype, target)
    return target


WRITER_KEY = "secateurs.writer"  # metadata of every GGUF secateurs writes ("secateurs VERSION"); llama.cpp ignores it


def check_gguf_output(out, force: bool, inputs) -> Path:
    """The output rules of secateurs.files.output for a .gguf file: an existing file is replaced only with
    force and only when secateurs wrote it (its WRITER_KEY metadata); any other file is left alone."""
    return check_output_file(out, inputs, suffixes=(".gguf",), what="GGUF output", force=force,
                             kind="gguf", replaceable=written_gguf)


def written_gguf(path: Path) -> bool:
    """True for a GGUF file secateurs wrote (read through gguf's reader: header and metadata only)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                return False
        field = gguf.GGUFReader(path, "r").get_field(WRITER_KEY)
        return field is not None and str(field.contents()).startswith("secateurs")
    except Exception:  # noqa: BLE001 - any file gguf cannot read is not ours
        return False


def plan_export(model) -> tuple[str, list[LayerForm]]:
    """(llama.cpp architecture, per-layer forms) for this model, or a SecateursError saying why
    llama.cpp cannot hold it. Nothing is written here."""
    adapter = get_adapter(model)
    model_type = model.config.model_type
    if not adapter.gguf_architectures:
        raise UnsupportedModelError(f"GGUF export of {model_type!r} is not implemented (exported: "
                                    "llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3, phi)")
    hidden = model.config.get_text_config().hidden_size
    layers = [_layer_form(adapter, layer, hidden) for layer in adapter.decoder_layers(model)]
    own = adapter.gguf_architectures.get(model_type)
    uniform = len({(f.heads, f.kv_heads, f.ffn) for f in layers}) == 1 and not any(f.harp or f.mlp for f in layers)
    reasons = []
    if own and uniform:
        problem = unsupported(RULES[own], model, layers)
        if problem is None:
            return own, layers
        reasons.append(f"{own}: {problem}")
    elif own:
        reasons.append(f"{own}: its layers differ (widths, HARP layers or removed MLPs), and {own} reads one shape "
                       "for all layers")
    if model_type in adapter.gguf_per_layer_types:
        problem = unsupported(RULES["deci"], model, layers)
        if problem is None:
            return "deci", layers
        reasons.append(f"deci: {problem}")
    else:
        reasons.append(f"deci: {adapter.gguf_not_deci or f'{model_type} layers cannot be written as deci'}")
    raise SecateursError("llama.cpp cannot hold this model, so no GGUF file is written (" + "; ".join(reasons) + ")")


def _layer_form(adapter, layer, hidden: int) -> LayerForm:
    """Widths and tensors of one layer, in Hugging Face layout (row = output feature)."""
    attn = adapter.attention(layer)
    shape = adapter.layer_shape(layer)
    if isinstance(attn, RemovedAttention):
        form = LayerForm(0, 0, shape.intermediate_size, harp="removed")
    elif isinstance(attn, ValueOnlyAttention):
        form = LayerForm(shape.num_heads, 0, shape.intermediate_size, harp="value")
        _put(form, T.ATTN_OUT, attn.fused.weight, attn.fused.bias)
    else:
        w = adapter.attention_weights(layer)
        form = LayerForm(shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
        for kind, weight, bias in ((T.ATTN_Q, w.q, w.q_bias), (T.ATTN_K, w.k, w.k_bias), (T.ATTN_V, w.v, w.v_bias),
                                   (T.ATTN_OUT, w.o, w.o_bias)):
            _put(form, kind, weight, bias)
        for kind, names in ((T.ATTN_Q_NORM, ("q_norm", "q_layernorm")), (T.ATTN_K_NORM, ("k_norm", "k_layernorm"))):
            norm = next((getattr(attn, n) for n in names if getattr(attn, n, None) is not None), None)
            if getattr(norm, "weight", None) is not None:
                _put(form, kind, norm.weight, getattr(norm, "bias", None))
    for key, name in adapter.gguf_norms.items():  # a norm HARP dropped with its attention is an Identity
        norm = getattr(layer, name)
        if getattr(norm, "weight", None) is not None:
            _put(form, T[key.upper()], norm.weight, getattr(norm, "bias", None))
    if is_removed_mlp(adapter.mlp(layer)):
        _put_zero_ffn(form, hidden)
        return form
    mlp = adapter.mlp_weights(layer)
    for kind, (weight, bias) in zip((T.FFN_GATE, T.FFN_UP) if len(mlp.inputs) == 2 else (T.FFN_UP,), mlp.inputs):
        _put(form, kind, weight, bias)
    _put(form, T.FFN_DOWN, mlp.out, mlp.out_bias)
    return form


ZERO_FFN_WIDTH = 1  # neurons of the zero feed-forward block a removed MLP is written as


def _put_zero_ffn(form: LayerForm, hidden: int) -> None:
    """A removed MLP as deci computes it exactly: ffn_norm of ones (llama.cpp loads one wherever a layer has an
    FFN), then gate, up and down of zeros: down(silu(0 x) * 0 x) = 0 for any finite x."""
    form.ffn, form.mlp = ZERO_FFN_WIDTH, "removed"
    _put(form, T.FFN_NORM, torch.ones(hidden), None)
    for kind, shape in ((T.FFN_GATE, (ZERO_FFN_WIDTH, hidden)), (T.FFN_UP, (ZERO_FFN_WIDTH, hidden)),
                        (T.FFN_DOWN, (hidden, ZERO_FFN_WIDTH))):
        _put(form, kind, torch.zeros(shape), None)


def _put(form: LayerForm, kind: T, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    form.tensors[(kind, "weight")] = weight
    if bias is not None:
        form.tensors[(kind, "bias")] = bias


def _interleave_rope_pairs(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half layout -> llama.cpp's interleaved pairs, per head (rows, and
    1-D biases alike), as llama.cpp's converter permutes Q and K (LlamaModel.permute)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _write(model, tokenizer, arch: str, layers: list[LayerForm], outtype: str, target: Path) -> None:
    logging.getLogger("gguf").setLevel(logging.WARNING)
    per_weight = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}[outtype]  # q8_0: 32 weights in 34 bytes
    size = int(sum(p.numel() for p in model.parameters()) * per_weight)
    with writing_file(target, expected_bytes=size) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_string(WRITER_KEY, f"secateurs {__version__}")
        _add_metadata(writer, model, RULES[arch], layers, outtype)
        name = Path(str(getattr(model.config, "_name_or_path", "") or "model")).name[:200] or "model"
        add_tokenizer(writer, tokenizer, model.config.get_text_config().vocab_size, name)
        _add_tensors(writer, model, RULES[arch], layers, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _add_metadata(writer: gguf.GGUFWriter, model, rules: ArchitectureRules, layers: list[LayerForm],
                  outtype: str) -> None:
    """Hyperparameters: widths (per layer for deci), rope, norms, soft-capping, sliding windows."""
    config, adapter = model.config.get_text_config(), get_adapter(model)
    rope = rope_parameters(config)
    window = adapter.sliding_window(config)
    context = int(config.max_position_embeddings)
    if window and not rules.sliding_window:
        context = min(context, int(window))  # llama.cpp attends fully: exact up to the window
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length([f.ffn for f in layers] if rules.per_layer else layers[0].ffn)
    writer.add_head_count([f.heads for f in layers] if rules.per_layer else layers[0].heads)
    writer.add_head_count_kv([f.kv_heads for f in layers] if rules.per_layer else layers[0].kv_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(rotary_dims(config))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rules.local_rope:  # gemma3: sliding layers rotate with their own base
        writer.add_rope_freq_base_swa(float(rope_parameters(config, "sliding_attention").get("rope_theta", 10000.0)))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if rules.layer_norm:
        writer.add_layer_norm_eps(float(config.layer_norm_eps))
    else:
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if rules.soft_capping:
        attention_cap, final_cap = adapter.soft_caps(config)
        writer.add_attn_logit_softcapping(float(attention_cap))
        writer.add_final_logit_softcapping(float(final_cap))
    if rules.sliding_window:  # one flag per layer; without a window no layer slides (gemma2's default slides)
        if window:
            writer.add_sliding_window(int(window))
        types = getattr(config, "layer_types", None) or ["full_attention"] * len(layers)
        writer.add_sliding_window_pattern([bool(window) and t == "sliding_attention" for t in types])
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(OUTTYPES[outtype])
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tensors(writer: gguf.GGUFWriter, model, rules: ArchitectureRules, layers: list[LayerForm],
                 outtype: str) -> None:
    """Embeddings, final norm, LM head, rope factors, then every layer's tensors."""
    adapter = get_adapter(model)
    config = model.config.get_text_config()
    offset = adapter.gguf_norm_offset
    embed, head, norm = model.get_input_embeddings(), model.get_output_embeddings(), adapter.final_norm(model)
    _add(writer, _name(T.TOKEN_EMBD), embed.weight, outtype)
    _add(writer, _name(T.OUTPUT_NORM), norm.weight + offset, outtype)
    if getattr(norm, "bias", None) is not None:
        _add(writer, _name(T.OUTPUT_NORM, part="bias"), norm.bias, outtype)
    if rules.output == "always" or (rules.output == "untied" and head.weight.data_ptr() != embed.weight.data_ptr()):
        _add(writer, _name(T.OUTPUT), head.weight, outtype)  # tied: llama.cpp reuses token_embd
    if getattr(head, "bias", None) is not None:
        _add(writer, _name(T.OUTPUT, part="bias"), head.bias, outtype)
    if rope_parameters(config)["rope_type"] == "llama3":
        _add(writer, _name(T.ROPE_FREQS), _llama3_rope_factors(rope_parameters(config), head_dim(config)), "f32")
    q_scale = (rules.query_scale(config, len(layers), layers[0].heads,
                                 adapter.attention_score_scale(adapter.decoder_layers(model)[0]))
               if rules.query_scale else 1.0)
    for i, form in enumerate(layers):
        for (kind, part), tensor in _layer_tensors(rules, form, q_scale, offset):
            _add(writer, _name(kind, i, part), tensor, outtype)


def _layer_tensors(rules: ArchitectureRules, form: LayerForm, q_scale: float, norm_offset: float):
    """(kind, part) and tensor of one layer as the architecture reads them: [gate; up] fused where
    it reads them fused, norm weights offset (Gemma's 1 + w), Q scaled, Q/K rows permuted for
    interleaved rope."""
    tensors = dict(form.tensors)
    if rules.fused_gate_up:
        tensors[(T.FFN_UP, "weight")] = torch.cat([tensors.pop((T.FFN_GATE, "weight")), tensors[(T.FFN_UP, "weight")]])
    for (kind, part), tensor in tensors.items():
        if kind in (*LAYER_NORMS, T.ATTN_Q_NORM, T.ATTN_K_NORM) and part == "weight":
            tensor = tensor + norm_offset
        if form.harp is None and kind == rules.query_scale_tensor and q_scale != 1.0:
            tensor = tensor * q_scale
        if form.harp is None and rules.rope_pairs_interleaved and kind in (T.ATTN_Q, T.ATTN_K):
            tensor = _interleave_rope_pairs(tensor, form.heads if kind == T.ATTN_Q else form.kv_heads)
        yield (kind, part), tensor


def _name(kind: T, block: int | None = None, part: str = "weight") -> str:
    return f"{gguf.TENSOR_NAMES[kind].format(bid=block)}.{part}"


def _add(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, outtype: str) -> None:
    """One tensor in `outtype`; 1-D tensors (norms, biases) stay float32 as llama.cpp's converter
    keeps them, and q8_0 falls back to f16 for a matrix whose rows are not whole 32-value blocks."""
    data = tensor.detach().to(torch.float32).cpu().numpy()
    qtype = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else _MATRIX_TYPES[outtype]
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, np.ascontiguousarray(data))
        return
    if qtype == gguf.GGMLQuantizationType.F16:
        encoded = data.astype(np.float16)
        if not np.isfinite(encoded).all():
            raise SecateursError(f"{name} has values beyond float16's range; export as bf16 or f32")
        writer.add_tensor(name, encoded)
        return
    writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """Llama 3.1's frequency-dependent rope scaling as per-frequency factors (llama.cpp's converter)."""
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)
