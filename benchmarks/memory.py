"""Peak memory of calibration statistics and surgery: full model in memory vs layer-streamed.

A randomly initialised Llama-architecture model of realistic shape (default about 1B parameters,
float32; the weights do not matter for memory) is written to disk once. Each measurement then
runs in a fresh subprocess and reports its peak resident memory (VmHWM) above the baseline of an
interpreter that has imported everything and run the same code once on a tiny model:

* stats-full       from_pretrained, then collect_statistics (one forward pass with hooks)
* stats-streamed   load_skeleton (decoder layers on meta), then streamed_statistics reading each
                   layer's weights from the checkpoint only while it runs
* prune-full       from_pretrained, apply_plan, save_pruned
* prune-streamed   prune_checkpoint (shard by shard)
* consensus-full / consensus-streamed   consensus depth scoring (2 layers, 512 scoring tokens) on the
                   model in memory, and on a lazy skeleton (layers read one at a time; the embeddings,
                   final norm and LM head stay in memory, as the scores go through the LM head)

Peaks are given in bytes, as multiples of one decoder layer's weights and of the whole model.
This is CPU RAM: on a GPU the same streaming bounds accelerator memory, with the weights waiting
in CPU RAM or on disk.

    python benchmarks/memory.py [--layers 16 --hidden 2048 --intermediate 5632]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import header_markdown, result_header
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from secateurs.calibration.data import Calibration
from secateurs.calibration.statistics import collect_statistics
from secateurs.calibration.streaming import streamed_statistics
from secateurs.files.output import write_file
from secateurs.methods import make_plan
from secateurs.storage.checkpoint import load_skeleton, prune_checkpoint
from secateurs.storage.pruned import save_pruned
from secateurs.surgery.apply import apply_plan

RESULTS = Path(__file__).parent / "results"


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _warm_up() -> None:
    """Run the same code on a tiny model of the same architecture first, so the baseline already
    holds the library code pages and allocator state every run needs whatever the model's size."""
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=32000)).eval()
    ids = torch.randint(0, 32000, (8, 16))
    calib = Calibration([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], {"source": "warm-up"}, "w")
    collect_statistics(tiny, calib, progress=False)
    streamed_statistics(tiny, calib, progress=False)


def child(kind: str, folder: str, workdir: str, samples: int, length: int) -> None:
    """One measurement, run in its own process; prints a JSON line. Everything is imported before
    the baseline is taken, so the peak is the work's own."""
    _warm_up()
    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (samples, length))
    calib = Calibration([{"input_ids": ids[i:i + 8], "attention_mask": torch.ones_like(ids[i:i + 8])}
                         for i in range(0, samples, 8)], {"source": "random tokens"}, "random")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current RSS
    base = peak_rss()
    start = time.perf_counter()
    if kind == "stats-full":
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        collect_statistics(model, calib, progress=False)
    elif kind == "stats-streamed":
        model, tensors = load_skeleton(folder, load_outside_layers=False)
        streamed_statistics(model, calib, checkpoint=tensors, progress=False)
    elif kind == "prune-full":
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        plan = make_plan(model, "magnitude", 0.2)
        save_pruned(apply_plan(model, plan), plan, Path(workdir) / "pruned-full", force=True)
    elif kind in ("consensus-full", "consensus-streamed"):
        if kind == "consensus-full":
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
        else:
            model, _ = load_skeleton(folder, load_outside_layers=True, lazy_layers=True)
        make_plan(model, "consensus", layers=2, calibration=calib, max_tokens=512, progress=False)
    elif kind == "prune-streamed":
        model, _ = load_skeleton(folder, load_outside_layers=False)
        plan = make_plan(model, "random", 0.2)  # magnitude needs the weights; the plan's origin does not matter here
        prune_checkpoint(folder, plan, Path(workdir) / "pruned-streamed", force=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"kind": kind, "peak_bytes": peak_rss() - base, "seconds": seconds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--workdir", default="/tmp/secateurs-memory")
    p.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--kinds", default="stats-full,stats-streamed,prune-full,prune-streamed,consensus-full,"
                                      "consensus-streamed")
    p.add_argument("--name", default="memory", help="results file stem (default: memory)")
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.workdir, args.samples, args.length)
        return
    header = result_header()
    folder = Path(args.workdir) / f"llama-{args.layers}x{args.hidden}"
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=32000,
                         tie_word_embeddings=False)
    if not (folder / "config.json").exists():
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p_ in model.parameters():
                p_.normal_(0, 0.02)
        model.save_pretrained(folder, max_shard_size="1GB")
        del model
    layer_bytes = 4 * (4 * args.hidden ** 2 + 3 * args.hidden * args.intermediate + 2 * args.hidden)
    model_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    params = model_bytes // 4
    rows = []
    for kind in args.kinds.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", kind, str(folder), "--workdir", args.workdir,
                              "--samples", str(args.samples), "--length", str(args.length)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["x_layer"] = row["peak_bytes"] / layer_bytes
        row["x_model"] = row["peak_bytes"] / model_bytes
        rows.append(row)
        print(row, flush=True)
    by = {r["kind"]: r for r in rows}
    result = {
        "header": header,
        "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "params": params, "weight_bytes": model_bytes, "layer_bytes": layer_bytes, "dtype": "float32"},
        "calibration": {"samples": args.samples, "length": args.length, "batch": 8},
        "rows": rows,
        "stats_time_ratio_streamed_over_full": by["stats-streamed"]["seconds"] / by["stats-full"]["seconds"]
        if {"stats-streamed", "stats-full"} <= set(by) else None,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_file(Path(args.out) / f"{args.name}.json", json.dumps(result, indent=2))
    lines = ["# Peak memory, full vs streamed", "", header_markdown(header),
             f"Random Llama, {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, "
             f"{params:,} parameters "
             f"(float32, {model_bytes / 2**30:.2f} GiB; one layer {layer_bytes / 2**20:.0f} MiB). Calibration "
             f"{args.samples} x {args.length} tokens, batch 8. CPU RAM peak above the baseline of a warmed-up "
             "interpreter (libraries imported, same code run once on a tiny model).", "",
             "| run | peak | x one layer | x model | seconds |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['peak_bytes'] / 2**20:,.0f} MiB | {r['x_layer']:.2f} | {r['x_model']:.3f} | "
                     f"{r['seconds']:.1f} |")
    if result["stats_time_ratio_streamed_over_full"] is not None:
        lines += ["", f"Streamed statistics take {result['stats_time_ratio_streamed_over_full']:.2f}x the time of the "
                  "full path (loading included: the streamed path reads every layer from disk as it goes)."]
    write_file(Path(args.out) / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
