"""What the user sees while secateurs works: a status line with the elapsed time for every phase
(loading, dequantising, generating calibration text, statistics, surgery, saving, evaluation) and
tqdm bars for the loops, on stderr so that stdout stays the result. `set_quiet(True)` (the CLI's
`--quiet`, or SECATEURS_QUIET=1) turns all of it off.

The library calls `phase(...)` where the work is, so every entry point (CLI, Python API, benchmark
scripts) reports the same way; nothing here imports torch.

When stderr is not a terminal (a CI log, `2> log`, a job scheduler, nohup) a tqdm bar's redraws would
fill the log with carriage-return fragments; there every bar, ours and those the libraries draw with
tqdm underneath (transformers' weight loading and shard writing, GGUF dequantisation, lm-eval), becomes
plain lines instead, each ending in a newline and none holding a carriage return:

    secateurs: recover 2,048/8,192 tok (25%), 3.1 ktok/s, ETA 2 s

at most one every SECATEURS_PROGRESS_INTERVAL seconds (default 10) while the bar runs, and one more
when it closes. SECATEURS_PROGRESS=lines or =bars overrides the choice (auto, the default, looks at
whether the bar's stream is a terminal). On a terminal the bars are drawn as before.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

_state = {"quiet": os.environ.get("SECATEURS_QUIET", "") not in ("", "0")}
HEARTBEAT_SECONDS = 3.0  # work that prints nothing itself says it goes on this often (target: no silence > 5 s)
MODE_VARIABLE = "SECATEURS_PROGRESS"  # lines | bars | auto (the default: lines when the stream is not a terminal)
INTERVAL_VARIABLE = "SECATEURS_PROGRESS_INTERVAL"  # seconds between two lines of one bar in lines mode
DEFAULT_INTERVAL = 10.0
_clock = time.monotonic  # when a bar's next line is due (tests replace it)


def set_quiet(quiet: bool = True) -> None:
    """Quiet also silences the bars of the libraries underneath (transformers' weight loading and GGUF
    dequantisation, lm-eval, datasets): all of them draw with tqdm, whose default becomes disable=True."""
    _state["quiet"] = bool(quiet)
    for name in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS"):  # for libraries imported later
        if quiet:
            os.environ[name] = "1"
        else:
            os.environ.pop(name, None)
    _hook_tqdm()  # tqdm already imported: every bar disabled, even one that asks for disable=False
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415 (torch-free for secateurs --help, 0.06 s; torch + transformers take 4 s)

        (hf_logging.disable_progress_bar if quiet else hf_logging.enable_progress_bar)()


def is_quiet() -> bool:
    return _state["quiet"]


def progress_mode(stream=None) -> str:
    """'lines' or 'bars' for a bar drawn on `stream` (default stderr): SECATEURS_PROGRESS=lines|bars
    decides, otherwise lines unless the stream is a terminal."""
    chosen = os.environ.get(MODE_VARIABLE, "").strip().lower()
    if chosen in ("lines", "bars"):
        return chosen
    stream = sys.stderr if stream is None else stream
    try:
        return "bars" if stream.isatty() else "lines"
    except (AttributeError, ValueError, OSError):  # no isatty, or closed
        return "lines"


def progress_interval() -> float:
    """Seconds between two lines of one bar in lines mode (SECATEURS_PROGRESS_INTERVAL, default 10)."""
    try:
        value = float(os.environ.get(INTERVAL_VARIABLE, "") or DEFAULT_INTERVAL)
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 and value == value else DEFAULT_INTERVAL


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
    _hook_tqdm()  # the bars a library draws inside this phase (weight loading, dequantising) follow the mode
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
    cls = _ticking_bar_class()
    _hook_tqdm()
    return cls(iterable, desc=desc, total=total, disable=disable, file=sys.stderr, tick=None if disable else tick,
               **kwargs)


def _ticking_bar_class():
    if "class" in _ticking:
        return _ticking["class"]
    from tqdm.auto import tqdm  # noqa: PLC0415 (torch-free for secateurs --help, 0.06 s; torch + transformers take 4 s)

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
        import torch  # noqa: F401, PLC0415 (torch-free for secateurs --help, 0.06 s; torch + transformers take 4 s)
        import transformers  # noqa: F401, PLC0415 (torch-free for secateurs --help, 0.06 s; torch + transformers take 4 s)
    if _state["quiet"]:
        set_quiet(True)  # now that transformers (and tqdm) are here
    else:
        _hook_tqdm()  # lines instead of bars off a terminal, for transformers' bars too


# -- every tqdm bar, ours and the libraries': quiet, or lines off a terminal ------------------------


def _hook_tqdm() -> None:
    """Once tqdm is imported, wrap tqdm.std.tqdm.__init__ (which every tqdm class, ours and the
    libraries', runs) so that each new bar reads the current state: disabled when quiet, plain lines
    when progress_mode says so, the bar unchanged otherwise."""
    if "tqdm" not in sys.modules or _state.get("tqdm_hooked"):
        return
    from tqdm import std  # noqa: PLC0415 (torch-free for secateurs --help, 0.06 s; torch + transformers take 4 s)

    current = std.tqdm.__init__
    original = _state.setdefault("tqdm_init", getattr(current, "secateurs_original", current))  # once, even reloaded
    standard_display = std.tqdm.display

    def init(self, *args, **kwargs):
        if _state["quiet"]:
            kwargs["disable"] = True
            return original(self, *args, **kwargs)
        args = list(args)
        given = args[4] if len(args) > 4 else kwargs.get("file")  # tqdm(iterable, desc, total, leave, file)
        stream = sys.stderr if given is None else given
        if (type(self).display is standard_display  # not a notebook, rich or GUI bar: they draw otherwise
                and not kwargs.get("gui") and not kwargs.get("write_bytes")
                and not isinstance(stream, _LineSink) and progress_mode(stream) == "lines"):
            sink = _LineSink(stream)
            if len(args) > 4:
                args[4] = sink
            else:
                kwargs["file"] = sink
            self._secateurs_lines = _Lines(stream, progress_interval())
            self.display = _line_display.__get__(self)  # refresh() and close() call it; tqdm writes to the sink
        return original(self, *args, **kwargs)

    init.secateurs_original = original
    std.tqdm.__init__ = init
    _state["tqdm_hooked"] = True


class _LineSink:
    """The file a bar in lines mode is given: it swallows tqdm's own writes (carriage-return redraws,
    the newline at close, cursor moves); the lines go to `stream` directly. isatty and encoding are the
    stream's, so tqdm decides as it would (disable=None still means off when not a terminal)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError, OSError):
            return False

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", None) or "utf-8"


class _Lines:
    """When one bar's next line is due: no more often than every `interval` seconds by `_clock`, the
    first an interval after the bar starts, and one final line when it closes (whatever the time)."""

    def __init__(self, stream, interval: float, now: float | None = None):
        self.stream = stream
        self.interval = interval
        self.last = _clock() if now is None else now
        self.finished = False

    def due(self, final: bool, now: float | None = None) -> bool:
        if self.finished:
            return False
        if final:
            self.finished = True
            return True
        now = _clock() if now is None else now
        if now - self.last < self.interval:
            return False
        self.last = now
        return True


def _line_display(self, msg=None, pos=None) -> bool:
    """tqdm's display for a bar in lines mode. close() sets disable before its last display, which is
    how the final line is told from the periodic ones."""
    lines = self._secateurs_lines
    final = bool(self.disable)
    if not final and not hasattr(self, "start_t"):  # the first refresh, inside __init__
        return True
    if not lines.due(final):
        return True
    try:
        lines.stream.write(_line_text(self, final) + "\n")
        lines.stream.flush()
    except (ValueError, OSError):  # the stream was closed or broke: progress is not worth an error
        pass
    return True


def _line_text(bar, final: bool) -> str:
    """`secateurs: recover 2,048/8,192 tok (25%), 3.1 ktok/s, ETA 2 s` (then `, loss=...` when the
    bar has a postfix); the final line says `done in 2.6 s`, or `stopped after` short of its total."""
    n, total = bar.n, bar.total
    unit, scale, divisor = bar.unit or "it", bar.unit_scale, bar.unit_divisor or 1000
    if scale not in (True, False) and isinstance(scale, (int, float)) and scale != 1:
        n, total = n * scale, (None if total is None else total * scale)
    elapsed = max(bar._time() - bar.start_t, 0.0) if hasattr(bar, "start_t") else 0.0
    done = n - (bar.initial or 0)
    rate = None
    if not final:
        try:
            ema_dt = bar._ema_dt()
            rate = bar._ema_dn() / ema_dt if ema_dt else None
        except (TypeError, ZeroDivisionError):
            rate = None
    if rate is None and elapsed > 0 and done > 0:
        rate = done / elapsed  # the final line: the average over the whole bar
    big = bool(scale) and max(abs(n), abs(total or 0)) >= 1e6
    count = _number(n, big, divisor)
    if total:
        count += f"/{_number(total, big, divisor)} {unit} ({100.0 * n / total:.0f}%)"
    else:
        count += f" {unit}"
    parts = [count]
    if rate:
        parts.append(_rate(rate, unit))
    if final:
        short = bool(total) and n < total
        parts.append(f"{'stopped after' if short else 'done in'} {duration(elapsed, precise=True)}")
    elif total and rate:
        parts.append(f"ETA {duration(max(total - n, 0) / rate)}")
    else:
        parts.append(f"{duration(elapsed)} elapsed")
    if bar.postfix:
        parts.append(str(bar.postfix).strip().strip(","))
    desc = str(bar.desc or "").strip().rstrip(":").strip() or "progress"
    return f"secateurs: {desc} " + ", ".join(p for p in parts if p)


def _number(value, big: bool, divisor) -> str:
    if big:
        from tqdm.std import tqdm  # noqa: PLC0415 (torch-free for secateurs --help, 0.06 s; torch + transformers take 4 s)

        return tqdm.format_sizeof(value, divisor=divisor)
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def _rate(rate: float, unit: str) -> str:
    if rate < 1:
        return f"{1 / rate:.1f} s/{unit}"
    for prefix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if rate >= size:
            return f"{rate / size:.1f} {prefix}{unit}/s"
    return f"{rate:.1f} {unit}/s"


def duration(seconds: float, precise: bool = False) -> str:
    """`42 s` (`42.3 s` precise), `3 min 05 s`, `1,234 h 05 min`: a time for a person to read."""
    if seconds < 60:
        return f"{seconds:.1f} s" if precise else f"{seconds:.0f} s"
    seconds = int(round(seconds))
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600:,} h {seconds % 3600 // 60:02d} min"


if "tqdm" in sys.modules:  # imported after tqdm: its bars follow the state from now on
    _hook_tqdm()
