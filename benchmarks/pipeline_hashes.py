"""sha256 of every file `secateurs prune`, `recover` and `export` write, for every method and execution
path, on the real tiny stories260K: a change that only moves code must leave them byte-identical
(compare two runs' JSON with --compare; recovery.json is compared without its run times and
thread/machine facts). Runs in-process through the command line. The JSON also records, under
"header", the command, versions and machine (left out of the comparison).

    python benchmarks/pipeline_hashes.py --out benchmarks/results/pipeline_hashes.json
    python benchmarks/pipeline_hashes.py --out /tmp/after.json --compare benchmarks/results/pipeline_hashes.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

from common import ASSETS, result_header

from secateurs.cli.main import main as secateurs_main
from secateurs.files.output import write_file

HEADER = "header"  # the key of the result header: every other key is a run
STORIES = ASSETS / "models" / "stories260K-hf"
TEXT = ASSETS / "text" / "tinystories" / "tinystories_sample.txt"
CALIB = ["--calib", str(TEXT), "--calib-samples", "8", "--calib-length", "64"]

# (name, method arguments, paths it runs on)
RUNS = [
    ("amp", ["--method", "amp", "--ratio", "0.2"], ("memory", "streamed", "device-map")),
    ("amp-paper", ["--method", "amp", "--ratio", "0.2", "--rounding", "paper"], ("memory", "streamed")),
    ("amp-heads", ["--method", "amp-heads", "--ratio", "0.1"], ("memory", "streamed")),
    ("amp-mlp", ["--method", "amp-mlp", "--ratio", "0.1"], ("memory", "streamed")),
    ("amp-global-search", ["--method", "amp", "--ratio", "0.2", "--allocation", "global", "--split", "search"],
     ("memory",)),
    ("amp-sequential", ["--method", "amp", "--ratio", "0.2", "--reconstruct", "sequential"], ("memory", "streamed")),
    ("amp-dense-refit", ["--method", "amp", "--ratio", "0.2", "--reconstruct", "dense"], ("memory",)),
    ("wanda-sp", ["--method", "wanda-sp", "--ratio", "0.2"], ("memory", "streamed", "device-map")),
    ("wanda-sp-heads", ["--method", "wanda-sp-heads", "--ratio", "0.1"], ("memory",)),
    ("flap", ["--method", "flap", "--ratio", "0.2"], ("memory", "streamed", "device-map")),
    ("magnitude", ["--method", "magnitude", "--ratio", "0.2"], ("memory", "streamed", "device-map")),
    ("random", ["--method", "random", "--ratio", "0.2", "--seed", "3"], ("memory", "streamed")),
    ("harp", ["--method", "harp", "--top-layers", "2"], ("memory", "streamed", "device-map")),
    ("harp-flap", ["--method", "harp", "--top-layers", "2", "--flap-ratio", "0.1"], ("memory",)),
    ("consensus", ["--method", "consensus", "--layers", "1"], ("memory", "streamed", "device-map")),
    ("depth-bi", ["--method", "depth-bi", "--layers", "1"], ("memory", "streamed")),
    ("depth-angular", ["--method", "depth-angular", "--layers", "1"], ("memory", "streamed")),
    ("depth-cka", ["--method", "depth-cka", "--layers", "1"], ("memory",)),
    ("depth-ppl", ["--method", "depth-ppl", "--layers", "1"], ("memory",)),
    ("depth-random", ["--method", "depth-random", "--layers", "1"], ("memory", "streamed")),
]
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
              "model.layers.3": "cpu", "model.layers.4": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
              "lm_head": "cpu"}  # stories260K's five layers, two of them offloaded to disk


def path_args(path: str, offload: Path) -> list[str]:
    if path == "device-map":
        return ["--device-map", json.dumps(DEVICE_MAP), "--offload-folder", str(offload)]
    return ["--streamed"] if path == "streamed" else []


# keys of recovery.json that describe the run, not its result (times, speeds, the machine)
RUN_FACTS = ("seconds", "tok_per_s", "tokens_per_s", "elapsed", "eta", "machine", "threads", "allocator", "peak")


def without_run_facts(value):
    if isinstance(value, dict):
        return {k: without_run_facts(v) for k, v in value.items() if not any(f in k for f in RUN_FACTS)}
    if isinstance(value, list):
        return [without_run_facts(v) for v in value]
    return value


def digest(path: Path) -> dict[str, str]:
    """sha256 per file (a folder's files, or one file); recovery.json by its content less run facts and
    with the temporary work folder's path replaced by a fixed name."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    files = {}
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        if f.name == "recovery.json":
            text = data.decode().replace(str(path.parent), "WORK")
            data = json.dumps(without_run_facts(json.loads(text)), sort_keys=True).encode()
        files[str(f.relative_to(path))] = hashlib.sha256(data).hexdigest()
    return files


def cli(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return secateurs_main(["--quiet", *argv])


# (name, command after the model folder) for recovery and export, run on the `amp / memory` result
AFTER_PRUNE = [
    ("recover-full-kd", ["recover", "--teacher", str(STORIES), "--data", str(TEXT), "--tokens", "4096",
                         "--train-length", "64", "--train-batch-size", "2", "--val-tokens", "512", "--full",
                         "--threads", "1"]),
    ("recover-lora-mix", ["recover", "--teacher", str(STORIES), "--data", str(TEXT), "--tokens", "4096",
                          "--train-length", "64", "--train-batch-size", "2", "--val-tokens", "512", "--lora",
                          "--kd-ratio", "0.5", "--threads", "1"]),
    ("recover-ce", ["recover", "--data", str(TEXT), "--objective", "ce", "--tokens", "2048", "--train-length", "64",
                    "--val-tokens", "512", "--threads", "1"]),
    ("export-f32", ["export", "--outtype", "f32"]),
    ("export-q8_0", ["export", "--outtype", "q8_0"]),
]


def run_all(work: Path) -> dict:
    results = {}
    for name, method_args, paths in RUNS:
        for path in paths:
            out = work / f"{name}-{path}"
            status = cli(["prune", str(STORIES), *method_args, *CALIB, *path_args(path, work / f"offload-{name}"),
                          "--out", str(out)])
            results[f"{name} / {path}"] = {"exit": status, "files": digest(out) if status == 0 else {}}
            print(f"{name} / {path}: exit {status}", file=sys.stderr)
    pruned = work / "amp-memory"
    for name, command in AFTER_PRUNE:
        out = work / (f"{name}.gguf" if command[0] == "export" else name)
        status = cli([command[0], str(pruned), *command[1:], "--out", str(out)])
        results[f"{name} / amp"] = {"exit": status, "files": digest(out) if status == 0 else {}}
        print(f"{name} / amp: exit {status}", file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", help="an earlier run's JSON: report every file whose hash differs")
    args = parser.parse_args()
    header = result_header()
    with tempfile.TemporaryDirectory() as work:
        results = run_all(Path(work))
    write_file(Path(args.out), json.dumps({HEADER: header, **results}, indent=1, sort_keys=True) + "\n")
    if not args.compare:
        return 0
    before = json.loads(Path(args.compare).read_text())
    before.pop(HEADER, None)
    differ = [f"{run}: {file}" for run in sorted(set(before) | set(results))
              for file in sorted(set(before.get(run, {}).get("files", {})) | set(results.get(run, {}).get("files", {})))
              if before.get(run, {}).get("files", {}).get(file) != results.get(run, {}).get("files", {}).get(file)]
    missing = [run for run in before if before[run]["exit"] != results.get(run, {}).get("exit")]
    print(f"{len(results)} runs; {len(differ)} files differ; exit status differs in {missing or 'none'}")
    for line in differ:
        print("  differs:", line)
    return 1 if differ or missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
