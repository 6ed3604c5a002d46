"""SmolLM2-135M dense vs pruned: perplexity under both protocols, zero-shot accuracy on the five
local commonsense tasks, and prefill/decode speed ratios beside their ideal ratios.

Pruned models use AMP when it is registered in `secateurs.methods.METHODS` (else magnitude), at
each --ratios value. Everything is measured here, on this machine; results go to
benchmarks/results/eval_smollm2.{json,md} with the protocol, machine and versions.

    python benchmarks/eval_smollm2.py [--method amp] [--ratios 0.2,0.3] [--max-tokens N] [--limit N]
        [--bench-repeats 5] [--parts quality,bench]

--max-tokens cuts WikiText-2 (about 300k tokens) for quick runs; --limit caps items per task.
--parts quality (perplexity + zero-shot) and bench (speed) can run separately, so the timing part can
wait for a quiet machine; each part writes eval_smollm2_<part>.{json,md}, both together eval_smollm2.*.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import ASSETS, header_markdown, result_header  # noqa: E402

from secateurs.evaluation.perplexity import load_text  # noqa: E402
from secateurs.evaluation.report import eval_tables, render_markdown  # noqa: E402
from secateurs.evaluation.speed import BenchConfig, bench_markdown, bench_models, machine_info  # noqa: E402
from secateurs.evaluation.suite import EvalSpec, evaluate  # noqa: E402
from secateurs.evaluation.zero_shot import STANDARD_TASKS  # noqa: E402
from secateurs.files.output import write_file  # noqa: E402
from secateurs.methods import METHODS, prune  # noqa: E402
from secateurs.planning.accounting import model_stats  # noqa: E402
from secateurs.storage.loading import load_model  # noqa: E402

WIKI = ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw"
TASKS = ASSETS / "commonsense" / "llm-foundry"


def render(result: dict) -> str:
    """The Markdown page for a result (also for one part only)."""
    args, ev, bench = result["args"], result["eval"], result["bench"]
    end = result["machine_at_end"]
    if "header" in result:
        machine = (f"Load average at the end {end.get('load_average')}. Took {result['seconds']} s.\n\n"
                   + header_markdown(result["header"]))
    else:  # a result written before results carried a header
        start = result["machine_at_start"]
        machine = (f"Machine: {start['cpu']}, {start['torch_threads']} threads, load average "
                   f"{start.get('load_average')} at start, {end.get('load_average')} at end; torch {start['torch']}, "
                   f"transformers {start['transformers']}. Took {result['seconds']} s.")
    lines = [f"# SmolLM2-135M dense vs {result['method']}: "
             + ", ".join(x for x, on in (("perplexity, zero-shot", ev["models"]), ("speed", bench)) if on), ""]
    if ev["models"]:
        tokens = f"first {args['max_tokens']} tokens" if args["max_tokens"] else "all tokens"
        items = f"limit {args['limit']} per task" if args["limit"] else "all items"
        lines += [f"WikiText-2 test ({ev['text']['name']}, line endings normalised), {tokens}, protocols "
                  f"{args['protocols']}; zero-shot: lm-eval {ev.get('zero_shot', {}).get('lm_eval_version')}, "
                  f"local llm-foundry files, {items}. Pruned with {result['method']} calibrated on "
                  f"{Path(args['calib']).name} ({args['calib_samples']} samples). {machine}", "",
                  render_markdown(eval_tables(ev))]
    else:
        lines += [f"Pruned with {result['method']} calibrated on {Path(args['calib']).name} "
                  f"({args['calib_samples']} samples). {machine}", ""]
    if bench:
        lines += ["## Speed (ratios vs dense; ideal in parentheses: prefill from FLOPs, decode from bytes read)", "",
                  bench_markdown(bench)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="amp" if "amp" in METHODS else "magnitude")
    ap.add_argument("--ratios", default="0.2,0.3")
    ap.add_argument("--calib", default=str(ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"),
                    help="calibration source for the pruned models (amp_quality.py uses the same)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--parts", default="quality,bench")
    ap.add_argument("--protocols", default="seq128,seq2048")
    ap.add_argument("--max-tokens", type=int, help="first N WikiText-2 tokens only")
    ap.add_argument("--limit", type=int, help="items per zero-shot task (default: all)")
    ap.add_argument("--tasks", default=",".join(STANDARD_TASKS))
    ap.add_argument("--bench-batch-sizes", default="1,8")
    ap.add_argument("--bench-prompt-lengths", default="128,512")
    ap.add_argument("--bench-repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    ap.add_argument("--render", metavar="JSON", help="only re-render the Markdown of a saved result")
    args = ap.parse_args()
    if args.render:
        path = Path(args.render)
        write_file(path.with_suffix(".md"), render(json.loads(path.read_text())))
        return 0

    parts = set(args.parts.split(","))
    if not parts <= {"quality", "bench"}:
        ap.error("--parts takes quality and/or bench")
    started = time.perf_counter()
    header = result_header()
    dense, tok = load_model(args.model, "float32")
    text, text_info = load_text(WIKI)
    spec = EvalSpec(text=text, protocols=args.protocols.split(","), max_tokens=args.max_tokens,
                    tasks=args.tasks.split(",") if args.tasks else None, data_dir=str(TASKS), limit=args.limit)
    models = {"dense": dense}
    stats_file = Path(tempfile.mkdtemp(prefix="secateurs-bench-")) / "statistics.safetensors"
    plans = {}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        label = f"{args.method}-{int(round(100 * ratio))}%"
        t0 = time.perf_counter()
        models[label], plan = prune(copy.deepcopy(dense), tok, method=args.method, ratio=ratio,
                                    calibration=args.calib, calibration_options={"num_samples": args.calib_samples},
                                    statistics=str(stats_file))  # one calibration pass for all ratios
        plans[label] = {**plan.provenance, "prune_seconds": round(time.perf_counter() - t0, 2),
                        "shapes": plan.pruned_shapes()[:1]}
    evals = {}
    for label, model in (models.items() if "quality" in parts else ()):
        t0 = time.perf_counter()
        evals[label] = {**evaluate(model, tok, spec), "eval_seconds": round(time.perf_counter() - t0, 1),
                        "params": model_stats(model).total_params}
        print(label, json.dumps({k: v for k, v in evals[label].items() if k != "zero_shot"}, default=str)[:400])
    ev = {"text": text_info, "models": evals}
    if spec.tasks and evals:
        z = next(iter(evals.values()))["zero_shot"]
        ev["zero_shot"] = {k: z[k] for k in ("lm_eval_version", "limit", "num_fewshot")}
    bench = bench_models(models, BenchConfig(
        batch_sizes=tuple(int(x) for x in args.bench_batch_sizes.split(",")),
        prompt_lengths=tuple(int(x) for x in args.bench_prompt_lengths.split(",")),
        decode_tokens=32, repeats=args.bench_repeats, warmup=1)) if "bench" in parts else None
    del models
    gc.collect()
    result = {"header": header, "benchmark": "eval_smollm2", "model": args.model, "method": args.method, "plans": plans,
              "eval": ev, "bench": bench, "args": vars(args),
              "machine_at_end": machine_info(), "seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "eval_smollm2" if parts == {"quality", "bench"} else f"eval_smollm2_{args.parts}"
    write_file(out / f"{name}.json", json.dumps(result, indent=2, default=str) + "\n")
    md = render(result)
    write_file(out / f"{name}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
