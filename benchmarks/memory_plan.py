"""The recovery memory plan (secateurs.recovery.memory) against the measured peak, and the plan of
Llama-3.1-8B and -70B pruned 20% on 8 x 80 GB.

Measured (CPU): each configuration runs in a fresh subprocess (OMP_NUM_THREADS=1). The subprocess
imports everything and runs the same recovery once on a tiny model of the same architecture (so the
library's code and the allocator's state are in the baseline), takes its resident memory as the
baseline and resets the kernel's high-water mark (/proc/self/clear_refs), then builds a random
student and a teacher (a copy) of the configuration and runs a few recovery steps. The peak is the
high-water mark (VmHWM) above the baseline; the plan is its one-process peak for the same shapes and
settings.

Planned (no weights anywhere): the dense configs in benchmarks/configs/, the student cut 20% of all
parameters as AMP's budget would (`--assume-ratio 0.2`), 8 processes with 80 GiB each, batch 8 x
2048 tokens (one sequence per process), both strategies, full fine-tuning and LoRA (r 8), with the
dense model as teacher.

    python benchmarks/memory_plan.py            # writes benchmarks/results/memory_plan.md and .json
    python benchmarks/memory_plan.py --measure kd-full   # one measurement, printed as JSON
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, header_markdown, result_header

RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "benchmarks" / "configs"
TOKENIZER = ROOT / "tests" / "data" / "stories260K-hf"  # 512 tokens; the models' vocabularies are larger
TOLERANCE = 0.2
# Llama-architecture random models, float32 on the CPU; sized so that the training state (gradients,
# AdamW moments and activations) exceeds 1 GB and a few steps take well under a minute on one thread.
# kd-full: weights and the vocabulary dominate (untied 48,000 x 768 embeddings and head: 1.2 GB of
# gradients and moments, 0.5 GB of logits and LM head gradient); ce-long: the activations dominate
# (16 narrow layers, 6 x 1024 tokens per micro-batch: 1.3 GB).
MEASURED = {
    "kd-full": {"model": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 4,
                          "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 48000},
                "settings": {"batch_size": 2, "seq_len": 256, "tokens": 2 * 512, "val_tokens": 256,
                             "eval_every": 2}},
    "ce-long": {"model": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 16,
                          "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 8000},
                "settings": {"batch_size": 6, "seq_len": 1024, "tokens": 2 * 6144, "val_tokens": 1024,
                             "eval_every": 2, "patience": None}, "teacher": False},
}
# (method, settings beyond PLANNED's): distillation from the dense model in memory; and with activation
# checkpointing and a teacher-logit cache (`--teacher-cache`, no teacher in memory)
VARIANTS = (("full", {}), ("lora", {}),
            ("full", {"gradient_checkpointing": True, "teacher_cache": "cache", "data": "c4.jsonl"}))
PLANNED = {"processes": 8, "device_gib": 80, "ratio": 0.2, "settings": {"batch_size": 8, "seq_len": 2048,
                                                                         "tokens": 10**8}}


def llama_config(fields: dict):
    from transformers import LlamaConfig  # noqa: PLC0415 - the parent process never builds a model

    return LlamaConfig(**fields, tie_word_embeddings=False, max_position_embeddings=4096, dtype="float32")


def settings_of(case: dict):
    from secateurs.recovery.settings import RecoverySettings  # noqa: PLC0415 - as above

    return RecoverySettings(**case["settings"])


def write_text(path: Path, words: int = 60_000) -> Path:
    """Seeded random words: enough text for any configuration here, the same every run."""
    rng = random.Random(0)
    vocabulary = ("the cat sat on a mat and saw big red dog run far away from home while birds sang in tall "
                  "green trees near old river bank where children played every day after school").split()
    path.write_text(" ".join(rng.choice(vocabulary) for _ in range(words)) + "\n", encoding="utf-8")
    return path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _run(fields: dict, case: dict, tokenizer, text: Path, teacher: bool) -> None:
    import torch  # noqa: PLC0415 - the worker's imports are part of its baseline
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    from secateurs import recover  # noqa: PLC0415

    torch.manual_seed(0)
    student = LlamaForCausalLM(llama_config(fields))
    dense = copy.deepcopy(student) if teacher else None
    recover(student, dense, settings=settings_of(case).replace(data=str(text)), tokenizer=tokenizer,
            teacher_tokenizer=tokenizer if teacher else None, progress=False)


def measure(name: str) -> dict:
    """Peak resident memory above the baseline of one configuration (run in its own process)."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - as above

    case = MEASURED[name]
    teacher = case.get("teacher", True)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    with tempfile.TemporaryDirectory() as tmp:
        text = write_text(Path(tmp) / "text.txt")
        tiny = dict(case["model"], hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000)
        _run(tiny, case, tokenizer, text, teacher)
        gc.collect()
        ctypes.CDLL(None).malloc_trim(0)
        baseline = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
        started = time.perf_counter()
        _run(case["model"], case, tokenizer, text, teacher)
        seconds = time.perf_counter() - started
    return {"name": name, "baseline": baseline, "peak_above_baseline": _status("VmHWM") - baseline,
            "seconds": round(seconds, 1)}


def planned(name: str) -> dict:
    """The plan of one measured configuration: one process, its method."""
    from secateurs.recovery.memory import plan_for_models  # noqa: PLC0415 - as above
    from secateurs.storage.pruned import meta_model  # noqa: PLC0415

    case = MEASURED[name]
    model = meta_model(llama_config(case["model"]))
    plan = plan_for_models(model, model if case.get("teacher", True) else None, settings_of(case))
    return plan.device("ddp").to_dict()


def compare(name: str) -> dict:
    """Plan and measurement of one configuration (the measurement in a subprocess)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", name], env=env,
                         capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    plan = planned(name)
    return {**measured, "plan": plan, "ratio": round(plan["peak"] / measured["peak_above_baseline"], 3)}


def large_models() -> list[dict]:
    from secateurs.recovery.memory import choose_strategy, plan_memory, shapes_of, skeleton  # noqa: PLC0415
    from secateurs.recovery.settings import RecoverySettings  # noqa: PLC0415

    rows = []
    for name in ("llama-3.1-8b", "llama-3.1-70b"):
        dense = shapes_of(skeleton(CONFIGS / name))
        student = shapes_of(skeleton(CONFIGS / name, assume_ratio=PLANNED["ratio"]))
        for method, variant in VARIANTS:
            settings = RecoverySettings(**PLANNED["settings"], method=method, **variant)
            teacher = None if variant else dense  # a teacher-logit cache: no teacher in memory
            plan = plan_memory(student, teacher, settings, PLANNED["processes"], "cuda",
                               PLANNED["device_gib"] * 2**30)
            try:
                chosen = choose_strategy(plan, PLANNED["device_gib"] * 2**30)
            except Exception:  # noqa: BLE001 - the refusal is the result
                chosen = None
            rows.append({"model": name, "dense_params": dense.params, "student_params": student.params,
                         "method": method, "variant": "checkpointing, teacher cache" if variant else "",
                         "chosen": chosen, "plan": plan.to_dict()})
    return rows


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def markdown(header: dict, measured: list[dict], large: list[dict]) -> str:
    lines = ["# Recovery memory plan", "", header_markdown(header), "## Planned vs measured peak (CPU, one process)",
             "", "Peak resident memory above the process's baseline after imports; the plan's peak is the largest of "
             "its forward-and-loss, optimiser-step and loading totals.", "",
             "| configuration | parameters | training state (plan) | plan peak | measured peak | plan / measured |"
             " seconds |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in measured:
        p = m["plan"]
        params = p["student_weights"] // 4
        state = p["gradients"] + p["optimizer"] + p["activations"]
        lines.append(f"| {m['name']} | {params:,} | {gib(state)} GiB | {gib(p['peak'])} GiB | "
                     f"{gib(m['peak_above_baseline'])} GiB | {m['ratio']:.3f} | {m['seconds']} |")
    lines += ["", f"## Llama-3.1 pruned {PLANNED['ratio']:.0%}, {PLANNED['processes']} x {PLANNED['device_gib']} GiB",
              "", f"Batch {PLANNED['settings']['batch_size']} x {PLANNED['settings']['seq_len']} tokens (one sequence "
              "per process), bfloat16 weights, distillation from the dense model (forward only: replicated on every "
              "device, or under fsdp sharded like the student where the replicated one does not fit, "
              "`--teacher-sharding auto`) or from a teacher-logit cache (no teacher in memory), cut by AMP's "
              "budget with the balanced split (`--assume-ratio`); GiB per device. Teacher: its weights on the "
              "device, what a sharded one gathers at a time and its activations. Loading: on the device while "
              "the models load (ddp: every process holds the whole student and teacher; fsdp: only process 0 "
              "reads them, into its host memory, the host column, and every device receives its shards).", "",
              "| model | method | strategy | student weights | gradients | AdamW | best weights | gathered | "
              "activations | logits | teacher | loading | host (process 0) | peak | fits |",
              "| --- | --- | --- |" + " ---: |" * 12]
    for r in large:
        for d in r["plan"]["devices"]:
            if d["method"] != r["method"]:
                continue
            fits = "chosen" if d["strategy"] == r["chosen"] else (
                "yes" if d["peak"] <= 0.9 * PLANNED["device_gib"] * 2**30 else "no")
            method = r["method"] + (f", {r['variant']}" if r["variant"] else "")
            lines.append(f"| {r['model']} ({r['student_params'] / 1e9:.2f} B) | {method} | {d['strategy']} | "
                         + " | ".join(gib(d[k]) for k in ("student_weights", "gradients", "optimizer", "best_weights",
                                                          "gathered", "activations", "logits"))
                         + f" | {gib(d['teacher_weights'] + d['teacher_gathered'] + d['teacher_activations'])} | "
                         f"{gib(d['load_peak'])} | {gib(d['host_load'])} | {gib(d['peak'])} | {fits} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", choices=tuple(MEASURED), help="measure one configuration and print JSON")
    parser.add_argument("--only", nargs="*", choices=tuple(MEASURED), help="measure these (default: all)")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    header = result_header()
    measured = [compare(name) for name in (args.only or MEASURED)]
    large = large_models()
    result = {"header": header, "tolerance": TOLERANCE, "measured": measured, "planned": PLANNED, "large": large}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_plan.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(header, measured, large)
    (RESULTS / "memory_plan.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
