"""The stages a run is made of: each a small frozen dataclass holding its settings, with `check`
(everything that can be refused before long work: options, data files, the outputs claimed under
the rules of secateurs.files.output) and `execute` (the work, on the model or folder the stage
before it left in the RunState). secateurs.pipeline.runner.run checks every stage, then executes
them in order.

    Prune     a PruneJob (secateurs.pipeline.jobs): plan, cut, (recover,) save
    Recover   secateurs.recovery.recover on the run's model (or a folder), saved as a folder
    Export    secateurs.export.export_gguf of the run's folder (or a given model)
    Evaluate  perplexity and zero-shot tasks of the run's model (or of given models), one JSON result
    Bench     prefill / decode speed of given models in alternating rounds, one JSON result
    Report    the Markdown + HTML report of a pruned folder
    TeacherLogits  a teacher-logit cache for `Recover` (secateurs.recovery.teacher_cache)
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secateurs.calibration.data import check_calibration_length
from secateurs.errors import SecateursError
from secateurs.evaluation.perplexity import load_text, perplexity
from secateurs.evaluation.report import write_run_report
from secateurs.evaluation.settings import EvaluationSettings
from secateurs.evaluation.speed import BenchConfig, bench_models, folder_bytes, machine_info
from secateurs.evaluation.suite import EvalSpec, evaluate
from secateurs.export import export_gguf
from secateurs.export.gguf_export import check_gguf_output
from secateurs.export.settings import ExportSettings
from secateurs.files.output import check_output_dir, check_output_file, result_marker, write_file
from secateurs.pipeline import jobs
from secateurs.pipeline.sweep import check_methods_ratios, refuse_unused_calibration, run_sweep
from secateurs.planning.plan import PLAN_FILENAME, PruningPlan
from secateurs.recovery.api import (
    RecoveryResult,
    check_resources_before_loading,
    checkpoint_folder,
    join_processes,
    recover,
)
from secateurs.recovery.cached_teacher import check_cache_settings
from secateurs.recovery.data import EvaluationText, check_recovery_source, refuse_evaluation_overlap
from secateurs.recovery.settings import RecoverySettings, TeacherLogitsSettings
from secateurs.recovery.teacher_cache import check_cache_output, write_teacher_logits
from secateurs.runtime import sharding
from secateurs.runtime.distributed import current as current_world
from secateurs.runtime.distributed import join as join_world
from secateurs.runtime.offload import has_offloaded_weights
from secateurs.runtime.progress import phase
from secateurs.storage import loading
from secateurs.storage.loading import check_device


@dataclass(frozen=True)
class Placement:
    """Where a stage loads a model: dtype, device, or an accelerate device map (with its offload folder)."""

    dtype: Any = None
    device: str = "cpu"
    device_map: Any = None
    offload_folder: str | None = None

    def check(self) -> None:
        """A device map is checked by accelerate when the model loads; a plain device now."""
        if self.device_map is None:
            check_device(self.device)


@dataclass
class RunState:
    """What one stage hands the next: the model in memory (and what it is: `source`, a folder once a
    stage wrote one), its plan, the dense model a later stage distils from, and every stage's result."""

    model: Any = None
    tokenizer: Any = None
    source: str | None = None
    folder: Path | None = None
    plan: PruningPlan | None = None
    dense: Any = None
    dense_source: str | None = None
    keep_dense: set = field(default_factory=set)  # sources a later stage uses as its teacher
    results: list = field(default_factory=list)

    def load(self, source: str, placement: Placement = Placement()):
        """(model, tokenizer) of `source`: the run's own model when it is that source, else loaded
        (the one place a run loads a whole model)."""
        if self.model is not None and self.source == str(source):
            return self.model, self.tokenizer
        model, tokenizer = loading.load_model(source, placement.dtype, placement.device, placement.device_map,
                                      placement.offload_folder)
        self.model, self.tokenizer, self.source, self.folder = model, tokenizer, str(source), None
        return model, tokenizer

    def holding(self, model, tokenizer, source, folder: Path | None = None) -> None:
        """The model the stage left, as written to `folder` (its name from now on, as if loaded from it)."""
        self.model, self.tokenizer, self.source, self.folder = model, tokenizer, str(source), folder
        if model is not None and folder is not None:
            model.config.name_or_path = str(folder)


class Stage:
    """One step of a run: `check` before any stage works, then `execute` in order."""

    def check(self, run: RunState) -> Any:
        """Refuse now what would fail later; what it returns (data read once) reaches `execute`."""

    def execute(self, run: RunState, prepared: Any) -> Any:
        raise NotImplementedError


def _label(source: str, taken: set[str]) -> str:
    name = Path(source).name or source
    while name in taken:
        name += "'"
    taken.add(name)
    return name


def _measured(baseline: str | None, models: tuple[str, ...], run: RunState) -> list[str]:
    """The sources an Evaluate or Bench stage measures: the baseline first, then the models (default: the
    run's model)."""
    return ([baseline] if baseline else []) + list(models or [run.source])


def _claim_result_file(out: str | None, force: bool, inputs, kind: str) -> Path | None:
    return (check_output_file(out, [i for i in inputs if i], force=force, kind=kind, what="--out file")
            if out else None)


@dataclass(frozen=True)
class Prune(Stage):
    """Prune as the job says; `keep_scores`: keep the StructureScores behind the plan (reports)."""

    job: jobs.PruneJob
    keep_scores: bool = False

    def check(self, run: RunState) -> None:
        if self.job.recovery is None:
            return jobs.check(self.job)
        world = join_processes(self.job.recovery, self.job.device)  # prune --recover under a launcher
        return world.from_main(jobs.check, self.job)

    def execute(self, run: RunState, prepared: Any = None) -> jobs.PruneResult:
        job = self.job
        if job.memory != "in-memory":
            result = jobs.execute(job)
            run.holding(None, None, result.out, result.out)
            run.plan = result.plan
            return result
        model, tokenizer = run.load(job.source, Placement(job.dtype, job.device))
        if job.source in run.keep_dense:
            run.dense, run.dense_source = copy.deepcopy(model), job.source
        scores: dict | None = {} if self.keep_scores else None
        result = jobs.execute(job, model, tokenizer, scores_out=scores)
        run.holding(result.model, tokenizer, result.out, result.out)
        run.plan = result.plan
        if scores:
            result.scores = scores.get("scores")
        return result


@dataclass(frozen=True)
class Recovered:
    """What a Recover stage returns: the recovery (model, record, folder) and the perplexity before
    and after on its `ppl` text ({"before", "after"}; None without one)."""

    result: RecoveryResult
    perplexity: dict | None = None


@dataclass(frozen=True)
class Recover(Stage):
    """Distil (or fine-tune) the run's model, or the `student` folder, and save it to `out`.
    `teacher`: the dense model (the one the run pruned is reused from memory); `ppl`: a text measured
    before and after (seq 128, first `ppl_tokens` tokens)."""

    out: str
    settings: RecoverySettings = RecoverySettings()
    student: str | None = None
    teacher: str | None = None
    placement: Placement = Placement()
    student_device_map: Any = None
    force: bool = False
    ppl: str | None = None
    ppl_tokens: int = 65536

    def inputs(self, run: RunState) -> list:
        return [self.student or run.source, self.teacher, self.settings.data, self.settings.teacher_cache, self.ppl]

    def check(self, run: RunState) -> str | None:
        """The checks of every setting, the data and the outputs before any model loads."""
        s = self.settings
        s.check(self.teacher is not None)
        if s.teacher_cache is not None:
            check_cache_settings(s, with_teacher=self.teacher is not None)
        if self.student and self.placement.device_map is None and self.student_device_map is None:
            check_resources_before_loading(self.student, self.teacher, self.placement.device, s)
        world = join_processes(s, self.placement.device, (self.placement.device_map, self.student_device_map))
        out_path = world.from_main(check_output_dir, self.out, self.force, self.inputs(run))
        world.from_main(checkpoint_folder, s.checkpoint_dir, out_path, s.save_every, s.resume, self.inputs(run),
                        self.force)
        check_recovery_source(s.data)
        refuse_evaluation_overlap(s.data, self.evaluated())
        return load_text(self.ppl)[0] if self.ppl else None  # a missing file fails before the models load

    def evaluated(self) -> list | None:
        return [EvaluationText(self.ppl, self.ppl_tokens)] if self.ppl else None

    def execute(self, run: RunState, prepared: str | None = None) -> Recovered:
        student, tokenizer, plan = self._student(run)
        teacher, teacher_tokenizer = self._teacher(run)
        measure = _perplexity_meter(self.ppl, prepared, tokenizer, self.ppl_tokens) if self.ppl else None
        before = measure(student, "before") if measure else None
        result = recover(student, teacher, settings=self.settings, tokenizer=tokenizer,
                         teacher_tokenizer=teacher_tokenizer, plan=plan, out=self.out, force=self.force,
                         evaluation_files=self.evaluated())
        run.holding(result.model, tokenizer, result.out, result.out)
        return Recovered(result, {"before": before, "after": measure(result.model, "after")} if measure else None)

    def _student(self, run: RunState):
        if self.student is None and run.model is not None:
            return run.model, run.tokenizer, run.plan
        source = self.student or str(run.folder)
        if self._loads_once():
            model, tokenizer = self._load_once(source)
            run.holding(model, tokenizer, source)
        else:
            model, tokenizer = run.load(source, Placement(self.placement.dtype, self.placement.device,
                                                          self.student_device_map))
        if self.student_device_map is not None and has_offloaded_weights(model):
            raise SecateursError("the student device map offloads some of its weights to CPU or disk, and training "
                                 "steps weights on their device: keep the student on GPUs, or all of it on the CPU "
                                 "(offloading is for the teacher's --device-map)")
        plan = PruningPlan.load(source) if (Path(source) / PLAN_FILENAME).is_file() else None
        return model, tokenizer, plan

    def _teacher(self, run: RunState):
        if self.teacher is None:
            return None, None
        if run.dense is not None and run.dense_source == self.teacher:
            return run.dense, run.tokenizer
        if self._loads_once() and self.settings.teacher_cache is None:
            return self._load_once(self.teacher)
        p = self.placement
        return loading.load_model(self.teacher, p.dtype, p.device, p.device_map, p.offload_folder)

    def _loads_once(self) -> bool:
        """fsdp over several processes: process 0 alone reads each model (onto the CPU), the others build
        it on the meta device, and sharding gives every process its part (secateurs.runtime.sharding).
        Not with a device map, a perplexity text (measured before recovery) or self-generated data (both
        need the weights before the models are sharded)."""
        return (current_world().size > 1 and self.settings.strategy == "fsdp" and self.placement.device_map is None
                and self.student_device_map is None and not self.ppl and self.settings.data != "self")

    def _load_once(self, source: str):
        """(model, tokenizer) of `source`: read by process 0, a meta skeleton in the others."""
        return sharding.load_once(lambda: loading.load_model(source, self.placement.dtype, "cpu"), current_world())


def _perplexity_meter(ppl: str, text: str, tokenizer, tokens: int):
    """measure(model, when) -> perplexity at seq 128 on the first `tokens` tokens of `text`."""
    with phase(f"tokenising {Path(ppl).name}"):  # once for both measurements
        ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0][:tokens]

    def measure(model, when: str) -> float:  # minutes on a real model: a phase line and a bar, never silence
        with phase(f"perplexity on {Path(ppl).name} {when} recovery (seq 128, first {ids.numel():,} tokens)"):
            return perplexity(model, tokenizer, "", seq_len=128, ids=ids)["perplexity"]

    return measure


@dataclass(frozen=True)
class TeacherLogits(Stage):
    """Write the teacher-logit cache of `teacher` on the recovery data of `settings` to the folder `out`
    (`resume`: continue an interrupted write of it), for `Recover` with teacher_cache; under a launcher,
    every process computes a share of the shards and process 0 writes them."""

    out: str
    settings: TeacherLogitsSettings
    teacher: str
    placement: Placement = Placement()
    force: bool = False
    resume: bool = False

    def inputs(self) -> list:
        return [self.teacher, self.settings.data]

    def check(self, run: RunState) -> None:
        self.placement.check()
        check_recovery_source(self.settings.data)
        world = join_world(self.placement.device)
        if world.size > 1 and self.placement.device_map is not None:
            raise SecateursError(f"{world.size} processes each hold the whole teacher and write every N-th shard: "
                                 "--device-map places one process's teacher, run it in one process")
        world.from_main(check_cache_output, self.out, self.force, self.resume, self.inputs())

    def execute(self, run: RunState, prepared: Any = None) -> Path:
        model, tokenizer = run.load(self.teacher, self.placement)
        return write_teacher_logits(model, tokenizer, self.settings, self.out, force=self.force, resume=self.resume,
                                    inputs=self.inputs())


@dataclass(frozen=True)
class Export(Stage):
    """One GGUF file of the run's folder (or `model`: a folder, .gguf or alias) at `out`."""

    out: str
    settings: ExportSettings = ExportSettings()
    model: str | None = None
    force: bool = False

    def check(self, run: RunState) -> None:
        check_gguf_output(self.out, self.force, [self.model] if self.model else [])

    def execute(self, run: RunState, prepared: Any = None) -> Path:
        source = self.model or (str(run.folder) if run.folder is not None else None)
        if source is None:
            return export_gguf(run.model, self.out, tokenizer=run.tokenizer, force=self.force, settings=self.settings)
        return export_gguf(source, self.out, force=self.force, settings=self.settings)


@dataclass(frozen=True)
class Evaluate(Stage):
    """Perplexity and zero-shot tasks (`settings`) of `models` (default: the run's model), the
    `baseline` first, as one result (written to `out` when given)."""

    settings: EvaluationSettings = EvaluationSettings()
    models: tuple[str, ...] = ()
    baseline: str | None = None
    placement: Placement = Placement()
    out: str | None = None
    force: bool = False

    def check(self, run: RunState):
        self.placement.check()
        inputs = [*_measured(self.baseline, self.models, run), self.settings.ppl, self.settings.data_dir]
        out = _claim_result_file(self.out, self.force, inputs, "eval")
        spec, info = EvalSpec.from_settings(self.settings)  # the text read once, before any model loads
        return out, spec, info

    def execute(self, run: RunState, prepared) -> dict:
        out, spec, info = prepared
        taken: set[str] = set()
        models = {}
        for source in _measured(self.baseline, self.models, run):
            model, tokenizer = run.load(source, self.placement)
            spec.check(model)
            models[_label(source, taken)] = {"source": source, **evaluate(model, tokenizer, spec)}
        result = {"written_by": result_marker("eval"), "text": info, "protocols": spec.protocols,
                  "baseline": _label(self.baseline, set()) if self.baseline else None, "models": models,
                  "machine": machine_info(self.placement.device)}
        if spec.tasks:
            first = next(iter(models.values()))["zero_shot"]
            result["zero_shot"] = {k: first[k] for k in ("lm_eval_version", "limit", "num_fewshot")}
            result["zero_shot"]["data_dir"] = spec.data_dir
        if out:
            write_file(out, json.dumps(result, indent=2) + "\n")
        return result


@dataclass(frozen=True)
class Bench(Stage):
    """Prefill and decode speed of `models` (default: the run's model) against `baseline`, measured in
    alternating rounds, as one result (written to `out` when given)."""

    config: BenchConfig
    models: tuple[str, ...] = ()
    baseline: str | None = None
    placement: Placement = Placement()
    out: str | None = None
    force: bool = False

    def check(self, run: RunState) -> Path | None:
        self.placement.check()
        out = _claim_result_file(self.out, self.force, _measured(self.baseline, self.models, run), "bench")
        self.config.validate()
        return out

    def execute(self, run: RunState, prepared: Path | None) -> dict:
        taken: set[str] = set()
        models, paths = {}, {}
        for source in _measured(self.baseline, self.models, run):
            label = _label(source, taken)
            if run.source == source:
                models[label] = run.model
            else:  # every measured model stays in memory: the rounds alternate between them
                models[label], _ = loading.load_model(source, self.placement.dtype, self.placement.device,
                                              self.placement.device_map, self.placement.offload_folder)
            paths[label] = source
        result = {"written_by": result_marker("bench"), **bench_models(models, self.config)}
        for label, source in paths.items():
            result["models"][label]["source"] = source
            result["models"][label]["disk_bytes"] = folder_bytes(source)
        if prepared:
            write_file(prepared, json.dumps(result, indent=2) + "\n")
        return result


@dataclass(frozen=True)
class Report(Stage):
    """The Markdown + HTML report (with plots) of a pruned folder (default: the run's folder)."""

    folder: str | None = None
    out: str | None = None
    eval_file: str | None = None
    bench_file: str | None = None
    scores: str | None = None
    force: bool = False

    def execute(self, run: RunState, prepared: Any = None) -> dict[str, Path]:
        return write_run_report(self.folder or run.folder, self.out, eval_file=self.eval_file,
                                bench_file=self.bench_file, scores=self.scores, force=self.force)


@dataclass(frozen=True)
class Sweep(Stage):
    """Prune the model with every method x ratio (`prune`: a PruneJob template, its method and ratio
    replaced), evaluate each with `evaluation` (its text, tasks and placement), write the sweep folder."""

    prune: jobs.PruneJob
    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    evaluation: Evaluate
    out: str
    force: bool = False

    def inputs(self) -> list[str]:
        return [i for i in (self.prune.source, self.evaluation.settings.ppl, self.prune.calibration,
                            self.evaluation.settings.data_dir) if i]

    def check(self, run: RunState):
        check_methods_ratios(list(self.methods), list(self.ratios))
        refuse_unused_calibration(self.prune.calibration_options, self.prune.calibration, list(self.methods))
        self.evaluation.placement.check()
        check_output_dir(self.out, force=self.force, inputs=self.inputs(), what="sweep output folder", kind="sweep")
        return Evaluate.check(self.evaluation, run)

    def execute(self, run: RunState, prepared) -> dict:
        _, spec, info = prepared
        model, tokenizer = run.load(self.prune.source, self.evaluation.placement)
        check_calibration_length(model.config, self.prune.calibration_options.get("max_length"))
        return run_sweep(model, tokenizer, list(self.methods), list(self.ratios), spec, self.out,
                         job=self.prune, model_name=self.prune.source, describe={"text": info},
                         inputs=self.inputs(), force=self.force)
