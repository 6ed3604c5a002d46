"""Family adapters, looked up by config.model_type."""

from __future__ import annotations

from secateurs.adapters.base import AttentionWeights, LayerShape, MLPWeights, ModelAdapter
from secateurs.adapters.gemma2 import Gemma2Adapter
from secateurs.adapters.gemma3 import Gemma3Adapter, Gemma3MultimodalAdapter
from secateurs.adapters.llama import LlamaAdapter, Qwen2Adapter
from secateurs.adapters.phi import PhiAdapter
from secateurs.adapters.phi3 import Phi3Adapter
from secateurs.errors import UnsupportedModelError

_ADAPTERS: dict[str, type[ModelAdapter]] = {
    model_type: cls
    for cls in (LlamaAdapter, Qwen2Adapter, Gemma2Adapter, Gemma3Adapter, Gemma3MultimodalAdapter, PhiAdapter,
                Phi3Adapter)
    for model_type in cls.model_types
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_ADAPTERS))


def get_adapter(model_or_config) -> ModelAdapter:
    """The adapter for a model (or its config); unknown families fail with the supported list."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported families: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return _ADAPTERS[model_type]()


__all__ = ["AttentionWeights", "LayerShape", "MLPWeights", "ModelAdapter", "SUPPORTED_MODEL_TYPES", "get_adapter"]
