"""Probe: does AMP at --ratio prune better in rounds, recovering between them (as Consensus does for layers)?

Each round prunes the model as the previous round left it (recovered) with amp's default, to the
round's share of the dense parameters (for two rounds at 30%: 15%, then 30%), and distils it from the
dense model on its share of the token budget (kd, full fine-tuning, the C4 sample in one seeded
order, each round continuing where the last stopped). Prints the WikiText-2 perplexity (seq 128, first
--eval-tokens tokens) after each prune and each recovery. Compare with the one-shot line of the same
budget in recovery_settings_probe.txt. A probe, appended to --log, not a benchmark result.

    python benchmarks/iterative_width_probe.py --ratio 0.3 --rounds 2 --tokens 40000 --lr 3e-4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy  # noqa: E402

import torch  # noqa: E402

from recovery import C4, CALIBRATION, WIKI, wiki_ppl  # noqa: E402  (the benchmark's protocol, its sibling)
from recovery_settings_probe import append_result  # noqa: E402
from secateurs.planning.accounting import model_stats  # noqa: E402
from secateurs.evaluation.perplexity import load_text  # noqa: E402
from secateurs.storage.loading import load_model  # noqa: E402
from secateurs.methods.api import prune  # noqa: E402
from secateurs.recovery import recover  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=40_000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--kd-ratio", type=float, default=1.0)
    ap.add_argument("--patience", type=int, default=None, help="early stop (default: none; a round starting "
                    "from a recovered model rises first and patience 3 stopped it before it fell)")
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", default=str(Path(__file__).with_name("results") / "recovery_settings_probe.txt"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dense, tok = load_model("smollm2", "float32")
    dense_params = model_stats(dense).total_params
    text, _ = load_text(WIKI)
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[0]
    model, offset, rounds = copy.deepcopy(dense), 0, []
    for r in range(args.rounds):
        target = dense_params * (1 - args.ratio * (r + 1) / args.rounds)
        ratio_now = 1 - target / model_stats(model).total_params
        model, plan = prune(model, tok, method="amp", ratio=ratio_now, progress=False, **CALIBRATION)
        pruned_ppl = wiki_ppl(model, tok, text, ids, args.eval_tokens)
        tokens = args.tokens // args.rounds
        rec = recover(model, dense, data=str(C4), tokens=tokens, tokenizer=tok, teacher_tokenizer=tok, plan=plan,
                      lr=args.lr, kd_ratio=args.kd_ratio, val_tokens=2048, data_offset=offset,
                      patience=args.patience, evaluation_files=[str(WIKI)], progress=False)
        offset += rec.record["tokens"]["trained"] // rec.record["batch"]["seq_len"]
        rounds.append({"ratio_of_dense": round(1 - model_stats(model).total_params / dense_params, 4),
                       "ratio_of_model": round(ratio_now, 4), "split": plan.provenance.get("split"),
                       "pruned_ppl": round(pruned_ppl, 2),
                       "kl": [round(v["kl"], 4) for v in rec.record["curves"]["val"]],
                       "recovered_ppl": round(wiki_ppl(model, tok, text, ids, args.eval_tokens), 2)})
        print(json.dumps(rounds[-1]), flush=True)
    line = {"probe": "iterative amp", "ratio": args.ratio, "rounds": args.rounds, "lr": args.lr,
            "kd_ratio": args.kd_ratio, "patience": args.patience, "tokens": args.tokens, "per_round": rounds,
            "wikitext_ppl": rounds[-1]["recovered_ppl"], "eval_tokens": args.eval_tokens, "threads": args.threads,
            "minutes": round((time.perf_counter() - t0) / 60, 1), "load": os.getloadavg()}
    append_result(line, args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
