"""LoRA on a pruned model through peft: the targets come from the adapters, the result is merged.

The targets are every nn.Linear inside each decoder layer's attention and MLP as the family
adapter locates them: q/k/v/o and gate/up/down on Llama-like models (the AMP paper's seven
projections), phi's dense/fc1/fc2, phi3's fused qkv_proj/gate_up_proj, HARP's fused value-output
matrix; a removed attention block has none. Shapes are read from the modules, so pruned heads,
per-layer widths and FLAP's compensation biases (kept frozen) need nothing special.
"""

from __future__ import annotations

import warnings

from torch import nn

from secateurs.adapters import get_adapter
from secateurs.errors import SecateursError

PEFT_HINT = "LoRA recovery needs peft: pip install peft==0.21.2 (or pip install 'secateurs[recover]')"


def lora_target_names(model) -> list[str]:
    """Full module names of the Linears LoRA adapts, in model order."""
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    targets = []
    for layer in adapter.decoder_layers(model):
        for block in (adapter.attention(layer), adapter.mlp(layer)):
            targets += [names[id(m)] for m in block.modules() if isinstance(m, nn.Linear)]
    if not targets:
        raise SecateursError("the model has no Linear layers in its attention or MLP blocks for LoRA to adapt")
    return targets


def attach_lora(model, r: int, alpha: float, dropout: float):
    """Wrap `model` in a peft LoRA model (its modules are replaced in place; base weights frozen)."""
    try:
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415 (optional: the recover extra)
    except ImportError as exc:
        raise SecateursError(PEFT_HINT) from exc
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise SecateursError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1 (got r={r}, alpha={alpha}, "
                             f"dropout={dropout})")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=lora_target_names(model))
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing: not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def merge_lora(peft_model) -> nn.Module:
    """Fold the adapters into the base weights and return the plain model (no peft needed to load it)."""
    model = peft_model.merge_and_unload(progressbar=False, safe_merge=True)
    leftovers = [n for n, _ in model.named_parameters() if "lora_" in n]
    if leftovers:
        raise SecateursError(f"LoRA merge left adapter weights behind: {leftovers[:3]}")
    return model
