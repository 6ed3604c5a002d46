"""Export a (pruned) model as one self-contained GGUF file that llama.cpp serves.

Which llama.cpp architecture carries which form (read from llama.cpp's loader and graphs, in the
llama.cpp that llama-cpp-python 0.3.36 vendors: src/models/{llama,deci,qwen2,qwen3}.cpp):

* every layer of one shape, no HARP layer: the family's own architecture (llama for llama and
  mistral, qwen2, qwen3), scalar head counts and FFN width;
* anything per-layer (different widths, HARP layers, FLAP's biases where the family's own
  architecture has no slot for them): `deci`, with per-layer arrays `head_count`, `head_count_kv`,
  `feed_forward_length`. A HARP layer is deci's "linear attention" (head_count > 0,
  head_count_kv = 0: only attn_norm and a hidden x hidden attn_output, alpha folded in); HARP
  with alpha = 0 is an attention-free layer (head_count 0). Neither holds KV cache.

What llama.cpp cannot hold is refused before anything is written: deci's linear attention has no
bias (a HARP layer of a model with v/o biases), llama.cpp derives the head size from layer 0 (a
HARP-removed layer 0), qwen3's per-head q/k norms exist only in its own architecture (per-layer
qwen3), and families without a llama.cpp mapping here (gemma2, phi, phi3).

llama and deci apply rotary to interleaved pairs, Hugging Face to halves: Q and K rows (and
biases) are permuted per head as llama.cpp's converter does (`LlamaModel.permute`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from secateurs.adapters import get_adapter
from secateurs.errors import OutputExistsError, SecateursError, UnsupportedModelError
from secateurs.export.gguf_vocab import add_tokenizer
from secateurs.output import check_finite, check_output_file, writing_file
from secateurs.progress import phase
from secateurs.value_attention import RemovedAttention, ValueOnlyAttention

OUTTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_MATRIX_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                 "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class ArchitectureRules:
    """What one llama.cpp architecture's loader and graph accept."""

    rope_pairs_interleaved: bool            # LLAMA_ROPE_TYPE_NORM: Q/K rows need the converter's permutation
    biases: frozenset[T]                   # tensors whose optional .bias the loader reads
    per_layer: bool = False                 # reads head counts and FFN widths per layer
    full_width_attention: bool = False      # wq/wo are hidden x hidden: heads * head_dim must equal hidden
    qk_norm: bool = False                   # per-head q/k RMS norms (qwen3)


_LLAMA_BIASES = frozenset({T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN})
RULES = {
    "llama": ArchitectureRules(True, _LLAMA_BIASES),
    "deci": ArchitectureRules(True, _LLAMA_BIASES, per_layer=True),
    "qwen2": ArchitectureRules(False, frozenset({T.ATTN_Q, T.ATTN_K, T.ATTN_V}), full_width_attention=True),
    "qwen3": ArchitectureRules(False, frozenset(), qk_norm=True),
}


@dataclass
class LayerForm:
    """One decoder layer as llama.cpp sees it: widths and tensors keyed (kind, 'weight'|'bias')."""

    heads: int
    kv_heads: int
    ffn: int
    harp: str | None = None  # 'value' | 'removed'
    tensors: dict[tuple[T, str], torch.Tensor] = field(default_factory=dict)


def export_gguf(model, out: str | os.PathLike, outtype: str = "f32", tokenizer=None, force: bool = False,
                inputs=()) -> Path:
    """Write `model` (a model in memory, or anything secateurs.loading.load_model takes: a pruned
    folder, HF folder, .gguf or alias) as a GGUF file at `out`; returns its path. `tokenizer`: a
    fast tokenizer or a folder holding tokenizer.json (default: the model's own).

    The file is built beside `out` and renamed into place (secateurs.output), so `out` holds either
    the old file or the complete new one; an existing file is replaced only with force."""
    if outtype not in OUTTYPES:
        raise SecateursError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    sources = [*inputs]
    if isinstance(model, (str, os.PathLike)):
        sources.append(model)
    target = check_gguf_output(out, force, sources)
    if isinstance(model, (str, os.PathLike)):
        from secateurs.loading import load_model

        folder = Path(model).expanduser()
        model, loaded = load_model(str(model), dtype=torch.float32)
        if tokenizer is None:  # the folder's own tokenizer files, as saved, when it has them
            tokenizer = folder if (folder / "tokenizer.json").is_file() else loaded
    arch, layers = plan_export(model)
    with phase(f"writing {arch} GGUF ({outtype}) to {target}"), torch.no_grad():
        check_finite(model.state_dict(), "the model")
        _write(model, tokenizer, arch, layers, outtype, target)
    return target


def check_gguf_output(out, force: bool, inputs) -> Path:
    """The output rules of secateurs.output for a .gguf file; an existing file is replaced only with
    force and only when it is a GGUF file (anything else named .gguf is left alone)."""
    target = check_output_file(out, inputs, suffixes=(".gguf",), what="GGUF output")
    if target.exists():
        if not force:
            raise OutputExistsError(f"{target} exists; pass --force (force=True) to replace it")
        with open(target, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise OutputExistsError(f"{target} exists and is not a GGUF file; it is not replaced, even with force")
    return target


def plan_export(model) -> tuple[str, list[LayerForm]]:
    """(llama.cpp architecture, per-layer forms) for this model, or a SecateursError saying why
    llama.cpp cannot hold it. Nothing is written here."""
    adapter = get_adapter(model)
    config = model.config
    model_type = config.model_type
    if not adapter.gguf_architectures:
        raise UnsupportedModelError(f"GGUF export of {model_type!r} is not implemented (exported: "
                                    "llama, mistral, qwen2, qwen3)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise SecateursError(f"hidden_act {config.hidden_act!r}: llama.cpp's llama-family graphs use SiLU")
    if _rope_parameters(config)["rope_type"] not in ("default", "linear", "llama3"):
        raise SecateursError(f"rope type {_rope_parameters(config)['rope_type']!r} is not exported (default, linear "
                             "and llama3 are)")
    if float(getattr(config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise SecateursError("partial rotary embeddings are not exported")
    layers = [_layer_form(adapter, layer) for layer in adapter.decoder_layers(model)]
    own = adapter.gguf_architectures.get(model_type)
    uniform = len({(f.heads, f.kv_heads, f.ffn) for f in layers}) == 1 and not any(f.harp for f in layers)
    reasons = []
    if own and uniform:
        problem = _unsupported(RULES[own], layers, config)
        if problem is None:
            return own, layers
        reasons.append(f"{own}: {problem}")
    elif own:
        reasons.append(f"{own}: its layers differ (widths or HARP layers) and {own} holds one shape")
    if model_type in adapter.gguf_per_layer_types:
        problem = _unsupported(RULES["deci"], layers, config)
        if problem is None:
            return "deci", layers
        reasons.append(f"deci: {problem}")
    else:
        reasons.append(f"deci: {model_type} layers cannot be written as deci")
    raise SecateursError("llama.cpp cannot hold this model, so no GGUF file is written (" + "; ".join(reasons) + ")")


def _unsupported(rules: ArchitectureRules, layers: list[LayerForm], config) -> str | None:
    """Why `rules`' architecture cannot hold these layers, or None."""
    hidden = config.hidden_size
    head_dim = _head_dim(config)
    if layers[0].heads == 0:
        return "layer 0 has no attention, and llama.cpp takes the head size from layer 0"
    for i, form in enumerate(layers):
        if form.harp == "value" and (T.ATTN_OUT, "bias") in form.tensors:
            return (f"layer {i} is a HARP layer whose fused value/output path has a bias (from v/o biases), and "
                    "deci's linear attention has none")
        extra = sorted(gguf.TENSOR_NAMES[kind] for kind, part in form.tensors if part == "bias" and kind not in rules.biases)
        if extra:
            return f"layer {i} has biases on {', '.join(extra)}, which it does not load"
        if rules.full_width_attention and form.heads * head_dim != hidden:
            return f"layer {i}: {form.heads} heads x {head_dim} != hidden size {hidden}, and its attention is hidden x hidden"
        if form.ffn == 0:
            return f"layer {i} has no MLP neurons (llama.cpp's FFN-free layers skip the layer's residual update)"
        if any(kind in (T.ATTN_Q_NORM, T.ATTN_K_NORM) for kind, _ in form.tensors) and not rules.qk_norm:
            return f"layer {i} has per-head q/k norms, which only qwen3 itself holds"
    return None


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _layer_form(adapter, layer) -> LayerForm:
    """Widths and tensors of one layer, in Hugging Face layout (row = output feature)."""
    attn = adapter.attention(layer)
    shape = adapter.layer_shape(layer)
    attn_norm, ffn_norm = (getattr(layer, name) for name in adapter.gguf_norms)
    if isinstance(attn, RemovedAttention):
        form = LayerForm(0, 0, shape.intermediate_size, harp="removed")
    elif isinstance(attn, ValueOnlyAttention):
        form = LayerForm(shape.num_heads, 0, shape.intermediate_size, harp="value")
        form.tensors.update({(T.ATTN_NORM, "weight"): attn_norm.weight, (T.ATTN_OUT, "weight"): attn.fused.weight})
        if attn.fused.bias is not None:
            form.tensors[(T.ATTN_OUT, "bias")] = attn.fused.bias
    else:
        w = adapter.attention_weights(layer)
        form = LayerForm(shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
        form.tensors[(T.ATTN_NORM, "weight")] = attn_norm.weight
        for kind, weight, bias in ((T.ATTN_Q, w.q, w.q_bias), (T.ATTN_K, w.k, w.k_bias), (T.ATTN_V, w.v, w.v_bias),
                                   (T.ATTN_OUT, w.o, w.o_bias)):
            form.tensors[(kind, "weight")] = weight
            if bias is not None:
                form.tensors[(kind, "bias")] = bias
        for kind, name in ((T.ATTN_Q_NORM, "q_norm"), (T.ATTN_K_NORM, "k_norm")):
            norm = getattr(attn, name, None)
            if norm is not None and getattr(norm, "weight", None) is not None:
                form.tensors[(kind, "weight")] = norm.weight
    mlp = adapter.mlp_weights(layer)
    (gate, gate_bias), (up, up_bias) = mlp.inputs
    form.tensors[(T.FFN_NORM, "weight")] = ffn_norm.weight
    for kind, weight, bias in ((T.FFN_GATE, gate, gate_bias), (T.FFN_UP, up, up_bias), (T.FFN_DOWN, mlp.out, mlp.out_bias)):
        form.tensors[(kind, "weight")] = weight
        if bias is not None:
            form.tensors[(kind, "bias")] = bias
    return form


def _rope_parameters(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:  # transformers 4.x spelling
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _interleave_rope_pairs(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half layout -> llama.cpp's interleaved pairs, per head (rows, and
    1-D biases alike), as llama.cpp's converter permutes Q and K (LlamaModel.permute)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _write(model, tokenizer, arch: str, layers: list[LayerForm], outtype: str, target: Path) -> None:
    config = model.config
    rules = RULES[arch]
    head_dim = _head_dim(config)
    rope = _rope_parameters(config)
    context = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if window and (config.model_type != "qwen2" or getattr(config, "use_sliding_window", False)):
        context = min(context, int(window))  # llama.cpp attends fully: exact up to the window

    logging.getLogger("gguf").setLevel(logging.WARNING)
    with writing_file(target) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name[:200] or "model")
        writer.add_context_length(context)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(len(layers))
        per_layer = rules.per_layer
        writer.add_feed_forward_length([f.ffn for f in layers] if per_layer else layers[0].ffn)
        writer.add_head_count([f.heads for f in layers] if per_layer else layers[0].heads)
        writer.add_head_count_kv([f.kv_heads for f in layers] if per_layer else layers[0].kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(OUTTYPES[outtype])
        if outtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, config.vocab_size)

        adapter = get_adapter(model)
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        _add(writer, _name(T.TOKEN_EMBD), embed, outtype)
        _add(writer, _name(T.OUTPUT_NORM), adapter.final_norm(model).weight, outtype)
        if head.data_ptr() != embed.data_ptr():  # tied: llama.cpp reuses token_embd
            _add(writer, _name(T.OUTPUT), head, outtype)
        if rope["rope_type"] == "llama3":
            _add(writer, _name(T.ROPE_FREQS), _llama3_rope_factors(rope, head_dim), "f32")
        for i, form in enumerate(layers):
            for (kind, part), tensor in form.tensors.items():
                if rules.rope_pairs_interleaved and kind in (T.ATTN_Q, T.ATTN_K) and form.harp is None:
                    tensor = _interleave_rope_pairs(tensor, form.heads if kind == T.ATTN_Q else form.kv_heads)
                _add(writer, _name(kind, i, part), tensor, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


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
