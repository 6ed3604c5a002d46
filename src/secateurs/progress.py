"""What the user sees while secateurs works: a status line with the elapsed time for every phase
(loading, dequantising, generating calibration text, statistics, surgery, saving, evaluation) and
tqdm bars for the loops, on stderr so that stdout stays the result. `set_quiet(True)` (the CLI's
`--quiet`, or SECATEURS_QUIET=1) turns all of it off.

The library calls `phase(...)` where the work is, so every entry point (CLI, Python API, benchmark
scripts) reports the same way; nothing here imports torch.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator

_state = {"quiet": os.environ.get("SECATEURS_QUIET", "") not in ("", "0")}
HEARTBEAT_SECONDS = 3.0  # work that prints nothing itself says it goes on this often (target: no silence > 5 s)


def set_quiet(quiet: bool = True) -> None:
    """Quiet also silences the bars of the libraries underneath (transformers' weight loading and GGUF
    dequantisation, lm-eval, datasets): all of them draw with tqdm, whose default becomes disable=True."""
    _state["quiet"] = bool(quiet)
    for name in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS"):  # for libraries imported later
        if quiet:
            os.environ[name] = "1"
        else:
            os.environ.pop(name, None)
    if "tqdm" in sys.modules:  # already imported: every bar disabled, even one that asks for disable=False
        from tqdm import std

        original = _state.setdefault("tqdm_init", std.tqdm.__init__)

        def silent_init(self, *args, **kwargs):
            kwargs["disable"] = True
            original(self, *args, **kwargs)

        std.tqdm.__init__ = silent_init if quiet else original
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        (hf_logging.disable_progress_bar if quiet else hf_logging.enable_progress_bar)()


def is_quiet() -> bool:
    return _state["quiet"]


def status(message: str) -> None:
    """One line on stderr (nothing when quiet)."""
    if _state["quiet"]:
        return
    sys.stderr.write(f"secateurs: {message}\n")
    sys.stderr.flush()


@contextmanager
def phase(what: str, heartbeat: float | None = None) -> Iterator[None]:
    """`secateurs: loading model ...` when it starts and `secateurs: loading model ... done in 3.2 s`
    when it ends, each on its own line, so that bars drawn in between (ours or a library's) never
    swallow the end."""
    if _state["quiet"]:
        yield
        return
    sys.stderr.write(f"secateurs: {what} ...\n")
    sys.stderr.flush()
    start = time.perf_counter()
    stop, beater = threading.Event(), None
    if heartbeat:  # work that prints nothing itself (a library parsing a file): say every few seconds it goes on
        def beat():
            while not stop.wait(heartbeat):
                sys.stderr.write(f"secateurs: {what} ... {time.perf_counter() - start:.0f} s\n")
                sys.stderr.flush()

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        if beater is not None:
            beater.join(timeout=1.0)  # its last line before ours
        seconds = time.perf_counter() - start
        end = f"done in {seconds:.1f} s" if ok else f"stopped after {seconds:.1f} s"
        sys.stderr.write(f"secateurs: {what} ... {end}\n")
        sys.stderr.flush()


def bar(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None, disable: bool = False,
        tick: float | None = HEARTBEAT_SECONDS, **kwargs):
    """A tqdm bar on stderr, off when quiet (or when the caller passes disable=True). It is redrawn
    every `tick` seconds even while one step takes longer (a recovery step or a calibration batch on
    a loaded machine), so elapsed time and ETA keep moving."""
    disable = disable or _state["quiet"]
    return _ticking_bar_class()(iterable, desc=desc, total=total, disable=disable, file=sys.stderr,
                                tick=None if disable else tick, **kwargs)


def _ticking_bar_class():
    if "class" in _ticking:
        return _ticking["class"]
    from tqdm.auto import tqdm

    class TickingBar(tqdm):
        """Redrawn from a daemon thread until closed; the thread holds the bar only weakly, so an
        abandoned bar does not keep it alive."""

        def __init__(self, *args, tick: float | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self._tick_stop = threading.Event()
            if tick:
                threading.Thread(target=_tick, args=(weakref.ref(self), self._tick_stop, tick), daemon=True,
                                 name="secateurs-bar-tick").start()

        def close(self):
            super().close()
            self._tick_stop.set()

    _ticking["class"] = TickingBar
    return TickingBar


def _tick(ref, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        current = ref()
        if current is None or current.disable:
            return
        current.refresh()
        del current


_ticking: dict = {}


def heavy_imports() -> None:
    """torch and transformers take seconds to import on a loaded machine, and longer the first time
    after an install with --no-compile (their bytecode is compiled then): say so while it happens."""
    if "transformers" in sys.modules:
        return
    with phase("importing torch and transformers", heartbeat=HEARTBEAT_SECONDS):
        import torch  # noqa: F401
        import transformers  # noqa: F401
    if _state["quiet"]:
        set_quiet(True)  # now that transformers (and tqdm) are here
