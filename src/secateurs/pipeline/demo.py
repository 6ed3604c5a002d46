"""`secateurs demo`: what a new user wants to see after one command. The dense, the pruned and the
briefly recovered model side by side (parameters, bytes, perplexity, a few zero-shot tasks when
local task files are given, measured prefill and decode speed beside their ideals), the plots
(kept structures per layer, the importance heatmap of this very run, before/after bars, the
recovery curve), in Markdown and HTML.

The demo folder holds report.md / report.html / report.json and the PNGs; model/ is the pruned
model with eval.json, bench.json and importance_scores.safetensors beside it, so that
`secateurs report DEMO/model` rebuilds the same pages; recovered/ is the recovered model (same
shapes, with recovery.json).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from importlib import resources
from pathlib import Path

from secateurs.calibration.data import DEFAULT_LENGTH, DEFAULT_SAMPLES
from secateurs.errors import SecateursError
from secateurs.evaluation.perplexity import load_text
from secateurs.evaluation.report import (
    UNRELIABLE,
    plot_before_after,
    plot_recovery_curve,
    require_matplotlib,
    write_report,
)
from secateurs.evaluation.speed import (
    MIN_PAIRS,
    BenchConfig,
    bench_models,
    folder_bytes,
    machine_info,
    ratio_of,
    ratio_text,
)
from secateurs.evaluation.suite import EvalSpec, evaluate
from secateurs.evaluation.zero_shot import find_task_file
from secateurs.files.output import write_file, write_folder
from secateurs.pipeline.jobs import PruneJob, preflight, prune_and_save
from secateurs.pipeline.stages import RunState, Stage
from secateurs.recovery.api import recover
from secateurs.recovery.data import EvaluationText
from secateurs.recovery.settings import BriefRecovery, RecoverySettings
from secateurs.runtime import threads
from secateurs.runtime.progress import phase
from secateurs.settings.names import STANDARD_TASKS
from secateurs.storage.pruned import load_pruned

DEMO_TEXT = "tinystories_sample.txt"


@dataclasses.dataclass(frozen=True)
class Demo(Stage):
    """The whole demo as one stage (see the module docstring): `job` is the pruning asked for (its
    `out` is the demo folder), `spec` the evaluation (its text read from `text`, default the bundled
    sample), `bench` the speed measurement, `recovery` the brief recovery."""

    job: PruneJob
    spec: EvalSpec
    bench: BenchConfig
    recovery: BriefRecovery = BriefRecovery()
    text: str | None = None
    text_field: str = "text"
    max_docs: int | None = None

    @property
    def recover_tokens(self) -> int:
        return self.recovery.tokens

    def check(self, run: RunState) -> tuple[str, dict]:
        preflight(self.job, kind="demo")
        require_matplotlib()  # the report's plots need matplotlib: say so now, not after minutes of work
        self.bench.validate()
        if self.text:
            return load_text(self.text, field=self.text_field, max_docs=self.max_docs)
        text = resources.files("secateurs").joinpath("data", DEMO_TEXT).read_text(encoding="utf-8")
        return text, {"name": f"bundled {DEMO_TEXT}", "read_as": "text", "chars": len(text)}

    def execute(self, run: RunState, prepared: tuple[str, dict]) -> dict:
        return run_demo(self, run, *prepared)


def demo_tasks(tasks: list[str] | None, data_dir: str | None) -> list[str] | None:
    """The demo's tasks: as given; with only a task folder, the standard tasks found there."""
    if tasks or not data_dir:
        return tasks
    if not Path(data_dir).is_dir():
        raise SecateursError(f"--data-dir {data_dir} is not a folder")
    found = [t for t in STANDARD_TASKS if find_task_file(t, data_dir)]
    if not found:
        raise SecateursError(f"--data-dir {data_dir} holds none of {', '.join(STANDARD_TASKS)} (NAME.jsonl); "
                             "name the tasks with --tasks")
    return found


@dataclasses.dataclass
class _Measured:
    """What the demo measured after pruning, beside the dense model's evaluation: what the eval
    files, the summary and the report pages are written from."""

    dense_eval: dict
    pruned_eval: dict
    bench: dict
    sample: str
    recovery: dict | None

    def speed_row(self, model: str) -> dict:
        return next(r for r in self.bench["results"] if r["model"] == model)

    def speed_ratio(self, metric: str) -> dict:
        """The pruned / dense ratio of 'prefill' or 'decode' from the paired rounds: {"speedup" (None
        when not measured reliably), "reliable", "spread", "reason"}."""
        return ratio_of(self.bench, self.speed_row("pruned"), metric)

    @property
    def recovered_eval(self) -> dict | None:
        return self.recovery["eval"] if self.recovery else None


def run_demo(demo: Demo, run: RunState, text: str, text_info: dict) -> dict:
    """Prune, save, reload, evaluate and measure both models, and write the report (see the module
    docstring); the in-memory prune-and-save step runs inside the demo's own output folder. Returns
    {"folder": the demo folder, "files": the report's files}."""
    started, job = time.perf_counter(), demo.job
    model, tokenizer = run.load(job.source)
    spec = dataclasses.replace(demo.spec, text=text)
    spec.check(model)
    _check_bench_context(demo.bench, model)
    with phase("evaluating the dense model"):
        dense_eval = evaluate(model, tokenizer, spec)
    dense = copy.deepcopy(model)  # pruning works in place; the speed comparison needs both
    final = Path(job.out).expanduser().resolve()
    with write_folder(final, job.force, job.inputs, kind="demo") as tmp:
        scores: dict = {}
        pruning = prune_and_save(dataclasses.replace(job, out=str(tmp / "model")), model, tokenizer, scores_out=scores)
        plan, cmp, seconds, saved = pruning.plan, pruning.comparison, pruning.seconds, pruning.out
        run.holding(None, None, final / "model", final / "model")
        del model
        measured = _measure_pruned(demo, saved, dense, dense_eval, tokenizer, spec, plan, tmp)
        _write_model_files(demo, measured, saved, final, text_info, spec, scores)
        result = _summary(demo, measured, text_info, cmp, seconds, final)
        title, intro, plots = _report_parts(demo, measured, result, tmp)
        result["demo_seconds"] = round(time.perf_counter() - started, 1)
        with phase("writing the report and its plots"):
            files = write_report(plan, saved, tmp, None, None, None, title=title, intro=intro,
                                 extra_plots=plots, summary_extra=result)
    return {"folder": final, "files": {kind: final / Path(p).name for kind, p in files.items()}}


def _check_bench_context(config: BenchConfig, model) -> None:
    """The speed measurement's prompt and decode steps, refused now, before any work, when they do
    not fit the model's context."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context and config.prompt_lengths[0] + config.decode_tokens > context:
        raise SecateursError(f"--bench-prompt-length + --bench-decode-tokens exceed the model's context of {context}")


def _measure_pruned(demo: Demo, saved: Path, dense, dense_eval: dict, tokenizer, spec, plan, tmp: Path) -> _Measured:
    """Reload the saved pruned model (what a user gets), evaluate it, measure its speed against the
    dense model, sample from it and, when asked, recover it into tmp/recovered."""
    device = demo.job.device
    with phase("reloading the saved model"):
        reloaded = load_pruned(saved, device=device)
    with phase("evaluating the pruned model"):
        pruned_eval = evaluate(reloaded, tokenizer, spec)
    with phase("measuring prefill and decode speed, dense vs pruned"):
        bench = bench_models({"dense": dense, "pruned": reloaded}, demo.bench)
    bench["models"]["pruned"]["disk_bytes"] = folder_bytes(saved)
    with phase("sampling from the pruned model"):
        sample = _greedy(reloaded, tokenizer, device)
    recovery = _recover(demo, reloaded, dense, tokenizer, plan, spec, tmp / "recovered") \
        if demo.recover_tokens else None
    return _Measured(dense_eval, pruned_eval, bench, sample, recovery)


def _write_model_files(demo: Demo, m: _Measured, saved: Path, final: Path, text_info: dict, spec, scores: dict) -> None:
    """eval.json, bench.json and the importance scores beside the pruned model, so that
    `secateurs report DEMO/model` rebuilds its page."""
    ev = {"text": text_info, "protocols": spec.protocols, "baseline": "dense",
          "models": {"dense": {"source": demo.job.source, **m.dense_eval}, "pruned": {"source": str(final / "model"),
                                                                             **m.pruned_eval}},
          "machine": machine_info(demo.job.device)}
    if spec.tasks:
        z = m.dense_eval["zero_shot"]
        ev["zero_shot"] = {"lm_eval_version": z["lm_eval_version"], "limit": z["limit"],
                           "num_fewshot": z["num_fewshot"], "data_dir": spec.data_dir}
    write_file(saved / "eval.json", json.dumps(ev, indent=2) + "\n")
    write_file(saved / "bench.json", json.dumps(m.bench, indent=2) + "\n")
    if "scores" in scores:
        scores["scores"].save(saved / "importance_scores.safetensors")


def _summary(demo: Demo, m: _Measured, text_info: dict, cmp: dict, seconds: float, final: Path) -> dict:
    """The run's summary (report.json and the report's summary table): settings, sizes, quality,
    measured speedups, samples and where the models were saved."""
    ratios = {metric: m.speed_ratio(metric) for metric in ("prefill", "decode")}
    result = {
        "model": demo.job.source, "method": demo.job.method, "ratio": demo.job.ratio,
        "gqa": demo.job.options.get("gqa", "groups"),
        "eval_text": text_info["name"], "prune_seconds": round(seconds, 4),
        "perplexity_dense": _quality(m.dense_eval), "perplexity_pruned": _quality(m.pruned_eval),
        **cmp, "measured_prefill_speedup": ratios["prefill"]["speedup"],  # None: not measured reliably
        "measured_decode_speedup": ratios["decode"]["speedup"],
        "measured_speed": {metric: {k: e[k] for k in ("speedup", "reliable", "spread", "reason")}
                           for metric, e in ratios.items()},
        "pruned_sample": m.sample, "saved_model": str(final / "model"),
    }
    if m.recovery:
        result.update(perplexity_recovered=_quality(m.recovered_eval), recovered_sample=m.recovery["sample"],
                      saved_recovered=str(final / "recovered"), recovery=_recovery_summary(m.recovery["record"]))
    return result


def _report_parts(demo: Demo, m: _Measured, result: dict, tmp: Path) -> tuple[str, list, dict]:
    """(title, intro blocks, demo plots) of the report: the side-by-side table, the speed note, the
    samples and where the models were saved; the before/after bars and the recovery curve."""
    recovery, sample, bench = m.recovery, m.sample, m.bench
    dense_row, pruned_row = m.speed_row("dense"), m.speed_row("pruned")
    ratios = {metric: m.speed_ratio(metric) for metric in ("prefill", "decode")}
    rows = _side_by_side(result, m.dense_eval, m.pruned_eval, dense_row, pruned_row, bench, m.recovered_eval,
                         ratios)
    plots = {"before_after": plot_before_after(
        _bar_rows(result, m.dense_eval, m.pruned_eval, pruned_row, m.recovered_eval, ratios),
        tmp / "before_after.png")}
    title = f"secateurs demo: {demo.job.source}, {demo.job.method} at ratio {demo.job.ratio}"
    header = ["", "dense", "pruned", "pruned / dense"] + (["recovered", "recovered / dense"] if recovery else [])
    intro = [("table", header, rows), ("p", _speed_note(result, bench)),
             ("p", f"Pruned model, greedy: {sample!r}")]
    if recovery:
        plots["recovery_curve"] = plot_recovery_curve(recovery["record"], tmp / "recovery_curve.png")
        intro += [("p", f"Recovered model, greedy: {recovery['sample']!r}"),
                  ("p", _recovery_note(recovery["record"]))]
    saved_as = f"`{result['saved_model']}`" + (f" and `{result['saved_recovered']}`" if recovery else "")
    intro.append(("p", f"Saved to {saved_as}"
                  + " (load with `secateurs.load_pruned`, and with stock `AutoModelForCausalLM.from_pretrained` "
                    f"when the layers share one shape); `secateurs report {result['saved_model']}` rebuilds "
                    "the pruned model's page."))
    return title, intro, plots


def _recover(demo: Demo, pruned, dense, tokenizer, plan, spec, out: Path) -> dict:
    """Distil the dense model into the pruned one (in place) on the calibration text, save it to
    `out`, evaluate it and sample from it."""
    job, tokens = demo.job, demo.recover_tokens
    settings = _recovery_settings(demo)
    evaluated = [EvaluationText(demo.text, spec.evaluated_tokens(pruned))] if demo.text else None
    with phase(f"recovering: distilling the dense model into the pruned one, {tokens:,} tokens"):
        result = recover(pruned, dense, settings=settings, tokenizer=tokenizer, plan=plan, out=out,
                         evaluation_files=evaluated)
    with phase("evaluating the recovered model"):
        evaluation = evaluate(result.model, tokenizer, spec)
    with phase("sampling from the recovered model"):
        sample = _greedy(result.model, tokenizer, job.device)
    return {"record": result.record, "eval": evaluation, "sample": sample}


def _recovery_settings(demo: Demo) -> RecoverySettings:
    """The brief recovery: several passes over the calibration text (for 'self', the samples pruning
    drew), a few held-out sequences, one validation."""
    job = demo.job
    source = job.calibration or "self"
    length = job.calibration_options.get("max_length") or DEFAULT_LENGTH
    samples = job.calibration_options.get("num_samples") or DEFAULT_SAMPLES
    brief = demo.recovery
    held_out = max(1, min(brief.val_sequences, samples // 8))  # the rest of the samples train
    steps = -(-brief.tokens // (brief.batch_size * length))
    return RecoverySettings(data=source, tokens=brief.tokens, seq_len=length, batch_size=brief.batch_size,
                            val_tokens=held_out * length, eval_every=max(1, steps // brief.validations),
                            lr=brief.lr, seed=job.seed, self_samples=samples if source == "self" else None)


def _greedy(model, tokenizer, device, prompt: str = "Once upon a time") -> str:
    ids = tokenizer(prompt, return_tensors="pt").to(device)
    with threads.working("decode"):
        tokens = model.generate(**ids, max_new_tokens=24, do_sample=False)[0]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _recovery_summary(record: dict) -> dict:
    keys = ("objective", "parametrisation", "data", "tokens", "steps", "optimizer", "before", "after",
            "training_tokens_per_second", "wall_seconds")
    return {k: record.get(k) for k in keys}


def _recovery_note(record: dict) -> str:
    data, tokens = record["data"], record["tokens"]
    return (f"Recovery: every weight trained to match the dense model's next-token distribution (forward KL) on "
            f"{tokens['trained']:,} tokens, {tokens['epochs']:.1f} passes over {data['train_sequences']} sequences of "
            f"the calibration text ({data.get('kind', data['source'])}), lr {record['optimizer']['lr']:g}, in "
            f"{record['training_seconds']:.0f} s ({record['training_tokens_per_second']} tok/s). A taste only: "
            "`secateurs recover` with 200,000 tokens or more of real text recovers far more "
            "(benchmarks/results/recovery.md).")


def _quality(evaluation: dict) -> dict:
    """The perplexity result without the timing of its single pass: one unwarmed pass says nothing
    about speed (the dense pass ran first, cold), and speed is measured separately (bench)."""
    return {k: v for k, v in evaluation["perplexity"][0].items() if k not in ("seconds", "tokens_per_second")}


def _ppl(r: dict) -> float:
    return r["perplexity"][0]["perplexity"]


def _side_by_side(r, dense_eval, pruned_eval, dense_row, pruned_row, bench, recovered_eval=None,
                  ratios: dict | None = None) -> list[list]:
    """Rows of (what, dense, pruned, pruned / dense[, recovered, recovered / dense]); the speed
    ratios are those of the paired rounds (`ratios`: metric -> speed.ratio_of entry), or "not
    measured reliably (why)" where those stayed too spread."""
    ratios = ratios or {metric: ratio_of(bench, pruned_row, metric) for metric in ("prefill", "decode")}
    p0 = dense_eval["perplexity"][0]
    same = ["(same shapes as pruned)", ""] if recovered_eval else []
    rows = [["parameters", f"{r['params_before']:,}", f"{r['params_after']:,}",
             f"{r['params_after'] / r['params_before']:.3f}", *same],
            ["weights (MiB, in memory)", f"{r['weight_bytes_before'] / 2**20:,.1f}",
             f"{r['weight_bytes_after'] / 2**20:,.1f}", f"{r['weight_bytes_after'] / r['weight_bytes_before']:.3f}",
             *same]]
    ppl = [f"perplexity ({r['eval_text']}, {p0['protocol']}, {p0['windows']} windows)", f"{_ppl(dense_eval):.3f}",
           f"{_ppl(pruned_eval):.3f}", f"{_ppl(pruned_eval) / _ppl(dense_eval):.3f}"]
    if recovered_eval:
        ppl += [f"{_ppl(recovered_eval):.3f}", f"{_ppl(recovered_eval) / _ppl(dense_eval):.3f}"]
    rows.append(ppl)
    zd, zp = dense_eval.get("zero_shot"), pruned_eval.get("zero_shot")
    zr = recovered_eval.get("zero_shot") if recovered_eval else None
    if zd and zp:
        for task, d in zd["tasks"].items():
            rows.append([f"{task} acc % (n={d['samples']}, ± stderr)", _pct(d), _pct(zp["tasks"][task]), "",
                         *([_pct(zr["tasks"][task]), ""] if zr else [])])
    cfg = bench["config"]
    prompt = cfg["prompt_lengths"][0]
    for key, what in (("prefill_tokens_per_s", f"prefill tok/s (batch 1, {prompt} tokens)"),
                      ("decode_tokens_per_s", f"decode tok/s (batch 1, {cfg['decode_tokens']} steps)")):
        metric = "prefill" if key.startswith("prefill") else "decode"
        ideal = pruned_row["vs_baseline"]["ideal_prefill_speedup" if metric == "prefill"
                                          else "ideal_decode_speedup_bytes"]
        rows.append([f"{what}, measured (ideal)", f"{dense_row[key]['median']:,.1f}",
                     f"{pruned_row[key]['median']:,.1f}", ratio_text(ratios[metric], ideal, prefix="x"), *same])
    return rows


def _pct(r: dict) -> str:
    if r.get("acc") is None:
        return "n/a"
    se = r.get("acc_stderr")
    return f"{100 * r['acc']:.1f} ± {100 * se:.1f}" if se is not None else f"{100 * r['acc']:.1f}"


def _bar_rows(r, dense_eval, pruned_eval, pruned_row, recovered_eval, ratios: dict
              ) -> list[tuple]:
    """(metric, dense, pruned, ideal pruned/dense, recovered): recovered only where it differs from
    pruned. Speed is the paired rounds' ratio (dense = 1), or report.UNRELIABLE where it was not
    measured reliably: the plot marks it instead of drawing a bar."""
    v = pruned_row["vs_baseline"]
    speed = {metric: (e["speedup"] if e["speedup"] is not None else UNRELIABLE) for metric, e in ratios.items()}
    rows = [("parameters", r["params_before"], r["params_after"], None, None),
            ("weight bytes", r["weight_bytes_before"], r["weight_bytes_after"], None, None),
            ("perplexity", _ppl(dense_eval), _ppl(pruned_eval), None, _ppl(recovered_eval) if recovered_eval else None),
            ("prefill tok/s", 1.0, speed.get("prefill", UNRELIABLE), v["ideal_prefill_speedup"], None),
            ("decode tok/s", 1.0, speed.get("decode", UNRELIABLE), v["ideal_decode_speedup_bytes"], None)]
    zd, zp = dense_eval.get("zero_shot"), pruned_eval.get("zero_shot")
    zr = recovered_eval.get("zero_shot") if recovered_eval else None
    if zd and zp and zd.get("mean_acc") and zp.get("mean_acc") is not None:
        rows.append(("mean zero-shot acc", zd["mean_acc"], zp["mean_acc"], None, zr.get("mean_acc") if zr else None))
    return rows


def _speed_note(r: dict, bench: dict) -> str:
    m, cfg = bench["machine"], bench["config"]
    rounds = sorted({row["vs_baseline"].get("rounds") for row in bench["results"]} - {None})
    unreliable = [metric for metric, e in (r.get("measured_speed") or {}).items() if not e["reliable"]]
    warning = ""
    if unreliable:
        reason = r["measured_speed"][unreliable[0]]["reason"]
        warning = (f" The {' and '.join(unreliable)} ratio{'s' if len(unreliable) > 1 else ''} could not be measured "
                   f"reliably ({reason}): the per-round ratios did not agree within {100 * cfg['max_spread']:.0f}% "
                   f"in {cfg['time_limit']:g} s, so no number is given; measure "
                   "again on an idle machine with `secateurs bench MODEL --baseline DENSE`.")
    done = f"{', '.join(map(str, rounds))} rounds: " if rounds else ""
    return (f"Speed measured on {bench['device']} ({m.get('cpu')}, {m.get('torch_threads')} threads, load average "
            f"{m.get('load_average')}) in alternating dense / pruned rounds after a warm-up ({done}at least "
            f"{max(cfg['repeats'], MIN_PAIRS)}, then until the per-round pruned / dense ratios' spread, interquartile "
            f"range / median, was at most {100 * cfg['max_spread']:.0f}% or {cfg['time_limit']:g} s passed); the "
            "ratio is their median, ± that spread, tok/s the medians over the rounds. Ideal = the ratio of FLOPs "
            "(prefill) or weight bytes read per step (decode). On a shared or small machine measured speedups fall "
            f"short of the ideal.{warning} Removed {100 * r['params_removed_fraction']:.1f}% of parameters; "
            f"calibration, scoring and surgery took {r['prune_seconds']:.1f} s.")
