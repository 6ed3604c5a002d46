"""Layer-streamed calibration: memory bounded by one decoder layer plus the calibration activations.

1. capture: every decoder layer is swapped for a recorder that passes hidden states through, and
   the decoder runs over the calibration batches. That yields the inputs of layer 0 and the exact
   keyword arguments every layer receives (position embeddings, the mask of its own attention
   type, cache position), at the cost of the embeddings alone.
2. stream: for each layer in turn, its weights come onto the compute device (from the model, or
   from the checkpoint on disk for a model built on the meta device), every batch runs through it
   with the statistics hooks, its outputs become the next layer's inputs, and the weights leave.

mode="dense" gives the statistics of the unpruned model (what AMP uses): identical to
collect_statistics. mode="sequential" lets a callback prune each layer before its outputs are
computed, so every layer is measured on inputs from the already-pruned layers below (as FLAP and
Wanda do). With cache_dir, each layer's statistics and the activations leaving it are written as
soon as they are known; an interrupted run resumes after the last finished layer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from secateurs.adapters import get_adapter
from secateurs.calibration.runner import run_layer
from secateurs.calibration.statistics import InputStats, Statistics, attach_layer_hooks, check_finite
from secateurs.errors import SecateursError
from secateurs.files.output import write_file, writing_file
from secateurs.runtime.identity import model_identity
from secateurs.runtime.offload import has_offloaded_weights, input_device, materialized
from secateurs.runtime.progress import bar

MODES = ("dense", "sequential")


class _Recorder(nn.Module):
    def __init__(self, index: int, calls: list[list]):
        super().__init__()
        self.index, self.calls = index, calls

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("decoder layers are expected to receive keyword arguments after hidden_states")
        self.calls[self.index].append((hidden_states if self.index == 0 else None, kwargs))
        return hidden_states


@torch.inference_mode()
def capture_layer_calls(model, calibration) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """(inputs of layer 0 per batch, [per layer: [kwargs per batch]]), running no decoder layer."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    originals = list(layers)
    calls: list[list] = [[] for _ in originals]
    device = input_device(adapter.decoder(model))
    for i in range(len(layers)):
        layers[i] = _Recorder(i, calls)
    try:
        for batch in calibration.batches:
            adapter.decoder(model)(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return [h for h, _ in calls[0]], [[kw for _, kw in per_layer] for per_layer in calls]


@torch.inference_mode()
def dense_layer_inputs(model, calibration, first: int, storage: str | torch.device = "cpu",
                       progress: bool = False) -> tuple[dict[int, list[torch.Tensor]], list[list[dict]]]:
    """({layer: [input per batch]} for layers first..L-1 of the dense model, [per layer: [kwargs
    per batch]]), computed one layer at a time over all batches (padding zeroed after each layer)."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    device = input_device(model)
    hidden, kwargs = capture_layer_calls(model, calibration)
    hidden = [h.to(storage) for h in hidden]
    masks = [b["attention_mask"] for b in calibration.batches]
    kept = {}
    for index in bar(range(len(layers)), desc="layer inputs", disable=not progress):
        if index >= first:
            kept[index] = hidden
        if index + 1 < len(layers):
            with materialized(layers[index]):
                hidden = [_run(layers[index], h, kwargs[index][b], masks[b], device, storage)
                          for b, h in enumerate(hidden)]
    return kept, kwargs


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _cache_paths(cache_dir: Path, index: int) -> tuple[Path, Path]:
    return cache_dir / f"layer_{index:04d}.stats.safetensors", cache_dir / "activations.safetensors"


def _resume(cache_dir: Path, calibration_hash: str, identity: str, num_layers: int):
    """(next layer, its input activations, finished statistics) from a cache, or a fresh start.
    A cache of another model or other calibration data is refused, never reused or overwritten."""
    meta = cache_dir / "progress.json"
    if not meta.exists():
        if any(cache_dir.iterdir()):
            raise SecateursError(f"scores cache {cache_dir} holds files but no progress.json: not a secateurs cache; "
                                 "give an empty or new folder")
        return 0, None, []
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        done = min(int(info["layers_done"]), num_layers)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise SecateursError(f"{meta} is damaged ({exc}); delete the scores cache folder to start over") from exc
    if info.get("model") != identity:
        raise SecateursError(f"scores cache {cache_dir} was made on another model ({info.get('model') or 'unrecorded'} "
                             f"vs {identity}); delete it or give another --scores-cache folder")
    if info.get("calibration_hash") != calibration_hash:
        raise SecateursError(f"scores cache {cache_dir} was made with other calibration data (hash "
                             f"{info.get('calibration_hash')} vs {calibration_hash}); delete it, give another folder, "
                             "or ask for the calibration it was made with")
    stats = [Statistics.load(_cache_paths(cache_dir, i)[0]) for i in range(done)]
    acts = load_file(_cache_paths(cache_dir, 0)[1])
    return done, [acts[f"batch.{b}"] for b in range(len(acts))], stats


def _checkpoint_progress(cache_dir: Path, index: int, a: InputStats, m: InputStats, hidden: list[torch.Tensor],
                         calibration_hash: str, identity: str) -> None:
    stats_path, acts_path = _cache_paths(cache_dir, index)
    Statistics([a], [m]).save(stats_path)
    with writing_file(acts_path) as tmp:
        save_file({f"batch.{b}": h.contiguous() for b, h in enumerate(hidden)}, str(tmp))
    write_file(cache_dir / "progress.json", json.dumps({"layers_done": index + 1, "calibration_hash": calibration_hash,
                                                        "model": identity}))


@torch.inference_mode()
def streamed_statistics(model, calibration, *, device: str | torch.device | None = None, checkpoint=None,
                        mode: str = "dense", on_layer: Callable | None = None, cache_dir: str | Path | None = None,
                        storage: str | torch.device = "cpu", progress: bool = True, gram: bool = False,
                        scores: bool = True) -> Statistics:
    """Statistics like collect_statistics, one layer in memory at a time (see the module docstring).

    device: where each layer computes (default: where the model is). checkpoint: a
    secateurs.storage.checkpoint.CheckpointTensors to fetch layer weights from disk (model on meta).
    on_layer(index, layer, attention_stats, mlp_stats): called after a layer's statistics are
    known; in sequential mode it may prune the layer, whose outputs are then recomputed.
    storage: where activations wait between layers. gram: also accumulate the Gram matrices
    (secateurs.surgery.reconstruction); a layer's matrices can be dropped by on_layer once used.
    scores=False: no importance scores (the re-fit pass needs only the Gram matrices and channel sums).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    device = torch.device(device) if device is not None else input_device(model)
    inputs, kwargs = _capture_from(model, calibration, adapter, device, checkpoint)
    cache = Path(cache_dir) if cache_dir is not None else None
    start, finished = 0, []
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        identity = model_identity(model, checkpoint)
        start, resumed, finished = _resume(cache, calibration.hash, identity, len(layers))
        if resumed is not None:
            inputs = resumed
    hidden = [h.to(storage) for h in inputs]
    attention = [s.attention[0] for s in finished]
    mlp = [s.mlp[0] for s in finished]
    masks = [b["attention_mask"] for b in calibration.batches]
    for index in bar(range(start, len(layers)), desc="streamed statistics", disable=not progress):
        layer = layers[index]
        with _weights_on(layer, device, checkpoint, adapter.layer_prefix(index)):
            a, m, hidden = _layer_statistics(adapter, layer, index, hidden, kwargs[index], masks, device, storage,
                                             gram=gram, scores=scores, on_layer=on_layer, mode=mode)
        attention.append(a)
        mlp.append(m)
        if cache is not None:
            _checkpoint_progress(cache, index, a, m, hidden, calibration.hash, identity)
    description = {"calibration": calibration.description, "calibration_hash": calibration.hash,
                   "driver": f"streamed ({mode})"}
    return Statistics(attention, mlp, description)


def _capture_from(model, calibration, adapter, device, checkpoint) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """capture_layer_calls on a model that may be a skeleton on the meta device: the embeddings (and
    norm) are read from `checkpoint` for the capture only, then they leave again."""
    decoder = adapter.decoder(model)
    loaded = []
    if checkpoint is not None:
        loaded = checkpoint.materialize(decoder, adapter.decoder_prefix(), device, skip=adapter.layer_parameter())
    try:
        return capture_layer_calls(model, calibration)
    finally:
        if loaded:
            checkpoint.release(decoder, loaded)
            model.tie_weights()  # releasing gave the embeddings a new (meta) parameter


def _layer_statistics(adapter, layer, index: int, hidden: list[torch.Tensor], kwargs: list[dict],
                      masks: list[torch.Tensor], device, storage, *, gram: bool, scores: bool,
                      on_layer: Callable | None, mode: str) -> tuple[InputStats, InputStats, list[torch.Tensor]]:
    """(attention stats, MLP stats, outputs) of one layer whose weights are on the device: every batch
    runs through it under the statistics hooks, then on_layer sees the statistics; in sequential mode
    the outputs are recomputed, as on_layer may have pruned the layer."""
    state: dict = {}
    a, m, handles = attach_layer_hooks(adapter, layer, state, gram=gram, scores=scores)
    outputs = []
    try:
        for b, h in enumerate(hidden):
            state["mask"] = masks[b]
            outputs.append(_run(layer, h, kwargs[b], masks[b], device, storage))
    finally:
        for handle in handles:
            handle.remove()
    check_finite(index, a, m)
    if on_layer is not None:
        on_layer(index, layer, a, m)
    if mode == "sequential":
        outputs = [_run(layer, h, kwargs[b], masks[b], device, storage) for b, h in enumerate(hidden)]
    return a, m, outputs


@contextlib.contextmanager
def _weights_on(layer, device, checkpoint, prefix: str):
    """The layer's weights on the compute device for the block: read from `checkpoint`, brought in
    by `materialized` (offloaded or lazy), or moved there and back."""
    if checkpoint is not None:
        checkpoint.materialize(layer, prefix, device)
        try:
            yield
        finally:
            checkpoint.release(layer)
    elif has_offloaded_weights(layer):
        with materialized(layer):
            yield
    else:
        home = input_device(layer)
        layer.to(device)
        try:
            yield
        finally:
            layer.to(home)


def _run(layer, hidden, kwargs, mask, device, storage):
    return run_layer(layer, hidden.to(device), {k: _to(v, device) for k, v in kwargs.items()}, mask).to(storage)
