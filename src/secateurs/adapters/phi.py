"""Phi-1.5 / Phi-2: q/k/v/dense with biases, fc1 -> gelu -> fc2 with biases, partial rotary,
parallel block (attention and MLP read the same input_layernorm output)."""

from __future__ import annotations

from secateurs.adapters.base import ModelAdapter


class PhiAdapter(ModelAdapter):
    model_types = ("phi",)
    o_name = "dense"
    mlp_in_names = ("fc1",)
    mlp_out_name = "fc2"
    # parallel block: attention and MLP read the same input_layernorm, dropped only when both blocks are
    attention_only_norms = ()
    mlp_only_norms = ()
    shared_norms = ("input_layernorm",)
    gguf_architectures = {"phi": "phi2"}
    gguf_not_deci = ("deci is llama's layer (sequential, RMSNorm, SiLU), and llama.cpp's phi2 sizes every layer "
                     "from layer 0's head count and FFN width")
    gguf_norms = {"attn_norm": "input_layernorm"}

    def final_norm(self, model):
        return model.model.final_layernorm
