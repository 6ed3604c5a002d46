"""secateurs.recover(student, teacher, data, tokens): bring a pruned model back with distillation or
cross-entropy, through LoRA (merged) or full fine-tuning, and optionally save it as a pruned folder
with its plan and a recovery.json.

Everything a user can get wrong is checked before the first step: the budget and settings, the
output folder, the teacher (same family, vocabulary and tokenizer), the data (enough for one
training sequence plus the validation slice, not the evaluation text) and, on resume, that the
checkpoint belongs to this very run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from secateurs.adapters import get_adapter
from secateurs.errors import SecateursError
from secateurs.files.output import check_output_dir, marker_record, refuse_overlap, remove_own_folder
from secateurs.planning.accounting import model_stats
from secateurs.planning.geometry import plan_base
from secateurs.planning.plan import CONFIG_KEY, PruningPlan
from secateurs.recovery import estimate as resources
from secateurs.recovery import memory
from secateurs.recovery.cached_teacher import open_teacher_cache
from secateurs.recovery.data import RecoveryData, load_recovery_data
from secateurs.recovery.lora import attach_lora, lora_target_names, merge_lora
from secateurs.recovery.objectives import Objective
from secateurs.recovery.settings import PRESETS, RecoverySettings
from secateurs.recovery.trainer import (
    STATE_FILE,
    LoopSettings,
    RecoveryError,
    RecoveryLoop,
    Sharding,
    resolved_strategy,
    settings_dict,
)
from secateurs.runtime import threads
from secateurs.runtime.distributed import World, join
from secateurs.runtime.identity import model_identity
from secateurs.runtime.progress import status
from secateurs.storage.loading import resolve_source
from secateurs.storage.pruned import save_pruned
from secateurs.version import __version__

try:
    import resource  # POSIX only: the peak resident set of this process
except ImportError:  # pragma: no cover - Windows
    resource = None

RECOVERY_FILENAME = "recovery.json"
RECOVERY_FORMAT = "secateurs.recovery/1"
CHECKPOINT_KIND = "recovery-checkpoint"  # the marker kind of a checkpoint folder (secateurs.files.output)
__all__ = ["CHECKPOINT_KIND", "PRESETS", "RECOVERY_FILENAME", "RecoveryResult", "check_resources", "check_teacher",
           "checkpoint_folder", "join_processes", "recover", "settings_of"]


@dataclass
class RecoveryResult:
    model: torch.nn.Module  # the recovered student (LoRA merged), in eval mode
    record: dict = field(default_factory=dict)  # what recovery.json holds
    out: Path | None = None


def _family(model) -> str:
    """The architecture family, seeing through the llama -> mistral export of uneven head counts."""
    info = getattr(model.config, CONFIG_KEY, None) or {}
    return info.get("exported_from") or model.config.model_type


def check_teacher(student, teacher, tokenizer=None, teacher_tokenizer=None) -> None:
    """A teacher must speak the student's vocabulary: same family, vocabulary size and tokenizer."""
    if _family(teacher) != _family(student):
        raise SecateursError(f"the teacher is a {_family(teacher)} model and the student a {_family(student)} "
                             "model; distil from the dense model the student was pruned from")
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vs != vt or student.get_input_embeddings().weight.shape[0] != teacher.get_input_embeddings().weight.shape[0]:
        raise SecateursError(f"the teacher's vocabulary ({vt} tokens) differs from the student's ({vs}); "
                             "distillation compares their next-token distributions token by token")
    if tokenizer is not None and teacher_tokenizer is not None:
        special = ("bos_token_id", "eos_token_id")
        same = tokenizer.get_vocab() == teacher_tokenizer.get_vocab() and all(
            getattr(tokenizer, a, None) == getattr(teacher_tokenizer, a, None) for a in special)
        if not same:
            raise SecateursError("the teacher's tokenizer differs from the student's (other tokens or special "
                                 "tokens); distil from the model the student was pruned from")


def settings_of(settings: RecoverySettings | None, keywords: dict) -> RecoverySettings:
    """The run's settings: `settings`, or built from recover()'s setting keywords (not both)."""
    if settings is None:
        return RecoverySettings.from_keywords(keywords)
    if keywords:
        raise SecateursError(f"pass the recovery settings either as settings=RecoverySettings(...) or as keywords, "
                             f"not both (got settings and {', '.join(sorted(keywords))})")
    if not isinstance(settings, RecoverySettings):
        raise SecateursError(f"settings must be a RecoverySettings, got {type(settings).__name__}")
    return settings


def check_resources(student, teacher, device, settings: RecoverySettings) -> None:
    """Refuse, before the weights load, a run of recover(student, teacher, settings=settings) estimated
    past max_hours or the free memory of `device`: the models may be meta skeletons built from their
    configs (secateurs.recovery.memory.skeleton), only their shapes are read."""
    has_teacher = teacher is not None
    _check_resources(student, teacher if settings.objective_for(has_teacher) != "ce" else None, settings,
                     self_tokens=settings.self_tokens(has_teacher), progress=False, device=torch.device(device))


@dataclass
class _Run:
    """One recovery run as decided and checked before its first step: what the helpers that
    train, record and save it read."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None  # as given (recorded even when the objective is 'ce')
    teacher_for_loss: torch.nn.Module | None  # None for 'ce'
    plan: PruningPlan | None
    data: RecoveryData
    objective: Objective
    loop: LoopSettings
    settings: RecoverySettings
    inputs: list
    checkpoint_dir: Path | None  # None: this run writes no checkpoint
    default_checkpoints: bool  # OUT.checkpoints, removed after a successful save if this run wrote it
    identity: dict  # {"run": id} in the marker of every checkpoint this run writes (kept across resumes)
    strategy: str = "ddp"  # how several processes share the training: 'ddp' or 'fsdp' (also sharded checkpoints)
    teacher_sharded: bool = False  # fsdp: the teacher sharded over the processes too (teacher_sharding)


def check_resources_before_loading(pruned: str, teacher: str | None, device: str,
                                   settings: RecoverySettings) -> None:
    """The time and memory estimate from the models' configs (meta skeletons, no weights read), for
    local Hugging Face folders; recover() checks again on the loaded models. (prune --recover passes
    the dense model as both: an upper bound for the student it prunes.)"""
    def skeleton(source):
        try:
            kind, path = resolve_source(source)
            return memory.skeleton(path) if kind == "dir" else None
        except Exception:  # noqa: BLE001 - no skeleton: the check runs once the models are loaded
            return None

    student = skeleton(pruned)
    dense = (student if teacher == pruned else skeleton(teacher)) if teacher else None
    if student is None or (teacher and dense is None):
        return
    try:
        check_resources(student, dense, device, settings)
    except SecateursError:
        raise
    except Exception:  # noqa: BLE001 - e.g. a device that is checked when the models load
        return


def recover(student, teacher=None, *, settings: RecoverySettings | None = None, tokenizer=None,
            teacher_tokenizer=None, plan: PruningPlan | None = None, out: str | os.PathLike | None = None,
            force: bool = False, evaluation_files: list | None = None, progress: bool = True, on_validation=None,
            on_step=None, **keywords) -> RecoveryResult:
    """Train `student` (in place) with `settings` (a RecoverySettings, or its fields as keywords:
    `recover(student, teacher, data=..., tokens=...)`) and return the recovered model.

    The student is trained in place (LoRA: adapters injected, then merged back). objective:
    'kd' (default with a teacher; forward KL at `temperature`, mixed with CE by kd_ratio;
    hidden_weight > 0 adds the matching of every student layer's output with the teacher layer
    it came from) or 'ce' (default without a teacher). bf16=True runs the models under bfloat16
    autocast (for GPUs; weights and optimiser keep their dtype). method: 'full' (default) or
    'lora'; preset='amp-paper' is the AMP paper's LoRA (r=8, alpha=16, dropout 0.05, lr 3e-4);
    explicit settings override the preset. `data`: a text or .jsonl file (text or Alpaca
    records), 'hf:NAME:SPLIT', 'tinystories' or 'self' (teacher-generated). With `out`, the
    model is saved as a pruned folder (with `plan`) plus recovery.json. Checkpoints every
    `save_every` steps go to `checkpoint_dir` (default: OUT.checkpoints, removed after a
    successful save, and only when this run wrote it); resume=True continues from there
    bit-identically. An existing checkpoint folder is replaced by a fresh run only with force and
    only when it holds a secateurs checkpoint. `evaluation_files`: texts evaluated in the same run,
    refused as data. A run estimated to take more than `max_hours` (secateurs.recovery.estimate),
    or more memory than the device has free, is refused before its first step. A teacher other
    than the dense model the plan was made from is named in a warning unless `teacher_any`.
    `on_validation` and `on_step` are called by the training loop (secateurs.recovery.trainer).
    In several processes (torchrun), each trains on its share of every batch; process 0 writes `out`.
    """
    wall_start = time.perf_counter()
    s = settings_of(settings, keywords)
    s.check(teacher is not None, student)
    world = join_processes(s, next(student.parameters()).device.type)
    progress = progress and world.main
    run, out_path = _prepare(world, student, teacher, s, plan, tokenizer, teacher_tokenizer, out, force,
                             evaluation_files, progress)
    params_before = model_stats(student).total_params
    trained, loop, history, targets, trainable = _train(run, progress, on_validation, on_step)
    record = _record(run, trained=trained, history=history, loop=loop, targets=targets, trainable=trainable,
                     params_before=params_before)
    if world.size > 1:  # one process records nothing here: its recovery.json is the same as ever
        record["processes"] = {"world_size": world.size, "strategy": run.strategy,
                               "teacher_sharded": bool(getattr(run, "teacher_sharded", False)),
                               "batch_size_per_process": s.batch_size // world.size}
    record["wall_seconds"] = round(time.perf_counter() - wall_start, 3)
    result = RecoveryResult(trained, record)
    if out_path is not None:
        result.out = world.from_main(_save, result, run, out_path, tokenizer, force)
    return result


def _prepare(world: World, student, teacher, s: RecoverySettings, plan, tokenizer, teacher_tokenizer, out,
             force: bool, evaluation_files, progress: bool):
    """Everything `recover` checks and decides before its first step: the output and checkpoint folders (claimed
    by process 0), the teacher, the resources, the data, the objective, the strategy; returns (run, out path)."""
    inputs = [_name(student), _name(teacher), s.data, s.teacher_cache, *(evaluation_files or [])]  # never written to
    out_path = world.from_main(check_output_dir, out, force, inputs) if out else None
    # process 0 alone: a model loaded once is on the meta device in the others (secateurs.runtime.sharding)
    world.from_main(_check_teacher_use, student, teacher, plan, tokenizer, teacher_tokenizer, s.hidden_weight,
                    s.teacher_any)
    checkpoint_dir, default_checkpoints, identity = world.from_main(checkpoint_folder, s.checkpoint_dir, out_path,
                                                                    s.save_every, s.resume, inputs, force)
    objective = s.objective_for(teacher is not None)
    teacher_for_loss = None if objective == "ce" or s.teacher_cache is not None else teacher.eval()
    _check_resources(student, teacher_for_loss, s, self_tokens=s.self_tokens(teacher is not None), progress=progress)

    def read_data() -> RecoveryData:
        return load_recovery_data(s.data, tokenizer, seq_len=s.seq_len, tokens=s.tokens, val_tokens=s.val_tokens,
                                  seed=s.seed, teacher=teacher, evaluation_files=evaluation_files,
                                  self_samples=s.self_samples)

    # the teacher's own samples are generated once, by process 0, and handed to the others
    recovery_data = world.from_main(read_data) if s.data == "self" else read_data()
    check_same_data(world, recovery_data)
    obj = Objective(objective, float(s.kd_ratio), float(s.temperature), s.chunk_rows, float(s.hidden_weight),
                    _layer_map(student, teacher, plan) if s.hidden_weight else None, bool(s.bf16))
    run = _Run(student, teacher, _cached_or(teacher_for_loss, s, recovery_data, student, teacher, plan, tokenizer),
               plan, recovery_data, obj, LoopSettings(**s.loop_keywords()), s, inputs, checkpoint_dir,
               default_checkpoints, identity, resolved_strategy(student, teacher_for_loss, s, world.size))
    if isinstance(run.teacher_for_loss, torch.nn.Module):  # decided by process 0: every process shards alike
        run.teacher_sharded = world.from_main(memory.teacher_sharding_for, student, teacher_for_loss, s, world.size,
                                              run.strategy)
    return run, out_path


def _cached_or(teacher_for_loss, settings: RecoverySettings, data: RecoveryData, student, teacher, plan,
               tokenizer):
    """What the loss reads the teacher from: `teacher_for_loss`, or with teacher_cache the cache, checked
    against this run (secateurs.recovery.cached_teacher); then no teacher model takes part in the loss."""
    if settings.teacher_cache is None:
        return teacher_for_loss
    return open_teacher_cache(settings, data, student, teacher, plan, tokenizer)


def join_processes(settings: RecoverySettings, device: str | None, device_maps=()) -> World:
    """The processes of a run a launcher started several of (WORLD_SIZE > 1; secateurs.runtime.distributed):
    the group formed (or this one process), refusing what several processes cannot share: a device
    map (each process holds whole replicas) and a batch that does not split evenly over them."""
    world = join(device)
    if world.size == 1:
        return world
    if any(m is not None for m in device_maps):
        raise SecateursError(f"{world.size} processes each hold the whole student and teacher: --device-map and "
                             "--student-device-map place one process's models, run them in one process")
    if settings.batch_size % world.size:
        raise SecateursError(f"--train-batch-size {settings.batch_size} is the batch of all {world.size} processes "
                             f"together and must split evenly: give a multiple of {world.size}")
    return world


def check_same_data(world: World, data: RecoveryData) -> None:
    """Every process must train on (or cache the teacher on) the data process 0 read (the same hash)."""
    if world.from_main(lambda: data.hash) != data.hash:
        raise RecoveryError(f"process {world.rank} read other recovery data than process 0 (data hash {data.hash}); "
                            "every process must see the same --data")


def _check_teacher_use(student, teacher, plan, tokenizer, teacher_tokenizer, hidden_weight: float,
                       teacher_any: bool = False) -> None:
    """Refuse, before any work, a teacher that does not fit the student, and hidden-state distillation
    that cannot map every student layer to a teacher layer; warn (one line) when the teacher is not
    the dense model the student's plan was made from, unless teacher_any."""
    if teacher is not None:
        check_teacher(student, teacher, tokenizer, teacher_tokenizer)
        if not teacher_any:
            reason = _not_the_parent(teacher, plan)
            if reason:
                status(f"WARNING: the teacher {_name(teacher)} is not the model this student was pruned from "
                       f"({reason}); distillation goes on (--teacher-any silences this)")
    if hidden_weight:  # its bounds and objective: _check_bounds
        _layer_map(student, teacher, plan)


def _not_the_parent(teacher, plan: PruningPlan | None) -> str | None:
    """Why the teacher is not the dense model `plan` was made from, or None (also when it cannot tell)."""
    if plan is None:
        return None
    recorded = plan.provenance.get("base_identity")
    if isinstance(recorded, str):
        here = model_identity(teacher)
        return None if here == recorded else f"its weights' fingerprint {here} is not the plan's base {recorded}"
    if not _is_plan_base(teacher, plan):
        return "its shapes differ from the plan's base model"
    return None


def checkpoint_folder(checkpoint_dir, out_path: Path | None, save_every: int | None, resume: bool,
                       inputs: list, force: bool) -> tuple[Path | None, bool, dict]:
    """(checkpoint folder or None when this run writes none, whether it is the default
    OUT.checkpoints, the run identity its checkpoints carry), checked and claimed before any work.
    Resume needs a secateurs checkpoint there and continues its identity; a fresh run that saves
    checkpoints needs a new folder (or force over a secateurs checkpoint folder). A run that writes
    no checkpoint never looks at, writes or removes any folder."""
    if not (save_every or resume):
        return None, False, {}
    default = checkpoint_dir is None
    if default:
        if out_path is None:
            raise SecateursError("checkpoints need a folder: pass checkpoint_dir (or out)")
        checkpoint_dir = out_path.with_name(out_path.name + ".checkpoints")
    what = "checkpoint folder" + (" (OUT.checkpoints; --checkpoint-dir chooses another)" if default else "")
    if out_path is not None:  # neither may hold the other: the output is swapped in whole
        refuse_overlap(Path(checkpoint_dir).expanduser().resolve(), [out_path], what, existing_only=False)
    given = Path(checkpoint_dir).expanduser()
    record = marker_record(given) if given.is_dir() and not given.is_symlink() else None
    holds_checkpoint = record is not None and record.get("kind") == CHECKPOINT_KIND
    if resume:
        if not holds_checkpoint:
            raise RecoveryError(f"--resume: no checkpoint in {given} (no secateurs recovery checkpoint marker there); "
                                "run without --resume (and with --save-every)")
        if not (given / STATE_FILE).is_file():
            raise RecoveryError(f"--resume: the checkpoint in {given} is damaged: {STATE_FILE} is missing. Remove "
                                f"{given} and run without --resume (training starts afresh)")
        folder = check_output_dir(checkpoint_dir, True, inputs, what=what, kind=CHECKPOINT_KIND)
        run = record.get("run") if isinstance(record.get("run"), str) else uuid.uuid4().hex
        return folder, default, {"run": run}
    if holds_checkpoint and not force:
        raise RecoveryError(f"{given} holds a checkpoint of an earlier run: resume it (resume=True, --resume), or "
                            "pass force (--force) to start over in its place")
    folder = check_output_dir(checkpoint_dir, force, inputs, what=what, kind=CHECKPOINT_KIND)
    return folder, default, {"run": uuid.uuid4().hex}


def _check_resources(student, teacher, settings: RecoverySettings, *, self_tokens: int, progress: bool,
                     device=None) -> None:
    """Estimate the run's time and memory (secateurs.recovery.estimate) and refuse one that cannot
    finish within max_hours or fit in the free memory; the estimate is printed."""

    s = settings
    device = torch.device(device) if device is not None else next(student.parameters()).device
    steps = max(1, s.tokens // (s.batch_size * s.seq_len * s.grad_accum))
    work = resources.Workload(memory.plan_for_models(student, teacher, s, memory.world_size(), device.type),
                              tokens=s.tokens, self_tokens=self_tokens, val_tokens=s.val_tokens,
                              validations=steps // (s.eval_every or max(1, steps // 10)) + 2,
                              resident_bytes=memory.resident_bytes((student, teacher), device))
    est = resources.estimate(work, device)
    strategy = resources.check(est, s.max_hours, s.strategy)
    if progress:
        status(f"recovery estimate: {est.describe(strategy)} (limit --max-hours {s.max_hours:g})")


def _fingerprint(run: _Run) -> dict:
    """What a checkpoint must have been written by to be resumed: this data, objective, loop, method,
    student shapes and teacher."""
    s = run.settings
    return {"data_hash": run.data.hash, "objective": run.objective.to_dict(), "loop": settings_dict(run.loop),
            "method": s.training_method, "lora": s.lora, "seq_len": s.seq_len,
            "student": _shape_fingerprint(run.student), "teacher": _name(run.teacher) if run.teacher_for_loss else None,
            "gradient_checkpointing": s.gradient_checkpointing,
            **({"teacher_cache": run.teacher_for_loss.fingerprint} if s.teacher_cache is not None else {})}


def _train(run: _Run, progress: bool, on_validation, on_step):
    """(trained model, loop, history, LoRA targets, trainable parameter count): the training loop
    under a forked RNG seeded with `seed` (the caller's random state is untouched), through LoRA
    adapters merged afterwards or with every weight trainable. Non-finite results are refused."""
    student, lora, resume = run.student, run.settings.lora, run.settings.resume
    gradient_checkpointing = run.settings.gradient_checkpointing
    fingerprint = _fingerprint(run)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.settings.seed)
        trained, peft_model = student, None
        if lora is not None:
            targets = lora_target_names(student)
            peft_model = attach_lora(student, lora["r"], lora["alpha"], lora["dropout"])
        else:
            targets = None
            student.requires_grad_(True)
        if gradient_checkpointing:
            _set_activation_checkpointing(student, True)
        loop = RecoveryLoop(student, run.teacher_for_loss, run.data, run.objective, run.loop, run.checkpoint_dir,
                            fingerprint, progress, on_validation, on_step, inputs=run.inputs,
                            sharding=Sharding(run.strategy, bool(run.teacher_sharded)))
        loop.marker = run.identity
        if resume:
            loop.check_resumable()
        trainable = sum(p.numel() for p in loop.params.values())
        try:
            with threads.working("train"):
                history = loop.run(resume=resume)
        finally:
            if gradient_checkpointing:
                _set_activation_checkpointing(student, False)
        if peft_model is not None:
            trained = merge_lora(peft_model)
        trained.requires_grad_(False)
        trained.eval()
    bad = [n for n, p in trained.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RecoveryError(f"recovered weights are not finite ({bad[:3]}); nothing was saved. Lower the learning rate")
    return trained, loop, history, targets, trainable


def _save(result: RecoveryResult, run: _Run, out_path: Path, tokenizer, force: bool) -> Path:
    """Save the recovered model as a pruned folder with its plan and recovery.json; the default
    checkpoint folder goes once the model is safely saved, and only if this run's checkpoints are
    what it holds (its marker carries this run's identity)."""
    plan = run.plan
    if plan is not None:  # the count is measured on the model saved, never copied from the file read
        plan = replace(plan, provenance={**plan.provenance, "params_after": model_stats(result.model).total_params})
    result.out = save_pruned(result.model, plan, out_path, tokenizer=tokenizer, force=force, inputs=run.inputs,
                             extra_files={RECOVERY_FILENAME: json.dumps(result.record, indent=2) + "\n"})
    if run.default_checkpoints and run.checkpoint_dir is not None:
        remove_own_folder(run.checkpoint_dir, CHECKPOINT_KIND, run.identity)
    return result.out


def _record(run: _Run, *, trained, history, loop, targets, trainable, params_before) -> dict:
    """What recovery.json holds: how the model was recovered and what it gained."""
    student, teacher, plan, data, settings = run.student, run.teacher, run.plan, run.data, run.loop
    lora = run.settings.lora
    val = history["val"]
    after = next((r for r in val if r["step"] == history["restored_best_step"]), val[-1]) if val else None
    tokens_trained = history["steps_done"] * loop.tokens_per_step
    return {
        "format": RECOVERY_FORMAT, "secateurs_version": __version__,
        "student": {"name_or_path": _name(student), "params": params_before},
        "teacher": ({"name_or_path": _name(teacher), "params": model_stats(teacher).total_params,
                     "is_plan_base": _is_plan_base(teacher, plan)} if teacher is not None else None),
        "data": {**data.description, "hash": data.hash},
        "objective": run.objective.to_dict(),
        **({"teacher_cache": run.teacher_for_loss.describe()} if run.settings.teacher_cache is not None else {}),
        "parametrisation": {"method": run.settings.training_method, "preset": run.settings.preset,
                            "trainable_params": trainable,
                            **({"lora": {**lora, "target_modules": len(targets), "targets": targets, "merged": True}}
                               if lora else {})},
        "optimizer": {"name": "AdamW", "lr": settings.lr, "betas": list(settings.betas),
                      "weight_decay": settings.weight_decay, "scheduler": settings.scheduler,
                      "warmup_steps": loop.warmup_steps, "max_grad_norm": settings.max_grad_norm},
        "batch": {"seq_len": data.seq_len, "batch_size": settings.batch_size, "grad_accum": settings.grad_accum,
                  "tokens_per_step": loop.tokens_per_step,
                  "gradient_checkpointing": run.settings.gradient_checkpointing},
        "tokens": {"requested": settings.tokens, "trained": tokens_trained, "data_offset": settings.data_offset,
                   "epochs": round(loop.order.epochs(history["steps_done"] * settings.grad_accum), 4)},
        "steps": {"planned": history["total_steps"], "done": history["steps_done"],
                  "stopped_early": history["stopped_early"], "best_step": history["best_step"],
                  "restored_best_step": history["restored_best_step"], "resumed_at": history["resumed_at_steps"]},
        "seed": run.settings.seed,
        "before": val[0] if val else None, "after": after,
        "curves": {"train": history["train"], "val": val},
        "training_seconds": round(history["seconds"], 3),
        "validation_seconds": round(history["validation_seconds"], 3),
        "training_tokens_per_second": _rate(tokens_trained, history["seconds"] - history["validation_seconds"]),
        "device": str(next(trained.parameters()).device), "torch_threads": torch.get_num_threads(),
        "threads": threads.describe(),
        "allocator": history.get("allocator"),
        "peak_memory": peak_memory(next(trained.parameters()).device),
    }


def peak_memory(device: torch.device) -> dict:
    """This process's peak memory so far: on CUDA what torch allocated on the device, elsewhere the process's
    peak resident set (the kernel's ru_maxrss, imports and data included)."""
    if device.type == "cuda":
        return {"kind": "cuda max_memory_allocated", "gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
    if resource is None:
        return {"kind": "not measured on this system", "gib": None}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return {"kind": "process peak resident set", "gib": round(peak_kib / 2**20, 3)}


def _layer_map(student, teacher, plan: PruningPlan | None) -> tuple[int, ...]:
    """Teacher layer index of every student layer: the plan's kept layers (depth pruning removes
    some; width and HARP pruning keep them all), or the identity when the counts agree."""

    n_s = len(get_adapter(student).decoder_layers(student))
    n_t = len(get_adapter(teacher).decoder_layers(teacher))
    if student.config.hidden_size != teacher.config.hidden_size:
        raise SecateursError("hidden-state distillation needs the teacher's hidden size; this teacher's differs")
    if plan is not None:
        kept = tuple(plan.kept_layer_indices())
        if len(kept) != n_s or max(kept) >= n_t:
            raise SecateursError(f"the plan keeps {len(kept)} layers of {len(plan.layers)}, but the student has {n_s} "
                                 f"and the teacher {n_t}: pass the plan this student was pruned with")
        return kept
    if n_s != n_t:
        raise SecateursError(f"the student has {n_s} layers and the teacher {n_t}: hidden-state distillation needs "
                             "the plan to know which teacher layer each student layer came from")
    return tuple(range(n_s))


def _set_activation_checkpointing(model, on: bool) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: works with frozen
    base weights under LoRA). transformers 5.x renamed gradient_checkpointing_* to activation_*."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _rate(tokens: int, seconds: float) -> float | None:
    """Training tokens per second of the steps alone (validation excluded)."""
    return round(tokens / seconds, 2) if seconds > 0 else None


def _name(model) -> str | None:
    return getattr(model.config, "_name_or_path", None) if model is not None else None


def _shape_fingerprint(model) -> str:
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:16]


def _is_plan_base(teacher, plan: PruningPlan | None) -> bool | None:
    if plan is None:
        return None
    here = plan_base(teacher)
    keys = ("model_type", "num_hidden_layers", "hidden_size", "head_dim", "vocab_size", "layer_shapes")
    return all(here[k] == plan.base.get(k) for k in keys)
