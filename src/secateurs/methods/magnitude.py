"""Magnitude: a head or neuron scores the L2 norm of the weights it owns; needs no data."""

from __future__ import annotations

from secateurs.criteria.magnitude import magnitude_scores
from secateurs.methods.width import ScoredWidthMethod


class Magnitude(ScoredWidthMethod):
    name = "magnitude"
    summary = "L2 norm of the weights a head or neuron owns (data-free)"

    def score(self, context, statistics, options):
        return magnitude_scores(context.model)
