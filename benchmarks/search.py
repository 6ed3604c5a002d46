"""The architecture search (`--method search`) against the fixed-structure methods on one model (default
SmolLM2-135M, `smollm2`), at equal budgets. The search's library is scored once; every budget is then chosen
from the same scores (secateurs.methods.search.choose_again), so a search row costs a choice, not a search.

Rows (R in --ratios, default 20% and 30% of all parameters):

* dense;
* at R of all parameters: search (params budget); AMP's defaults; AMP with `allocation=global`; FLAP;
  Consensus removing the fewest whole layers that remove at least R (the exact share is reported); HARP at R
  where its attention-only replacement can remove that much (else the row says why not);
* at --kv-ratio (default 50%) of the KV cache per token: search (kv budget); amp-heads with a fraction of
  heads and of KV groups (`rounding=structures`) of --kv-ratio; HARP on that share of the layers (the top ones);
* at a decode speed-up of --speedup (default 1.3x: decode cost <= 1/1.3 of the dense model's): search with the
  decode budget (secateurs.search.costs' table, measured in transformers on this machine).

Every row is calibrated on the same --calib-samples C4 records of --calib-length tokens (HARP's alpha search on
the first --harp-calib-samples). Per row:

* parameters and their share removed, KV-cache bytes per token (the model's dtype, float32);
* WikiText-2 test perplexity, windows of 128 tokens, the first --max-tokens tokens
  (secateurs.evaluation.perplexity);
* the mean KL divergence per token of the row's next-token distribution from the dense model's, on the first
  --kl-tokens tokens of the same WikiText-2 windows (held out: the search scores on C4);
* zero-shot accuracy on the five local tasks (lm-eval, llm-foundry files), --limit items per task;
* where llama.cpp holds the model: its f32 GGUF export (secateurs.export) and decode tokens/s in llama.cpp
  (llama-cpp-python; 128 greedy steps after a 512-token prompt), measured in --repeats paired rounds with the
  dense export (dense then row in each round), medians and the median of the per-round speed-ups;
* search rows: the per-layer architecture chosen, and the one scoring run's time as a multiple of one forward
  pass of the dense model over the calibration data (both measured), with the scoring tokens;
* with --recover-tokens N: the search and AMP rows at 20% are first trained N tokens with KD from the dense
  model on the C4 sample (secateurs.recovery.recover; checkpointed in --work and resumed by a rerun).

Each row is written to {--out}/search{--tag}_rows/ROW.json as soon as it is done and skipped when that file
holds the same settings; the scores are written once to scored.json there (a rerun with the same calibration
and scoring settings reads them). The summary {--out}/search{--tag}.{json,md} is rebuilt from the rows on
disk (--render rebuilds it alone). A check of the whole path on the tiny model:

    python benchmarks/search.py --model ../shared/assets/models/stories260K-hf --max-tokens 1024 \\
        --kl-tokens 512 --tasks "" --no-llamacpp --calib-samples 8 --calib-length 64 --scoring-tokens 64 \\
        --out /tmp/search-check
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
from serve_llamacpp import DECODE, PROMPT, engine, speed

from secateurs.adapters import get_adapter
from secateurs.calibration.data import load_calibration
from secateurs.calibration.statistics import collect_statistics
from secateurs.errors import SecateursError
from secateurs.evaluation.perplexity import perplexity, read_text, window_start_token, windows_of
from secateurs.evaluation.report import plot_layer_choices
from secateurs.evaluation.zero_shot import STANDARD_TASKS, zero_shot
from secateurs.export import export_gguf
from secateurs.files.output import write_file
from secateurs.methods import make_plan, prune
from secateurs.methods.harp import harp_layers_for_ratio
from secateurs.methods.options import SEARCH_MLP_FRACTIONS
from secateurs.methods.search import choose_again
from secateurs.planning.accounting import model_stats
from secateurs.planning.budget import Geometry
from secateurs.planning.plan import PruningPlan
from secateurs.recovery.api import recover
from secateurs.storage.loading import load_model

WIKI = ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw"
C4 = ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"
TASKS = ASSETS / "commonsense" / "llm-foundry"
RESULTS = ROOT / "benchmarks" / "results"
SEQ_LEN = 128
KL_BATCH = 4  # windows per batch of the held-out KL: two models' logits in float32 at once
RECOVERED_AT = 0.2  # --recover-tokens trains the search and AMP rows at this share of parameters


def pct(x: float) -> str:
    return f"{100 * x:g}"


def row_specs(args) -> dict[str, dict]:
    """name -> {label, kind, ...}, in the order the rows run and are shown."""
    rows = {"dense": {"label": "dense", "kind": "dense"}}
    for r in args.ratios:
        p = pct(r)
        rows[f"search-{p}"] = {"label": f"search, {p}% of parameters", "kind": "search", "budget": "params",
                               "ratio": r, "candidates": True}
        if r == args.ratios[0]:
            rows[f"search-program-{p}"] = {"label": f"search, {p}% of parameters, the program's choice alone",
                                           "kind": "search", "budget": "params", "ratio": r, "candidates": False}
        rows[f"search-r2-{p}"] = {"label": f"search, {p}% of parameters, two scoring rounds", "kind": "search-r2",
                                  "budget": "params", "ratio": r, "candidates": True}
        rows[f"amp-{p}"] = {"label": f"AMP {p}%", "kind": "prune", "prune": {"method": "amp", "ratio": r}}
        rows[f"amp-global-{p}"] = {"label": f"AMP {p}%, global allocation", "kind": "prune",
                                   "prune": {"method": "amp", "ratio": r, "allocation": "global"}}
        rows[f"flap-{p}"] = {"label": f"FLAP {p}%", "kind": "prune", "prune": {"method": "flap", "ratio": r}}
        rows[f"consensus-{p}"] = {"label": f"Consensus, >= {p}% of parameters", "kind": "consensus", "share": r}
        rows[f"harp-{p}"] = {"label": f"HARP, {p}% of parameters", "kind": "harp", "share": r}
    k = pct(args.kv_ratio)
    rows[f"search-kv{k}"] = {"label": f"search, {k}% of the KV cache", "kind": "search", "budget": "kv",
                             "ratio": args.kv_ratio, "candidates": True}
    rows[f"amp-heads-kv{k}"] = {"label": f"amp-heads, {k}% of heads (whole KV groups)", "kind": "prune",
                                "prune": {"method": "amp-heads", "ratio": args.kv_ratio, "rounding": "structures"}}
    rows[f"harp-kv{k}"] = {"label": f"HARP on {k}% of the layers", "kind": "harp-layers", "share": args.kv_ratio}
    s = f"{args.speedup:g}"
    rows[f"search-decode{s}"] = {"label": f"search, decode {s}x", "kind": "search", "budget": "decode",
                                 "ratio": 1 - 1 / args.speedup, "candidates": True}
    for name, spec in rows.items():
        spec["recover"] = name in (f"search-{pct(RECOVERED_AT)}", f"amp-{pct(RECOVERED_AT)}",
                                   f"amp-global-{pct(RECOVERED_AT)}")
    return rows


def calibration_settings(args) -> dict:
    return {"model": args.model, "calib": Path(args.calib).name, "calib_samples": args.calib_samples,
            "calib_length": args.calib_length}


def scoring_settings(args) -> dict:
    return {**calibration_settings(args), "scoring_tokens": args.scoring_tokens,
            "mlp_fractions": [float(f) for f in SEARCH_MLP_FRACTIONS]}


def row_settings(name: str, spec: dict, args) -> dict:
    """Everything a row's numbers depend on; a saved row is reused only when these match."""
    harp = spec["kind"] in ("harp", "harp-layers")
    return {**calibration_settings(args), "row": name, "spec": {k: v for k, v in spec.items() if k != "label"},
            "seq_len": SEQ_LEN, "max_tokens": args.max_tokens, "kl_tokens": args.kl_tokens, "tasks": args.tasks,
            "limit": args.limit, **({"harp_calib_samples": args.harp_calib_samples} if harp else {}),
            **({"scoring": scoring_settings(args), "reconstruct": args.search_reconstruct}
               if spec["kind"] in ("search", "search-r2") else {}),
            "recover_tokens": args.recover_tokens if spec["recover"] else 0,
            **({"kd_ratio": args.kd_ratio} if spec["recover"] and args.recover_tokens else {}),
            **({"lr": args.lr} if spec["recover"] and args.recover_tokens and args.lr is not None else {}),
            "llamacpp": None if args.no_llamacpp else {"threads": args.threads, "repeats": args.repeats,
                                                        "prompt": PROMPT, "decode": DECODE}}


class Context:
    """The dense model, its tokenizer, the evaluation ids, the calibration data and statistics, the scored
    search plan and the dense GGUF engine, each made once, on first use."""

    def __init__(self, args):
        self.args = args
        self.dense, self.tok = load_model(args.model, dtype="float32")
        self.dense.eval()
        self.ids = self.tok(read_text(args.eval_text), return_tensors="pt", verbose=False).input_ids[0]
        self.dense_params = model_stats(self.dense).total_params
        self.dense_kv = model_stats(self.dense).kv_cache_bytes_per_token
        self._calibration = self._harp_calibration = self._statistics = self._scored = self._engine = None
        self.statistics_seconds = None

    @property
    def calibration(self):
        if self._calibration is None:
            self._calibration = load_calibration(self.args.calib, self.tok, num_samples=self.args.calib_samples,
                                                 max_length=self.args.calib_length, seed=0, batch_size=8)
        return self._calibration

    @property
    def harp_calibration(self):
        if self._harp_calibration is None:
            self._harp_calibration = load_calibration(self.args.calib, self.tok,
                                                      num_samples=self.args.harp_calib_samples,
                                                      max_length=self.args.calib_length, seed=0, batch_size=8)
        return self._harp_calibration

    @property
    def statistics(self):
        """One statistics pass with the Gram matrices (the search's re-fit needs them; the width methods read
        the same scores from it)."""
        if self._statistics is None:
            start = time.perf_counter()
            self._statistics = collect_statistics(self.dense, self.calibration, progress=False, gram=True)
            self.statistics_seconds = round(time.perf_counter() - start, 2)
        return self._statistics

    def scored(self) -> dict:
        """The search scored once: read from scored.json when saved with these settings, else measured (the
        scoring run and one forward over the calibration data, both timed) and saved."""
        if self._scored is None:
            path = rows_dir(self.args) / "scored.json"
            saved = json.loads(path.read_text()) if path.is_file() else None
            if not saved or saved["settings"] != scoring_settings(self.args):
                saved = score_once(self)
                write_file(path, json.dumps(saved, indent=1, default=str) + "\n")
            self._scored = {**saved, "plan": PruningPlan.from_dict(saved["plan"])}
        return self._scored

    def dense_engine(self):
        """llama.cpp on the dense model's f32 export (written once per process in --work)."""
        if self._engine is None:
            path = Path(self.args.work) / "dense.f32.gguf"
            path.parent.mkdir(parents=True, exist_ok=True)
            export_gguf(self.dense, path, "f32", tokenizer=self.tok, force=True)
            self._engine = engine(path, self.args.threads, PROMPT + DECODE + 8)
        return self._engine


@torch.inference_mode()
def calibration_forward_seconds(model, calibration) -> float:
    """One forward pass of the model over every calibration batch (the unit the search's time is given in)."""
    model(**calibration.batches[0])  # warm-up
    start = time.perf_counter()
    for batch in calibration.batches:
        model(**batch, use_cache=False)
    return time.perf_counter() - start


def search_two_rounds(spec: dict, ctx: Context, args) -> tuple:
    """The search at one budget with its second round (every variant scored again around the first round's
    choice, which depends on the budget): a whole search per row, timed in calibration forwards."""
    forward = calibration_forward_seconds(ctx.dense, ctx.calibration)
    start = time.perf_counter()
    model, plan = prune(copy.deepcopy(ctx.dense), ctx.tok, "search", spec["ratio"], calibration=ctx.calibration,
                        statistics=ctx.statistics, budget=spec["budget"], rounds=2, candidates=spec["candidates"],
                        scoring_tokens=args.scoring_tokens, reconstruct=args.search_reconstruct, progress=True)
    seconds = time.perf_counter() - start
    p = plan.provenance
    details = {"architecture": architecture(plan), "budget": spec["budget"], "budget_ratio": spec["ratio"],
               "choice_costs": p["choice"]["costs"], "objective": p["choice"]["objective"], "rounds": 2,
               "candidates": p.get("candidates"),
               "search_and_surgery_seconds": round(seconds, 1), "calibration_forward_seconds": round(forward, 3),
               "search_and_surgery_forwards": round(seconds / forward, 1), "scoring_tokens": p["scoring_tokens"]}
    return model, plan, {"search_and_surgery": round(seconds, 1)}, details


def score_once(ctx: Context) -> dict:
    """The search at the first ratio with every variant scored: its plan records the scores every budget
    is chosen from."""
    args = ctx.args
    stats = ctx.statistics
    forward = calibration_forward_seconds(ctx.dense, ctx.calibration)
    start = time.perf_counter()
    plan = make_plan(ctx.dense, "search", args.ratios[0], tokenizer=ctx.tok, calibration=ctx.calibration,
                     statistics=stats, scoring_tokens=args.scoring_tokens, progress=True)
    seconds = time.perf_counter() - start
    p = plan.provenance
    print(f"search scored: {len(p['scores'])} variants on {p['scoring_tokens']:,} tokens in {seconds:.1f} s "
          f"({seconds / forward:.1f} calibration forwards of {forward:.2f} s)", flush=True)
    return {"settings": scoring_settings(args), "header": result_header(), "plan": plan.to_dict(),
            "search_seconds": round(seconds, 2), "calibration_forward_seconds": round(forward, 3),
            "search_forwards": round(seconds / forward, 1), "statistics_seconds": ctx.statistics_seconds,
            "calibration_tokens": ctx.calibration.num_tokens, "scoring_tokens": p["scoring_tokens"],
            "scoring_samples": p["scoring_samples"], "variants_scored": len(p["scores"])}


def consensus_layers(model, share: float) -> tuple[int, float]:
    """The fewest whole decoder layers whose parameters are at least `share` of the model's (the smallest
    layers counted first: the count no choice of layers can beat), and that share for equal layers."""
    total = model_stats(model).total_params
    sizes = sorted(s.params for s in model_stats(model).layers)
    removed = 0
    for k, size in enumerate(sizes, 1):
        removed += size
        if removed >= share * total:
            return k, removed / total
    raise SecateursError(f"removing every layer removes {removed / total:.1%}, less than {share:.0%}")


def harp_max_share(model) -> float:
    """The share of all parameters HARP removes with the value path in every layer but the first (its most)."""
    geo, adapter = Geometry.of(model), get_adapter(model)
    layers = list(adapter.decoder_layers(model))[1:]
    saved = sum(s.num_heads * c.head + s.num_kv_heads * c.kv_head - adapter.attention_weights(layer).o.shape[0] ** 2
                for s, c, layer in zip(geo.shapes[1:], geo.costs[1:], layers))
    return saved / geo.total_params


def architecture(plan: PruningPlan) -> str:
    """The search's choice per layer, `attention/mlp`: A dense attention, kN N KV groups, V value path; M dense
    MLP, a number its neurons; - removed."""
    short = {"dense": "A", "value": "V", "removed": "-"}
    out = []
    for layer in plan.provenance["choice"]["layers"]:
        a = short.get(layer["attention_kind"], layer["attention"].replace("kv", "k"))
        m = {"dense": "M", "removed": "-"}.get(layer["mlp_kind"], layer["mlp"].removeprefix("width"))
        out.append(f"{a}/{m}")
    return " ".join(out)


def choices_of(arch: str, layer_shapes: list) -> list[dict]:
    """The per-layer choices of an `architecture` string, in the form secateurs.evaluation.report draws
    (layer_choices), against the base model's (heads, KV heads, neurons) per layer."""
    choices = []
    for i, (block, (h, kv, n)) in enumerate(zip(arch.split(), layer_shapes, strict=True)):
        a, m = block.split("/")
        groups = {"A": kv, "V": 0, "-": 0}[a] if a in ("A", "V", "-") else int(a.removeprefix("k"))
        attention = {"A": "dense", "V": "value", "-": "removed"}.get(a, "kv")
        mlp = {"M": "dense", "-": "removed"}.get(m, "width")
        choices.append({"layer": i, "attention": attention, "heads": groups * h // kv, "base_heads": h,
                        "kv_heads": groups, "base_kv_heads": kv, "alpha": None, "mlp": mlp,
                        "neurons": n if m == "M" else 0 if m == "-" else int(m), "base_neurons": n,
                        "layer_removed": a == m == "-"})
    return choices


def draw_architectures(args, rows: list[dict], shapes: list | None) -> dict[str, str]:
    """row name -> its per-layer picture (secateurs report's drawing), written beside the rows; `shapes` the
    base model's layer shapes (the scored plan's), None for no pictures."""
    out = {}
    for r in rows if shapes else []:
        if "architecture" in r:
            path = plot_layer_choices(choices_of(r["architecture"], shapes), rows_dir(args) / f"{r['row']}.png")
            out[r["row"]] = os.path.relpath(path, args.out)
    return out


def build(name: str, spec: dict, ctx: Context, args) -> tuple:
    """(model, plan, seconds, details) of one row; model None for a row that cannot be built (details say why)."""
    kind, seconds, details = spec["kind"], {}, {}
    common = {"calibration": ctx.calibration, "progress": False}
    if kind == "dense":
        return ctx.dense, None, seconds, details
    scored = ctx.scored() if kind == "search" else None  # scored once (the first search row), timed on its own
    start = time.perf_counter()
    if kind == "search":
        plan = choose_again(ctx.dense, scored["plan"], spec["ratio"], budget=spec["budget"], tokenizer=ctx.tok,
                            statistics=ctx.statistics, candidates=spec["candidates"], **common)
        seconds["choose"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        model, plan = prune(copy.deepcopy(ctx.dense), ctx.tok, "search", plan=plan,
                            reconstruct=args.search_reconstruct, statistics=ctx.statistics, **common)
        seconds["surgery"] = round(time.perf_counter() - start, 2)
        details = {"architecture": architecture(plan), "budget": spec["budget"], "budget_ratio": spec["ratio"],
                   "choice_costs": plan.provenance["choice"]["costs"],
                   "objective": plan.provenance["choice"]["objective"],
                   "candidates": plan.provenance.get("candidates"),
                   **{k: plan.provenance.get(k) for k in ("dense_kv_bytes_per_token", "dense_decode_seconds",
                                                          "requested_params_removed")},
                   **{k: scored[k] for k in ("search_seconds", "calibration_forward_seconds", "search_forwards",
                                             "statistics_seconds", "calibration_tokens", "scoring_tokens",
                                             "scoring_samples", "variants_scored")}}
        return model, plan, seconds, details
    if kind == "search-r2":
        return search_two_rounds(spec, ctx, args)
    if kind == "consensus":
        layers, share = consensus_layers(ctx.dense, spec["share"])
        keywords, details = {"method": "consensus", "ratio": None, "layers": layers}, {"layers_removed": layers}
    elif kind in ("harp", "harp-layers"):
        count = len(get_adapter(ctx.dense).decoder_layers(ctx.dense))
        try:
            top = (harp_layers_for_ratio(ctx.dense, spec["share"]) if kind == "harp"
                   else max(1, round(spec["share"] * count)))
        except SecateursError as error:
            return None, None, seconds, {"unreachable": str(error), "max_share": harp_max_share(ctx.dense)}
        keywords, details = {"method": "harp", "ratio": None, "top_layers": top}, {"top_layers": top}
        common = {**common, "calibration": ctx.harp_calibration}
    else:
        keywords = dict(spec["prune"])
        if keywords["method"] in ("amp", "amp-heads", "flap"):
            keywords["statistics"] = ctx.statistics
    model, plan = prune(copy.deepcopy(ctx.dense), ctx.tok, **keywords, **common)
    seconds["prune"] = round(time.perf_counter() - start, 2)
    return model, plan, seconds, details


def recover_row(name: str, model, plan, ctx: Context, args) -> tuple:
    checkpoints = Path(args.work) / f"recovery-{name}{args.tag}"
    resume = (checkpoints / "trainer_state.pt").exists()
    out = recover(model, ctx.dense, tokenizer=ctx.tok, plan=plan, data=str(C4), tokens=args.recover_tokens,
                  objective="kd", kd_ratio=args.kd_ratio, **({"lr": args.lr} if args.lr is not None else {}),
                  progress=False, checkpoint_dir=str(checkpoints),
                  save_every=args.save_every, resume=resume)
    return out.model, {"tokens": out.record["tokens"], "before": out.record["before"], "after": out.record["after"],
                       "training_tokens_per_second": out.record["training_tokens_per_second"]}


@torch.inference_mode()
def heldout_kl(dense, model, windows: torch.Tensor) -> dict:
    """Mean KL(dense || model) per position over the windows' scored positions (all but the last of each)."""
    total, count = 0.0, 0
    for s in range(0, windows.shape[0], KL_BATCH):
        batch = windows[s:s + KL_BATCH]
        p = torch.log_softmax(dense(batch, use_cache=False).logits[:, :-1].float(), -1)
        q = torch.log_softmax(model(batch, use_cache=False).logits[:, :-1].float(), -1)
        total += float((p.exp() * (p - q)).sum(-1).double().sum())
        count += p.shape[0] * p.shape[1]
    return {"kl": total / count, "tokens": count}


def serve(model, name: str, ctx: Context, args) -> dict:
    """The f32 GGUF export and llama.cpp's decode speed in paired rounds with the dense export (the dense row:
    the dense export twice per round, the ratio its noise)."""
    path = Path(args.work) / f"{name}.f32.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        export_gguf(model, path, "f32", tokenizer=ctx.tok, force=True)
    except SecateursError as error:
        return {"exported": False, "reason": str(error)}
    export_seconds = time.perf_counter() - start
    dense = ctx.dense_engine()
    llm = dense if name == "dense" else engine(path, args.threads, PROMPT + DECODE + 8)
    prompt = windows_of(ctx.ids, SEQ_LEN, window_start_token(ctx.dense, ctx.tok), None).flatten()[:PROMPT].tolist()
    speed(llm, prompt[:64])  # warm-up
    load = [round(x, 2) for x in os.getloadavg()]
    rounds = [(speed(dense, prompt)[1], speed(llm, prompt)[1]) for _ in range(args.repeats)]
    ratios = [row / base for base, row in rounds]
    result = {"exported": True, "bytes": path.stat().st_size, "threads": args.threads, "repeats": args.repeats,
              "decode_tokens_per_s": statistics.median(r for _, r in rounds),
              "dense_decode_tokens_per_s": statistics.median(b for b, _ in rounds),
              "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
              "load_average": {"start": load, "end": [round(x, 2) for x in os.getloadavg()]},
              "export_seconds": round(export_seconds, 1)}
    if llm is not dense:
        del llm
    if not args.keep_gguf and name != "dense":
        path.unlink()
    return result


def run_row(name: str, spec: dict, ctx: Context, args) -> dict:
    started = time.perf_counter()
    model, plan, seconds, details = build(name, spec, ctx, args)
    row = {"row": name, "label": spec["label"], **details}
    if model is None:
        print(f"{name}: not built ({details.get('unreachable')})", flush=True)
        return {**row, "seconds": {**seconds, "total": round(time.perf_counter() - started, 1)}}
    if spec["recover"] and args.recover_tokens:
        start = time.perf_counter()
        model, row["recovery"] = recover_row(name, model, plan, ctx, args)
        seconds["recover"] = round(time.perf_counter() - start, 1)
    model.eval()
    stats = model_stats(model)
    row.update(params=stats.total_params, params_removed_share=1 - stats.total_params / ctx.dense_params,
               kv_bytes_per_token=stats.kv_cache_bytes_per_token,
               kv_removed_share=1 - stats.kv_cache_bytes_per_token / ctx.dense_kv,
               layers=len(get_adapter(model).decoder_layers(model)),
               shapes=sorted(set(plan.pruned_shapes())) if plan else None)
    start = time.perf_counter()
    ppl = perplexity(model, ctx.tok, "", seq_len=SEQ_LEN, batch_size=8, progress=False, ids=ctx.ids,
                     max_tokens=args.max_tokens)
    row["ppl"] = {k: ppl[k] for k in ("perplexity", "windows", "tokens", "window_start_token") if k in ppl}
    seconds["perplexity"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    windows = windows_of(ctx.ids[:args.kl_tokens], SEQ_LEN, window_start_token(ctx.dense, ctx.tok), None)
    row["kl"] = {"kl": 0.0, "tokens": windows.shape[0] * (SEQ_LEN - 1)} if model is ctx.dense else \
        heldout_kl(ctx.dense, model, windows)
    seconds["kl"] = round(time.perf_counter() - start, 1)
    print(f"{name}: params {row['params']:,} (-{row['params_removed_share']:.1%}), KV {row['kv_bytes_per_token']:,} "
          f"B/token, ppl {ppl['perplexity']:.3f}, KL {row['kl']['kl']:.4f}", flush=True)
    if args.tasks:
        start = time.perf_counter()
        z = zero_shot(model, ctx.tok, args.tasks, data_dir=args.data_dir, limit=args.limit, batch_size=8)
        row["zero_shot"] = {"mean_acc": z.get("mean_acc"), "lm_eval": z["lm_eval_version"],
                            "tasks": {t: {"acc": v["acc"], "acc_norm": v["acc_norm"], "samples": v["samples"]}
                                      for t, v in z["tasks"].items()}}
        seconds["zero_shot"] = round(time.perf_counter() - start, 1)
    if not args.no_llamacpp:
        start = time.perf_counter()
        row["llamacpp"] = serve(model, name, ctx, args)
        seconds["llamacpp"] = round(time.perf_counter() - start, 1)
    seconds["total"] = round(time.perf_counter() - started, 1)
    row["seconds"] = seconds
    return row


def _f(value, spec: str = ".2f", empty: str = "") -> str:
    return empty if value is None else format(value, spec)


def _intro(summary: dict) -> list[str]:
    s = summary["settings"]
    scored = summary.get("scored") or {}
    lr = f", lr {s['lr']:g}" if s.get("lr") is not None else ""
    recovery = (f"{s['recover_tokens']:,} tokens of KD from the dense model on C4 (kd ratio {s['kd_ratio']:g}{lr}) for "
                f"the search and AMP rows at {pct(RECOVERED_AT)}%" if s["recover_tokens"] else "none")
    search = (f"Search: the library scored once on {scored['scoring_tokens']:,} C4 tokens "
              f"({scored['scoring_samples']} samples), {scored['variants_scored']} variants, in "
              f"{scored['search_seconds']:,.1f} s = {scored['search_forwards']:,.1f} forward passes of the dense model "
              f"over the {scored['calibration_tokens']:,} calibration tokens "
              f"({scored['calibration_forward_seconds']:.2f} s each); the statistics pass the "
              f"search and the width methods share took {_f(scored.get('statistics_seconds'), '.1f', '?')} s. "
              "Every search row is chosen from those scores (its own time: the choice, then the surgery). "
              if scored else "")
    commands = list(dict.fromkeys(r["header"]["command"] for r in summary["rows"]))
    made = [f"The rows were measured by {len(commands)} commands (the first row's above, with its machine; each "
            "row's own in its JSON): " + "; ".join(f"`{c}`" for c in commands) + ".", ""] if len(commands) > 1 else []
    return [f"# The architecture search against the fixed-structure methods: {s['model']}", "",
            header_markdown(summary["header"]), *made,
            f"Load average when the summary was written: {', '.join(f'{x:.2f}' for x in summary['load_average_end'])}"
            " (each row's own, at its start and end, in the last table).", "",
            f"Perplexity: WikiText-2 test, first {s['max_tokens']:,} tokens, windows of {SEQ_LEN}. KL: mean "
            f"KL(dense || row) per position on the first {s['kl_tokens']:,} tokens of the same windows (held out: "
            "the search scores on C4). "
            + (f"Zero-shot: lm-eval, local llm-foundry files, {s['limit']} items per task ({', '.join(s['tasks'])}); "
               f"mean acc (standard error up to {50 / math.sqrt(5 * s['limit']):.0f} points). " if s["tasks"]
               else "Zero-shot: not run. ")
            + f"Calibration: {s['calib_samples']} x {s['calib_length']} tokens of `{s['calib']}` (HARP's alpha "
            f"search: the first {s['harp_calib_samples']}). " + search + f"Recovery: {recovery}. "
            + ("llama.cpp: not run." if s["llamacpp"] is None else
               f"llama.cpp: the f32 GGUF export, {s['threads']} thread(s), decode = {DECODE} greedy tokens after a "
               f"{PROMPT}-token prompt, {s['repeats']} paired rounds (dense then row), medians; x dense is the "
               "median of the per-round ratios."), "",
            "KV bytes per token are in the model's dtype (float32); a value-path or removed attention holds none."]


def markdown(summary: dict) -> str:
    rows, s = summary["rows"], summary["settings"]
    dense = next((r for r in rows if r["row"] == "dense" and "ppl" in r), None)
    task_heads = "".join(f" {t} |" for t in s["tasks"])
    lines = _intro(summary) + [
        "", "| row | params | removed | KV B/token | KV removed | ppl seq 128 | x dense | KL | decode tok/s | x dense "
        "| zero-shot mean |" + task_heads,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(s["tasks"])]
    notes = []
    for r in rows:
        if "ppl" not in r:
            notes.append(f"{r['label']}: cannot be built. {r['unreachable']} (HARP replaces attention only; its "
                         f"most, the value path in every layer but the first, removes {r['max_share']:.1%}.)")
            lines.append(f"| {r['label']} | cannot | | | | | | | | | |" + " |" * len(s["tasks"]))
            continue
        ppl = r["ppl"]["perplexity"]
        cpp = r.get("llamacpp") or {}
        if cpp and not cpp.get("exported"):
            notes.append(f"{r['label']}: no GGUF export ({cpp['reason']}).")
        if r["row"] == "dense" and cpp.get("exported"):
            notes.append(f"dense: its export against itself in the same paired rounds decodes at a median ratio of "
                         f"{cpp['speedup']:.2f} (range {cpp['speedup_range'][0]:.2f}-{cpp['speedup_range'][1]:.2f}): "
                         "the noise of a speed-up measured here.")
            cpp = {**cpp, "speedup": 1.0}
        z = r.get("zero_shot") or {}
        tasks = "".join(f" {_f(100 * z['tasks'][t]['acc'], '.1f') if t in z.get('tasks', {}) else ''} |"
                        for t in s["tasks"])
        lines.append(f"| {r['label']} | {r['params']:,} | {100 * r['params_removed_share']:.1f}% | "
                     f"{r['kv_bytes_per_token']:,} | {100 * r['kv_removed_share']:.1f}% | {ppl:.2f} | "
                     f"{_f(ppl / dense['ppl']['perplexity'] if dense else None)} | {r['kl']['kl']:.4f} | "
                     f"{_f(cpp.get('decode_tokens_per_s'), '.1f')} | {_f(cpp.get('speedup'))} | "
                     f"{_f(100 * z['mean_acc'] if z.get('mean_acc') is not None else None, '.1f')} |{tasks}")
        if r.get("layers_removed"):
            notes.append(f"{r['label']}: {r['layers_removed']} layers removed, {r['params_removed_share']:.2%} of the "
                         "parameters.")
        if r.get("recovery"):
            rec = r["recovery"]
            notes.append(f"{r['label']}: recovered on {rec['tokens']['trained']:,} tokens; validation KL "
                         f"{rec['before']['kl']:.4f} -> {rec['after']['kl']:.4f}, "
                         f"{rec['training_tokens_per_second']:,.0f} training tokens/s.")
    missing = [summary["labels"][n] for n in summary["missing"]]
    lines += [""] + [f"* {n}" for n in notes] + (["", "Not measured in this run: " + "; ".join(missing) + "."]
                                                   if missing else [])
    lines += ["", "## The architectures the search chose", "",
              "Per decoder layer `attention/MLP`: A dense attention, kN N KV groups kept, V HARP's value path; M dense "
              "MLP, a number the neurons kept; - removed.", "",
              "| row | budget: removes | the choice costs | architecture |", "| --- | --- | --- | --- |"]
    for r in rows:
        if "architecture" in r:
            costs = r["choice_costs"]
            chosen = {"params": f"{costs['params']:,.0f} parameters", "kv": f"{costs['kv']:,.0f} KV B/token",
                      "decode": f"{1e3 * costs['decode']:.3f} ms/token in transformers (dense "
                                f"{1e3 * (r.get('dense_decode_seconds') or 0):.3f}: "
                                f"{(r.get('dense_decode_seconds') or 0) / costs['decode']:.2f}x)"
                      if costs["decode"] else ""}[r["budget"]]
            lines.append(f"| {r['label']} | {r['budget']}: {r['budget_ratio']:.1%} | {chosen} | "
                         f"`{r['architecture']}` |")
    pictures = summary.get("pictures") or {}
    lines += [""] * bool(pictures) + [f"![{r['label']}]({pictures[r['row']]})" for r in rows if r["row"] in pictures]
    checked = [r for r in rows if r.get("candidates")]
    lines += [""] * bool(checked) + [
        f"* {r['label']}: the candidates' KL on calibration tokens the scores did not see: "
        + ", ".join(f"{c['name']} {c['kl']:.4f}" for c in r["candidates"])
        + f"; kept: {next(c['name'] for c in r['candidates'] if c['picked'])}." for r in checked]
    two = [r for r in rows if r.get("rounds") == 2]
    lines += [""] * bool(two) + [f"* {r['label']}: its search (both rounds) and surgery took "
                                 f"{r['search_and_surgery_seconds']:,.1f} s = {r['search_and_surgery_forwards']:,.1f} "
                                 f"calibration forwards of {r['calibration_forward_seconds']:.2f} s." for r in two]
    lines += ["", "## Wall time per row (seconds) and the load around it", "",
              "| row | " + " | ".join(summary["phases"]) + " | load at start | load at end |",
              "| --- | " + " | ".join("---:" for _ in summary["phases"]) + " | ---: | ---: |"]
    for r in rows:
        load = ", ".join(f"{x:.2f}" for x in r["header"]["machine"]["load_average"])
        end = ", ".join(f"{x:.2f}" for x in r["load_average_end"])
        lines.append(f"| {r['label']} | " + " | ".join(_f(r["seconds"].get(p), ".1f") for p in summary["phases"])
                     + f" | {load} | {end} |")
    return "\n".join(lines) + "\n"


def rows_dir(args) -> Path:
    return Path(args.out) / f"search{args.tag}_rows"


def render(args, specs: dict, header: dict) -> dict:
    """The summary from the rows on disk that match this run's settings."""
    rows, missing = [], []
    for name, spec in specs.items():
        saved = rows_dir(args) / f"{name}.json"
        data = json.loads(saved.read_text()) if saved.is_file() else None
        if data and data["settings"] == row_settings(name, spec, args):
            rows.append({**data["result"], "header": data["header"], "load_average_end": data["load_average_end"]})
        else:
            missing.append(name)
    phases = [p for p in ("choose", "surgery", "prune", "recover", "perplexity", "kl", "zero_shot", "llamacpp",
                          "total") if any(p in r["seconds"] for r in rows)]
    scored_file = rows_dir(args) / "scored.json"
    saved = json.loads(scored_file.read_text()) if scored_file.is_file() else None
    shapes = saved["plan"]["base"]["layer_shapes"] if saved else None
    scored = {k: v for k, v in saved.items() if k not in ("plan", "header")} \
        if saved and saved["settings"] == scoring_settings(args) else None
    settings = {k: v for k, v in row_settings("dense", specs["dense"], args).items()
                if k not in ("row", "spec", "recover_tokens")}
    settings.update(recover_tokens=args.recover_tokens, kd_ratio=args.kd_ratio, lr=args.lr, threads=args.threads,
                    repeats=args.repeats, harp_calib_samples=args.harp_calib_samples,
                    scoring_tokens=args.scoring_tokens, ratios=args.ratios, kv_ratio=args.kv_ratio,
                    speedup=args.speedup, eval_text=os.path.relpath(args.eval_text, ROOT))
    summary = {"header": rows[0]["header"] if rows else header, "settings": settings, "scored": scored,
               "load_average_end": [round(x, 2) for x in os.getloadavg()],
               "llama_cpp_python": importlib.metadata.version("llama-cpp-python"), "rows": rows, "missing": missing,
               "labels": {n: s["label"] for n, s in specs.items()}, "phases": phases,
               "pictures": draw_architectures(args, rows, shapes)}
    out = Path(args.out)
    write_file(out / f"search{args.tag}.json", json.dumps(summary, indent=1, default=str) + "\n")
    write_file(out / f"search{args.tag}.md", markdown(summary))
    return summary


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model alias or folder (default: smollm2)")
    p.add_argument("--rows", default="", help="comma list of rows to run (default: all; names as in the rows folder)")
    p.add_argument("--ratios", default="0.2,0.3", help="shares of all parameters removed (default: 0.2,0.3)")
    p.add_argument("--kv-ratio", type=float, default=0.5, help="share of the KV cache removed (default: 0.5)")
    p.add_argument("--speedup", type=float, default=1.3, help="decode speed-up the decode budget asks (default: 1.3)")
    p.add_argument("--max-tokens", type=int, default=65536, help="first N WikiText-2 tokens (default: 65536)")
    p.add_argument("--kl-tokens", type=int, default=16384,
                   help="first N WikiText-2 tokens of the held-out KL (default: 16384)")
    p.add_argument("--limit", type=int, default=200, help="zero-shot items per task (default: 200)")
    p.add_argument("--tasks", default=",".join(STANDARD_TASKS), help="zero-shot tasks (empty: none)")
    p.add_argument("--data-dir", default=str(TASKS))
    p.add_argument("--eval-text", default=str(WIKI))
    p.add_argument("--calib", default=str(C4))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-length", type=int, default=128)
    p.add_argument("--scoring-tokens", type=int, default=512,
                   help="calibration tokens the search scores its variants on (default: 512, the search's own)")
    p.add_argument("--search-reconstruct", default="sequential", choices=("sequential", "dense", "none"),
                   help="the re-fit a search row's chosen plan is applied with (default: sequential, the method's)")
    p.add_argument("--harp-calib-samples", type=int, default=8, help="HARP's alpha search samples (default: 8)")
    p.add_argument("--recover-tokens", type=int, default=0,
                   help=f"KD recovery of the search and AMP rows at {pct(RECOVERED_AT)}%% (default: 0, none)")
    p.add_argument("--kd-ratio", type=float, default=1.0, help="recovery's KL share of the loss (default: 1.0)")
    p.add_argument("--lr", type=float, default=None, help="recovery's learning rate (default: recover's own)")
    p.add_argument("--save-every", type=int, default=20,
                   help="recovery checkpoint every N steps in --work, resumed by a rerun (default: 20)")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default: 1)")
    p.add_argument("--repeats", type=int, default=5, help="llama.cpp paired decode rounds (default: 5)")
    p.add_argument("--no-llamacpp", action="store_true", help="skip the GGUF export and llama.cpp")
    p.add_argument("--keep-gguf", action="store_true", help="keep the GGUF files in --work")
    p.add_argument("--work", default=str(ROOT / "runs" / "search"), help="GGUF files and recovery checkpoints")
    p.add_argument("--out", default=str(RESULTS), help="results folder (rows in OUT/search{tag}_rows/)")
    p.add_argument("--tag", default="", help="suffix of the result names: search{tag}.json/md and search{tag}_rows/")
    p.add_argument("--render", action="store_true", help="only rebuild the summary from the saved rows")
    args = p.parse_args()
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.tasks = [t for t in args.tasks.split(",") if t]
    if not args.ratios or not all(0 < r < 1 for r in args.ratios + [args.kv_ratio]) or args.speedup <= 1:
        p.error("--ratios and --kv-ratio take shares in (0, 1), --speedup a number above 1")
    return p, args


def main() -> None:
    p, args = parse_args()
    specs = row_specs(args)
    chosen = [r for r in args.rows.split(",") if r] or list(specs)
    unknown = sorted(set(chosen) - set(specs))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(specs)}")
    header = result_header()
    header["llama_cpp_python"] = importlib.metadata.version("llama-cpp-python")
    ctx = None
    for name in [] if args.render else chosen:
        settings, saved = row_settings(name, specs[name], args), rows_dir(args) / f"{name}.json"
        if saved.is_file() and json.loads(saved.read_text())["settings"] == settings:
            print(f"{name}: saved with these settings, skipped", flush=True)
            continue
        ctx = ctx or Context(args)
        row_header = {**result_header(), "llama_cpp_python": header["llama_cpp_python"]}
        result = run_row(name, specs[name], ctx, args)
        write_file(saved, json.dumps({"settings": settings, "header": row_header, "result": result,
                                      "load_average_end": [round(x, 2) for x in os.getloadavg()]},
                                     indent=1, default=str) + "\n")
        render(args, specs, header)
    print(markdown(render(args, specs, header)))


if __name__ == "__main__":
    main()
