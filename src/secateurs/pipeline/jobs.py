"""A pruning job and its drivers: `check(job)` refuses what can be refused before loading, `execute(job)` loads,
plans, cuts, (recovers,) saves; `secateurs.run(PruneJob(...))` (secateurs.pipeline.runner) calls both.

Which driver runs is chosen from the job's memory mode and what the method declares it needs
(secateurs.methods.base.Needs), never from method names:

* in-memory: the whole model in memory, `secateurs.prune` (plan, optional re-fitting, surgery),
  then save_pruned; with `recovery`, the pruned model is distilled from a copy of the dense one
  before saving;
* recovering: a method that prunes and recovers in turns (depth methods with the `iterative`
  option and `recovery`: after every removed layer, secateurs.recovery.iterative);
* streamed: a meta skeleton whose decoder layers are read from the checkpoint one at a time
  (statistics resumable with scores_cache; LM head loaded only for methods that score through it),
  then surgery shard by shard from the checkpoint;
* device-map: the model dispatched by accelerate (GPUs, CPU, disk) for planning, then surgery
  shard by shard from the checkpoint (offloaded weights cannot be sliced in place).

`run(job)` is the prune stage alone (`check`, then `execute`); secateurs.pipeline.runner.run runs it
among other stages (secateurs.pipeline.stages.Prune), handing it the model the run loaded.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secateurs.calibration.data import check_calibration_length, load_calibration
from secateurs.calibration.streaming import streamed_statistics
from secateurs.errors import SecateursError
from secateurs.files.output import check_output_dir, check_output_file, refuse_overlap
from secateurs.methods import make_plan, prune, reconstruction_for
from secateurs.methods.registry import get_method
from secateurs.planning.accounting import compare_stats, model_stats
from secateurs.planning.plan import PruningPlan
from secateurs.recovery.api import (
    RECOVERY_FILENAME,
    check_resources_before_loading,
    checkpoint_folder,
    join_processes,
    recover,
)
from secateurs.recovery.data import check_recovery_source, refuse_evaluation_overlap
from secateurs.recovery.iterative import prune_depth_recovering
from secateurs.recovery.settings import RecoverySettings
from secateurs.runtime.distributed import launched_size
from secateurs.runtime.identity import model_identity
from secateurs.runtime.progress import status
from secateurs.storage import loading
from secateurs.storage.checkpoint import load_skeleton, prune_checkpoint
from secateurs.storage.loading import check_device, load_tokenizer, resolve_source
from secateurs.storage.pruned import save_pruned
from secateurs.surgery.apply import apply_plan
from secateurs.surgery.reconstruction import RefitStore, apply_plan_sequential

MEMORY_MODES = ("in-memory", "streamed", "device-map")


@dataclass
class PruneJob:
    """Everything one run needs. `options` are the method's own (its options dataclass's fields);
    `reconstruction` holds reconstruct / damping / reconstruct_bias as given (secateurs.prune)."""

    source: str
    out: str
    method: str = "amp"
    ratio: float | None = 0.2
    options: dict = field(default_factory=dict)
    ratio_of: str = "all"
    layers_equivalent: float | None = None
    calibration: Any = None
    calibration_options: dict = field(default_factory=dict)
    statistics: str | None = None
    seed: int = 0
    reconstruction: dict = field(default_factory=dict)
    plan: PruningPlan | None = None
    memory: str = "in-memory"
    dtype: Any = None
    device: str = "cpu"
    device_map: Any = None
    offload_folder: str | None = None
    scores_cache: str | None = None
    force: bool = False
    recovery: RecoverySettings | None = None  # None: no recovery
    inputs: list = field(default_factory=list)  # every file the run reads: never written or replaced

    def __post_init__(self):
        if not self.inputs:  # a library caller: the model and a calibration file are what it reads
            _, path = resolve_source(self.source)
            given = [self.calibration] if isinstance(self.calibration, str) and Path(self.calibration).exists() else []
            self.inputs = [str(path) if path else self.source, *given]

    def plan_keywords(self) -> dict:
        """make_plan / prune keywords: the method's options and what every method reads."""
        return dict(**self.options, ratio_of=self.ratio_of, layers_equivalent=self.layers_equivalent,
                    calibration=self.calibration, statistics=self.statistics, seed=self.seed,
                    calibration_options=self.calibration_options)


@dataclass
class PruneResult:
    plan: PruningPlan
    out: Path
    model: Any = None              # in memory only
    comparison: dict | None = None  # secateurs.planning.accounting.compare_stats, in memory only
    seconds: float | None = None
    recovery: dict | None = None   # recovery.json's record
    scores: Any = None             # the StructureScores behind the plan, when a stage asked to keep them


def check(job: PruneJob) -> None:
    """Everything refused before the model loads: the memory mode, the output, the recovery data."""
    if job.memory not in MEMORY_MODES:
        raise SecateursError(f"memory must be one of {', '.join(MEMORY_MODES)}; got {job.memory!r}")
    if job.recovery is not None and launched_size() > 1 and execution(job) == "recovering":
        raise SecateursError(f"{launched_size()} processes were launched, and the iterative pipeline (remove a layer, "
                             "recover, re-score) runs in one: run it without the launcher")
    preflight(job)
    if job.recovery is not None and job.memory != "in-memory":
        raise SecateursError("--recover trains the pruned model in memory, beside its dense teacher: prune with "
                             "--streamed or --device-map first, then run `secateurs recover` (its --device-map places "
                             "the teacher with offloading)")


def execution(job: PruneJob) -> str:
    """The driver: the memory mode asked for, or the one the method needs with these options."""
    if job.plan is not None:
        return job.memory
    method = get_method(job.method)
    return method.execution(method.options.from_keywords(job.method, job.options), job.memory,
                            job.recovery is not None)


def execute(job: PruneJob, model=None, tokenizer=None, scores_out: dict | None = None) -> PruneResult:
    """Run a checked job; `model` (in memory, the job's source as loaded) saves loading it again."""
    driver = execution(job)
    if driver == "streamed":
        return _streamed(job)
    if driver == "device-map":
        return _device_mapped(job)
    if model is None:
        model, tokenizer = loading.load_model(job.source, job.dtype, job.device)
    if driver == "recovering":
        return _depth_recovering(job, model, tokenizer)
    if job.recovery is not None:
        return _pruned_and_recovered(job, model, tokenizer)
    return prune_and_save(job, model, tokenizer, scores_out)


def preflight(job: PruneJob, kind: str = "model") -> None:
    """What can be checked before the slow part: the device, the output location (claimed for this
    run; `kind`: what the run writes there), the caches, the recovery data."""
    check_device(job.device)
    check_output_dir(job.out, job.force, job.inputs, kind=kind)
    # files written beside the output may not lie inside it either: the output is replaced whole
    for path, what in ((job.statistics, "--stats file"), (job.scores_cache, "--scores-cache folder"),
                       (job.offload_folder, "--offload-folder")):
        if path:
            resolved = Path(path).expanduser().resolve()
            refuse_overlap(resolved, job.inputs, what)
            refuse_overlap(resolved, [job.out], what, existing_only=False)
    if job.statistics and not Path(job.statistics).expanduser().exists():  # an existing one is read, not written
        check_output_file(job.statistics, job.inputs, suffixes=(".safetensors",), what="--stats file")
    if job.recovery is not None:
        _check_recovery_data(job.recovery)
        check_resources_before_loading(job.source, job.source, job.device, job.recovery)
        r = job.recovery
        checkpoint_folder(r.checkpoint_dir, Path(job.out).expanduser().resolve(), r.save_every, r.resume, job.inputs,
                          job.force)


def _check_recovery_data(recovery: RecoverySettings) -> None:
    """The recovery data file (UTF-8, every record usable, not the evaluation text), checked before
    pruning: otherwise a bad file is found only once the model is pruned."""
    recovery.check(True)  # the dense model is the teacher
    check_recovery_source(recovery.data)
    refuse_evaluation_overlap(recovery.data, None)


def prune_in_memory(job: PruneJob, model, tokenizer, scores_out: dict | None = None):
    """Prune `model` in place: (model, plan, stats before, stats after, seconds)."""
    before = model_stats(model)
    base_identity = model_identity(model)  # `recover` warns when given another teacher than this dense model
    start = time.perf_counter()
    extra = {"scores_out": scores_out} if scores_out is not None and job.plan is None else {}
    model, plan = prune(model, tokenizer, method=job.method, ratio=job.ratio, plan=job.plan, **job.plan_keywords(),
                        **job.reconstruction, **extra)
    plan.provenance["base_identity"] = base_identity
    return model, plan, before, model_stats(model), time.perf_counter() - start


def prune_and_save(job: PruneJob, model, tokenizer, scores_out: dict | None = None) -> PruneResult:
    model, plan, before, after, seconds = prune_in_memory(job, model, tokenizer, scores_out)
    out = save_pruned(model, plan, job.out, tokenizer=tokenizer, force=job.force, inputs=job.inputs)
    return PruneResult(plan, out, model, compare_stats(before, after), seconds)


def _pruned_and_recovered(job: PruneJob, model, tokenizer) -> PruneResult:
    """Dense in, recovered model out: prune in memory, then distil the dense model (a copy kept
    before pruning) into the pruned one, and save the result. In several launched processes
    (secateurs.runtime.distributed) process 0 alone prunes: every other process gives its copy the
    plan's shapes and process 0's weights, then all of them recover data-parallel."""
    world = join_processes(job.recovery, job.device)
    dense = copy.deepcopy(model)

    def pruned() -> tuple:
        return prune_in_memory(job, model, tokenizer)[1:]

    plan, before, after, seconds = world.from_main(pruned)
    if not world.main:
        apply_plan(model, plan)
    world.copy_from_main(model)
    result = recover(model, dense, tokenizer=tokenizer, teacher_tokenizer=tokenizer, plan=plan, out=job.out,
                     force=job.force, settings=job.recovery.replace(seed=job.seed))
    return PruneResult(plan, result.out, result.model, compare_stats(before, after), seconds, result.record)


def _depth_recovering(job: PruneJob, model, tokenizer) -> PruneResult:
    """Consensus's pipeline: remove one layer, recover, re-score, repeat (secateurs.recovery.iterative)."""
    method = get_method(job.method)
    options = method.options.from_keywords(job.method, job.options)  # the method's defaults where not given
    model, plan, record = prune_depth_recovering(
        model, tokenizer, job.method, job.ratio, options=options, calibration=job.calibration,
        calibration_options=job.calibration_options, recovery=job.recovery, ratio_of=job.ratio_of,
        layers_equivalent=job.layers_equivalent, seed=job.seed)
    out = save_pruned(model, plan, job.out, tokenizer=tokenizer, force=job.force, inputs=job.inputs,
                      extra_files={RECOVERY_FILENAME: json.dumps(record, indent=2) + "\n"})
    return PruneResult(plan, out, model, recovery=record)


def _reconstruction_settings(job: PruneJob):
    return reconstruction_for(job.method, job.plan, **job.reconstruction,
                              rounding=job.options.get("rounding", "balanced"), round_to=job.options.get("round_to", 1))


def _streamed(job: PruneJob) -> PruneResult:
    """Models larger than memory: plan on a skeleton with lazily loaded layers, cut shard by shard."""
    if not Path(job.source).is_dir():
        raise SecateursError("--streamed needs a local Hugging Face model folder (safetensors)")
    if job.statistics:
        raise SecateursError("--stats keeps in-memory statistics; with --streamed use --scores-cache DIR")
    tokenizer = load_tokenizer(job.source)
    plan = job.plan.mark_reapplied() if job.plan is not None else _streamed_plan(job, tokenizer)
    settings = _reconstruction_settings(job)
    if settings is None:
        out = prune_checkpoint(job.source, plan, job.out, tokenizer=tokenizer, force=job.force)
    else:
        out = _streamed_reconstructed(job, plan, settings, tokenizer)
    return PruneResult(plan, out)


def _streamed_plan(job: PruneJob, tokenizer) -> PruningPlan:
    """Statistics streamed layer by layer (resumable with scores_cache); weight-based criteria,
    HARP's search and depth scoring read each layer when they reach it."""
    method = get_method(job.method)
    method.check_streamed(method.options.from_keywords(job.method, job.options))
    keywords = job.plan_keywords()
    skeleton, tensors = load_skeleton(job.source, load_outside_layers=method.needs.lm_head, lazy_layers=True,
                                      device=job.device)
    if method.needs.calibration:
        keywords["calibration"] = _file_calibration(job, tokenizer, skeleton.config, "--streamed needs a calibration "
                                                    "file (--calib): 'self' would generate text with the whole model")
    if method.needs.statistics:
        stats = streamed_statistics(skeleton, keywords["calibration"], checkpoint=tensors, device=job.device,
                                    cache_dir=job.scores_cache)
        keywords.update(statistics=stats, calibration=None)
    elif job.scores_cache:
        raise SecateursError(f"--scores-cache keeps streamed statistics; {job.method!r} does not use them")
    return make_plan(skeleton, job.method, job.ratio, tokenizer=tokenizer, **keywords)


def _file_calibration(job: PruneJob, tokenizer, config, refusal: str):
    """A streamed run's calibration data: from a file (never 'self', which would need the whole
    model to generate it), no longer than the model's context."""
    if job.calibration in (None, "self"):
        raise SecateursError(refusal)
    check_calibration_length(config, job.calibration_options.get("max_length"))
    return load_calibration(job.calibration, tokenizer, **job.calibration_options)


def _streamed_reconstructed(job: PruneJob, plan: PruningPlan, settings, tokenizer) -> Path:
    """Sequential re-fitting layer by layer from the checkpoint (one layer in memory), the fits
    kept on disk beside the run until prune_checkpoint writes them into the output shards."""
    if settings.mode != "sequential":
        raise SecateursError("--streamed reconstructs sequentially (one layer's Gram matrices in memory); "
                             "use --reconstruct sequential")
    skeleton, tensors = load_skeleton(job.source, load_outside_layers=False, lazy_layers=True, device=job.device)
    calibration = _file_calibration(job, tokenizer, skeleton.config, "--streamed --reconstruct needs a calibration "
                                                                     "file (--calib)")
    plan.provenance["reconstruction"] = {**settings.to_dict(), "calibration_hash": calibration.hash}
    with tempfile.TemporaryDirectory(prefix="secateurs-refit-") as folder:
        store = RefitStore(folder)
        apply_plan_sequential(skeleton, plan, calibration, settings, checkpoint=tensors, device=job.device,
                              store=store)
        return prune_checkpoint(job.source, plan, job.out, tokenizer=tokenizer, force=job.force, refits=store)


def _device_mapped(job: PruneJob) -> PruneResult:
    """Plan on the model as accelerate dispatched it, then apply the plan to the checkpoint shard by
    shard: offloaded weights cannot be sliced in place."""
    if not Path(job.source).is_dir():
        raise SecateursError("prune --device-map needs a local Hugging Face model folder (safetensors): "
                             "the pruned model is written from its checkpoint shard by shard")
    asked = job.reconstruction.get("reconstruct", "not given")  # 'none': the plan's shapes only
    recorded = job.plan is not None and job.plan.provenance.get("reconstruction")
    if asked not in ("not given", "none") or (asked == "not given" and recorded):
        raise SecateursError("reconstruction re-fits weights in place, which offloaded weights cannot take (this plan "
                             "records one, or --reconstruct asks for it); with --device-map use --streamed, or "
                             "--reconstruct none to apply the plan's shapes only")
    if asked == "not given" and not recorded and _reconstruction_settings(job) is not None:
        status("the default re-fit needs the weights in memory; a device-mapped run applies the plan's "
               "shapes only (prune --streamed re-fits one layer at a time)")
    model, tokenizer = loading.load_model(job.source, job.dtype, job.device, job.device_map, job.offload_folder)
    plan = job.plan.mark_reapplied() if job.plan is not None else \
        make_plan(model, job.method, job.ratio, tokenizer=tokenizer, **job.plan_keywords())
    del model
    out = prune_checkpoint(job.source, plan, job.out, tokenizer=tokenizer, force=job.force)
    return PruneResult(plan, out)
