"""Perplexity over non-overlapping windows of a text (the Wanda/SliceGPT protocol at long
windows, LLM-Pruner/FLAP at seq 128): tokenise once, cut into windows of seq_len, drop the
ragged tail, score every token after the first of each window."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from secateurs.errors import SecateursError


def read_text(path: str | Path, max_chars: int | None = None) -> str:
    path = Path(path)
    if not path.exists():
        raise SecateursError(f"text file not found: {path}")
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return text[:max_chars] if max_chars else text


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, seq_len: int = 128, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = True) -> dict:
    """exp(mean next-token NLL) over windows; returns the number of windows and scored tokens."""
    limit = context_length(model)
    if limit is not None and seq_len > limit:
        raise SecateursError(f"seq_len {seq_len} exceeds the model's context of {limit} tokens; choose <= {limit}")
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    windows = ids.numel() // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise SecateursError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    chunks = ids[: windows * seq_len].reshape(windows, seq_len)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in tqdm(range(0, windows, batch_size), desc=f"perplexity (seq {seq_len})", disable=not progress):
        batch = chunks[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "windows": windows,
            "tokens": count, "seq_len": seq_len}
