"""HARP on SmolLM2-135M against the alternatives at the same cost.

One greedy alpha search over the top --max-layers layers serves every N: the search runs top
layer first and never looks below the layer it tunes, so the alphas of the top N layers are the
same whatever the deepest layer searched. For N in --layers:

* harp       the searched alphas (materialised: fused value path, no Q/K/rotary/KV cache)
* alpha=1    the same N layers with identity-matrix attention, no rescaling
* alpha=0    the same N attention blocks removed outright
* amp-heads, wanda-sp-heads   uniform head pruning removing the same number of parameters

Quality: WikiText-2 perplexity (seq 128, first --eval-tokens tokens) and, with --zero-shot,
accuracy on the five local commonsense tasks (lm-eval, --zero-shot-limit items each).
Cost: parameters, KV-cache bytes per token, and for dense vs harp: prefill tokens/s of a
--prefill-length prompt and decode tokens/s (secateurs.evaluation.speed, interleaved repeats),
beside the ideal speedups from FLOPs and weight bytes.

Writes benchmarks/results/{--name}.{json,md} (default harp_quality).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from common import ASSETS, header_markdown, result_header

from secateurs.calibration.data import load_calibration
from secateurs.calibration.statistics import collect_statistics
from secateurs.evaluation.perplexity import perplexity, read_text
from secateurs.evaluation.speed import BenchConfig, bench_models, machine_info
from secateurs.evaluation.zero_shot import zero_shot
from secateurs.files.output import write_file
from secateurs.methods import prune
from secateurs.methods.harp import harp_plan, search_alphas
from secateurs.planning.accounting import model_stats
from secateurs.planning.budget import Geometry
from secateurs.storage.loading import load_model
from secateurs.surgery.apply import apply_plan


def _ratio(value) -> str:
    """A measured ratio, or why there is none (secateurs.evaluation.speed: spread above the threshold)."""
    return f"{value:.3f}" if value is not None else "not measured reliably"

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--layers", default="4,8,12")
    p.add_argument("--calib", default=str(ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"))
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-length", type=int, default=128)
    p.add_argument("--eval-text", default=str(ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw"))
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--zero-shot", action="store_true")
    p.add_argument("--zero-shot-limit", type=int, default=200)
    p.add_argument("--prefill-length", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="harp_quality", help="results file stem (default: harp_quality)")
    args = p.parse_args()
    ns = sorted(int(n) for n in args.layers.split(","))
    header = result_header()

    dense, tok = load_model(args.model, dtype="float32")
    calib = load_calibration(args.calib, tok, num_samples=args.calib_samples, max_length=args.calib_length, seed=0)
    start = time.perf_counter()
    alphas, curves = search_alphas(dense, calib, max(ns))
    search_seconds = time.perf_counter() - start
    stats = collect_statistics(dense, calib)
    ids = tok(read_text(args.eval_text), return_tensors="pt", verbose=False).input_ids[0][: args.eval_tokens]
    total_layers = dense.config.num_hidden_layers

    def quality(model) -> dict:
        out = {"ppl_seq128": perplexity(model, tok, "", seq_len=128, ids=ids, progress=False)["perplexity"]}
        if args.zero_shot:
            res = zero_shot(model, tok, data_dir=ASSETS / "commonsense" / "llm-foundry", limit=args.zero_shot_limit)
            out["zero_shot"] = {t: r["acc"] for t, r in res["tasks"].items()}
            out["zero_shot_mean"] = sum(out["zero_shot"].values()) / len(out["zero_shot"])
        s = model_stats(model)
        return {**out, "params": s.total_params, "kv_cache_bytes_per_token": s.kv_cache_bytes_per_token}

    rows = [{"variant": "dense", "layers": 0, **quality(dense)}]
    harp_models = {"dense": dense}
    geo = Geometry.of(dense)
    for n in ns:
        top = {i: a for i, a in alphas.items() if i >= total_layers - n}
        for variant, fixed in (("harp", top), ("alpha=1", {i: 1.0 for i in top}), ("alpha=0", {i: 0.0 for i in top})):
            plan = harp_plan(dense, calib, n, alphas=fixed, progress=False)
            model = apply_plan(copy.deepcopy(dense), plan)
            rows.append({"variant": variant, "layers": n, "alphas": {str(k): v for k, v in sorted(fixed.items())},
                         **quality(model)})
            if variant == "harp":
                harp_models[f"harp N={n}"] = model
            print(rows[-1], flush=True)
        removed = dense.num_parameters() - rows[-3]["params"]  # what HARP removes at this N
        for method in ("amp-heads", "wanda-sp-heads"):
            try:
                model, plan = prune(copy.deepcopy(dense), tok, method=method, ratio=removed / geo.total_params,
                                    statistics=stats, progress=False)
                rows.append({"variant": method, "layers": n, **quality(model),
                             "heads_kept": plan.pruned_shapes()[0][0]})
            except Exception as exc:  # e.g. a target that would remove every head
                rows.append({"variant": method, "layers": n, "error": str(exc)})
            print(rows[-1], flush=True)
    config = BenchConfig(batch_sizes=(1,), prompt_lengths=(args.prefill_length,), decode_tokens=32,
                         repeats=args.repeats, warmup=1)
    speed = bench_models(harp_models, config)
    result = {"header": header, "model": args.model, "calibration": calib.description,
              "alphas": {str(k): v for k, v in alphas.items()},
              "search_curves": {str(k): v for k, v in curves.items()}, "search_seconds": search_seconds,
              "eval_tokens": args.eval_tokens, "rows": rows, "speed": speed, "machine_at_end": machine_info("cpu")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / f"{args.name}.json", json.dumps(result, indent=2, default=str))
    write_file(out / f"{args.name}.md", markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    zs = any("zero_shot_mean" in row for row in r["rows"])
    lines = [f"# HARP on {r['model']}", "", header_markdown(r["header"]),
             f"Load average at the end: {r['machine_at_end'].get('load_average')}.", "",
             f"Calibration: {r['calibration']['source']} ({r['calibration']['samples']} x "
             f"{r['calibration']['max_length']} tokens); alpha search over the top {len(r['alphas'])} layers took "
             f"{r['search_seconds']:.0f} s. Searched alphas (top layer first): "
             + ", ".join(f"L{k}={v}" for k, v in sorted(r["alphas"].items(), key=lambda kv: -int(kv[0]))), "",
             f"Perplexity: WikiText-2 test, seq 128, first {r['eval_tokens']} tokens.", "",
             "| N | variant | params | KV bytes/token | ppl seq128 |" + (" zero-shot mean |" if zs else ""),
             "| ---: | --- | ---: | ---: | ---: |" + (" ---: |" if zs else "")]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['layers']} | {row['variant']} | refused: {row['error'][:50]} | | |")
            continue
        z = f" {row['zero_shot_mean']:.4f} |" if zs else ""
        lines.append(f"| {row['layers']} | {row['variant']} | {row['params']:,} | "
                     f"{row['kv_cache_bytes_per_token']:,} | "
                     f"{row['ppl_seq128']:.2f} |{z}")
    lines += ["", "Speed against dense (median of interleaved repeats):", "",
              "| model | prefill tok/s | speedup | ideal (FLOPs) | measured/ideal | decode tok/s | speedup "
              "| ideal (bytes) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["speed"]["results"]:
        v = row["vs_baseline"]
        prefill, decode = v["prefill_speedup"], v["decode_speedup"]  # None: not measured reliably (machine busy)
        lines.append(f"| {row['model']} | {row['prefill_tokens_per_s']['median']:.0f} | {_ratio(prefill)} | "
                     f"{v['ideal_prefill_speedup']:.3f} | "
                     f"{_ratio(prefill / v['ideal_prefill_speedup'] if prefill is not None else None)} | "
                     f"{row['decode_tokens_per_s']['median']:.1f} | {_ratio(decode)} | "
                     f"{v['ideal_decode_speedup_bytes']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
