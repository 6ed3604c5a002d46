"""wanda-sp, as FLAP's repository defines it: the Wanda score |W_ij| * ||X_j||_2 summed over the
output rows of o_proj / down_proj, per input channel; a head sums its d channels.
||X_j|| is the root mean square of channel j over calibration tokens."""

from __future__ import annotations

import torch

from secateurs.adapters import get_adapter
from secateurs.calibration.statistics import Statistics
from secateurs.criteria.scores import StructureScores
from secateurs.runtime.offload import each_materialized


@torch.no_grad()
def wanda_sp_scores(model, stats: Statistics) -> StructureScores:
    adapter = get_adapter(model)
    heads, neurons = [], []
    for layer, a, m in zip(each_materialized(adapter.decoder_layers(model)), stats.attention, stats.mlp):
        shape = adapter.layer_shape(layer)
        o = adapter.attention_output_linear(layer).weight.detach().float().cpu()
        channel = (o.abs() * a.channel_mean_square().sqrt()).sum(0)
        heads.append(channel.reshape(shape.num_heads, -1).sum(1))
        down = adapter.mlp_output_linear(layer).weight.detach().float().cpu()
        neurons.append((down.abs() * m.channel_mean_square().sqrt()).sum(0))
    return StructureScores(heads, neurons, {"criterion": "wanda-sp", **stats.description})
