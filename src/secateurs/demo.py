"""`secateurs demo`: what a new user wants to see after one command. The dense and the pruned model
side by side (parameters, bytes, perplexity, a few zero-shot tasks when local task files are
given, measured prefill and decode speed beside their ideals), the plots (kept structures per
layer, the importance heatmap of this very run, before/after bars), in Markdown and HTML.

The demo folder holds report.md / report.html / report.json and the PNGs; model/ is the pruned
model with eval.json, bench.json and importance_scores.safetensors beside it, so that
`secateurs report DEMO/model` rebuilds the same pages.
"""

from __future__ import annotations

import copy
import json
import time
from importlib import resources
from pathlib import Path

from secateurs.errors import SecateursError
from secateurs.names import STANDARD_TASKS
from secateurs.progress import phase

DEMO_TEXT = "tinystories_sample.txt"


def _text(args) -> tuple[str, dict]:
    from secateurs.evaluation.perplexity import load_text

    if args.ppl:
        return load_text(args.ppl, field=args.text_field, max_docs=args.max_docs)
    text = resources.files("secateurs").joinpath("data", DEMO_TEXT).read_text(encoding="utf-8")
    return text, {"name": f"bundled {DEMO_TEXT}", "read_as": "text", "chars": len(text)}


def _tasks(args) -> list[str] | None:
    """--tasks as given; with only --data-dir, the standard tasks found there."""
    from secateurs.evaluation.zero_shot import find_task_file, parse_tasks

    if args.tasks:
        return parse_tasks(args.tasks)
    if args.data_dir:
        if not Path(args.data_dir).is_dir():
            raise SecateursError(f"--data-dir {args.data_dir} is not a folder")
        found = [t for t in STANDARD_TASKS if find_task_file(t, args.data_dir)]
        if not found:
            raise SecateursError(f"--data-dir {args.data_dir} holds none of {', '.join(STANDARD_TASKS)} (NAME.jsonl); "
                                 "name the tasks with --tasks")
        return found
    return None


def _spec(args, text: str):
    from secateurs.evaluation.suite import EvalSpec
    from secateurs.evaluation.sweep import parse_list

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    return EvalSpec(text=text, protocols=parse_list(args.protocol, str, "protocols"), batch_size=args.batch_size,
                    max_windows=args.max_windows, max_tokens=args.max_tokens, max_batch_tokens=args.max_batch_tokens,
                    tasks=_tasks(args), data_dir=args.data_dir, limit=limit, num_fewshot=args.num_fewshot,
                    eval_batch_size=args.eval_batch_size)


def run_demo(args, prune_and_save, preflight, inputs) -> int:
    """Prune, save, reload, evaluate and measure both models, and write the report (see the module
    docstring). The CLI passes its prune-and-save step, preflight check and input list."""
    from secateurs.evaluation.report import _write_report, plot_before_after
    from secateurs.evaluation.speed import BenchConfig, bench_models, folder_bytes, machine_info
    from secateurs.evaluation.suite import evaluate
    from secateurs.io import load_pruned
    from secateurs.loading import load_model
    from secateurs.output import write_file, write_folder

    started = time.perf_counter()
    preflight(args)
    text, text_info = _text(args)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    spec = _spec(args, text)
    spec.check(model)
    bench_config = BenchConfig(batch_sizes=(1,), prompt_lengths=(args.bench_prompt_length,),
                               decode_tokens=args.bench_decode_tokens, repeats=args.bench_repeats, warmup=1)
    bench_config.validate()
    context = getattr(model.config, "max_position_embeddings", None)
    if context and args.bench_prompt_length + args.bench_decode_tokens > context:
        raise SecateursError(f"--bench-prompt-length + --bench-decode-tokens exceed the model's context of {context}")
    with phase("evaluating the dense model"):
        dense_eval = evaluate(model, tokenizer, spec)
    dense = copy.deepcopy(model)  # pruning works in place; the speed comparison needs both
    final = Path(args.out).expanduser().resolve()
    with write_folder(final, args.force, inputs(args), kind="demo") as tmp:
        args.out = str(tmp / "model")
        scores: dict = {}
        _, plan, before, after, cmp, seconds, saved = prune_and_save(args, model, tokenizer, scores_out=scores)
        del model
        with phase("reloading the saved model"):
            reloaded = load_pruned(saved, device=args.device)
        with phase("evaluating the pruned model"):
            pruned_eval = evaluate(reloaded, tokenizer, spec)
        with phase("measuring prefill and decode speed, dense vs pruned"):
            bench = bench_models({"dense": dense, "pruned": reloaded}, bench_config)
        bench["models"]["pruned"]["disk_bytes"] = folder_bytes(saved)
        with phase("sampling from the pruned model"):
            prompt = "Once upon a time"
            ids = tokenizer(prompt, return_tensors="pt").to(args.device)
            sample = tokenizer.decode(reloaded.generate(**ids, max_new_tokens=24, do_sample=False)[0],
                                      skip_special_tokens=True)
        ev = {"text": text_info, "protocols": spec.protocols, "baseline": "dense",
              "models": {"dense": {"source": args.model, **dense_eval}, "pruned": {"source": str(final / "model"),
                                                                               **pruned_eval}},
              "machine": machine_info(args.device)}
        if spec.tasks:
            z = dense_eval["zero_shot"]
            ev["zero_shot"] = {"lm_eval_version": z["lm_eval_version"], "limit": z["limit"],
                               "num_fewshot": z["num_fewshot"], "data_dir": args.data_dir}
        write_file(saved / "eval.json", json.dumps(ev, indent=2) + "\n")
        write_file(saved / "bench.json", json.dumps(bench, indent=2) + "\n")
        if "scores" in scores:
            scores["scores"].save(saved / "importance_scores.safetensors")
        speed = bench["results"]
        dense_row = next(r for r in speed if r["model"] == "dense")
        pruned_row = next(r for r in speed if r["model"] == "pruned")
        result = {
            "model": args.model, "method": args.method, "ratio": args.ratio, "gqa": args.gqa,
            "eval_text": text_info["name"], "prune_seconds": round(seconds, 4),
            "perplexity_dense": _quality(dense_eval), "perplexity_pruned": _quality(pruned_eval),
            **cmp, "measured_prefill_speedup": pruned_row["vs_baseline"]["prefill_speedup"],
            "measured_decode_speedup": pruned_row["vs_baseline"]["decode_speedup"],
            "pruned_sample": sample, "saved_model": str(final / "model"),
        }
        rows = _side_by_side(result, dense_eval, pruned_eval, dense_row, pruned_row, bench)
        bars = plot_before_after(_bar_rows(result, dense_eval, pruned_eval, dense_row, pruned_row),
                                 tmp / "before_after.png")
        title = f"secateurs demo: {args.model}, {args.method} at ratio {args.ratio}"
        intro = [("table", ["", "dense", "pruned", "pruned / dense"], rows),
                 ("p", _speed_note(result, bench)),
                 ("p", f"Pruned model, greedy: {sample!r}"),
                 ("p", f"Saved to `{result['saved_model']}` (loads with `secateurs.load_pruned`, and with stock "
                       "`AutoModelForCausalLM.from_pretrained` when its layers share one shape); "
                       f"`secateurs report {result['saved_model']}` rebuilds this page.")]
        result["demo_seconds"] = round(time.perf_counter() - started, 1)
        with phase("writing the report and its plots"):
            files = _write_report(plan, saved, tmp, None, None, None, title=title, intro=intro,
                                  extra_plots={"before_after": bars}, summary_extra=result)
    print((final / "report.md").read_text())
    print("plots: " + ", ".join(str(final / Path(p).name) for k, p in files.items() if str(p).endswith(".png")))
    print(f"report: {final / 'report.md'} and {final / 'report.html'}")
    return 0


def _quality(evaluation: dict) -> dict:
    """The perplexity result without the timing of its single pass: one unwarmed pass says nothing
    about speed (the dense pass ran first, cold), and speed is measured separately (bench)."""
    return {k: v for k, v in evaluation["perplexity"][0].items() if k not in ("seconds", "tokens_per_second")}


def _ppl(r: dict) -> float:
    return r["perplexity"][0]["perplexity"]


def _side_by_side(r, dense_eval, pruned_eval, dense_row, pruned_row, bench) -> list[list]:
    p0 = dense_eval["perplexity"][0]
    rows = [["parameters", f"{r['params_before']:,}", f"{r['params_after']:,}",
             f"{r['params_after'] / r['params_before']:.3f}"],
            ["weights (MiB, in memory)", f"{r['weight_bytes_before'] / 2**20:,.1f}",
             f"{r['weight_bytes_after'] / 2**20:,.1f}", f"{r['weight_bytes_after'] / r['weight_bytes_before']:.3f}"],
            [f"perplexity ({r['eval_text']}, {p0['protocol']}, {p0['windows']} windows)", f"{_ppl(dense_eval):.3f}",
             f"{_ppl(pruned_eval):.3f}", f"{_ppl(pruned_eval) / _ppl(dense_eval):.3f}"]]
    zd, zp = dense_eval.get("zero_shot"), pruned_eval.get("zero_shot")
    if zd and zp:
        for task, d in zd["tasks"].items():
            p = zp["tasks"][task]
            rows.append([f"{task} acc % (n={d['samples']}, ± stderr)", _pct(d), _pct(p), ""])
    cfg = bench["config"]
    prompt = cfg["prompt_lengths"][0]
    for key, what in (("prefill_tokens_per_s", f"prefill tok/s (batch 1, {prompt} tokens)"),
                      ("decode_tokens_per_s", f"decode tok/s (batch 1, {cfg['decode_tokens']} steps)")):
        ideal = pruned_row["vs_baseline"]["ideal_prefill_speedup" if key.startswith("prefill")
                                          else "ideal_decode_speedup_bytes"]
        rows.append([f"{what}, measured (ideal)", f"{dense_row[key]['median']:,.1f}",
                     f"{pruned_row[key]['median']:,.1f}",
                     f"x{pruned_row[key]['median'] / dense_row[key]['median']:.2f} (x{ideal:.2f})"])
    return rows


def _pct(r: dict) -> str:
    if r.get("acc") is None:
        return "n/a"
    se = r.get("acc_stderr")
    return f"{100 * r['acc']:.1f} ± {100 * se:.1f}" if se is not None else f"{100 * r['acc']:.1f}"


def _bar_rows(r, dense_eval, pruned_eval, dense_row, pruned_row) -> list[tuple]:
    v = pruned_row["vs_baseline"]
    rows = [("parameters", r["params_before"], r["params_after"], None),
            ("weight bytes", r["weight_bytes_before"], r["weight_bytes_after"], None),
            ("perplexity", _ppl(dense_eval), _ppl(pruned_eval), None),
            ("prefill tok/s", dense_row["prefill_tokens_per_s"]["median"], pruned_row["prefill_tokens_per_s"]["median"],
             v["ideal_prefill_speedup"]),
            ("decode tok/s", dense_row["decode_tokens_per_s"]["median"], pruned_row["decode_tokens_per_s"]["median"],
             v["ideal_decode_speedup_bytes"])]
    zd, zp = dense_eval.get("zero_shot"), pruned_eval.get("zero_shot")
    if zd and zp and zd.get("mean_acc") and zp.get("mean_acc") is not None:
        rows.append(("mean zero-shot acc", zd["mean_acc"], zp["mean_acc"], None))
    return rows


def _speed_note(r: dict, bench: dict) -> str:
    m = bench["machine"]
    return (f"Speed measured on {bench['device']} ({m.get('cpu')}, {m.get('torch_threads')} threads, load average "
            f"{m.get('load_average')}), dense and pruned interleaved, median of {bench['config']['repeats']} repeats "
            "after a warm-up; ideal = the ratio of FLOPs (prefill) or weight bytes read per step (decode). On a "
            f"shared or small machine measured speedups fall short of the ideal. Removed "
            f"{100 * r['params_removed_fraction']:.1f}% of parameters; calibration, scoring and surgery took "
            f"{r['prune_seconds']:.1f} s.")
