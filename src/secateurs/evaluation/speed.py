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

Models are measured interleaved (dense, pruned, dense, ...) after warm-up, so machine noise hits
both alike; each figure is the median of `repeats`, with min, max and relative spread. The ideal
ratios come from the shapes (`secateurs.accounting`): prefill from FLOPs (lm_head on the last
position only), decode from bytes read per step (weights + KV cache), so the gap to the limit shows.
"""

from __future__ import annotations

import datetime
import inspect
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from secateurs.progress import bar as progress_bar

from secateurs.errors import SecateursError


@dataclass
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_lengths: tuple[int, ...] = (128, 512)
    decode_tokens: int = 32
    repeats: int = 5
    warmup: int = 1
    seed: int = 0

    def validate(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise SecateursError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise SecateursError(f"prompt lengths must be >= 1, got {self.prompt_lengths}")
        if self.decode_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise SecateursError("decode tokens and repeats must be >= 1, warmup >= 0")


def summarise(values: list[float]) -> dict:
    """Median, min, max and relative spread ((max - min) / median) of repeated measurements."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "n": len(values)}


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
    import transformers

    cpu = platform.processor()
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def bench_models(models: dict, config: BenchConfig | None = None, progress: bool = True) -> dict:
    """Benchmark several models (label -> model) interleaved. The first label is the baseline
    that ratios are taken against (speedup = baseline time / model time)."""
    from secateurs.accounting import model_stats

    config = config or BenchConfig()
    config.validate()
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
    raw = {label: {shape: [] for shape in shapes} for label in labels}
    total = (config.warmup + config.repeats) * len(shapes) * len(labels)
    bar = progress_bar(total=total, desc="bench", disable=not progress)
    for rep in range(config.warmup + config.repeats):
        for shape in shapes:
            for label in labels:
                r = measure_once(models[label], *shape, config.decode_tokens, config.seed)
                if rep >= config.warmup:
                    raw[label][shape].append(r)
                bar.update()
    bar.close()

    rows = _result_rows(raw, shapes, labels, stats, config.decode_tokens)
    base = labels[0]
    _add_baseline_ratios(rows, base)
    return {
        "config": asdict(config), "device": str(device), "baseline": base, "machine": machine_info(device),
        "models": {label: {"params": stats[label].total_params, "weight_bytes": stats[label].weight_bytes,
                           "dtype": str(next(models[label].parameters()).dtype).replace("torch.", ""),
                           "num_layers": len(stats[label].layers)} for label in labels},
        "results": rows,
    }


def _result_rows(raw: dict, shapes: list[tuple[int, int]], labels: list[str], stats: dict,
                 decode_tokens: int) -> list[dict]:
    """One row per (shape, model): the measured rates summarised over the repeats, the peak memory,
    and the ideal costs the ratios are judged against."""
    rows = []
    for b, n in shapes:
        for label in labels:
            runs = raw[label][(b, n)]
            prefill = summarise([b * n / r["prefill_s"] for r in runs])
            decode = summarise([b * decode_tokens / r["decode_s"] for r in runs])
            ttft = summarise([r["ttft_s"] for r in runs])
            extras = [r["peak_extra_bytes"] for r in runs if r["peak_extra_bytes"] is not None]
            extra = max(extras) if extras else None
            rows.append({"model": label, "batch": b, "prompt_length": n, "decode_tokens": decode_tokens,
                         "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "ttft_s": ttft,
                         "peak_extra_bytes": extra,
                         "peak_memory_bytes": stats[label].weight_bytes + extra if extra is not None else None,
                         "ideal": ideal_costs(stats[label], b, n, decode_tokens)})
    return rows


def _add_baseline_ratios(rows: list[dict], base: str) -> None:
    """Give every row its measured and ideal speedups over the baseline model's row of the same shape."""
    by_key = {(r["model"], r["batch"], r["prompt_length"]): r for r in rows}
    for r in rows:
        ref = by_key[(base, r["batch"], r["prompt_length"])]
        r["vs_baseline"] = {
            "prefill_speedup": r["prefill_tokens_per_s"]["median"] / ref["prefill_tokens_per_s"]["median"],
            "decode_speedup": r["decode_tokens_per_s"]["median"] / ref["decode_tokens_per_s"]["median"],
            "ideal_prefill_speedup": ref["ideal"]["prefill_flops"] / r["ideal"]["prefill_flops"],
            "ideal_decode_speedup_bytes": ref["ideal"]["decode_bytes_per_step"] / r["ideal"]["decode_bytes_per_step"],
            "ideal_decode_speedup_flops": ref["ideal"]["decode_flops_per_step"] / r["ideal"]["decode_flops_per_step"],
        }


def folder_bytes(path: str | Path) -> int | None:
    """Bytes of the weight files of a saved model folder (None if not a folder)."""
    path = Path(path)
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))


def bench_markdown(result: dict) -> str:
    """Human-readable tables of a bench_models result."""
    cfg = result["config"]
    lines = [f"Device {result['device']} ({result['machine'].get('cpu')}, {result['machine'].get('torch_threads')} "
             f"threads, load {result['machine'].get('load_average')}); median of {cfg['repeats']} repeats after "
             f"{cfg['warmup']} warm-up, {cfg['decode_tokens']} decode tokens; spread = (max - min) / median.",
             "",
             "| model | params | weights (MiB) |", "| --- | ---: | ---: |"]
    for label, m in result["models"].items():
        disk = f" ({m['disk_bytes'] / 2**20:,.1f} on disk)" if m.get("disk_bytes") else ""
        lines.append(f"| {label} | {m['params']:,} | {m['weight_bytes'] / 2**20:,.1f}{disk} |")
    lines += ["", "| model | batch | prompt | prefill tok/s (spread) | decode tok/s (spread) | TTFT ms | peak MiB "
              "| prefill x (ideal) | decode x (ideal) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["results"]:
        v = r["vs_baseline"]
        peak = f"{r['peak_memory_bytes'] / 2**20:,.0f}" if r["peak_memory_bytes"] else "n/a"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['prompt_length']} | {r['prefill_tokens_per_s']['median']:,.0f} "
            f"({100 * r['prefill_tokens_per_s']['spread']:.0f}%) | {r['decode_tokens_per_s']['median']:,.1f} "
            f"({100 * r['decode_tokens_per_s']['spread']:.0f}%) | {1000 * r['ttft_s']['median']:,.1f} | {peak} "
            f"| {v['prefill_speedup']:.2f} ({v['ideal_prefill_speedup']:.2f}) "
            f"| {v['decode_speedup']:.2f} ({v['ideal_decode_speedup_bytes']:.2f}) |")
    return "\n".join(lines) + "\n"


@torch.inference_mode()
def plain_forward_seconds(model, calibration) -> float:
    """Wall time of one plain forward pass (with LM head, no hooks) over calibration batches: the
    unit in which the benchmarks express the cost of scoring."""
    start = time.perf_counter()
    for b in calibration.batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    return time.perf_counter() - start
