"""Models larger than memory: build them on the meta device and read weights from the safetensors
checkpoint only while they are used, one decoder layer at a time.

* load_skeleton(folder): the model with every decoder layer on meta and the rest (embeddings,
  final norm, LM head) loaded; buffers are real (accelerate's init_empty_weights).
* CheckpointTensors.materialize / release: bring one module's weights in from disk and drop them.
* prune_checkpoint(folder, plan, out): apply a plan shard by shard, writing an output shard for
  every input shard, so peak memory stays near one shard (plus the non-layer weights).
"""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file

from secateurs.adapters import get_adapter
from secateurs.errors import SecateursError
from secateurs.files.output import check_finite, check_output_dir, write_folder
from secateurs.planning.geometry import plan_base
from secateurs.planning.plan import PLAN_FILENAME, PruningPlan
from secateurs.runtime.offload import mark_lazy
from secateurs.storage.hfcompat import load_config, module_names, write_config
from secateurs.storage.pruned import meta_model
from secateurs.surgery.apply import apply_layer_plan, remove_layers, sync_config
from secateurs.surgery.reconstruction import apply_refit

INDEX_FILE = "model.safetensors.index.json"


def return_freed_memory() -> None:
    """Hand memory freed by released layers back to the OS. glibc keeps freed blocks below its
    (adaptive) mmap threshold in the heap, so without this, resident memory creeps up by tens of
    MB per streamed layer; elsewhere a no-op."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CheckpointTensors:
    """Name -> file map of a safetensors checkpoint (single file or sharded), read lazily. Given the
    `model` the checkpoint is for, names are the model's own parameter names: a folder written under
    checkpoint names (a multimodal model's `language_model.model.layers.*`) is read as from_pretrained
    reads it."""

    def __init__(self, folder: str | Path, model: torch.nn.Module | None = None):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise SecateursError(f"{index} is not a safetensors index (JSON with a 'weight_map'): {exc}") from exc
            if not isinstance(weight_map, dict):
                raise SecateursError(f"{index}: 'weight_map' must map tensor names to shard file names")
            self.weight_map = {str(k): shard_file_name(self.folder, v) for k, v in weight_map.items()}
        else:
            self.weight_map = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                self.weight_map.update({k: f.name for k in _tensor_names(f)})
        if not self.weight_map:
            raise SecateursError(f"{self.folder}: no safetensors weights found (model.safetensors or shards with "
                                 f"{INDEX_FILE})")
        self.stored: dict[str, str] = {}  # module name -> the name in the file, where they differ
        if model is not None:
            renamed = module_names(model, {name: name for name in self.weight_map})
            self.stored = {new: old for new, old in renamed.items() if new != old}
            self.weight_map = {new: self.weight_map[old] for new, old in renamed.items()}
        for file in self.files:
            if not (self.folder / file).is_file():
                raise SecateursError(f"{self.folder}: shard {file} named by {INDEX_FILE} is missing")

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.folder / self.weight_map[name]), "pt") as handle:
            return handle.get_tensor(self.stored.get(name, name))

    def get_rows(self, name: str, rows: int) -> torch.Tensor:
        """The first `rows` rows of a tensor, read without loading the rest."""
        with safe_open(str(self.folder / self.weight_map[name]), "pt") as handle:
            return handle.get_slice(self.stored.get(name, name))[:rows]

    def materialize(self, module: torch.nn.Module, prefix: str, device="cpu",
                    skip: re.Pattern | None = None) -> list[str]:
        """Load the module's parameters (those not matching `skip`) from disk; returns their names."""
        names = []
        for name, param in list(module.named_parameters()):
            if (skip is not None and skip.match(prefix + name)) or prefix + name not in self.weight_map:
                continue  # skipped, or tied to a parameter stored under another name
            value = self.get(prefix + name).to(param.dtype)
            set_module_tensor_to_device(module, name, device, value=value)
            names.append(name)
        return names

    def release(self, module: torch.nn.Module, names: list[str] | None = None) -> None:
        """Back to meta: the weights leave memory, their shapes stay."""
        for name in names if names is not None else [n for n, _ in module.named_parameters()]:
            set_module_tensor_to_device(module, name, "meta")
        return_freed_memory()


def shard_file_name(folder: Path, name) -> str:
    """A shard name from a model's index is untrusted: a plain *.safetensors file name that stays
    inside its folder, or the run is refused (a crafted index must not read or write elsewhere)."""
    if (not isinstance(name, str) or not name.endswith(".safetensors") or Path(name).name != name
            or name.startswith(".") or "\\" in name or "\x00" in name):
        raise SecateursError(f"{folder / INDEX_FILE}: shard name {name!r} is not a plain .safetensors file name "
                             "in the model folder; refusing this checkpoint")
    if (folder / name).resolve().parent != folder.resolve():
        raise SecateursError(f"{folder / INDEX_FILE}: shard {name!r} resolves outside the model folder")
    return name


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), "pt") as handle:
            return list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise SecateursError(f"{file} is not a readable safetensors file ({exc}); re-download or re-save it") from exc


def load_skeleton(folder: str | Path, dtype: torch.dtype | None = None, load_outside_layers: bool = True,
                  lazy_layers: bool = False, device: str | torch.device = "cpu"):
    """(model with decoder layers on meta, CheckpointTensors). With load_outside_layers, the
    embeddings, final norm and LM head are loaded too (onto `device`); without, everything stays
    on meta and streamed_statistics loads what it needs when it needs it. With lazy_layers, every
    decoder layer reads its weights from the checkpoint inside `offload.materialized(layer)`, so
    code written for offloaded models (criteria, HARP, depth scoring) runs on the skeleton."""
    folder = Path(folder)
    config = load_config(folder)
    model = meta_model(config, dtype)  # on meta: nothing is read before CheckpointTensors checks the shard names
    tensors = CheckpointTensors(folder, model)
    model.tie_weights()  # also on meta: tied embeddings are one parameter, for counting too
    adapter = get_adapter(model)
    layer_parameter = adapter.layer_parameter()
    if lazy_layers:
        for index, layer in enumerate(adapter.decoder_layers(model)):
            mark_lazy(layer, tensors, adapter.layer_prefix(index), device)
    if load_outside_layers:
        tensors.materialize(model, "", device, skip=layer_parameter)
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and not layer_parameter.match(n)]
        if missing:
            raise SecateursError(f"{folder}: weights missing from the checkpoint: {missing[:5]}")
    return model.eval(), tensors


@torch.no_grad()
def prune_checkpoint(folder: str | Path, plan: PruningPlan, out_dir: str | Path, tokenizer=None,
                     force: bool = False, refits=None) -> Path:
    """Apply `plan` to the checkpoint in `folder` without loading the whole model, writing through
    the one writer (secateurs.files.output): every input shard becomes an output shard of the same name.
    refits: a secateurs.surgery.reconstruction.RefitStore whose re-fitted output projections replace the
    sliced ones, layer by layer."""
    check_output_dir(out_dir, force, [folder])
    model, tensors = load_skeleton(folder)
    adapter = get_adapter(model)
    plan.check_compatible(plan_base(model))
    with write_folder(out_dir, force, [folder], kind="model") as tmp:
        weight_map = _write_pruned_shards(model, adapter, tensors, plan, tmp, refits)
        remove_layers(adapter, model, plan.kept_layer_indices())
        sync_config(model, plan)
        write_config(model, tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if len(tensors.files) > 1:
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
                                                     indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / PLAN_FILENAME)
    return Path(out_dir).expanduser().resolve()


def _write_pruned_shards(model, adapter, tensors: CheckpointTensors, plan: PruningPlan, tmp: Path,
                         refits=None) -> dict[str, str]:
    """Write one pruned output shard per input shard into tmp; returns the new weight map."""
    resolved = {lp.index: (lp, *plan.resolve_layer(lp)) for lp in plan.layers if not lp.removed}
    new_index = {old: new for new, old in enumerate(plan.kept_layer_indices())}
    layers = adapter.decoder_layers(model)
    layer_parameter = adapter.layer_parameter()
    weight_map: dict[str, str] = {}
    pending: dict[int, dict[str, torch.Tensor]] = {}  # pruned tensors of layers that straddle shards
    for file in tensors.files:
        names = [n for n, f in tensors.weight_map.items() if f == file]
        shard: dict[str, torch.Tensor] = {}
        for index in sorted({int(m.group(1)) for n in names if (m := layer_parameter.match(n))}):
            if index not in resolved:
                continue
            if index not in pending:
                layer = layers[index]
                tensors.materialize(layer, adapter.layer_prefix(index))
                apply_layer_plan(adapter, layer, *resolved[index])
                if refits is not None:
                    apply_refit(adapter, layer, refits.load(index))
                pending[index] = {k: v.contiguous() for k, v in layer.state_dict().items()}
                tensors.release(layer)
            for name in list(pending[index]):
                # each tensor goes to the shard it came from (new ones, e.g. fused HARP weights,
                # to the shard being written)
                if tensors.weight_map.get(adapter.layer_prefix(index) + name, file) == file:
                    shard[adapter.layer_prefix(new_index[index]) + name] = pending[index].pop(name)
            if not pending[index]:
                del pending[index]
        for name in names:
            if not layer_parameter.match(name):
                shard[name] = tensors.get(name)
        check_finite(shard, f"output shard {file}")
        save_file(shard, str(tmp / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        del shard
        return_freed_memory()
    return weight_map
