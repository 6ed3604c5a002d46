"""secateurs: exact structured pruning for Hugging Face causal language models.

The public names are imported on first use, so `import secateurs.cli.main` (and `secateurs --help`)
does not pay for torch and transformers, and no module imports the package root.
"""

from secateurs.lazy import lazy_names
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


__getattr__ = lazy_names(__name__, _PUBLIC)
