"""Llama-layout families: llama, mistral, qwen2 (q/k/v biases), qwen3 (per-head_dim q/k norms).

All four keep q/k/v/o and gate/up/down as separate Linears, so the base adapter covers them;
only qwen2's max_window_layers needs care when layers are deleted.
"""

from __future__ import annotations

from secateurs.adapters.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen3")
    # Mistral is llama.cpp's llama (as its converter does); qwen3's per-head q/k norms have no place in
    # `deci`, so only uniform qwen3 models are exported.
    gguf_architectures = {"llama": "llama", "mistral": "llama", "qwen3": "qwen3"}
    gguf_per_layer_types = ("llama", "mistral")

    def stock_equivalent_config(self, config_dict: dict) -> dict | None:
        """Llama without biases is Mistral with sliding_window None: same modules, same weight
        names, same rotary; MistralConfig accepts any head count with an explicit head_dim."""
        if config_dict.get("model_type") != "llama" or config_dict.get("attention_bias") or config_dict.get("mlp_bias"):
            return None
        out = {k: v for k, v in config_dict.items() if k not in ("attention_bias", "mlp_bias", "pretraining_tp")}
        out.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
        return out


class Qwen2Adapter(ModelAdapter):
    model_types = ("qwen2",)
    gguf_architectures = {"qwen2": "qwen2"}
    gguf_per_layer_types = ("qwen2",)

    def sliding_window(self, config) -> int | None:
        """Qwen2 slides only with use_sliding_window (its configs carry a window either way)."""
        return super().sliding_window(config) if getattr(config, "use_sliding_window", False) else None

    def update_config_for_kept_layers(self, config, kept: list[int]) -> None:
        # Layers with index >= max_window_layers use the sliding window: keep that split.
        limit = getattr(config, "max_window_layers", None)
        super().update_config_for_kept_layers(config, kept)
        if limit is not None:
            config.max_window_layers = sum(1 for i in kept if i < limit)
