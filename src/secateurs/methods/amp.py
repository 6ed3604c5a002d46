"""AMP (arXiv 2504.21174): heads scored by the L1 norm of their projected output, MLP neurons by the
mean |activation| of the neuron, both from one calibration pass; the lowest go. `amp-heads` and
`amp-mlp` are the paper's ablations that prune one part only."""

from __future__ import annotations

from secateurs.criteria.amp import amp_scores
from secateurs.methods.base import Needs
from secateurs.methods.options import AmpOptions, AmpPartOptions
from secateurs.methods.width import ScoredWidthMethod


class Amp(ScoredWidthMethod):
    name = "amp"
    summary = "AMP: heads by L1 of their projected output, neurons by mean |activation|"
    options = AmpOptions
    needs = Needs(calibration=True, statistics=True)

    def score(self, context, statistics, options):
        return amp_scores(statistics, options.averaging)

    def provenance_head(self, options) -> dict:
        return {"selection": options.selection, "averaging": options.averaging}


class AmpHeads(Amp):
    name, parts, summary = "amp-heads", "heads", "AMP on attention heads only (ablation)"
    options = AmpPartOptions


class AmpMlp(Amp):
    name, parts, summary = "amp-mlp", "mlp", "AMP on MLP neurons only (ablation)"
    options = AmpPartOptions
