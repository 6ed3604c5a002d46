"""Perplexity runs at the speed of the model itself, and gets the right number.

Target: WikiText-2 test (~300k tokens) on SmolLM2-135M at seq 128 takes at most 1.1x the
time of plain batched forward passes over the same windows, and agrees with an independent direct
computation to 4 significant digits.

What is measured:

1. plain: `model(batch).logits` over the same windows and batch size, nothing else (timed). After
   each timed forward, outside the timer, an independent reference NLL is computed from those
   logits: `log_softmax` in float64 and an explicit gather (a different code path from
   `secateurs.evaluation.perplexity`, which uses float32 logsumexp in row chunks).
2. secateurs: `perplexity(...)` end to end on the same token ids (tokenisation timed apart).

The two passes alternate for --repeats rounds; medians are compared. Text is tokenised once.
3. interleaved: per batch, a plain forward and secateurs' per-batch loss back to back, so a busy
   machine slows both alike (the whole-pass comparison above is only fair on an idle machine).

    python benchmarks/perplexity_speed.py [--max-tokens N] [--seq-len 128] [--batch-size 8] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from common import ASSETS, header_markdown, result_header

from secateurs.evaluation.perplexity import load_text, perplexity, window_nll
from secateurs.evaluation.speed import machine_info
from secateurs.files.output import write_file
from secateurs.storage.loading import load_model

WIKI = ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw"


@torch.inference_mode()
def plain_forward(model, chunks: torch.Tensor, batch_size: int) -> tuple[float, float, int]:
    """Seconds spent in forward passes only, and the independent float64 NLL (untimed)."""
    seconds, nll, count = 0.0, 0.0, 0
    for s in range(0, chunks.shape[0], batch_size):
        batch = chunks[s:s + batch_size]
        t0 = time.perf_counter()
        logits = model(batch, use_cache=False).logits
        seconds += time.perf_counter() - t0
        for b in range(batch.shape[0]):  # reference, untimed: float64 log_softmax, explicit gather
            logp = torch.log_softmax(logits[b, :-1].double(), dim=-1)
            nll -= logp.gather(-1, batch[b, 1:, None]).sum().item()
            count += batch.shape[1] - 1
    return seconds, nll / count, count


@torch.inference_mode()
def interleaved(model, chunks: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Per batch, a plain forward and secateurs' per-batch loss back to back, so load from other
    processes hits both alike: (plain seconds, secateurs seconds)."""
    plain = ours = 0.0
    for s in range(0, chunks.shape[0], batch_size):
        batch = chunks[s:s + batch_size]
        t0 = time.perf_counter()
        model(batch, use_cache=False).logits
        t1 = time.perf_counter()
        window_nll(model, batch)
        t2 = time.perf_counter()
        plain, ours = plain + t1 - t0, ours + t2 - t1
    return plain, ours


def significant_digits_agreeing(a: float, b: float) -> float:
    return math.inf if a == b else -math.log10(abs(a - b) / abs(b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default=str(WIKI))
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, help="use the first N tokens only (the full text is ~300k)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-interleaved", action="store_true",
                    help="leave out the interleaved pass (only needed on a busy machine; halves the run)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, args.dtype)
    text, text_info = load_text(args.text)
    t0 = time.perf_counter()
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[0]
    tokenise_s = time.perf_counter() - t0
    text_tokens = ids.numel()
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    windows = ids.numel() // args.seq_len
    chunks = ids[:windows * args.seq_len].reshape(windows, args.seq_len)
    header = result_header()  # after loading and tokenising: its load average is the one the timings start at
    plain_s, ours_s = [], []
    for _ in range(args.repeats):
        s, ref_nll, count = plain_forward(model, chunks, args.batch_size)
        plain_s.append(s)
        t0 = time.perf_counter()
        r = perplexity(model, tok, "", seq_len=args.seq_len, batch_size=args.batch_size, ids=ids, progress=False)
        ours_s.append(time.perf_counter() - t0)
    inter_plain, inter_ours = (None, None) if args.skip_interleaved else interleaved(model, chunks, args.batch_size)
    ref_ppl = math.exp(ref_nll)
    ratio = statistics.median(ours_s) / statistics.median(plain_s)
    digits = significant_digits_agreeing(r["perplexity"], ref_ppl)
    result = {
        "header": header, "benchmark": "perplexity_speed", "model": args.model, "dtype": args.dtype, "text": text_info,
        "protocol": {"seq_len": args.seq_len, "batch_size": args.batch_size, "windows": windows,
                     "scored_tokens": count, "text_tokens": text_tokens,
                     "max_tokens": args.max_tokens, "repeats": args.repeats},
        "tokenise_seconds": round(tokenise_s, 3),
        "plain_forward_seconds": plain_s, "secateurs_seconds": ours_s,
        "time_ratio_median": ratio,
        "interleaved_plain_seconds": inter_plain, "interleaved_secateurs_seconds": inter_ours,
        "interleaved_time_ratio": inter_ours / inter_plain if inter_plain else None, "target_time_ratio": 1.1,
        "meets_time_target": ratio <= 1.1,
        "perplexity_secateurs": r["perplexity"], "perplexity_reference_float64": ref_ppl,
        "significant_digits_agreeing": digits, "meets_agreement_target": digits >= 4,
        "tokens_per_second_secateurs": windows * args.seq_len / statistics.median(ours_s),
        "machine_at_end": machine_info(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"perplexity_speed_{args.model}_seq{args.seq_len}" + (f"_{args.max_tokens}tok" if args.max_tokens else "")
            + (f"_{args.threads}thread" if args.threads else ""))
    write_file(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    md = "\n".join([
        f"# Perplexity speed: {args.model} ({args.dtype}), {text_info['name']}, seq {args.seq_len}, "
        f"batch {args.batch_size}",
        "",
        f"{windows} windows, {count:,} scored tokens"
        f"{' (first ' + str(args.max_tokens) + ' tokens)' if args.max_tokens else ''}; "
        f"{args.repeats} repeat(s), medians; load average at the end {result['machine_at_end'].get('load_average')}.",
        "",
        header_markdown(header),
        "| | seconds | |",
        "| --- | ---: | --- |",
        f"| plain batched forward passes | {statistics.median(plain_s):.1f} | |",
        f"| secateurs perplexity() | {statistics.median(ours_s):.1f} | ratio {ratio:.3f} (target <= 1.1) |",
        *([f"| interleaved per batch: plain | {inter_plain:.1f} | |",
           f"| interleaved per batch: secateurs | {inter_ours:.1f} | ratio {inter_ours / inter_plain:.3f} "
           "(same load for both) |"] if inter_plain else []),
        "",
        f"Perplexity {r['perplexity']:.6f}; independent float64 reference {ref_ppl:.6f}: "
        f"{digits:.1f} significant digits agree (target >= 4).",
        "",
    ])
    write_file(out / f"{stem}.md", md)
    print(md)
    return 0 if result["meets_agreement_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
