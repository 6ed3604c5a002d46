"""secateurs: exact structured pruning for Hugging Face causal language models.

The public names are imported on first use, so `import secateurs.cli.main` (and `secateurs --help`)
does not pay for torch and transformers, and no module imports the package root.
"""

from importlib import import_module

from secateurs.version import __version__

_PUBLIC = {
    "SecateursError": "secateurs.errors",
    "LayerPlan": "secateurs.planning.plan",
    "PruningPlan": "secateurs.planning.plan",
    "apply_plan": "secateurs.surgery.apply",
    "load_pruned": "secateurs.storage.pruned",
    "save_pruned": "secateurs.storage.pruned",
    "prune": "secateurs.methods",
    "recover": "secateurs.recovery",
    "export_gguf": "secateurs.export",
    "PruneJob": "secateurs.pipeline.jobs",
    "run": "secateurs.pipeline.runner",
    "RecoverySettings": "secateurs.recovery.settings",
    "ExportSettings": "secateurs.export.settings",
    "EvaluationSettings": "secateurs.evaluation.settings",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'secateurs' has no attribute {name!r}")
