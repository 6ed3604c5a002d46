"""Progress off a terminal (CI logs, `2> log`, schedulers, nohup): plain lines ending in a newline, no
carriage return, at most one per SECATEURS_PROGRESS_INTERVAL seconds plus one at close, for secateurs'
own bars and the tqdm bars of the libraries underneath; on a terminal (or SECATEURS_PROGRESS=bars) the
tqdm bars redraw as before."""

from __future__ import annotations

import io
import os
import re
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tqdm
import tqdm.auto
from conftest import STORIES, TINYSTORIES_TEXT

from secateurs.runtime import progress

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def loud(monkeypatch):
    """Not quiet, whatever the environment says; the mode and interval variables unset."""
    for name in (progress.MODE_VARIABLE, progress.INTERVAL_VARIABLE, "SECATEURS_QUIET", "TQDM_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    was = progress.is_quiet()
    progress.set_quiet(False)
    yield
    progress.set_quiet(was)


def _run(argv, **env):
    environment = {k: v for k, v in os.environ.items()
                   if k not in (progress.MODE_VARIABLE, "SECATEURS_QUIET", "TQDM_DISABLE")}
    path = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
    environment.update(OMP_NUM_THREADS="1", PYTHONPATH=path, **env)
    run = subprocess.run([sys.executable, "-m", "secateurs", *argv], capture_output=True, env=environment,
                         timeout=300)
    err = run.stderr.decode()
    assert run.returncode == 0, err
    return err


def test_piped_stderr_gets_lines_not_redraws(tmp_path):
    """A real prune then a tiny recovery, stderr to a pipe: no '\\r' anywhere, each line complete; the
    library's bars (transformers' weight loading and shard writing) and ours (recover) are lines."""
    err = _run(["prune", str(STORIES), "--method", "magnitude", "--ratio", "0.2", "--out", str(tmp_path / "p")])
    assert "\r" not in err and err.endswith("\n"), err
    assert re.search(r"^secateurs: Loading weights [\d,]+/[\d,]+ it \(100%\), .*done in [\d.]+ s$", err, re.M), err
    assert re.search(r"^secateurs: Writing model shards 1/1 it \(100%\), .*done in", err, re.M), err
    assert "secateurs: surgery ... done in" in err  # phase lines as they were
    err = _run(["recover", str(tmp_path / "p"), "--teacher", str(STORIES), "--data", str(TINYSTORIES_TEXT),
                "--tokens", "384", "--train-length", "64", "--val-tokens", "128", "--out", str(tmp_path / "r")],
               SECATEURS_PROGRESS_INTERVAL="0")  # every redraw a line, to see the periodic ones in a short run
    assert "\r" not in err and err.endswith("\n"), err
    periodic = re.findall(r"^secateurs: recover [\d,]+/384 tok \(\d+%\), [\d.]+ k?tok/s, ETA \d+ s, loss=", err, re.M)
    assert len(periodic) >= 2, err
    final = re.findall(r"^secateurs: recover 384/384 tok \(100%\), .*done in [\d.]+ s, loss=[\d.]+, val=", err, re.M)
    assert len(final) == 1, err


def test_lines_no_more_often_than_the_interval_and_always_at_close(loud, monkeypatch):
    """A fake clock: lines come an interval apart at the closest, the first one an interval after the
    start, none from the many redraws in between (set_postfix, the ticker), one final line at close."""
    now = [1000.0]
    monkeypatch.setattr(progress, "_clock", lambda: now[0])
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "10")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress.bar(total=100, desc="steps", tick=None, mininterval=0, miniters=1)
    seen, when = 0, []
    for step in range(100):
        now[0] += 0.7
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")  # a redraw each step, as recovery does
        bar.refresh()
        lines = sys.stderr.getvalue().splitlines()
        when += [now[0] - 1000.0] * (len(lines) - seen)
        seen = len(lines)
    assert 1 <= len(when) <= 7, when  # 70 fake seconds, one line per 10 at most
    assert when[0] >= 10 and all(b - a >= 10 for a, b in zip(when, when[1:])), when
    now[0] += 0.1
    bar.close()
    bar.close()
    out = sys.stderr.getvalue()
    lines = out.splitlines()
    assert len(lines) == len(when) + 1 and "\r" not in out and out.endswith("\n"), out
    assert all(re.fullmatch(r"secateurs: steps \d+/100 it \(\d+%\), .*ETA \d+ s, loss=[\d.]+", line)
               for line in lines[:-1]), lines
    assert re.fullmatch(r"secateurs: steps 100/100 it \(100%\), [\d.]+ k?it/s, done in [\d.]+ s, loss=0\.010",
                        lines[-1]), lines[-1]

    short = progress.bar(total=5, desc="short", tick=None)  # shorter than the interval: the final line alone
    for _ in range(3):
        short.update()
    short.close()
    tail = sys.stderr.getvalue()[len(out):]
    assert re.fullmatch(r"secateurs: short 3/5 it \(60%\), (.*, )?stopped after [\d.]+ s\n", tail), tail


def test_library_bars_become_lines_and_quiet_still_silences(loud, monkeypatch):
    """A bar drawn by a library straight with tqdm, on a stream that is not a terminal."""
    log = io.StringIO()
    with progress.phase("loading"):  # a phase hooks tqdm for the libraries that draw inside it
        for _ in tqdm.auto.tqdm(range(4), desc="Loading weights", file=log):
            pass
        with tqdm.tqdm(total=3 * 2 ** 30, unit="B", unit_scale=True, unit_divisor=1024, desc="Downloading",
                       file=log) as download:
            download.update(2 ** 30)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n"), text
    assert text.splitlines()[0].startswith("secateurs: Loading weights 4/4 it (100%), ")
    assert text.splitlines()[1].startswith("secateurs: Downloading 1.00G/3.00G B (33%), ")
    progress.set_quiet(True)
    try:
        for _ in tqdm.tqdm(range(4), desc="hidden", file=log, disable=False):
            pass
        list(progress.bar(range(3), desc="hidden too"))
    finally:
        progress.set_quiet(False)
    assert log.getvalue() == text


def test_bars_redraw_on_a_terminal_and_when_asked(loud, monkeypatch):
    """SECATEURS_PROGRESS=bars keeps the tqdm bar on a pipe; a pseudo-terminal gets it by default;
    SECATEURS_PROGRESS=lines gives lines even there."""
    fcntl, termios = pytest.importorskip("fcntl"), pytest.importorskip("termios")
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setenv(progress.MODE_VARIABLE, "bars")
    bar = progress.bar(total=3, desc="drawn", tick=None, mininterval=0)
    for _ in range(3):
        bar.update()
    bar.close()
    assert log.getvalue().count("\rdrawn:") >= 3, repr(log.getvalue())

    def on_terminal(mode):
        if mode is None:
            monkeypatch.delenv(progress.MODE_VARIABLE, raising=False)
        else:
            monkeypatch.setenv(progress.MODE_VARIABLE, mode)
        leader, follower = os.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new pty is 0 x 0
        terminal = os.fdopen(follower, "w", encoding="utf-8")
        monkeypatch.setattr(sys, "stderr", terminal)
        try:
            assert terminal.isatty()
            drawn = progress.bar(total=3, desc="tty", tick=None, mininterval=0)
            for _ in range(3):
                time.sleep(0.01)
                drawn.update()
            drawn.close()
            terminal.flush()
            received = b""
            while select.select([leader], [], [], 0.5)[0]:
                chunk = os.read(leader, 65536)
                if not chunk:
                    break
                received += chunk
        finally:
            monkeypatch.setattr(sys, "stderr", log)
            terminal.close()
            os.close(leader)
        return received.decode("utf-8", "replace")

    drawn = on_terminal(None)
    assert drawn.count("\rtty:") >= 3, repr(drawn)  # redrawn in place
    lines = on_terminal("lines")
    assert "\rtty" not in lines and lines.count("secateurs: tty 3/3 it (100%)") == 1, repr(lines)


def test_mode_and_interval_from_the_environment(monkeypatch):
    pipe, terminal = io.StringIO(), io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.delenv(progress.MODE_VARIABLE, raising=False)
    assert (progress.progress_mode(pipe), progress.progress_mode(terminal)) == ("lines", "bars")
    for value, expected in (("lines", ("lines", "lines")), ("BARS", ("bars", "bars")), ("auto", ("lines", "bars")),
                            ("nonsense", ("lines", "bars"))):
        monkeypatch.setenv(progress.MODE_VARIABLE, value)
        assert (progress.progress_mode(pipe), progress.progress_mode(terminal)) == expected, value
    monkeypatch.delenv(progress.INTERVAL_VARIABLE, raising=False)
    assert progress.progress_interval() == progress.DEFAULT_INTERVAL == 10.0
    for value, expected in (("2.5", 2.5), ("0", 0.0), ("-1", 10.0), ("soon", 10.0), ("nan", 10.0)):
        monkeypatch.setenv(progress.INTERVAL_VARIABLE, value)
        assert progress.progress_interval() == expected, value
