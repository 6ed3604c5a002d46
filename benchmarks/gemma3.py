"""Gemma-3-270M (the base model, `gemma3-270m`) dense and pruned six ways, beside SmolLM2-135M's numbers at
the same settings where benchmarks/results/ already holds them.

Rows: dense; AMP 20% of the prunable (attention + MLP) parameters; AMP 20% of all parameters (Gemma-3-270M's
262k-token embedding is ~63% of the model, so this removes ~54% of the prunable ones); Wanda-SP and FLAP at 20%
of the prunable parameters; Consensus removing 3 layers; HARP on the top 4 layers. Every pruned row is
calibrated on the same --calib-samples C4 records of --calib-length tokens (AMP's defaults: uniform widths,
searched attention share, sequential re-fit). Per row:

* parameters, all and prunable (secateurs.planning.accounting);
* WikiText-2 test perplexity, windows of 128 tokens, the first --max-tokens tokens (Gemma's windows start with
  BOS: secateurs.evaluation.perplexity);
* zero-shot accuracy on the five local tasks (lm-eval, llm-foundry files), --limit items per task;
* dense and AMP rows: the f32 GGUF export (secateurs.export) served by llama.cpp: perplexity on the same windows
  (same token ids, BOS first) and decode tokens/s (128 greedy steps after a 512-token prompt, median of
  --repeats, --threads threads);
* with --recover-tokens N: pruned rows are first trained N tokens with KD from the dense model on the C4 sample
  (secateurs.recovery.recover; off by default).

Each row is written to {--out}/gemma3_rows/ROW.json as soon as it is done, and skipped when that file holds
the same settings; the summary {--out}/gemma3{--tag}.{json,md} is rebuilt from the rows on disk (--render
rebuilds it alone). Example (a slice of the full protocol):

    OMP_NUM_THREADS=1 python benchmarks/gemma3.py --max-tokens 8192 --limit 50
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from common import ASSETS, ROOT, header_markdown, result_header
from serve_llamacpp import DECODE, PROMPT, engine, speed, windows_perplexity

from secateurs.calibration.data import load_calibration
from secateurs.calibration.statistics import collect_statistics
from secateurs.evaluation.perplexity import perplexity, read_text, window_start_token, windows_of
from secateurs.evaluation.zero_shot import STANDARD_TASKS, zero_shot
from secateurs.export import export_gguf
from secateurs.files.output import write_file
from secateurs.methods import prune
from secateurs.planning.accounting import model_stats
from secateurs.recovery.api import recover
from secateurs.storage.loading import load_model

MODEL = "gemma3-270m"
WIKI = ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw"
C4 = ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"
TASKS = ASSETS / "commonsense" / "llm-foundry"
RESULTS = ROOT / "benchmarks" / "results"
SEQ_LEN = 128
# row -> (label, secateurs.prune keywords or None for the dense model, whether its GGUF is served)
ROWS = {
    "dense": ("dense", None, True),
    "amp-20-prunable": ("AMP 20% of prunable", {"method": "amp", "ratio": 0.2, "ratio_of": "prunable"}, True),
    "amp-20-all": ("AMP 20% of all", {"method": "amp", "ratio": 0.2, "ratio_of": "all"}, True),
    "amp-25-prunable": ("AMP 25% of prunable", {"method": "amp", "ratio": 0.25, "ratio_of": "prunable"}, True),
    "wanda-sp-20-prunable": ("Wanda-SP 20% of prunable",
                             {"method": "wanda-sp", "ratio": 0.2, "ratio_of": "prunable"}, False),
    "consensus-3": ("Consensus, 3 layers removed", {"method": "consensus", "ratio": None, "layers": 3}, False),
    "harp-4": ("HARP, top 4 layers", {"method": "harp", "ratio": None, "top_layers": 4}, False),
    "flap-20-prunable": ("FLAP 20% of prunable", {"method": "flap", "ratio": 0.2, "ratio_of": "prunable"}, False),
}
WIDTH = ("amp", "wanda-sp", "flap")  # methods that read the shared statistics pass


def prunable_params(model) -> int:
    return sum(layer.attention_params + layer.mlp_params for layer in model_stats(model).layers)


def row_settings(name: str, args) -> dict:
    """Everything a row's numbers depend on; a saved row is reused only when these match."""
    _, spec, served = ROWS[name]
    return {"model": MODEL, "row": name, "prune": spec, "seq_len": SEQ_LEN, "max_tokens": args.max_tokens,
            "tasks": args.tasks, "limit": args.limit, "calib": Path(args.calib).name,
            "calib_samples": args.harp_calib_samples if spec and spec["method"] == "harp" else args.calib_samples,
            "calib_length": args.calib_length,
            "recover_tokens": args.recover_tokens if spec else 0,
            **({"kd_ratio": args.kd_ratio} if spec and args.recover_tokens else {}),
            "llamacpp": {"threads": args.threads, "repeats": args.repeats, "prompt": PROMPT, "decode": DECODE}
            if served else None}


class Context:
    """The dense model, its tokenizer, the evaluation windows and the calibration data, made once, on first use."""

    def __init__(self, args):
        self.args = args
        self.dense, self.tok = load_model(MODEL, dtype="float32")
        self.ids = self.tok(read_text(args.eval_text), return_tensors="pt", verbose=False).input_ids[0]
        self._calibration = self._harp_calibration = self._statistics = None

    @property
    def calibration(self):
        if self._calibration is None:
            self._calibration = load_calibration(self.args.calib, self.tok, num_samples=self.args.calib_samples,
                                                 max_length=self.args.calib_length, seed=0, batch_size=8)
        return self._calibration

    @property
    def harp_calibration(self):
        """HARP's alpha search scores 11 alphas per layer through the 262k-token LM head: the first
        --harp-calib-samples samples (harp_quality.py uses 8 too)."""
        if self._harp_calibration is None:
            self._harp_calibration = load_calibration(self.args.calib, self.tok,
                                                      num_samples=self.args.harp_calib_samples,
                                                      max_length=self.args.calib_length, seed=0, batch_size=8)
        return self._harp_calibration

    @property
    def statistics(self):
        if self._statistics is None:
            self._statistics = collect_statistics(self.dense, self.calibration, progress=False)
        return self._statistics


def llamacpp_perplexity(path: Path, windows: torch.Tensor, threads: int) -> float:
    """llama.cpp's perplexity on exactly the windows transformers scored (BOS first where the family needs it)."""
    return windows_perplexity(path, windows.tolist(), threads)


def serve(model, ctx: Context, name: str, args) -> dict:
    """Export to f32 GGUF, then llama.cpp's perplexity on the evaluation windows and its decode speed."""
    path = Path(args.work) / f"{name}.f32.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    export_gguf(model, path, "f32", tokenizer=ctx.tok, force=True)
    export_seconds = time.perf_counter() - start
    windows = windows_of(ctx.ids[:args.max_tokens], SEQ_LEN, window_start_token(model, ctx.tok), None)
    start = time.perf_counter()
    ppl = llamacpp_perplexity(path, windows, args.threads)
    ppl_seconds = time.perf_counter() - start
    llm = engine(path, args.threads, PROMPT + DECODE + 8)
    prompt = windows.flatten()[:PROMPT].tolist()
    speed(llm, prompt[:64])  # warm-up
    runs = [speed(llm, prompt) for _ in range(args.repeats)]
    del llm
    decode = [r[1] for r in runs]
    result = {"file": path.name, "bytes": path.stat().st_size, "perplexity": ppl,
              "prefill_tokens_per_s": statistics.median(r[0] for r in runs),
              "decode_tokens_per_s": statistics.median(decode),
              "decode_spread": (max(decode) - min(decode)) / statistics.median(decode),
              "seconds": {"export": round(export_seconds, 1), "perplexity": round(ppl_seconds, 1)}}
    if not args.keep_gguf:
        path.unlink()
    return result


def run_row(name: str, ctx: Context, args) -> dict:
    label, spec, served = ROWS[name]
    seconds, started = {}, time.perf_counter()
    model, plan = ctx.dense, None
    if spec is not None:
        calibration = ctx.harp_calibration if spec["method"] == "harp" else ctx.calibration
        keywords = {**spec, "calibration": calibration, "progress": False}
        if spec["method"] in WIDTH:
            keywords["statistics"] = ctx.statistics
        model, plan = prune(copy.deepcopy(ctx.dense), ctx.tok, **keywords)
        seconds["prune"] = round(time.perf_counter() - started, 1)
    recovery = None
    if spec is not None and args.recover_tokens:
        start = time.perf_counter()
        checkpoints = Path(args.work) / f"recovery-{name}{args.tag}"
        resume = (checkpoints / "trainer_state.pt").exists()
        out = recover(model, ctx.dense, tokenizer=ctx.tok, plan=plan, data=str(C4), tokens=args.recover_tokens,
                      objective="kd", kd_ratio=args.kd_ratio, progress=False, checkpoint_dir=str(checkpoints),
                      save_every=args.save_every, resume=resume)
        model = out.model
        recovery = {"tokens": out.record["tokens"], "before": out.record["before"], "after": out.record["after"],
                    "training_tokens_per_second": out.record["training_tokens_per_second"]}
        seconds["recover"] = round(time.perf_counter() - start, 1)
    stats = model_stats(model)
    row = {"row": name, "label": label, "params": stats.total_params, "prunable_params": prunable_params(model),
           "layers": model.config.num_hidden_layers, "shapes": sorted(set(plan.pruned_shapes())) if plan else None,
           "removed": (plan.provenance.get("layers_removed") if plan else None), "recovery": recovery}
    start = time.perf_counter()
    ppl = perplexity(model, ctx.tok, "", seq_len=SEQ_LEN, batch_size=8, progress=False, ids=ctx.ids,
                     max_tokens=args.max_tokens)
    row["ppl"] = {k: ppl[k] for k in ("perplexity", "windows", "tokens", "window_start_token") if k in ppl}
    seconds["perplexity"] = round(time.perf_counter() - start, 1)
    print(f"{name}: params {row['params']:,} (prunable {row['prunable_params']:,}), ppl {ppl['perplexity']:.3f}",
          flush=True)
    if args.tasks:
        start = time.perf_counter()
        z = zero_shot(model, ctx.tok, args.tasks, data_dir=args.data_dir, limit=args.limit, batch_size=8)
        row["zero_shot"] = {"mean_acc": z.get("mean_acc"), "lm_eval": z["lm_eval_version"],
                            "tasks": {t: {"acc": v["acc"], "acc_norm": v["acc_norm"], "samples": v["samples"]}
                                      for t, v in z["tasks"].items()}}
        seconds["zero_shot"] = round(time.perf_counter() - start, 1)
        print(f"{name}: zero-shot mean acc {z.get('mean_acc'):.4f}", flush=True)
    if served and not args.no_llamacpp:
        start = time.perf_counter()
        row["llamacpp"] = serve(model, ctx, name, args)
        seconds["llamacpp"] = round(time.perf_counter() - start, 1)
        print(f"{name}: llama.cpp ppl {row['llamacpp']['perplexity']:.3f}, decode "
              f"{row['llamacpp']['decode_tokens_per_s']:.1f} tok/s", flush=True)
    seconds["total"] = round(time.perf_counter() - started, 1)
    row["seconds"] = seconds
    return row


# SmolLM2-135M rows of benchmarks/results/amp_quality_width_smollm2_20.json beside ours
SMOLLM2 = {
    "dense": "dense", "amp-20-all": "amp+split+reconstruct", "wanda-sp-20-prunable": "wanda-sp",
    "flap-20-prunable": "flap",
}


def smollm2_rows() -> list[dict]:
    """SmolLM2-135M beside each row, from the result files that measured it (None where none did)."""
    out = []
    width = _load("amp_quality_width_smollm2_20.json")
    quality = _load("eval_smollm2_quality.json")
    depth = _load("depth_quality.json")
    harp = _load("harp_quality.json")
    for name in ROWS:
        entry = {"row": name, "sources": []}
        if width and name in SMOLLM2:
            rows = {r["method"]: r for r in width["results"][0]["rows"]}
            r = rows[SMOLLM2[name]]
            entry.update(params=r["params"], ppl=r["ppl"]["128"], dense_ppl=rows["dense"]["ppl"]["128"],
                         tokens=width["meta"]["max_eval_tokens"])
            what = "dense" if name == "dense" else f"`{SMOLLM2[name]}` at 20% of all parameters"
            entry["sources"].append(f"perplexity: `amp_quality_width_smollm2_20.json` ({what})")
        if quality and name in ("dense", "amp-20-all"):
            key = "dense" if name == "dense" else "amp-20%"
            z = quality["eval"]["models"][key]["zero_shot"]
            entry.update(zero_shot=z.get("mean_acc"), limit=quality["args"]["limit"])
            what = "" if name == "dense" else ", amp's defaults of its commit"
            entry["sources"].append(f"zero-shot: `eval_smollm2_quality.json` (`{key}`{what})")
        if depth and name == "consensus-3":
            r = next(r for r in depth["results"] if r["model"] == "smollm2")
            rows = [x for x in r["rows"] if x["method"] in ("dense", "consensus") and x["k"] in (0, 3)]
            entry.update(params=rows[1]["params"], ppl=rows[1]["ppl"], dense_ppl=rows[0]["ppl"],
                         tokens=r["eval"]["tokens"])
            entry["sources"].append("perplexity: `depth_quality.json` (consensus, k=3)")
        if harp and name == "harp-4":
            rows = {(x["variant"], x["layers"]): x for x in harp["rows"]}
            entry.update(params=rows[("harp", 4)]["params"], ppl=rows[("harp", 4)]["ppl_seq128"],
                         dense_ppl=rows[("dense", 0)]["ppl_seq128"], tokens=harp["eval_tokens"])
            entry["sources"].append("perplexity: `harp_quality.json` (harp, N=4)")
        out.append(entry)
    return out


def _load(file: str) -> dict | None:
    path = RESULTS / file
    return json.loads(path.read_text()) if path.is_file() else None


def _f(value, spec: str = ".2f", empty: str = "") -> str:
    return empty if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    rows, s = summary["rows"], summary["settings"]
    dense = next((r for r in rows if r["row"] == "dense"), None)
    recovery = (f"{s['recover_tokens']:,} tokens of KD from the dense model on C4 (kd ratio {s.get('kd_ratio', 1.0):g})"
                if s["recover_tokens"] else "none")
    lines = ["# Gemma-3-270M dense and pruned, beside SmolLM2-135M", "", header_markdown(summary["header"]),
             f"Load average when the summary was written: {', '.join(f'{x:.2f}' for x in summary['load_average_end'])}"
             " (each row's own, at its start and end, in the last table).", "",
             f"Perplexity: WikiText-2 test (`wiki.test.raw`), first {s['max_tokens']:,} tokens, windows of "
             f"{SEQ_LEN} (BOS first in every window, {SEQ_LEN - 1} text tokens scored each). "
             + (f"Zero-shot: lm-eval, local llm-foundry files, {s['limit']} items per task ({', '.join(s['tasks'])}); "
                "mean acc. " if s["tasks"] else "Zero-shot: not run. ")
             + f"Calibration: {s['calib_samples']} x {s['calib_length']} tokens of `{s['calib']}` (HARP's alpha "
             f"search: {s['harp_calib_samples']} samples). "
             f"Recovery: {recovery}. "
             f"llama.cpp: the f32 GGUF export, {s['threads']} thread(s), decode = {DECODE} greedy tokens after a "
             f"{PROMPT}-token prompt, median of {s['repeats']}. At {s['limit']} items a task's accuracy has a standard "
             f"error of up to {50 / math.sqrt(s['limit']):.0f} points, the mean of five up to "
             f"{50 / math.sqrt(5 * s['limit']):.0f}.", "",
             "| row | params | prunable | layers | ppl seq 128 | x dense | llama.cpp ppl | decode tok/s | x dense "
             "| zero-shot mean | " + " | ".join(s["tasks"]) + " | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             + " | ".join("---:" for _ in s["tasks"]) + " | ---: |"]
    for r in rows:
        ppl = r["ppl"]["perplexity"]
        cpp = r.get("llamacpp") or {}
        decode = cpp.get("decode_tokens_per_s")
        dense_decode = ((dense or {}).get("llamacpp") or {}).get("decode_tokens_per_s")
        z = r.get("zero_shot") or {}
        tasks = " | ".join(_f(100 * z["tasks"][t]["acc"], ".1f") if t in z.get("tasks", {}) else "" for t in s["tasks"])
        lines.append(f"| {r['label']} | {r['params']:,} | {r['prunable_params']:,} | {r['layers']} | {ppl:.2f} | "
                     f"{_f(ppl / dense['ppl']['perplexity'] if dense else None)} | {_f(cpp.get('perplexity'))} | "
                     f"{_f(decode, '.1f')} | {_f(decode / dense_decode if decode and dense_decode else None)} | "
                     f"{_f(100 * z['mean_acc'] if z.get('mean_acc') is not None else None, '.1f')} | {tasks} | "
                     f"{r['seconds']['total']:.0f} |")
    missing = [ROWS[n][0] for n in summary["missing"]]
    if missing:
        lines += ["", "Not measured in this run: " + "; ".join(missing) + "."]
    lines += ["", "## SmolLM2-135M at the same settings (from earlier results)", "",
              "SmolLM2-135M-Instruct, read from the files named; their token counts and item limits are their own. "
              "SmolLM2's embeddings are 21% of its parameters (Gemma-3-270M's: 63%), so 20% of all parameters is "
              "~25% of SmolLM2's prunable ones; no SmolLM2 result prunes 20% of the prunable parameters, and its "
              "Wanda-SP and FLAP rows are at 20% of all parameters.", "",
              "| Gemma-3-270M row | SmolLM2 params | SmolLM2 ppl seq 128 | x its dense | tokens | zero-shot mean "
              "| sources |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for e in summary["smollm2"]:
        if not e["sources"]:
            lines.append(f"| {ROWS[e['row']][0]} | | | | | | not measured |")
            continue
        ratio = e["ppl"] / e["dense_ppl"] if e.get("ppl") and e.get("dense_ppl") else None
        acc = f"{100 * e['zero_shot']:.1f} ({e['limit']} items)" if e.get("zero_shot") is not None else ""
        lines.append(f"| {ROWS[e['row']][0]} | {_f(e.get('params'), ',')} | {_f(e.get('ppl'))} | {_f(ratio)} | "
                     f"{_f(e.get('tokens'), ',')} | {acc} | {'; '.join(e['sources'])} |")
    lines += ["", "## Wall time per row (seconds) and the load around it", "",
              "The first row that prunes also loads the calibration data (and, for a width method, runs the "
              "statistics pass the width rows share) inside its prune time.", "",
              "| row | " + " | ".join(summary["phases"]) + " | load at start | load at end |",
              "| --- | " + " | ".join("---:" for _ in summary["phases"]) + " | ---: | ---: |"]
    for r in rows:
        load = ", ".join(f"{x:.2f}" for x in r["header"]["machine"]["load_average"])
        end = ", ".join(f"{x:.2f}" for x in r["load_average_end"])
        lines.append(f"| {r['label']} | " + " | ".join(_f(r["seconds"].get(p), ".0f") for p in summary["phases"])
                     + f" | {load} | {end} |")
    return "\n".join(lines) + "\n"


def render(args, header: dict) -> dict:
    """The summary from the rows on disk that match this run's settings."""
    rows, missing = [], []
    for name in args.rows:
        saved = _row_file(args, name)
        data = json.loads(saved.read_text()) if saved.is_file() else None
        if data and data["settings"] == row_settings(name, args):
            rows.append({**data["result"], "header": data["header"], "load_average_end": data["load_average_end"]})
        else:
            missing.append(name)
    phases = [p for p in ("prune", "recover", "perplexity", "zero_shot", "llamacpp", "total")
              if any(p in r["seconds"] for r in rows)]
    settings = {k: v for k, v in row_settings("dense", args).items() if k not in ("row", "prune", "llamacpp")}
    settings.update(recover_tokens=args.recover_tokens, kd_ratio=args.kd_ratio, threads=args.threads,
                    repeats=args.repeats, harp_calib_samples=args.harp_calib_samples,
                    eval_text=os.path.relpath(args.eval_text, ROOT))
    summary = {"header": rows[0]["header"] if rows else header, "settings": settings,
               "load_average_end": [round(x, 2) for x in os.getloadavg()],
               "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
               "rows": rows, "missing": missing, "phases": phases, "smollm2": smollm2_rows()}
    out = Path(args.out)
    write_file(out / f"gemma3{args.tag}.json", json.dumps(summary, indent=1, default=str) + "\n")
    write_file(out / f"gemma3{args.tag}.md", markdown(summary))
    return summary


def _row_file(args, name: str) -> Path:
    return Path(args.out) / f"gemma3{args.tag}_rows" / f"{name}.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of rows, in order (default: all: "
                                                           f"{', '.join(ROWS)})")
    p.add_argument("--max-tokens", type=int, default=65536, help="first N WikiText-2 tokens (default: 65536)")
    p.add_argument("--limit", type=int, default=200, help="zero-shot items per task (default: 200)")
    p.add_argument("--tasks", default=",".join(STANDARD_TASKS), help="zero-shot tasks (empty: none)")
    p.add_argument("--data-dir", default=str(TASKS))
    p.add_argument("--eval-text", default=str(WIKI))
    p.add_argument("--calib", default=str(C4))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-length", type=int, default=128)
    p.add_argument("--harp-calib-samples", type=int, default=8, help="HARP's alpha search samples (default: 8)")
    p.add_argument("--recover-tokens", type=int, default=0,
                   help="KD recovery of every pruned row from the dense model on the C4 sample (default: 0, none)")
    p.add_argument("--kd-ratio", type=float, default=1.0, help="recovery's KL share of the loss (default: 1.0)")
    p.add_argument("--save-every", type=int, default=20,
                   help="recovery checkpoint every N steps in --work, resumed by a rerun (default: 20)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default: 1)")
    p.add_argument("--repeats", type=int, default=3, help="llama.cpp decode runs, median reported (default: 3)")
    p.add_argument("--no-llamacpp", action="store_true", help="skip the GGUF export and llama.cpp")
    p.add_argument("--keep-gguf", action="store_true", help="keep the GGUF files in --work")
    p.add_argument("--work", default=str(ROOT / "runs" / "gemma3"), help="where the GGUF files are written")
    p.add_argument("--out", default=str(RESULTS), help="results folder (rows in OUT/gemma3{tag}_rows/)")
    p.add_argument("--tag", default="", help="suffix of the result names: gemma3{tag}.json/md and gemma3{tag}_rows/ "
                                             "(a row saved with other settings is measured again and replaced)")
    p.add_argument("--render", action="store_true", help="only rebuild the summary from the saved rows")
    args = p.parse_args()
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    args.tasks = [t for t in args.tasks.split(",") if t]
    header = result_header()
    header["llama_cpp_python"] = importlib.metadata.version("llama-cpp-python")
    ctx = None
    for name in [] if args.render else args.rows:
        settings, saved = row_settings(name, args), _row_file(args, name)
        if saved.is_file() and json.loads(saved.read_text())["settings"] == settings:
            print(f"{name}: saved with these settings, skipped", flush=True)
            continue
        ctx = ctx or Context(args)
        row_header = result_header()
        row_header["llama_cpp_python"] = header["llama_cpp_python"]
        result = run_row(name, ctx, args)
        write_file(saved, json.dumps({"settings": settings, "header": row_header, "result": result,
                                      "load_average_end": [round(x, 2) for x in os.getloadavg()]},
                                     indent=1, default=str) + "\n")
        render(args, header)
    print(markdown(render(args, header)))


if __name__ == "__main__":
    main()
