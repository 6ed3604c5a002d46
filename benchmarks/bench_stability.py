"""Are `secateurs bench` figures stable? The same model benchmarked by separate `secateurs bench`
runs (fresh processes): per configuration, how far apart are the run medians?

Target: repeated runs agree within 5% (median). Each run's own spread over its repeats
is shown beside it, and the same comparison for each run's best repeat (the fastest of N, the
estimator `timeit` recommends when noise only ever slows a measurement down).

    python benchmarks/bench_stability.py [--model smollm2] [--runs 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import header_markdown, result_header

from secateurs.evaluation.speed import machine_info
from secateurs.files.output import write_file


def _deviation(values: list[float]) -> float:
    """Largest relative distance of a value from the median of the values."""
    mid = sorted(values)[len(values) // 2]
    return max(abs(v - mid) / mid for v in values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-lengths", default="128")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for bench (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    args = ap.parse_args()
    header = result_header()
    machine = header["machine"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"run{i}.json"
            subprocess.run([sys.executable, "-m", "secateurs", "bench", args.model, "--dtype", "float32",
                            "--batch-sizes", args.batch_sizes, "--prompt-lengths", args.prompt_lengths,
                            "--repeats", str(args.repeats), "--out", str(out),
                            *(["--threads", str(args.threads)] if args.threads else [])],
                           check=True, capture_output=True)
            runs.append(json.loads(out.read_text()))
    rows = []
    for j, first in enumerate(runs[0]["results"]):
        for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            medians = [run["results"][j][metric]["median"] for run in runs]
            bests = [run["results"][j][metric]["max"] for run in runs]
            spreads = [run["results"][j][metric]["spread"] for run in runs]
            rows.append({"batch_size": first["batch"], "prompt_length": first["prompt_length"], "metric": metric,
                         "medians": medians, "bests": bests, "within_run_spreads": spreads,
                         "max_deviation_from_median_of_runs": _deviation(medians),
                         "best_max_deviation": _deviation(bests)})
    worst = max(r["max_deviation_from_median_of_runs"] for r in rows)
    worst_best = max(r["best_max_deviation"] for r in rows)
    result = {"header": header, "benchmark": "bench_stability", "model": args.model, "runs": args.runs,
              "repeats": args.repeats,
              "threads": args.threads or machine["torch_threads"],
              "rows": rows, "worst_deviation": worst, "worst_deviation_of_bests": worst_best, "target": 0.05,
              "meets_target": worst <= 0.05,
              "machine_at_end": machine_info()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_stability" + (f"_{args.threads}thread" if args.threads else "")
    write_file(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    threads = args.threads or machine["torch_threads"]
    lines = [f"# bench stability: {args.model}, {args.runs} separate `secateurs bench` runs x {args.repeats} repeats",
             "", header_markdown(header),
             f"`secateurs bench` with {threads} torch thread(s); load average at the end "
             f"{result['machine_at_end'].get('load_average')}.", "",
             "| batch | prompt | metric | run medians (tok/s) | spread within each run | max deviation | "
             "run bests (tok/s) | max deviation |",
             "| ---: | ---: | --- | --- | --- | ---: | --- | ---: |"]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['prompt_length']} | {r['metric'].split('_')[0]} | "
                     + ", ".join(f"{m:.1f}" for m in r["medians"]) + " | "
                     + ", ".join(f"{100 * s:.1f}%" for s in r["within_run_spreads"])
                     + f" | {100 * r['max_deviation_from_median_of_runs']:.1f}% | "
                     + ", ".join(f"{b:.1f}" for b in r["bests"]) + f" | {100 * r['best_max_deviation']:.1f}% |")
    lines += ["", f"Worst deviation of a run's median from the median of runs: {100 * worst:.1f}% (target <= 5%); "
              f"of a run's best repeat: {100 * worst_best:.1f}%.", ""]
    write_file(out / f"{stem}.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
