"""Scores for removing whole decoder layers, from cached layer inputs.

The streaming driver's capture (embeddings only) records what enters layer 0 and the keyword
arguments every layer receives (rotary position embeddings, its own causal or sliding-window mask,
position ids). Layers are then run by hand with those arguments, one layer at a time over every
stream, so a layer's weights are needed once per scoring round (read from disk or an offload by
`materialized` when the model is a lazy skeleton or dispatched by accelerate):

* the reference F(X): final-normed hidden states of the current model (layers already removed in
  earlier iterative rounds are skipped);
* for each candidate layer c: F'_c(X), the same with c skipped, starting from the cached input of
  c, so only the layers above c run (about one partial forward per candidate, shared by every
  metric);
* local scores from the same pass: ShortGPT's block influence 1 - cos(layer input, layer output),
  and Gromov et al.'s angular distance between the inputs of layers l and l + span.

Padding never counts: padded positions are zeroed after every layer (some families produce NaN
there, which would leak into real tokens through zero attention weights), and metrics only see a
seeded subsample of real tokens, which keeps the cost bounded on small CPUs and on 70B models.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from secateurs.adapters import get_adapter
from secateurs.calibration.runner import run_layer, summed_next_token_nll
from secateurs.calibration.streaming import capture_layer_calls
from secateurs.criteria.similarity import DISTANCES, token_angles
from secateurs.errors import SecateursError
from secateurs.runtime.offload import materialized
from secateurs.runtime.progress import bar

END_TO_END_METRICS = tuple(DISTANCES) + ("nll",)  # need F'(X) with the candidate skipped
LOCAL_METRICS = ("bi", "block-angular")  # need only the layer's own input and output
ALL_METRICS = END_TO_END_METRICS + LOCAL_METRICS


def check_metrics(metrics) -> tuple[str, ...]:
    metrics = tuple(metrics)
    if not metrics:
        raise SecateursError("give at least one metric")
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise SecateursError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(ALL_METRICS)}")
    if len(set(metrics)) != len(metrics):
        raise SecateursError(f"metrics listed twice: {list(metrics)}")
    return metrics


@dataclass
class Trace:
    """One calibration batch: what enters layer 0, each layer's keyword arguments, which tokens count."""

    hidden: torch.Tensor
    kwargs: list[dict]
    mask: torch.Tensor  # (B, T) real tokens
    chosen: torch.Tensor  # (B, T) the subsample the metrics see
    next_ids: torch.Tensor  # (B, T) next token id (for nll), -1 where there is none


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """Representations are kept on the CPU in at least float32 (bf16 models), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def choose_tokens(masks: list[torch.Tensor], max_tokens: int | None, seed: int) -> list[torch.Tensor]:
    """A seeded subsample of at most max_tokens real tokens over all batches, as per-batch masks."""
    sizes = [int(m.sum()) for m in masks]
    total = sum(sizes)
    if total == 0:
        raise SecateursError("the calibration data has no real tokens")
    if max_tokens is None or max_tokens >= total:
        return [m.bool() for m in masks]
    if max_tokens < 4:
        raise SecateursError(f"max_tokens must be at least 4, got {max_tokens}")
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_tokens]] = True
    out, start = [], 0
    for m, n in zip(masks, sizes):
        sel = torch.zeros(m.shape, dtype=torch.bool)
        sel[m.bool()] = keep[start:start + n]
        out.append(sel)
        start += n
    return out


def capture_traces(model, calibration, max_tokens: int | None = 2048, seed: int = 0,
                   progress: bool = True) -> list[Trace]:
    """The input of layer 0 and the keyword arguments of every layer (gemma2 and qwen2 give
    sliding-window layers their own mask) per batch, recorded by the streaming driver's capture,
    which runs the embeddings only."""
    masks = [b["attention_mask"] for b in calibration.batches]
    chosen = choose_tokens(masks, max_tokens, seed)
    inputs, kwargs = capture_layer_calls(model, calibration)
    traces = []
    for b, (batch, sel) in enumerate(zip(calibration.batches, chosen)):
        mask = batch["attention_mask"].bool()
        next_ids = torch.full_like(batch["input_ids"], -1)
        next_ids[:, :-1] = torch.where(mask[:, 1:], batch["input_ids"][:, 1:], -1)
        traces.append(Trace(inputs[b], [per_layer[b] for per_layer in kwargs], mask, sel, next_ids))
    return traces


def _step(layer, h: torch.Tensor, trace: Trace, index: int) -> torch.Tensor:
    """Layer `index` on one traced batch, padding zeroed."""
    return run_layer(layer, h, trace.kwargs[index], trace.mask)


def _run(layers, h: torch.Tensor, trace: Trace, indices) -> torch.Tensor:
    for j in indices:
        h = _step(layers[j], h, trace, j)
    return h


@torch.inference_mode()
def final_hidden(model, trace: Trace, skip=()) -> torch.Tensor:
    """Final-normed hidden states (B, T, hidden) of a traced batch with the `skip` layers left out:
    what the model with those layers physically removed computes (padding zeroed)."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    skip = set(skip)
    kept = [j for j in range(len(layers)) if j not in skip]
    return adapter.final_norm(model)(_run(layers, trace.hidden, trace, kept))


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    return ((a * b).sum(-1) / norms).nan_to_num(1.0)


@dataclass
class DepthScores:
    """{metric: {layer: score}}, smaller = removing the layer changes less."""

    scores: dict[str, dict[int, float]]
    tokens: int
    seconds: float
    extra: dict = field(default_factory=dict)  # goes into the plan: deterministic values only
    timings: dict = field(default_factory=dict)


def _nll_sum(model, h: torch.Tensor, targets: torch.Tensor) -> float:
    adapter = get_adapter(model)  # family quirks (soft-capping) live in the adapter's logits
    return summed_next_token_nll(h, targets, lambda rows: adapter.logits(model, rows, torch.float64))[0]


@dataclass
class _Finals:
    """The final-normed chosen rows of the reference and of every candidate's skipping stream (on the
    CPU, for the distances) and the next-token log-likelihood sums (for nll)."""

    ref_parts: list[torch.Tensor]
    skip_parts: dict[int, list[torch.Tensor]]
    nll_sum: dict[int, float]
    nll_ref: float = 0.0
    nll_count: int = 0


@torch.inference_mode()
def score_layers(model, traces: list[Trace], candidates: list[int], metrics, *, removed=(), span: int = 1,
                 progress: bool = True) -> DepthScores:
    """Score every candidate layer under `metrics` on the current model (the base model with
    `removed` layers skipped). `span` is the block length of 'block-angular' (candidate = the
    first layer of the block; the block must lie inside the kept layers).

    Layer-streamed: the layers run one at a time over every stream (the reference, and one per
    candidate that starts at the candidate's input and skips it), so each layer's weights are
    needed once per call, also when they are read from disk or an offload (`materialized`)."""
    metrics = check_metrics(metrics)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    norm = adapter.final_norm(model)
    removed = set(removed)
    kept = [j for j in range(len(layers)) if j not in removed]
    bad = [c for c in candidates if c not in kept]
    if bad:
        raise SecateursError(f"candidate layers {bad} are not in the model (removed or out of range)")
    e2e = [m for m in metrics if m in END_TO_END_METRICS]
    want_local = any(m in LOCAL_METRICS for m in metrics)
    start = time.perf_counter()
    sels = [t.chosen.to(t.hidden.device) for t in traces]
    tokens = sum(int(sel.sum()) for sel in sels)
    if tokens < 4:
        raise SecateursError(f"only {tokens} calibration tokens would be scored; use more calibration data")
    ref, skipping, local_inputs = _stream_layers(layers, traces, sels, kept, candidates, bool(e2e), want_local,
                                                 progress)
    finals = _final_outputs(model, norm, traces, sels, ref, skipping, candidates, "nll" in e2e)
    bi_sum, ang_sum = _local_sums(metrics, candidates, kept, len(layers), len(traces), local_inputs, span,
                                  want_local)
    forward_seconds = time.perf_counter() - start
    scores = _distance_scores(e2e, candidates, finals, progress)
    extra = {}
    if "nll" in e2e:
        if finals.nll_count == 0:
            raise SecateursError("no scored token has a next token; use longer calibration samples")
        scores["nll"] = {c: finals.nll_sum[c] / finals.nll_count for c in candidates}
        extra["reference_nll"] = finals.nll_ref / finals.nll_count
    if "bi" in metrics:
        scores["bi"] = {c: bi_sum[c] / tokens for c in candidates}
    if "block-angular" in metrics:
        scores["block-angular"] = {c: ang_sum[c] / tokens for c in candidates}
        extra["span"] = span
    for m in metrics:  # keep the requested order
        scores[m] = scores.pop(m)
    seconds = time.perf_counter() - start
    timings = {"forwards": forward_seconds, "distances": seconds - forward_seconds}
    return DepthScores(scores, tokens, seconds, extra, timings)


def _stream_layers(layers, traces: list[Trace], sels: list[torch.Tensor], kept: list[int], candidates: list[int],
                   e2e: bool, want_local: bool, progress: bool):
    """(reference stream, {candidate: its skipping stream}, {kept layer: chosen rows of its input}):
    the kept layers run one at a time over every stream, so each one's weights come in once. A
    candidate's stream forks off the reference at the candidate's input; the top of the stack counts
    as the input of the position after the last layer."""
    ref = [t.hidden for t in traces]
    skipping: dict[int, list[torch.Tensor]] = {}  # candidate -> its stream per trace
    local_inputs: dict[int, list[torch.Tensor]] = {}  # kept layer -> chosen rows of its input per trace
    for j in bar(kept, desc="depth: scoring layers", disable=not progress):
        if want_local:
            local_inputs[j] = [h[sel] for h, sel in zip(ref, sels)]
        with materialized(layers[j]):
            for c, stream in skipping.items():
                skipping[c] = [_step(layers[j], h, t, j) for h, t in zip(stream, traces)]
            if e2e and j in candidates:
                skipping[j] = ref  # skips j: what enters j goes on to the layers above
            ref = [_step(layers[j], h, t, j) for h, t in zip(ref, traces)]
    local_inputs[len(layers)] = [h[sel] for h, sel in zip(ref, sels)]  # "input" of the position after the top
    return ref, skipping, local_inputs


def _final_outputs(model, norm, traces: list[Trace], sels: list[torch.Tensor], ref: list[torch.Tensor],
                   skipping: dict[int, list[torch.Tensor]], candidates: list[int], want_nll: bool) -> _Finals:
    """The final norm over the chosen tokens of every stream, batch by batch, kept at the storage
    dtype on the CPU; with nll, the summed next-token log-likelihoods while the rows are at hand."""
    finals = _Finals([], {c: [] for c in candidates}, {c: 0.0 for c in candidates})
    for b, (trace, sel) in enumerate(zip(traces, sels)):
        final = norm(ref[b])[sel]
        finals.ref_parts.append(final.to(_store_dtype(final.dtype)).cpu())
        targets = trace.next_ids.to(final.device)[sel]
        has_next = targets >= 0
        if want_nll:
            finals.nll_ref += _nll_sum(model, final[has_next], targets[has_next])
            finals.nll_count += int(has_next.sum())
        for c, stream in skipping.items():
            out = norm(stream[b])[sel]
            finals.skip_parts[c].append(out.to(_store_dtype(out.dtype)).cpu())
            if want_nll:
                finals.nll_sum[c] += _nll_sum(model, out[has_next], targets[has_next])
    return finals


def _local_sums(metrics, candidates: list[int], kept: list[int], num_layers: int, num_traces: int,
                local_inputs: dict[int, list[torch.Tensor]], span: int, want_local: bool):
    """({candidate: bi sum}, {candidate: block-angular sum}) over the chosen tokens: a layer's input
    against its output (bi), the input of kept[p] against that of kept[p + span] (block-angular,
    infinite when the block runs past the top)."""
    bi_sum = {c: 0.0 for c in candidates}
    ang_sum = {c: 0.0 for c in candidates}
    if want_local:
        position = {j: p for p, j in enumerate(kept)}
        after = kept[1:] + [num_layers]
        for c in candidates:
            for b in range(num_traces):
                h_in = local_inputs[c][b]
                if "bi" in metrics:
                    bi_sum[c] += float((1 - _cosines(h_in, local_inputs[after[position[c]]][b])).sum())
                if "block-angular" in metrics:
                    p_end = position[c] + span
                    if p_end <= len(kept):
                        end = kept[p_end] if p_end < len(kept) else num_layers
                        angles = token_angles(h_in.double(), local_inputs[end][b].double()) / math.pi
                        ang_sum[c] += float(angles.sum())
                    else:
                        ang_sum[c] = math.inf
    return bi_sum, ang_sum


def _distance_scores(e2e: list[str], candidates: list[int], finals: _Finals, progress: bool) -> dict:
    """{distance metric: {candidate: distance}} between the reference and each skipping stream's final
    outputs, one candidate at a time (only one perturbed copy is concatenated at once)."""
    scores: dict[str, dict[int, float]] = {}
    distances = [m for m in e2e if m != "nll"]
    if distances:
        reference = torch.cat(finals.ref_parts)
        for c in bar(candidates, desc="depth: distances", disable=not progress):
            perturbed = torch.cat(finals.skip_parts[c])
            for m in distances:
                scores.setdefault(m, {})[c] = DISTANCES[m](reference, perturbed)
    return scores
