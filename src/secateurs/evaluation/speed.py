"""Speed and memory of a (pruned) model beside its dense parent, measured in one run.

For every batch size B and prompt length L:

* prefill: one forward pass over B x L tokens that fills the KV cache and produces the logits of
  the last position (what `generate` does); tokens/s = B*L / time. Time to first token (TTFT) is
  that pass plus the greedy pick of the first token.
* decode: `decode_tokens` single-token steps with the KV cache (greedy); tokens/s = B*N / time.
* peak memory: the model's weight bytes plus the working memory of the measurement (activations,
  KV cache, logits): CUDA peak allocated bytes, or on Linux CPU the growth of the process's resident
  high-water mark (reset before each measurement through /proc/self/clear_refs). On CPU the
  allocator may reuse memory freed by earlier runs, so the working figure is a lower bound.

Models are measured in paired rounds, shape by shape: after warm-up, each round measures the
baseline, then every other model (A B A B ...), so machine noise hits both alike, and each speed
ratio is the median of the per-round ratios (pruned / dense of the same round). Rounds repeat
until the relative spread of those paired ratios, interquartile range / median, is at most
`max_spread` (default 10%), or until `time_limit` seconds pass for the shape; `repeats` is the
minimum number of rounds (and at least MIN_PAIRS are needed to judge a spread). A ratio whose
spread is still above the threshold, or above MAX_REPORTED_SPREAD (25%) whatever the threshold,
is not reported: it is null, with `"reliable": false`, its spread and a reason ("machine busy:
load L on N cores"). Each model's absolute figure is the median over all its rounds, with min,
max and relative spread ((max - min) / median). The ideal ratios come from the shapes
(`secateurs.planning.accounting`): prefill from FLOPs (lm_head on the last position only), decode from
bytes read per step (weights + KV cache), so the gap to the limit shows.

The measuring loop reads its time from `clock` (a parameter, else the module-level `clock`,
time.perf_counter), so the stopping rule can be tested with a fake clock and fake measurements.
"""

from __future__ import annotations

import datetime
import inspect
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from secateurs.errors import SecateursError
from secateurs.planning.accounting import model_stats
from secateurs.runtime import threads
from secateurs.runtime.progress import bar as progress_bar
from secateurs.settings.names import DEFAULT_MAX_SPREAD  # one default for bench and demo

MAX_REPORTED_SPREAD = 0.25  # a ratio whose paired spread exceeds this is never printed, whatever the threshold
DEFAULT_TIME_LIMIT = 60.0  # seconds per shape (`secateurs bench`; the demo gives itself less)
MIN_PAIRS = 3  # paired rounds needed before a spread is judged at all
MAX_ROUNDS = 1000  # rounds per shape at most, whatever the time limit (the per-round figures are kept)

BASELINE_RATIO = {"speedup": 1.0, "reliable": True, "spread": 0.0, "reason": None}  # the baseline against itself
clock: Callable[[], float] = time.perf_counter  # what the measuring loop reads; replaceable in tests


@dataclass
class BenchConfig:
    """batch_sizes x prompt_lengths are the shapes; repeats is the minimum number of paired rounds
    per shape; rounds go on until the paired ratios' spread (IQR / median) is at most max_spread
    or time_limit seconds pass for the shape (max_rounds at most)."""

    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_lengths: tuple[int, ...] = (128, 512)
    decode_tokens: int = 32
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    max_spread: float = DEFAULT_MAX_SPREAD
    time_limit: float = DEFAULT_TIME_LIMIT
    max_rounds: int = MAX_ROUNDS

    def validate(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise SecateursError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise SecateursError(f"prompt lengths must be >= 1, got {self.prompt_lengths}")
        if self.decode_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise SecateursError("decode tokens and repeats must be >= 1, warmup >= 0")
        if not 0 < self.max_spread <= MAX_REPORTED_SPREAD:
            raise SecateursError(f"the spread threshold must be in (0, {MAX_REPORTED_SPREAD:g}], got "
                                 f"{self.max_spread}: a ratio more spread than {MAX_REPORTED_SPREAD:.0%} is never "
                                 "reported")
        if not (self.time_limit > 0 and math.isfinite(self.time_limit)):
            raise SecateursError(f"the time limit must be a positive number of seconds, got {self.time_limit}")
        if self.max_rounds < 1:
            raise SecateursError(f"max_rounds must be >= 1, got {self.max_rounds}")


def summarise(values: list[float]) -> dict:
    """Median, min, max and relative spread ((max - min) / median) of repeated measurements."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "n": len(values)}


def paired_spread(ratios: list[float]) -> tuple[float, float | None]:
    """(median, relative spread = interquartile range / median) of per-round ratios; the spread is
    None with fewer than MIN_PAIRS rounds, where it cannot be judged."""
    med = statistics.median(ratios)
    if len(ratios) < MIN_PAIRS:
        return med, None
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return med, ((q3 - q1) / med if med > 0 else math.inf)


def pair_ratios(runs: dict[str, list[dict]], baseline: str, label: str) -> dict[str, list[float]]:
    """Per round, the model's speed over the baseline's (baseline seconds / model seconds) for
    prefill and decode: the ratio of tokens/s, since both process the same tokens."""
    pairs = list(zip(runs[baseline], runs[label]))
    return {"prefill": [b["prefill_s"] / m["prefill_s"] for b, m in pairs],
            "decode": [b["decode_s"] / m["decode_s"] for b, m in pairs]}


def machine_load() -> tuple[float | None, int | None]:
    """(1-minute load average, CPU cores) now; None where the platform does not tell."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return load, os.cpu_count()


def busy_reason(load: float | None, cores: int | None) -> str:
    """Why a ratio is not reported: the load when its rounds ended."""
    return (f"machine busy: load {load:.1f} on {cores} cores" if load is not None
            else f"machine busy: the paired ratios stayed spread ({cores} cores)")


def run_rounds(measure: Callable[[str], dict], labels: list[str], config: BenchConfig,
               clock: Callable[[], float] | None = None, on_round: Callable[[int, float | None], None] | None = None
               ) -> dict:
    """Measure one shape: `config.warmup` unmeasured rounds, then paired rounds (each measures every
    label once, the baseline labels[0] first) until, after at least `config.repeats` rounds, every
    paired ratio's spread is at most `config.max_spread` ("spread"), `config.time_limit` seconds have
    passed since the first measured round ("time limit"), or `config.max_rounds` rounds were done
    ("round cap"). With one label there is nothing to pair: `repeats` rounds ("minimum rounds").
    measure(label) -> {"prefill_s", "ttft_s", "decode_s", "peak_extra_bytes"}; `clock` (default:
    this module's `clock`) is read at the first measured round and after each round.
    Returns {"runs": label -> measurements, "rounds", "seconds", "stopped_by", "load", "cores"}."""
    clock = clock or globals()["clock"]
    for _ in range(config.warmup):
        for label in labels:
            measure(label)
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    cap = max(config.max_rounds, config.repeats)
    start = clock()
    while True:
        for label in labels:
            runs[label].append(measure(label))
        rounds = len(runs[labels[0]])
        spreads = [paired_spread(ratios)[1] for label in labels[1:]
                   for ratios in pair_ratios(runs, labels[0], label).values()]
        elapsed = clock() - start
        worst = None if not spreads or None in spreads else max(spreads)
        if on_round:
            on_round(rounds, worst)
        if rounds < config.repeats:
            continue
        if not spreads:
            stopped = "minimum rounds"
        elif worst is not None and worst <= config.max_spread:
            stopped = "spread"
        elif elapsed >= config.time_limit:
            stopped = "time limit"
        elif rounds >= cap:
            stopped = "round cap"
        else:
            continue
        load, cores = machine_load()
        return {"runs": runs, "rounds": rounds, "seconds": elapsed, "stopped_by": stopped, "load": load,
                "cores": cores}


def ratio_entry(ratios: list[float], config: BenchConfig, reason: str) -> dict:
    """One measured speed ratio: the median of the per-round ratios when their spread is at most the
    threshold (and MAX_REPORTED_SPREAD), else null with "reliable": false and why."""
    med, spread = paired_spread(ratios)
    reliable = spread is not None and spread <= min(config.max_spread, MAX_REPORTED_SPREAD)
    if spread is None:
        reason = (f"{len(ratios)} paired round{'s' if len(ratios) != 1 else ''} within the time limit, too few "
                  f"to judge the spread (at least {MIN_PAIRS})")
    return {"speedup": med if reliable else None, "reliable": reliable, "spread": spread,
            "reason": None if reliable else reason}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(key: str) -> int | None:
    try:
        m = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


class PeakMemory:
    """Working memory of a block (bytes above what was in use when it started: activations, KV
    cache, logits): CUDA allocator peak, or the Linux resident high-water mark, which is reset on
    entry through /proc/self/clear_refs. None where neither is available."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start: int | None = None
        self.extra: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.start = _rss_kib("VmRSS")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_kib("VmHWM") if self.start is not None else None
        if peak is not None and self.start is not None:
            self.extra = max(0, peak - self.start)
        return False


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def measure_once(model, batch: int, length: int, decode_tokens: int, seed: int = 0) -> dict:
    """One prefill + greedy decode; seconds and peak memory."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed + 1000 * batch + length)
    ids = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    with PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, **extra)
        _sync(device)
        t1 = time.perf_counter()
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t2 = time.perf_counter()
        cache = out.past_key_values
        for _ in range(decode_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t3 = time.perf_counter()
    return {"prefill_s": t1 - t0, "ttft_s": t2 - t0, "decode_s": t3 - t2, "peak_extra_bytes": mem.extra}


def ideal_costs(stats, batch: int, length: int, decode_tokens: int) -> dict:
    """Work the shapes imply: prefill FLOPs (logits of the last position only) and, per decode
    step at the mean context, FLOPs and bytes read (weights + KV cache of the batch)."""
    prefill = batch * (stats.prefill_flops(length) - (length - 1) * stats.lm_head_flops_per_token)
    context = length + decode_tokens // 2
    return {"prefill_flops": prefill,
            "decode_flops_per_step": batch * stats.decode_flops_per_token(context),
            "decode_bytes_per_step": stats.weight_bytes + batch * context * stats.kv_cache_bytes_per_token}


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Where a measurement was taken: CPU model, cores, threads, load, versions, GPU."""

    cpu = platform.processor()
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "threads": threads.describe(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def bench_models(models: dict, config: BenchConfig | None = None, progress: bool = True, *,
                 clock: Callable[[], float] | None = None, measure: Callable | None = None) -> dict:
    """Benchmark several models (label -> model) in paired rounds, shape by shape (see the module
    docstring). The first label is the baseline that ratios are taken against (speedup = baseline
    time / model time, per round). `clock` (default: this module's `clock`) times the rounds;
    `measure` (default: measure_once) takes (model, batch, length, decode_tokens, seed)."""

    config = config or BenchConfig()
    config.validate()
    measure = measure or measure_once
    labels = list(models)
    devices = {str(next(m.parameters()).device) for m in models.values()}
    if len(devices) != 1:
        raise SecateursError(f"models are on different devices {sorted(devices)}; put them on one")
    device = torch.device(devices.pop())
    for label, model in models.items():
        limit = getattr(model.config, "max_position_embeddings", None)
        need = max(config.prompt_lengths) + config.decode_tokens
        if limit is not None and need > limit:
            raise SecateursError(f"{label}: prompt length + decode tokens = {need} exceeds the context of {limit}")
    stats = {label: model_stats(m) for label, m in models.items()}
    shapes = [(b, n) for b in config.batch_sizes for n in config.prompt_lengths]
    bar = progress_bar(total=None, desc="bench", unit="round", disable=not progress)
    rows = []
    for b, n in shapes:
        def one(label, b=b, n=n):
            return measure(models[label], b, n, config.decode_tokens, config.seed)

        def shown(rounds, spread, b=b, n=n):
            bar.update()
            bar.set_postfix_str(f"batch {b}, prompt {n}: {rounds} rounds"
                                + (f", spread {100 * spread:.0f}%" if spread is not None else ""), refresh=False)

        shape = run_rounds(one, labels, config, clock=clock, on_round=shown)
        rows += _shape_rows(shape, b, n, labels, stats, config)
    bar.close()
    return {
        "config": asdict(config), "device": str(device), "baseline": labels[0], "machine": machine_info(device),
        "reliable": all(r["vs_baseline"]["reliable"] for r in rows),
        "models": {label: {"params": stats[label].total_params, "weight_bytes": stats[label].weight_bytes,
                           "dtype": str(next(models[label].parameters()).dtype).replace("torch.", ""),
                           "num_layers": len(stats[label].layers)} for label in labels},
        "results": rows,
    }


def _shape_rows(shape: dict, b: int, n: int, labels: list[str], stats: dict, config: BenchConfig) -> list[dict]:
    """One row per model for one shape: the measured rates summarised over the rounds, the peak
    memory, the ideal costs, and the speed ratios over the baseline from the paired rounds."""
    runs, base, decode_tokens = shape["runs"], labels[0], config.decode_tokens
    reason = busy_reason(shape["load"], shape["cores"])
    rows = []
    for label in labels:
        measured = runs[label]
        extras = [r["peak_extra_bytes"] for r in measured if r["peak_extra_bytes"] is not None]
        extra = max(extras) if extras else None
        rows.append({"model": label, "batch": b, "prompt_length": n, "decode_tokens": decode_tokens,
                     "prefill_tokens_per_s": summarise([b * n / r["prefill_s"] for r in measured]),
                     "decode_tokens_per_s": summarise([b * decode_tokens / r["decode_s"] for r in measured]),
                     "ttft_s": summarise([r["ttft_s"] for r in measured]),
                     "peak_extra_bytes": extra,
                     "peak_memory_bytes": stats[label].weight_bytes + extra if extra is not None else None,
                     "ideal": ideal_costs(stats[label], b, n, decode_tokens)})
    ref = rows[0]
    for row in rows:
        if row["model"] == base:
            entries = {m: dict(BASELINE_RATIO) for m in ("prefill", "decode")}
            pairs = None
        else:
            pairs = pair_ratios(runs, base, row["model"])
            entries = {m: ratio_entry(pairs[m], config, reason) for m in ("prefill", "decode")}
        row["vs_baseline"] = {
            "prefill_speedup": entries["prefill"]["speedup"], "decode_speedup": entries["decode"]["speedup"],
            "ideal_prefill_speedup": ref["ideal"]["prefill_flops"] / row["ideal"]["prefill_flops"],
            "ideal_decode_speedup_bytes": ref["ideal"]["decode_bytes_per_step"] / row["ideal"]["decode_bytes_per_step"],
            "ideal_decode_speedup_flops": ref["ideal"]["decode_flops_per_step"] / row["ideal"]["decode_flops_per_step"],
            **entries, "reliable": all(e["reliable"] for e in entries.values()),
            "rounds": shape["rounds"], "seconds": round(shape["seconds"], 3), "stopped_by": shape["stopped_by"],
            **({"pairs": {m: [round(x, 6) for x in v] for m, v in pairs.items()}} if pairs is not None else {}),
        }
    return rows


def ratio_of(bench: dict, row: dict, metric: str) -> dict:
    """The speed ratio of a result row ('prefill' or 'decode') as it may be shown: {"speedup",
    "reliable", "spread", "reason"}; the speedup is None unless reliable with a spread of at most
    MAX_REPORTED_SPREAD. Files written before paired rounds (no per-metric entry) judge the ratio
    of medians by the spread of both medians ((max - min) / median)."""
    vs = row["vs_baseline"]
    entry = vs.get(metric)
    if isinstance(entry, dict) and "reliable" in entry:
        spread = entry.get("spread")
        if entry.get("reliable") and entry.get("speedup") is not None and spread is not None \
                and spread <= MAX_REPORTED_SPREAD:
            return entry
        reason = entry.get("reason") or (f"spread ±{100 * spread:.0f}%, above {MAX_REPORTED_SPREAD:.0%}"
                                         if spread is not None else "not recorded")
        return {**entry, "speedup": None, "reliable": False, "reason": reason}
    baseline = bench.get("baseline") if isinstance(bench.get("baseline"), str) else bench["results"][0]["model"]
    if row["model"] == baseline:
        return dict(BASELINE_RATIO)
    speedup = vs.get(f"{metric}_speedup")
    key = f"{metric}_tokens_per_s"
    ref = next((r for r in bench["results"] if r["model"] == baseline and r["batch"] == row["batch"]
                and r["prompt_length"] == row["prompt_length"]), None)
    if speedup is None or ref is None:
        return {"speedup": None, "reliable": False, "spread": None, "reason": "no baseline measurement"}
    spread = max(row[key]["spread"], ref[key]["spread"])
    if spread > MAX_REPORTED_SPREAD:
        return {"speedup": None, "reliable": False, "spread": spread,
                "reason": f"medians spread ±{100 * spread:.0f}%, measured without paired rounds"}
    return {"speedup": speedup, "reliable": True, "spread": spread, "reason": None}


def ratio_text(entry: dict, ideal: float | None = None, prefix: str = "") -> str:
    """A ratio for a table: "1.21 ±4% (1.33)", or "not measured reliably (machine busy: load 3.2 on
    2 cores)" in its place; the ideal in brackets either way."""
    if entry["speedup"] is None:
        text = f"not measured reliably ({entry['reason']})"
        return text + (f" (ideal {prefix}{ideal:.2f})" if ideal is not None else "")
    spread = f" ±{100 * entry['spread']:.0f}%" if entry.get("spread") else ""
    return f"{prefix}{entry['speedup']:.2f}{spread}" + (f" ({prefix}{ideal:.2f})" if ideal is not None else "")


def folder_bytes(path: str | Path) -> int | None:
    """Bytes of the weight files of a saved model folder (None if not a folder)."""
    path = Path(path)
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))


def bench_intro(result: dict) -> str:
    """The line that says how a bench result was measured (old files: without paired rounds)."""
    cfg, machine = result["config"], result["machine"]
    where = (f"Device {result['device']} ({machine.get('cpu')}, {machine.get('torch_threads')} threads, load "
             f"{machine.get('load_average')}); {cfg['decode_tokens']} decode tokens.")
    if "max_spread" not in cfg:
        return (f"{where} Median of {cfg['repeats']} repeats after {cfg['warmup']} warm-up; spread = (max - min) / "
                "median; ratios are ratios of medians, shown only where both spreads are at most "
                f"{MAX_REPORTED_SPREAD:.0%}.")
    if len(result["models"]) < 2:
        return (f"{where} Median of {cfg['repeats']} rounds after {cfg['warmup']} warm-up; spread = (max - min) / "
                "median (no baseline: no ratios).")
    return (f"{where} Baseline and model measured in alternating rounds, shape by shape, after {cfg['warmup']} "
            f"warm-up: at least {max(cfg['repeats'], MIN_PAIRS)} rounds, then until the per-round ratios' spread "
            f"(interquartile range / median) is at most {100 * cfg['max_spread']:.0f}% or {cfg['time_limit']:g} s "
            "pass. Ratios "
            "(x) are the medians of the per-round ratios, ± their spread; tok/s are medians over the rounds, "
            "spread = (max - min) / median. A ratio still more spread is not reported.")


def bench_markdown(result: dict) -> str:
    """Human-readable tables of a bench_models result."""
    lines = [bench_intro(result), "",
             "| model | params | weights (MiB) |", "| --- | ---: | ---: |"]
    for label, m in result["models"].items():
        disk = f" ({m['disk_bytes'] / 2**20:,.1f} on disk)" if m.get("disk_bytes") else ""
        lines.append(f"| {label} | {m['params']:,} | {m['weight_bytes'] / 2**20:,.1f}{disk} |")
    lines += ["", "| model | batch | prompt | rounds | prefill tok/s (spread) | decode tok/s (spread) | TTFT ms "
              "| peak MiB | prefill x (ideal) | decode x (ideal) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["results"]:
        v = r["vs_baseline"]
        peak = f"{r['peak_memory_bytes'] / 2**20:,.0f}" if r["peak_memory_bytes"] else "n/a"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['prompt_length']} | {r['prefill_tokens_per_s'].get('n', 'n/a')} "
            f"| {r['prefill_tokens_per_s']['median']:,.0f} ({100 * r['prefill_tokens_per_s']['spread']:.0f}%) "
            f"| {r['decode_tokens_per_s']['median']:,.1f} ({100 * r['decode_tokens_per_s']['spread']:.0f}%) "
            f"| {1000 * r['ttft_s']['median']:,.1f} | {peak} "
            f"| {ratio_text(ratio_of(result, r, 'prefill'), v['ideal_prefill_speedup'])} "
            f"| {ratio_text(ratio_of(result, r, 'decode'), v['ideal_decode_speedup_bytes'])} |")
    return "\n".join(lines) + "\n"


@torch.inference_mode()
def plain_forward_seconds(model, calibration) -> float:
    """Wall time of one plain forward pass (with LM head, no hooks) over calibration batches: the
    unit in which the benchmarks express the cost of scoring."""
    start = time.perf_counter()
    for b in calibration.batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    return time.perf_counter() - start
