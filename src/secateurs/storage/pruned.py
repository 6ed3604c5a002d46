"""Save and load pruned models.

save_pruned writes safetensors + config + tokenizer + plan into a temporary sibling directory
and renames it into place, so a crash never leaves a half-written output and the source model is
never touched. Uniform models load with stock AutoModelForCausalLM.from_pretrained;
heterogeneous ones (layers of different widths), HARP layers and removed MLPs load with load_pruned
(stock from_pretrained would build the family's full modules there and initialise the missing weights).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from secateurs.adapters import get_adapter
from secateurs.errors import SecateursError
from secateurs.files.output import check_finite, final_path, write_folder
from secateurs.planning.plan import CONFIG_KEY, PLAN_FILENAME, PruningPlan
from secateurs.runtime.progress import phase
from secateurs.storage.hfcompat import load_config, module_names, save_model_files
from secateurs.surgery.apply import remove_mlp, replace_attention, replaced_attention_modes, resize_layer


def save_pruned(model, plan: PruningPlan | None, out_dir: str | os.PathLike, tokenizer=None,
                force: bool = False, extra_files: dict[str, str] | None = None, inputs=()) -> Path:
    """Write the model (safetensors), config, tokenizer and plan to out_dir through the one writer
    (secateurs.files.output): built beside it, swapped in whole; the model's own source and `inputs` are
    never written to; nothing non-finite is saved."""
    sources = [getattr(model.config, "_name_or_path", None), *inputs]
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with phase(f"saving to {final_path(out_dir)}"), write_folder(out_dir, force, sources, kind="model",
                                                                 expected_bytes=size) as tmp:
        check_finite(model.state_dict(), "the pruned model")
        save_model_files(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(tmp / PLAN_FILENAME)
        for name, text in (extra_files or {}).items():
            if Path(name).name != name or name in (".", ".."):
                raise SecateursError(f"extra file name {name!r} must be a plain file name")
            (tmp / name).write_text(text)
    return Path(out_dir).expanduser().resolve()


def needs_skeleton(config) -> bool:
    """Layers of different widths or parameters the config cannot express: stock loading fails."""
    info = getattr(config, CONFIG_KEY, None) or {}
    return bool(info.get("heterogeneous") or info.get("extra_parameters") or info.get("replaced_attention")
                or info.get("replaced_mlp"))


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a folder written by save_pruned (uniform or heterogeneous) as a ready model in eval mode."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise SecateursError(f"{path} is not a saved model folder (no config.json)")
    config = load_config(path)
    check_pruned_config(path, config)
    if not needs_skeleton(config):
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype or "auto")
    else:
        model = _load_skeleton(path, config)
        if dtype is not None:
            model.to(dtype)
    if (path / PLAN_FILENAME).is_file():
        check_plan_matches(PruningPlan.load(path / PLAN_FILENAME), *model_layout(model), where=str(path))
    return model.to(device).eval()


def check_pruned_config(path, config) -> None:
    """The `secateurs` entry of a pruned model's config.json is a user file too: check its values."""
    info = getattr(config, CONFIG_KEY, None)
    if info is None:
        return
    if not isinstance(info, dict):
        raise SecateursError(f"{path}/config.json: the '{CONFIG_KEY}' entry must be an object")
    num_layers = config.get_text_config().num_hidden_layers
    replaced = info.get("replaced_attention", {})
    if not isinstance(replaced, dict) or not all(
            isinstance(k, str) and k.isdigit() and int(k) < num_layers and v in ("value", "removed")
            for k, v in replaced.items()):
        raise SecateursError(f"{path}/config.json: replaced_attention must map layer numbers 0..{num_layers - 1} to "
                             f"'value' or 'removed', got {replaced!r}")
    mlp_gone = info.get("replaced_mlp", {})
    if not isinstance(mlp_gone, dict) or not all(
            isinstance(k, str) and k.isdigit() and int(k) < num_layers and v == "removed" for k, v in mlp_gone.items()):
        raise SecateursError(f"{path}/config.json: replaced_mlp must map layer numbers 0..{num_layers - 1} to "
                             f"'removed', got {mlp_gone!r}")
    shapes = info.get("layer_shapes")
    keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    if shapes is not None and (not isinstance(shapes, list) or not all(
            isinstance(s, dict) and all(isinstance(s.get(k), int) and s[k] >= 1 for k in keys[:2])
            and isinstance(s.get(keys[2]), int) and s[keys[2]] >= (0 if str(i) in mlp_gone else 1)
            for i, s in enumerate(shapes))):
        raise SecateursError(f"{path}/config.json: layer_shapes must list {keys} (positive whole numbers; 0 neurons "
                             "where replaced_mlp lists the layer) per layer")
    extra = info.get("extra_parameters", [])
    if not isinstance(extra, list) or not all(isinstance(n, str) for n in extra):
        raise SecateursError(f"{path}/config.json: extra_parameters must be a list of parameter names")


def model_layout(model) -> tuple[list[tuple[int, int, int]], dict[int, str]]:
    """(per-layer (heads, kv heads, neurons), {layer: HARP mode}) read from the real weights (a removed MLP:
    0 neurons)."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    shapes = [(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in map(adapter.layer_shape, layers)]
    return shapes, replaced_attention_modes(adapter, layers)


def config_layout(config) -> tuple[list[tuple[int, int, int]], dict[int, str]]:
    """model_layout as a saved config.json declares it (for `plan show` without loading weights)."""
    info = getattr(config, CONFIG_KEY, None) or {}
    if info.get("layer_shapes"):
        shapes = [(s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"])
                  for s in info["layer_shapes"]]
    else:
        text = config.get_text_config()  # the language model's config (text_config in a multimodal model)
        kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        shapes = [(text.num_attention_heads, kv, text.intermediate_size)] * text.num_hidden_layers
    gone = {int(k) for k in info.get("replaced_mlp", {})}
    shapes = [(h, kv, 0 if i in gone else n) for i, (h, kv, n) in enumerate(shapes)]
    return shapes, {int(k): v for k, v in info.get("replaced_attention", {}).items()}


def check_plan_matches(plan: PruningPlan, shapes, replaced: dict[int, str], where: str) -> None:
    """Refuse a pruning_plan.json that disagrees with the model beside it (shapes, HARP layers; a removed MLP
    is a layer of 0 neurons on both sides)."""
    kept = [lp for lp in plan.layers if not lp.removed]
    expected = [tuple(s) for s in plan.pruned_shapes()]
    harp = {i: lp.attention["mode"] for i, lp in enumerate(kept) if lp.attention}
    if expected != [tuple(s) for s in shapes] or harp != replaced:
        diff = next((i for i, (a, b) in enumerate(zip(expected, shapes)) if tuple(a) != tuple(b)), None)
        detail = (f"{len(expected)} kept layers in the plan vs {len(shapes)} in the model"
                  if len(expected) != len(shapes)
                  else f"layer {diff}: plan {expected[diff]} vs weights {tuple(shapes[diff])}" if diff is not None
                  else f"HARP layers: plan {harp} vs model {replaced}")
        raise SecateursError(f"{where}: {PLAN_FILENAME} does not describe the model beside it ({detail}); the folder "
                             "was edited or mixed up: re-create it with `secateurs prune`")


def read_plan(path: str | os.PathLike) -> PruningPlan:
    """A plan file, or the plan of a pruned model folder checked against that folder's config (a
    plan that does not describe the weights beside it is refused)."""
    plan = PruningPlan.load(path)
    folder = Path(path)
    if folder.is_dir() and (folder / "config.json").is_file():
        config = load_config(folder)
        check_pruned_config(folder, config)
        check_plan_matches(plan, *config_layout(config), where=str(folder))
    return plan


def _load_skeleton(path: Path, config):
    """Meta-device skeleton -> remove the MLPs the config lists, resize every layer to its saved widths,
    replace the HARP layers' attention, add the extra parameters (compensation biases) -> assign weights
    from disk.

    accelerate's init_empty_weights puts parameters on meta but keeps buffers real, so
    non-persistent buffers (rotary inv_freq, Gemma's embed_scale) are computed from the config.
    """
    model = meta_model(config)
    adapter = get_adapter(model)
    info = getattr(config, CONFIG_KEY)
    layers = adapter.decoder_layers(model)
    for index in info.get("replaced_mlp", {}):
        remove_mlp(adapter, layers[int(index)])
    shapes = info.get("layer_shapes")
    if shapes is not None:
        if len(shapes) != len(layers):
            raise SecateursError(f"{path}: config lists {len(shapes)} layer shapes for {len(layers)} layers")
        for layer, s in zip(layers, shapes):
            resize_layer(adapter, layer, s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"])
    for index, mode in info.get("replaced_attention", {}).items():
        replace_attention(adapter, layers[int(index)], mode)
    for name in info.get("extra_parameters", []):
        module_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if attr != "bias" or not isinstance(module, torch.nn.Linear):
            raise SecateursError(f"{path}: cannot rebuild extra parameter {name}")
        module.bias = torch.nn.Parameter(torch.empty(module.out_features, dtype=module.weight.dtype, device="meta"))
    state: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SecateursError(f"{path}: no .safetensors weights found")
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as exc:  # noqa: BLE001 - safetensors' own errors for truncated or garbled files
            raise SecateursError(f"{f} is not a readable safetensors file ({exc}); re-save the model") from exc
    result = model.load_state_dict(module_names(model, state), strict=False, assign=True)
    if result.unexpected_keys:
        raise SecateursError(f"{path}: unexpected weights {result.unexpected_keys[:5]}")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise SecateursError(f"{path}: weights missing from the folder: {missing[:5]}")
    return model



def meta_model(config, dtype: torch.dtype | None = None):
    """The model a config describes with its parameters on the meta device (the config's dtype unless
    given): the skeleton both a pruned folder's loader and the streamed checkpoint reader fill."""
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype or config_dtype(config))


def config_dtype(config) -> torch.dtype:
    """The dtype a config records (a string on disk), float32 when it records none."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
