"""What every benchmark result records about how it was made: the command as run (from the repository
root), the versions and the machine (secateurs.evaluation.speed.machine_info: CPU model, cores, load
average, torch threads and the thread policy's counts, python, torch and transformers).

    from common import header_markdown, result_header   # benchmarks/ is the script's own folder

    header = result_header()          # at the start: its load average is the load at the start
    result = {"header": header, ...}  # JSON results carry it under "header"
    markdown += header_markdown(header)
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from secateurs.evaluation.speed import machine_info
from secateurs.version import __version__

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("SECATEURS_ASSETS", ROOT.parent / "shared" / "assets"))
# variables that change what a run measures (threads) or where it reads from; recorded before the command
ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "SECATEURS_ASSETS")


def _relative(word: str) -> str:
    """`word` with an absolute path under the repository's parent folder (the repository and the assets
    beside it) written relative to the repository root; `--opt=PATH` too."""
    flag, equals, value = word.partition("=") if word.startswith("-") else ("", "", word)
    path = Path(value)
    if not path.is_absolute():
        return word
    try:
        relative = os.path.relpath(path, ROOT)
    except ValueError:  # another drive
        return word
    return f"{flag}{equals}{relative}" if path.is_relative_to(ROOT.parent) else word


def command_line(argv: list[str] | None = None) -> str:
    """The command as run, for a shell at the repository root: the environment variables that matter,
    `python`, the script's path relative to the root and its arguments (absolute paths made relative)."""
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(Path(argv[0]).resolve(), ROOT) if argv and argv[0] not in ("", "-c") else "-c"
    env = [f"{k}={_relative(os.environ[k]) if k != 'PYTHONPATH' else _pythonpath(os.environ[k])}"
           for k in ENVIRONMENT if os.environ.get(k)]
    return shlex.join([*env, "python", script, *(_relative(a) for a in argv[1:])])


def _pythonpath(value: str) -> str:
    return os.pathsep.join(_relative(p) for p in value.split(os.pathsep))


def result_header(device: str = "cpu", load_at_start: list[float] | None = None) -> dict:
    """The command, the secateurs version and the machine (thread counts as of now; the load average as of
    now, or `load_at_start` for a script that takes the header only after its work)."""
    header = {"command": command_line(), "secateurs": __version__, "machine": machine_info(device)}
    if load_at_start is not None:
        header["machine"]["load_average"] = [round(x, 2) for x in load_at_start]
    if Path.cwd().resolve() != ROOT:
        header["cwd"] = os.path.relpath(Path.cwd().resolve(), ROOT)
    return header


def header_markdown(header: dict) -> str:
    """Two Markdown paragraphs: the command, then the machine and versions."""
    m = header["machine"]
    threads = m.get("threads") or {}
    policy = ", ".join(f"{k} {threads[k]}" for k in ("decode", "batched", "train") if k in threads)
    load = ", ".join(f"{x:.2f}" for x in m.get("load_average", [])) or "unknown"
    where = f" (run from `{header['cwd']}`)" if header.get("cwd") else ""
    return (f"Command{where}: `{header['command']}`\n\n"
            f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}"
            + (f" (secateurs' policy: {policy})" if policy else "")
            + f", load average {load} at the start; python {m['python']}, torch {m['torch']}, transformers "
              f"{m['transformers']}, secateurs {header['secateurs']}; {m['date']}.\n")
