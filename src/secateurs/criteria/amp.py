"""AMP (arXiv 2504.21174): a head matters as much as the L1 norm of what it writes into the
residual stream (its output projected by its slice of W_O), a neuron as much as its mean
absolute activation. Both are read from one calibration pass (secateurs.calibration.statistics)."""

from __future__ import annotations

from secateurs.calibration.statistics import Statistics
from secateurs.criteria.scores import StructureScores


def amp_scores(stats: Statistics, averaging: str = "prompt") -> StructureScores:
    """averaging='prompt': mean over each prompt's real tokens, then over prompts (the paper);
    'token': every real token weighs the same."""
    return StructureScores(
        heads=[s.unit_mean(averaging) for s in stats.attention],
        neurons=[s.unit_mean(averaging) for s in stats.mlp],
        description={"criterion": "amp", "averaging": averaging, **stats.description},
    )
