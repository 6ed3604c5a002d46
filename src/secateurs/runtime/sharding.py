"""A student trained fully sharded over the run's processes (FSDP2, torch.distributed.fsdp.fully_shard):
every process keeps 1/N of each weight, of its gradient and of the optimiser's moments, and gathers a
group's full weights only while the group computes.

The groups: one per decoder layer (whatever its shapes: per-layer widths, HARP's value layers, LoRA
adapters inside) and a root group for the rest (embeddings, final norm, LM head; a head tied to the
embeddings is one weight, so it is in one group by construction). FSDP2 gathers and reduces around a
module's __call__; recovery's loss calls the decoder and then the LM head in row chunks, each chunk
with its own backward into the head, and one last backward of the hidden states into the body. So
the root is a thin module around the student whose forward is the body (`body(student, ids)` ->
final hidden states): the root's weights are gathered in its forward and stay whole until the end of
backward (FSDP2 does not reshard its root after forward), the head chunks' gradients accumulate into
the whole head weight, and the last backward's final callback reduce-scatters all of the root's
gradients with the layers'.

Gradients are summed over the processes, not averaged (the loss is already divided by the supervised
tokens of the whole step): every group's divide factor is 1. With `bf16` (on GPUs) the groups compute
in bfloat16 and reduce in float32 (MixedPrecisionPolicy); the weights and moments keep their dtype.

`unshard` ends the sharding: every weight gathered whole to where the student was, the modules
returned to their own classes without FSDP's hooks, so the trained student is an ordinary model again
(saved, merged, evaluated as in one process).

A teacher is sharded the same way (`shard`, nothing trains): every process runs its forward on its own
share of the micro-batch, each layer gathered for its forward and freed after it; its root group stays
gathered from its forward through the loss's head chunks (`adapter.logits`) and `reshard` frees it
after the micro-batch.

Loaded once: under fsdp only process 0 reads the weights (onto the CPU); `load_once` hands the
other processes the same model with its parameters on the meta device (the module pickled with every
parameter replaced by an empty meta tensor of its shape, dtype and requires_grad: per-layer widths,
HARP layers, compensation biases, tied weights and buffers exactly as loaded). Once sharded,
`fill_from_main` gives every process its part of process 0's weights (set_model_state_dict,
broadcast_from_rank0): bit for bit what every process loading the folder would hold.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


class StudentRoot(nn.Module):
    """The root group of a sharded student: its forward is the student's body, ids -> final hidden states."""

    def __init__(self, student: nn.Module, body):
        super().__init__()
        self.student = student
        self.body = body

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(self.student, ids)


@dataclass
class ShardedStudent:
    """A student sharded by `shard`: call `root(ids)` for its final hidden states."""

    root: StudentRoot
    home: torch.device  # where the student's weights were before sharding; unshard returns them there
    classes: dict = field(default_factory=dict)  # module -> its class before fully_shard
    hooks: dict = field(default_factory=dict)  # module -> {hook dict name: keys before fully_shard}
    attributes: dict = field(default_factory=dict)  # module -> its attribute names before fully_shard


def _hook_dicts(module: nn.Module) -> dict:
    return {name: value for name, value in vars(module).items() if name.endswith("hooks") and isinstance(value, dict)}


def shard(student: nn.Module, layers, body, *, device: torch.device, processes: int, bf16: bool = False,
          home: torch.device | None = None) -> ShardedStudent:
    """Shard `student` (or a teacher) over the `processes` of the group in place: each of `layers` (the
    decoder layers) a group, the root (StudentRoot) the rest. The weights move to `device`'s type (each
    process its own GPU, or the CPU); `unshard` returns them to `home` (default: where they are)."""
    home = home if home is not None else next(student.parameters()).device
    root = StudentRoot(student, body)
    sharded = ShardedStudent(root, home)
    for module in root.modules():
        sharded.classes[module] = type(module)
        sharded.hooks[module] = {name: set(value) for name, value in _hook_dicts(module).items()}
        sharded.attributes[module] = set(vars(module))
    mesh = init_device_mesh(torch.device(device).type, (processes,))
    mixed = MixedPrecisionPolicy()
    if bf16 and torch.device(device).type == "cuda":
        mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mixed)
    fully_shard(root, mesh=mesh, mp_policy=mixed)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sums: the loss is scaled by the step's tokens already
            # a plain SUM: float32 and bfloat16 gradients would otherwise go through PREMUL_SUM, which gloo lacks
            module.set_force_sum_reduction_for_comms(True)
    return sharded


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (a DTensor: a gradient norm, a weight) gathered whole; any other as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor; any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def reshard(sharded: ShardedStudent) -> None:
    """Free every group's gathered weights (the root's stay gathered after its forward), so that the
    student's registered weights are the sharded ones its optimiser steps (what state dicts read)."""
    for module in sharded.root.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def unshard(sharded: ShardedStudent) -> nn.Module:
    """End the sharding of the student in place (a collective: every process calls it): every weight
    gathered whole to where the student was, the modules back to their classes without FSDP's hooks
    and state. Returns the student."""
    root = sharded.root
    reshard(sharded)
    whole: dict[int, nn.Parameter] = {}
    owners = []
    for module in root.modules():
        for name, param in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            owners.append((module, name, param))
    for module, name, param in owners:  # in module order, the same in every process (collectives)
        if id(param) not in whole:
            value = full_value(param.detach()).to(sharded.home)
            whole[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
    for module in root.modules():
        module.__class__ = sharded.classes[module]
        for name, value in _hook_dicts(module).items():
            for key in set(value) - sharded.hooks[module].get(name, set()):
                del value[key]
        for name in set(vars(module)) - sharded.attributes[module]:
            delattr(module, name)
    for module, name, param in owners:
        setattr(module, name, whole[id(param)])  # tied weights: one Parameter in every module that holds it
    student = root.student
    student.to(sharded.home)  # buffers FSDP moved to the training device
    return student


def on_meta(model: nn.Module | None) -> bool:
    """Whether `model` is a module whose parameters are on the meta device (built by load_once)."""
    return isinstance(model, nn.Module) and any(p.device.type == "meta" for p in model.parameters())


def training_device(model: nn.Module) -> torch.device:
    """Where this process trains `model`: its own GPU when the process group runs on CUDA (a model
    loaded once waits on the CPU or the meta device until it is sharded), else where it is."""
    device = next(model.parameters()).device
    cuda = dist.is_initialized() and torch.cuda.is_available() and "nccl" in str(dist.get_backend())
    if cuda and device.type in ("cpu", "meta"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if device.type == "meta" else device


def _meta_parameter(shape: tuple, dtype: torch.dtype, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=requires_grad)


class _StructurePickler(pickle.Pickler):
    """Pickles a module with every parameter as an empty meta tensor (a parameter held by several
    modules, as tied weights are, stays one object: the pickler's memo)."""

    def reducer_override(self, obj):
        if isinstance(obj, nn.Parameter):
            return _meta_parameter, (tuple(obj.shape), obj.dtype, obj.requires_grad)
        return NotImplemented


def load_once(load, world) -> tuple:
    """(model, extra) of `load()` run by process 0 alone (it reads the weights); every other process
    gets the same module with its parameters on the meta device (buffers, such as rotary tables, as
    process 0 holds them) and process 0's `extra` (a tokenizer). A collective; a failure of process 0
    stops every process."""
    held = []

    def read() -> tuple[bytes, object]:
        model, extra = load()
        held.append(model)
        buffer = io.BytesIO()
        _StructurePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(model)
        return buffer.getvalue(), extra

    data, extra = world.from_main(read)
    return (held[0] if world.main else pickle.loads(data)), extra  # noqa: S301 - process 0's own module


def full_state(model: nn.Module) -> dict:
    """The state dict process 0 broadcasts from, taken before sharding (its tensors, not copies)."""
    return dict(model.state_dict())


def fill_from_main(model: nn.Module, state: dict | None, device: torch.device, main: bool) -> None:
    """Give every process its part of process 0's weights (`state`, read by full_state in process 0;
    None in the others) in place: sharded parameters get their shards, others the whole tensors, on
    `device`. Buffers keep the values process 0 gave (load_once); none stays on the meta device.
    A collective."""
    if main:
        if not any(isinstance(p, DTensor) for p in model.parameters()):
            model.to(device)  # sharding moved the sharded ones already
    else:
        buffers = {name: value.detach().clone() for name, value in model.named_buffers()}
        model.to_empty(device=device)
        with torch.no_grad():
            for name, value in model.named_buffers():
                value.copy_(buffers[name])
    set_model_state_dict(model, state if main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:3]}")
