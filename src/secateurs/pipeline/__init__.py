"""Orchestration: a run is a list of stages (secateurs.pipeline.stages: prune, recover, export,
evaluate, bench, report, sweep, demo) that `run` (secateurs.pipeline.runner) checks, then executes in
order; the command line builds the list from its arguments.

The names below are imported on first use, so that importing one module of the package does not
import every stage's dependencies."""

from __future__ import annotations

import importlib

_EXPORTS = {"run": "runner", "RunState": "stages", "Placement": "stages", "Prune": "stages", "Recover": "stages",
            "Export": "stages", "Evaluate": "stages", "Bench": "stages", "Report": "stages", "Sweep": "stages",
            "Demo": "demo", "PruneJob": "jobs", "PruneResult": "jobs"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'secateurs.pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(f"secateurs.pipeline.{_EXPORTS[name]}"), name)
