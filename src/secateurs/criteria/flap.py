"""FLAP (An et al., AAAI 2024) fluctuation metric: an input channel j of o_proj / down_proj
matters as much as its variance over calibration tokens times ||W[:, j]||^2 (how much the output
would move if the channel were replaced by its mean, the bias compensation FLAP then applies).
A head sums its d channels. Scores are standardised per layer and per kind before the global
selection (secateurs.methods.flap)."""

from __future__ import annotations

import torch

from secateurs.adapters import get_adapter
from secateurs.calibration.statistics import Statistics
from secateurs.criteria.scores import StructureScores
from secateurs.runtime.offload import each_materialized


@torch.no_grad()
def flap_scores(model, stats: Statistics, heads: bool = True) -> StructureScores:
    """Per-layer head and neuron fluctuation scores (heads=False: neurons only, heads left empty)."""
    adapter = get_adapter(model)
    head_scores, neurons = [], []
    for layer, a, m in zip(each_materialized(adapter.decoder_layers(model)), stats.attention, stats.mlp):
        shape = adapter.layer_shape(layer)
        if heads:
            o = adapter.attention_output_linear(layer).weight.detach().float().cpu()
            head_scores.append((a.channel_variance() * o.pow(2).sum(0)).reshape(shape.num_heads, -1).sum(1))
        down = adapter.mlp_output_linear(layer).weight.detach().float().cpu()
        neurons.append(m.channel_variance() * down.pow(2).sum(0))
    return StructureScores(head_scores, neurons, {"criterion": "flap", "metric": "WIFV", **stats.description})


def standardize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std within one layer; a constant layer scores 0 everywhere."""
    std = x.std()
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)
