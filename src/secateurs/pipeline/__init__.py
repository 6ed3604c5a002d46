"""Orchestration: a run is a list of stages (secateurs.pipeline.stages: prune, recover, export,
evaluate, bench, report, sweep, demo) that `run` (secateurs.pipeline.runner) checks, then executes in
order; the command line builds the list from its arguments.

The names below are imported on first use, so that importing one module of the package does not
import every stage's dependencies."""

from __future__ import annotations

from secateurs.lazy import lazy_names

_EXPORTS = {"run": "runner", "RunState": "stages", "Placement": "stages", "Prune": "stages", "Recover": "stages",
            "Export": "stages", "Evaluate": "stages", "Bench": "stages", "Report": "stages", "Sweep": "stages",
            "Demo": "demo", "PruneJob": "jobs", "PruneResult": "jobs"}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_names(__name__, {k: f"secateurs.pipeline.{v}" for k, v in _EXPORTS.items()})
