"""What each kind of work gets from 1 thread vs one per core, on a quiet machine and beside one busy
process (a pure-Python loop at nice 10, then at nice 0): the measurements behind secateurs.runtime.threads.

Kinds of work, on SmolLM2-135M (the `smollm2` alias, float32):
    decode   the 'self' sampler's decode loop (secateurs.calibration.data.sample_sequences): 32 samples x 64 tokens
    forward  batched forward passes (perplexity, statistics): 4 batches of 8 x 128 tokens
    train    full fine-tuning steps (recovery): 2 AdamW steps on 2 x 256 tokens

Each (condition, thread count) runs in its own process: load, one warm-up of each kind, then each
kind `--repeats` times, median reported. The quiet runs also check that logits and a training step
are bit-identical at 1 thread and at one per core.

    PYTHONPATH=src python benchmarks/thread_policy.py --out benchmarks/results/thread_policy
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import header_markdown, result_header

from secateurs.calibration.data import sample_sequences
from secateurs.runtime import progress
from secateurs.storage.loading import load_model

KINDS = ("decode", "forward", "train")
CONDITIONS = {"quiet": None, "busy nice 10": 10, "busy nice 0": 0}


def worker(threads: int, repeats: int) -> dict:
    progress.set_quiet(True)
    torch.set_num_threads(threads)
    model, tokenizer = load_model("smollm2", "float32")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 8, 128), generator=generator)
    train_ids = torch.randint(0, model.config.vocab_size, (2, 256), generator=generator)

    class Steps:
        def update(self, *a):
            pass

    def decode():
        torch.manual_seed(0)
        return sample_sequences(model, tokenizer.bos_token_id or 0, 32, 64, [], Steps())

    @torch.inference_mode()
    def forward():
        return [model(batch).logits for batch in ids]

    student = None

    def train():
        nonlocal student
        student = copy.deepcopy(model).train().requires_grad_(True)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
        for _ in range(2):
            loss = student(train_ids, labels=train_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    work = {"decode": decode, "forward": forward, "train": train}
    results = {}
    for kind, run in work.items():
        run()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        results[kind] = {"median_s": round(statistics.median(times), 3), "times_s": [round(t, 3) for t in times]}
    digest = {"logits": forward()[0][0, :4, :8].tolist(), "decode": decode()[0][:16],
              "weight_after_train": float(next(student.parameters()).double().sum())}
    return {"threads": threads, "torch_threads": torch.get_num_threads(), "kinds": results, "digest": digest}


def markdown(result: dict) -> str:
    cores, runs = result["machine"]["cores_in_affinity"], result["runs"]
    same = result["bit_identical_across_thread_counts"]
    if isinstance(same, bool):  # a result written before the digests were compared one by one
        same = {"all": same}
    lines = [f"# Threads per kind of work: {result['model']}", "",
             f"{cores} cores; median of {result['repeats']} after one warm-up; the busy process is `nice -n N "
             "python -c 'while True: pass'` (one core's worth of work); nothing else ran. Load average before "
             f"{result['machine']['load_average_before']}, after {result['machine']['load_average_after']}.", "",
             *([header_markdown(result["header"])] if "header" in result else []),
             "| condition | threads | " + " | ".join(f"{k} s" for k in KINDS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in KINDS) + " |"]
    for r in runs:
        lines.append(f"| {r['condition']} | {r['threads']} | "
                     + " | ".join(f"{r['kinds'][k]['median_s']:.2f}" for k in KINDS) + " |")
    lines += ["", "Bit-identical at 1 thread and at one per core (quiet runs): "
              + ", ".join(f"{what} {'yes' if ok else 'no'}" for what, ok in same.items()) + ".", "",
              *([] if "header" in result else [f"Command: `{result['command']}`"])]
    return "\n".join(lines) + "\n"


def busy(nice: int | None):
    if nice is None:
        return None
    return subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", "while True: pass"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    parser.add_argument("--render", metavar="JSON", help="write the Markdown of an earlier result and exit")
    args = parser.parse_args()
    if args.render:
        result = json.loads(Path(args.render).read_text())
        quiet = [r for r in result["runs"] if r["condition"] == "quiet"]
        result["bit_identical_across_thread_counts"] = {
            what: all(r["digest"][what] == quiet[0]["digest"][what] for r in quiet) for what in quiet[0]["digest"]}
        Path(args.render).write_text(json.dumps(result, indent=2) + "\n")
        Path(args.render).with_suffix(".md").write_text(markdown(result))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats)))
        return 0
    header = result_header()
    cores = len(os.sched_getaffinity(0))
    counts = sorted({1, cores})
    runs = []
    load_before = os.getloadavg()
    for condition, nice in CONDITIONS.items():
        for threads in counts:
            other = busy(nice)
            try:
                time.sleep(1.0 if other else 0)
                proc = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--repeats",
                                       str(args.repeats)], capture_output=True, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            finally:
                if other:
                    other.kill()
                    other.wait()
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            run = {"condition": condition, **json.loads(proc.stdout.strip().splitlines()[-1])}
            runs.append(run)
            print(condition, threads, {k: v["median_s"] for k, v in run["kinds"].items()}, flush=True)
    quiet = [r for r in runs if r["condition"] == "quiet"]
    identical = {what: all(r["digest"][what] == quiet[0]["digest"][what] for r in quiet) for what in quiet[0]["digest"]}
    result = {"header": header, "model": "SmolLM2-135M-Instruct (smollm2, Q4_1 GGUF dequantised to float32)",
              "machine": {"cores_in_affinity": cores, "cpu_count": os.cpu_count(),
                          "load_average_before": [round(x, 2) for x in load_before],
                          "load_average_after": [round(x, 2) for x in os.getloadavg()]},
              "repeats": args.repeats, "bit_identical_across_thread_counts": identical, "runs": runs}
    print(json.dumps({"bit_identical_across_thread_counts": identical}))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out + ".md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
