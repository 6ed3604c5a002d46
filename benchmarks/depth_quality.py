"""Depth pruning: Consensus against single-metric layer pruners and against AMP at equal parameters.

For each model and each k (layers removed):

* consensus one-shot: the k smallest rank sums over cka, cosine, angular, wasserstein, procrustes,
  permutation (final-normed output with the layer skipped vs kept);
* consensus iterative: remove one layer, re-score the shortened model, repeat;
* each single metric alone, one-shot (the same metrics, plus nll = Shortened-LLaMA's perplexity
  criterion and bi = ShortGPT's block influence);
* depth-angular: Gromov et al.'s contiguous block; depth-random (3 seeds): the floor;
* AMP at the same parameter count (make_plan(..., "amp", layers_equivalent=k)).

One scoring pass with every metric gives every one-shot ranking (the k-layer choice is the top k
of the ranking), as the metrics share the partial forwards; iterative consensus is run once for the
largest k and its first k removals give the smaller ones (greedy removal is prefix-closed).
Perplexity: WikiText-2 test, non-overlapping windows of --seq-len tokens, the first
--max-eval-tokens tokens only (bounded so a loaded 2-core CPU finishes). Decode speed: dense vs
the consensus-pruned models with `secateurs.evaluation.speed.bench_models` (interleaved, medians).
Zero-shot accuracy: only when `lm_eval` is installed (secateurs.evaluation.zero_shot needs it).

Writes benchmarks/results/depth_quality.{json,md}. Example:
    python benchmarks/depth_quality.py --models smollm2 --ks 3,6,9
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import ASSETS, command_line, header_markdown, result_header

from secateurs.calibration.data import load_calibration
from secateurs.calibration.statistics import collect_statistics
from secateurs.criteria.consensus import consensus_ranking
from secateurs.criteria.depth_scores import capture_traces, score_layers
from secateurs.evaluation.perplexity import perplexity, read_text
from secateurs.evaluation.speed import BenchConfig, bench_models, machine_info, plain_forward_seconds
from secateurs.evaluation.zero_shot import zero_shot
from secateurs.files.output import write_file
from secateurs.methods import make_plan, prune
from secateurs.methods.options import CONSENSUS_METRICS
from secateurs.planning.geometry import layer_removal_plan
from secateurs.storage.loading import load_model
from secateurs.surgery.apply import apply_plan

MODELS = {"smollm2": "smollm2", "stories260K": str(ASSETS / "models" / "stories260K-hf")}
SINGLE = list(CONSENSUS_METRICS) + ["nll", "bi"]
LABELS = {"nll": "depth-ppl (nll)", "bi": "depth-bi (ShortGPT)", "cka": "depth-cka"}



def _ratio(value) -> str:
    """A measured ratio, or why there is none (secateurs.evaluation.speed: spread above the threshold)."""
    return f"{value:.2f}" if value is not None else "not measured reliably"

def model_args(name: str, args):
    if name == "stories260K":  # a TinyStories toy: its own text for both (overlapping: a sanity check only)
        args = copy.copy(args)
        args.calib = args.eval_text = str(ASSETS / "text" / "tinystories" / "tinystories_sample.txt")
    return args


def run_model(name: str, ks: list[int], args, save) -> dict:
    dense, tok = load_model(MODELS[name], dtype="float32")
    num_layers = dense.config.num_hidden_layers
    args = model_args(name, args)
    calib = load_calibration(args.calib, tok, num_samples=args.calib_samples, max_length=args.calib_length, seed=0,
                             batch_size=8)
    text = read_text(args.eval_text)
    ids = tok(text, return_tensors="pt").input_ids[0][: args.max_eval_tokens]
    cache: dict[tuple, float] = {}

    def ppl(model, key=None) -> float:
        if key is not None and key in cache:
            return cache[key]
        r = perplexity(model, tok, "", seq_len=args.seq_len, batch_size=8, progress=False, ids=ids)
        if key is not None:
            cache[key] = r["perplexity"]
        return r["perplexity"]

    def removal_ppl(layers) -> float:
        key = tuple(sorted(layers))
        if key not in cache:
            cache[key] = ppl(apply_plan(copy.deepcopy(dense), layer_removal_plan(dense, key)))
        return cache[key]

    plain_forward_seconds(dense, calib)
    forward = min(plain_forward_seconds(dense, calib) for _ in range(2))
    dense_ppl = ppl(dense, ())
    candidates = list(range(1, num_layers - 1))
    # one scoring pass, every metric
    t0 = time.perf_counter()
    traces = capture_traces(dense, calib, args.tokens, seed=0, progress=False)
    scored = score_layers(dense, traces, candidates, SINGLE, progress=True)
    all_metrics_seconds = time.perf_counter() - t0
    forwards_only_seconds = scored.timings["forwards"]  # the partial forwards (+ nll's LM head), before distances
    consensus_order = consensus_ranking({m: scored.scores[m] for m in CONSENSUS_METRICS})
    rankings = {"consensus": [r.candidate for r in consensus_order]}
    for m in SINGLE:
        rankings[LABELS.get(m, m)] = [r.candidate for r in consensus_ranking({m: scored.scores[m]})]
    stats = collect_statistics(dense, calib, progress=False)
    rows = [{"method": "dense", "k": 0, "layers": [], "params": dense.num_parameters(), "ppl": dense_ppl}]
    speed_models = {"dense": dense}
    amp_models = {}
    for k in ks:
        choices = {f"{m}": rank[:k] for m, rank in rankings.items()}
        block = make_plan(dense, "depth-angular", layers=k, calibration=calib, max_tokens=args.tokens, progress=False)
        choices["depth-angular (Gromov block)"] = block.provenance["layers_removed"]
        for method, layers in choices.items():
            rows.append({"method": method, "k": k, "layers": sorted(layers), "ppl": removal_ppl(layers)})
            print(f"{name} k={k} {method}: layers {sorted(layers)} ppl {rows[-1]['ppl']:.2f}", flush=True)
        randoms = [make_plan(dense, "depth-random", layers=k, seed=s).provenance["layers_removed"] for s in range(3)]
        rand_ppl = [removal_ppl(r) for r in randoms]
        rows.append({"method": "depth-random (mean of 3 seeds)", "k": k, "layers": randoms,
                     "ppl": sum(rand_ppl) / len(rand_ppl), "ppl_each": rand_ppl})
        amp_model, amp_plan = prune(copy.deepcopy(dense), tok, method="amp", ratio=None, layers_equivalent=k,
                                    statistics=stats, progress=False)
        amp_models[k] = amp_model
        rows.append({"method": "AMP (same parameters)", "k": k, "layers": [],
                     "params": amp_plan.provenance["params_after"],
                     "shapes": sorted(set(amp_plan.pruned_shapes())), "ppl": ppl(amp_model)})
        print(f"{name} k={k} AMP: ppl {rows[-1]['ppl']:.2f}", flush=True)
        depth_model = apply_plan(copy.deepcopy(dense), layer_removal_plan(dense, rankings["consensus"][:k]))
        for r in rows:
            if r["k"] == k and "params" not in r:
                r["params"] = depth_model.num_parameters()
        speed_models[f"consensus k={k}"] = depth_model
    speed = None
    if not args.no_speed:
        config = BenchConfig(batch_sizes=(1,), prompt_lengths=(args.speed_prompt,), decode_tokens=args.decode_tokens,
                             repeats=args.repeats, warmup=1)
        bench = bench_models(speed_models, config, progress=False)
        speed = []
        for r in bench["results"]:
            k = 0 if r["model"] == "dense" else int(r["model"].split("=")[1])
            ideal_layers = num_layers / (num_layers - k)
            speed.append({"model": r["model"], "k": k, "decode_tokens_per_s": r["decode_tokens_per_s"]["median"],
                          "decode_spread": r["decode_tokens_per_s"]["spread"],
                          "decode_speedup": r["vs_baseline"]["decode_speedup"],
                          "ideal_layers_only": ideal_layers,
                          "ideal_bytes": r["vs_baseline"]["ideal_decode_speedup_bytes"],
                          "fraction_of_ideal_bytes": (r["vs_baseline"]["decode_speedup"]
                                                      / r["vs_baseline"]["ideal_decode_speedup_bytes"]
                                                      if r["vs_baseline"]["decode_speedup"] is not None else None)})
    result = {"model": name, "source": MODELS[name], "num_layers": num_layers, "ks": ks,
              "calibration": calib.description, "calibration_hash": calib.hash, "scoring_tokens": scored.tokens,
              "eval": {"text": args.eval_text, "seq_len": args.seq_len, "tokens": int(ids.numel())},
              "cost": {"plain_forward_seconds": forward, "candidates": len(candidates),
                       "all_metrics_one_round_seconds": all_metrics_seconds,
                       "partial_forwards_only_seconds": forwards_only_seconds,
                       "all_metrics_over_forward_per_candidate": all_metrics_seconds / (forward * len(candidates))},
              "scores": scored.scores, "rows": rows, "speed": speed,
              "zero_shot": "skipped: lm_eval is not installed (secateurs.evaluation.zero_shot needs it)"}
    save(result)
    try:
        import lm_eval  # noqa: F401, PLC0415 (optional: zero-shot accuracy only where lm_eval is installed)
        result["zero_shot"] = "not requested (--zero-shot-k 0)"
        if args.zero_shot_k and name != "stories260K":
            result["zero_shot"] = run_zero_shot(dense, tok, rows, amp_models, args)
        save(result)
    except ImportError:
        pass
    if args.skip_iterative:
        return result
    add_iterative(result, dense, calib, removal_ppl, ks, args, save)
    return result


def add_iterative(result, dense, calib, removal_ppl, ks, args, save) -> None:
    """Iterative consensus to max(ks) (greedy removal is prefix-closed: its first k removals are the
    k-layer answer), one row per k beside the one-shot consensus row."""
    name, rows = result["model"], result["rows"]
    t0 = time.perf_counter()
    iterative = make_plan(dense, "consensus", layers=max(ks), iterative=True, calibration=calib,
                          max_tokens=args.tokens, progress=True)
    result["cost"][f"iterative_{max(ks)}_rounds_seconds"] = time.perf_counter() - t0
    order = [r["removed"][0] for r in iterative.provenance["rounds"]]
    result["iterative_order"] = order
    for k in ks:
        at = max(i for i, r in enumerate(rows) if r["k"] == k and r["method"] == "consensus") + 1
        rows.insert(at, {"method": "consensus iterative", "k": k, "layers": sorted(order[:k]),
                         "params": rows[at - 1]["params"], "ppl": removal_ppl(order[:k])})
        print(f"{name} k={k} consensus iterative: layers {sorted(order[:k])} ppl {rows[at]['ppl']:.2f}", flush=True)
    save(result)


def iterative_only(name: str, ks: list[int], args) -> dict:
    """Iterative consensus alone, for a second process while the first one evaluates; --merge adds
    it to the main results."""
    dense, tok = load_model(MODELS[name], dtype="float32")
    args = model_args(name, args)
    calib = load_calibration(args.calib, tok, num_samples=args.calib_samples, max_length=args.calib_length, seed=0,
                             batch_size=8)
    ids = tok(read_text(args.eval_text), return_tensors="pt").input_ids[0][: args.max_eval_tokens]

    def removal_ppl(layers) -> float:
        model = apply_plan(copy.deepcopy(dense), layer_removal_plan(dense, sorted(layers)))
        return perplexity(model, tok, "", seq_len=args.seq_len, batch_size=8,
                          progress=False, ids=ids)["perplexity"]

    result = {"model": name, "calibration_hash": calib.hash, "cost": {}, "rows": [
        {"method": "consensus", "k": k, "layers": [], "params": None} for k in ks]}
    add_iterative(result, dense, calib, removal_ppl, ks, args, lambda r: None)
    result["rows"] = [r for r in result["rows"] if r["method"] == "consensus iterative"]
    return result


def merge_iterative(main: dict, extra: dict) -> None:
    assert main["calibration_hash"] == extra["calibration_hash"], "iterative run used other calibration data"
    main["rows"] = [r for r in main["rows"] if r["method"] != "consensus iterative"]
    main["iterative_order"] = extra["iterative_order"]
    main["cost"].update(extra["cost"])
    for row in extra["rows"]:
        at = max(i for i, r in enumerate(main["rows"]) if r["k"] == row["k"] and r["method"] == "consensus") + 1
        row["params"] = main["rows"][at - 1]["params"]
        main["rows"].insert(at, row)


ZERO_SHOT_METHODS = ("dense", "consensus", "consensus iterative", "depth-bi (ShortGPT)", "AMP (same parameters)")


def run_zero_shot(dense, tok, rows, amp_models, args) -> dict:
    """Zero-shot accuracy (lm-eval, local llm-foundry jsonl files, --zero-shot-limit items per task) of
    the dense model and the main methods at k = --zero-shot-k."""
    k = args.zero_shot_k
    out = {"k": k, "limit": args.zero_shot_limit, "data_dir": args.zero_shot_data, "results": {}}
    for row in rows:
        if row["method"] not in ZERO_SHOT_METHODS or row["k"] not in (0, k):
            continue
        if row["method"] == "dense":
            model = dense
        elif row["method"].startswith("AMP"):
            model = amp_models[k]
        else:
            model = apply_plan(copy.deepcopy(dense), layer_removal_plan(dense, row["layers"]))
        r = zero_shot(model, tok, data_dir=args.zero_shot_data, limit=args.zero_shot_limit, batch_size=16)
        out["results"][row["method"]] = {"mean_acc": r.get("mean_acc"),
                                         "acc": {t: v["acc"] for t, v in r["tasks"].items()},
                                         "acc_norm": {t: v["acc_norm"] for t, v in r["tasks"].items()},
                                         "samples": {t: v["samples"] for t, v in r["tasks"].items()},
                                         "lm_eval": r["lm_eval_version"]}
        print(f"zero-shot {row['method']} k={row['k']}: mean acc {r.get('mean_acc')}", flush=True)
    return out


def markdown(results: list[dict], meta: dict) -> str:
    lines = ["# Depth pruning: Consensus vs single metrics vs AMP at equal parameters", "",
             header_markdown(meta["header"]),
             f"Load average at the end: {meta['machine']['load_average']} (on a shared machine timings are noisy)."
             + (f" Iterative rows merged by `{meta['merged_by']}`." if meta.get("merged_by") else ""), ""]
    for r in results:
        c, e = r["calibration"], r["eval"]
        cost = r["cost"]
        lines += [f"## {r['model']} ({r['num_layers']} layers)", "",
                  f"Calibration: {c['source']} ({c['samples']} x {c['max_length']} tokens), layers scored on a seeded "
                  f"subsample of {r['scoring_tokens']} real tokens; first and last layer protected. Perplexity: "
                  f"`{Path(e['text']).name}`, first {e['tokens']} tokens, windows of {e['seq_len']}.", "",
                  "| method | k | layers removed | params | ppl |", "| --- | ---: | --- | ---: | ---: |"]
        for row in r["rows"]:
            layers = row["layers"]
            shown = ("AMP " + ", ".join(f"{h}h/{kv}kv/{n}n" for h, kv, n in row["shapes"])) if "shapes" in row else (
                "3 random sets" if layers and isinstance(layers[0], list) else str(layers))
            lines.append(f"| {row['method']} | {row['k']} | {shown} | {row['params']:,} | {row['ppl']:.2f} |")
        lines += ["", f"Scoring cost: one round with all {len(r['scores'])} metrics over {cost['candidates']} "
                  f"candidates took {cost['all_metrics_one_round_seconds']:.1f} s = "
                  f"{cost['all_metrics_over_forward_per_candidate']:.2f} x (one plain forward over the calibration "
                  f"data, {cost['plain_forward_seconds']:.2f} s) per candidate; the partial forwards alone "
                  f"{cost['partial_forwards_only_seconds']:.1f} s (incl. the LM head for nll), the distances the rest. "
                  + (f"Iterative consensus to k={max(r['ks'])}: "
                     f"{cost['iterative_' + str(max(r['ks'])) + '_rounds_seconds']:.1f} s; removal order "
                     f"{r['iterative_order']}." if "iterative_order" in r else "Iterative consensus: not run yet."),
                  ""]
        if r["speed"]:
            lines += ["Decode speed (batch 1, greedy, KV cache; consensus one-shot models):", "",
                      "| model | decode tok/s | speedup | ideal L/(L-k) | ideal (weight+KV bytes) "
                      "| speedup / ideal bytes |",
                      "| --- | ---: | ---: | ---: | ---: | ---: |"]
            for s in r["speed"]:
                lines.append(f"| {s['model']} | {s['decode_tokens_per_s']:.1f} (±{100 * s['decode_spread']:.0f}%) | "
                             f"{_ratio(s['decode_speedup'])} | {s['ideal_layers_only']:.2f} | {s['ideal_bytes']:.2f} | "
                             f"{s['fraction_of_ideal_bytes']:.2f} |")
            lines.append("")
        z = r["zero_shot"]
        if isinstance(z, dict):
            tasks = list(next(iter(z["results"].values()))["acc"]) if z["results"] else []
            lines += [f"Zero-shot accuracy at k={z['k']} (lm-eval {next(iter(z['results'].values()))['lm_eval']}, "
                      f"local llm-foundry files, first {z['limit']} items per task, acc):", "",
                      "| method | " + " | ".join(tasks) + " | mean |", "| --- |" + " ---: |" * (len(tasks) + 1)]
            for method, v in z["results"].items():
                lines.append(f"| {method} | " + " | ".join(f"{100 * v['acc'][t]:.1f}" for t in tasks)
                             + f" | {100 * v['mean_acc']:.1f} |")
            lines.append("")
        else:
            lines += [f"Zero-shot: {z}.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="stories260K,smollm2")
    p.add_argument("--ks", default="3,6,9", help="layers to remove (stories260K: 1,2 whatever is given)")
    p.add_argument("--calib", default=str(ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"))
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-length", type=int, default=128)
    p.add_argument("--tokens", type=int, default=2048, help="scoring tokens (seeded subsample)")
    p.add_argument("--eval-text", default=str(ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw"))
    p.add_argument("--max-eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--speed-prompt", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--zero-shot-k", type=int, default=6, help="zero-shot accuracy at this k (0: none)")
    p.add_argument("--zero-shot-limit", type=int, default=200, help="items per task")
    p.add_argument("--zero-shot-data", default=str(ASSETS / "commonsense" / "llm-foundry"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip-iterative", action="store_true", help="leave iterative consensus out")
    p.add_argument("--iterative-only", action="store_true",
                   help="run iterative consensus alone into --out/depth_quality_iterative.json")
    p.add_argument("--merge", action="store_true", help="merge depth_quality_iterative.json into the results")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"header": result_header(), "args": vars(args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def save(partial: dict | None = None) -> str:
        """Write what is done so far (a long run on a shared CPU leaves usable results if cut)."""
        meta["machine"] = machine_info()
        done = results + ([partial] if partial is not None else [])
        write_file(out / "depth_quality.json", json.dumps({"meta": meta, "results": done}, indent=2,
                                                           default=str) + "\n")
        text = markdown(done, meta)
        write_file(out / "depth_quality.md", text)
        return text

    if args.iterative_only:
        extra = [iterative_only(name, [1, 2] if name == "stories260K" else ks, args) for name in args.models.split(",")]
        write_file(out / "depth_quality_iterative.json", json.dumps({"header": meta["header"], "results": extra},
                                                                     indent=2) + "\n")
        return
    if args.merge:  # the main results + a separate --iterative-only run
        saved = json.loads((out / "depth_quality.json").read_text())
        meta.update({k: v for k, v in saved["meta"].items() if k not in ("machine",)})
        meta["merged_by"] = command_line()
        results[:] = saved["results"]
        iterative = json.loads((out / "depth_quality_iterative.json").read_text())
        for extra in iterative["results"] if isinstance(iterative, dict) else iterative:
            merge_iterative(next(r for r in results if r["model"] == extra["model"]), extra)
        meta["machine"] = saved["meta"]["machine"]
        write_file(out / "depth_quality.json", json.dumps({"meta": meta, "results": results}, indent=2,
                                                           default=str) + "\n")
        write_file(out / "depth_quality.md", markdown(results, meta))
        print(markdown(results, meta))
        return
    for name in args.models.split(","):
        results.append(run_model(name, [1, 2] if name == "stories260K" else ks, args, save))
    print(save())


if __name__ == "__main__":
    main()
