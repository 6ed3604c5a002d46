"""A new user's first run, timed: `secateurs --help`, README command 1 (`secateurs demo`) with an
empty cache, then `secateurs prune smollm2 --method amp --ratio 0.2` as the next command (caches
warm) and as the very first command (empty cache).

Each command runs as a subprocess, as a user would run it; every chunk it writes to stderr is
timestamped, so the report gives each phase's duration (from the `secateurs: X ... done in` lines)
and the longest silence (the target: none over 5 s). The machine's load average is recorded before
and after, since on a shared machine every time here is inflated.

    PYTHONPATH=src python benchmarks/first_run.py --out benchmarks/results/first_run

With --with-install, command 1's installs run first in a new venv (as the README gives them; pip
takes the packages from its cache or the registry) and the demo then runs from that venv, so that
command 1 is timed whole.

With --busy, the demo and the prune run again beside one busy process (a pure-Python loop, one
core's worth of work) at each nice level given, each with an empty cache, per phase; with
--compare-threads each of those also runs with `--threads CORES` (every kind of work on every
core: torch's default, instead of secateurs.runtime.threads' counts per kind of work):

    PYTHONPATH=src python benchmarks/first_run.py --busy quiet,10,0 --compare-threads \
        --out benchmarks/results/first_run_busy
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASE_END = re.compile(r"secateurs: (?P<what>.+?) \.\.\. (?:done in|stopped after) (?P<s>[0-9.]+) s")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


ROOT = Path(__file__).resolve().parents[1]


def readme_install() -> str:
    """README command 1 up to `secateurs demo`: exactly what a newcomer runs, read from the README."""
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith("python3 -m venv"))
    return line.split("&& secateurs demo")[0].strip()


def timed_install(venv: Path, env: dict) -> dict:
    command = readme_install().replace(".venv", str(venv))
    start = time.perf_counter()
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, env=env)
    return {"command": readme_install(), "exit_status": proc.returncode,
            "wall_s": round(time.perf_counter() - start, 1), "stderr_tail": proc.stderr[-1500:]}


def timed(argv: list[str], env: dict, python: str = sys.executable) -> dict:
    """Run `python -m secateurs ARGV`; wall time, exit status, phases, the longest silence on stderr."""
    start = time.perf_counter()
    proc = subprocess.Popen([python, "-m", "secateurs", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    err, out, last, longest, longest_after = b"", b"", start, 0.0, ""
    open_streams = 2
    while open_streams:
        for key, _ in sel.select():
            chunk = os.read(key.fileobj.fileno(), 65536)
            now = time.perf_counter()
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            if key.data == "err":
                if now - last > longest:
                    longest = now - last
                    tail = re.split(rb"[\r\n]", err.rstrip(b"\r\n"))[-1:] or [b""]
                    longest_after = tail[0].decode(errors="replace")[-120:]
                last = now
                err += chunk
            else:
                out += chunk
    proc.wait()
    wall = time.perf_counter() - start
    text = err.decode(errors="replace")
    phases = [{"phase": m["what"], "seconds": float(m["s"])} for m in PHASE_END.finditer(text)]
    return {"argv": argv, "exit_status": proc.returncode, "wall_s": round(wall, 1), "phases": phases,
            "longest_silence_s": round(max(longest, time.perf_counter() - last if proc.returncode else 0), 1),
            "longest_silence_after": longest_after, "stdout_tail": out.decode(errors="replace")[-1500:],
            "stderr_lines": [line for line in re.split(r"[\r\n]", text) if line.startswith("secateurs:")]}


@contextlib.contextmanager
def beside_busy(nice: int | None):
    """A pure-Python loop at `nice` (None: nothing) for the duration."""
    other = None if nice is None else subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c",
                                                        "while True: pass"])
    try:
        if other:
            time.sleep(1.0)
        yield
    finally:
        if other:
            other.kill()
            other.wait()


def busy_runs(conditions: list[str], compare: bool, model: str, work: Path, env: dict, python: str) -> list[dict]:
    cores = len(os.sched_getaffinity(0))
    runs = []
    for condition in conditions:
        nice = None if condition == "quiet" else int(condition)
        policies = ["secateurs.runtime.threads", f"--threads {cores}"] if compare else ["secateurs.runtime.threads"]
        for policy in policies:
            extra = [] if policy == "secateurs.runtime.threads" else ["--threads", str(cores)]
            tag = f"{condition}-{len(runs)}"
            cold = {**env, "SECATEURS_CACHE": str(work / f"cache-{tag}")}
            with beside_busy(nice):
                demo = timed(["demo", "--model", model, "--out", str(work / f"demo-{tag}"), *extra], cold, python)
                prune = timed(["prune", model, "--method", "amp", "--ratio", "0.2", "--out", str(work / f"p-{tag}"),
                               *extra], cold, python)
            label = "quiet" if nice is None else f"beside a busy process at nice {nice}"
            runs.append({"condition": label, "threads": policy, "demo": demo, "prune": prune, "load": load()})
            print(label, policy, demo["wall_s"], prune["wall_s"], flush=True)
    return runs


def busy_markdown(runs: list[dict]) -> str:
    lines = ["# README command 1 (demo) and `prune smollm2 --method amp --ratio 0.2` on a busy machine", "",
             "Each run with an empty cache (the demo samples its 'self' calibration text, the prune reuses it); "
             "the busy process is `nice -n N python -c 'while True: pass'`; nothing else ran.", ""]
    def name(phase: str) -> str:  # one column per phase, whatever folder a run saved to
        return re.sub(r"saving to \S*?(model|recovered)?$", lambda m: f"saving {m.group(1) or 'the output'}", phase)

    for r in runs:
        for command in ("demo", "prune"):
            for p in r[command]["phases"]:
                p["phase"] = name(p["phase"])
    for command in ("demo", "prune"):
        phases = list(dict.fromkeys(p["phase"] for r in runs for p in r[command]["phases"]))
        lines += [f"## {command}", "", "| condition | threads | wall s | " + " | ".join(phases) + " |",
                  "| --- | --- | ---: | " + " | ".join("---:" for _ in phases) + " |"]
        for r in runs:
            seconds = {p["phase"]: p["seconds"] for p in r[command]["phases"]}
            lines.append(f"| {r['condition']} | {r['threads']} | {r[command]['wall_s']} | "
                         + " | ".join(f"{seconds[p]:.1f}" if p in seconds else "" for p in phases) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def markdown(result: dict, header_text: str) -> str:
    m = result["machine"]
    lines = [f"# First run (measured {result['header']['machine']['date']})", "", header_text,
             f"Load average before {m['load_before']}, after {m['load_after']}; OMP_NUM_THREADS "
             f"{m['omp_num_threads']}; Python writes the bytecode it compiles (PYTHONDONTWRITEBYTECODE unset, its "
             "default; every command runs with the venv command 1 made).", ""]
    install = result.get("install")
    if install:
        total = install["wall_s"] + result["runs"]["demo (README command 1)"]["wall_s"]
        lines += [f"README command 1 whole: installs {install['wall_s']} s (exit {install['exit_status']}, new venv, "
                  f"pip's cache warm) + demo = **{total:.0f} s**.", ""]
    else:
        lines += ["Installs not timed (run with --with-install).", ""]
    for name, r in result["runs"].items():
        lines += [f"## {name}: `secateurs {' '.join(r['argv'])}`", "",
                  f"exit {r['exit_status']}, wall {r['wall_s']} s, longest silence on stderr "
                  f"{r['longest_silence_s']} s (after: `{r['longest_silence_after']}`)", ""]
        if r["phases"]:
            lines += ["| phase | seconds |", "| --- | ---: |"]
            lines += [f"| {p['phase']} | {p['seconds']:.1f} |" for p in r["phases"]]
            lines.append("")
    return "\n".join(lines) + "\n"


def after_the_runs(load_before: list[float]):
    """(secateurs' write_file, the result header, its Markdown), imported only now: this process loads torch
    and secateurs after the timed commands, so that their first run does not find those files in the page
    cache already."""
    sys.path.insert(0, str(ROOT / "src"))
    from common import header_markdown, result_header  # noqa: PLC0415 (after the timed commands: it imports torch)

    from secateurs.files.output import write_file  # noqa: PLC0415 (after the timed commands: see above)

    header = result_header(load_at_start=load_before)
    return write_file, header, header_markdown(header)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/first_run", help="results stem (.json and .md)")
    parser.add_argument("--model", default="smollm2", help="model for the demo and prune runs (default: smollm2)")
    parser.add_argument("--with-install", action="store_true", help="time command 1's installs in a new venv first")
    parser.add_argument("--busy", help="comma list of conditions: quiet and/or nice levels of one busy process (e.g. "
                                       "quiet,10,0): time the demo and the prune in each instead")
    parser.add_argument("--compare-threads", action="store_true", help="with --busy: also run with --threads CORES")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="secateurs-first-run-"))
    env = {**os.environ, "SECATEURS_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a newcomer's Python keeps the bytecode it compiles (its default)
    install = timed_install(work / "venv", env) if args.with_install else None
    python = str(work / "venv" / "bin" / "python") if install and install["exit_status"] == 0 else sys.executable
    machine = {"load_before": load(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset (torch's default: one per core)")}
    if args.busy:
        runs = busy_runs(args.busy.split(","), args.compare_threads, args.model, work, env, python)
        machine["load_after"] = load()
        write_file, header, header_text = after_the_runs(machine["load_before"])
        out = Path(args.out)
        write_file(out.with_suffix(".json"), json.dumps({"header": header, "machine": machine, "runs": runs},
                                                        indent=2) + "\n")
        text = busy_markdown(runs) + "\n" + header_text + f"\nLoad average after: {machine['load_after']}.\n"
        write_file(out.with_suffix(".md"), text)
        print(text)
        return 0
    runs = {"help": timed(["--help"], env, python),
            "demo (README command 1)": timed(["demo", "--model", args.model, "--out", str(work / "demo")], env, python),
            "prune (next command)": timed(["prune", args.model, "--method", "amp", "--ratio", "0.2", "--out",
                                           str(work / "smol-amp20")], env, python),
            "prune (as the first command, empty cache)": timed(
                ["prune", args.model, "--method", "amp", "--ratio", "0.2", "--out", str(work / "smol-amp20-cold")],
                {**env, "SECATEURS_CACHE": str(work / "cold-cache")}, python)}
    machine["load_after"] = load()
    write_file, header, header_text = after_the_runs(machine["load_before"])
    result = {"header": header, "machine": machine, "install": install, "runs": runs}
    out = Path(args.out)
    write_file(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_file(out.with_suffix(".md"), markdown(result, header_text))
    print(markdown(result, header_text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
