"""Calibration statistics, collected by forward hooks in one pass, in float32, padding excluded.

For every decoder layer two Linear inputs are watched: the input of the attention output
projection (o_proj / dense: the concatenated head outputs) and the input of the MLP output
projection (down_proj / fc2: the neuron activations). For each we keep

* unit scores for AMP: per head, the L1 norm over the hidden dimension of the head's contribution
  x_{t,h} W_O[:, h]^T; per neuron, |a_{t,j}|; accumulated both as a mean of per-prompt means
  (the paper's averaging) and as a token-weighted sum;
* per-channel first and second moments (sum x, sum x^2), which wanda-sp and FLAP need;
* on request (gram=True), the Gram matrix sum_t x_t x_t^T in float64, which least-squares
  reconstruction needs (secateurs.surgery.reconstruction): channels^2 values per Linear, so off by default.

Whatever the criterion, the data runs through the model once.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from secateurs.adapters import get_adapter
from secateurs.calibration.runner import zero_padding
from secateurs.errors import SecateursError
from secateurs.files.output import check_finite as check_finite_tensors
from secateurs.files.output import writing_file
from secateurs.runtime.offload import input_device, materialized
from secateurs.runtime.progress import bar

# Head contributions are computed for this many (token, head, hidden) elements at a time.
CONTRIBUTION_CHUNK_ELEMENTS = 1 << 22  # 16 MiB in float32: small beside one layer of any LLM


def head_contribution_l1(x: torch.Tensor, weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """||x_{t,h} W_O[:, h*d:(h+1)*d]^T||_1 for every token t and head h -> (tokens, heads), float32.

    x: (tokens, heads*d); weight: (hidden, heads*d). Tokens are processed in chunks so that the
    (heads, tokens, hidden) product never exceeds CONTRIBUTION_CHUNK_ELEMENTS.
    """
    tokens = x.shape[0]
    hidden = weight.shape[0]
    d = weight.shape[1] // num_heads
    w = weight.float().reshape(hidden, num_heads, d).permute(1, 2, 0)  # (H, d, hidden)
    xh = x.float().reshape(tokens, num_heads, d).transpose(0, 1)  # (H, tokens, d)
    step = max(1, CONTRIBUTION_CHUNK_ELEMENTS // (num_heads * hidden))
    out = torch.empty(tokens, num_heads, dtype=torch.float32, device=x.device)
    for s in range(0, tokens, step):
        out[s : s + step] = torch.bmm(xh[:, s : s + step], w).abs_().sum(-1).t()
    return out


def zero_padding_hooks(layers, state: dict) -> list:
    """Forward hooks that zero padded positions (state["mask"] == 0) after every layer
    (secateurs.calibration.runner says why). Remove the handles after."""
    def hook(module, args, output):
        return zero_padding(output, state["mask"])

    return [layer.register_forward_hook(hook) for layer in layers]


@contextlib.contextmanager
def _opened(path: str | os.PathLike):
    """A saved statistics file opened for reading; any failure inside (a missing key, a bad header,
    not safetensors at all) means the file is not our statistics, and says so."""
    try:
        with safe_open(str(path), "pt") as f:
            yield f
    except SecateursError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not our statistics
        raise SecateursError(f"{path} is not a secateurs statistics file ({type(exc).__name__}: {exc}); delete it "
                             "to recompute") from exc


@dataclass
class InputStats:
    """Accumulated statistics of one Linear's input across the calibration set."""

    unit_prompt_mean_sum: torch.Tensor
    unit_token_sum: torch.Tensor
    channel_sum: torch.Tensor
    channel_sumsq: torch.Tensor
    prompts: int = 0
    tokens: int = 0
    gram: torch.Tensor | None = None  # (channels, channels) sum of x x^T over real tokens, float64

    @classmethod
    def zeros(cls, units: int, channels: int, gram: bool = False) -> InputStats:
        z = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        return cls(z(units), z(units), z(channels), z(channels),
                   gram=torch.zeros(channels, channels, dtype=torch.float64) if gram else None)

    def add(self, unit_scores: torch.Tensor | None, x: torch.Tensor, mask: torch.Tensor) -> None:
        """unit_scores: (B, T, units), or None where only the channel statistics and the Gram matrix
        are wanted (the re-fit pass); x: (B, T, channels); mask: (B, T) with 1 for real tokens."""
        keep = mask.bool().unsqueeze(-1)
        counts = keep.sum(1).to(torch.float32)  # (B, 1)
        real = counts.squeeze(-1) > 0
        if unit_scores is not None:
            # where(), not a product: padded positions may hold NaN (fully masked attention rows)
            per_prompt = torch.where(keep, unit_scores, 0.0).sum(1)  # (B, units)
            self.unit_prompt_mean_sum += (per_prompt[real] / counts[real]).sum(0).double().cpu()
            self.unit_token_sum += per_prompt.sum(0).double().cpu()
        xf = torch.where(keep, x.float(), 0.0)
        self.channel_sum += xf.sum((0, 1)).double().cpu()
        self.channel_sumsq += (xf * xf).sum((0, 1)).double().cpu()
        if self.gram is not None:  # float64 models keep float64 products (exactness tests)
            flat = (xf if x.dtype != torch.float64 else torch.where(keep, x, 0.0)).reshape(-1, x.shape[-1])
            self.gram += (flat.t() @ flat).double().cpu()
        self.prompts += int(real.sum())
        self.tokens += int(counts.sum())

    def unit_mean(self, averaging: str = "prompt") -> torch.Tensor:
        if averaging == "prompt":
            return (self.unit_prompt_mean_sum / max(self.prompts, 1)).float()
        if averaging == "token":
            return (self.unit_token_sum / max(self.tokens, 1)).float()
        raise ValueError(f"averaging must be 'prompt' or 'token', got {averaging!r}")

    def channel_mean(self) -> torch.Tensor:
        return (self.channel_sum / max(self.tokens, 1)).float()

    def channel_mean_square(self) -> torch.Tensor:
        return (self.channel_sumsq / max(self.tokens, 1)).float()

    def channel_variance(self) -> torch.Tensor:
        """Population variance over tokens (FLAP's fluctuation)."""
        mean = self.channel_sum / max(self.tokens, 1)
        return (self.channel_sumsq / max(self.tokens, 1) - mean * mean).clamp_min(0).float()


@dataclass
class Statistics:
    attention: list[InputStats]
    mlp: list[InputStats]
    description: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        tensors, counts = {}, {}
        for kind, stats in (("attention", self.attention), ("mlp", self.mlp)):
            for i, s in enumerate(stats):
                for name in ("unit_prompt_mean_sum", "unit_token_sum", "channel_sum", "channel_sumsq"):
                    tensors[f"{kind}.{i}.{name}"] = getattr(s, name).contiguous()
                if s.gram is not None:
                    tensors[f"{kind}.{i}.gram"] = s.gram.contiguous()
                counts[f"{kind}.{i}"] = [s.prompts, s.tokens]
        check_finite_tensors(tensors, "statistics")
        with writing_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"description": json.dumps(self.description),
                                                   "counts": json.dumps(counts)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Statistics:
        with _opened(path) as f:
            meta = f.metadata() or {}
            counts = json.loads(meta["counts"])
            description = json.loads(meta["description"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            return cls._from_tensors(tensors, counts, description)

    @staticmethod
    def read_description(path: str | os.PathLike) -> dict:
        """The description of a saved statistics file (model, calibration and its hash), from the
        header alone: a file with Gram matrices can be tens of GB."""
        with _opened(path) as f:
            return json.loads((f.metadata() or {})["description"])

    @classmethod
    def _from_tensors(cls, tensors: dict, counts: dict, description: dict) -> Statistics:
        check_finite_tensors(tensors, "statistics file")
        out = {}
        for kind in ("attention", "mlp"):
            n = sum(1 for k in counts if k.startswith(kind + "."))
            out[kind] = [
                InputStats(*(tensors[f"{kind}.{i}.{name}"] for name in (
                    "unit_prompt_mean_sum", "unit_token_sum", "channel_sum", "channel_sumsq")),
                    *counts[f"{kind}.{i}"], gram=tensors.get(f"{kind}.{i}.gram"))
                for i in range(n)
            ]
        return cls(out["attention"], out["mlp"], description)


def attach_layer_hooks(adapter, layer, state: dict, parts=("attention", "mlp"),
                       gram: bool = False, scores: bool = True) -> tuple[InputStats, InputStats, list]:
    """Statistics of one layer and the hooks that fill them (state["mask"] holds the batch's mask);
    gram=True also accumulates the Gram matrices of both output projections' inputs; scores=False
    skips the importance scores (the head contributions cost a product as large as o_proj's)."""
    shape = adapter.layer_shape(layer)
    o_proj = adapter.attention_output_linear(layer) if "attention" in parts else None
    down = adapter.mlp_output_linear(layer)
    a_stats = InputStats.zeros(shape.num_heads, o_proj.in_features if o_proj is not None else 0,
                               gram and o_proj is not None)
    m_stats = InputStats.zeros(shape.intermediate_size, down.in_features, gram)

    def on_o_proj(module, args):
        x = args[0]
        b, t, _ = x.shape
        contributions = None
        if scores:
            with materialized(module):  # offloaded by a device map: the weight is on meta between forwards
                contributions = head_contribution_l1(x.reshape(b * t, -1), module.weight,
                                                     shape.num_heads).reshape(b, t, shape.num_heads)
        a_stats.add(contributions, x, state["mask"].to(x.device))

    def on_down(module, args):
        x = args[0]
        m_stats.add(x.float().abs() if scores else None, x, state["mask"].to(x.device))

    handles = []
    if o_proj is not None:
        handles.append(o_proj.register_forward_pre_hook(on_o_proj))
    if "mlp" in parts:
        handles.append(down.register_forward_pre_hook(on_down))
    return a_stats, m_stats, handles


def check_finite(index: int, a: InputStats, m: InputStats) -> None:
    sums = (a.unit_token_sum, m.unit_token_sum, a.channel_sum, m.channel_sum)  # the scores may not be collected
    if not all(bool(torch.isfinite(t).all()) for t in sums):
        raise SecateursError(f"non-finite activations at real tokens in layer {index}; try float32 or another "
                             "calibration source")


@torch.inference_mode()
def collect_statistics(model, calibration, progress: bool = True, parts=("attention", "mlp"),
                       gram: bool = False) -> Statistics:
    """Run the calibration batches through the decoder once (no LM head) with hooks on every
    layer's attention-output and MLP-output projections (or only those of `parts`; the others
    keep empty statistics, e.g. for HARP layers whose attention has no o_proj any more).
    For models that do not fit the device, secateurs.calibration.streaming runs the same hooks layer by layer.
    gram=True adds the Gram matrices reconstruction needs (secateurs.surgery.reconstruction)."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    attention, mlp, handles = [], [], []
    state: dict[str, torch.Tensor] = {}
    for layer in layers:
        a_stats, m_stats, layer_handles = attach_layer_hooks(adapter, layer, state, parts, gram)
        attention.append(a_stats)
        mlp.append(m_stats)
        handles += layer_handles
    handles += zero_padding_hooks(layers, state)
    decoder = adapter.decoder(model)
    device = input_device(model)
    try:
        for batch in bar(calibration.batches, desc="calibration statistics", disable=not progress):
            state["mask"] = batch["attention_mask"]
            decoder(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for i, (a, m) in enumerate(zip(attention, mlp)):
        check_finite(i, a, m)
    description = {"calibration": calibration.description, "calibration_hash": calibration.hash}
    return Statistics(attention, mlp, description)
