"""`run`: the one orchestrator. A run is a list of stages (secateurs.pipeline.stages): every stage is
checked first (its options, its data files, its outputs claimed under the rules of
secateurs.files.output), so that nothing long starts before everything that can be refused was;
then each executes in order on what the one before left (the model in memory, the folder written).

    run([Prune(job), Recover(out, settings, teacher=job.source), Export("model.gguf"), Evaluate(spec)])

A dense model a later stage distils from (a Recover whose teacher is the source an earlier Prune
pruned) is kept in memory from before the pruning, not loaded again.
"""

from __future__ import annotations

from collections.abc import Sequence

from secateurs.errors import SecateursError
from secateurs.pipeline.jobs import PruneJob, PruneResult
from secateurs.pipeline.stages import Prune, Recover, RunState, Stage, TeacherLogits
from secateurs.runtime.distributed import launched_size


def run(stages: PruneJob | Sequence[Stage]) -> RunState | PruneResult:
    """Check every stage, then execute them in order; returns the RunState (each stage's result in
    `results`). A PruneJob alone runs as the one prune stage and returns its PruneResult."""
    if isinstance(stages, PruneJob):
        return run([Prune(stages)]).results[-1]
    stages = list(stages)
    refuse_several_processes(stages)
    state = RunState(keep_dense=teachers_in_memory(stages))
    prepared = [stage.check(state) for stage in stages]
    for stage, ready in zip(stages, prepared):
        state.results.append(stage.execute(state, ready))
    return state


def teachers_in_memory(stages: Sequence[Stage]) -> set[str]:
    """The sources an in-memory Prune stage prunes that a later Recover stage distils from."""
    kept, pruned = set(), set()
    for stage in stages:
        if isinstance(stage, Prune) and stage.job.memory == "in-memory" and stage.job.recovery is None:
            pruned.add(stage.job.source)
        if isinstance(stage, Recover) and stage.teacher in pruned:
            kept.add(stage.teacher)
    return kept


def refuse_several_processes(stages: Sequence[Stage]) -> None:
    """Under a launcher's several processes only recovery (data-parallel, alone or after the pruning of
    `prune --recover`: process 0 prunes, secateurs.pipeline.jobs) and the teacher-logit cache run; any
    other stage would run once per process and every process would write its output."""
    others = sorted({type(stage).__name__ for stage in stages
                     if not isinstance(stage, Recover | TeacherLogits)
                     and not (isinstance(stage, Prune) and stage.job.recovery)})
    if launched_size() > 1 and others:
        raise SecateursError(f"{launched_size()} processes were launched, and only recovery and teacher-logits run "
                             f"in several processes ({', '.join(others)} runs in one): run it without the launcher, "
                             "then `torchrun ... -m secateurs recover` on its output")
