"""Magnitude criterion: the L2 norm of all weights a structure owns.

Head h: its q rows and o columns, plus its share (1/G) of its KV head's k and v rows.
Neuron j: its rows of the input projections (gate, up / fc1, with biases) and its down column.
Data-free; a baseline, not a method to ship models with.
"""

from __future__ import annotations

import torch

from secateurs.adapters import get_adapter
from secateurs.criteria.scores import StructureScores
from secateurs.runtime.offload import each_materialized


def _sq(t: torch.Tensor | None, units: int, dim: int) -> torch.Tensor:
    """Sum of squares per unit along `dim` (units of equal width), in float32."""
    if t is None:
        return torch.zeros(units)
    t = t.detach().float()
    t = t if dim == 0 else t.t()
    return t.reshape(units, -1).pow(2).sum(1).cpu()


@torch.no_grad()
def magnitude_scores(model) -> StructureScores:
    adapter = get_adapter(model)
    heads, neurons = [], []
    for layer in each_materialized(adapter.decoder_layers(model)):
        shape = adapter.layer_shape(layer)
        w = adapter.attention_weights(layer)
        kv = (_sq(w.k, shape.num_kv_heads, 0) + _sq(w.v, shape.num_kv_heads, 0)
              + _sq(w.k_bias, shape.num_kv_heads, 0) + _sq(w.v_bias, shape.num_kv_heads, 0))
        per_head = (_sq(w.q, shape.num_heads, 0) + _sq(w.q_bias, shape.num_heads, 0)
                    + _sq(w.o, shape.num_heads, 1)
                    + kv.repeat_interleave(shape.group_size) / shape.group_size)
        heads.append(per_head.sqrt())
        m = adapter.mlp_weights(layer)
        n = shape.intermediate_size
        per_neuron = _sq(m.out, n, 1)
        for weight, bias in m.inputs:
            per_neuron += _sq(weight, n, 0) + _sq(bias, n, 0)
        neurons.append(per_neuron.sqrt())
    return StructureScores(heads, neurons, {"criterion": "magnitude", "norm": "l2 of owned weights"})
