"""Perplexity over non-overlapping windows of a text, under the two protocols pruning papers use.

* ``seq128``: windows of 128 tokens (LLM-Pruner, FLAP and most width-pruning tables).
* ``seq2048`` / ``seq4096`` / ``context``: long windows (Wanda, SparseGPT, SliceGPT use 2048 or
  the model's context); ``context`` takes ``max_position_embeddings``.

The text is tokenised once (one BOS at the start if the tokenizer adds one), cut into windows of
exactly ``seq_len`` tokens, the ragged tail dropped; every token after the first of each window is
scored, so ``tokens == windows * (seq_len - 1)``. Families trained always to see their BOS first
(Gemma: the adapter's ``bos_every_window``) get it at the start of every window, followed by
``seq_len - 1`` text tokens, all of them scored (the same count). Loss is computed from the logits in float32 in
small row chunks (logsumexp minus the target logit), so the extra work over a plain forward pass is
one read of the logits, and memory is bounded by ``max_batch_tokens``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from secateurs.adapters import get_adapter
from secateurs.calibration.runner import summed_next_token_nll
from secateurs.errors import SecateursError, UnsupportedModelError
from secateurs.evaluation.settings import DEFAULT_MAX_BATCH_TOKENS
from secateurs.files.jsonl import file_sha256, iter_jsonl, read_text_file
from secateurs.runtime.offload import input_device
from secateurs.runtime.progress import bar

PROTOCOLS: dict[str, int | None] = {"seq128": 128, "seq2048": 2048, "seq4096": 4096, "context": None}
PROTOCOL_NOTES = {
    "seq128": "windows of 128 tokens (LLM-Pruner, FLAP)",
    "seq2048": "windows of 2048 tokens (Wanda, SparseGPT, SliceGPT)",
    "seq4096": "windows of 4096 tokens (Llama-2 context)",
    "context": "windows of the model's full context (max_position_embeddings)",
}


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: str | Path, max_chars: int | None = None) -> str:
    """A text file with line endings normalised (WikiText's raw files ship with CRLF)."""
    text = normalise_newlines(read_text_file(path))
    return text[:max_chars] if max_chars else text


def read_jsonl_text(path: str | Path, field: str = "text", max_docs: int | None = None, sep: str = " ") -> str:
    """C4-validation-style jsonl: the `field` of the first `max_docs` records joined by `sep`
    (SparseGPT/Wanda join the first 1100 C4 validation documents with a space)."""
    docs = []
    for n, record in iter_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise SecateursError(f"{path}:{n} has no string field {field!r}; pass the right --text-field")
        docs.append(normalise_newlines(record[field]))
        if max_docs is not None and len(docs) >= max_docs:
            break
    if not docs:
        raise SecateursError(f"{path} holds no documents")
    return sep.join(docs)


def load_text(source: str | Path, *, field: str = "text", max_docs: int | None = None,
              max_chars: int | None = None) -> tuple[str, dict]:
    """(text, description) for a .jsonl file (C4 style) or any text file (WikiText-2 raw, ...).

    The description names the file, its sha256 and how it was read, for result files."""
    path = Path(source).expanduser()
    if not path.exists():
        raise SecateursError(f"perplexity source not found: {source} (give a text file or a .jsonl with a "
                             f"{field!r} field)")
    if path.is_dir():
        raise SecateursError(f"perplexity source {path} is a folder; give a file")
    if path.suffix in (".jsonl", ".json"):
        text = read_jsonl_text(path, field, max_docs)
        how = f"jsonl field {field!r}, {'all' if max_docs is None else f'first {max_docs}'} documents joined by ' '"
    else:
        text = read_text(path)
        how = "text, line endings normalised to \\n"
    if max_chars:
        text = text[:max_chars]
        how += f", first {max_chars} characters"
    digest = file_sha256(path)
    return text, {"path": str(path), "name": path.name, "sha256": digest, "read_as": how, "chars": len(text)}


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def resolve_seq_len(model, protocol: str | int) -> tuple[str, int]:
    """(protocol name, window length) for a protocol name or an explicit length; refuses windows
    longer than the model's context."""
    limit = context_length(model)
    if isinstance(protocol, int) or (isinstance(protocol, str) and protocol.isdigit()):
        seq_len = int(protocol)
        name = f"seq{seq_len}"
    elif protocol in PROTOCOLS:
        name, seq_len = protocol, PROTOCOLS[protocol]
        if seq_len is None:
            if limit is None:
                raise SecateursError("protocol 'context' needs config.max_position_embeddings; give --seq-len")
            seq_len = limit
    else:
        raise SecateursError(f"unknown perplexity protocol {protocol!r}; use one of {', '.join(PROTOCOLS)} "
                             "or a window length in tokens")
    if seq_len < 2:
        raise SecateursError(f"window length must be at least 2 tokens, got {seq_len}")
    if limit is not None and seq_len > limit:
        raise SecateursError(f"seq_len {seq_len} exceeds the model's context of {limit} tokens; choose <= {limit} "
                             f"(protocol 'context' uses the full context)")
    return name, seq_len


def window_start_token(model, tokenizer) -> int | None:
    """The token every window starts with, for families that need their BOS (the adapter says which;
    a family secateurs does not prune is measured as it is)."""
    try:
        adapter = get_adapter(model)
    except UnsupportedModelError:
        return None
    return getattr(tokenizer, "bos_token_id", None) if adapter.bos_every_window else None


def windows_of(ids: torch.Tensor, seq_len: int, start: int | None, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows of seq_len tokens; with `start`, each is that token and seq_len - 1 text
    tokens (a leading `start` of the text is dropped: it begins the first window anyway)."""
    if start is not None and ids.numel() and int(ids[0]) == start:
        ids = ids[1:]
    step = seq_len - 1 if start is not None else seq_len
    windows = ids.numel() // step
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise SecateursError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    chunks = ids[: windows * step].reshape(windows, step)
    if start is None:
        return chunks
    return torch.cat([torch.full((windows, 1), start, dtype=chunks.dtype), chunks], dim=1)


def window_nll(model, batch: torch.Tensor) -> float:
    """Summed next-token NLL of a batch of windows, in float32 at least, without materialising a second
    copy of the logits (logsumexp - target logit, row chunk by row chunk)."""
    logits = model(batch, use_cache=False).logits
    # window by window: logits[:, :-1] of the whole batch would be copied to be flattened
    return sum(summed_next_token_nll(logits[b, :-1], batch[b, 1:])[0] for b in range(logits.shape[0]))


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, seq_len: int = 128, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = True, *,
               max_tokens: int | None = None, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
               ids: torch.Tensor | None = None) -> dict:
    """exp(mean next-token NLL) over non-overlapping windows of `seq_len` tokens.

    batch_size is capped so that one batch holds at most `max_batch_tokens` tokens (bounded
    memory at long windows). max_tokens / max_windows cut the text for quick runs; `ids` skips
    tokenisation when the caller already has the token ids.
    """
    _, seq_len = resolve_seq_len(model, int(seq_len))
    if batch_size < 1:
        raise SecateursError(f"batch_size must be >= 1, got {batch_size}")
    if ids is None:
        ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    total_tokens = ids.numel()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    first = window_start_token(model, tokenizer)
    chunks = windows_of(ids, seq_len, first, max_windows)
    windows = chunks.shape[0]
    batch_size = max(1, min(batch_size, max_batch_tokens // seq_len))
    device = input_device(model)
    nll = 0.0
    start_time = time.perf_counter()
    for start in bar(range(0, windows, batch_size), desc=f"perplexity (seq {seq_len})", disable=not progress):
        nll += window_nll(model, chunks[start:start + batch_size].to(device))
    seconds = time.perf_counter() - start_time
    count = windows * (seq_len - 1)
    result = {"perplexity": math.exp(nll / count), "nll": nll / count, "windows": windows,
              "tokens": count, "seq_len": seq_len, "batch_size": batch_size, "text_tokens": total_tokens,
              "seconds": round(seconds, 3), "tokens_per_second": round(windows * seq_len / seconds, 1)}
    return result if first is None else {**result, "window_start_token": first}


def evaluate_perplexity(model, tokenizer, text: str, protocols: list[str | int] = ("seq128",), *,
                        batch_size: int = 8, max_windows: int | None = None, max_tokens: int | None = None,
                        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, progress: bool = True) -> list[dict]:
    """Perplexity under several protocols, tokenising the text once; each result names its protocol.
    All protocols are resolved first, so a window the model cannot take fails before any work."""
    resolved = [resolve_seq_len(model, p) for p in protocols]
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    out = []
    for name, seq_len in resolved:
        r = perplexity(model, tokenizer, text, seq_len, batch_size, max_windows, progress, max_tokens=max_tokens,
                       max_batch_tokens=max_batch_tokens, ids=ids)
        out.append({"protocol": name, "protocol_note": PROTOCOL_NOTES.get(name, f"windows of {seq_len} tokens"), **r})
    return out
