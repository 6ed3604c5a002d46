"""Several processes of one run, as a launcher starts them (torchrun, accelerate launch): the process
group, this process's rank, and the few collectives recovery needs (sums, a gradient all-reduce,
a barrier, a decision of process 0 handed to every process, results gathered at process 0).
Everything is torch.distributed's.

A launcher sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process; `join`
forms the group from them (gloo for CPU tensors; with CUDA, nccl for CUDA tensors beside gloo, each
process on the GPU of its LOCAL_RANK) unless the program that called it already did. A process that
sees WORLD_SIZE > 1 but cannot reach the others within RENDEZVOUS_SECONDS is refused with a
SecateursError, before any model loads. Without WORLD_SIZE (or with 1) nothing here touches
torch.distributed, and every collective is the identity.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from secateurs.errors import SecateursError

RENDEZVOUS_SECONDS = 120  # how long a process waits to reach the others when the group forms
LAUNCH = "torchrun --standalone --nproc_per_node N -m secateurs recover ..."


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (rank 0 of 1 for a run in one process)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Process 0: the one that checks and writes outputs."""
        return self.rank == 0

    def share(self, start: int, stop: int) -> slice:
        """This process's contiguous part of positions [start, stop): the parts of the processes in
        rank order are the positions in order (the first `(stop - start) % size` parts one longer)."""
        if self.size == 1:
            return slice(start, stop)
        count, extra = divmod(stop - start, self.size)
        first = start + self.rank * count + min(self.rank, extra)
        return slice(first, first + count + (self.rank < extra))

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum over the processes (in float64), the same in every process."""
        if self.size == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total)
        return total.tolist()

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace every parameter's .grad by its sum over the processes. A parameter that received no
        gradient here but did in another process takes zeros first; one that received none anywhere
        keeps .grad None (the optimiser skips it, as in one process)."""
        if self.size == 1:
            return
        device = params[0].device
        received = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=device)
        dist.all_reduce(received)
        for p, anywhere in zip(params, received.tolist()):
            if anywhere and p.grad is None:
                p.grad = torch.zeros_like(p)
        pending = [dist.all_reduce(p.grad, async_op=True) for p in params if p.grad is not None]
        for work in pending:
            work.wait()

    def gather(self, value) -> list | None:
        """Every process's `value` (any picklable object), in rank order, at process 0; None in the others."""
        if self.size == 1:
            return [value]
        box = [None] * self.size if self.main else None
        dist.gather_object(value, box, dst=0)
        return box

    def copy_from_main(self, module: torch.nn.Module) -> None:
        """Every parameter and buffer of `module` set to process 0's, in place; the processes' modules must
        have the same names and shapes (checked first, refused naming the first difference)."""
        if self.size == 1:
            return
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        expected = self.from_main(lambda: shapes)
        if expected != shapes:
            name = next(n for n in sorted(expected.keys() | shapes.keys()) if expected.get(n) != shapes.get(n))
            raise SecateursError(f"process {self.rank} holds another model than process 0 ({name}: "
                                 f"{shapes.get(name)} here, {expected.get(name)} there)")
        with torch.no_grad():
            for name in sorted(tensors):
                dist.broadcast(tensors[name].data, src=0)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def from_main(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) run by process 0 alone (checks and claims of outputs, a run identity),
        its result handed to every process. When process 0 raises, it raises there and every other
        process raises a SecateursError with its message, so that no process waits for the others."""
        if self.size == 1:
            return fn(*args, **kwargs)
        box: list = [None]
        if self.main:
            try:
                box = [(None, fn(*args, **kwargs))]
            except BaseException as exc:
                dist.broadcast_object_list([(str(exc) or type(exc).__name__, None)], src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        refusal, value = box[0]
        if refusal is not None:
            raise SecateursError(f"process 0 stopped the run: {refusal}")
        return value


def launched_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE; 1 when it is not set)."""
    text = os.environ.get("WORLD_SIZE", "").strip()
    if not text:
        return 1
    try:
        size = int(text)
    except ValueError:
        raise SecateursError(f"WORLD_SIZE is {text!r}, not a number of processes; unset it to run in one process, "
                             f"or launch with {LAUNCH}") from None
    if size < 1:
        raise SecateursError(f"WORLD_SIZE is {size}; unset it to run in one process, or launch with {LAUNCH}")
    return size


def current() -> World:
    """The world of the process group formed (by `join` or by the caller), or one process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def join(device: str | None = "cpu") -> World:
    """Form the process group the launcher's environment describes (when WORLD_SIZE > 1 and no
    group exists yet) and return this process's World; `device` is where the models will train."""
    size = launched_size()
    if size == 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise SecateursError(f"WORLD_SIZE is {size} but this torch has no torch.distributed; run in one process")
    cuda = _cuda_device(device, size)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    try:
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timedelta(seconds=RENDEZVOUS_SECONDS)))
        store.set_timeout(default_pg_timeout)  # the rendezvous window was for reaching the others only
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        atexit.register(_leave)
    except Exception as exc:  # noqa: BLE001 - whatever stops the group from forming refuses the run
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SecateursError(f"WORLD_SIZE is {size} but this process cannot form a process group with the others "
                             f"({reason}). Launch every process with {LAUNCH} (it sets RANK, MASTER_ADDR and "
                             "MASTER_PORT), or unset WORLD_SIZE to run in one process") from None
    return current()


def _cuda_device(device: str | None, size: int) -> bool:
    """Whether the processes train on CUDA; each takes the GPU of its LOCAL_RANK, so an explicit
    index (every process on the same GPU) is refused."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, ValueError, TypeError):
        return False  # an unknown device is refused where the models load
    if dev.type != "cuda":
        return False
    if dev.index is not None:
        raise SecateursError(f"--device {device} with {size} processes would put every process on one GPU: pass "
                             "--device cuda (each process takes the GPU of its LOCAL_RANK)")
    return True


def _leave() -> None:
    """At exit, the group this module formed is destroyed (nccl warns of one left behind)."""
    if dist.is_initialized():
        dist.destroy_process_group()
