"""sha256 of every file `secateurs prune` writes, for every method and execution path, on the real
tiny stories260K: the redesign of the pipeline must leave them byte-identical (compare two runs'
JSON with --compare). Runs in-process through the command line, which both layouts keep.

    PYTHONPATH=src python benchmarks/pipeline_hashes.py --out benchmarks/results/pipeline_hashes.json
    PYTHONPATH=src python benchmarks/pipeline_hashes.py --out /tmp/after.json --compare benchmarks/results/pipeline_hashes.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

from secateurs.output import write_file

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("SECATEURS_ASSETS", ROOT.parent / "shared" / "assets"))
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


def digest(folder: Path) -> dict[str, str]:
    """sha256 per file, plus the plan's hash without provenance.seed (the redesign gave HARP's plans
    the seed every other method records; everything else must stay byte-identical)."""
    files = {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
             for f in sorted(folder.rglob("*")) if f.is_file()}
    plan = json.loads((folder / "pruning_plan.json").read_text())
    plan["provenance"].pop("seed", None)
    files["pruning_plan.json without provenance.seed"] = hashlib.sha256(json.dumps(plan).encode()).hexdigest()
    return files


def run_all(work: Path) -> dict:
    from secateurs.cli import main

    results = {}
    for name, method_args, paths in RUNS:
        for path in paths:
            out = work / f"{name}-{path}"
            argv = ["--quiet", "prune", str(STORIES), *method_args, *CALIB, *path_args(path, work / f"offload-{name}"), "--out", str(out)]
            with contextlib.redirect_stdout(io.StringIO()):
                status = main(argv)
            results[f"{name} / {path}"] = {"exit": status, "files": digest(out) if status == 0 else {}}
            print(f"{name} / {path}: exit {status}", file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", help="an earlier run's JSON: report every file whose hash differs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = run_all(Path(work))
    write_file(Path(args.out), json.dumps(results, indent=1, sort_keys=True) + "\n")
    if not args.compare:
        return 0
    before = json.loads(Path(args.compare).read_text())
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
