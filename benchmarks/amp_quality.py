"""AMP against the width-pruning baselines, on real models, with the width-quality knobs: paper
shapes, uniform shapes with the balanced split, least-squares reconstruction (`reconstruct`), global
per-layer allocation (`allocation`), the data-chosen attention share (`split`), alone and combined.

For each model: one calibration pass collects the statistics every data-driven method needs
(with Gram matrices, for dense reconstruction; reused for all ratios, as `--stats` does on the
CLI); then every method x ratio prunes a fresh copy of the dense model and is scored by WikiText-2
perplexity under the seq-128 protocol (LLM-Pruner, FLAP) and, where the context allows, the
seq-2048 protocol (Wanda, SliceGPT); optionally by mean zero-shot accuracy (lm-eval, local task
files). Every row records its own prune time beyond the shared statistics pass (split search,
reconstruction pass, surgery). End-to-end cost: make_plan + surgery from scratch (its own
calibration pass included) for amp-uniform-balanced and for --default-variant (amp), divided by the
wall time of one plain forward pass (with LM head) over the same calibration data.

Writes benchmarks/results/amp_quality{--tag}.{json,md}. Example:
    python benchmarks/amp_quality.py --models smollm2 --max-eval-tokens 16384
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

from common import ASSETS, header_markdown, result_header

import secateurs
from secateurs.calibration.data import load_calibration
from secateurs.calibration.statistics import collect_statistics
from secateurs.evaluation.perplexity import perplexity, read_text
from secateurs.evaluation.speed import plain_forward_seconds
from secateurs.evaluation.zero_shot import zero_shot
from secateurs.files.output import write_file
from secateurs.methods import prune
from secateurs.methods.options import methods_taking
from secateurs.storage.loading import load_model

MODELS = {"smollm2": "smollm2", "stories260K": str(ASSETS / "models" / "stories260K-hf")}
# name -> (method, selection, options of secateurs.prune). The AMP rows name every knob, so that
# they mean the same whatever the defaults are; "amp" alone is amp's default.
OFF = {"allocation": "uniform", "split": "balanced", "reconstruct": "none"}
SEQ = {"reconstruct": "sequential"}
VARIANTS = {
    "amp": ("amp", "standard", {}), "amp-reversed": ("amp", "reversed", OFF), "random": ("amp", "random", OFF),
    "magnitude": ("magnitude", "standard", {}), "wanda-sp": ("wanda-sp", "standard", {}),
    "flap": ("flap", "standard", {}), "amp-heads": ("amp-heads", "standard", {}),
    "amp-mlp": ("amp-mlp", "standard", {}),
    "amp-paper": ("amp", "standard", {"rounding": "paper"}),
    "amp-uniform-balanced": ("amp", "standard", OFF),  # every knob off: uniform shapes, balanced split
    "amp+reconstruct": ("amp", "standard", {**OFF, **SEQ}),
    "amp+reconstruct-dense": ("amp", "standard", {**OFF, "reconstruct": "dense"}),
    "amp+global": ("amp", "standard", {**OFF, "allocation": "global"}),
    "amp+split": ("amp", "standard", {**OFF, "split": "search"}),
    "amp+global+split": ("amp", "standard", {**OFF, "allocation": "global", "split": "search"}),
    "amp+global+reconstruct": ("amp", "standard", {**OFF, "allocation": "global", **SEQ}),
    "amp+split+reconstruct": ("amp", "standard", {**OFF, "split": "search", **SEQ}),
    "amp+global+split+reconstruct": ("amp", "standard", {"allocation": "global", "split": "search", **SEQ}),
    "amp+global+split+reconstruct-dense": ("amp", "standard", {"allocation": "global", "split": "search",
                                                                "reconstruct": "dense"}),
    "amp+global+split+reconstruct-d0.1": ("amp", "standard", {"allocation": "global", "split": "search", **SEQ,
                                                               "damping": 0.1}),
    "amp-mlp+reconstruct": ("amp-mlp", "standard", SEQ),
    "amp-mlp+global+reconstruct": ("amp-mlp", "standard", {"allocation": "global", **SEQ}),
    "flap+reconstruct": ("flap", "standard", SEQ),
    "wanda-sp+reconstruct": ("wanda-sp", "standard", SEQ),
}
DEFAULT_VARIANT = "amp"  # the variant timed end to end beside amp-uniform-balanced


def timed_prune(model, tok, variant: str, ratio: float, **options):
    method, selection, extra = VARIANTS[variant]
    if method in methods_taking("selection"):  # FLAP chooses by its own global threshold
        extra = {"selection": selection, **extra}
    start = time.perf_counter()
    model, plan = prune(model, tok, method=method, ratio=ratio, progress=False, **{**options, **extra})
    return model, plan, time.perf_counter() - start


def run_model(name: str, args, text: str) -> dict:
    dense, tok = load_model(MODELS[name], dtype="float32")
    context = dense.config.max_position_embeddings
    calibration = load_calibration(args.calib, tok, num_samples=args.calib_samples, max_length=args.calib_length,
                                   seed=0, batch_size=args.calib_batch_size)
    plain_forward_seconds(dense, calibration)  # warm-up
    forward = min(plain_forward_seconds(dense, calibration) for _ in range(2))
    end_to_end = {}
    for variant in dict.fromkeys(["amp-uniform-balanced", args.default_variant] if args.end_to_end else []):
        _, _, seconds = timed_prune(copy.deepcopy(dense), tok, variant, 0.2, calibration=calibration)
        end_to_end[variant] = {"seconds": seconds, "over_forward": seconds / forward}
        print(f"{name} end-to-end {variant} 0.2: {seconds:.1f} s = {seconds / forward:.2f} x forward", flush=True)
    start = time.perf_counter()
    stats = collect_statistics(dense, calibration, progress=False, gram=True)
    stats_seconds = time.perf_counter() - start
    protocols = [s for s in args.seq_lens if s <= context]

    def evaluate(model) -> dict:
        return {s: perplexity(model, tok, text, seq_len=s, batch_size=max(1, 4096 // s),
                              max_windows=max(1, args.max_eval_tokens // s), progress=False) for s in protocols}

    def accuracy(model, variant, ratio) -> dict | None:
        if not args.tasks or (variant not in args.zero_shot_variants or ratio not in args.zero_shot_ratios):
            return None
        out = zero_shot(model, tok, args.tasks, data_dir=args.data_dir, limit=args.limit, batch_size=16)
        return {"mean_acc": out.get("mean_acc"), "tasks": {k: v["acc"] for k, v in out["tasks"].items()},
                "limit": args.limit}

    rows = [{"method": "dense", "ratio": 0.0, "params": dense.num_parameters(), "achieved": 0.0,
             "ppl": {s: r["perplexity"] for s, r in evaluate(dense).items()},
             "zero_shot": accuracy(dense, "dense", 0.0) if args.tasks else None}]
    for ratio in args.ratios:
        for variant in args.methods:
            try:
                model, plan, seconds = timed_prune(copy.deepcopy(dense), tok, variant, ratio, statistics=stats,
                                                   calibration=calibration)
            except secateurs.SecateursError as exc:
                rows.append({"method": variant, "ratio": ratio, "error": str(exc)})
                print(f"{name} {variant} {ratio}: {exc}")
                continue
            shapes = plan.pruned_shapes()
            row = {"method": variant, "ratio": ratio, "params": plan.provenance["params_after"],
                   "achieved": plan.provenance["achieved_ratio_of_all"], "prune_seconds_after_stats": seconds,
                   "uniform": len(set(shapes)) == 1, "shapes": sorted(set(shapes)),
                   "attention_share": (plan.provenance.get("split") or {}).get("attention_share"),
                   "split_evidence": (plan.provenance.get("split") or {}).get("candidates"),
                   "ppl": {s: r["perplexity"] for s, r in evaluate(model).items()}}
            row["zero_shot"] = accuracy(model, variant, ratio)
            rows.append(row)
            print(f"{name} {variant} {ratio}: achieved {row['achieved']:.3f}, {seconds:.1f} s, ppl {row['ppl']}"
                  + (f", acc {row['zero_shot']['mean_acc']:.4f}" if row["zero_shot"] else ""), flush=True)
            del model
    first = next(iter(protocols))
    return {"model": name, "source": MODELS[name], "context": context, "protocols": protocols,
            "eval_windows": {s: max(1, args.max_eval_tokens // s) for s in protocols},
            "calibration": calibration.description, "calibration_hash": calibration.hash,
            "plain_forward_seconds": forward, "statistics_seconds_with_gram": stats_seconds,
            "end_to_end": end_to_end, "rows": rows, "first_protocol": first}


def markdown(results: list[dict], meta: dict) -> str:
    lines = ["# AMP vs width-pruning baselines, with the width-quality knobs", "",
             header_markdown(meta["header"]),
             f"Load average at the end: {', '.join(f'{x:.2f}' for x in meta['load_average_end'])} (on a shared "
             "machine times are indicative).", "",
             f"Eval: WikiText-2 test (`{meta['eval_text']}`), non-overlapping windows, first "
             f"{meta['max_eval_tokens']} tokens per protocol. Ratio = fraction of all parameters (embeddings "
             "included). Zero-shot: mean accuracy of " + (", ".join(meta["tasks"]) if meta["tasks"] else "none")
             + (f", {meta['limit']} items each" if meta["tasks"] else "") + ".", ""]
    for r in results:
        protos = r["protocols"]
        lines += [f"## {r['model']} (calibration: {r['calibration']['source']}, {r['calibration']['samples']} x "
                  f"{r['calibration']['max_length']} tokens)", "",
                  f"One plain forward over the calibration data: {r['plain_forward_seconds']:.2f} s. Shared statistics "
                  f"pass with Gram matrices: {r['statistics_seconds_with_gram']:.2f} s. End to end at 0.2 (own "
                  "calibration pass included): " + "; ".join(f"{v} {e['seconds']:.1f} s = {e['over_forward']:.2f} x "
                                                             "forward" for v, e in r["end_to_end"].items()) + ".", "",
                  "| method | ratio | achieved | params | layout | attention share | s after stats | "
                  + " | ".join(f"ppl seq {s}" for s in protos) + " | zero-shot mean |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: | "
                  + " | ".join("---:" for _ in protos) + " | ---: |"]
        for row in r["rows"]:
            if "error" in row:
                lines.append(f"| {row['method']} | {row['ratio']} | refused: {row['error'][:60]} |")
                continue
            ppl = " | ".join(f"{row['ppl'][s]:.2f}" for s in protos)
            share = f"{row['attention_share']:.3f}" if row.get("attention_share") is not None else ""
            layout = "" if row["method"] == "dense" else ("uniform" if row.get("uniform") else "per-layer")
            seconds = f"{row['prune_seconds_after_stats']:.1f}" if "prune_seconds_after_stats" in row else ""
            acc = f"{row['zero_shot']['mean_acc']:.4f}" if row.get("zero_shot") else ""
            lines.append(f"| {row['method']} | {row['ratio']} | {row['achieved']:.3f} | {row['params']:,} | {layout} | "
                         f"{share} | {seconds} | {ppl} | {acc} |")
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
    p.add_argument("--default-variant", default=DEFAULT_VARIANT, choices=sorted(VARIANTS))
    p.add_argument("--no-end-to-end", dest="end_to_end", action="store_false",
                   help="skip the from-scratch timing of amp-uniform-balanced and --default-variant")
    p.add_argument("--tasks", default="", help="comma list of zero-shot tasks (empty: none)")
    p.add_argument("--data-dir", default=str(ASSETS / "commonsense" / "llm-foundry"))
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--zero-shot-variants", default="", help="variants scored zero-shot (default: all in --methods)")
    p.add_argument("--zero-shot-ratios", default="", help="ratios scored zero-shot (default: all)")
    p.add_argument("--tag", default="", help="suffix of the result files: amp_quality{tag}.json/md")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    args.methods = args.methods.split(",")
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.seq_lens = [int(s) for s in args.seq_lens.split(",")]
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.zero_shot_variants = set(args.zero_shot_variants.split(",") if args.zero_shot_variants else args.methods) | {
        "dense"}
    args.zero_shot_ratios = set(float(r) for r in args.zero_shot_ratios.split(",")) if args.zero_shot_ratios else set(
        args.ratios) | {0.0}
    text = read_text(args.eval_text)
    header = result_header()
    results = [run_model(m, args, text) for m in args.models.split(",")]
    meta = {"header": header, "eval_text": args.eval_text, "max_eval_tokens": args.max_eval_tokens,
            "tasks": args.tasks, "limit": args.limit, "load_average_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    write_file(out / f"amp_quality{args.tag}.json", json.dumps({"meta": meta, "results": results}, indent=2,
                                                                 default=str))
    write_file(out / f"amp_quality{args.tag}.md", markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
