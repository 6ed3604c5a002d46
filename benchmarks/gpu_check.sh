#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: the cuda-marked tests, then stories260K (tests/data) pruned (AMP 30%)
# and briefly recovered (KD) with --device cuda in one process, then under torchrun on every GPU (ddp, fsdp), the
# teacher-logit cache written data-parallel and recovered from, and `secateurs bench` of the recovered model
# against its dense parent on the GPU (paired rounds). Tokens/s and peak memory of each recovery, and everything
# it ran and measured, go under OUTDIR; summary.txt is printed.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]              # default OUTDIR: benchmarks/results/gpu_check
#   bash benchmarks/gpu_check.sh --cpu-smoke OUTDIR    # the same steps on the CPU, tiny sizes, under a minute
#
# PYTHON (default: python) is the interpreter with secateurs installed (pip install -e ".[dev]").
set -euo pipefail

usage() {
    echo "usage: bash benchmarks/gpu_check.sh [--cpu-smoke] [OUTDIR]" >&2
    exit 2
}
MODE=gpu
if [[ "${1:-}" == "--cpu-smoke" ]]; then
    MODE=cpu-smoke
    shift
fi
[[ $# -le 1 && "${1:-}" != -* ]] || usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_ARG="${1:-$ROOT/benchmarks/results/gpu_check}"
mkdir -p "$OUT_ARG"
OUT="$(cd "$OUT_ARG" && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python}"
MODEL="$ROOT/tests/data/stories260K-hf"
TEXT="$ROOT/tests/data/tinystories/tinystories_sample.txt"
HELD_OUT="$ROOT/tests/data/wikitext-2-raw/wiki.test.raw"  # perplexity before and after recovery
export HF_HUB_OFFLINE=1

if [[ "$MODE" == gpu ]]; then
    DEVICE=cuda
    TESTS=(-m cuda tests)
    CALIB=(--calib-samples 32 --calib-length 64)
    DATA=(--tokens 8192 --train-length 128 --val-tokens 256)
    RECOVER=("${DATA[@]}" --train-batch-size 4 --ppl-tokens 4096)
    BENCH=(--batch-sizes 1,8 --prompt-lengths 128,256 --decode-tokens 32 --repeats 5 --time-limit 30)
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else
                  "gpu_check: torch sees no CUDA device (torch " + torch.__version__ + "); use --cpu-smoke on a CPU")'
else
    DEVICE=cpu
    TESTS=(-m cuda tests/test_cuda.py)  # they skip here: this checks that they still collect
    CALIB=(--calib-samples 4 --calib-length 32)
    DATA=(--tokens 256 --train-length 32 --val-tokens 64)
    RECOVER=("${DATA[@]}" --train-batch-size 2 --ppl-tokens 512)
    BENCH=(--batch-sizes 1 --prompt-lengths 16 --decode-tokens 4 --repeats 1 --warmup 0 --time-limit 2)
fi

step() {
    echo "== $1" >&2
}

step "cuda-marked tests ($MODE) -> $OUT/pytest.txt"
"$PYTHON" -m pytest -p no:xdist -q "${TESTS[@]}" 2>&1 | tee "$OUT/pytest.txt"

step "prune stories260K on $DEVICE -> $OUT/pruned"
"$PYTHON" -m secateurs prune "$MODEL" --method amp --ratio 0.3 --calib "$TEXT" "${CALIB[@]}" --device "$DEVICE" \
    --out "$OUT/pruned" --force --quiet 2>&1 | tee "$OUT/prune.txt"

step "recover (KD from the dense parent) on $DEVICE -> $OUT/recovered"
"$PYTHON" -m secateurs recover "$OUT/pruned" --teacher "$MODEL" --data "$TEXT" "${RECOVER[@]}" --ppl "$HELD_OUT" \
    --device "$DEVICE" --out "$OUT/recovered" --force --quiet 2>&1 | tee "$OUT/recover.txt"

# Several processes: one a GPU (--cpu-smoke: two on the CPU, gloo), each strategy; the global batch is the one above.
if [[ "$MODE" == gpu ]]; then
    PROCESSES="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
else
    PROCESSES=2
fi
for STRATEGY in ddp fsdp; do
    step "recover under torchrun: $PROCESSES process(es), --strategy $STRATEGY -> $OUT/recovered-$STRATEGY"
    OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$PROCESSES" \
        -m secateurs recover "$OUT/pruned" --teacher "$MODEL" --data "$TEXT" "${RECOVER[@]}" --strategy "$STRATEGY" \
        --device "$DEVICE" --out "$OUT/recovered-$STRATEGY" --force --quiet 2>&1 | tee "$OUT/recover-$STRATEGY.txt"
done

step "teacher-logits under torchrun: $PROCESSES process(es) -> $OUT/teacher-cache"
OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$PROCESSES" \
    -m secateurs teacher-logits "$MODEL" --data "$TEXT" "${DATA[@]}" --top-k 16 --device "$DEVICE" \
    --out "$OUT/teacher-cache" --force --quiet 2>&1 | tee "$OUT/teacher-logits.txt"
step "recover from the cache under torchrun: $PROCESSES process(es) -> $OUT/recovered-cache"
OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$PROCESSES" \
    -m secateurs recover "$OUT/pruned" --teacher-cache "$OUT/teacher-cache" --data "$TEXT" "${RECOVER[@]}" \
    --device "$DEVICE" --out "$OUT/recovered-cache" --force --quiet 2>&1 | tee "$OUT/recover-cache.txt"

step "bench: recovered vs dense parent on $DEVICE -> $OUT/bench.md, $OUT/bench.json"
"$PYTHON" -m secateurs bench "$OUT/recovered" --baseline "$MODEL" --device "$DEVICE" "${BENCH[@]}" \
    --out "$OUT/bench.json" --force --quiet 2>&1 | tee "$OUT/bench.md"

step "summary -> $OUT/summary.txt"
"$PYTHON" - "$OUT" "$MODE" <<'EOF' | tee "$OUT/summary.txt"
import json
import sys
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
tests = (out / "pytest.txt").read_text().strip().splitlines()[-1]
recovery = json.loads((out / "recovered" / "recovery.json").read_text())
bench = json.loads((out / "bench.json").read_text())
params = {name: model["params"] for name, model in bench["models"].items()}
ppl = next((line for line in (out / "recover.txt").read_text().splitlines() if line.startswith("perplexity on")), "")
print(f"gpu_check ({mode}) on {bench['device']} {bench['machine'].get('gpu', bench['machine'].get('cpu', ''))}")
print(f"cuda-marked tests: {tests}")
print(f"parameters: {' -> '.join(f'{n:,}' for n in params.values())}")
before, after = recovery["before"], recovery["after"]
print(f"recovery on {recovery['device']}: {recovery['tokens']['trained']:,} tokens in {recovery['steps']['done']} "
      f"steps, {recovery['training_tokens_per_second']:,.0f} tok/s; "
      f"validation loss {before['loss']:.4f} -> {after['loss']:.4f}")
if ppl:
    print(ppl)
for strategy in ("ddp", "fsdp", "cache"):
    run = json.loads((out / f"recovered-{strategy}" / "recovery.json").read_text())
    processes = run.get("processes", {"world_size": 1, "strategy": "one process"})
    memory = run.get("peak_memory") or {}
    source = " from the teacher-logit cache" if strategy == "cache" else ""
    print(f"recovery{source} under torchrun, {processes['world_size']} process(es), {processes['strategy']}: "
          f"{run['training_tokens_per_second']:,.0f} tok/s, validation loss {run['after']['loss']:.4f}, "
          f"peak memory of process 0: {memory.get('gib', 'not recorded')} GiB ({memory.get('kind', '')})")
print("speed, recovered / dense (measured; ideal from FLOPs and bytes):")
for row in bench["results"]:
    vs = row["vs_baseline"]
    if row["model"] == bench["baseline"]:
        continue
    def measured(kind: str) -> str:  # None where the rounds were not reliable (a busy machine): the reason
        value = vs[f"{kind}_speedup"]
        return f"x{value:.2f}" if value is not None else f"not measured ({vs[kind].get('reason', 'unreliable')})"

    print(f"  batch {row['batch']:>2}, prompt {row['prompt_length']:>4}: prefill {measured('prefill')} "
          f"(ideal x{vs['ideal_prefill_speedup']:.2f}), decode {measured('decode')} "
          f"(ideal x{vs['ideal_decode_speedup_bytes']:.2f}), reliable: {vs['reliable']}")
EOF
