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
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

_state = {"quiet": os.environ.get("SECATEURS_QUIET", "") not in ("", "0"), "open": False, "depth": 0}


def set_quiet(quiet: bool = True) -> None:
    _state["quiet"] = bool(quiet)


def is_quiet() -> bool:
    return _state["quiet"]


def _close_line() -> None:
    """A phase line left open ('... ') gets its newline before anything else is printed."""
    if _state["open"]:
        sys.stderr.write("\n")
        _state["open"] = False


def status(message: str) -> None:
    """One line on stderr (nothing when quiet)."""
    if _state["quiet"]:
        return
    _close_line()
    sys.stderr.write(f"secateurs: {message}\n")
    sys.stderr.flush()


@contextmanager
def phase(what: str) -> Iterator[None]:
    """`secateurs: loading model ... done in 3.2 s` on stderr; when bars or nested phases print in
    between, the end gets its own line (`secateurs: loading model done in 3.2 s`)."""
    if _state["quiet"]:
        yield
        return
    _close_line()
    sys.stderr.write(f"secateurs: {what} ...")
    sys.stderr.flush()
    _state["open"], _state["depth"] = True, _state["depth"] + 1
    start = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        _state["depth"] -= 1
        seconds = time.perf_counter() - start
        end = f"done in {seconds:.1f} s" if ok else f"stopped after {seconds:.1f} s"
        if _state["open"]:
            sys.stderr.write(f" {end}\n")
            _state["open"] = False
        else:
            sys.stderr.write(f"secateurs: {what} {end}\n")
        sys.stderr.flush()


def bar(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None, disable: bool = False,
        **kwargs):
    """A tqdm bar on stderr, off when quiet (or when the caller passes disable=True)."""
    from tqdm.auto import tqdm

    disable = disable or _state["quiet"]
    if not disable:
        _close_line()
    return tqdm(iterable, desc=desc, total=total, disable=disable, file=sys.stderr, **kwargs)


def heavy_imports() -> None:
    """torch and transformers take seconds to import on a loaded machine: say so while it happens."""
    if "transformers" in sys.modules:
        return
    with phase("importing torch and transformers"):
        import torch  # noqa: F401
        import transformers  # noqa: F401
