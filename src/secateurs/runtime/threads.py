"""Torch CPU threads per kind of work.

Torch runs one thread per core by default, and every parallel region waits for its slowest thread:
on a machine where another process holds a core, a token-by-token decode loop (small matrices,
hundreds of short parallel regions per token) waits for a descheduled thread at every step. Measured
on SmolLM2-135M, 2 cores (benchmarks/results/thread_policy.md): the 'self' sampler's decode loop
takes 9.0 s on 2 threads and 10.8 s on 1 when the machine is quiet, but 28.9 s against 10.8 s beside
one busy process at nice 0; batched forwards (7.1 s against 12.5 s quiet, 18.0 s against 12.7 s
busy) and training steps (6.5 / 10.9 quiet, 17.6 / 11.3 busy) gain more from the second core when
quiet and lose less when busy. So:

    decode   token-by-token generation ('self' calibration and recovery data, the demo's samples): 1 thread
    batched  forward passes over batches (statistics, scoring, perplexity, zero-shot): every core
    train    recovery's training steps: every core

"Every core" is the number of cores this process may run on (its CPU affinity, which container
limits and `taskset` set), not the machine's, capped by OMP_NUM_THREADS where that is set (the
convention torch and every OpenMP program follow for a process's share of a shared machine).

Reproducibility: the policy reads only the cores, never the machine's load, so two runs of the
same command on the same machine use the same counts and give the same bits. Forward passes and
the decode loop are bit-identical at 1 thread and at 2 (measured on SmolLM2 and tested on
stories260K), so the decode count changes no result; a training step is not (its backward
reductions differ in the last bits), which is why the train count is fixed by the cores alone. The
counts used are recorded in every output's marker and in recovery.json. `--threads N`
(set_override) gives every kind N. Nothing here imports torch until a count is applied.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

KINDS = ("decode", "batched", "train")
_state: dict = {"override": None}


def affinity_cores() -> int:
    """Cores this process may run on (its CPU affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cores() -> int:
    """Cores this process may run on (its affinity), capped by OMP_NUM_THREADS where set."""
    available = affinity_cores()
    share = os.environ.get("OMP_NUM_THREADS", "")
    return min(available, int(share)) if share.isdigit() and int(share) >= 1 else available


def set_override(threads: int | None) -> None:
    """Every kind of work on `threads` threads (the CLI's --threads); None: the policy."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
    _state["override"] = threads


def count(kind: str) -> int:
    """Threads for this kind of work (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of work {kind!r}; one of {', '.join(KINDS)}")
    if _state["override"] is not None:
        return _state["override"]
    return 1 if kind == "decode" else cores()


def apply_default() -> None:
    """Set torch to the count of batched work, the kind most code runs (at the start of a command)."""
    import torch  # noqa: PLC0415 (torch-free for secateurs --help, 0.06 s; torch + transformers take 4 s)

    torch.set_num_threads(count("batched"))


@contextmanager
def working(kind: str) -> Iterator[int]:
    """`with working("decode"):` torch uses this kind's count inside, the previous count after."""
    import torch  # noqa: PLC0415 (torch-free for secateurs --help, 0.06 s; torch + transformers take 4 s)

    previous = torch.get_num_threads()
    wanted = count(kind)
    if wanted != previous:
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def describe() -> dict:
    """What outputs record: the cores, the override, each kind's count."""
    return {"cores": cores(), "override": _state["override"], **{kind: count(kind) for kind in KINDS}}
