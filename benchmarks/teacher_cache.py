"""Recovery from a teacher-logit cache against the live teacher, on SmolLM2-135M pruned by AMP: training
throughput of the recovery loop (tokens/s) and perplexity after the same token budget, with the live
teacher (kd), with the cache at each K (`secateurs teacher-logits`, then `recover --teacher-cache`: no
teacher in memory; rows cache-kK keep the top K, rows cache-sK K draws, `--selection sampled`), and with no
teacher (ce). Each cache row also records the time to write the cache, its size on disk and its bytes per
position.

Pruning: `secateurs prune MODEL --method amp --ratio R` (calibration 'self'), once, in --work. Recovery
data: the C4 sample; the perplexities are the recovery's held-out validation slice of it and WikiText-2
test (seq 128, first --eval-tokens tokens). Results go to benchmarks/results/<name>.{json,md}, written
after every row; a rerun of the same command skips the rows already measured (and continues a cache
whose write was interrupted), so it can be stopped and resumed row by row.

    python benchmarks/teacher_cache.py --tokens 200000 --threads 2
    python benchmarks/teacher_cache.py --tokens 2048 --train-length 64 --val-tokens 256 --eval-tokens 1024 \
        --name teacher_cache_tiny      # a small run that proves the pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import ASSETS, ROOT, header_markdown, result_header  # noqa: E402

from secateurs.cli.main import main as secateurs_main  # noqa: E402
from secateurs.evaluation.perplexity import load_text, perplexity  # noqa: E402
from secateurs.files.output import marker_record, write_file  # noqa: E402
from secateurs.planning.plan import PruningPlan  # noqa: E402
from secateurs.recovery import recover  # noqa: E402
from secateurs.recovery.cached_teacher import KIND, read_manifest  # noqa: E402
from secateurs.recovery.settings import RecoverySettings, TeacherLogitsSettings  # noqa: E402
from secateurs.recovery.teacher_cache import write_teacher_logits  # noqa: E402
from secateurs.runtime import threads  # noqa: E402
from secateurs.storage.loading import load_model  # noqa: E402

C4 = ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"
WIKITEXT = ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw"
CACHE_ROW = re.compile(r"cache-([ks])(\d+)")  # a cache row: cache-kK keeps the top K, cache-sK K draws


def pruned_folder(args) -> Path:
    folder = Path(args.work) / f"pruned-amp{args.ratio:g}"
    if marker_record(folder) is None:
        code = secateurs_main(["prune", args.model, "--method", "amp", "--ratio", str(args.ratio), "--out",
                               str(folder), "--quiet", "--force"])
        if code:
            raise SystemExit(f"pruning failed ({code})")
    return folder


def cache_for(row: str, dense, tok, args) -> dict:
    """The cache of a row cache-kK (top-K) or cache-sK (K draws) (written, or continued, in --work) and what
    writing it cost."""
    folder = Path(args.work) / f"{row}-{args.tokens}"
    kind, k = CACHE_ROW.fullmatch(row).groups()
    settings = TeacherLogitsSettings(data=str(C4), tokens=args.tokens, val_tokens=args.val_tokens,
                                     seq_len=args.train_length, top_k=int(k),
                                     selection="sampled" if kind == "s" else "top-k", cache_dtype=args.cache_dtype)
    record = marker_record(folder)
    resume = record is not None and record.get("kind") == KIND
    started = time.perf_counter()
    if not (resume and read_manifest(folder)["complete"]):
        write_teacher_logits(dense, tok, settings, folder, resume=resume, force=not resume, progress=False)
    manifest = read_manifest(folder)
    positions = sum(s["positions"] for s in manifest["shards"])
    return {"folder": str(folder), "write_seconds": round(time.perf_counter() - started, 2),
            "bytes": sum(s["bytes"] for s in manifest["shards"]), "positions": positions,
            "bytes_per_position": manifest["bytes_per_position"], "resumed": resume}


def run_row(row: str, folder: Path, dense, tok, args, wiki_ids) -> dict:
    load_start = [round(x, 2) for x in os.getloadavg()]
    student, _ = load_model(str(folder), dtype=args.dtype)
    plan = PruningPlan.load(folder)
    common = dict(data=str(C4), tokens=args.tokens, val_tokens=args.val_tokens, seq_len=args.train_length,
                  patience=None)
    cache = None
    if CACHE_ROW.fullmatch(row):
        cache = cache_for(row, dense, tok, args)
        settings, teacher = RecoverySettings(**common, teacher_cache=cache["folder"]), None
    else:
        settings, teacher = RecoverySettings(**common, objective="kd" if row == "live" else "ce"), dense
    result = recover(student, teacher, settings=settings, tokenizer=tok, plan=plan, progress=False)
    r = result.record
    wiki = perplexity(result.model, tok, "", seq_len=128, ids=wiki_ids)["perplexity"]
    return {"row": row, "objective": r["objective"]["kind"], "tokens_trained": r["tokens"]["trained"],
            "tokens_per_second": r["training_tokens_per_second"], "training_seconds": r["training_seconds"],
            "val_perplexity_before": r["before"]["perplexity"], "val_perplexity_after": r["after"]["perplexity"],
            "wikitext_perplexity_after": round(wiki, 3), "cache": cache,
            "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}}


def _load(row: dict) -> str:
    load = row.get("load_average")
    if not load:
        return "not recorded"
    return " / ".join(", ".join(f"{x:.2f}" for x in load[k]) for k in ("start", "end"))


def render(result: dict, expected: list[str] | None = None) -> str:
    a = result["args"]
    lines = [f"# Recovery from a teacher-logit cache: {a['model']} AMP {a['ratio']:g}, {a['tokens']:,} tokens\n",
             f"Data: C4 sample, sequences of {a['train_length']} tokens, {a['val_tokens']} validation tokens; "
             f"cache values {a['cache_dtype']}. WikiText-2 perplexity: seq 128, first {a['eval_tokens']:,} tokens. "
             "Teacher: live (kd), a cache of the top K log-probabilities (cache-kK), a cache of K draws from the "
             "teacher (cache-sK, `--selection sampled`), none (ce).\n",
             "| teacher | tok/s | val ppl before -> after | WikiText-2 ppl after | cache MiB | bytes/position | "
             "cache write s | load average at start / end |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {name: i for i, name in enumerate(expected or ())}
    for row in sorted(result["rows"].values(), key=lambda r: order.get(r["row"], len(order))):
        c = row["cache"] or {}
        size = f"{c['bytes'] / 2**20:.1f}" if c else "-"
        lines.append(f"| {row['row']} | {row['tokens_per_second']} | {row['val_perplexity_before']:.2f} -> "
                     f"{row['val_perplexity_after']:.2f} | {row['wikitext_perplexity_after']:.2f} | {size} | "
                     f"{c.get('bytes_per_position', '-')} | {c.get('write_seconds', '-')} | {_load(row)} |")
    missing = [row for row in expected or () if row not in result["rows"]]
    if missing:
        lines += ["", "Not measured yet (the same command continues with them): " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n\n" + header_markdown(result["header"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--tokens", type=int, default=200_000, help="recovery budget of every row (default: 200000)")
    ap.add_argument("--train-length", type=int, default=256)
    ap.add_argument("--val-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=65536, help="first N tokens of WikiText-2 test")
    ap.add_argument("--ks", default="16,64,256", help="the top-K caches' K, comma-separated")
    ap.add_argument("--sampled-ks", default="64", help="the sampled caches' draws K, comma-separated ('': none)")
    ap.add_argument("--cache-dtype", default="float16", choices=("float32", "float16"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--work", default=str(ROOT / "runs" / "teacher_cache_bench"), help="pruned model and caches")
    ap.add_argument("--name", default="teacher_cache", help="results/<name>.json and .md")
    ap.add_argument("--rows", default="", help="only these rows, in this order, comma-separated (default: every row "
                                               "of --ks and --sampled-ks, with live first and ce last)")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the saved rows")
    args = ap.parse_args()
    rows = ["live", *(f"cache-k{k}" for k in args.ks.split(",") if k),
            *(f"cache-s{k}" for k in args.sampled_ks.split(",") if k), "ce"]
    chosen = [r for r in args.rows.split(",") if r] or rows
    if set(chosen) - set(rows):
        ap.error(f"unknown rows {sorted(set(chosen) - set(rows))}; these settings have {', '.join(rows)}")
    threads.set_override(args.threads)
    threads.apply_default()
    path = ROOT / "benchmarks" / "results" / f"{args.name}.json"
    keys = ("model", "ratio", "tokens", "train_length", "val_tokens", "eval_tokens", "cache_dtype", "dtype")
    saved = json.loads(path.read_text()) if path.is_file() else {}
    same = saved.get("args") and all(saved["args"].get(k) == getattr(args, k) for k in keys)
    if args.render:
        if not same:
            raise SystemExit(f"{path} holds no rows of these settings")
        write_file(path.with_suffix(".md"), render(saved, rows))
        print(render(saved, rows))
        return 0
    result = {"header": result_header(), "args": {k: getattr(args, k) for k in keys},
              "rows": saved.get("rows", {}) if same else {}}
    folder = pruned_folder(args)
    dense, tok = load_model(args.model, dtype=args.dtype)
    text = load_text(str(WIKITEXT))[0][:args.eval_tokens * 16]  # a prefix: 16 characters a token is ample
    wiki_ids = tok(text, return_tensors="pt", verbose=False).input_ids[0][:args.eval_tokens]
    for row in chosen:
        if row in result["rows"]:
            continue
        torch.manual_seed(0)
        result["rows"][row] = run_row(row, folder, dense, tok, args, wiki_ids)
        write_file(path, json.dumps(result, indent=2) + "\n")
        write_file(path.with_suffix(".md"), render(result, rows))
        print(json.dumps(result["rows"][row]), flush=True)
    print(render(result, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
