"""Gemma 3: the text model (`gemma3_text`, Gemma3ForCausalLM) and the language model inside the
multimodal `gemma3` (Gemma3ForConditionalGeneration, at model.model.language_model; the vision tower
and its projector are never touched).

A Gemma 3 layer is Gemma 2's (four RMSNorms scaling by 1 + w, GELU-tanh gated MLP, scaled and tied
embeddings) without soft-capping, plus q_norm / k_norm: one weight of size head_dim shared by every
head, so head pruning leaves them as they are. Attention multiplies Q.K by query_pre_attn_scalar^-1/2
(the module's `scaling`). Layers are local (sliding window, RoPE base rope_parameters
["sliding_attention"]) or global (full attention, rope_parameters["full_attention"]) as
config.layer_types says: transformers picks each layer's mask and rotary by layer_types[i], so
deleting layers slices layer_types with them and every kept layer keeps its kind and its RoPE base.
"""

from __future__ import annotations

from secateurs.adapters.gemma2 import Gemma2Adapter

# llama.cpp's gemma3 graph (src/models/gemma3.cpp of the llama.cpp llama-cpp-python 0.3.36 vendors):
# Gemma 3's layer with one width for all layers; no `deci` form holds q/k norms or the post-norms.
_NOT_DECI = ("deci is llama's layer (no q/k norms, post-norms or GELU), and llama.cpp's gemma3 sizes every "
             "layer from layer 0's head count and FFN width")


class Gemma3Adapter(Gemma2Adapter):
    """Gemma3ForCausalLM: model.model.layers, like Gemma 2."""

    model_types = ("gemma3_text",)
    gguf_architectures = {"gemma3_text": "gemma3"}
    gguf_not_deci = _NOT_DECI

    @staticmethod
    def text_config(config):
        """The config that describes the language model (the multimodal config holds it as text_config)."""
        return config.get_text_config()

    def sliding_window(self, config) -> int | None:
        config = self.text_config(config)
        if "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
            return None
        return super().sliding_window(config)

    def soft_caps(self, config) -> tuple[float | None, float | None]:
        return super().soft_caps(self.text_config(config))

    def update_config_for_kept_layers(self, config, kept: list[int]) -> None:
        """layer_types is sliced with the layers (each kept layer stays local or global, with its RoPE base)."""
        super().update_config_for_kept_layers(self.text_config(config), kept)


class Gemma3MultimodalAdapter(Gemma3Adapter):
    """Gemma3ForConditionalGeneration: the language model at model.model.language_model, the LM head at
    model.lm_head (tied to its embeddings); the vision tower and multimodal projector stay as they are.
    Exported to GGUF as its language model (llama.cpp serves the vision part from a separate file)."""

    model_types = ("gemma3",)
    gguf_architectures = {"gemma3": "gemma3"}

    def decoder(self, model):
        return model.model.language_model

    def decoder_layers(self, model):
        return model.model.language_model.layers

    def decoder_prefix(self) -> str:
        return "model.language_model."

    def layer_prefix(self, index: int) -> str:
        return f"model.language_model.layers.{index}."

    def final_norm(self, model):
        return model.model.language_model.norm
