"""Which model a cache was made on: a fingerprint of the config's geometry and a sample of the
weights, so that statistics or a scores cache from another model (or another fine-tune of the same
architecture) is refused instead of silently steering the pruning of this one.

The sample is the first rows of the input embeddings and of every parameter of the first and last
decoder layers, rounded to bfloat16 (the same model loaded in float32 or bfloat16 has one identity).
It reads those rows from the checkpoint when the model is a meta skeleton, and brings an offloaded
module in only for that moment, so it costs next to nothing at any scale.
"""

from __future__ import annotations

import hashlib
import json

import torch

from secateurs.adapters import get_adapter
from secateurs.runtime.offload import materialized

_SAMPLE_ROWS = 2
_IGNORED_CONFIG_KEYS = {"_name_or_path", "dtype", "torch_dtype", "transformers_version", "architectures",
                        "use_cache", "_commit_hash", "quantization_config", "secateurs"}


def _config_digest(config) -> dict:
    data = {k: v for k, v in config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def _rows(model, name: str, checkpoint) -> torch.Tensor:
    param = model.get_parameter(name)
    if param.device.type != "meta":
        return param.detach()[:_SAMPLE_ROWS]
    if checkpoint is not None and name in checkpoint.weight_map:
        return checkpoint.get_rows(name, _SAMPLE_ROWS)
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    with materialized(owner):
        return getattr(owner, attr).detach()[:_SAMPLE_ROWS].cpu().clone()


def model_identity(model, checkpoint=None) -> str:
    """A short hex fingerprint of the model (see the module docstring)."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    digest = hashlib.sha256(json.dumps(_config_digest(model.config), sort_keys=True).encode())
    embeddings = model.get_input_embeddings()
    names = [n for n, p in model.named_parameters() if p is embeddings.weight][:1]
    for index in sorted({0, len(layers) - 1}):
        prefix = adapter.layer_prefix(index)
        names += [prefix + n for n, _ in layers[index].named_parameters()]
    for name in names:
        rows = _rows(model, name, checkpoint).to(torch.bfloat16).float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(rows.numpy().tobytes())
    return digest.hexdigest()[:16]
