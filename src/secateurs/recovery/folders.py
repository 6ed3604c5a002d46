"""Recover a saved model into a new folder: the library side of `secateurs recover` (the command
line only parses its arguments into a RecoverySettings and these parameters)."""

from __future__ import annotations

from pathlib import Path

from secateurs.recovery.api import RecoveryResult, check_resources, checkpoint_folder, recover
from secateurs.recovery.settings import RecoverySettings
from secateurs.runtime.progress import phase


def recover_folder(pruned: str, out: str, settings: RecoverySettings | None = None, *, teacher: str | None = None,
                   force: bool = False, dtype=None, device: str = "cpu", device_map=None,
                   offload_folder: str | None = None, student_device_map=None, ppl: str | None = None,
                   ppl_tokens: int = 65536) -> tuple[RecoveryResult, dict | None]:
    """Load `pruned` (and its dense `teacher`), recover it with `settings` (default: RecoverySettings()),
    save to `out`. With `ppl` (a text source, refused as training data) the perplexity (seq 128, first
    `ppl_tokens` tokens) before and after is returned as {"before": x, "after": y}; data sharing
    more than 1% of those first `ppl_tokens` tokens' 13-token windows is refused. The data file is
    checked (UTF-8, every record usable) before any model loads.

    Placement by accelerate ('auto', 'balanced', 'sequential' or {module: device}), one map per model
    because they differ: `device_map` places the teacher, which only runs forward, offloading to CPU
    or disk (`offload_folder`) what does not fit; `student_device_map` places the student, which
    trains, and is refused if it would offload any of its weights (an optimiser steps weights on
    their device). Without a map a model goes to `device`."""
    from secateurs.evaluation.perplexity import load_text, perplexity
    from secateurs.planning.plan import PLAN_FILENAME, PruningPlan
    from secateurs.recovery.data import EvaluationText, check_recovery_source, refuse_evaluation_overlap
    from secateurs.storage.loading import load_model
    from secateurs.storage.output import check_output_dir

    settings = settings if settings is not None else RecoverySettings()
    data = settings.data
    settings.check(teacher is not None)  # every setting, before loading anything
    if device_map is None and student_device_map is None:
        check_resources_before_loading(pruned, teacher, device, settings)
    out_path = check_output_dir(out, force, [pruned, teacher, data, ppl])
    checkpoint_folder(settings.checkpoint_dir, out_path, settings.save_every, settings.resume,
                      [pruned, teacher, data, ppl], force)  # refused now, not after the models load
    check_recovery_source(data)  # UTF-8, every record usable: refused now, not after the models load
    evaluated = [EvaluationText(ppl, ppl_tokens)] if ppl else None  # the overlap is measured on what is evaluated
    refuse_evaluation_overlap(data, evaluated)
    plan = PruningPlan.load(pruned) if (Path(pruned) / PLAN_FILENAME).is_file() else None
    text = load_text(ppl)[0] if ppl else None  # a missing or unreadable file fails before the models load
    student, tokenizer = _load_student(pruned, dtype, device, student_device_map)
    dense, dense_tokenizer = load_model(teacher, dtype, device, device_map, offload_folder) if teacher else (None, None)
    if ppl:
        with phase(f"tokenising {Path(ppl).name}"):  # once for both measurements
            ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0][:ppl_tokens]

    def measure(model, when: str) -> float:  # minutes on a real model: a phase line and a bar, never silence
        with phase(f"perplexity on {Path(ppl).name} {when} recovery (seq 128, first {ids.numel():,} tokens)"):
            return perplexity(model, tokenizer, "", seq_len=128, ids=ids)["perplexity"]

    before = measure(student, "before") if ppl else None
    result = recover(student, dense, settings=settings, tokenizer=tokenizer, teacher_tokenizer=dense_tokenizer,
                     plan=plan, out=out, force=force, evaluation_files=evaluated)
    return result, ({"before": before, "after": measure(result.model, "after")} if ppl else None)


def check_resources_before_loading(pruned: str, teacher: str | None, device: str,
                                   settings: RecoverySettings) -> None:
    """The time and memory estimate from the models' configs (meta skeletons, no weights read), for
    local Hugging Face folders; recover() checks again on the loaded models. (prune --recover passes
    the dense model as both: an upper bound for the student it prunes.)"""
    from secateurs.errors import SecateursError
    from secateurs.storage.checkpoint import load_skeleton
    from secateurs.storage.loading import resolve_source

    def skeleton(source):
        try:
            kind, path = resolve_source(source)
            return load_skeleton(path, load_outside_layers=False)[0] if kind == "dir" else None
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


def _load_student(pruned: str, dtype, device: str, device_map):
    """The student on `device`, or placed by `device_map` (never offloaded: it trains)."""
    from secateurs.errors import SecateursError
    from secateurs.storage.loading import load_model
    from secateurs.storage.offload import has_offloaded_weights

    student, tokenizer = load_model(pruned, dtype, device, device_map)
    if device_map is not None and has_offloaded_weights(student):
        raise SecateursError("the student device map offloads some of its weights to CPU or disk, and training steps "
                             "weights on their device: keep the student on GPUs, or all of it on the CPU (offloading "
                             "is for the teacher's --device-map)")
    return student, tokenizer
