"""Weights that live elsewhere: models dispatched by accelerate (`device_map=...`) with modules
offloaded to CPU or disk, and secateurs skeletons whose decoder layers stay in the checkpoint
(secateurs.storage.checkpoint.load_skeleton(lazy_layers=True)).

A dispatched model computes correctly through accelerate's hooks, so activation-based criteria
work on it unchanged. Code that runs a skeleton's layer, or reads weights outside a forward
(weight-based criteria, head contributions in a hook), wraps the work in `materialized(module)`,
which brings the weights in for the block and drops them after: memory stays near one layer.
Surgery cannot slice such weights in place: a plan made on such a model is applied to its
checkpoint shard by shard (secateurs.storage.checkpoint.prune_checkpoint).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from copy import deepcopy
from pathlib import Path

import torch
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import align_module_device, has_offloaded_params
from torch import nn

from secateurs.errors import SecateursError

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
LAZY_WEIGHTS = "_secateurs_lazy_weights"  # module attribute: (CheckpointTensors, prefix, device)


def parse_device_map(text: str | dict | None) -> str | dict | None:
    """'auto' | 'balanced' | 'balanced_low_0' | 'sequential', a JSON object {module: device}, or
    a path to a JSON file holding one."""
    if text is None or isinstance(text, dict):
        return text
    if text in DEVICE_MAP_STRATEGIES:
        return text
    source = Path(text).read_text() if Path(text).is_file() else text
    try:
        value = json.loads(source)
    except json.JSONDecodeError as exc:
        raise SecateursError(f"--device-map takes {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON object "
                             f"{{module: device}} or a JSON file; got {text!r}") from exc
    if not isinstance(value, dict):
        raise SecateursError(f"a device map is a JSON object {{module name: device}}, got {type(value).__name__}")
    return value


def mark_lazy(module: nn.Module, tensors, prefix: str, device) -> None:
    """The module's weights are read from `tensors` (a CheckpointTensors) onto `device` when needed."""
    setattr(module, LAZY_WEIGHTS, (tensors, prefix, device))


def has_offloaded_weights(model: nn.Module) -> bool:
    """True when some weights of the model live elsewhere: offloaded (CPU or disk) behind
    accelerate hooks, or in the checkpoint of a lazy skeleton."""
    return any(has_offloaded_params(m) or hasattr(m, LAZY_WEIGHTS) for m in model.modules())


def weights_in_memory(model: nn.Module) -> bool:
    """True when every weight is a real tensor here: not offloaded, not lazy, not on the meta device."""
    return not has_offloaded_weights(model) and not any(p.device.type == "meta" for p in model.parameters())


@contextlib.contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """The module's weights (and its submodules') on their compute device inside the block;
    a no-op for modules whose weights are already there."""
    with contextlib.ExitStack() as stack:
        for m in module.modules():
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m))
            lazy = getattr(m, LAZY_WEIGHTS, None)
            if lazy is not None and any(p.device.type == "meta" for p in m.parameters()):
                tensors, prefix, device = lazy
                names = tensors.materialize(m, prefix, device)
                stack.callback(tensors.release, m, names)
        yield module


def each_materialized(layers: Iterable[nn.Module]) -> Iterator[nn.Module]:
    """Layers one at a time with their weights in memory (weight-based criteria on offloaded models)."""
    for layer in layers:
        with materialized(layer):
            yield layer


def detached_copy(module: nn.Module) -> nn.Module:
    """A plain in-memory copy of a module whose weights may live elsewhere (no hooks, not lazy)."""
    with materialized(module):
        copy = deepcopy(module)
    remove_hook_from_module(copy, recurse=True)
    for m in copy.modules():
        if hasattr(m, LAZY_WEIGHTS):
            delattr(m, LAZY_WEIGHTS)
    return copy


def refuse_offloaded(model: nn.Module, what: str) -> None:
    if has_offloaded_weights(model):
        raise SecateursError(
            f"{what} needs the weights in memory, and this model keeps some elsewhere (offloaded by a device map, "
            "or a lazy skeleton). Make the plan on this model and apply it to the checkpoint shard by shard: "
            "secateurs.storage.checkpoint.prune_checkpoint(folder, plan, out) (what `secateurs prune --device-map` and "
            "`--streamed` do)")


def input_device(module: nn.Module) -> torch.device:
    """Where to put inputs: the first parameter not on meta (offloaded ones are), else the CPU;
    accelerate's hooks move inputs on to each block's execution device themselves."""
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
