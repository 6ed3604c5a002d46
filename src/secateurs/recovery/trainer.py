"""The recovery training loop: AdamW, warm-up + decay from transformers.get_scheduler, gradient
accumulation and clipping, optional gradient checkpointing, periodic validation with early stop,
atomic checkpoints and a bit-identical resume.

Determinism: the data order is a function of (seed, position) only (one seeded permutation of the
training sequences per epoch), and a checkpoint holds everything else the next step depends on:
the trainable weights, the optimiser and scheduler states, the torch RNG state (LoRA dropout) and
the step. A run stopped after k steps and resumed therefore ends with the same weights, to the bit,
as the run that never stopped (on the same machine and thread count).

Several processes (secateurs.runtime.distributed): `batch_size` stays the global micro-batch. Every
process takes its contiguous share of each micro-batch of the one-process order, the gradients
(scaled by the supervised tokens of the whole step) are summed over the processes before clipping,
and the training and validation sums too, so every process takes the same step and the same
decisions as one process would, up to the order of floating-point additions. Process 0 alone
writes checkpoints; the others wait for it.

Strategies: 'ddp' (above: every process holds the whole student and the gradients are all-reduced)
and 'fsdp' (secateurs.runtime.sharding: the student, its gradients and the optimiser's moments sharded
over the processes, the gradients reduce-scattered as sums; same data shares and the same step as one
process). An fsdp run writes sharded checkpoints (secateurs.runtime.sharded_checkpoint, in SHARDS_DIR
beside the trainer state), in one process too, so that any number of processes resumes them; process
0 builds the folder beside the old one, every process writes its shards into it, then process 0
finishes and swaps it in whole.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from transformers import get_scheduler

from secateurs.adapters import get_adapter
from secateurs.errors import SecateursError
from secateurs.files.output import write_folder
from secateurs.recovery.allocator import retain_freed_memory
from secateurs.recovery.data import RecoveryData
from secateurs.recovery.memory import strategy_for
from secateurs.recovery.objectives import IGNORE_INDEX, Objective, chunked_loss, final_hidden
from secateurs.recovery.settings import SCHEDULERS, check_scheduler  # noqa: F401 - SCHEDULERS: re-exported
from secateurs.runtime import sharded_checkpoint, sharding
from secateurs.runtime.distributed import current as current_world
from secateurs.runtime.progress import bar as progress_bar

STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "trainable.safetensors"
BEST_FILE = "best.safetensors"
SETTINGS_FILE = "settings.json"
SHARDS_DIR = "shards"  # an fsdp run's checkpoint tensors (weights, optimiser moments, best weights)
# The schedulers the loop drives, and why the others are refused: secateurs.recovery.settings.SCHEDULERS.


class RecoveryError(SecateursError):
    """Recovery cannot go on: non-finite loss or weights, a checkpoint of another run, ..."""


def choose_strategy(student, teacher, settings, processes: int) -> str:
    """The strategy ('ddp' or 'fsdp') of a run whose strategy setting is 'auto': ddp, where every
    process holds the whole student, when it fits the device; else fsdp (the memory plan:
    secateurs.recovery.memory.strategy_for)."""
    return strategy_for(student, teacher, settings, processes)


def resolved_strategy(student, teacher, settings, processes: int) -> str:
    """The strategy setting, 'auto' chosen by choose_strategy."""
    return settings.strategy if settings.strategy != "auto" else choose_strategy(student, teacher, settings, processes)


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


@dataclass(frozen=True)
class Sharding:
    """How the processes hold the models: `strategy` 'ddp' (a whole student in every process) or 'fsdp' (the
    student sharded over them, checkpoints sharded), and with fsdp whether the `teacher` is sharded too."""

    strategy: str = "ddp"
    teacher: bool = False


class DataOrder:
    """Training sequence indices for micro-batch m: a seeded permutation per epoch, so the order
    depends on nothing but the seed and the position (what resume needs). `offset` sequences of the
    order are skipped: a run that continues an earlier one's data (Consensus's rounds) sees new text."""

    def __init__(self, num_sequences: int, batch_size: int, seed: int, offset: int = 0):
        self.n, self.batch_size, self.seed, self.offset = num_sequences, batch_size, seed, offset
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=generator)
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
                 progress: bool = True, on_validation=None, on_step=None, inputs=(), sharding: Sharding | None = None):
        self.student, self.teacher, self.data, self.objective, self.s = student, teacher, data, objective, settings
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.fingerprint = json.loads(json.dumps(fingerprint or {}, default=str))
        self.progress, self.on_validation, self.on_step = progress, on_validation, on_step
        self.inputs = list(inputs)  # files the checkpoint folder may not be, contain or lie in
        self.world = current_world()
        sharding = sharding or Sharding()
        self.strategy = sharding.strategy  # 'fsdp': sharded checkpoints, the student sharded over several processes
        self.sharded = self.teacher_sharded = None
        self._place_models(sharding.teacher and self.strategy == "fsdp" and isinstance(teacher, torch.nn.Module))
        self.body = self.sharded.root if self.sharded is not None else None  # the student's body, ids -> hidden
        self.params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        if settings.batch_size % self.world.size:
            raise RecoveryError(f"the training batch of {settings.batch_size} sequences does not split evenly over "
                                f"{self.world.size} processes; give --train-batch-size a multiple of {self.world.size}")
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
        check_scheduler(settings.scheduler, settings.lr)
        self.scheduler = get_scheduler(settings.scheduler, self.optimizer, num_warmup_steps=self.warmup_steps,
                                       num_training_steps=self.total_steps)
        self.order = DataOrder(len(data.train_ids), settings.batch_size, settings.seed, settings.data_offset)
        self.step = 0
        self.history: dict = {"train": [], "val": [], "seconds": 0.0, "validation_seconds": 0.0,
                              "resumed_at_steps": []}
        self.best: dict | None = None  # {"step", "loss"} of the best validation so far (the start included)
        self.bad_validations = 0

    def _place_models(self, shard_teacher: bool) -> None:
        """Shard the student (fsdp) and the teacher (`shard_teacher`) over the processes, and fill the
        models the other processes hold on the meta device (loaded once, by process 0) from process 0's
        weights (secateurs.runtime.sharding)."""
        student, teacher, world = self.student, self.teacher, self.world
        if world.size == 1:
            return
        device = sharding.training_device(student)
        once = [bool(n) for n in world.sum([float(sharding.on_meta(student)), float(sharding.on_meta(teacher))])]
        states = [sharding.full_state(m) if flag and world.main else None for m, flag in zip((student, teacher), once)]
        if self.strategy == "fsdp":
            self.sharded = sharding.shard(student, get_adapter(student).decoder_layers(student), final_hidden,
                                          device=device, processes=world.size, bf16=self.objective.bf16, home=device)
        if shard_teacher:
            self.teacher_sharded = sharding.shard(teacher, get_adapter(teacher).decoder_layers(teacher), final_hidden,
                                                  device=device, processes=world.size, bf16=self.objective.bf16)
        for model, flag, state in zip((student, teacher), once, states):
            if flag:
                sharding.fill_from_main(model, state, device, world.main)
        if any(once):  # LoRA's initialisation drew numbers in process 0 alone: every process goes on from its state
            torch.set_rng_state(world.from_main(torch.get_rng_state))

    def _teacher_body(self, ids: torch.Tensor) -> torch.Tensor:
        """A sharded teacher's final hidden states, its root group left gathered for the head chunks."""
        hidden = self.teacher_sharded.root(ids)
        self.teacher_sharded.root.unshard()
        return hidden

    def _loss(self, ids, labels, **keywords) -> dict:
        """chunked_loss of the models as placed; a sharded teacher's root group freed after it."""
        sums = chunked_loss(self.student, self.teacher, ids, labels, self.objective, body=self.body,
                            teacher_body=self._teacher_body if self.teacher_sharded is not None else None, **keywords)
        if self.teacher_sharded is not None:
            sharding.reshard(self.teacher_sharded)
        return sums

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
            part = self.world.share(start, min(start + self.s.batch_size, len(ids)))
            if part.stop == part.start:
                if self.sharded is None:
                    continue
                # a sharded forward gathers weights with the other processes: run it on a sequence, unsummed
                self._loss(ids[start:start + 1], labels[start:start + 1], backward=False)
                continue
            sums = self._loss(ids[part], labels[part], backward=False)
            for k in totals:
                totals[k] += sums[k]
        if self.world.size > 1:
            totals = dict(zip(totals, self.world.sum(list(totals.values()))))
            totals["tokens"] = int(totals["tokens"])
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
        mine = self.world.share(0, self.s.batch_size)
        for index in micro:
            index = index[mine]
            sums = self._loss(self.data.train_ids[index], self.data.train_labels[index], scale=scale)
            loss += sums["loss"]
        params = list(self.params.values())
        if self.world.size > 1:
            loss = self.world.sum([loss])[0]
            if self.sharded is None:  # fsdp reduce-scatters the sums in backward
                self.world.sum_gradients(params)
        loss *= scale
        _finite_or_raise(loss, "the training loss", self.step)
        if self.s.max_grad_norm:  # of sharded gradients: the norm over every process's shards
            norm = float(sharding.full_value(torch.nn.utils.clip_grad_norm_(params, self.s.max_grad_norm)))
        elif self.sharded is not None:
            norm = float(sharding.full_value(torch.nn.utils.get_total_norm([p.grad for p in params
                                                                              if p.grad is not None])))
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
                           unit="tok", unit_scale=True, desc="recover", smoothing=0.1,
                           disable=not (self.progress and self.world.main))
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
        if self.sharded is not None:  # the trained student whole again in every process
            sharding.unshard(self.sharded)
            self.sharded = self.body = None
        if self.teacher_sharded is not None:  # the teacher back where it was
            sharding.unshard(self.teacher_sharded)
            self.teacher_sharded = None
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

    marker: dict | None = None  # the run identity every checkpoint's marker carries (secateurs.recovery.api)

    def _save_checkpoint(self) -> None:
        """Through secateurs' one writer: built beside the folder, swapped in whole (by process 0; the
        others wait until it is)."""
        if self.strategy == "fsdp":
            self._save_sharded_checkpoint()
        else:
            self.world.from_main(self._write_checkpoint)

    def _shard_tensors(self, optimizer_state: dict, best: dict | None) -> dict:
        """The tensors of a sharded checkpoint by key: the trainable weights, the optimiser's state of
        each, the best weights (each process's shards of them, or whole ones in one process)."""
        tensors = {f"weights/{n}": p.detach() for n, p in self.params.items()}
        for n, entry in optimizer_state.items():
            tensors.update({f"optimizer/{n}/{k}": v for k, v in entry.items()})
        tensors.update({f"best/{n}": t for n, t in (best or {}).items()})
        return tensors

    def _save_sharded_checkpoint(self) -> None:
        """Process 0 opens the folder beside the old one, every process writes its shards into it,
        process 0 adds the trainer state and swaps the folder in; the others wait for it."""
        if self.sharded is not None:
            sharding.reshard(self.sharded)
        optimizer_state = get_optimizer_state_dict(self.student, self.optimizer)
        tensors = self._shard_tensors(optimizer_state["state"], getattr(self, "_best_weights", None))
        stack = ExitStack()
        tmp = self.world.from_main(lambda: stack.enter_context(write_folder(
            self.checkpoint_dir, force=True, inputs=self.inputs, kind="recovery-checkpoint", what="checkpoint folder",
            marker=self.marker)))
        try:
            sharded_checkpoint.save(tmp / SHARDS_DIR, tensors)
            self.world.from_main(self._write_trainer_state, tmp, {"param_groups": optimizer_state["param_groups"]})
        except BaseException:
            stack.__exit__(*sys.exc_info())
            raise
        self.world.from_main(stack.close)

    def _write_trainer_state(self, tmp: Path, optimizer: dict) -> None:
        torch.save({**self._state(), "optimizer": optimizer}, tmp / STATE_FILE)
        (tmp / SETTINGS_FILE).write_text(json.dumps(self.fingerprint, indent=2, sort_keys=True) + "\n")

    def _write_checkpoint(self) -> None:
        with write_folder(self.checkpoint_dir, force=True, inputs=self.inputs, kind="recovery-checkpoint",
                          what="checkpoint folder", marker=self.marker) as tmp:
            save_file({n: p.detach().contiguous() for n, p in self.params.items()}, tmp / WEIGHTS_FILE)
            if getattr(self, "_best_weights", None) is not None:
                save_file({n: t.contiguous() for n, t in self._best_weights.items()}, tmp / BEST_FILE)
            torch.save(self._state(), tmp / STATE_FILE)
            (tmp / SETTINGS_FILE).write_text(json.dumps(self.fingerprint, indent=2, sort_keys=True) + "\n")

    # -- reading a checkpoint back: an untrusted folder, every file checked before the first step -----
    def check_resumable(self) -> None:
        """Refuse, before any work, a missing checkpoint, one written by a run with other settings, and a
        damaged one. Every file is read and checked (tensors only; names, shapes, dtypes and finite
        values of the weights; the types of the optimiser's and scheduler's states), so that nothing
        fails once training has started; what was read is kept for `_load_checkpoint`."""
        folder = self.checkpoint_dir
        files = (STATE_FILE, WEIGHTS_FILE, SETTINGS_FILE, SHARDS_DIR)
        if folder is None or not folder.is_dir() or not any((folder / name).exists() for name in files):
            raise RecoveryError(f"--resume: no checkpoint in {folder}; run without --resume (and with --save-every)")
        sharded = os.path.lexists(folder / SHARDS_DIR)
        if sharded != (self.strategy == "fsdp"):
            written, here = ("fsdp", self.strategy) if sharded else ("ddp", "fsdp")
            raise RecoveryError(f"--resume: the checkpoint in {folder} was written by a run with --strategy {written} "
                                f"({'sharded' if sharded else 'whole'} files) and this run's strategy is {here}; "
                                f"resume with --strategy {written}")
        saved = self._read_settings()
        if saved != self.fingerprint:
            diffs = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            raise RecoveryError(f"--resume: the checkpoint in {folder} was written by a run with other settings "
                                f"({', '.join(diffs)}); resume with the same arguments or start afresh")
        state = self._read_state()
        if sharded:
            self._checked_checkpoint = (state, *self._read_shards(state))
            return
        weights = self._read_weights(WEIGHTS_FILE)
        best_weights = None
        if os.path.lexists(folder / BEST_FILE):
            best_weights = self._read_weights(BEST_FILE)
        elif self.s.patience and state["best"] is not None:
            raise self._damaged(BEST_FILE, "is missing (the best validated weights, which early stopping returns to)")
        self._checked_checkpoint = (state, weights, best_weights, None)

    def _read_shards(self, state: dict) -> tuple[dict, dict | None, dict]:
        """(weights, best weights or None, optimiser state) read from the checked shards of a sharded
        checkpoint into new tensors of this run's shapes and sharding, all finite."""
        optimizer_state = get_optimizer_state_dict(self.student, self.optimizer)["state"]
        optimizer_state = {n: {k: v.clone() for k, v in entry.items()} for n, entry in optimizer_state.items()}
        weights = {n: p.detach().clone() for n, p in self.params.items()}
        best = {n: p.detach().clone() for n, p in self.params.items()} if state["best"] and self.s.patience else None
        tensors = self._shard_tensors(optimizer_state, best)
        tensors.update({f"weights/{n}": t for n, t in weights.items()})
        try:
            sharded_checkpoint.load(self.checkpoint_dir / SHARDS_DIR, tensors)
        except sharded_checkpoint.DamagedShards as exc:
            raise self._damaged(SHARDS_DIR, str(exc)) from None
        local = (sharding.local_value(t) for t in tensors.values())
        bad = sum(not bool(torch.isfinite(t).all()) for t in local if t.is_floating_point())
        bad += sum(float(sharding.local_value(e["step"]).min()) < 0 for e in optimizer_state.values() if "step" in e)
        if self.world.sum([bad])[0]:
            raise self._damaged(SHARDS_DIR, "hold non-finite values, or negative step counts")
        return weights, best, optimizer_state

    def _damaged(self, name: str, problem: str) -> RecoveryError:
        folder = self.checkpoint_dir
        return RecoveryError(f"--resume: the checkpoint in {folder} is damaged: {name} {problem}. Nothing was "
                             f"trained; remove {folder} and run without --resume (training starts afresh)")

    def _read_settings(self) -> dict:
        path = self.checkpoint_dir / SETTINGS_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise self._damaged(SETTINGS_FILE, "is missing") from None
        except UnicodeDecodeError:
            raise self._damaged(SETTINGS_FILE, "is not text (overwritten?)") from None
        except OSError as exc:
            raise self._damaged(SETTINGS_FILE, f"cannot be read ({exc.strerror or exc})") from exc
        try:
            saved = json.loads(text)
        except ValueError:
            raise self._damaged(SETTINGS_FILE, "is not valid JSON (truncated or overwritten)") from None
        if not isinstance(saved, dict):
            raise self._damaged(SETTINGS_FILE, f"holds a JSON {type(saved).__name__}, not the run's settings")
        return saved

    def _read_state(self) -> dict:
        """The trainer state (torch.load with weights_only: tensors and plain values only), checked and
        with its JSON fields decoded."""
        path = self.checkpoint_dir / STATE_FILE
        if not path.is_file():
            raise self._damaged(STATE_FILE, "is missing")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except OSError as exc:
            raise self._damaged(STATE_FILE, f"cannot be read ({exc.strerror or exc})") from exc
        except Exception as exc:  # noqa: BLE001 - an untrusted file: whatever the reader raises means damaged
            raise self._damaged(STATE_FILE, f"is not a trainer state secateurs wrote (truncated or overwritten: "
                                            f"{_short(exc)})") from exc
        if not isinstance(state, dict):
            raise self._damaged(STATE_FILE, f"holds a {type(state).__name__}, not a trainer state")
        missing = sorted(_STATE_KEYS - set(state))
        if missing:
            raise self._damaged(STATE_FILE, f"lacks {', '.join(missing)}")
        problem = self._state_problem(state)
        if problem:
            raise self._damaged(STATE_FILE, problem)
        return {**state, "history": json.loads(state["history"]), "best": json.loads(state["best"])}

    def _state_problem(self, state: dict) -> str | None:
        step, bad = state["step"], state["bad_validations"]
        if not _is_int(step) or not 0 <= step <= self.total_steps:
            return f"has step {step!r}, not an integer from 0 to {self.total_steps}"
        if not _is_int(bad) or bad < 0:
            return f"has bad_validations {bad!r}, not an integer >= 0"
        rng, reference = state["rng"], torch.get_rng_state()
        if not isinstance(rng, torch.Tensor) or rng.dtype != reference.dtype or rng.shape != reference.shape:
            return f"has an RNG state that is not a {reference.dtype} tensor of {reference.numel()} bytes"
        problem = _history_problem(state["history"]) or _best_problem(state["best"])
        if problem:
            return problem
        if self.strategy == "fsdp":
            problem = self._sharded_groups_problem(state["optimizer"])
        else:
            problem = self._optimizer_problem(state["optimizer"])
        if problem:
            return f"has an optimiser state that does not fit this run: {problem}"
        problem = _kind_problem(self.scheduler.state_dict(), state["scheduler"], "the state",
                                required=_SCHEDULER_KEYS)
        if problem:
            return f"has a scheduler state that does not fit this run's {self.s.scheduler!r} scheduler: {problem}"
        return None

    def _sharded_groups_problem(self, saved) -> str | None:
        """What in a sharded checkpoint's optimiser groups (its moments are in the shards) would fail
        in set_optimizer_state_dict: other groups, other parameters in them, values of other types."""
        reference = get_optimizer_state_dict(self.student, self.optimizer)["param_groups"]
        if not isinstance(saved, dict) or set(saved) != {"param_groups"}:
            return "not the parameter groups of a sharded checkpoint"
        groups = saved["param_groups"]
        if not isinstance(groups, (list, tuple)) or len(groups) != len(reference):
            return f"other parameter groups than this run's {len(reference)}"
        for i, (ours, group) in enumerate(zip(reference, groups)):
            if not isinstance(group, dict) or not isinstance(group.get("params"), (list, tuple)) or list(
                    group["params"]) != list(ours["params"]):
                return f"parameter group {i} holds other parameters than this run's"
            problem = _kind_problem({k: v for k, v in ours.items() if k != "params"},
                                    {k: v for k, v in group.items() if k != "params"}, f"parameter group {i}",
                                    required=_GROUP_KEYS)
            if problem:
                return problem
        return None

    def _optimizer_problem(self, saved) -> str | None:
        """What in a saved AdamW state_dict would fail in load_state_dict or at the next step: other
        parameter groups, hyper-parameters of other types, moments of other shapes, non-tensors,
        non-finite values."""
        reference = self.optimizer.state_dict()
        if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
            return "not an optimiser state_dict"
        groups, entries = saved["param_groups"], saved["state"]
        if not isinstance(groups, (list, tuple)) or len(groups) != len(reference["param_groups"]):
            n = len(groups) if isinstance(groups, (list, tuple)) else "no"
            return f"{n} parameter groups where this run has {len(reference['param_groups'])}"
        ids = []
        for i, (ours, group) in enumerate(zip(reference["param_groups"], groups)):
            if not isinstance(group, dict) or not isinstance(group.get("params"), (list, tuple)):
                return f"parameter group {i} is not a parameter group"
            if len(group["params"]) != len(ours["params"]) or not all(_is_int(k) for k in group["params"]):
                return f"parameter group {i} holds {len(group['params'])} parameters, this run's {len(ours['params'])}"
            ids += group["params"]
            problem = _kind_problem({k: v for k, v in ours.items() if k != "params"},
                                    {k: v for k, v in group.items() if k != "params"}, f"parameter group {i}",
                                    required=_GROUP_KEYS)
            if problem:
                return problem
        if len(set(ids)) != len(ids):
            return "a parameter is listed twice"
        params = dict(zip(ids, (p for g in self.optimizer.param_groups for p in g["params"])))
        if not isinstance(entries, dict):
            return "its per-parameter state is not a mapping"
        for key, entry in entries.items():
            if key not in params:
                return f"it holds the state of a parameter {key!r} that no group lists"
            if not isinstance(entry, dict):
                return f"the state of parameter {key} is not a mapping"
            shape = tuple(params[key].shape)
            for name, value in entry.items():
                if not isinstance(value, torch.Tensor):
                    return f"{name} of parameter {key} is a {type(value).__name__}, not a tensor"
                if not value.is_floating_point():
                    return f"{name} of parameter {key} is a {value.dtype} tensor, not a floating-point one"
                if name == "step":
                    if value.numel() != 1 or not math.isfinite(float(value)) or float(value) < 0:
                        return f"the step count of parameter {key} is not one finite number >= 0"
                elif tuple(value.shape) != shape:
                    return f"{name} of parameter {key} has shape {tuple(value.shape)}, the parameter {shape}"
                elif not torch.isfinite(value).all():
                    return f"{name} of parameter {key} holds non-finite values"
        return None

    def _read_weights(self, name: str) -> dict:
        """A safetensors file of the trainable weights: this run's names, shapes and dtypes, finite."""
        path = self.checkpoint_dir / name
        if not path.is_file():
            raise self._damaged(name, "is missing")
        try:
            weights = load_file(path)
        except OSError as exc:
            raise self._damaged(name, f"cannot be read ({exc.strerror or exc})") from exc
        except Exception as exc:  # noqa: BLE001 - an untrusted file: whatever the reader raises means damaged
            raise self._damaged(name, f"is not a safetensors file secateurs wrote (truncated or overwritten: "
                                      f"{_short(exc)})") from exc
        missing, extra = sorted(set(self.params) - set(weights)), sorted(set(weights) - set(self.params))
        if missing or extra:
            some = ", ".join([*(f"{n} missing" for n in missing[:2]), *(f"{n} unexpected" for n in extra[:2])])
            raise self._damaged(name, f"holds other trainable weights than this run's ({len(missing)} missing, "
                                      f"{len(extra)} unexpected: {some})")
        for n, p in self.params.items():
            t = weights[n]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise self._damaged(name, f"holds {n} as {t.dtype} {tuple(t.shape)}; this run trains it as "
                                          f"{p.dtype} {tuple(p.shape)}")
            if not torch.isfinite(t).all():
                raise self._damaged(name, f"holds non-finite values in {n}")
        return weights

    def _load_checkpoint(self) -> None:
        """Continue from the checkpoint that check_resumable read and checked (reading it now if not)."""
        if getattr(self, "_checked_checkpoint", None) is None:
            self.check_resumable()
        state, weights, best_weights, optimizer_state = self._checked_checkpoint
        self._checked_checkpoint = None
        try:
            if optimizer_state is not None:  # a sharded checkpoint: the moments from the shards
                set_optimizer_state_dict(self.student, self.optimizer, {**state["optimizer"], "state": optimizer_state})
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:  # checked above; a last guard
            raise self._damaged(STATE_FILE, f"does not fit this run's optimiser ({_short(exc)})") from exc
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(weights[n])
        if best_weights is not None:
            self._best_weights = best_weights
        self.step = state["step"]
        self.history = state["history"]
        self.history["resumed_at_steps"].append(self.step)
        self.best = state["best"]
        self.bad_validations = state["bad_validations"]


_STATE_KEYS = frozenset({"step", "optimizer", "scheduler", "rng", "history", "best", "bad_validations"})
# What a saved optimiser group and scheduler state must hold; other entries this torch has may be
# missing (an older torch wrote the checkpoint: load_state_dict keeps their defaults), none may be extra
# (the scheduler's load_state_dict sets every entry as an attribute of the scheduler).
_GROUP_KEYS = frozenset({"lr", "betas", "eps", "weight_decay", "initial_lr"})
_SCHEDULER_KEYS = frozenset({"base_lrs", "last_epoch", "_last_lr", "lr_lambdas"})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(exc: BaseException) -> str:
    """The exception's type and first line (not torch's advice to load an untrusted file with pickle)."""
    lines = str(exc).strip().splitlines()
    text = "" if isinstance(exc, pickle.UnpicklingError) or not lines else lines[0][:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _decoded(text, what: str):
    """(value, problem) of a JSON field of the trainer state."""
    if not isinstance(text, str):
        return None, f"has a {what} that is a {type(text).__name__}, not JSON text"
    try:
        return json.loads(text), None
    except ValueError:
        return None, f"has a {what} that is not valid JSON"


def _history_problem(text) -> str | None:
    history, problem = _decoded(text, "history")
    if problem:
        return problem
    if not isinstance(history, dict):
        return "has a history that is not a mapping"
    for key in ("train", "val", "resumed_at_steps"):
        if not isinstance(history.get(key), list):
            return f"has a history without its {key!r} list"
    for key in ("seconds", "validation_seconds"):
        if not _is_number(history.get(key)):
            return f"has a history without its {key!r} number"
    for key in ("train", "val"):
        if not all(isinstance(r, dict) and _is_int(r.get("step")) and _is_number(r.get("loss")) for r in history[key]):
            return f"has a history whose {key!r} records lack a step or a finite loss"
    if not all(_is_int(s) for s in history["resumed_at_steps"]):
        return "has a history whose 'resumed_at_steps' are not integers"
    return None


def _best_problem(text) -> str | None:
    best, problem = _decoded(text, "best validation")
    if problem:
        return problem
    if best is not None and not (isinstance(best, dict) and _is_int(best.get("step")) and _is_number(best.get("loss"))):
        return "has a best validation without a step and a finite loss"
    return None


def _kind_problem(reference, value, where: str, required: frozenset | None = None) -> str | None:
    """Where `value` (read from a file) differs in structure or type from `reference` (what this run's
    own object produces): same keys (of a top-level mapping, only `required` ones must be there, when
    given), same lengths, numbers for numbers, finite; None when it fits."""
    if isinstance(reference, dict):
        if not isinstance(value, dict):
            return f"{where} is a {type(value).__name__}, not a mapping"
        must = set(reference) if required is None else set(reference) & required
        odd = sorted(map(str, (must - set(value)) | (set(value) - set(reference))))
        if odd:
            return f"{where} has other entries ({', '.join(odd[:4])})"
        for key in (k for k in reference if k in value):
            problem = _kind_problem(reference[key], value[key], f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    if isinstance(reference, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(reference):
            return f"{where} is not a sequence of {len(reference)}"
        for i, (r, v) in enumerate(zip(reference, value)):
            problem = _kind_problem(r, v, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(reference, bool) or reference is None:  # flags, some of them optional (foreach, fused)
        fits = value is None or isinstance(value, bool)
    elif isinstance(reference, (int, float)):
        fits = _is_number(value) or (not math.isfinite(reference) and value == reference)
    elif isinstance(reference, str):
        fits = isinstance(value, str)
    elif isinstance(reference, torch.Tensor):
        fits = (isinstance(value, torch.Tensor) and value.shape == reference.shape and value.dtype == reference.dtype
                and (not value.is_floating_point() or bool(torch.isfinite(value).all())))
    else:
        fits = type(value) is type(reference)
    return None if fits else f"{where} is {_describe(value)} where a {type(reference).__name__} belongs"


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}" if len(text) <= 40 else f"a {type(value).__name__}"


def settings_dict(settings: LoopSettings) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}
