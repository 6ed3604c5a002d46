"""Gemma 2: Llama-like names, head_dim independent of hidden/heads, sandwich norms, soft-capping,
sliding window chosen per layer through config.layer_types (sliced by the base adapter)."""

from __future__ import annotations

from secateurs.adapters.base import ModelAdapter


class Gemma2Adapter(ModelAdapter):
    model_types = ("gemma2",)
