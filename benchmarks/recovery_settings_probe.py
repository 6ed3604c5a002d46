"""Probe: which training setting moves AMP 30% furthest on a short budget (learning rate, batch size,
data)? Does going over the same text twice cost anything (--distinct-tokens)?

Prunes SmolLM2-135M with amp's default at --ratio once (saved to --pruned-dir and reloaded on later
calls, the pruning being deterministic), then recovers it with kd (full fine-tuning, the C4 sample,
cosine decay over the budget; --kd-ratio mixes in cross-entropy) once per setting and prints the
held-out KL curve and WikiText-2 perplexity (seq 128, first --eval-tokens tokens). A probe to
choose the setting of the one long run the CPU allows; its numbers are appended to --log, not a
benchmark result.

    python benchmarks/recovery_settings_probe.py --settings 3e-4:2,3e-4:1,1e-3:2 --tokens 50000

--data self distils on text sampled from the dense model (the CLI's offline default) instead of C4.
--distinct-tokens N trains on the first C4 records that give N tokens plus the validation slice
(written beside --pruned-dir), so a budget of 2N goes over the same text twice, as the 1M-token run
goes over the 497k-token sample twice; compare with the same budget on the whole sample.
--temperature, --seq-len, --freeze-embeddings (full fine-tuning without the tied token embeddings)
and --beta2 (AdamW's second-moment decay) probe the remaining training levers for AMP 30%.
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

import torch  # noqa: E402

from recovery import C4, WIKI, prune_for_run, wiki_ppl  # noqa: E402  (the benchmark's protocol, its sibling)
from secateurs.evaluation.perplexity import load_text  # noqa: E402
from secateurs.storage.pruned import load_pruned, read_plan, save_pruned  # noqa: E402
from secateurs.storage.loading import load_model  # noqa: E402
from secateurs.recovery import recover  # noqa: E402


VAL_TOKENS = 2048


def c4_prefix(tok, tokens: int, folder: Path) -> Path:
    """The first records of the C4 sample that give at least `tokens` tokens, as a jsonl file in `folder`."""
    out = folder / f"c4_first_{tokens}_tokens.jsonl"
    if not out.is_file():
        lines, count = [], 0
        with open(C4, encoding="utf-8") as f:
            for line in f:
                if count >= tokens:
                    break
                lines.append(line)
                count += len(tok(json.loads(line)["text"], verbose=False).input_ids) + 1  # + the EOS joining them
        out.write_text("".join(lines), encoding="utf-8")
    return out


def with_sampled_text(c4_records: Path, dense, tok, tokens: int, seq_len: int = 256) -> Path:
    """C4_RECORDS plus `tokens` of text sampled from the dense model ('self' data: the cached samples of
    a --data self run of 80k tokens, 321 x 256), decoded into text records, as one jsonl file."""
    from secateurs.calibration.data import _self_generated

    samples = _self_generated(dense, tok, 321, seq_len, 0)[: -(-tokens // seq_len)]
    out = c4_records.with_name(f"{c4_records.stem}_plus_{len(samples)}_sampled.jsonl")
    texts = [json.dumps({"text": tok.decode(s, skip_special_tokens=True)}) + "\n" for s in samples]
    out.write_text(c4_records.read_text(encoding="utf-8") + "".join(texts), encoding="utf-8")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--settings", default="3e-4:2,3e-4:1,1e-3:2", help="LR:BATCH,...")
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--kd-ratio", type=float, default=1.0)
    ap.add_argument("--data", choices=("c4", "self"), default="c4",
                    help="the C4 sample, or 'self': text sampled from the dense model (the CLI's offline default)")
    ap.add_argument("--distinct-tokens", type=int, default=None,
                    help="train on only the first C4 records giving this many tokens (default: the whole sample)")
    ap.add_argument("--top-up-self", type=int, default=None,
                    help="with --distinct-tokens: add this many tokens of text sampled from the dense model "
                         "(decoded into text records) to the C4 records")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--freeze-embeddings", action="store_true",
                    help="full fine-tuning of everything but the (tied) token embeddings")
    ap.add_argument("--beta2", type=float, default=None, help="AdamW's second-moment decay (the loop's: 0.999)")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm; 0: none")
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pruned-dir", required=True)
    ap.add_argument("--log", default=str(Path(__file__).with_name("results") / "recovery_settings_probe.txt"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.beta2 is not None:
        use_beta2(args.beta2)
    dense, tok = load_model("smollm2", "float32")
    pruned_dir = Path(args.pruned_dir)
    if not (pruned_dir / "config.json").is_file():
        model, plan = prune_for_run(dense, tok, str(args.ratio))
        save_pruned(model, plan, pruned_dir, tokenizer=tok)
    text, _ = load_text(WIKI)
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[0]
    plan = read_plan(pruned_dir)
    if args.data == "self":
        if args.distinct_tokens is not None:
            raise SystemExit("--distinct-tokens takes the first records of the C4 sample; drop it with --data self")
        data = "self"
    elif args.distinct_tokens is None:
        data = str(C4)
    else:
        data = str(c4_prefix(tok, args.distinct_tokens + VAL_TOKENS, pruned_dir.parent))
        if args.top_up_self:
            data = str(with_sampled_text(Path(data), dense, tok, args.top_up_self))
    for setting in args.settings.split(","):
        lr_text, batch_text = setting.split(":")
        lr, batch = float(lr_text), int(batch_text)
        student = load_pruned(pruned_dir, dtype=torch.float32)
        if args.freeze_embeddings:
            freeze_embeddings_when_training(student)
        t0 = time.perf_counter()
        rec = recover(student, dense, data=data, tokens=args.tokens, tokenizer=tok, teacher_tokenizer=tok,
                      plan=plan, lr=lr, batch_size=batch, val_tokens=VAL_TOKENS, kd_ratio=args.kd_ratio,
                      temperature=args.temperature, max_grad_norm=args.clip or None, seq_len=args.seq_len,
                      evaluation_files=[str(WIKI)], progress=False)
        ppl = wiki_ppl(rec.model, tok, text, ids, args.eval_tokens)
        curve = [(v.get("tokens"), round(v["kl"], 4)) for v in rec.record["curves"]["val"]]
        source = args.data if not args.top_up_self else f"c4 + {args.top_up_self} self"
        line = {"ratio": args.ratio, "lr": lr, "batch": batch, "kd_ratio": args.kd_ratio, "data": source,
                "temperature": args.temperature, "seq_len": args.seq_len,
                "frozen_embeddings": args.freeze_embeddings, "beta2": args.beta2, "clip": args.clip,
                "grad_norm_quartiles": grad_norm_quartiles(rec.record["curves"]["train"]),
                "data_tokens": rec.record["data"]["train_tokens_available"], "epochs": rec.record["tokens"]["epochs"],
                "tokens": rec.record["tokens"]["trained"],
                "steps": rec.record["steps"]["done"], "val_kl_curve": curve, "wikitext_ppl": round(ppl, 2),
                "eval_tokens": args.eval_tokens, "threads": args.threads,
                "minutes": round((time.perf_counter() - t0) / 60, 1), "load": os.getloadavg()}
        append_result(line, args.log)
    return 0


def freeze_embeddings_when_training(student) -> None:
    """Make recover()'s full fine-tuning leave the token embeddings (tied to the LM head) alone: its
    student.requires_grad_(True) is followed by switching them off again."""
    embeddings = student.get_input_embeddings()
    switch_on = student.requires_grad_

    def requires_grad_(flag=True):
        switch_on(flag)
        embeddings.requires_grad_(False)
        return student

    student.requires_grad_ = requires_grad_


def use_beta2(beta2: float) -> None:
    """Give every recovery loop's AdamW this second-moment decay (recover() does not take betas)."""
    from secateurs.recovery import api

    class Loop(api.RecoveryLoop):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for group in self.optimizer.param_groups:
                group["betas"] = (group["betas"][0], beta2)

    api.RecoveryLoop = Loop


def grad_norm_quartiles(train_curve: list[dict]) -> list[float] | None:
    """The 25th, 50th and 75th percentiles of the steps' gradient norms (before clipping)."""
    norms = sorted(p["grad_norm"] for p in train_curve if p.get("grad_norm") is not None)
    return [round(norms[int(q * (len(norms) - 1))], 3) for q in (0.25, 0.5, 0.75)] if norms else None


def append_result(line: dict, log: str) -> None:
    """Print one probe's result and append it to the log, one JSON object a line."""
    print(json.dumps(line), flush=True)
    with open(log, "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    sys.exit(main())
