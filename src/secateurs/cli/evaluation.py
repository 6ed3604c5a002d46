"""The evaluation subcommands of the CLI: eval, bench, report, sweep (wired into secateurs.cli.main)."""

from __future__ import annotations

import json
from pathlib import Path

from secateurs.settings.values import int_in, nonempty, positive_int, task_prefix
from secateurs.errors import SecateursError
from secateurs.storage.output import result_marker, write_file
from secateurs.settings.names import DEFAULT_MAX_SPREAD, STANDARD_TASKS
from secateurs.cli.options import (BENCH_REPEATS, BENCH_SECONDS, MAX_SPREAD, add_calibration_args, add_eval_args,
                               add_model_args, add_out_arg)


def add_parsers(sub) -> None:
    """Register eval, bench, report, sweep and tasks on the CLI's subparsers."""
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model (and its dense baseline)")
    add_model_args(p)
    p.add_argument("--baseline", type=nonempty, help="dense model evaluated the same way, shown beside MODEL")
    add_eval_args(p)
    add_out_arg(p, help="write the results to this .json file (for `secateurs report`)")
    _add_force(p, "an existing --out file, only if it is a secateurs eval result")

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

    p = sub.add_parser("report", help="Markdown + HTML report with plots for a pruned model folder")
    p.add_argument("run", type=nonempty, help="folder written by `secateurs prune` (or its pruning_plan.json)")
    p.add_argument("--eval", dest="eval_file", type=nonempty, help="eval JSON (default: RUN/eval.json if present)")
    p.add_argument("--bench", dest="bench_file", type=nonempty, help="bench JSON (default: RUN/bench.json if present)")
    p.add_argument("--scores", type=nonempty, help="heatmap data: a StructureScores safetensors, or the statistics file of "
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
    p.add_argument("--tasks", default=",".join(STANDARD_TASKS), type=nonempty, help="comma list (default: the five standard tasks)")
    p.add_argument("--prefix", default="secateurs_", type=task_prefix,
                   help="task name prefix: letters, digits, '_' and '.' (default: secateurs_)")
    add_out_arg(p, required=True, help="folder for the YAML files")
    _add_force(p, "an existing output folder, only if it holds secateurs task files")


def _add_force(p, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what}")


def cmd_tasks(args) -> int:
    from secateurs.evaluation.zero_shot import export_task_configs

    written = export_task_configs(args.data_dir, args.out, args.tasks, args.prefix, force=args.force)
    for name, path in written.items():
        print(f"{name}: {path}")
    print(f"run with: lm_eval --include_path {args.out} --tasks {','.join(written)} ...")
    return 0


def _label(source: str, taken: set[str]) -> str:
    name = Path(source).name or source
    while name in taken:
        name += "'"
    taken.add(name)
    return name


def _spec(args):
    from secateurs.evaluation.perplexity import load_text
    from secateurs.evaluation.suite import EvalSpec
    from secateurs.settings.values import parse_list
    from secateurs.evaluation.zero_shot import parse_tasks

    text, text_info = (None, None)
    if args.data_dir and not args.tasks:
        raise SecateursError("--data-dir holds the task files of --tasks; it applies with --tasks")
    if args.limit is not None and not args.tasks:
        raise SecateursError("--limit caps the items of each zero-shot task; it applies with --tasks")
    if args.text_field and not (args.ppl and str(args.ppl).endswith(".jsonl")):
        raise SecateursError("--text-field names the field of .jsonl records holding the text; it applies with a "
                             "--ppl .jsonl file")
    if args.max_docs and not (args.ppl and str(args.ppl).endswith(".jsonl")):
        raise SecateursError("--max-docs counts the documents of a --ppl .jsonl file; it applies with one")
    if args.ppl:
        text, text_info = load_text(args.ppl, field=args.text_field or "text", max_docs=args.max_docs)
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    spec = EvalSpec(text=text, protocols=parse_list(args.protocol, str, "protocols"), batch_size=args.batch_size,
                    max_windows=args.max_windows, max_tokens=args.max_tokens, max_batch_tokens=args.max_batch_tokens,
                    tasks=parse_tasks(args.tasks) if args.tasks else None, data_dir=args.data_dir, limit=args.limit,
                    num_fewshot=args.num_fewshot, eval_batch_size=args.eval_batch_size)
    if spec.text is None and not spec.tasks:
        raise SecateursError("nothing to evaluate: give --ppl TEXT and/or --tasks NAMES")
    return spec, text_info


def cmd_eval(args) -> int:
    from secateurs.evaluation.report import eval_tables, render_markdown
    from secateurs.evaluation.speed import machine_info
    from secateurs.evaluation.suite import evaluate
    from secateurs.storage.loading import load_model

    sources = ([args.baseline] if args.baseline else []) + [args.model]
    out = _check_out(args, sources + [args.ppl, args.data_dir], kind="eval")
    spec, text_info = _spec(args)
    taken: set[str] = set()
    models = {}
    for source in sources:
        label = _label(source, taken)
        model, tokenizer = load_model(source, args.dtype, args.device, args.device_map, args.offload_folder)
        spec.check(model)
        models[label] = {"source": source, **evaluate(model, tokenizer, spec)}
        del model
    result = {"written_by": result_marker("eval"), "text": text_info, "protocols": spec.protocols, "baseline": _label(args.baseline, set()) if args.baseline
              else None, "models": models, "machine": machine_info(args.device)}
    if spec.tasks:
        first = next(iter(models.values()))["zero_shot"]
        result["zero_shot"] = {k: first[k] for k in ("lm_eval_version", "limit", "num_fewshot")}
        result["zero_shot"]["data_dir"] = args.data_dir
    print(render_markdown(eval_tables(result)))
    if out:
        write_file(out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def _check_out(args, inputs, kind: str) -> Path | None:
    """Device and --out FILE.json checked (and claimed) before anything is loaded or measured."""
    from secateurs.storage.loading import check_device
    from secateurs.storage.output import check_output_file

    if args.device_map is None:
        check_device(args.device)
    return (check_output_file(args.out, [i for i in inputs if i], force=args.force, kind=kind, what="--out file")
            if args.out else None)


def cmd_bench(args) -> int:

    from secateurs.evaluation.speed import BenchConfig, bench_markdown, bench_models, folder_bytes
    from secateurs.settings.values import parse_list
    from secateurs.storage.loading import load_model

    sources = ([args.baseline] if args.baseline else []) + [args.model]
    out = _check_out(args, sources, kind="bench")
    config = BenchConfig(batch_sizes=tuple(parse_list(args.batch_sizes, int, "batch sizes")),
                         prompt_lengths=tuple(parse_list(args.prompt_lengths, int, "prompt lengths")),
                         decode_tokens=args.decode_tokens, repeats=args.repeats, warmup=args.warmup,
                         max_spread=args.max_spread, time_limit=args.time_limit)
    config.validate()
    taken: set[str] = set()
    models, paths = {}, {}
    for source in sources:
        label = _label(source, taken)
        models[label], _ = load_model(source, args.dtype, args.device, args.device_map, args.offload_folder)
        paths[label] = source
    result = {"written_by": result_marker("bench"), **bench_models(models, config)}
    for label, source in paths.items():
        result["models"][label]["source"] = source
        result["models"][label]["disk_bytes"] = folder_bytes(source)
    text = bench_markdown(result)
    print(text)
    if out:
        write_file(out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def cmd_report(args) -> int:
    from secateurs.evaluation.report import write_run_report

    files = write_run_report(args.run, args.out, eval_file=args.eval_file, bench_file=args.bench_file,
                             scores=args.scores, force=args.force)
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


def cmd_sweep(args) -> int:
    from secateurs.settings.values import parse_list
    from secateurs.pipeline.sweep import check_methods_ratios, run_sweep
    from secateurs.storage.loading import check_device, load_model
    from secateurs.storage.output import check_output_dir

    methods = parse_list(args.methods, str, "methods")
    ratios = parse_list(args.ratios, float, "ratios")
    check_methods_ratios(methods, ratios)
    _refuse_unused_calibration(args, methods)
    if args.device_map is None:
        check_device(args.device)
    inputs = [args.model, args.ppl, args.calib, args.data_dir]
    check_output_dir(args.out, force=args.force, inputs=[i for i in inputs if i], what="sweep output folder",
                     kind="sweep")
    spec, text_info = _spec(args)
    model, tokenizer = load_model(args.model, args.dtype, args.device, args.device_map, args.offload_folder)
    from secateurs.calibration.data import check_calibration_length
    from secateurs.cli.options import calibration_options

    check_calibration_length(model.config, args.calib_length)  # not point by point, after minutes of work

    options = {"seed": args.seed or 0, "calibration_options": calibration_options(args)}
    if args.calib:
        options["calibration"] = args.calib
    summary = run_sweep(model, tokenizer, methods, ratios, spec, args.out, prune_options=options,
                        model_name=args.model, describe={"text": text_info}, inputs=[i for i in inputs if i],
                        force=args.force)
    print(Path(summary["files"]["markdown"]).read_text())
    for kind, path in summary["files"].items():
        print(f"{kind}: {path}")
    return 0


def _refuse_unused_calibration(args, methods: list[str]) -> None:
    """Calibration options for a sweep whose methods never calibrate would be ignored: refused."""
    from secateurs.methods.registry import get_method

    given = [flag for flag, value in (("--calib", args.calib), ("--calib-samples", args.calib_samples),
                                      ("--calib-length", args.calib_length)) if value is not None]
    if given and not any(get_method(m).needs.calibration for m in methods):
        raise SecateursError(f"{', '.join(given)} set the calibration data, and none of {', '.join(methods)} "
                             "calibrates: drop them, or add a method that scores on data (amp, wanda-sp, flap, ...)")


COMMANDS = {"eval": cmd_eval, "bench": cmd_bench, "report": cmd_report, "sweep": cmd_sweep, "tasks": cmd_tasks}
