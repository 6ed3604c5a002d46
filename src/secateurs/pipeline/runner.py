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

from secateurs.pipeline.jobs import PruneJob, PruneResult
from secateurs.pipeline.stages import Prune, Recover, RunState, Stage


def run(stages: PruneJob | Sequence[Stage]) -> RunState | PruneResult:
    """Check every stage, then execute them in order; returns the RunState (each stage's result in
    `results`). A PruneJob alone runs as the one prune stage and returns its PruneResult."""
    if isinstance(stages, PruneJob):
        return run([Prune(stages)]).results[-1]
    stages = list(stages)
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
