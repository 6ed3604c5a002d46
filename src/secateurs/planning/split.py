"""The attention share chosen by the data: each candidate share gives a plan, the plan is tried
by masking (zeroing the o_proj / down_proj input columns of what it removes, which equals surgery
exactly) and scored by the KL divergence from the dense model's next-token distribution on a few
calibration batches; the smallest KL wins. The candidates and their KL go into the plan."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from secateurs.adapters import get_adapter
from secateurs.errors import SecateursError
from secateurs.planning.plan import PruningPlan
from secateurs.runtime.offload import input_device, refuse_offloaded
from secateurs.runtime.progress import bar

# Candidate shares as fractions of the balanced share (attention's part of the prunable parameters).
CANDIDATE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


@contextlib.contextmanager
def masked(model, plan: PruningPlan):
    """The model with the plan's removed heads and neurons masked, restored on exit."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    saved = []
    try:
        with torch.no_grad():
            for lp in plan.layers:
                heads, _, neurons = plan.resolve_layer(lp)
                layer = layers[lp.index]
                d = adapter.head_dim(layer)
                for linear, kept, width in ((adapter.attention_output_linear(layer), heads, d),
                                            (adapter.mlp_output_linear(layer), neurons, 1)):
                    gone = torch.ones(linear.in_features, dtype=torch.bool)
                    gone[(torch.as_tensor(kept)[:, None] * width + torch.arange(width)).reshape(-1)] = False
                    if gone.any():
                        gone = gone.to(linear.weight.device)
                        saved.append((linear.weight, gone, linear.weight[:, gone].clone()))
                        linear.weight[:, gone] = 0
        yield model
    finally:
        with torch.no_grad():
            for weight, gone, values in saved:
                weight[:, gone] = values


def unpadded_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The rows of a right-padded batch without their padding, rows of one length together: a whole
    model's forward over padding can turn real tokens NaN (eager attention multiplies the zero
    weight of a padded key by the NaN its fully masked row produced), and unpadded rows need no mask."""
    lengths = attention_mask.sum(1)
    if not all(bool(attention_mask[i, :n].all()) for i, n in enumerate(lengths.tolist())):
        raise SecateursError("the attention share search needs right-padded calibration batches (real tokens first)")
    for length in sorted(set(lengths.tolist())):
        if length > 0:
            yield input_ids[lengths == length, :length]


def _kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of KL(dense || pruned), number of tokens)."""
    p = torch.log_softmax(dense_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return float(kl.sum()), kl.numel()


def _kept(plan: PruningPlan) -> tuple:
    return tuple(tuple(map(tuple, plan.resolve_layer(lp))) for lp in plan.layers)


def _scored_as(plans: dict) -> dict:
    """share -> the first share whose plan keeps the same structures: on a GQA model several shares
    round to the same whole KV groups (e.g. none removed), and each distinct plan is scored once."""
    first: dict = {}
    return {share: first.setdefault(_kept(plan), share) for share, plan in plans.items()}


@torch.inference_mode()
def choose_attention_share(model, calibration, shares: list[float], plan_for: Callable[[float], PruningPlan],
                           samples: int, progress: bool = True) -> tuple[float, dict]:
    """(the share with the lowest calibration KL, evidence for the plan's provenance)."""
    refuse_offloaded(model, "choosing the attention share by masking")
    plans = {share: plan_for(share) for share in dict.fromkeys(shares)}
    scored_as = _scored_as(plans)
    tried = {share: plans[share] for share in dict.fromkeys(scored_as.values())}
    device = input_device(model)
    totals = {share: [0.0, 0] for share in tried}
    used = 0
    for batch in bar(calibration.batches, desc="attention share", disable=not progress):
        if used >= samples:
            break
        rows = batch["attention_mask"][: samples - used]
        used += rows.shape[0]
        for ids in unpadded_groups(batch["input_ids"][: rows.shape[0]], rows):
            ids = ids.to(device)
            dense = model(input_ids=ids, use_cache=False).logits
            for share, plan in tried.items():
                with masked(model, plan):
                    kl, tokens = _kl(dense, model(input_ids=ids, use_cache=False).logits)
                totals[share][0] += kl
                totals[share][1] += tokens
    kl = {share: total / max(tokens, 1) for share, (total, tokens) in totals.items()}
    table = [{"attention_share": share, "kl": kl[scored_as[share]]} for share in plans]
    best = min(table, key=lambda row: (row["kl"], row["attention_share"]))
    evidence = {"rule": "search", "metric": "mean KL(dense || pruned) per next token, by masking",
                "samples": used, "tokens": next(iter(totals.values()))[1], "candidates": table,
                "attention_share": best["attention_share"]}
    return best["attention_share"], evidence
