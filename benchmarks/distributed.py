"""Recovery on one process with all the cores against several processes with a share each: SmolLM2-135M
pruned by AMP (20% of all parameters), distilled from its dense parent on C4, the same global batch and
data in every row. Per row: training tokens/s (validation excluded, from recovery.json), the final
validation loss and perplexity, and the largest difference of the recovered weights from the first row's
(float32: the processes add the same numbers in another order, so equal up to rounding, not bit for bit).

    python benchmarks/distributed.py --tokens 8192                  # ~10 min on 2 cores
    python benchmarks/distributed.py --rows 1x2,2x1 --strategies ddp,fsdp

Rows are PROCESSESxTHREADS: `1x2` is `secateurs recover` in one process with 2 threads, `2x1` is
`torchrun --standalone --nproc_per_node 2 -m secateurs recover` with 1 thread a process. Each row is
saved as it finishes (`--out`), and skipped on a rerun with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ASSETS, ROOT, header_markdown, result_header
from safetensors.torch import load_file

C4 = ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"


def _run(command: list[str], threads: int, log: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}; see {log}")
    return time.perf_counter() - started


def _pruned(work: Path, ratio: float) -> Path:
    out = work / f"smollm2-amp{ratio:g}"
    if not (out / "pruning_plan.json").exists():
        _run([sys.executable, "-m", "secateurs", "prune", "smollm2", "--method", "amp", "--ratio", str(ratio),
              "--calib", str(C4), "--out", str(out), "--force"], 2, work / "prune.log")
    return out


def _recover_command(processes: int, pruned: Path, out: Path, args, strategy: str) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    flags = ["recover", str(pruned), "--teacher", "smollm2", "--data", str(C4), "--tokens", str(args.tokens),
             "--train-length", str(args.seq_len), "--train-batch-size", str(args.batch), "--seed", "0",
             "--out", str(out), "--force"]
    if processes > 1:
        flags += ["--strategy", strategy]
    return [*launcher, "-m", "secateurs", *flags]


def _row(spec: str, strategy: str, pruned: Path, work: Path, args) -> dict:
    processes, threads = (int(x) for x in spec.split("x"))
    out = work / f"recovered-{spec}-{strategy}"
    seconds = _run(_recover_command(processes, pruned, out, args, strategy), threads, work / f"{spec}-{strategy}.log")
    record = json.loads((out / "recovery.json").read_text())
    after = record["after"] or {}
    return {"row": spec, "processes": processes, "threads_per_process": threads,
            "strategy": strategy if processes > 1 else "one process", "wall_seconds": round(seconds, 1),
            "training_tokens_per_second": record["training_tokens_per_second"],
            "tokens_trained": record["tokens"]["trained"], "val_loss": after.get("loss"),
            "val_perplexity": after.get("perplexity"), "out": str(out)}


def _max_difference(a: Path, b: Path) -> float:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((left[k].double() - right[k].double()).abs().max()) for k in left)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="training tokens of every row")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="the global micro-batch (every row the same)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--rows", default="1x2,2x1", help="PROCESSESxTHREADS, comma-separated")
    p.add_argument("--strategies", default="ddp", help="strategies of the several-process rows: ddp, fsdp")
    p.add_argument("--pruned", help="a pruned SmolLM2 folder to recover (default: AMP --ratio on C4, made in --work)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-distributed"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed"))
    args = p.parse_args()
    header = result_header()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    saved_path = Path(args.out + ".json")
    settings = {"tokens": args.tokens, "seq_len": args.seq_len, "batch": args.batch, "ratio": args.ratio,
                "pruned": args.pruned}
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    rows = saved.get("rows", []) if saved.get("settings") == settings else []
    pruned = Path(args.pruned) if args.pruned else _pruned(work, args.ratio)
    wanted = [(spec, strategy) for spec in args.rows.split(",")
              for strategy in (args.strategies.split(",") if int(spec.split("x")[0]) > 1 else ["one process"])]
    for spec, strategy in wanted:
        if any(r["row"] == spec and r["strategy"] == strategy for r in rows):
            continue
        row = _row(spec, strategy if strategy != "one process" else "ddp", pruned, work, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        saved_path.parent.mkdir(parents=True, exist_ok=True)
        saved_path.write_text(json.dumps({"header": header, "settings": settings, "rows": rows}, indent=2) + "\n")
    first = Path(rows[0]["out"])
    for row in rows:
        if Path(row["out"]).exists() and first.exists():
            row["max_weight_difference_from_first_row"] = _max_difference(first, Path(row["out"]))
    saved_path.write_text(json.dumps({"header": header, "settings": settings, "rows": rows}, indent=2) + "\n")
    base = rows[0]["training_tokens_per_second"]
    lines = ["# Recovery: one process against several", "",
             f"SmolLM2-135M, AMP {args.ratio:.0%} of all parameters, distilled from the dense model (kd) on the "
             f"C4 sample: {args.tokens:,} training tokens, sequences of {args.seq_len}, global batch {args.batch}, "
             f"seed 0, float32, torch {torch.__version__}.", "",
             "| processes x threads | strategy | training tok/s | vs first row | wall s | val loss | val ppl | "
             "max weight difference from the first row |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['strategy']} | {r['training_tokens_per_second']:.1f} | "
                     f"{r['training_tokens_per_second'] / base:.2f}x | {r['wall_seconds']:.0f} | {r['val_loss']:.4f} | "
                     f"{r['val_perplexity']:.2f} | {r.get('max_weight_difference_from_first_row', float('nan')):.2e} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n\n" + header_markdown(header))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
