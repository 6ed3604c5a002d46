"""secateurs: exact structured pruning for Hugging Face causal language models."""

__version__ = "0.1.0"

from secateurs.errors import SecateursError  # noqa: E402
from secateurs.plan import LayerPlan, PruningPlan  # noqa: E402
from secateurs.surgery import apply_plan  # noqa: E402
from secateurs.io import load_pruned, save_pruned  # noqa: E402
from secateurs.methods import prune  # noqa: E402
from secateurs.recovery import recover  # noqa: E402

__all__ = [
    "__version__",
    "SecateursError",
    "LayerPlan",
    "PruningPlan",
    "apply_plan",
    "load_pruned",
    "save_pruned",
    "prune",
    "recover",
]
