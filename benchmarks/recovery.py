"""Recovery after pruning on SmolLM2-135M: WikiText-2 perplexity before and after recovery at fixed
token budgets, distillation (kd) vs cross-entropy (ce), full fine-tuning vs LoRA, and the loop's
training throughput against the plain operations it is made of.

Pruning: AMP at each ratio, calibrated on 32 C4 samples (as eval_smollm2.py / amp_quality.py).
Recovery data: the C4 sample (never WikiText: the WikiText file is passed as the run's evaluation
text, which recover() refuses as data). Perplexity: WikiText-2 test, seq 128, first --eval-tokens
tokens (secateurs.evaluation.perplexity). Results go to benchmarks/results/<name>.{json,md}, written
again after every run, so an interrupted benchmark keeps what finished.

    python benchmarks/recovery.py --runs kd-full-50k,kd-lora-50k,ce-full-50k,kd-full-200k --threads 1

With --checkpoints DIR, each run checkpoints every --save-every steps and a rerun of the same
command continues an interrupted run bit-identically with the same --threads (the order of CPU float
sums depends on it; minutes and tok/s then cover the last part);
the rerun takes the dense and pruned models' perplexity and zero-shot accuracy from the result file
the interrupted command wrote, when it measured them under the same protocol (the pruning is
deterministic), instead of measuring them again (~5 minutes of 2 cores a resume).

A run is OBJECTIVE-METHOD-BUDGET[@PRUNED]: kd|ce, full|lora (lora = the amp-paper preset),
budget in tokens (50k, 200k, 1m); PRUNED is an AMP ratio of all parameters (default 0.2) or
METHOD:SIZE, e.g. consensus:6 (remove 6 layers), harp:8 (HARP on the top 8 layers), amp-mlp:0.2;
consensus-iter:6 is Consensus's own pipeline (remove one layer, recover on BUDGET / 6 tokens, re-score,
repeat): its before-recovery numbers are those of the dense model without the six layers it chose, and it
cannot checkpoint (the library refuses checkpoints between removals). layers:12+13 removes the layers
named (original indices), nothing scored: one-shot recovery of the layers an iterative run chose.
--lr, --kd-ratio (kd runs: KL weight, the rest cross-entropy) and --hidden-weight (kd runs: hidden-state
distillation, each student layer against the teacher layer the plan kept) apply to every run and are named
in its label.
With --tasks, zero-shot accuracy (lm-eval, local task files, --limit items per task) of the dense,
pruned and recovered models; with --save-models DIR, each recovered model is saved there.

    python benchmarks/recovery.py --runs kd-full-200k,kd-full-200k@0.3,kd-full-200k@consensus:6 \
        --tasks piqa,arc_easy,winogrande,openbookqa --limit 200 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import ASSETS, header_markdown, result_header  # noqa: E402

from secateurs.evaluation.perplexity import load_text, perplexity  # noqa: E402
from secateurs.evaluation.speed import machine_info  # noqa: E402
from secateurs.evaluation.zero_shot import zero_shot  # noqa: E402
from secateurs.files.output import write_file  # noqa: E402
from secateurs.methods import prune  # noqa: E402
from secateurs.methods.options import DepthOptions  # noqa: E402
from secateurs.planning.accounting import model_stats  # noqa: E402
from secateurs.planning.geometry import layer_removal_plan  # noqa: E402
from secateurs.recovery import Objective, load_recovery_data, recover  # noqa: E402
from secateurs.recovery.allocator import retain_freed_memory  # noqa: E402
from secateurs.recovery.iterative import prune_depth_recovering  # noqa: E402
from secateurs.recovery.settings import RecoverySettings  # noqa: E402
from secateurs.recovery.trainer import LoopSettings, RecoveryLoop  # noqa: E402
from secateurs.storage.loading import load_model  # noqa: E402
from secateurs.storage.pruned import save_pruned  # noqa: E402
from secateurs.surgery.apply import apply_plan  # noqa: E402

WIKI = ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw"
C4 = ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"


def parse_run(spec: str) -> dict:
    name, _, pruned = spec.partition("@")
    objective, method, budget = name.split("-")
    scale = {"k": 1_000, "m": 1_000_000}.get(budget[-1].lower(), 1)
    tokens = int(float(budget[:-1] if scale > 1 else budget) * scale)
    if objective not in ("kd", "ce") or method not in ("full", "lora"):
        raise SystemExit(f"bad run {spec!r}: OBJECTIVE-METHOD-BUDGET[@PRUNED], kd|ce, full|lora")
    return {"label": spec, "objective": objective, "method": method, "tokens": tokens, "pruned": pruned or "0.2"}


def _folder_name(label: str) -> str:
    return label.replace("@", "_at_").replace(":", "-")


def prune_spec(pruned: str) -> tuple[str, dict]:
    """'0.3' -> AMP at 30%; 'consensus:6' -> six layers; 'harp:8' -> the top eight layers; 'M:R' -> M at ratio R."""
    method, _, size = pruned.rpartition(":")
    method = method or "amp"
    if method == "harp":
        return method, {"top_layers": int(size), "ratio": None}
    if method == "layers":
        return method, {"removed": [int(i) for i in size.split("+")], "ratio": None}
    if method in ("consensus", "consensus-iter", "depth-bi", "depth-angular", "depth-cka", "depth-ppl", "depth-random"):
        return method, {"layers": int(size), "ratio": None}
    return method, {"ratio": float(size)}


CALIBRATION = {"calibration": str(C4), "calibration_options": {"num_samples": 32}}


def iterative(pruned: str) -> bool:
    """Whether PRUNED is chosen during recovery (Consensus's pipeline), so has no model before the run."""
    return prune_spec(pruned)[0] == "consensus-iter"


def prune_for_run(dense, tok, pruned: str):
    """(model, plan) of PRUNED (prune_spec) under this benchmark's protocol: 32 C4 calibration samples;
    the dense model is left intact."""
    method, options = prune_spec(pruned)
    if method == "layers":
        plan = layer_removal_plan(dense, options["removed"])
        return apply_plan(copy.deepcopy(dense), plan), plan
    return prune(copy.deepcopy(dense), tok, method=method, progress=False, **CALIBRATION, **options)


def prune_recovering(dense, tok, pruned: str, recovery: dict):
    """Consensus's pipeline on a copy of `dense`: (recovered model, plan, recovery record)."""
    return prune_depth_recovering(copy.deepcopy(dense), tok, "consensus",
                                  options=DepthOptions(layers=prune_spec(pruned)[1]["layers"]),
                                  recovery=RecoverySettings.from_keywords(recovery), **CALIBRATION)


def validation_before(model, dense, tok, args, run) -> dict:
    """Held-out objective, NLL and KL of `model` on the validation slice the recovery run used."""
    data = load_recovery_data(str(C4), tok, seq_len=args.seq_len, tokens=run["tokens"], val_tokens=args.val_tokens)
    loop = RecoveryLoop(copy.deepcopy(model).requires_grad_(True), dense, data,
                        Objective("kd", run.get("kd_ratio", 1.0)), LoopSettings(tokens=run["tokens"],
                                                                               batch_size=args.batch_size),
                        progress=False)
    return loop.validate()


def pruned_label(pruned: str) -> str:
    method, options = prune_spec(pruned)
    size = {"ratio": lambda v: f"{int(round(v * 100))}%", "layers": lambda v: f"k={v}",
            "top_layers": lambda v: f"N={v}", "removed": lambda v: "+".join(map(str, v))}
    key, value = next((k, v) for k, v in options.items() if v is not None)
    name = {"amp": "AMP", "consensus-iter": "consensus iterative"}.get(method, method)
    return f"{name} {size[key](value)}"


def accuracy(model, tok, args) -> dict | None:
    """Mean zero-shot accuracy over --tasks (local task files, --limit items each), or None."""
    if not args.tasks:
        return None
    out = zero_shot(model, tok, args.tasks, data_dir=args.data_dir, limit=args.limit, batch_size=16)
    tasks = {name: v["acc"] for name, v in out["tasks"].items()}
    return {"mean_acc": sum(tasks.values()) / len(tasks), "tasks": tasks, "limit": args.limit}


def wiki_ppl(model, tok, text, ids, max_tokens) -> float:
    return perplexity(model, tok, text, seq_len=128, max_tokens=max_tokens, ids=ids, progress=False)["perplexity"]


def throughput(pruned, dense, tok, args, reps: int) -> dict:
    """Median seconds of one loop step (kd, full fine-tuning) vs the plain operations on the same batch:
    student forward + backward (HF loss) + teacher forward; interleaved, after a warm-up."""
    student = copy.deepcopy(pruned).train().requires_grad_(True)
    data = load_recovery_data(str(C4), tok, seq_len=args.seq_len, tokens=args.seq_len * args.batch_size * (reps + 2),
                              val_tokens=0)
    loop = RecoveryLoop(student, dense.eval(), data, Objective("kd"),
                        LoopSettings(tokens=10**9, batch_size=args.batch_size), progress=False)
    plain = copy.deepcopy(pruned).train().requires_grad_(True)
    ids = data.train_ids[: args.batch_size]

    def plain_step():
        plain(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        with torch.no_grad():
            dense(input_ids=ids, use_cache=False)
        plain.zero_grad(set_to_none=True)

    def plain_optimizer_step(opt=torch.optim.AdamW(plain.parameters(), lr=1e-9, fused=True)):
        plain(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        with torch.no_grad():
            dense(input_ids=ids, use_cache=False)
        opt.step()
        opt.zero_grad(set_to_none=True)

    timings = {"loop": [], "plain": [], "plain_with_adamw": []}  # plain + the same fused AdamW step
    fns = {"loop": loop.train_step, "plain": plain_step, "plain_with_adamw": plain_optimizer_step}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            timings[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in timings.items()}
    tokens = args.seq_len * args.batch_size
    return {"reps": reps, "tokens_per_step": tokens, "median_seconds": {k: round(v, 4) for k, v in med.items()},
            "tokens_per_second": {k: round(tokens / v, 2) for k, v in med.items()},
            "loop_vs_plain": round(med["plain"] / med["loop"], 3),
            "loop_vs_plain_with_adamw": round(med["plain_with_adamw"] / med["loop"], 3)}


MEASURED_WITH = ("eval_tokens", "dense_ppl_from", "tasks", "data_dir", "limit")  # what the before-numbers depend on


def earlier_measurements(path: Path, args) -> dict:
    """{'dense': ..., 'pruned': {...}} of an interrupted command's result file when it measured them under
    this protocol; else {} (measure again)."""
    if not args.checkpoints or not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if any(saved.get("args", {}).get(k) != getattr(args, k) for k in MEASURED_WITH):
        return {}
    measured = {spec: m for spec, m in saved.get("pruned", {}).items() if m.get("ppl") is not None}
    dense = saved.get("dense") or {}
    return {"dense": dense, "pruned": measured} if dense.get("ppl") is not None else {}  # a throughput-only file: none


def measured_dense(dense, tok, text, ids, args, with_runs: bool) -> dict:
    """The dense model's WikiText perplexity (or the same protocol's saved one), size and zero-shot accuracy."""
    if not with_runs:
        out = {"ppl": None, "source": "not measured (throughput only)"}
    elif args.dense_ppl_from:
        saved = json.loads(Path(args.dense_ppl_from).read_text())
        dense_ppl = next(p["perplexity"] for p in saved["eval"]["models"]["dense"]["perplexity"]
                         if p["seq_len"] == 128 and p.get("tokens") == (args.eval_tokens // 128) * 127)
        out = {"ppl": dense_ppl, "source": f"from {Path(args.dense_ppl_from).name}, same protocol"}
    else:
        out = {"ppl": wiki_ppl(dense, tok, text, ids, args.eval_tokens), "source": "measured in this run"}
    return {**out, "params": model_stats(dense).total_params, "zero_shot": accuracy(dense, tok, args)}


SHARING = "shared with other jobs"  # what ran beside a run, unless its result file says otherwise ("sharing")


def _accuracy_change(result: dict, spec: str, run: dict, dense_acc: float | None) -> str:
    before = ((result.get("pruned") or {}).get(spec) or {}).get("zero_shot") or {}
    after = run.get("zero_shot_after") or {}
    if not dense_acc or "mean_acc" not in after:
        return "-"
    return (f"{before.get('mean_acc', float('nan')):.4f} -> {after['mean_acc']:.4f} "
            f"({after['mean_acc'] / dense_acc:.3f}x)")


def _allocator_line(allocator: dict) -> str:
    if allocator.get("retained"):
        how = allocator.get("how", "secateurs.recovery.allocator")
        return (f"glibc keeps freed memory ({how}: mmap threshold {allocator['mmap_threshold'] >> 20} MiB, "
                f"trim threshold {allocator['trim_threshold'] >> 20} MiB)")
    return f"glibc's defaults ({allocator.get('why', 'not applied')})"


def render(result: dict) -> str:
    m0 = result["header"]["machine"] if "header" in result else result["machine_at_start"]
    m1 = result.get("machine_at_end", {})
    a = result["args"]
    dense = result["dense"]["ppl"] or float("nan")
    dense_acc = (result["dense"].get("zero_shot") or {}).get("mean_acc")
    lines = [
        "# Recovery after pruning: SmolLM2-135M", "",
        f"Pruning (AMP unless named) calibrated on 32 samples of `{C4.name}`; "
        f"recovery data `{C4.name}` (C4, never WikiText), "
        f"sequences of {a['seq_len']} tokens, batch {a['batch_size']}, validation {a['val_tokens']} held-out tokens; "
        f"WikiText-2 test perplexity, seq 128, first {a['eval_tokens']:,} tokens. kd = forward KL from the dense "
        "model (T = 1, kd_ratio 1 and no hidden-state term unless a run names them), ce = cross-entropy; "
        "full = all weights, AdamW lr 1e-4; "
        "lora = amp-paper preset (r 8, alpha 16, dropout 0.05, seven projections, lr 3e-4, merged), unless a run "
        "names its lr; cosine decay, 5% warm-up, clip 1.0.", "",
        f"Machine: {m0['cpu']}, {m0['cpu_count']} cores, torch threads {m0['torch_threads']}, load average "
        f"{m0.get('load_average')} at start, {m1.get('load_average')} at end ({result.get('sharing', SHARING)}); "
        f"torch {m0['torch']}, transformers {m0['transformers']}; started {m0['date']}."
        + (f" Allocator: {_allocator_line(result['allocator'])}." if result.get("allocator") else ""), "",
        *([header_markdown(result["header"])] if "header" in result else []),
        f"Dense perplexity: {dense:.2f} ({result['dense']['source']})."
        + (f" Dense zero-shot mean accuracy: {dense_acc:.4f} ({', '.join(result['dense']['zero_shot']['tasks'])}, "
           f"first {result['dense']['zero_shot']['limit']} items each, local task files)." if dense_acc else ""), "",
        *([f"Before-recovery numbers: {result['reused']}.", ""] if result.get("reused") else []),
        *[f"Note: {n}\n" for n in result.get("notes", [])],
        "| pruned | run | tokens trained | steps | WikiText-2 ppl before | after | after / dense "
        "| val KL before -> after | "
        "zero-shot before -> after (x dense) | train tok/s | minutes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    for r in result["runs"]:
        kl = (f"{r['val_before'].get('kl', float('nan')):.3f} -> {r['val_after'].get('kl', float('nan')):.3f}"
              if "kl" in r["val_before"] else "-")
        spec = r.get("pruned", str(r.get("ratio", 0.2)))
        lr = f" lr {r['lr']:g}" if r.get("lr") else ""
        settings = [f"{k} {r[k]:g}" for k, default in (("kd_ratio", 1.0), ("hidden_weight", 0.0))
                    if r.get(k, default) != default]
        mix = f" ({', '.join(settings)})" if settings else ""
        lines.append(f"| {pruned_label(spec)} | {r['objective']}{mix} {r['method']}{lr} | {r['tokens_trained']:,} | "
                     f"{r['steps']} | {r['ppl_before']:.1f} | {r['ppl_after']:.1f} | {r['ppl_after'] / dense:.2f}x | "
                     f"{kl} | {_accuracy_change(result, spec, r, dense_acc)} | {r['train_tokens_per_second']} | "
                     f"{r['minutes']:.1f} |")
    if result.get("throughput"):
        t = result["throughput"]
        lines += ["", f"Throughput (AMP 20%, kd full, batch {a['batch_size']} x {a['seq_len']}, median of {t['reps']} "
                  f"interleaved steps): loop {t['tokens_per_second']['loop']} tok/s; plain student forward+backward + "
                  f"teacher forward {t['tokens_per_second']['plain']} tok/s (loop/plain = {t['loop_vs_plain']}); "
                  f"plain + AdamW step {t['tokens_per_second']['plain_with_adamw']} tok/s "
                  f"(loop/plain+AdamW = {t['loop_vs_plain_with_adamw']})."]
    if result.get("not_run"):
        lines += ["", "Not run: " + "; ".join(result["not_run"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="kd-full-50k,kd-lora-50k,ce-full-50k,kd-full-200k")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=None,
                    help="peak learning rate of every run (default: recover's, 1e-4 full, 3e-4 lora)")
    ap.add_argument("--kd-ratio", type=float, default=None,
                    help="kd runs: weight of the KL term, the rest cross-entropy (default 1: pure distillation)")
    ap.add_argument("--hidden-weight", type=float, default=None,
                    help="kd runs: weight of hidden-state distillation (default 0: logits only)")
    ap.add_argument("--val-tokens", type=int, default=2048)
    ap.add_argument("--throughput-reps", type=int, default=5, help="0 skips the throughput measurement")
    ap.add_argument("--dense-ppl-from", metavar="JSON",
                    help="reuse the dense perplexity of an eval_smollm2 result (same protocol) instead of measuring")
    ap.add_argument("--name", default="recovery")
    ap.add_argument("--render", metavar="JSON", help="only re-render the Markdown of a saved result")
    ap.add_argument("--not-run", action="append", default=[],
                    help="with --render: record a run that did not run or finish, and why")
    ap.add_argument("--note", action="append", default=[], help="with --render: add a note to the result")
    ap.add_argument("--tasks", default="",
                    help="zero-shot tasks, e.g. piqa,arc_easy,winogrande,openbookqa (empty: none)")
    ap.add_argument("--data-dir", default=str(ASSETS / "commonsense" / "llm-foundry"))
    ap.add_argument("--limit", type=int, default=200, help="zero-shot items per task")
    ap.add_argument("--save-models", metavar="DIR", help="save each recovered model in DIR/<run label>")
    ap.add_argument("--checkpoints", metavar="DIR",
                    help="keep each run's training checkpoints in DIR/<run label> and resume a run from there when "
                         "they exist (a 1M-token run takes hours on 2 cores: a run cut short continues)")
    ap.add_argument("--save-every", type=int, default=25, help="with --checkpoints: steps between checkpoints")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    args = ap.parse_args()
    if args.render:
        path = Path(args.render)
        saved = json.loads(path.read_text())
        saved["not_run"] = saved.get("not_run", []) + args.not_run
        saved["notes"] = saved.get("notes", []) + args.note
        write_file(path, json.dumps(saved, indent=2, default=str) + "\n")
        write_file(path.with_suffix(".md"), render(saved))
        return 0
    torch.set_num_threads(args.threads)
    runs = [parse_run(s) for s in args.runs.split(",") if s]
    if args.lr:  # the label (hence the checkpoint folder) names the learning rate, so runs at another lr never mix
        runs = [{**r, "lr": args.lr, "label": f"{r['label']}-lr{args.lr:g}"} for r in runs]
    for key, tag in (("kd_ratio", "kd"), ("hidden_weight", "hw")):  # the same for the kd runs' loss weights
        value = getattr(args, key)
        if value is not None:
            runs = [{**r, key: value, "label": f"{r['label']}-{tag}{value:g}"} if r["objective"] == "kd" else r
                    for r in runs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"header": result_header(), "benchmark": "recovery", "args": vars(args), "runs": [],
              "not_run": [], "allocator": retain_freed_memory()}  # what the loop does on CPU: loop and plain alike

    def write():
        result["machine_at_end"] = machine_info()
        write_file(out / f"{args.name}.json", json.dumps(result, indent=2, default=str) + "\n")
        write_file(out / f"{args.name}.md", render(result))

    dense, tok = load_model("smollm2", "float32")
    text, text_info = load_text(WIKI)
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[0]
    earlier = earlier_measurements(out / f"{args.name}.json", args)
    if earlier:
        result["reused"] = f"dense and pruned measurements from the interrupted command's {args.name}.json"
    result["dense"] = earlier.get("dense") or measured_dense(dense, tok, text, ids, args, bool(runs))
    print("dense", result["dense"], flush=True)
    pruned = {}
    for spec in dict.fromkeys([r["pruned"] for r in runs] or ["0.2"]):  # no runs: the throughput measurement only
        if iterative(spec):
            continue  # its layers are chosen while it recovers: measured after the run
        model, plan = prune_for_run(dense, tok, spec)
        measured = earlier.get("pruned", {}).get(spec) or {
            "ppl": wiki_ppl(model, tok, text, ids, args.eval_tokens) if runs else None,
            "params": model_stats(model).total_params, "zero_shot": accuracy(model, tok, args) if runs else None}
        result.setdefault("pruned", {})[spec] = measured
        pruned[spec] = (model, plan, measured["ppl"])
        print("pruned", spec, result["pruned"][spec], flush=True)
        write()
    if args.throughput_reps and "0.2" in pruned:
        result["throughput"] = throughput(pruned["0.2"][0], dense, tok, args, args.throughput_reps)
        print("throughput", result["throughput"], flush=True)
        write()
    for run in runs:
        t0 = time.perf_counter()
        settings = dict(data=str(C4), tokens=run["tokens"], objective=run["objective"],
                        kd_ratio=run.get("kd_ratio", 1.0), hidden_weight=run.get("hidden_weight", 0.0),
                        preset="amp-paper" if run["method"] == "lora" else None, method=run["method"],
                        lr=run.get("lr"), seq_len=args.seq_len, batch_size=args.batch_size,
                        val_tokens=args.val_tokens, evaluation_files=[str(WIKI)])
        extra = {}
        if iterative(run["pruned"]):
            if run["objective"] != "kd":
                raise SystemExit(f"{run['label']}: Consensus's pipeline recovers by distillation (kd)")
            recovered, plan, r = prune_recovering(dense, tok, run["pruned"], settings)
            measuring = time.perf_counter()  # the before-measurement is not part of the run's minutes
            one_shot = apply_plan(copy.deepcopy(dense), plan)  # the same layers removed, nothing recovered
            before = wiki_ppl(one_shot, tok, text, ids, args.eval_tokens)
            result.setdefault("pruned", {})[run["pruned"]] = {
                "ppl": before, "params": model_stats(one_shot).total_params,
                "zero_shot": accuracy(one_shot, tok, args), "layers_removed": plan.provenance["layers_removed"]}
            r = {**r, "before": validation_before(one_shot, dense, tok, args, run), "first_round_before": r["before"]}
            t0 += time.perf_counter() - measuring
            extra = {"layers_removed": plan.provenance["layers_removed"],
                     # with each round's scoring table: how close the runners-up came when a layer was chosen
                     "rounds": [{k: x[k] for k in ("removed", "table", "recovery")} for x in plan.provenance["rounds"]]}
        else:
            model, plan, before = pruned[run["pruned"]]
            checkpoints = Path(args.checkpoints) / _folder_name(run["label"]) if args.checkpoints else None
            resume = checkpoints is not None and checkpoints.is_dir() and any(checkpoints.iterdir())
            rec = recover(copy.deepcopy(model), dense if run["objective"] == "kd" else None, tokenizer=tok,
                          teacher_tokenizer=tok, plan=plan, save_every=args.save_every if checkpoints else None,
                          checkpoint_dir=checkpoints, resume=resume, progress=True, **settings)
            recovered, r = rec.model, rec.record
        after = wiki_ppl(recovered, tok, text, ids, args.eval_tokens)
        zero_shot_after = accuracy(recovered, tok, args)
        if args.save_models:
            save_pruned(recovered, plan, Path(args.save_models) / _folder_name(run["label"]),
                        tokenizer=tok, force=True)
        result["runs"].append({**run, "tokens_trained": r["tokens"]["trained"], "steps": r["steps"]["done"],
                               "ppl_before": before, "ppl_after": after, "zero_shot_after": zero_shot_after,
                               "val_before": r["before"],
                               "val_after": r["after"], "train_tokens_per_second": r["training_tokens_per_second"],
                               "minutes": (time.perf_counter() - t0) / 60, "recovery": {k: v for k, v in r.items()
                                                                                      if k != "curves"},
                               "val_curve": r["curves"]["val"],
                               "resumed_at_steps": r["steps"].get("resumed_at", []), **extra})
        print(run["label"], before, "->", after, flush=True)
        write()
    write()
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
