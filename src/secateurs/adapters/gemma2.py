"""Gemma 2: Llama-like names, head_dim independent of hidden/heads, sandwich norms, soft-capping,
sliding window chosen per layer through config.layer_types (sliced by the base adapter)."""

from __future__ import annotations

import torch

from secateurs.adapters.base import ModelAdapter


class Gemma2Adapter(ModelAdapter):
    model_types = ("gemma2",)
    attention_only_norms = ("input_layernorm", "post_attention_layernorm")
    mlp_only_norms = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    bos_every_window = True
    gguf_architectures = {"gemma2": "gemma2"}
    gguf_not_deci = ("deci is llama's layer (no soft-capping, post-norms or GELU), and llama.cpp's gemma2 sizes "
                     "every layer from layer 0's head count and FFN width")
    gguf_norms = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                  "ffn_norm": "pre_feedforward_layernorm", "ffn_post_norm": "post_feedforward_layernorm"}
    gguf_norm_offset = 1.0  # Gemma's RMSNorm scales by (1 + w), llama.cpp's by w (its converter adds 1)

    def soft_caps(self, config) -> tuple[float | None, float | None]:
        return getattr(config, "attn_logit_softcapping", None), getattr(config, "final_logit_softcapping", None)

    def logits(self, model, normed_hidden, dtype=None):
        logits = super().logits(model, normed_hidden, dtype)
        cap = self.soft_caps(model.config)[1]
        return logits if not cap else torch.tanh(logits / cap) * cap

    def fold_attention_scale(self, layer, alpha: float) -> bool:
        """Gemma's RMSNorm scales by (1 + w): alpha * (1 + w) = 1 + w' with w' = alpha * (1 + w) - 1."""
        norm = layer.post_attention_layernorm
        with torch.no_grad():
            norm.weight.copy_(alpha * (1 + norm.weight.double()) - 1)
        return True
