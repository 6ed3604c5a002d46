"""Recovery losses on the final hidden states, computed and back-propagated in row chunks.

The (tokens x vocab) logits are the largest tensors of a language-model step (SmolLM2: 49,152
floats per token). Here the student's and the teacher's final-normed hidden states are computed
for the whole micro-batch, then the LM head, the loss and its backward run for `chunk_rows`
supervised positions at a time: each chunk's gradient reaches the LM head weights and a
(tokens x hidden) gradient buffer at once, and the body of the student gets that buffer in one
backward call at the end. So no full logits tensor of either model exists at any time, and
nothing is computed twice (unlike checkpointing the head).

Objectives (per supervised token, averaged over the supervised tokens of an optimiser step):
  kd  kd_ratio * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - kd_ratio) * CE(z_s, y)
  ce  CE(z_s, y): plain causal-LM cross-entropy, no teacher
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from secateurs.adapters import get_adapter
from secateurs.offload import input_device

IGNORE_INDEX = -100
OBJECTIVES = ("kd", "ce")


@dataclass(frozen=True)
class Objective:
    kind: str = "kd"
    kd_ratio: float = 1.0
    temperature: float = 1.0
    chunk_rows: int = 256

    def to_dict(self) -> dict:
        return {"kind": self.kind, "kd_ratio": self.kd_ratio if self.kind == "kd" else 0.0,
                "temperature": self.temperature if self.kind == "kd" else None, "chunk_rows": self.chunk_rows,
                "formula": ("kd_ratio * T^2 * KL(teacher || student) + (1 - kd_ratio) * CE" if self.kind == "kd"
                            else "causal-LM cross-entropy")}


def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states (batch, seq, hidden): the decoder without its LM head."""
    decoder = get_adapter(model).decoder(model)
    return decoder(input_ids=ids.to(input_device(model)), use_cache=False).last_hidden_state


def _at_least_float32(z: torch.Tensor) -> torch.Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _chunk_terms(objective: Objective, z_s: torch.Tensor, z_t: torch.Tensor | None, targets: torch.Tensor,
                 with_metrics: bool) -> tuple[torch.Tensor, dict]:
    """Summed loss of one chunk (float32) and, for validation, summed NLL and KL at T = 1."""
    z_s = _at_least_float32(z_s)
    log_ps = F.log_softmax(z_s, dim=-1)
    nll = -log_ps.gather(-1, targets[:, None])[:, 0]
    metrics = {}
    if objective.kind == "ce" or z_t is None:
        loss = nll.sum()
    else:
        z_t = _at_least_float32(z_t)
        t = objective.temperature
        log_pt = F.log_softmax(z_t / t, dim=-1)
        log_ps_t = log_ps if t == 1.0 else F.log_softmax(z_s / t, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps_t)).sum(-1)
        loss = objective.kd_ratio * t * t * kl.sum()
        if objective.kd_ratio < 1.0:
            loss = loss + (1.0 - objective.kd_ratio) * nll.sum()
        if with_metrics:
            if t != 1.0:
                log_pt1 = F.log_softmax(z_t, dim=-1)
                kl = (log_pt1.exp() * (log_pt1 - log_ps)).sum(-1)
            metrics["kl"] = kl.sum().item()
    if with_metrics:
        metrics["nll"] = nll.sum().item()
    return loss, metrics


def chunked_loss(student, teacher, ids: torch.Tensor, labels: torch.Tensor, objective: Objective, *,
                 scale: float = 1.0, backward: bool = True) -> dict:
    """Loss of one micro-batch; with backward=True its gradient (times `scale`) is accumulated into
    the student's .grad. Returns summed loss, NLL, KL (validation) and the supervised token count."""
    adapter_s = get_adapter(student)
    device = input_device(student)
    targets = labels[:, 1:].to(device)
    mask = targets != IGNORE_INDEX
    with torch.set_grad_enabled(backward):
        hidden = final_hidden(student, ids)[:, :-1][mask]
    teacher_rows = None
    if objective.kind == "kd" and teacher is not None:
        with torch.no_grad():
            teacher_rows = final_hidden(teacher, ids)[:, :-1][mask.to(input_device(teacher))].to(device)
        adapter_t = get_adapter(teacher)
    targets = targets[mask]
    rows = hidden.detach().requires_grad_(backward)
    sums = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "tokens": int(targets.numel())}
    for start in range(0, rows.shape[0], objective.chunk_rows):
        part = slice(start, start + objective.chunk_rows)
        z_t = None
        if teacher_rows is not None:
            with torch.no_grad():
                z_t = adapter_t.logits(teacher, teacher_rows[part].to(input_device(teacher))).to(device)
        with torch.set_grad_enabled(backward):
            loss, metrics = _chunk_terms(objective, adapter_s.logits(student, rows[part]), z_t, targets[part],
                                         with_metrics=not backward)
            if backward:
                (loss * scale).backward()
        sums["loss"] += loss.item()
        for k, v in metrics.items():
            sums[k] += v
    if backward and rows.grad is not None:
        hidden.backward(rows.grad)
    return sums
