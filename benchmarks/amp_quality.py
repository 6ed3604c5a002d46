"""AMP against the width-pruning baselines, on real models.

For each model: one calibration pass collects the statistics every data-driven method needs
(reused for all ratios, as `--stats` does on the CLI); then every method x ratio prunes a fresh
copy of the dense model and is scored by WikiText-2 perplexity under the seq-128 protocol
(LLM-Pruner, FLAP) and, where the context allows, the seq-2048 protocol (Wanda, SliceGPT).
AMP's own cost is measured separately: wall time of make_plan including its calibration pass,
divided by the wall time of one plain forward pass (with LM head) over the same calibration data.

Writes benchmarks/results/amp_quality.{json,md}. Example:
    python benchmarks/amp_quality.py --models smollm2 --max-eval-tokens 16384
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
import transformers

import secateurs
from secateurs.calibration import load_calibration
from secateurs.evaluation.perplexity import perplexity, read_text
from secateurs.evaluation.speed import plain_forward_seconds
from secateurs.loading import load_model
from secateurs.methods import make_plan, prune
from secateurs.statistics import collect_statistics

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
MODELS = {"smollm2": "smollm2", "stories260K": str(ASSETS / "models" / "stories260K-hf")}
# name -> (method, selection)
VARIANTS = {
    "amp": ("amp", "standard"), "amp-reversed": ("amp", "reversed"), "random": ("amp", "random"),
    "magnitude": ("magnitude", "standard"), "wanda-sp": ("wanda-sp", "standard"), "flap": ("flap", "standard"),
    "amp-heads": ("amp-heads", "standard"), "amp-mlp": ("amp-mlp", "standard"),
}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "secateurs": secateurs.__version__,
            "python": platform.python_version()}


def run_model(name: str, args, text: str) -> dict:
    dense, tok = load_model(MODELS[name], dtype="float32")
    context = dense.config.max_position_embeddings
    calibration = load_calibration(args.calib, tok, num_samples=args.calib_samples, max_length=args.calib_length,
                                   seed=0, batch_size=args.calib_batch_size)
    plain_forward_seconds(dense, calibration)  # warm-up
    forward = min(plain_forward_seconds(dense, calibration) for _ in range(2))
    scratch = copy.deepcopy(dense)
    start = time.perf_counter()
    make_plan(scratch, "amp", 0.2, calibration=calibration, progress=False)
    amp_seconds = time.perf_counter() - start
    del scratch
    stats = collect_statistics(dense, calibration, progress=False)
    protocols = [s for s in args.seq_lens if s <= context]

    def evaluate(model) -> dict:
        return {s: perplexity(model, tok, text, seq_len=s, batch_size=max(1, 4096 // s),
                              max_windows=max(1, args.max_eval_tokens // s), progress=False) for s in protocols}

    rows = [{"method": "dense", "ratio": 0.0, "params": dense.num_parameters(), "achieved": 0.0,
             "ppl": {s: r["perplexity"] for s, r in evaluate(dense).items()}}]
    for ratio in args.ratios:
        for variant in args.methods:
            method, selection = VARIANTS[variant]
            try:
                model, plan = prune(copy.deepcopy(dense), tok, method=method, ratio=ratio, statistics=stats,
                                    selection=selection, progress=False)
            except secateurs.SecateursError as exc:
                rows.append({"method": variant, "ratio": ratio, "error": str(exc)})
                print(f"{name} {variant} {ratio}: {exc}")
                continue
            row = {"method": variant, "ratio": ratio, "params": plan.provenance["params_after"],
                   "achieved": plan.provenance["achieved_ratio_of_all"],
                   "shapes": sorted(set(plan.pruned_shapes())),
                   "ppl": {s: r["perplexity"] for s, r in evaluate(model).items()}}
            rows.append(row)
            print(f"{name} {variant} {ratio}: achieved {row['achieved']:.3f}, ppl {row['ppl']}", flush=True)
    first = next(iter(protocols))
    return {"model": name, "source": MODELS[name], "context": context, "protocols": protocols,
            "eval_windows": {s: max(1, args.max_eval_tokens // s) for s in protocols},
            "calibration": calibration.description, "calibration_hash": calibration.hash,
            "plain_forward_seconds": forward, "amp_prune_seconds": amp_seconds,
            "amp_prune_over_forward": amp_seconds / forward, "rows": rows, "first_protocol": first}


def markdown(results: list[dict], meta: dict) -> str:
    lines = ["# AMP vs width-pruning baselines", "",
             f"Machine: {meta['machine']}. Eval: WikiText-2 test (`{meta['eval_text']}`), "
             f"non-overlapping windows, first {meta['max_eval_tokens']} tokens per protocol. "
             f"Ratio = fraction of all parameters (embeddings included), uniform per layer except FLAP.", ""]
    for r in results:
        protos = r["protocols"]
        lines += [f"## {r['model']} (calibration: {r['calibration']['source']}, {r['calibration']['samples']} x "
                  f"{r['calibration']['max_length']} tokens)", "",
                  f"AMP prune time {r['amp_prune_seconds']:.2f} s = {r['amp_prune_over_forward']:.2f} x one plain "
                  f"forward over the calibration data ({r['plain_forward_seconds']:.2f} s).", "",
                  "| method | ratio | achieved | params | " + " | ".join(f"ppl seq {s}" for s in protos) + " |",
                  "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in protos) + " |"]
        for row in r["rows"]:
            if "error" in row:
                lines.append(f"| {row['method']} | {row['ratio']} | refused: {row['error'][:60]} |")
                continue
            ppl = " | ".join(f"{row['ppl'][s]:.2f}" for s in protos)
            lines.append(f"| {row['method']} | {row['ratio']} | {row['achieved']:.3f} | {row['params']:,} | {ppl} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="stories260K,smollm2")
    p.add_argument("--methods", default=",".join(VARIANTS))
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    p.add_argument("--seq-lens", default="128,2048")
    p.add_argument("--calib", default=str(ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-length", type=int, default=128)
    p.add_argument("--calib-batch-size", type=int, default=8)
    p.add_argument("--eval-text", default=str(ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw"))
    p.add_argument("--max-eval-tokens", type=int, default=16384)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    args.methods = args.methods.split(",")
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.seq_lens = [int(s) for s in args.seq_lens.split(",")]
    text = read_text(args.eval_text)
    results = [run_model(m, args, text) for m in args.models.split(",")]
    meta = {"machine": machine(), "eval_text": args.eval_text, "max_eval_tokens": args.max_eval_tokens,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "amp_quality.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    (out / "amp_quality.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
