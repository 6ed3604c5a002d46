"""Hostile and careless input against the CLI: every case is classified by what it did.

    damage      the input model, a sibling "victim" file or a file outside the output changed,
                or a previous output was lost or left partial
    silent      bad input accepted: exit status 0 (or a NaN reached the saved weights)
    traceback   a raw Python traceback (an exception escaped `main`) or an "unexpected failure"
    refused     exit status 2 with a `secateurs: error:` line, nothing written    <- the goal

Run it on any checkout (PYTHONPATH=that/src) to compare versions:

    PYTHONPATH=src python benchmarks/hostile_inputs.py --out benchmarks/results/hostile_inputs.json

Needs ../shared/assets (stories260K). Runs in-process (`secateurs.cli.main`), one case at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from secateurs.output import write_file

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
STORIES = ASSETS / "models" / "stories260K-hf"
TEXT = ASSETS / "text" / "tinystories" / "tinystories_sample.txt"
PRUNE = ["--method", "magnitude", "--ratio", "0.2"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class RanTooLong(BaseException):
    """Raised by the alarm: the case was accepted and kept working (e.g. generating for minutes)."""


def _alarm(signum, frame):
    raise RanTooLong()


def run_main(argv: list[str], limit_s: int = 90) -> tuple[int | None, str, str | None]:
    """(exit status or None when an exception escaped, stderr, escaped exception type)."""
    from secateurs.cli import main

    err = io.StringIO()
    escaped = None
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit_s)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        except RanTooLong:
            code, escaped = None, "ran-too-long"
        except BaseException as exc:  # noqa: BLE001 - this is what we measure
            code, escaped = None, type(exc).__name__
        finally:
            signal.alarm(0)
    return code, err.getvalue(), escaped


def _nan_in(folder: Path) -> bool:
    from safetensors.torch import load_file

    for f in folder.glob("*.safetensors"):
        if any(t.is_floating_point() and not bool(t.isfinite().all()) for t in load_file(f).values()):
            return True
    return False


def make_world(root: Path) -> dict:
    parent = root / "M"
    shutil.copytree(STORIES, parent / "model")
    (parent / "victim.txt").write_text("must survive")
    binary = root / "binary.txt"
    binary.write_bytes(b"\x00\x01\x02\xff" * 64)
    (root / "a_folder").mkdir()
    (root / "tiny.txt").write_text("Once upon a")
    return {"model": str(parent / "model"), "parent": str(parent), "binary": str(binary),
            "folder": str(root / "a_folder"), "tiny": str(root / "tiny.txt")}


def _setup_previous_output(root: Path, w: dict) -> None:
    run_main(["prune", w["model"], "--method", "magnitude", "--ratio", "0.4", "--out", str(root / "prev")])


def _setup_foreign_folder(root: Path, w: dict) -> None:
    (root / "photos").mkdir()
    (root / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not ours")


def _setup_sharded(root: Path, w: dict, evil: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = root / "sharded"
    AutoModelForCausalLM.from_pretrained(STORIES).save_pretrained(folder, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(folder)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(data["weight_map"])[0]
    shutil.copy(folder / data["weight_map"][first], root / "evil.safetensors")
    data["weight_map"][first] = evil
    index.write_text(json.dumps(data))


def _setup_plan(root: Path, w: dict, layer: str) -> None:
    _setup_previous_output(root, w)
    rows = (root / "prev" / "pruning_plan.json").read_text().split("\n")
    last = max(i for i, r in enumerate(rows) if r.strip().startswith('{"index": 4'))
    rows[last] = "    " + layer
    (root / "plan.json").write_text("\n".join(rows))


def _setup_broken_model(root: Path, w: dict, kind: str) -> None:
    folder = root / "broken"
    shutil.copytree(STORIES, folder)
    weights = folder / "model.safetensors"
    if kind == "unknown_type":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "nonesuch"}))
    elif kind == "config_not_json":
        (folder / "config.json").write_text("{ not json")
    elif kind == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif kind == "garbled_weights":
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00" + b"garbage!" * 100)
    elif kind == "no_weights":
        weights.unlink()


def _setup_other_stats(root: Path, w: dict) -> None:
    from safetensors.torch import load_file, save_file

    run_main(["prune", w["model"], "--method", "amp", "--calib", "tinystories", "--calib-samples", "4",
              "--calib-length", "32", "--stats", str(root / "stats.safetensors"), "--out", str(root / "statsrun")])
    other = root / "other"
    shutil.copytree(STORIES, other)
    state = {k: v * 1.01 for k, v in load_file(other / "model.safetensors").items()}
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})


def _setup_bad_plan_in_folder(root: Path, w: dict) -> None:
    _setup_previous_output(root, w)
    plan = root / "prev" / "pruning_plan.json"
    plan.write_text(plan.read_text().replace('"index": 0, ', '"index": 0, "removed": true, ', 1))


def cases(w: dict, root: Path) -> list[dict]:
    """(name, issue class, setup, argv). Paths are built inside root."""
    m, out = w["model"], str(root / "out")
    c = []

    def add(name, klass, argv, setup=None, writes=None):
        c.append({"name": name, "class": klass, "argv": argv, "setup": setup, "writes": writes})

    add("--out is the parent of the input, --force", "1 output location", ["prune", m, *PRUNE, "--out", w["parent"], "--force"])
    add("--out is the input, --force", "1 output location", ["prune", m, *PRUNE, "--out", m, "--force"])
    add("--out inside the input", "1 output location", ["prune", m, *PRUNE, "--out", m + "/sub"])
    add("--out '' --force", "1 output location", ["prune", m, *PRUNE, "--out", "", "--force"])
    add("--out . --force", "1 output location", ["prune", m, *PRUNE, "--out", ".", "--force"])
    add("--out / --force", "1 output location", ["prune", m, *PRUNE, "--out", "/", "--force"])
    add("--force on a foreign folder", "1 output location", ["prune", m, *PRUNE, "--out", str(root / "photos"), "--force"],
        _setup_foreign_folder)
    add("--out is a file, --force", "1 output location", ["prune", m, *PRUNE, "--out", str(root / "M" / "victim.txt"), "--force"])
    add("demo --out is the input's parent, --force", "1 output location", ["demo", "--model", m, "--out", w["parent"], "--force"])
    for evil in ("../evil.safetensors", "/tmp/secateurs-evil.safetensors", "config.json"):
        for flag in ([], ["--streamed", "--calib", str(TEXT)], ["--device-map", '{"": "cpu"}']):
            add(f"index names {evil!r} {' '.join(flag[:1]) or 'in memory'}", "2 path traversal",
                ["prune", str(root / "sharded"), *PRUNE, *flag, "--out", out], lambda r, w, e=evil: _setup_sharded(r, w, e))
    for layer in ('{"index": 4, "attention": {"mode": "value", "alpha": NaN}}',
                  '{"index": 4, "neurons": [0, 1], "compensation": {"mlp": [NaN]}}',
                  '{"index": 4, "attention": {"mode": "value", "alpha": "0.5"}}', '{"index": 4, "heads": "all"}',
                  '{"index": "4"}', '{"index": 4, "bogus": 1}', '{"index": 4, "attention": {"mode": "fast"}}'):
        add(f"plan layer {layer}", "4 non-finite / 8 bad plan", ["prune", m, "--plan", str(root / "plan.json"), "--out", out],
            lambda r, w, l=layer: _setup_plan(r, w, l))
    add("--alpha-grid 5,nan", "4 non-finite", ["prune", m, "--method", "harp", "--top-layers", "2", "--alpha-grid", "5,nan", "--out", out])
    add("--ratio nan", "4 non-finite", ["prune", m, "--ratio", "nan", "--out", out])
    add("--flap-ratio nan", "4 non-finite", ["prune", m, "--method", "harp", "--top-layers", "2", "--flap-ratio", "nan", "--out", out])
    add("--stats from another model", "5 foreign cache", ["prune", str(root / "other"), "--method", "amp", "--stats",
                                                           str(root / "stats.safetensors"), "--out", out], _setup_other_stats)
    add("--stats with other calibration settings", "5 foreign cache",
        ["prune", m, "--method", "amp", "--calib", "tinystories", "--calib-samples", "8", "--stats",
         str(root / "stats.safetensors"), "--out", out], _setup_other_stats)
    add("plan show: plan disagrees with the weights", "6 plan vs weights", ["plan", "show", str(root / "prev")],
        _setup_bad_plan_in_folder)
    add("eval: plan disagrees with the weights", "6 plan vs weights",
        ["eval", str(root / "prev"), "--ppl", str(TEXT), "--max-windows", "1"], _setup_bad_plan_in_folder)
    add("--calib-length 100000 (self)", "7 unchecked option", ["prune", m, "--method", "amp", "--calib-length", "100000", "--out", out])
    add("--calib-length 100000 (text)", "7 unchecked option",
        ["prune", m, "--method", "amp", "--calib", str(TEXT), "--calib-length", "100000", "--out", out])
    add("--metrics ''", "7 unchecked option", ["prune", m, "--method", "consensus", "--metrics", "", "--out", out])
    add("--round-to 0", "7 unchecked option", ["prune", m, *PRUNE, "--round-to", "0", "--out", out])
    add("--layers-equivalent -1", "7 unchecked option", ["prune", m, *PRUNE, "--layers-equivalent", "-1", "--out", out])
    add("4-token calibration file", "7 unchecked option", ["prune", m, "--method", "amp", "--calib", w["tiny"], "--out", out])
    for kind in ("unknown_type", "config_not_json", "truncated_weights", "garbled_weights", "no_weights"):
        add(f"model folder: {kind}", "8/9 broken model", ["prune", str(root / "broken"), *PRUNE, "--out", out],
            lambda r, w, k=kind: _setup_broken_model(r, w, k))
    for name, data in (("empty", b""), ("garbage", b"GGUF" + bytes(range(64))), ("text", b"hello")):
        add(f"GGUF file: {name}", "8 broken model", ["info", str(root / f"{name}.gguf")],
            lambda r, w, n=name, d=data: (r / f"{n}.gguf").write_bytes(d))
    add("binary calibration file", "8 bad file", ["prune", m, "--method", "amp", "--calib", w["binary"], "--out", out])
    add("binary perplexity file", "8 bad file", ["eval", m, "--ppl", w["binary"]])
    add("binary plan file", "8 bad file", ["prune", m, "--plan", w["binary"], "--out", out])
    add("--device cuda without CUDA", "8 device", ["prune", m, *PRUNE, "--device", "cuda", "--out", out])
    add("--device nonsense", "8 device", ["prune", m, *PRUNE, "--device", "tpu", "--out", out])
    add("unwritable --out", "8 output location", ["prune", m, *PRUNE, "--out", "/proc/secateurs-out"])
    add("--out under a file", "8 output location", ["prune", m, *PRUNE, "--out", str(root / "M" / "victim.txt" / "x")])
    add("eval --out is a folder", "8 output location", ["eval", m, "--ppl", str(TEXT), "--max-windows", "1", "--out", w["folder"]])
    add("eval --out over the model's config.json", "1 output location",
        ["eval", m, "--ppl", str(TEXT), "--max-windows", "1", "--out", m + "/config.json"])
    for option, values in {"--ratio": ["-0.1", "1.5", "inf", "abc"], "--calib-samples": ["0", "-1"],
                           "--calib-length": ["1", "0"], "--calib-batch-size": ["0"], "--seed": ["-1"],
                           "--layers": ["0", "-2"], "--depth-tokens": ["0"], "--dtype": ["float7"],
                           "--calib": [w["folder"], str(root / "missing.txt")]}.items():
        for value in values:
            extra = ["--method", "consensus"] if option in ("--layers", "--depth-tokens") else []
            add(f"{option} {value}", "fuzz", ["prune", m, "--out", out, option, value, *extra])
    for argv in (["eval", m, "--ppl", str(TEXT), "--batch-size", "0"], ["eval", m, "--ppl", str(TEXT), "--limit", "nan"],
                 ["bench", m, "--repeats", "0"], ["bench", m, "--threads", "-1"], ["bench", m, "--batch-sizes", "0"],
                 ["sweep", m, "--ratios", "nan", "--ppl", str(TEXT), "--out", str(root / "s")],
                 ["demo", "--model", m, "--seq-len", "0", "--out", str(root / "d")]):
        add(" ".join(argv[:1] + argv[2:4] + argv[-2:]), "fuzz", argv)
    return c


def classify(case: dict, root: Path) -> dict:
    before = snapshot(root)
    started = time.perf_counter()
    code, err, escaped = run_main(case["argv"])
    after = snapshot(root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    outside_out = [k for k in changed if not k.startswith(("out/", "d/", "s/")) and not k.startswith(".")]
    lines = [ln for ln in err.splitlines() if ln.startswith("secateurs: error:")]
    nan_saved = (root / "out").is_dir() and _nan_in(root / "out")
    if outside_out or Path("/tmp/secateurs-evil.safetensors").exists():
        verdict = "damage"
    elif escaped == "ran-too-long":
        verdict = "silent"  # accepted, still working when stopped
    elif escaped or "Traceback" in err or "unexpected failure" in err:
        verdict = "traceback"
    elif code == 0 or nan_saved:
        verdict = "silent"
    elif code == 2 and lines and not changed:
        verdict = "refused"
    else:
        verdict = "other"
    return {"name": case["name"], "class": case["class"], "verdict": verdict, "exit": code, "escaped": escaped,
            "message": _last_message(lines, err), "changed": changed[:5], "seconds": round(time.perf_counter() - started, 2)}


def _last_message(lines: list[str], err: str) -> str:
    if lines:
        return lines[-1][len("secateurs: error: "):][:240]
    tail = [ln for ln in err.strip().splitlines() if ln.strip()]
    return tail[-1][:240] if tail else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results here (.json, and .md beside it)")
    parser.add_argument("--label", default="", help="name of the version measured (e.g. a commit)")
    args = parser.parse_args()
    import secateurs

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, case in enumerate(cases(make_world(Path(scratch) / "probe"), Path(scratch) / "probe")):
            root = Path(scratch) / f"case{index}"
            root.mkdir()
            cwd = os.getcwd()
            os.chdir(root)  # '.' and '' mean this case's folder
            try:
                world = make_world(root)
                specific = cases(world, root)[index]
                if specific["setup"]:
                    specific["setup"](root, world)
                results.append(classify(specific, root))
            finally:
                os.chdir(cwd)
                Path("/tmp/secateurs-evil.safetensors").unlink(missing_ok=True)
            r = results[-1]
            print(f"{r['verdict']:>9}  {r['class']:<24} {r['name'][:60]:<60} {r['message'][:80]}", flush=True)
            shutil.rmtree(root, ignore_errors=True)
    counts = {v: sum(r["verdict"] == v for r in results) for v in ("refused", "damage", "silent", "traceback", "other")}
    print(json.dumps(counts))
    if args.out:
        load = os.getloadavg()
        payload = {"label": args.label, "secateurs": getattr(secateurs, "__file__", ""), "counts": counts,
                   "cases": results, "machine": {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in load]}}
        write_file(Path(args.out), json.dumps(payload, indent=2) + "\n")
        md = [f"# Hostile inputs: {args.label}", "", f"{len(results)} cases: " + ", ".join(f"{k} {v}" for k, v in counts.items()), "",
              "| class | case | verdict | exit | message |", "| --- | --- | --- | --- | --- |"]
        md += [f"| {r['class']} | {r['name']} | {r['verdict']} | {r['exit']} | {r['message'].replace('|', '/')[:120] or r['escaped'] or ''} |"
               for r in results]
        write_file(Path(args.out).with_suffix(".md"), "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
