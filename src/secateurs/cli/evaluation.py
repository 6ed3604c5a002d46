"""The evaluation subcommands of the CLI: eval, bench, report, sweep (wired into secateurs.cli.main).
Each builds the stages of its run (secateurs.pipeline.stages) from its arguments and hands them to
secateurs.pipeline.run; library imports are deferred as secateurs.cli.main explains."""

from __future__ import annotations

from pathlib import Path

from secateurs.cli.options import (
    BENCH_REPEATS,
    BENCH_SECONDS,
    MAX_SPREAD,
    add_calibration_args,
    add_eval_args,
    add_model_args,
    add_out_arg,
    calibration_options,
    evaluation_settings,
)
from secateurs.settings.names import DEFAULT_MAX_SPREAD, STANDARD_TASKS
from secateurs.settings.values import int_in, nonempty, parse_list, positive_int, task_prefix


def add_parsers(sub) -> None:
    """Register eval, bench, report, sweep and tasks on the CLI's subparsers."""
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model (and its dense baseline)")
    add_model_args(p)
    p.add_argument("--baseline", type=nonempty, help="dense model evaluated the same way, shown beside MODEL")
    add_eval_args(p)
    add_out_arg(p, help="write the results to this .json file (for `secateurs report`)")
    _add_force(p, "an existing --out file, only if it is a secateurs eval result")
    _add_bench_parser(sub)
    _add_report_sweep_tasks_parsers(sub)


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="prefill/decode tokens/s, time to first token and memory vs a baseline")
    add_model_args(p)
    p.add_argument("--baseline", type=nonempty,
                   help="dense model measured in the same run, in alternating rounds with MODEL (ratios are model / "
                        "baseline, from the paired rounds)")
    p.add_argument("--batch-sizes", default="1,8", help="comma list (default: 1,8)")
    p.add_argument("--prompt-lengths", default="128,512", help="comma list of prompt tokens (default: 128,512)")
    p.add_argument("--decode-tokens", type=positive_int, default=32, help="greedy decode steps (default: 32)")
    p.add_argument("--repeats", type=BENCH_REPEATS, default=5,
                   help="minimum measured rounds per shape; each round measures the baseline, then MODEL, and "
                        "more rounds follow until --max-spread or --time-limit is met; medians are reported "
                        "(default: 5; at most 1,000)")
    p.add_argument("--warmup", type=int_in(0, 100), default=1,
                   help="unmeasured warm-up rounds per shape (default: 1; at most 100)")
    p.add_argument("--max-spread", type=MAX_SPREAD, default=DEFAULT_MAX_SPREAD,
                   help="stop once the per-round MODEL / baseline ratios' spread (interquartile range / median) is "
                        "at most this; a ratio still more spread when --time-limit passes is reported as not "
                        "measured reliably (default: 0.10; at most 0.25)")
    p.add_argument("--time-limit", type=BENCH_SECONDS, default=60.0,
                   help="seconds of measured rounds per batch/prompt shape before a still-spread ratio is given up "
                        "as not measured reliably (default: 60; at most 86,400)")
    add_out_arg(p, help="write the results to this .json file (the Markdown table goes to stdout)")
    _add_force(p, "an existing --out file, only if it is a secateurs bench result")


def _add_report_sweep_tasks_parsers(sub) -> None:
    p = sub.add_parser("report", help="Markdown + HTML report with plots for a pruned model folder")
    p.add_argument("run", type=nonempty, help="folder written by `secateurs prune` (or its pruning_plan.json)")
    p.add_argument("--eval", dest="eval_file", type=nonempty, help="eval JSON (default: RUN/eval.json if present)")
    p.add_argument("--bench", dest="bench_file", type=nonempty, help="bench JSON (default: RUN/bench.json if present)")
    p.add_argument("--scores", type=nonempty,
                   help="heatmap data: a StructureScores safetensors, or the statistics file of "
                        "`prune --stats FILE` (AMP scores are computed from it)")
    add_out_arg(p, help="output folder (default: RUN/report)")
    _add_force(p, "an existing output folder, only if it holds a secateurs report")

    p = sub.add_parser("sweep", help="prune with several methods x ratios, evaluate, plot against ratio")
    add_model_args(p)
    p.add_argument("--methods", default="magnitude", help="comma list of pruning methods (default: magnitude)")
    p.add_argument("--ratios", default="0.1,0.2,0.3", help="comma list of ratios (default: 0.1,0.2,0.3)")
    add_calibration_args(p)
    add_eval_args(p)
    add_out_arg(p, required=True, help="output folder for sweep.json/.md/.html and plots")
    _add_force(p, "an existing output folder, only if it holds a secateurs sweep")

    p = sub.add_parser("tasks", help="write lm-eval task YAMLs for local task files (for lm-eval's own runners, "
                                     "e.g. accelerate launch -m lm_eval --include_path OUT)")
    p.add_argument("--data-dir", required=True, type=nonempty, help="folder with NAME.jsonl task files")
    p.add_argument("--tasks", default=",".join(STANDARD_TASKS), type=nonempty,
                   help="comma list (default: the five standard tasks)")
    p.add_argument("--prefix", default="secateurs_", type=task_prefix,
                   help="task name prefix: letters, digits, '_' and '.' (default: secateurs_)")
    add_out_arg(p, required=True, help="folder for the YAML files")
    _add_force(p, "an existing output folder, only if it holds secateurs task files")


def _add_force(p, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what}")


def cmd_tasks(args) -> int:
    from secateurs.evaluation.zero_shot import export_task_configs  # noqa: PLC0415 (deferred: lm-eval's tasks)

    written = export_task_configs(args.data_dir, args.out, args.tasks, args.prefix, force=args.force)
    for name, path in written.items():
        print(f"{name}: {path}")
    print(f"run with: lm_eval --include_path {args.out} --tasks {','.join(written)} ...")
    return 0


def _placement(args):
    from secateurs.pipeline.stages import Placement  # noqa: PLC0415 (deferred: torch, see secateurs.cli.main)

    return Placement(args.dtype, args.device, args.device_map, args.offload_folder)


def eval_stages(args) -> list:
    from secateurs.pipeline.stages import Evaluate  # noqa: PLC0415 (deferred: torch)

    return [Evaluate(evaluation_settings(args), models=(args.model,), baseline=args.baseline,
                     placement=_placement(args), out=args.out, force=args.force)]


def cmd_eval(args) -> int:
    from secateurs.evaluation.report import eval_tables, render_markdown  # noqa: PLC0415 (deferred: torch)
    from secateurs.pipeline import run  # noqa: PLC0415 (deferred: torch)

    result = run(eval_stages(args)).results[-1]
    print(render_markdown(eval_tables(result)))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def bench_stages(args) -> list:
    from secateurs.evaluation.speed import BenchConfig  # noqa: PLC0415 (deferred: torch)
    from secateurs.pipeline.stages import Bench  # noqa: PLC0415 (deferred: torch)

    config = BenchConfig(batch_sizes=tuple(parse_list(args.batch_sizes, int, "batch sizes")),
                         prompt_lengths=tuple(parse_list(args.prompt_lengths, int, "prompt lengths")),
                         decode_tokens=args.decode_tokens, repeats=args.repeats, warmup=args.warmup,
                         max_spread=args.max_spread, time_limit=args.time_limit)
    return [Bench(config, models=(args.model,), baseline=args.baseline, placement=_placement(args), out=args.out,
                  force=args.force)]


def cmd_bench(args) -> int:
    from secateurs.evaluation.speed import bench_markdown  # noqa: PLC0415 (deferred: torch)
    from secateurs.pipeline import run  # noqa: PLC0415 (deferred: torch)

    result = run(bench_stages(args)).results[-1]
    print(bench_markdown(result))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_report(args) -> int:
    """A light command (no model, no torch): the report writer directly, not through the stages."""
    from secateurs.evaluation.report import write_run_report  # noqa: PLC0415 (deferred: numpy and the plots)

    files = write_run_report(args.run, args.out, eval_file=args.eval_file, bench_file=args.bench_file,
                             scores=args.scores, force=args.force)
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


def sweep_stages(args) -> list:
    """The sweep: every method x ratio pruned from one PruneJob (calibration, seed) and evaluated."""
    from secateurs.pipeline.jobs import PruneJob  # noqa: PLC0415 (deferred: torch)
    from secateurs.pipeline.stages import Evaluate, Sweep  # noqa: PLC0415 (deferred: torch)

    inputs = [i for i in (args.model, args.ppl, args.calib, args.data_dir) if i]
    job = PruneJob(args.model, "", calibration=args.calib, calibration_options=calibration_options(args),
                   seed=args.seed or 0, dtype=args.dtype, device=args.device, inputs=inputs)
    evaluation = Evaluate(evaluation_settings(args), models=(args.model,), placement=_placement(args))
    return [Sweep(job, tuple(parse_list(args.methods, str, "methods")), tuple(parse_list(args.ratios, float, "ratios")),
                  evaluation, args.out, force=args.force)]


def cmd_sweep(args) -> int:
    from secateurs.pipeline import run  # noqa: PLC0415 (deferred: torch)

    summary = run(sweep_stages(args)).results[-1]
    print(Path(summary["files"]["markdown"]).read_text())
    for kind, path in summary["files"].items():
        print(f"{kind}: {path}")
    return 0


COMMANDS = {"eval": cmd_eval, "bench": cmd_bench, "report": cmd_report, "sweep": cmd_sweep, "tasks": cmd_tasks}
