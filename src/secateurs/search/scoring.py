"""Scoring the block library: the mean KL divergence per token of the dense model's next-token
distribution from that of the model with one block replaced, on the scoring tokens.

The scoring tokens are the first calibration samples holding at least `tokens` real tokens (whole
samples: every position keeps its context). One pass caches, per batch, the input of every decoder
layer and the keyword arguments each receives (secateurs.calibration.streaming's capture), and the
dense model's next-token log-probabilities at every real position: tokens x vocabulary values in at
least float32 (512 tokens of a 49,152-token vocabulary: 100 MB; of 128,256: 263 MB). A variant of
layer i is a temporary copy of layer i (secateurs.search.library), run with layers i+1..L-1, the
final norm and the LM head from the cached input of layer i: about (L - i) / L of a forward over the
scoring tokens, plus the LM head, which the log-softmax meets a few rows at a time.

In a second round the layers around the one scored take the first round's choice: the cached inputs
are those of the chosen model, and the reference stays the dense model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secateurs.adapters import get_adapter
from secateurs.calibration.data import Calibration
from secateurs.calibration.runner import NLL_CHUNK_ROWS, run_layer
from secateurs.calibration.streaming import capture_layer_calls
from secateurs.errors import SecateursError
from secateurs.planning.plan import LayerPlan
from secateurs.runtime.offload import materialized
from secateurs.runtime.progress import bar
from secateurs.search.library import BlockVariant, Library

DEFAULT_SCORING_TOKENS = 512


@dataclass
class ScoringData:
    """The scoring samples (batches), what enters every layer per batch (`inputs[layer][batch]`), the
    keyword arguments of every layer per batch, and the dense log-probabilities of every real position
    per batch ((positions, vocab), in at least float32)."""

    calibration: Calibration
    inputs: list[list[torch.Tensor]]
    kwargs: list[list[dict]]
    reference: list[torch.Tensor]

    @property
    def masks(self) -> list[torch.Tensor]:
        return [b["attention_mask"] for b in self.calibration.batches]

    @property
    def tokens(self) -> int:
        return sum(int(r.shape[0]) for r in self.reference)

    def reference_bytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.reference)


def scoring_calibration(calibration: Calibration, tokens: int) -> Calibration:
    """The first whole calibration samples, in order, that hold at least `tokens` real tokens (all of
    them when there are fewer)."""
    if tokens < 1:
        raise SecateursError(f"the search needs at least one scoring token, got {tokens}")
    batches, count = [], 0
    for batch in calibration.batches:
        rows = batch["attention_mask"].sum(1).tolist()
        take = 0
        while take < len(rows) and count < tokens:
            count += int(rows[take])
            take += 1
        if take:
            batches.append({k: v[:take] for k, v in batch.items()})
        if count >= tokens:
            break
    description = {**calibration.description, "scoring_samples": sum(b["input_ids"].shape[0] for b in batches),
                   "scoring_tokens": count}
    return Calibration(batches, description, calibration.hash)


def after_samples(calibration: Calibration, count: int) -> Calibration:
    """The calibration samples after the first `count`, in order (none when there are no more)."""
    batches, skip = [], count
    for batch in calibration.batches:
        rows = batch["input_ids"].shape[0]
        if skip >= rows:
            skip -= rows
            continue
        batches.append({k: v[skip:] for k, v in batch.items()})
        skip = 0
    return Calibration(batches, {**calibration.description, "skipped_samples": count}, calibration.hash)


def dense_layers(model) -> list[nn.Module]:
    return list(get_adapter(model).decoder_layers(model))


@torch.inference_mode()
def cache_scoring_data(model, calibration: Calibration, layers: list[nn.Module] | None = None, *,
                       reference: list[torch.Tensor] | None = None, progress: bool = True) -> ScoringData:
    """The inputs of every layer on `calibration`, running `layers` (default: the model's own) one at
    a time over all batches, and the reference log-probabilities: `reference` when given (the dense
    model's, kept from the first round), else those of the layers run."""
    layers = dense_layers(model) if layers is None else layers
    hidden, kwargs = capture_layer_calls(model, calibration)
    masks = [b["attention_mask"] for b in calibration.batches]
    inputs = []
    for j in bar(range(len(layers)), desc="search: layer inputs", disable=not progress):
        inputs.append(hidden)
        with materialized(layers[j]):
            hidden = [run_layer(layers[j], h, kwargs[j][b], masks[b]) for b, h in enumerate(hidden)]
    if reference is None:
        reference = [log_probs(model, h, m) for h, m in zip(hidden, masks)]
    return ScoringData(calibration, inputs, kwargs, reference)


def _score_dtype(model) -> torch.dtype:
    return torch.promote_types(next(model.parameters()).dtype, torch.float32)


def log_probs(model, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (real positions, vocab) from a batch's last hidden states."""
    adapter = get_adapter(model)
    rows = adapter.final_norm(model)(hidden)[mask.to(hidden.device).bool()]
    dtype = _score_dtype(model)
    parts = [torch.log_softmax(adapter.logits(model, rows[s:s + NLL_CHUNK_ROWS], dtype), dim=-1)
             for s in range(0, rows.shape[0], NLL_CHUNK_ROWS)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def summed_kl(model, hidden: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor) -> float:
    """Sum over a batch's real positions of KL(reference || model's distribution from `hidden`), in
    float64, a few rows at a time."""
    adapter = get_adapter(model)
    rows = adapter.final_norm(model)(hidden)[mask.to(hidden.device).bool()]
    dtype = _score_dtype(model)
    total = 0.0
    for s in range(0, rows.shape[0], NLL_CHUNK_ROWS):
        q = torch.log_softmax(adapter.logits(model, rows[s:s + NLL_CHUNK_ROWS], dtype), dim=-1)
        p = reference[s:s + NLL_CHUNK_ROWS].to(q.device)
        total += float((p.exp() * (p - q)).sum(-1).double().sum())
    return total


@torch.inference_mode()
def kl_with(model, data: ScoringData, index: int, module: nn.Module, context: list[nn.Module]) -> float:
    """Mean KL per scoring token of the model whose layer `index` is `module` and whose layers above
    are `context`'s, run from the cached input of layer `index`."""
    total = 0.0
    for b, mask in enumerate(data.masks):
        h = run_layer(module, data.inputs[index][b], data.kwargs[index][b], mask)
        for j in range(index + 1, len(context)):
            with materialized(context[j]):
                h = run_layer(context[j], h, data.kwargs[j][b], mask)
        total += summed_kl(model, h, mask, data.reference[b])
    return total / max(data.tokens, 1)


def score_library(model, library: Library, data: ScoringData, *, context: dict[int, LayerPlan] | None = None,
                  progress: bool = True) -> dict[tuple[int, str, str], float]:
    """{(layer, block, variant id): mean KL per token} of every variant in the library. Without
    `context` every other block is dense (a dense variant scores 0 without running); with it (a
    LayerPlan per layer: a previous round's choice), the other layers and the other block of the
    layer scored are the context's, and `data` must hold the inputs of that model."""
    layers = dense_layers(model)
    around = list(layers)
    if context is not None:
        around = [library.module(context[i]) if i in context else layer for i, layer in enumerate(layers)]
    work = [(i, v) for i in sorted(library.variants) for v in library.variants[i]
            if context is not None or v.kind != "dense"]
    scores = {(i, v.block, v.id): 0.0 for i in library.variants for v in library.variants[i]}
    steps = bar(total=sum(len(layers) - i for i, _ in work), desc="search: scoring variants", unit="layer",
                disable=not progress)
    for i, variant in work:
        lp = _in_context(library, variant, context.get(i) if context is not None else None)
        scores[(i, variant.block, variant.id)] = kl_with(model, data, i, library.module(lp), around)
        steps.update(len(layers) - i)
    steps.close()
    return scores


def _in_context(library: Library, variant: BlockVariant, current: LayerPlan | None) -> LayerPlan:
    """The LayerPlan of the variant's layer: the variant's block as the variant says, the other block
    dense, or as `current` (a previous choice) has it."""
    if current is None:
        return LayerPlan(index=variant.layer, **variant.fragment)
    other = "mlp" if variant.block == "attention" else "attention"
    chosen = _chosen_id(library, current, other)
    return library.layer_plan(variant.layer, **{variant.block: variant.id, other: chosen})


def _chosen_id(library: Library, lp: LayerPlan, block: str) -> str:
    """The id of the `block` variant a layer plan made by Library.layer_plan holds."""
    for v in library.of(lp.index, block):
        if lp.removed and v.kind == "removed":
            return v.id
        if not lp.removed and _holds(lp, v):
            return v.id
    raise SecateursError(f"layer {lp.index}'s plan holds no {block} variant of the library")


def _holds(lp: LayerPlan, variant: BlockVariant) -> bool:
    keys = ("heads", "kv_heads", "attention") if variant.block == "attention" else ("neurons", "mlp")
    return all(getattr(lp, k, None) == variant.fragment.get(k) for k in keys)
