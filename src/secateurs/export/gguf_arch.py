"""What each llama.cpp architecture loads and computes, and whether a model's layers fit it.

Read from the llama.cpp that llama-cpp-python 0.3.36 vendors: each architecture's loader
(`load_arch_tensors`: the tensors and shapes it creates, which are optional) and graph
(`src/models/<arch>.cpp`), the rope types in `llama_model_rope_type` (src/llama-model.cpp) and the
hyperparameters every architecture reads (`llama_model_base::load_hparams`). The exporter
(secateurs.export.gguf_export) writes only what these rules accept; anything else is refused
before a file is written, with the reason returned by `unsupported`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import gguf
import torch

from secateurs.adapters import get_adapter

T = gguf.MODEL_TENSOR
LAYER_NORMS = (T.ATTN_NORM, T.ATTN_POST_NORM, T.FFN_NORM, T.FFN_POST_NORM)
# longrope (Phi-3 128k, Phi-3.5, Phi-4-mini): llama.cpp's phi3 reads long and short factors but picks
# one set per context size (`get_rope_factors`), transformers per sequence length.
_ROPE_REFUSALS = {"longrope": "; llama.cpp picks long or short factors once per context size, transformers by "
                              "each sequence's length, so they differ"}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")  # ggml_gelu is GELU's tanh approximation


@dataclass
class LayerForm:
    """One decoder layer as llama.cpp sees it: widths and tensors keyed (kind, 'weight'|'bias'),
    in Hugging Face layout (row = output feature)."""

    heads: int
    kv_heads: int
    ffn: int
    harp: str | None = None  # 'value' | 'removed'
    mlp: str | None = None  # 'removed': the MLP is written as a zero feed-forward block (gguf_export)
    tensors: dict[tuple[T, str], torch.Tensor] = field(default_factory=dict)


def _gemma2_query_scale(config, n_layer: int, n_head: int, scale: float) -> float:
    """llama.cpp's gemma2 scales Q by 1/sqrt(head size), or by 1/sqrt(hidden // heads) when the model
    has 46 layers (it takes that for Gemma 2 27B: `load_arch_hparams`); the model's own score scale
    (`scale`, from the adapter) over that goes into Q's rows."""
    built_in = (config.hidden_size // n_head) if n_layer == 46 else head_dim(config)
    return scale * built_in ** 0.5


def _gemma3_query_scale(config, n_layer: int, n_head: int, scale: float) -> float:
    """llama.cpp's gemma3 scales scores by 1/sqrt(head size), or by 1/sqrt(hidden // heads) when the model
    has 62 layers (it takes that for Gemma 3 27B: `load_arch_hparams`); the model's own score scale over
    that goes into q_norm's weight (Q's rows are RMS-normalised after the projection: scaling them cancels)."""
    built_in = (config.hidden_size // n_head) if n_layer == 62 else head_dim(config)
    return scale * built_in ** 0.5


@dataclass(frozen=True)
class ArchitectureRules:
    """What one llama.cpp architecture's loader and graph accept."""

    rope_pairs_interleaved: bool            # LLAMA_ROPE_TYPE_NORM: Q/K rows need the converter's permutation
    biases: frozenset[T]                    # tensors whose .bias the loader reads
    norms: frozenset[T] = frozenset({T.ATTN_NORM, T.FFN_NORM})  # the norms of a layer it reads
    per_layer: bool = False                 # reads head counts and FFN widths per layer
    full_width_attention: bool = False      # wq/wo are hidden x hidden: heads * head_dim must equal hidden
    qk_norm: bool = False                   # per-head q/k RMS norms (qwen3)
    gated_ffn: bool = True                  # down(act(gate) * up); False: down(act(up))
    fused_gate_up: bool = False             # ffn_up holds [gate; up] and there is no ffn_gate (phi3)
    activations: tuple[str, ...] = ("silu",)  # Hugging Face activations its graph computes
    partial_rotary: bool = False            # rope on the first n_rot values of a head (NEOX rope)
    layer_norm: bool = False                # LayerNorm with biases rather than RMSNorm
    output: str = "untied"                  # 'untied': output.weight when not tied; 'tied': never; 'always'
    rope_freqs: bool = False                # reads rope_freqs (llama3 rope scaling)
    soft_capping: bool = False              # attention and final logit soft-capping, always applied
    sliding_window: bool = False            # per-layer sliding window attention
    query_scale: Callable | None = None     # (config, n_layer, n_head, model's score scale) -> factor folded into Q
    query_scale_tensor: T = T.ATTN_Q        # the tensor query_scale multiplies (gemma3: q_norm, after Q's RMSNorm)
    local_rope: bool = False                # sliding layers' own RoPE base (rope.freq_base_swa)


_LLAMA_BIASES = frozenset({T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN})
RULES = {
    "llama": ArchitectureRules(True, _LLAMA_BIASES, rope_freqs=True),
    "deci": ArchitectureRules(True, _LLAMA_BIASES, per_layer=True, rope_freqs=True),
    "qwen2": ArchitectureRules(False, frozenset({T.ATTN_Q, T.ATTN_K, T.ATTN_V}), full_width_attention=True),
    "qwen3": ArchitectureRules(False, frozenset(), qk_norm=True),
    "phi3": ArchitectureRules(False, frozenset(), full_width_attention=True, fused_gate_up=True, partial_rotary=True),
    "gemma2": ArchitectureRules(False, frozenset({T.ATTN_Q, T.ATTN_K, T.ATTN_V}), norms=frozenset(LAYER_NORMS),
                                activations=_GELU_TANH, output="tied", soft_capping=True, sliding_window=True,
                                query_scale=_gemma2_query_scale),
    "gemma3": ArchitectureRules(False, frozenset(), norms=frozenset(LAYER_NORMS), qk_norm=True, activations=_GELU_TANH,
                                output="tied", sliding_window=True, query_scale=_gemma3_query_scale,
                                query_scale_tensor=T.ATTN_Q_NORM, local_rope=True),
    "phi2": ArchitectureRules(False, frozenset({T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_UP, T.FFN_DOWN,
                                                T.ATTN_NORM, T.OUTPUT_NORM, T.OUTPUT}),
                              norms=frozenset({T.ATTN_NORM}), full_width_attention=True, gated_ffn=False,
                              activations=_GELU_TANH, partial_rotary=True, layer_norm=True, output="always"),
}


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """The rotary of the model's layers; where layers of different types have their own (Gemma 3: local
    and global layers), that of `layer_type`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    if not params:  # transformers 4.x spelling
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rotary_dims(config) -> int:
    """The rotated values of a head, as Hugging Face computes them (int(head_dim * factor))."""
    factor = rope_parameters(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None)
    return int(head_dim(config) * float(factor or 1.0))


def activation(config) -> str:
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or "silu"


def unsupported(rules: ArchitectureRules, model, layers: list[LayerForm]) -> str | None:
    """Why `rules`' architecture cannot hold this model, or None."""
    if layers[0].heads == 0:
        return "layer 0 has no attention, and llama.cpp takes the head size from layer 0"
    if problem := _model_problem(rules, model):
        return problem
    for i, form in enumerate(layers):
        if problem := _layer_problem(rules, form, model.config.get_text_config()):
            return f"layer {i}: {problem}"
    return None


def _model_problem(rules: ArchitectureRules, model) -> str | None:
    """Model-wide reasons: activation, rope, soft-capping, LM head and final norm."""
    config = model.config.get_text_config()  # a multimodal model goes out as its language model
    rope_types = ("default", "linear", "llama3") if rules.rope_freqs else ("default", "linear")
    head, embed, adapter = model.get_output_embeddings(), model.get_input_embeddings(), get_adapter(model)
    caps = adapter.soft_caps(config)
    if activation(config) not in rules.activations:
        return f"hidden activation {activation(config)!r}, and its graph computes {' / '.join(rules.activations)}"
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in rope_types:
        why = _ROPE_REFUSALS.get(rope_type, "")
        return f"rope type {rope_type!r} (it reproduces {', '.join(rope_types)}{why})"
    if rules.local_rope and rope_parameters(config, "sliding_attention")["rope_type"] != "default":
        return "a scaled RoPE on sliding-window layers, and it rotates them unscaled"
    if rotary_dims(config) != head_dim(config) and not rules.partial_rotary:
        return "partial rotary embeddings (it rotates whole heads)"
    if rules.soft_capping and None in caps:
        return "attention and final logit soft-capping unset, and its graph always applies both"
    if not rules.soft_capping and any(cap is not None for cap in caps):
        return "logit soft-capping, which its graph does not apply"
    if rules.output == "tied" and head.weight.data_ptr() != embed.weight.data_ptr():
        return "an LM head not tied to the embeddings, and it reads only token_embd"
    if getattr(head, "bias", None) is not None and T.OUTPUT not in rules.biases:
        return "an LM head bias, which it does not load"
    if getattr(adapter.final_norm(model), "bias", None) is not None and T.OUTPUT_NORM not in rules.biases:
        return "a final norm bias, which it does not load"
    return None


def _layer_problem(rules: ArchitectureRules, form: LayerForm, config) -> str | None:
    """Why one layer does not fit, or None."""
    kinds = {kind for kind, part in form.tensors if part == "weight"}
    norms = kinds & set(LAYER_NORMS)
    if form.harp == "value" and (T.ATTN_OUT, "bias") in form.tensors:
        return ("a HARP layer whose fused value/output path has a bias (from v/o biases), and deci's linear "
                "attention has none")
    if form.harp and not rules.per_layer:
        return "a HARP layer, which only deci holds"
    if form.mlp and not rules.per_layer:
        return "a removed MLP, which only deci holds (as a zero feed-forward block)"
    if (T.ATTN_Q_NORM in kinds or T.ATTN_K_NORM in kinds) and not rules.qk_norm:
        return "per-head q/k norms, which only qwen3 itself holds"
    extra = {kind for kind, part in form.tensors if part == "bias" and kind not in rules.biases}
    if extra:
        return f"biases on {_names(extra)}, which it does not load"
    if rules.full_width_attention and form.heads * head_dim(config) != config.hidden_size:
        return (f"{form.heads} heads x {head_dim(config)} != hidden size {config.hidden_size}, and its attention "
                "is square")
    if form.ffn == 0:
        return ("no MLP neurons (llama.cpp's FFN-free layers skip the rest of the layer, its attention's residual "
                "update included)")
    if (T.FFN_GATE in kinds) != rules.gated_ffn:
        return "an MLP without a gate" if rules.gated_ffn else "a gated MLP, and its MLP has no gate"
    if norms - rules.norms or (form.harp is None and rules.norms - norms):
        return f"norms {_names(norms)}, and it reads {_names(rules.norms)}"
    return None


def _names(kinds) -> str:
    return ", ".join(sorted(gguf.TENSOR_NAMES[kind].split(".")[-1] for kind in kinds))
