"""Surgery cost and real CPU speedup of a structurally pruned SmolLM2-135M.

What is measured, and why:

1. Surgery cost. `apply_plan` slices every q/k/v/o and MLP matrix in place. We time it on fresh
   deep copies of the dense model (median of --repeats runs), and measure its peak memory in a
   fresh subprocess: after loading and planning, free heap is returned to the OS (malloc_trim)
   and the kernel's RSS high-water mark is reset (/proc/self/clear_refs = 5), so VmHWM afterwards
   is the peak of the surgery alone. Reported as (model bytes + peak RSS growth) / model bytes;
   the goal is "well under a second" and < 1.1x the model's size.
2. Prefill. One forward pass over a 512-token prompt (batch 1, logits for every position, as the
   FLOP count in `secateurs.accounting` assumes), dense and pruned interleaved, after warm-up.
   The measured speedup is set beside the ideal one from FLOPs; the goal is measured/ideal >= 0.9.
3. Decode. Greedy `generate` of exactly --new-tokens tokens with KV cache after a short prompt.
   Tokens/s (including the short prompt's prefill) dense vs pruned, beside the ideal speedup
   from weight bytes (decode on a big model is bound by reading the weights once per token).

Text is real: the start of wikitext-2-raw test, tokenized with the model's tokenizer.

    python benchmarks/surgery_speed.py [--ratio 0.2] [--repeats 10] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from secateurs.accounting import compare_stats, model_stats
from secateurs.loading import load_model
from secateurs.methods import make_plan
from secateurs.surgery import apply_plan

MODEL = "smollm2"
METHOD = "magnitude"
TEXT = Path("/work/shared/assets/text/wikitext-2-raw/wiki.test.raw")


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "iqr_rel": (q[2] - q[0]) / q[1], "n": len(times), "raw": times}


def proc_status_kib(*keys: str) -> dict:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) * 1024 for k in keys}


def load(ratio: float):
    model, tok = load_model(MODEL, dtype="float32")
    return model, tok, make_plan(model, METHOD, ratio, gqa="groups")


def memory_child(ratio: float) -> None:
    """Run in a fresh process: peak RSS of apply_plan alone, printed as JSON."""
    model, _, plan = load(ratio)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = proc_status_kib("VmRSS")["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    apply_plan(model, plan)
    after = proc_status_kib("VmRSS", "VmHWM")
    print(json.dumps({"rss_before": before, "rss_after": after["VmRSS"], "hwm_during": after["VmHWM"]}))


def time_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, warmup: int, repeats: int) -> dict:
    """Time each callable `repeats` times, alternating between them so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn))
    return times


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=10, help="timed prefill runs per model")
    ap.add_argument("--decode-repeats", type=int, default=5)
    ap.add_argument("--surgery-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="decode prompt length")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.ratio)

    t0 = time.perf_counter()
    dense, tok, plan = load(args.ratio)
    print(f"loaded and planned in {time.perf_counter() - t0:.1f} s", flush=True)

    # 1. surgery: wall time on fresh copies, peak memory in a fresh process
    surgery_times = []
    for _ in range(args.surgery_repeats):
        pruned = copy.deepcopy(dense)
        gc.collect()
        surgery_times.append(time_call(lambda: apply_plan(pruned, plan)))
    child = subprocess.run([sys.executable, __file__, "--memory-child", "--ratio", str(args.ratio)]
                           + (["--threads", str(args.threads)] if args.threads else []),
                           capture_output=True, text=True, check=True)
    mem = json.loads(child.stdout.strip().splitlines()[-1])
    stats = compare_stats(model_stats(dense), model_stats(pruned), tokens=args.prefill_tokens)
    model_bytes = stats["weight_bytes_before"]
    mem["peak_growth"] = mem["hwm_during"] - mem["rss_before"]
    mem["peak_over_model"] = (model_bytes + mem["peak_growth"]) / model_bytes
    mem["freed"] = mem["rss_before"] - mem["rss_after"]
    print(f"surgery {statistics.median(surgery_times) * 1e3:.0f} ms, peak {mem['peak_over_model']:.3f}x model",
          flush=True)

    # 2. prefill, 3. decode (real text, same inputs for both models)
    ids = tok(TEXT.read_text(encoding="utf-8")[:20000], return_tensors="pt").input_ids
    prefill_ids = ids[:, : args.prefill_tokens]
    prompt = ids[:, : args.prompt_tokens]
    assert prefill_ids.shape[1] == args.prefill_tokens
    models = {"dense": dense, "pruned": pruned}
    with torch.inference_mode():
        prefill = interleaved({n: (lambda m=m: m(prefill_ids)) for n, m in models.items()}, 2, args.repeats)
        print("prefill done", flush=True)
        gen = dict(do_sample=False, min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens,
                   attention_mask=torch.ones_like(prompt), pad_token_id=tok.eos_token_id)
        decode = interleaved({n: (lambda m=m: m.generate(prompt, **gen)) for n, m in models.items()},
                             1, args.decode_repeats)

    pre = {n: summary(t) for n, t in prefill.items()}
    dec = {n: summary(t) for n, t in decode.items()}
    prefill_speedup = pre["dense"]["median"] / pre["pruned"]["median"]
    decode_speedup = dec["dense"]["median"] / dec["pruned"]["median"]
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)",
        "method": METHOD, "ratio": args.ratio, "gqa": "groups",
        "data": f"{TEXT.name}, first {args.prefill_tokens} tokens (prefill) / {args.prompt_tokens} (decode prompt)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "cpu": cpu_model(),
        "shapes": {n: [model_stats(m).layers[0].num_heads, model_stats(m).layers[0].intermediate_size]
                   for n, m in models.items()},
        "accounting": stats,
        "surgery": {"seconds": summary(surgery_times), "memory_bytes": mem},
        "prefill": {"seconds": pre, "measured_speedup": prefill_speedup,
                    "ideal_speedup": stats["ideal_prefill_speedup"],
                    "measured_over_ideal": prefill_speedup / stats["ideal_prefill_speedup"]},
        "decode": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "seconds": dec,
                   "tokens_per_s": {n: args.new_tokens / s["median"] for n, s in dec.items()},
                   "measured_speedup": decode_speedup, "ideal_speedup": stats["ideal_decode_speedup"],
                   "measured_over_ideal": decode_speedup / stats["ideal_decode_speedup"]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "surgery_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "surgery_speed.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    s, m, p, d = r["surgery"]["seconds"], r["surgery"]["memory_bytes"], r["prefill"], r["decode"]
    a = r["accounting"]
    ms = lambda x: f"{x * 1e3:.1f} ms"  # noqa: E731
    row = lambda name, t: (f"| {name} | {ms(t['median'])} | {ms(t['min'])} – {ms(t['max'])} "  # noqa: E731
                           f"| {t['iqr_rel'] * 100:.1f}% |")
    return "\n".join([
        "# Surgery cost and CPU speedup",
        "",
        f"{r['date']} · {r['model']} · {r['method']} ratio {r['ratio']} (GQA groups) · "
        f"heads/MLP per layer {r['shapes']['dense']} → {r['shapes']['pruned']} · "
        f"torch {r['torch']}, transformers {r['transformers']} · {r['threads']} threads · {r['cpu']}",
        "",
        f"Parameters {a['params_before']:,} → {a['params_after']:,} "
        f"({a['params_removed_fraction'] * 100:.1f}% removed). Data: {r['data']}.",
        "",
        "## Surgery (`apply_plan`)",
        "",
        f"- wall time: median {ms(s['median'])} (min {ms(s['min'])}, max {ms(s['max'])}, n={s['n']}); target well under 1 s",
        f"- peak memory (fresh process, RSS high-water mark): model {a['weight_bytes_before'] / 2**20:.1f} MiB "
        f"+ peak growth {m['peak_growth'] / 2**20:.1f} MiB = **{m['peak_over_model']:.3f}x** the model "
        f"(target < 1.1x); RSS fell by {m['freed'] / 2**20:.1f} MiB after surgery",
        "",
        "## Speed (median of interleaved runs after warm-up)",
        "",
        "| run | median | min – max | IQR / median |",
        "|---|---|---|---|",
        row(f"prefill {a['prefill_tokens']} tok, dense", p["seconds"]["dense"]),
        row(f"prefill {a['prefill_tokens']} tok, pruned", p["seconds"]["pruned"]),
        row(f"decode {d['new_tokens']} tok, dense", d["seconds"]["dense"]),
        row(f"decode {d['new_tokens']} tok, pruned", d["seconds"]["pruned"]),
        "",
        "| | measured speedup | ideal speedup | measured / ideal |",
        "|---|---|---|---|",
        f"| prefill (ideal: FLOPs) | {p['measured_speedup']:.3f} | {p['ideal_speedup']:.3f} | **{p['measured_over_ideal']:.3f}** |",
        f"| decode (ideal: weight bytes) | {d['measured_speedup']:.3f} | {d['ideal_speedup']:.3f} | **{d['measured_over_ideal']:.3f}** |",
        "",
        f"Decode: {d['tokens_per_s']['dense']:.1f} → {d['tokens_per_s']['pruned']:.1f} tokens/s "
        f"(includes the {d['prompt_tokens']}-token prompt's prefill).",
        "",
    ])


if __name__ == "__main__":
    main()
