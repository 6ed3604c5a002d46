"""Phi-3: fused qkv_proj (q rows, then k rows, then v rows) and fused gate_up_proj (gate rows,
then up rows). Canonical views are slices of the fused matrices; setting them re-fuses."""

from __future__ import annotations

import copy

import torch

from secateurs.adapters.base import AttentionWeights, MLPWeights, ModelAdapter, set_linear


class Phi3Adapter(ModelAdapter):
    model_types = ("phi3",)
    # llama.cpp's phi3 holds square attention (dense or MLP-only pruning); other shapes split the fused
    # matrices into deci's q/k/v and gate/up (Phi-3's layer is llama's).
    gguf_architectures = {"phi3": "phi3"}
    gguf_per_layer_types = ("phi3",)

    def attention_weights(self, layer) -> AttentionWeights:
        attn = self.attention(layer)
        d = attn.head_dim
        q_rows = attn.config.num_attention_heads * d
        kv_rows = attn.num_key_value_heads * d
        w = attn.qkv_proj.weight
        return AttentionWeights(
            q=w[:q_rows], k=w[q_rows : q_rows + kv_rows], v=w[q_rows + kv_rows :],
            o=attn.o_proj.weight, o_bias=attn.o_proj.bias,
        )

    def set_attention_weights(self, layer, w: AttentionWeights) -> None:
        attn = self.attention(layer)
        set_linear(attn.qkv_proj, torch.cat([w.q, w.k, w.v], dim=0), None)
        set_linear(attn.o_proj, w.o, w.o_bias)
        d = attn.head_dim
        # Phi3Attention reads num_attention_heads from its config at forward time, so each pruned
        # attention gets its own shallow config copy (layers may differ in width).
        attn.config = copy.copy(attn.config)
        attn.config.num_attention_heads = w.q.shape[0] // d
        attn.num_key_value_heads = w.k.shape[0] // d
        attn.num_key_value_groups = attn.config.num_attention_heads // attn.num_key_value_heads

    def mlp_weights(self, layer) -> MLPWeights:
        mlp = self.mlp(layer)
        n = mlp.down_proj.weight.shape[1]
        w = mlp.gate_up_proj.weight
        return MLPWeights(inputs=[(w[:n], None), (w[n:], None)], out=mlp.down_proj.weight,
                          out_bias=mlp.down_proj.bias)

    def set_mlp_weights(self, layer, w: MLPWeights) -> None:
        mlp = self.mlp(layer)
        set_linear(mlp.gate_up_proj, torch.cat([w.inputs[0][0], w.inputs[1][0]], dim=0), None)
        set_linear(mlp.down_proj, w.out, w.out_bias)
