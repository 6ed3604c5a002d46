"""A new user's first run, timed: `secateurs --help`, README command 1 (`secateurs demo`) with an
empty cache, then `secateurs prune smollm2 --method amp --ratio 0.2` as the next command (caches
warm) and as the very first command (empty cache).

Each command runs as a subprocess, as a user would run it; every chunk it writes to stderr is
timestamped, so the report gives each phase's duration (from the `secateurs: X ... done in` lines)
and the longest silence (the target: none over 5 s). The machine's load average is recorded before
and after, since on a shared machine every time here is inflated.

    PYTHONPATH=src python benchmarks/first_run.py --out benchmarks/results/first_run

Installs are not timed here (the machine is offline and the packages are preinstalled).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def timed(argv: list[str], env: dict) -> dict:
    """Run `python -m secateurs ARGV`; wall time, exit status, phases, the longest silence on stderr."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "secateurs", *argv], stdout=subprocess.PIPE,
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


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# First run (measured {m['date']})", "",
             f"Machine: {m['cpu_count']} cores ({m['cpu']}), load average before {m['load_before']}, after "
             f"{m['load_after']}; OMP_NUM_THREADS {m['omp_num_threads']}. Installs not timed "
             "(offline machine, packages preinstalled).", ""]
    for name, r in result["runs"].items():
        lines += [f"## {name}: `secateurs {' '.join(r['argv'])}`", "",
                  f"exit {r['exit_status']}, wall {r['wall_s']} s, longest silence on stderr "
                  f"{r['longest_silence_s']} s (after: `{r['longest_silence_after']}`)", ""]
        if r["phases"]:
            lines += ["| phase | seconds |", "| --- | ---: |"]
            lines += [f"| {p['phase']} | {p['seconds']:.1f} |" for p in r["phases"]]
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/first_run", help="results stem (.json and .md)")
    parser.add_argument("--model", default="smollm2", help="model for the demo and prune runs (default: smollm2)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="secateurs-first-run-"))
    env = {**os.environ, "SECATEURS_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
    machine = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "load_before": load(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset (torch's default: one per core)"),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    runs = {"help": timed(["--help"], env),
            "demo (README command 1)": timed(["demo", "--model", args.model, "--out", str(work / "demo")], env),
            "prune (next command)": timed(["prune", args.model, "--method", "amp", "--ratio", "0.2", "--out",
                                           str(work / "smol-amp20")], env),
            "prune (as the first command, empty cache)": timed(
                ["prune", args.model, "--method", "amp", "--ratio", "0.2", "--out", str(work / "smol-amp20-cold")],
                {**env, "SECATEURS_CACHE": str(work / "cold-cache")})}
    machine["load_after"] = load()
    result = {"machine": machine, "runs": runs}
    out = Path(args.out)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from secateurs.output import write_file

    write_file(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_file(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
