"""wanda-sp (the structured Wanda baseline of FLAP's paper): a head or neuron scores the sum over its
output-projection input channels of |W| times the channel's activation norm."""

from __future__ import annotations

from secateurs.criteria.wanda_sp import wanda_sp_scores
from secateurs.methods.base import Needs
from secateurs.methods.width import ScoredWidthMethod


class WandaSp(ScoredWidthMethod):
    name = "wanda-sp"
    summary = "wanda-sp: |W| * ||X|| per output-projection input channel"
    needs = Needs(calibration=True, statistics=True)

    def score(self, context, statistics, options):
        return wanda_sp_scores(context.model, statistics)


class WandaSpHeads(WandaSp):
    name, parts, summary = "wanda-sp-heads", "heads", "wanda-sp on attention heads only"
