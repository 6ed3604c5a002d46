"""The adapter interface: everything a pruning step needs to know about one model family.

Algorithms work on canonical weight views (query rows per head, o_proj columns per head,
MLP rows per neuron, ...). Adapters translate those views to and from the family's modules,
so fused matrices, biases and module names never leak into criteria or surgery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from secateurs.adapters.removed_mlp import is_removed_mlp
from secateurs.adapters.value_attention import is_replaced


@dataclass(frozen=True)
class LayerShape:
    """The prunable widths of one decoder layer, read from real weight shapes."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class AttentionWeights:
    """Canonical attention weights. Rows of q/k/v are grouped by head (head h = rows h*d:(h+1)*d);
    columns of o are grouped the same way. o_bias is never sliced (it adds after the heads mix)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None


@dataclass
class MLPWeights:
    """Canonical MLP weights: each input matrix has one row per neuron ([gate, up] or [fc1]),
    the output matrix one column per neuron."""

    inputs: list[tuple[torch.Tensor, torch.Tensor | None]]
    out: torch.Tensor
    out_bias: torch.Tensor | None = None


def set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give a Linear new weights in place (keeps hooks, class and dtype), fixing its features."""
    requires_grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=requires_grad)
    linear.out_features, linear.in_features = weight.shape


class ModelAdapter:
    """Default behaviour for decoder-only models laid out like Llama: model.model.layers[i]
    with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj."""

    model_types: tuple[str, ...] = ()
    o_name = "o_proj"
    mlp_in_names: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_out_name = "down_proj"

    # -- where things live -------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """The transformer without its LM head (calibration does not need logits)."""
        return model.model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def decoder_prefix(self) -> str:
        """State-dict prefix of the decoder (the model without its LM head)."""
        return "model."

    def layer_prefix(self, index: int) -> str:
        """State-dict prefix of decoder layer `index` (for reading it from a checkpoint)."""
        return f"model.layers.{index}."

    def layer_parameter(self) -> re.Pattern:
        """Matches the state-dict name of a decoder-layer parameter: (layer index, name inside it)."""
        marker = "\x00"
        before, after = self.layer_prefix(marker).split(marker)  # type: ignore[arg-type]
        return re.compile("^" + re.escape(before) + r"(\d+)" + re.escape(after) + "(.+)$")

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def set_attention(self, layer: nn.Module, module: nn.Module) -> None:
        layer.self_attn = module

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def set_mlp(self, layer: nn.Module, module: nn.Module) -> None:
        layer.mlp = module

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def logits(self, model: nn.Module, normed_hidden: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """LM-head logits from final-normed hidden states, as the model's own forward makes them
        (cast to `dtype` before any family-specific transform, for exact scoring)."""
        logits = model.lm_head(normed_hidden)
        return logits if dtype is None else logits.to(dtype)

    def attention_output_linear(self, layer: nn.Module) -> nn.Linear:
        """The Linear whose input columns are the concatenated head outputs (AMP hooks it)."""
        return getattr(self.attention(layer), self.o_name)

    def mlp_output_linear(self, layer: nn.Module) -> nn.Linear:
        """The Linear whose input columns are the MLP neurons (AMP hooks it)."""
        return getattr(self.mlp(layer), self.mlp_out_name)

    def head_dim(self, layer: nn.Module) -> int:
        return int(self.attention(layer).head_dim)

    # Norms that feed only the attention block (dropped with it when HARP's alpha is 0), only the MLP
    # (dropped with a removed MLP), and both blocks (dropped when both are gone: a parallel block's norm).
    attention_only_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_only_norms: tuple[str, ...] = ("post_attention_layernorm",)
    shared_norms: tuple[str, ...] = ()

    def fold_attention_scale(self, layer: nn.Module, alpha: float) -> bool:
        """Fold a scale of the attention output into a norm where the family has one after the
        block; False means the caller folds it into the output projection."""
        return False

    # -- canonical views ---------------------------------------------------
    def attention_weights(self, layer: nn.Module) -> AttentionWeights:
        attn = self.attention(layer)
        o = getattr(attn, self.o_name)
        return AttentionWeights(
            q=attn.q_proj.weight, k=attn.k_proj.weight, v=attn.v_proj.weight, o=o.weight,
            q_bias=attn.q_proj.bias, k_bias=attn.k_proj.bias, v_bias=attn.v_proj.bias, o_bias=o.bias,
        )

    def set_attention_weights(self, layer: nn.Module, w: AttentionWeights) -> None:
        attn = self.attention(layer)
        set_linear(attn.q_proj, w.q, w.q_bias)
        set_linear(attn.k_proj, w.k, w.k_bias)
        set_linear(attn.v_proj, w.v, w.v_bias)
        set_linear(getattr(attn, self.o_name), w.o, w.o_bias)
        self._update_attention_attributes(layer)

    def _update_attention_attributes(self, layer: nn.Module) -> None:
        attn = self.attention(layer)
        shape = self.layer_shape(layer)
        attn.num_key_value_groups = shape.group_size
        for name, value in (("num_heads", shape.num_heads), ("num_key_value_heads", shape.num_kv_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)

    def mlp_weights(self, layer: nn.Module) -> MLPWeights:
        mlp = self.mlp(layer)
        ins = [getattr(mlp, n) for n in self.mlp_in_names]
        out = getattr(mlp, self.mlp_out_name)
        return MLPWeights(inputs=[(lin.weight, lin.bias) for lin in ins], out=out.weight, out_bias=out.bias)

    def set_mlp_weights(self, layer: nn.Module, w: MLPWeights) -> None:
        mlp = self.mlp(layer)
        for name, (weight, bias) in zip(self.mlp_in_names, w.inputs):
            set_linear(getattr(mlp, name), weight, bias)
        set_linear(getattr(mlp, self.mlp_out_name), w.out, w.out_bias)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = w.out.shape[1]

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        """Widths from real weight shapes (HARP layers report the head counts they had, a removed MLP
        0 neurons)."""
        inter = 0 if is_removed_mlp(self.mlp(layer)) else self.mlp_weights(layer).out.shape[1]
        attn = self.attention(layer)
        if is_replaced(attn):
            return LayerShape(attn.num_heads, attn.num_kv_heads, inter)
        w = self.attention_weights(layer)
        d = self.head_dim(layer)
        return LayerShape(num_heads=w.q.shape[0] // d, num_kv_heads=w.k.shape[0] // d, intermediate_size=inter)

    # -- layer deletion ----------------------------------------------------
    def reindex_layer(self, layer: nn.Module, new_index: int) -> None:
        """Cache slots are addressed by layer_idx; after deleting layers they must be contiguous."""
        for module in (layer, self.attention(layer)):
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index

    def update_config_for_kept_layers(self, config, kept: list[int]) -> None:
        """Slice every per-layer list in the config (layer_types, ...) and fix the layer count."""
        old = config.num_hidden_layers
        for key, value in list(vars(config).items()):
            if isinstance(value, (list, tuple)) and len(value) == old and not key.startswith("_"):
                setattr(config, key, type(value)(value[i] for i in kept))
        config.num_hidden_layers = len(kept)

    # -- export ------------------------------------------------------------
    # GGUF (secateurs.export.gguf_export): the llama.cpp architecture of a model whose layers all keep
    # one shape, by model_type (none: the family is not exported), the model types whose per-layer
    # forms (widths, HARP layers) go out as llama.cpp's `deci` (else why not), a layer's norms by
    # llama.cpp tensor (attn_norm, ffn_norm, attn_post_norm, ffn_post_norm) and what the family's
    # norms add to their weights (llama.cpp multiplies by the weight as stored).
    # Families trained to always see their BOS token first (Gemma): every perplexity window then starts with it
    bos_every_window: bool = False
    gguf_architectures: dict[str, str] = {}
    gguf_per_layer_types: tuple[str, ...] = ()
    gguf_not_deci: str = ""
    gguf_norms: dict[str, str] = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    gguf_norm_offset: float = 0.0

    def sliding_window(self, config) -> int | None:
        """The attention window the family's forward applies to some layers, or None when none slides."""
        return getattr(config, "sliding_window", None) or None

    def attention_score_scale(self, layer: nn.Module) -> float:
        """What the layer's attention multiplies Q.K by (the module's own `scaling`, which its forward
        uses: head_dim^-1/2 in most families, query_pre_attn_scalar^-1/2 in Gemma 2)."""
        return float(self.attention(layer).scaling)

    def soft_caps(self, config) -> tuple[float | None, float | None]:
        """(attention, final logit) soft-capping the family's forward applies; None where it does not."""
        return None, None

    def stock_equivalent_config(self, config_dict: dict) -> dict | None:
        """A config dict of an identical stock architecture whose validation accepts these
        shapes, or None when the family has none (see secateurs.storage.hfcompat)."""
        return None
