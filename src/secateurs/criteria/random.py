"""Random criterion: seeded uniform scores, the floor every real criterion must beat."""

from __future__ import annotations

import torch

from secateurs.adapters import get_adapter
from secateurs.criteria.scores import StructureScores


def random_scores(model, seed: int = 0) -> StructureScores:
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(seed)
    heads, neurons = [], []
    for layer in adapter.decoder_layers(model):
        shape = adapter.layer_shape(layer)
        heads.append(torch.rand(shape.num_heads, generator=gen))
        neurons.append(torch.rand(shape.intermediate_size, generator=gen))
    return StructureScores(heads, neurons, {"criterion": "random", "seed": seed})
