"""Recovery losses on the final hidden states, computed and back-propagated in row chunks.

The (tokens x vocab) logits are the largest tensors of a language-model step (SmolLM2: 49,152
floats per token). Here the student's and the teacher's final-normed hidden states are computed
for the whole micro-batch, then the LM head, the loss and its backward run for `chunk_rows`
supervised positions at a time: each chunk's gradient reaches the LM head weights and a
(tokens x hidden) gradient buffer at once, and the body of the student gets that buffer in one
backward call at the end. So no full logits tensor of either model exists at any time, and
nothing is computed twice (unlike checkpointing the head). The gradient with respect to a chunk's
logits is written out (softmax minus the target distribution), not back-propagated through the
log-softmaxes.

Objectives (per supervised token, averaged over the supervised tokens of an optimiser step):
  kd  kd_ratio * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - kd_ratio) * CE(z_s, y)
      [+ hidden_weight * mean over student layers j of ||h_s,j - h_t,m(j)||^2 / ||h_t,m(j)||^2]
  ce  CE(z_s, y): plain causal-LM cross-entropy, no teacher
The teacher's terms come from the teacher model, or from a teacher-logit cache (a `CachedTeacher`,
secateurs.recovery.teacher_cache): its top-K log-probabilities at T and the log of the mass left. Then the
KL is taken over the K tokens plus one "rest" bucket, the teacher's remaining mass against the student's
(`top_k_terms`): with K = the vocabulary it is the KL above, value and gradient.
The optional hidden-state term matches the output of student layer j with the output of the teacher
layer m(j) it came from (the plan's kept layers: identity for width and HARP pruning, the kept
indices after depth pruning), normalised by the teacher's norm so every layer weighs alike.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from secateurs.adapters import get_adapter
from secateurs.recovery.settings import OBJECTIVES  # noqa: F401 - re-exported: the objectives' names
from secateurs.runtime.offload import input_device

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Objective:
    kind: str = "kd"
    kd_ratio: float = 1.0
    temperature: float = 1.0
    chunk_rows: int = 256
    hidden_weight: float = 0.0
    layer_map: tuple[int, ...] | None = None  # student decoder layer j -> teacher layer index
    bf16: bool = False  # run the models under bfloat16 autocast (GPUs); losses stay in float32

    @property
    def uses_hidden(self) -> bool:
        return self.kind == "kd" and self.hidden_weight > 0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "kd_ratio": self.kd_ratio if self.kind == "kd" else 0.0,
                "temperature": self.temperature if self.kind == "kd" else None, "chunk_rows": self.chunk_rows,
                "hidden_weight": self.hidden_weight if self.uses_hidden else 0.0,
                "layer_map": list(self.layer_map) if self.uses_hidden and self.layer_map else None,
                "bf16_autocast": self.bf16,
                "formula": ("kd_ratio * T^2 * KL(teacher || student) + (1 - kd_ratio) * CE" if self.kind == "kd"
                            else "causal-LM cross-entropy")}


@dataclass(frozen=True)
class TopK:
    """A cached teacher's rows: log-probabilities at T of its K most likely tokens (rows x K), their token
    ids (rows x K) and the log of the rest of the mass, log(1 - sum of the K probabilities) (rows; -inf
    when K is the vocabulary)."""

    values: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor

    def __getitem__(self, part: slice) -> TopK:
        return TopK(self.values[part], self.indices[part], self.rest[part])


class CachedTeacher:
    """A teacher known by its cached outputs (secateurs.recovery.teacher_cache), passed where the teacher
    model goes."""

    def rows(self, ids: torch.Tensor, labels: torch.Tensor, device) -> TopK:
        """The rows of every supervised position of the sequences `ids` (their `labels` other than
        IGNORE_INDEX from the second token on), in the order of `[:, :-1][mask]`, on `device`."""
        raise NotImplementedError


@contextmanager
def layer_outputs(model, indices):
    """{index: output hidden states} of the chosen decoder layers during the forward inside the block."""
    layers = get_adapter(model).decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}

    def hook(index):
        def store(module, args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
        return store

    handles = [layers[i].register_forward_hook(hook(i)) for i in indices]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states (batch, seq, hidden): the decoder without its LM head."""
    decoder = get_adapter(model).decoder(model)
    return decoder(input_ids=ids.to(input_device(model)), use_cache=False).last_hidden_state


def _autocast(objective: Objective, device: torch.device):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=objective.bf16)


def _at_least_float32(z: torch.Tensor) -> torch.Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _chunk_terms(objective: Objective, z_s: torch.Tensor, z_t: torch.Tensor | None, targets: torch.Tensor, *,
                 with_grad: bool, with_metrics: bool) -> tuple[float, dict, torch.Tensor | None]:
    """Summed loss of one chunk (float32), its gradient with respect to z_s (with_grad) and, for
    validation, summed NLL and KL at T = 1.

    The gradient is written out (softmax minus the target distribution) instead of back-propagated
    through two log-softmaxes: autograd's path makes a dozen fresh (rows x vocab) tensors a chunk,
    ~1.2 s of a ~5 s SmolLM2 kd step on 2 CPU cores (torch profiler), this one ~0.6 s. Every pass
    after the log-softmaxes and the teacher's probabilities works in place."""
    if isinstance(z_t, TopK):
        return top_k_terms(objective, z_s, z_t, targets, with_grad=with_grad, with_metrics=with_metrics)
    with torch.no_grad():
        z_s = _at_least_float32(z_s.detach())
        log_ps = F.log_softmax(z_s, dim=-1)
        nll = float(-log_ps.gather(-1, targets[:, None]).sum())
        kd = objective.kind == "kd" and z_t is not None
        ce_weight = 1.0 - objective.kd_ratio if kd else 1.0
        loss = ce_weight * nll if ce_weight else 0.0
        metrics = {"nll": nll} if with_metrics else {}
        grad = None
        if kd:
            t, kd_weight = objective.temperature, objective.kd_ratio
            z_t = _at_least_float32(z_t)
            log_pt = F.log_softmax(z_t if t == 1.0 else z_t / t, dim=-1)
            log_ps_t = log_ps if t == 1.0 else F.log_softmax(z_s / t, dim=-1)
            p_t = log_pt.exp()
            kl = log_pt.sub_(log_ps_t).mul_(p_t).sum(-1)  # KL(p_t || p_s) per row, at T
            loss += kd_weight * t * t * float(kl.sum())
            if with_metrics:
                if t != 1.0:
                    log_pt1 = F.log_softmax(z_t, dim=-1)
                    kl = log_pt1.exp().mul_(log_pt1.sub_(log_ps)).sum(-1)
                metrics["kl"] = float(kl.sum())
            if with_grad:  # d/dz_s of kd * T^2 * KL at T is kd * T * (softmax(z_s / T) - p_t)
                if t == 1.0:
                    grad = log_ps.exp_().sub_(p_t, alpha=kd_weight)  # p_s (kd + ce weights = 1) - kd * p_t
                else:
                    grad = log_ps_t.exp_().sub_(p_t).mul_(kd_weight * t)
                    if ce_weight:
                        grad.add_(log_ps.exp_(), alpha=ce_weight)
        elif with_grad:
            grad = log_ps.exp_()
        if grad is not None and ce_weight:  # d/dz_s of CE is softmax(z_s) - onehot(y)
            grad[torch.arange(targets.numel(), device=grad.device), targets] -= ce_weight
    return loss, metrics, grad


def top_k_terms(objective: Objective, z_s: torch.Tensor, top: TopK, targets: torch.Tensor, *, with_grad: bool,
                with_metrics: bool) -> tuple[float, dict, torch.Tensor | None]:
    """`_chunk_terms` with a cached teacher: the KL at T over the teacher's K tokens and one bucket of the
    rest, p_r = exp(top.rest) against the student's q_r = the mass of its other tokens. Its gradient with
    respect to z_s / T is q minus a target that is p on the K tokens and p_r * q_m / q_r on every other
    token m (the rest's mass spread as the student spreads it); with K = the vocabulary, q - p. The
    validation KL ("kl") is this KL at the cache's temperature."""
    with torch.no_grad():
        z_s = _at_least_float32(z_s.detach())
        log_ps = F.log_softmax(z_s, dim=-1)
        nll = float(-log_ps.gather(-1, targets[:, None]).sum())
        t, kd_weight = objective.temperature, objective.kd_ratio
        ce_weight = 1.0 - kd_weight
        log_q = log_ps if t == 1.0 else F.log_softmax(z_s / t, dim=-1)
        index, log_p, rest = top.indices.long(), top.values.to(log_q.dtype), top.rest.to(log_q.dtype)
        outside = log_q.scatter(-1, index, float("-inf"))  # the student's log-probabilities off the K tokens
        log_q_rest = torch.logsumexp(outside, dim=-1)
        p, p_rest = log_p.exp(), rest.exp()
        kl = p.mul(log_p - log_q.gather(-1, index)).sum(-1)
        kl += torch.where(p_rest > 0, p_rest * (rest - log_q_rest), torch.zeros_like(p_rest))
        loss = kd_weight * t * t * float(kl.sum()) + (ce_weight * nll if ce_weight else 0.0)
        metrics = {"nll": nll, "kl": float(kl.sum())} if with_metrics else {}
        if not with_grad:
            return loss, metrics, None
        shift = torch.where(torch.isfinite(log_q_rest), log_q_rest, torch.zeros_like(log_q_rest))
        target = outside.sub_(shift[:, None]).exp_().mul_(p_rest[:, None]).scatter_(-1, index, p)
        grad = log_q.exp().sub_(target).mul_(kd_weight * t)
        if ce_weight:  # d/dz_s of CE is softmax(z_s) - onehot(y)
            grad.add_(log_ps.exp(), alpha=ce_weight)
            grad[torch.arange(targets.numel(), device=grad.device), targets] -= ce_weight
    return loss, metrics, grad


def _hidden_term(objective: Objective, student_out: dict, teacher_out: dict, mask: torch.Tensor,
                 backward: bool) -> torch.Tensor:
    """The per-token mean over student layers j of ||h_s,j - h_t,m(j)||^2 / ||h_t,m(j)||^2, summed over tokens."""
    with torch.set_grad_enabled(backward):
        terms = []
        for j, source in enumerate(objective.layer_map):
            h_s = student_out[j][:, :-1][mask]
            h_t = teacher_out[source][:, :-1][mask.to(h_s.device)].to(h_s.device)
            h_s, h_t = _at_least_float32(h_s), _at_least_float32(h_t)
            terms.append((h_s - h_t).pow(2).sum(-1) / h_t.pow(2).sum(-1).clamp_min(1e-12))
        return torch.stack(terms).mean(0).sum()


def chunked_loss(student, teacher, ids: torch.Tensor, labels: torch.Tensor, objective: Objective, *,
                 scale: float = 1.0, backward: bool = True, body=None, teacher_body=None) -> dict:
    """Loss of one micro-batch; with backward=True its gradient (times `scale`) is accumulated into
    the student's .grad. Returns summed loss, NLL, KL (validation) and the supervised token count.
    `body(ids)` gives the student's final hidden states (default: final_hidden; a sharded student's
    root module, secateurs.runtime.sharding); `teacher_body(ids)` the teacher's (a sharded teacher's root,
    its weights left gathered for the head chunks)."""
    adapter_s = get_adapter(student)
    device = input_device(student)
    targets = labels[:, 1:].to(device)
    mask = targets != IGNORE_INDEX
    use_hidden = objective.uses_hidden and teacher is not None
    student_layers = range(len(objective.layer_map)) if use_hidden else ()
    with torch.set_grad_enabled(backward), layer_outputs(student, student_layers) as student_out, \
            _autocast(objective, device):
        hidden = (final_hidden(student, ids) if body is None else body(ids.to(device)))[:, :-1][mask]
    teacher_rows = None
    if isinstance(teacher, CachedTeacher):
        teacher_rows = teacher.rows(ids, labels, device)
    elif objective.kind == "kd" and teacher is not None:
        with torch.no_grad(), layer_outputs(teacher, sorted(set(objective.layer_map or ())) if use_hidden else ()) \
                as teacher_out:
            with _autocast(objective, input_device(teacher)):
                teacher_ids = ids.to(input_device(teacher))
                whole = final_hidden(teacher, teacher_ids) if teacher_body is None else teacher_body(teacher_ids)
                teacher_rows = whole[:, :-1][mask.to(input_device(teacher))].to(device)
    targets = targets[mask]
    rows = hidden.detach().requires_grad_(backward)
    sums = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "hidden": 0.0, "tokens": int(targets.numel())}
    hidden_loss = None
    if use_hidden:
        total = _hidden_term(objective, student_out, teacher_out, mask, backward)
        with torch.set_grad_enabled(backward):
            hidden_loss = objective.hidden_weight * total
        sums["hidden"] = total.item()
        sums["loss"] += hidden_loss.item()
    for start in range(0, rows.shape[0], objective.chunk_rows):
        part = slice(start, start + objective.chunk_rows)
        z_t = _teacher_chunk(teacher, teacher_rows, part, objective, device)
        with torch.set_grad_enabled(backward), _autocast(objective, device):
            z_s = adapter_s.logits(student, rows[part])
        loss, metrics, grad = _chunk_terms(objective, z_s, z_t, targets[part], with_grad=backward,
                                           with_metrics=not backward)
        del z_t
        if backward:
            z_s.backward(grad.mul_(scale).to(z_s.dtype))
        sums["loss"] += loss
        for k, v in metrics.items():
            sums[k] += v
    if backward:
        outputs, grads = ([hidden], [rows.grad]) if rows.grad is not None else ([], [])
        if hidden_loss is not None:
            outputs.append(hidden_loss * scale)
            grads.append(None)
        if outputs:
            torch.autograd.backward(outputs, grads)
    return sums


def _teacher_chunk(teacher, rows, part: slice, objective: Objective, device) -> torch.Tensor | TopK | None:
    """The teacher's terms of one chunk of supervised positions: its logits from its final hidden `rows`,
    or the cached rows (a TopK); None without a teacher."""
    if rows is None or isinstance(rows, TopK):
        return None if rows is None else rows[part]
    with torch.no_grad(), _autocast(objective, input_device(teacher)):
        return get_adapter(teacher).logits(teacher, rows[part].to(input_device(teacher))).to(device)
