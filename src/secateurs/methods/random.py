"""Random: seeded random scores, the floor every criterion must beat."""

from __future__ import annotations

from secateurs.criteria.random import random_scores
from secateurs.methods.width import ScoredWidthMethod


class Random(ScoredWidthMethod):
    name = "random"
    summary = "seeded random scores (the floor)"

    def score(self, context, statistics, options):
        return random_scores(context.model, context.seed)
