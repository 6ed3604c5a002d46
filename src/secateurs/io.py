"""Save and load pruned models.

save_pruned writes safetensors + config + tokenizer + plan into a temporary sibling directory
and renames it into place, so a crash never leaves a half-written output and the source model is
never touched. Uniform models load with stock AutoModelForCausalLM.from_pretrained;
heterogeneous ones (layers of different widths) load with load_pruned.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from secateurs.adapters import get_adapter
from secateurs.errors import OutputExistsError, SecateursError
from secateurs.hfcompat import load_config, save_model_files
from secateurs.plan import CONFIG_KEY, PLAN_FILENAME, PruningPlan
from secateurs.surgery import replace_attention, resize_layer


def check_output_dir(out_dir: str | os.PathLike, force: bool = False, source: str | None = None) -> Path:
    """Fail before any work if the output exists (without force) or is the source model."""
    out = Path(out_dir).expanduser().resolve()
    if source and Path(source).expanduser().exists() and out == Path(source).expanduser().resolve():
        raise OutputExistsError(f"output {out} is the input model's folder; choose another --out")
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory")
    return out


def save_pruned(model, plan: PruningPlan | None, out_dir: str | os.PathLike, tokenizer=None,
                force: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write the model (safetensors), config, tokenizer and plan to out_dir atomically."""
    out = check_output_dir(out_dir, force, getattr(model.config, "_name_or_path", None))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output should not be
        save_model_files(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(tmp / PLAN_FILENAME)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def needs_skeleton(config) -> bool:
    """Layers of different widths or parameters the config cannot express: stock loading fails."""
    info = getattr(config, CONFIG_KEY, None) or {}
    return bool(info.get("heterogeneous") or info.get("extra_parameters") or info.get("replaced_attention"))


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a folder written by save_pruned (uniform or heterogeneous) as a ready model in eval mode."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise SecateursError(f"{path} is not a saved model folder (no config.json)")
    config = load_config(path)
    if not needs_skeleton(config):
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype or "auto")
    else:
        model = _load_skeleton(path, config)
        if dtype is not None:
            model.to(dtype)
    return model.to(device).eval()


def _load_skeleton(path: Path, config):
    """Meta-device skeleton -> resize every layer to its saved widths, add the extra parameters
    (compensation biases) -> assign weights from disk.

    accelerate's init_empty_weights puts parameters on meta but keeps buffers real, so
    non-persistent buffers (rotary inv_freq, Gemma's embed_scale) are computed from the config.
    """
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=config_dtype(config))
    adapter = get_adapter(model)
    info = getattr(config, CONFIG_KEY)
    layers = adapter.decoder_layers(model)
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
        module = model.get_submodule(module_name)
        if attr != "bias" or not isinstance(module, torch.nn.Linear):
            raise SecateursError(f"{path}: cannot rebuild extra parameter {name}")
        module.bias = torch.nn.Parameter(torch.empty(module.out_features, dtype=module.weight.dtype, device="meta"))
    state: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SecateursError(f"{path}: no .safetensors weights found")
    for f in files:
        state.update(load_file(f))
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise SecateursError(f"{path}: unexpected weights {result.unexpected_keys[:5]}")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise SecateursError(f"{path}: weights missing from the folder: {missing[:5]}")
    return model



def config_dtype(config) -> torch.dtype:
    """The dtype a config records (a string on disk), float32 when it records none."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
