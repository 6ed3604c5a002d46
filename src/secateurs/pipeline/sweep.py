"""Sweep: prune one model with several methods at several ratios, evaluate each, and plot
perplexity and zero-shot accuracy against the fraction of parameters removed. (A run of pruning
recipes, so it lives beside the pipeline, not in secateurs.evaluation, which never imports methods.)

The dense model is loaded once; every point prunes a deep copy (so points are independent and
the order does not matter) and frees it after evaluation. A point that cannot be made (for
instance a ratio the GQA rules cannot represent) is recorded with its error and the sweep goes on.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import time
from pathlib import Path

from secateurs.errors import SecateursError
from secateurs.evaluation.report import plot_sweep, write_page
from secateurs.evaluation.speed import machine_info
from secateurs.evaluation.suite import EvalSpec, evaluate
from secateurs.files.output import write_file, write_folder
from secateurs.methods.registry import METHODS, get_method
from secateurs.pipeline.jobs import PruneJob, prune_in_memory
from secateurs.planning.accounting import model_stats
from secateurs.runtime.progress import bar


def check_methods_ratios(methods: list[str], ratios: list[float]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SecateursError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(sorted(METHODS))}")
    bad = [r for r in ratios if not 0 < r < 1]
    if bad:
        raise SecateursError(f"ratios must be in (0, 1), got {bad}")


def refuse_unused_calibration(calibration_options: dict, calibration, methods: list[str]) -> None:
    """Calibration settings for a sweep whose methods never calibrate would be ignored: refused."""
    given = [flag for flag, value in (("--calib", calibration), ("--calib-samples",
                                                                 calibration_options.get("num_samples")),
                                      ("--calib-length", calibration_options.get("max_length"))) if value is not None]
    if given and not any(get_method(m).needs.calibration for m in methods):
        raise SecateursError(f"{', '.join(given)} set the calibration data, and none of {', '.join(methods)} "
                             "calibrates: drop them, or add a method that scores on data (amp, wanda-sp, flap, ...)")


def _point(method: str, ratio: float, params_removed: float, result: dict) -> dict:
    p = {"method": method, "ratio": ratio, "params_removed": params_removed}
    for r in result.get("perplexity", []):
        p[f"ppl_{r['protocol']}"] = r["perplexity"]
    z = result.get("zero_shot")
    if z:
        p["mean_acc"] = z.get("mean_acc")
        errors = [r.get("acc_stderr") for r in z["tasks"].values()]
        if errors and all(e is not None for e in errors):  # standard error of the mean of independent tasks
            p["mean_acc_stderr"] = sum(e * e for e in errors) ** 0.5 / len(errors)
        for task, r in z["tasks"].items():
            p[f"acc_{task}"] = r["acc"]
            p[f"acc_{task}_stderr"] = r.get("acc_stderr")
    return p


def run_sweep(model, tokenizer, methods: list[str], ratios: list[float], spec: EvalSpec, out_dir: str | Path, *,
              job: PruneJob, model_name: str = "", progress: bool = True,
              describe: dict | None = None, inputs=(), force: bool = False) -> dict:
    """Evaluate dense + every method x ratio; write sweep.json/.md/.html and PNG plots to out_dir
    (through the one writer: a previous sweep there is replaced whole at the end; `describe` adds
    entries to sweep.json). `job`: the prune settings of every point (calibration, seed, ...; its
    method and ratio replaced by each point's). An existing out_dir is replaced only with force, and
    only a sweep's."""
    final = Path(out_dir).expanduser().resolve()
    with write_folder(final, force=force, inputs=inputs, kind="sweep", what="sweep output folder") as tmp:
        summary = _sweep(model, tokenizer, methods, ratios, spec, tmp, job, model_name, progress)
        summary.update(describe or {})
        files = write_sweep_report(summary, tmp)
        write_file(tmp / "sweep.json", json.dumps(summary, indent=2, default=str) + "\n")
    summary["files"] = {k: str(final / Path(v).name) for k, v in files.items()}
    return summary


def _sweep(model, tokenizer, methods, ratios, spec: EvalSpec, out: Path, job: PruneJob, model_name: str,
           progress: bool) -> dict:
    check_methods_ratios(methods, ratios)
    spec.check(model)
    dense_params = model_stats(model).total_params
    if job.statistics is None:  # one calibration pass serves every ratio and method of this sweep
        job = dataclasses.replace(job, statistics=str(out / "calibration_statistics.safetensors"))  # a fresh folder
    started = time.perf_counter()
    runs = [{"method": "dense", "ratio": 0.0, "params": dense_params, **evaluate(model, tokenizer, spec, progress)}]
    points = [_point("dense", 0.0, 0.0, runs[0])]
    grid = [(m, r) for m in methods for r in ratios]
    for method, ratio in bar(grid, desc="sweep", disable=not progress):
        pruned = copy.deepcopy(model)
        try:
            pruned, plan, *_ = prune_in_memory(dataclasses.replace(job, method=method, ratio=ratio), pruned,
                                               tokenizer)
        except SecateursError as exc:
            runs.append({"method": method, "ratio": ratio, "error": str(exc)})
            continue
        params = model_stats(pruned).total_params
        result = evaluate(pruned, tokenizer, spec, progress)
        runs.append({"method": method, "ratio": ratio, "params": params, "plan": plan.provenance, **result})
        points.append(_point(method, ratio, 1 - params / dense_params, result))
        del pruned
        gc.collect()
    return {"model": model_name, "methods": methods, "ratios": ratios, "protocols": spec.protocols,
            "tasks": spec.tasks, "limit": spec.limit, "points": points, "runs": runs,
            "seconds": round(time.perf_counter() - started, 1), "machine": machine_info()}


def _pct(p: dict, key: str) -> str:
    if p.get(key) is None:
        return "n/a"
    se = p.get(f"{key}_stderr")
    return f"{100 * p[key]:.1f} ± {100 * se:.1f}" if se is not None else f"{100 * p[key]:.1f}"


def write_sweep_report(summary: dict, out: Path) -> dict[str, Path]:
    points = summary["points"]
    files: dict[str, Path] = {}
    ppl_keys = [k for k in points[0] if k.startswith("ppl_")] if points else []
    for key in ppl_keys:
        files[key] = plot_sweep(points, key, out / f"sweep_{key}.png", f"perplexity ({key[4:]})", log=True)
    if points and points[0].get("mean_acc") is not None:
        files["acc"] = plot_sweep(points, "mean_acc", out / "sweep_acc.png",
                                  "mean zero-shot accuracy (bars: ± 1 standard error)")
    acc_keys = [k for k in points[0] if k.startswith("acc_") and not k.endswith("_stderr")] if points else []
    header = ["method", "ratio", "params removed"] + [k[4:] + " ppl" for k in ppl_keys] + \
        ([k[4:] for k in acc_keys] + ["mean acc"] if acc_keys else [])
    rows = []
    for p in points:
        row = [p["method"], f"{p['ratio']:.2f}", f"{100 * p['params_removed']:.1f}%"]
        row += [f"{p[k]:.3f}" for k in ppl_keys]
        if acc_keys:
            row += [_pct(p, k) for k in acc_keys + ["mean_acc"]]
        rows.append(row)
    title = f"Sweep: {summary.get('model') or 'model'}"
    blocks = [("h1", title),
              ("p", f"Methods {', '.join(summary['methods'])} at ratios {', '.join(map(str, summary['ratios']))}; "
                    f"perplexity protocols {', '.join(summary['protocols'])}"
                    + (f"; zero-shot tasks {', '.join(summary['tasks'])} (limit {summary['limit'] or 'none'})"
                       if summary.get("tasks") else "") + f". Took {summary['seconds']} s."),
              ("table", header, rows)]
    errors = [r for r in summary["runs"] if "error" in r]
    if errors:
        blocks.append(("table", ["method", "ratio", "not made because"],
                       [[r["method"], r["ratio"], r["error"]] for r in errors]))
    blocks += [("img", f.name, key) for key, f in files.items()]
    files.update(write_page(blocks, out, "sweep", title))
    return files
