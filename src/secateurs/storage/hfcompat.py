"""Work-arounds for transformers behaviour that blocks pruned shapes, kept in one place.

transformers 5.x validates LlamaConfig and Gemma2Config with `hidden_size % num_attention_heads
== 0` even when head_dim is explicit (huggingface/transformers#46082, still in 5.23), although the
modeling code only needs num_attention_heads * head_dim. Pruned head counts (22 of 32 heads on
Llama-2-7B) break that rule, so:

* save: a Llama model without biases is written as the mathematically identical Mistral
  architecture (same weights, same names, sliding_window None), which every stock loader
  accepts; any other family is written with its real head counts and marked
  `secateurs.stock_loadable = false`, and `load_pruned` is the way to load it.
* load: `load_config` reads such a config without the over-strict check.

save_pretrained writes some models' weights under their checkpoint names rather than their module
names (multimodal models: `language_model.model.layers.*` for `model.language_model.layers.*`);
`module_names` maps a saved state dict back, as from_pretrained does, for loaders that assign weights
themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from secateurs.adapters import get_adapter
from secateurs.adapters.value_attention import is_replaced
from secateurs.planning.plan import CONFIG_KEY

_HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads")


def config_is_valid(config) -> bool:
    """The config and, in a multimodal model, its language model's config pass transformers' validation."""
    try:
        for part in {id(c): c for c in (config, config.get_text_config())}.values():
            if hasattr(part, "validate"):
                part.validate()
        return True
    except (StrictDataclassClassValidationError, ValueError, TypeError):
        return False


def extra_parameter_names(model) -> list[str]:
    """Parameters the family's config cannot express (e.g. o_proj / down_proj biases added by
    FLAP's compensation on Llama): present in the model, absent from a skeleton built from its config."""
    with init_empty_weights():
        reference = AutoModelForCausalLM.from_config(model.config)
    replaced = tuple(name + "." for name, module in model.named_modules() if is_replaced(module))
    return sorted(n for n in set(model.state_dict()) - set(reference.state_dict()) if not n.startswith(replaced))


def save_model_files(model, directory: Path) -> dict:
    """model.save_pretrained(directory) (weights, generation config), then config.json as write_config
    makes it. save_pretrained validates the config, so over-strict head counts get a stand-in
    while it runs."""
    config = model.config
    text = config.get_text_config()  # where the head counts live (text_config in a multimodal model)
    real = {k: getattr(text, k) for k in _HEAD_FIELDS}
    try:
        if not config_is_valid(config):  # heads=1 divides any hidden size
            for k in _HEAD_FIELDS:
                setattr(text, k, 1)
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        for k, v in real.items():
            setattr(text, k, v)
    return write_config(model, directory)


def write_config(model, directory: Path) -> dict:
    """Write config.json: a config stock loaders accept where one exists (Llama with uneven heads
    -> Mistral), and a `secateurs` entry saying whether stock from_pretrained can load the folder
    (not when layers differ in width, hold extra parameters or replaced attention) and why."""
    config = model.config
    config.architectures = [type(model).__name__]
    valid = config_is_valid(config)
    on_disk = json.loads(config.to_json_string(use_diff=True))
    note = {}
    if not valid:
        stock = get_adapter(model).stock_equivalent_config(on_disk)
        note["export_reason"] = "transformers#46082 rejects hidden_size % num_attention_heads != 0"
        if stock is not None:
            on_disk = stock
            note["exported_from"] = config.model_type
    extra = extra_parameter_names(model)
    if extra:
        note["extra_parameters"] = extra
    info = on_disk.setdefault(CONFIG_KEY, {})
    note["stock_loadable"] = ((valid or "exported_from" in note) and not extra
                              and not info.get("heterogeneous") and not info.get("replaced_attention")
                              and not info.get("replaced_mlp"))
    info.update(note)
    (directory / "config.json").write_text(json.dumps(on_disk, indent=2, sort_keys=True) + "\n")
    return note


def load_config(path: str | Path):
    """AutoConfig.from_pretrained, tolerating the divisibility check on pruned head counts."""
    try:
        return AutoConfig.from_pretrained(path)
    except (StrictDataclassClassValidationError, ValueError, TypeError) as exc:
        data = json.loads((Path(path) / "config.json").read_text())
        if CONFIG_KEY not in data:
            raise
        fields = data.get("text_config") or data  # a multimodal config holds them in its text_config
        real = {k: fields[k] for k in _HEAD_FIELDS}
        fields.update({k: 1 for k in _HEAD_FIELDS})
        try:
            config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
        except Exception:
            raise exc
        for k, v in real.items():
            setattr(config.get_text_config(), k, v)
        return config


def module_names(model, state: dict) -> dict:
    """A state dict read from a saved folder, keyed by `model`'s own parameter names (transformers'
    renamings of its checkpoint names undone, as from_pretrained applies them)."""
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return state
    return {rename_source_key(name, renamings, [])[0]: tensor for name, tensor in state.items()}
