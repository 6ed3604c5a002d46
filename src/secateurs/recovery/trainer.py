"""The recovery training loop: AdamW, warm-up + decay from transformers.get_scheduler, gradient
accumulation and clipping, optional gradient checkpointing, periodic validation with early stop,
atomic checkpoints and a bit-identical resume.

Determinism: the data order is a function of (seed, position) only (one seeded permutation of the
training sequences per epoch), and a checkpoint holds everything else the next step depends on:
the trainable weights, the optimiser and scheduler states, the torch RNG state (LoRA dropout) and
the step. A run stopped after k steps and resumed therefore ends with the same weights, to the bit,
as the run that never stopped (on the same machine and thread count).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from secateurs.allocator import retain_freed_memory
from secateurs.errors import SecateursError
from secateurs.output import write_folder
from secateurs.progress import bar as progress_bar
from secateurs.recovery.data import RecoveryData
from secateurs.recovery.objectives import IGNORE_INDEX, Objective, chunked_loss

STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "trainable.safetensors"
BEST_FILE = "best.safetensors"
SETTINGS_FILE = "settings.json"


class RecoveryError(SecateursError):
    """Recovery cannot go on: non-finite loss or weights, a checkpoint of another run, ..."""


@dataclass
class LoopSettings:
    tokens: int
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # steps; None: about ten validations per run
    patience: int | None = 3  # validations without improvement before stopping; None: never stop early
    save_every: int | None = None  # steps between checkpoints; None: no checkpoints
    seed: int = 0
    data_offset: int = 0  # training sequences of the seeded order that earlier runs used: start after them

    def steps(self, seq_len: int) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * self.grad_accum * seq_len)))

    def validation_interval(self, seq_len: int) -> int:
        return self.eval_every or max(1, self.steps(seq_len) // 10)


class DataOrder:
    """Training sequence indices for micro-batch m: a seeded permutation per epoch, so the order
    depends on nothing but the seed and the position (what resume needs). `offset` sequences of the
    order are skipped: a run that continues an earlier one's data (Consensus's rounds) sees new text."""

    def __init__(self, num_sequences: int, batch_size: int, seed: int, offset: int = 0):
        self.n, self.batch_size, self.seed, self.offset = num_sequences, batch_size, seed, offset
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms[epoch] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return self._perms[epoch]

    def batch(self, micro_batch: int) -> torch.Tensor:
        start = self.offset + micro_batch * self.batch_size
        positions = range(start, start + self.batch_size)
        return torch.stack([self._perm(p // self.n)[p % self.n] for p in positions])

    def epochs(self, micro_batches: int) -> float:
        return micro_batches * self.batch_size / self.n


def _finite_or_raise(value: float, what: str, step: int) -> None:
    if not math.isfinite(value):
        raise RecoveryError(f"{what} became {value} at step {step}; nothing was saved. Lower the learning rate "
                            "(--lr), or check the data")


class RecoveryLoop:
    """Trains the parameters of `student` that require grad (all of them, or the LoRA adapters)."""

    def __init__(self, student, teacher, data: RecoveryData, objective: Objective, settings: LoopSettings,
                 checkpoint_dir: str | os.PathLike | None = None, fingerprint: dict | None = None,
                 progress: bool = True, on_validation=None, on_step=None, inputs=()):
        self.student, self.teacher, self.data, self.objective, self.s = student, teacher, data, objective, settings
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.fingerprint = json.loads(json.dumps(fingerprint or {}, default=str))
        self.progress, self.on_validation, self.on_step = progress, on_validation, on_step
        self.inputs = list(inputs)  # files the checkpoint folder may not be, contain or lie in
        self.params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        if not self.params:
            raise RecoveryError("nothing to train: no parameter of the student requires grad")
        decay = [p for n, p in self.params.items() if p.dim() >= 2]
        no_decay = [p for n, p in self.params.items() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop: on a 2-core
        # CPU the default AdamW step took ~20% of a SmolLM2 full fine-tuning step.
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in self.params.values())
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr, betas=settings.betas,
                                           fused=fused)
        self.total_steps = settings.steps(data.seq_len)
        self.warmup_steps = int(round(settings.warmup_ratio * self.total_steps))
        self.scheduler = get_scheduler(settings.scheduler, self.optimizer, num_warmup_steps=self.warmup_steps,
                                       num_training_steps=self.total_steps)
        self.order = DataOrder(len(data.train_ids), settings.batch_size, settings.seed, settings.data_offset)
        self.step = 0
        self.history: dict = {"train": [], "val": [], "seconds": 0.0, "validation_seconds": 0.0,
                              "resumed_at_steps": []}
        self.best: dict | None = None  # {"step", "loss"} of the best validation so far (the start included)
        self.bad_validations = 0

    # -- validation ------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Objective, NLL (perplexity) and KL at T = 1 over the held-out sequences, student in eval mode."""
        ids, labels = self.data.val_ids, self.data.val_labels
        if len(ids) == 0:
            return {}
        started = time.perf_counter()
        was_training = self.student.training
        self.student.eval()
        totals = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "hidden": 0.0, "tokens": 0}
        for start in range(0, len(ids), self.s.batch_size):
            part = slice(start, start + self.s.batch_size)
            sums = chunked_loss(self.student, self.teacher, ids[part], labels[part], self.objective, backward=False)
            for k in totals:
                totals[k] += sums[k]
        self.student.train(was_training)
        n = max(1, totals["tokens"])
        out = {"step": self.step, "tokens": self.step * self.tokens_per_step, "loss": totals["loss"] / n,
               "nll": totals["nll"] / n, "perplexity": math.exp(min(totals["nll"] / n, 700.0))}
        if self.teacher is not None and self.objective.kind == "kd":
            out["kl"] = totals["kl"] / n
            if self.objective.uses_hidden:
                out["hidden"] = totals["hidden"] / n
        _finite_or_raise(out["loss"], "the validation loss", self.step)
        self.history["validation_seconds"] += time.perf_counter() - started
        return out

    @property
    def tokens_per_step(self) -> int:
        return self.s.batch_size * self.s.grad_accum * self.data.seq_len

    # -- one optimiser step ----------------------------------------------------------
    def train_step(self) -> dict:
        micro = [self.order.batch(self.step * self.s.grad_accum + a) for a in range(self.s.grad_accum)]
        supervised = sum(int((self.data.train_labels[i, 1:] != IGNORE_INDEX).sum()) for i in micro)
        scale = 1.0 / max(1, supervised)
        loss = 0.0
        for index in micro:
            sums = chunked_loss(self.student, self.teacher, self.data.train_ids[index], self.data.train_labels[index],
                                self.objective, scale=scale)
            loss += sums["loss"]
        loss *= scale
        _finite_or_raise(loss, "the training loss", self.step)
        params = list(self.params.values())
        if self.s.max_grad_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.s.max_grad_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        _finite_or_raise(norm, "the gradient norm", self.step)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "tokens": self.step * self.tokens_per_step, "loss": loss, "lr": lr,
                "grad_norm": norm}

    # -- the run -----------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        if resume:
            self._load_checkpoint()
        if any(p.device.type == "cpu" for p in self.params.values()):  # steps allocate and free hundreds of MB
            self.history["allocator"] = retain_freed_memory()
        started = time.perf_counter()
        seconds_before = self.history["seconds"]
        bar = progress_bar(total=self.total_steps * self.tokens_per_step, initial=self.step * self.tokens_per_step,
                           unit="tok", unit_scale=True, desc="recover", disable=not self.progress, smoothing=0.1)
        interval = self.s.validation_interval(self.data.seq_len)
        stopped_early = False
        try:
            if not resume:  # under the bar, which ticks meanwhile
                self._record_validation(self.validate())
            self.student.train()
            while self.step < self.total_steps:
                record = self.train_step()
                self.history["train"].append(record)
                bar.update(self.tokens_per_step)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                last = self.step == self.total_steps
                if self.step % interval == 0 or last:
                    stopped_early = self._record_validation(self.validate())
                    if self.history["val"]:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{self.history['val'][-1]['loss']:.4f}")
                self.history["seconds"] = seconds_before + time.perf_counter() - started
                if self.s.save_every and self.checkpoint_dir and (self.step % self.s.save_every == 0) and not last:
                    self._save_checkpoint()
                if self.on_step is not None:
                    self.on_step(record, self)
                if stopped_early:
                    break
        finally:
            bar.close()
        self.student.eval()
        restored = self._restore_best()
        self.history.update(stopped_early=stopped_early, steps_done=self.step, total_steps=self.total_steps,
                            warmup_steps=self.warmup_steps, restored_best_step=restored,
                            best_step=self.best["step"] if self.best else None)
        return self.history

    def _record_validation(self, val: dict) -> bool:
        """Keep the curve and the best weights; True when patience is exhausted.

        Patience counts validations that do not beat the best *trained* one, not the start: a model
        that was already recovered (a Consensus round, a second run) first rises above its starting
        loss at the peak learning rate, and three such validations used to end the run and hand back
        the untrained weights (measured: an AMP round at 30% kept 153.0 WikiText perplexity where
        training through reached 135.8). The start still counts for which weights are kept, so a run
        that only gets worse ends where it began."""
        if not val:
            return False
        self.history["val"].append(val)
        if self.on_validation is not None:  # sees the model as validation does: eval mode, no dropout
            was_training = self.student.training
            self.student.eval()
            self.on_validation(val, self.student)
            self.student.train(was_training)
        if self.best is None or val["loss"] < self.best["loss"]:
            self.best = {"step": val["step"], "loss": val["loss"]}
            self._best_weights = {n: p.detach().clone() for n, p in self.params.items()} if self.s.patience else None
        if val["step"] == 0:
            return False
        trained_before = [v["loss"] for v in self.history["val"][:-1] if v["step"] > 0]
        if not trained_before or val["loss"] < min(trained_before):
            self.bad_validations = 0
            return False
        self.bad_validations += 1
        return bool(self.s.patience) and self.bad_validations >= self.s.patience

    def _restore_best(self) -> int | None:
        """After early stopping (or a last validation worse than the best), go back to the best weights."""
        weights = getattr(self, "_best_weights", None)
        if not self.s.patience or weights is None or not self.history["val"]:
            return None
        if self.history["val"][-1]["loss"] <= self.best["loss"]:
            return None
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(weights[n])
        return self.best["step"]

    # -- checkpoints ---------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(), "history": json.dumps(self.history), "best": json.dumps(self.best),
                "bad_validations": self.bad_validations}

    def _save_checkpoint(self) -> None:
        """Through secateurs' one writer: built beside the folder, swapped in whole."""
        with write_folder(self.checkpoint_dir, force=True, inputs=self.inputs, kind="recovery-checkpoint",
                          what="checkpoint folder") as tmp:
            save_file({n: p.detach().contiguous() for n, p in self.params.items()}, tmp / WEIGHTS_FILE)
            if getattr(self, "_best_weights", None) is not None:
                save_file({n: t.contiguous() for n, t in self._best_weights.items()}, tmp / BEST_FILE)
            torch.save(self._state(), tmp / STATE_FILE)
            (tmp / SETTINGS_FILE).write_text(json.dumps(self.fingerprint, indent=2, sort_keys=True) + "\n")

    def check_resumable(self) -> None:
        """Refuse, before any work, a missing checkpoint or one written by a run with other settings."""
        folder = self.checkpoint_dir
        if folder is None or not (folder / STATE_FILE).is_file():
            raise RecoveryError(f"--resume: no checkpoint in {folder}; run without --resume (and with --save-every)")
        saved = json.loads((folder / SETTINGS_FILE).read_text())
        if saved != self.fingerprint:
            diffs = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            raise RecoveryError(f"--resume: the checkpoint in {folder} was written by a run with other settings "
                                f"({', '.join(diffs)}); resume with the same arguments or start afresh")

    def _load_checkpoint(self) -> None:
        self.check_resumable()
        folder = self.checkpoint_dir
        weights = load_file(folder / WEIGHTS_FILE)
        if set(weights) != set(self.params):
            raise RecoveryError(f"--resume: the checkpoint in {folder} holds other trainable weights")
        state = torch.load(folder / STATE_FILE, weights_only=True)
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(weights[n])
        if (folder / BEST_FILE).is_file():
            self._best_weights = load_file(folder / BEST_FILE)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = json.loads(state["history"])
        self.history["resumed_at_steps"].append(self.step)
        self.best = json.loads(state["best"])
        self.bad_validations = int(state["bad_validations"])


def settings_dict(settings: LoopSettings) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}
