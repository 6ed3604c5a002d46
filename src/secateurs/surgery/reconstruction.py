"""Least-squares output reconstruction: after a layer loses heads or neurons, re-fit its output
projections (o_proj over the kept heads, down_proj / fc2 over the kept neurons) so the layer
reproduces what the unpruned layer wrote, training-free.

For an output projection W (d_out x n, bias b) fed by inputs x (n) and kept input channels S:

    W', b' = argmin  sum_t ||W x_t + b - W' x_t[S] - b'||^2  +  lam ||W' - W[:, S]||^2

solved from the Gram matrix G = sum_t x_t x_t^T alone (DESIGN.md, "Least-squares output
reconstruction"): (W', b') [[G_SS + lam I, s_S], [s_S^T, N]] = [W G_:S + lam W_S + b s_S^T, W s + b N],
with s = sum_t x_t and N the token count. The ridge pulls toward the original sliced weights, not
toward zero (zero made AMP worse when measured); lam = damping * mean(diag G). The bias is
fitted where the projection has one, where the plan compensates that block (FLAP's compensation
is the special case that fits only b') or when asked (`bias=True`: the saved model then holds
extra parameters and loads with load_pruned); otherwise b' = b.

Two drivers:
* sequential (default): layer by layer, each layer's Gram taken on the inputs the already pruned
  and re-fitted layers below produce (secateurs.calibration.streaming in sequential mode); works on a model in
  memory and on a lazy checkpoint skeleton (`prune --streamed`), one layer in memory;
* dense: every layer at once from the Gram matrices of the dense model's calibration pass
  (cheaper: no second pass; needs statistics collected with gram=True).
The plan records the settings (provenance "reconstruction"), so re-applying it with the same
calibration data gives the same weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from secateurs.adapters import get_adapter
from secateurs.adapters.base import set_linear
from secateurs.calibration.statistics import InputStats, Statistics
from secateurs.calibration.streaming import streamed_statistics
from secateurs.errors import SecateursError
from secateurs.files.output import check_finite, writing_file
from secateurs.planning.geometry import plan_base
from secateurs.planning.plan import LayerPlan, PruningPlan
from secateurs.settings.names import RECONSTRUCT_MODES
from secateurs.surgery.apply import _row_index, apply_layer_plan, remove_layers, sync_config

DEFAULT_DAMPING = 0.3
KINDS = ("attention", "mlp")


@dataclass(frozen=True)
class Reconstruction:
    """How to re-fit: mode (sequential | dense), ridge damping relative to mean(diag G), and
    whether to add a bias where the family has none."""

    mode: str = "sequential"
    damping: float = DEFAULT_DAMPING
    bias: bool = False

    def __post_init__(self):
        if self.mode not in RECONSTRUCT_MODES:
            raise SecateursError(f"reconstruction mode must be one of {', '.join(RECONSTRUCT_MODES)}; "
                                 f"got {self.mode!r}")
        if not (isinstance(self.damping, (int, float)) and self.damping > 0 and self.damping < float("inf")):
            raise SecateursError(f"reconstruction damping must be a positive finite number, got {self.damping!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Reconstruction:
        """From a plan's provenance (which also records the calibration hash of the fit)."""
        if not isinstance(data, dict) or set(data) - {"mode", "damping", "bias", "calibration_hash"}:
            raise SecateursError(f"plan provenance 'reconstruction' must hold mode, damping and bias, got {data!r}")
        return cls(**{k: v for k, v in data.items() if k != "calibration_hash"})


@torch.no_grad()
def ridge_refit(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float, *,
                bias: torch.Tensor | None = None, channel_sum: torch.Tensor | None = None, tokens: int = 0,
                fit_bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', b') of the module docstring for one output projection, solved in float64 and returned
    in the weight's dtype and device. kept: indices of the kept input channels."""
    w = weight.detach().to("cpu", torch.float64)
    g = gram.to(torch.float64)
    kept = torch.as_tensor(kept, dtype=torch.long).cpu()
    lam = damping * float(g.diagonal().mean())
    if lam <= 0:  # no signal reached this projection: keep the sliced weights
        return weight.detach()[:, kept.to(weight.device)].clone(), bias
    w_kept = w[:, kept]
    system = g[kept][:, kept] + lam * torch.eye(len(kept), dtype=torch.float64)
    rhs = w @ g[:, kept] + lam * w_kept
    b0 = bias.detach().to("cpu", torch.float64) if bias is not None else None
    if fit_bias:
        if channel_sum is None or tokens <= 0:
            raise SecateursError("fitting a bias needs the channel sums and token count of the calibration inputs")
        s = channel_sum.to(torch.float64)
        corner = torch.tensor([[float(tokens)]], dtype=torch.float64)
        system = torch.cat([torch.cat([system, s[kept, None]], 1), torch.cat([s[None, kept], corner], 1)], 0)
        rhs = torch.cat([rhs, (w @ s)[:, None]], 1)
        if b0 is not None:  # the target includes the original bias
            rhs += b0[:, None] * torch.cat([s[kept], corner[0]])[None, :]
    factor, info = torch.linalg.cholesky_ex(system)  # symmetric positive definite: lam > 0, tokens > 0
    solution = (torch.cholesky_solve(rhs.t(), factor) if int(info) == 0 else torch.linalg.solve(system, rhs.t())).t()
    new_weight = solution[:, : len(kept)].to(weight.dtype).to(weight.device).contiguous()
    new_bias = solution[:, len(kept)] if fit_bias else b0
    if new_bias is not None:
        new_bias = new_bias.to(weight.dtype).to(weight.device)
    return new_weight, new_bias


def refit_layer(adapter, layer, lp, heads: list[int], neurons: list[int], attention: InputStats, mlp: InputStats,
                settings: Reconstruction) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Re-fitted (weight, bias) of the output projections of one layer that loses structures,
    computed from the unpruned layer's weights: {"attention": ..., "mlp": ...} (only what changes)."""
    shape = adapter.layer_shape(layer)
    compensated = set(lp.compensation or {})
    kept_channels = {"attention": _row_index(heads, adapter.head_dim(layer), "cpu") if len(heads) < shape.num_heads
                     else None,
                     "mlp": torch.as_tensor(neurons, dtype=torch.long)
                     if lp.mlp is None and len(neurons) < shape.intermediate_size else None}
    linears = {"attention": adapter.attention_output_linear, "mlp": adapter.mlp_output_linear}
    fitted = {}
    for kind, stats in (("attention", attention), ("mlp", mlp)):
        kept = kept_channels[kind]
        if kept is None:
            continue
        if stats.gram is None:
            raise SecateursError(f"layer {lp.index}: no Gram matrix for the {kind} output projection; collect "
                                 "statistics with gram=True")
        linear = linears[kind](layer)
        fitted[kind] = ridge_refit(linear.weight, stats.gram, kept, settings.damping, bias=linear.bias,
                                   channel_sum=stats.channel_sum, tokens=stats.tokens,
                                   fit_bias=settings.bias or linear.bias is not None or kind in compensated)
    return fitted


def apply_refit(adapter, layer, fitted: dict) -> None:
    """Give a sliced layer its re-fitted output projections."""
    linears = {"attention": adapter.attention_output_linear, "mlp": adapter.mlp_output_linear}
    for kind, (weight, bias) in fitted.items():
        linear = linears[kind](layer)
        if weight.shape[1] != linear.in_features:
            raise SecateursError(f"re-fitted {kind} output projection has {weight.shape[1]} inputs, the sliced layer "
                                 f"{linear.in_features}")
        set_linear(linear, weight.to(linear.weight.dtype).contiguous(),
                   None if bias is None else bias.to(linear.weight.dtype).contiguous())


def prune_and_refit_layer(adapter, layer, plan: PruningPlan, lp, attention: InputStats, mlp: InputStats,
                          settings: Reconstruction) -> dict:
    """Slice one layer as the plan says and re-fit its output projections; returns the fit. The
    sequential pass runs in inference mode; the layer's new weights are made outside it, so the
    pruned model stays trainable (recovery after reconstruction)."""
    heads, kv_heads, neurons = plan.resolve_layer(lp)
    fitted = refit_layer(adapter, layer, lp, heads, neurons, attention, mlp, settings)
    with torch.inference_mode(False):  # clones of inference tensors made here are ordinary tensors
        fitted = {kind: tuple(None if t is None else t.clone() for t in fit) for kind, fit in fitted.items()}
        apply_layer_plan(adapter, layer, lp, heads, kv_heads, neurons)
        apply_refit(adapter, layer, fitted)
    return fitted


def _as_identity(lp: LayerPlan) -> LayerPlan:
    """A removed layer as the sequential pass applies it until the layers are removed at the end: both
    blocks removed, so the layer passes its input on unchanged (exactly) to the layers above."""
    return LayerPlan(index=lp.index, attention={"mode": "removed"}, mlp={"mode": "removed"})


@torch.no_grad()
def apply_plan_dense(model, plan: PruningPlan, stats: Statistics, settings: Reconstruction):
    """Apply a plan, every narrower block re-fitted from the dense model's Gram matrices (removed
    layers, replaced attention and removed MLPs applied as they are)."""
    plan.check_compatible(plan_base(model))
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    for lp in plan.layers:
        plan.resolve_layer(lp)  # validate every layer before touching any weight
    for lp, a, m in zip(plan.layers, stats.attention, stats.mlp):
        if not lp.removed:
            prune_and_refit_layer(adapter, layers[lp.index], plan, lp, a, m, settings)
    remove_layers(adapter, model, plan.kept_layer_indices())
    sync_config(model, plan)
    return model


@torch.no_grad()
def apply_plan_sequential(model, plan: PruningPlan, calibration, settings: Reconstruction, *, checkpoint=None,
                          device=None, store: RefitStore | None = None, progress: bool = True):
    """Apply a plan layer by layer, each narrower block re-fitted on the inputs the pruned layers below
    produce (removed layers pass their input on until they are removed at the end). With `checkpoint`
    (a lazy skeleton, `prune --streamed`) the model is not modified for good: the fits go to `store` and
    prune_checkpoint applies them shard by shard."""

    plan.check_compatible(plan_base(model))
    for lp in plan.layers:
        plan.resolve_layer(lp)
    adapter = get_adapter(model)

    def on_layer(index, layer, attention, mlp):
        lp = plan.layers[index]
        fitted = prune_and_refit_layer(adapter, layer, plan, _as_identity(lp) if lp.removed else lp, attention, mlp,
                                       settings)
        attention.gram = mlp.gram = None  # one layer's Gram matrices in memory at a time
        if store is not None:
            store.save(index, fitted)

    streamed_statistics(model, calibration, device=device, checkpoint=checkpoint, mode="sequential",
                        on_layer=on_layer, progress=progress, gram=True, scores=False)
    if checkpoint is None:
        remove_layers(adapter, model, plan.kept_layer_indices())
        sync_config(model, plan)
    return model


class RefitStore:
    """Re-fitted output projections of a streamed run, one safetensors file per layer, so that
    prune_checkpoint can apply them without holding them all in memory."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, index: int) -> Path:
        return self.folder / f"refit_{index:04d}.safetensors"

    def save(self, index: int, fitted: dict) -> None:
        tensors = {}
        for kind, (weight, bias) in fitted.items():
            tensors[f"{kind}.weight"] = weight.detach().cpu().contiguous()
            if bias is not None:
                tensors[f"{kind}.bias"] = bias.detach().cpu().contiguous()
        check_finite(tensors, f"re-fitted layer {index}")
        with writing_file(self._path(index)) as tmp:
            save_file(tensors, str(tmp))

    def load(self, index: int) -> dict:
        path = self._path(index)
        if not path.exists():
            return {}
        tensors = load_file(str(path))
        return {kind: (tensors[f"{kind}.weight"], tensors.get(f"{kind}.bias"))
                for kind in KINDS if f"{kind}.weight" in tensors}
