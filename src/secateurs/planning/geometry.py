"""The geometry a plan is bound to, read from a model through its adapter: secateurs.planning.plan stays pure
data (JSON, validation, queries) and never looks at a model."""

from __future__ import annotations

from secateurs.adapters import get_adapter
from secateurs.planning.plan import LayerPlan, PruningPlan


def plan_base(model) -> dict:
    """The geometry a plan is bound to: applying it elsewhere is refused. Shapes are the layers' real widths
    (a layer whose MLP is removed has 0 neurons)."""
    adapter = get_adapter(model)
    config = model.config
    text = config.get_text_config()  # the language model's own config (itself, except in multimodal models)
    layers = adapter.decoder_layers(model)
    shapes = [adapter.layer_shape(layer) for layer in layers]
    return {
        "model_type": config.model_type,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "num_hidden_layers": len(layers),
        "hidden_size": text.hidden_size,
        "head_dim": adapter.head_dim(layers[0]),
        "vocab_size": text.vocab_size,
        "layer_shapes": [[s.num_heads, s.num_kv_heads, s.intermediate_size] for s in shapes],
    }


def identity_plan(model, provenance: dict | None = None) -> PruningPlan:
    """A plan that keeps everything (a starting point for building one); a layer whose MLP is already
    removed (0 neurons) keeps it removed."""
    base = plan_base(model)
    layers = [LayerPlan(index=i, mlp={"mode": "removed"} if shape[2] == 0 else None)
              for i, shape in enumerate(base["layer_shapes"])]
    return PruningPlan(base=base, layers=layers, provenance=dict(provenance or {}))


def layer_removal_plan(model, removed, provenance: dict | None = None) -> PruningPlan:
    """A plan that removes the decoder layers `removed` (indices) and keeps everything else."""
    plan = identity_plan(model, provenance)
    for i in removed:
        plan.layers[i].removed = True
    return plan
