"""The decode-cost table of the architecture search: seconds per decode token through one block variant,
measured once per model and machine and cached.

A variant's decode cost is the time one decode token spends in its block: an attention block keeping g
of the base's KV groups (each with all its query heads) with `context` tokens already in the KV cache,
an MLP of n neurons, HARP's value path (one hidden x hidden matmul), or nothing (a removed block).

How it is measured, in transformers as the model runs: the model's first decoder layer is copied and
sliced to a few widths (`fractions` of the base's KV groups and neurons, both at once, through
secateurs.surgery's own slicing), and for each copy the model runs with that one layer in place of its
layers (restored afterwards): a prefill of `context` random tokens, then `tokens` greedy decode steps
with the KV cache. Forward hooks on the copy's attention and MLP and on the LM head time every decode
step (CUDA synchronised). As in secateurs.evaluation.speed, the copies are measured in paired rounds
(all of them once per round, after `warmup` unmeasured rounds, `repeats` rounds), and a copy's time is
the full-width copy's median times the median of its per-round ratios to the full width, so machine
noise that hits a round hits both. A straight line in the width (least squares over the measured
widths) then gives the cost of every variant without timing each: attention seconds against KV
groups kept, MLP seconds against neurons kept, clipped at 0. The LM head's time (with the final norm
outside it, close to nothing) is the fixed cost every choice pays.

The table is cached under the cache folder (secateurs.files.cache) in decode_costs/KEY.json, KEY a hash
of the model's identity (secateurs.runtime.identity), the machine (CPU model, cores, torch threads,
GPU, torch and transformers versions, dtype) and the settings: another model, machine or setting
measures again; a cache file that cannot be read is measured again and replaced.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from secateurs.adapters import get_adapter
from secateurs.errors import SecateursError
from secateurs.evaluation.speed import machine_info, paired_spread
from secateurs.files.cache import root as cache_root
from secateurs.files.output import write_file
from secateurs.planning.plan import read_json_file
from secateurs.runtime.identity import model_identity
from secateurs.surgery.apply import replace_attention, slice_attention, slice_mlp

COSTS_FORMAT = "secateurs.decode_costs/1"
CACHE_FOLDER = "decode_costs"
CACHE_MAX_BYTES = 2**20  # a table is a few kilobytes
MACHINE_KEYS = ("platform", "cpu", "cpu_count", "torch_threads", "torch", "transformers", "gpu")


@dataclass(frozen=True)
class CostSettings:
    """context: tokens in the KV cache when a decode step is timed; fractions: widths timed, as fractions
    of the base's KV groups and neurons (at least two distinct widths fit the line); tokens: decode steps
    timed per copy and round; repeats: paired rounds; warmup: unmeasured rounds first."""

    context: int = 512
    fractions: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    tokens: int = 8
    repeats: int = 5
    warmup: int = 1

    def __post_init__(self):
        if self.context < 1 or self.tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise SecateursError("decode costs need context, tokens and repeats >= 1 and warmup >= 0")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions) or 1.0 not in self.fractions:
            raise SecateursError(f"the timed fractions must lie in (0, 1] and include 1 (the base width), got "
                                 f"{self.fractions}")


@dataclass(frozen=True)
class LinearFit:
    """seconds = intercept + slope x width, never below 0."""

    intercept: float
    slope: float

    def __call__(self, width: float) -> float:
        return max(0.0, self.intercept + self.slope * width)


def fit_line(points: list[tuple[float, float]]) -> LinearFit:
    """Least-squares line through (width, seconds) points; a single width gives a line through 0."""
    widths = np.array([p[0] for p in points], dtype=float)
    seconds = np.array([p[1] for p in points], dtype=float)
    if len(points) == 0 or not np.isfinite(seconds).all():
        raise SecateursError("a decode-cost line needs finite timings")
    if len(set(widths.tolist())) < 2:
        return LinearFit(0.0, float(seconds.mean() / widths.mean()))
    slope, intercept = np.polyfit(widths, seconds, 1)
    return LinearFit(float(intercept), float(slope))


@dataclass(frozen=True)
class DecodeCosts:
    """Seconds per decode token: `attention` against KV groups kept, `mlp` against neurons kept, `value`
    (HARP's value path), `head` (the LM head: the fixed cost); `measured` holds the timed points
    (attention: [groups, seconds], mlp: [neurons, seconds]) and their paired spreads."""

    attention: LinearFit
    mlp: LinearFit
    value: float
    head: float
    context: int
    measured: dict = field(default_factory=dict)
    key: str = ""

    def block(self, block: str, kind: str, size: int = 0) -> float:
        """The decode cost of a variant (secateurs.search.choice's block, kind and size)."""
        if kind == "removed":
            return 0.0
        if block == "attention":
            return self.value if kind == "value" else self.attention(size)
        return self.mlp(size)

    def to_dict(self) -> dict:
        return {"format": COSTS_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data) -> DecodeCosts:
        if not isinstance(data, dict) or data.get("format") != COSTS_FORMAT:
            raise SecateursError("not a decode-cost table")
        numbers = [data["value"], data["head"], *data["attention"].values(), *data["mlp"].values()]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
            raise SecateursError("a decode-cost table holds a value that is not a finite number")
        return cls(attention=LinearFit(**data["attention"]), mlp=LinearFit(**data["mlp"]), value=float(data["value"]),
                   head=float(data["head"]), context=int(data["context"]), measured=dict(data["measured"]),
                   key=str(data["key"]))


def machine_key(model) -> dict:
    """What a timing depends on besides the model: the machine's CPU, cores, threads, GPU, versions, dtype."""
    parameter = next(model.parameters())
    info = machine_info(parameter.device)
    return {**{k: info.get(k) for k in MACHINE_KEYS}, "device": parameter.device.type,
            "dtype": str(parameter.dtype).replace("torch.", "")}


def cache_key(identity: str, machine: dict, settings: CostSettings) -> str:
    text = json.dumps({"format": COSTS_FORMAT, "model": identity, "machine": machine, "settings": asdict(settings)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cache_path(key: str) -> Path:
    return cache_root() / CACHE_FOLDER / f"{key}.json"


def decode_costs(model, settings: CostSettings | None = None, *, refresh: bool = False,
                 measure: Callable[[object, CostSettings], dict] | None = None) -> DecodeCosts:
    """The model's decode-cost table on this machine: from the cache when it holds one for this model,
    machine and settings (unless refresh), else measured (`measure`, default measure_blocks, returns
    {"attention": [[groups, s], ...], "mlp": [[neurons, s], ...], "value": s, "head": s, ...}), fitted
    and cached."""
    settings = settings or CostSettings()
    key = cache_key(model_identity(model), machine_key(model), settings)
    path = cache_path(key)
    if path.exists() and not refresh:
        try:
            return DecodeCosts.from_dict(read_json_file(path, "decode-cost cache", max_bytes=CACHE_MAX_BYTES,
                                                        error=SecateursError))
        except (SecateursError, KeyError, TypeError, ValueError, AttributeError):
            pass  # unreadable: measured again and replaced below
    measured = (measure or measure_blocks)(model, settings)
    costs = DecodeCosts(attention=fit_line(measured["attention"]), mlp=fit_line(measured["mlp"]),
                        value=float(measured["value"]), head=float(measured["head"]), context=settings.context,
                        measured=measured, key=key)
    write_file(path, json.dumps(costs.to_dict(), indent=1, sort_keys=True) + "\n")
    return costs


def widths(base: int, fractions: tuple[float, ...]) -> list[int]:
    """The distinct whole widths (at least 1) the fractions of `base` give, widest first."""
    return sorted({max(1, round(base * f)) for f in fractions}, reverse=True)


@torch.inference_mode()
def measure_blocks(model, settings: CostSettings) -> dict:
    """Time the sliced copies of the first decoder layer and its value path in paired rounds (see the
    module docstring): {"attention": [[groups, s]], "mlp": [[neurons, s]], "value": s, "head": s,
    "spread": {copy: paired spread}}."""
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    if next(layer.parameters()).device.type == "meta":
        raise SecateursError("decode costs are measured on a model in memory; this one is a skeleton on 'meta'")
    shape = adapter.layer_shape(layer)
    group = shape.num_heads // shape.num_kv_heads
    groups = widths(shape.num_kv_heads, settings.fractions)
    neurons = widths(shape.intermediate_size, settings.fractions)
    copies, sizes = {}, {}  # label -> sliced copy; label -> (KV groups, neurons)
    for i in range(max(len(groups), len(neurons))):
        g, n = groups[min(i, len(groups) - 1)], neurons[min(i, len(neurons) - 1)]
        label = f"{g} groups, {n} neurons"
        copies[label], sizes[label] = copy.deepcopy(layer), (g, n)
        slice_attention(adapter, copies[label], list(range(g * group)), list(range(g)))
        slice_mlp(adapter, copies[label], list(range(n)))
    copies["value"] = copy.deepcopy(layer)
    replace_attention(adapter, copies["value"], "value", 1.0)
    rounds = _paired_rounds(model, adapter, copies, settings)
    base = next(iter(copies))
    attention = {label: _paired_median(rounds, base, label, "attention") for label in copies}
    mlp = {label: _paired_median(rounds, base, label, "mlp") for label in sizes}
    return {"attention": [[g, attention[label]] for label, (g, _) in sizes.items()],
            "mlp": [[n, mlp[label]] for label, (_, n) in sizes.items()],
            "value": attention["value"], "head": statistics.median(r[base]["head"] for r in rounds),
            "spread": {label: paired_spread([r[label]["attention"] / r[base]["attention"] for r in rounds])[1]
                       for label in copies}}


def _paired_median(rounds: list[dict], base: str, label: str, block: str) -> float:
    """The base copy's median seconds times the median of the copy's per-round ratios to it."""
    reference = statistics.median(r[base][block] for r in rounds)
    ratios = [r[label][block] / r[base][block] if r[base][block] > 0 else 1.0 for r in rounds]
    return reference * statistics.median(ratios)


def _paired_rounds(model, adapter, copies: dict, settings: CostSettings) -> list[dict]:
    """`warmup` unmeasured then `repeats` measured rounds, each timing every copy once in turn."""
    rounds = []
    for number in range(settings.warmup + settings.repeats):
        timed = {label: _time_copy(model, adapter, layer, settings) for label, layer in copies.items()}
        if number >= settings.warmup:
            rounds.append(timed)
    return rounds


def _time_copy(model, adapter, layer, settings: CostSettings) -> dict:
    """Seconds per decode token in the copy's attention and MLP and in the LM head, the model running with
    the copy as its only layer: a prefill of `context` tokens, then `tokens` timed decode steps."""
    device = next(model.parameters()).device
    timer = _BlockTimer(device)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, settings.context),
                        generator=torch.Generator().manual_seed(settings.context)).to(device)
    with _only_layer(adapter, model, layer), timer.hooks({"attention": adapter.attention(layer),
                                                          "mlp": adapter.mlp(layer),
                                                          "head": model.get_output_embeddings()}):
        out = model(ids, use_cache=True)
        timer.on = True
        for _ in range(settings.tokens):
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
    return {name: total / settings.tokens for name, total in timer.totals.items()}


@contextmanager
def _only_layer(adapter, model, layer) -> Iterator[None]:
    """The model runs with `layer` as its only decoder layer; its own layers come back afterwards."""
    layers = adapter.decoder_layers(model)
    originals = list(layers)
    for i in reversed(range(1, len(layers))):
        del layers[i]
    layers[0] = layer
    try:
        yield
    finally:
        layers[0] = originals[0]
        for original in originals[1:]:
            layers.append(original)


class _BlockTimer:
    """Forward hooks that add up the wall time of named modules while `on` (CUDA synchronised)."""

    def __init__(self, device: torch.device):
        self.device, self.on = device, False
        self.totals: dict[str, float] = {}
        self.started: dict[str, float] = {}

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def hooks(self, modules: dict) -> Iterator[None]:
        self.totals = dict.fromkeys(modules, 0.0)
        handles = []
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(lambda *_, name=name: self._start(name)))
            handles.append(module.register_forward_hook(lambda *_, name=name: self._stop(name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _start(self, name: str) -> None:
        self.started[name] = self._now()

    def _stop(self, name: str) -> None:
        if self.on:
            self.totals[name] += self._now() - self.started[name]
