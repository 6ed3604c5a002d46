"""Calibration data: a source -> padded token batches with attention masks, a description and a hash.

Sources (the `spec` string):
  PATH.txt / any text file   random windows of max_length tokens from the tokenised file
  PATH.jsonl                 one sample per record: its "text" field, or an Alpaca record
                             (instruction / input / output) rendered with the AMP paper's template
                             "Instruction: ...\\nInput: ...\\nResponse:"
  hf:NAME[:CONFIG]:SPLIT     a Hugging Face dataset (needs `datasets` and the hub or its cache)
  self                       text sampled from the model itself (seeded): works offline for any
                             model with nothing downloaded, and follows the model's own
                             distribution instead of an arbitrary corpus (data-free calibration, as
                             in LLM-QAT); the default
  tinystories                the TinyStories sample bundled with secateurs (small; for toy models)
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from secateurs.calibration import cache as calibration_cache
from secateurs.errors import SecateursError
from secateurs.files.jsonl import iter_jsonl, read_text_file
from secateurs.runtime import threads
from secateurs.runtime.identity import model_identity
from secateurs.runtime.offload import input_device
from secateurs.runtime.progress import bar, phase, status

log = logging.getLogger("secateurs")

ALPACA_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nResponse:"
DEFAULT_SOURCE = "self"
DEFAULT_SAMPLES, DEFAULT_LENGTH = 32, 128  # 4,096 tokens: enough for stable activation statistics


@dataclass
class Calibration:
    batches: list[dict[str, torch.Tensor]]
    description: dict = field(default_factory=dict)
    hash: str = ""

    @property
    def num_samples(self) -> int:
        return sum(b["input_ids"].shape[0] for b in self.batches)

    @property
    def num_tokens(self) -> int:
        return int(sum(b["attention_mask"].sum() for b in self.batches))


def _pad_id(tokenizer) -> int:
    """Padding never reaches a statistic (masks exclude it), so any id will do when none is set."""
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def padded_batches(samples: list[list[int]], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches; samples keep their order (so the hash is reproducible)."""
    out = []
    for start in range(0, len(samples), batch_size):
        group = samples[start : start + batch_size]
        width = max(len(s) for s in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, s in enumerate(group):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _hash(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for key in ("input_ids", "attention_mask"):
            h.update(b[key].numpy().tobytes())
    return h.hexdigest()[:16]


def _text_windows(ids: list[int], num_samples: int, max_length: int, rng: random.Random) -> list[list[int]]:
    if len(ids) < max_length:
        raise SecateursError(f"the calibration text has {len(ids)} tokens, fewer than one sample of {max_length} "
                             "(--calib-length); give a longer text or a shorter --calib-length")
    if len(ids) < num_samples * max_length:
        log.warning("secateurs: WARNING: the calibration text has %d tokens, fewer than the %d x %d asked for; the "
                    "%d random windows overlap (repeated tokens weigh more)", len(ids), num_samples, max_length,
                    num_samples)
    starts = [rng.randrange(0, len(ids) - max_length + 1) for _ in range(num_samples)]
    return [ids[s : s + max_length] for s in starts]


def _read_jsonl(path: Path) -> list[str]:
    return [_record_text(record, f"{path}:{number}") for number, record in iter_jsonl(path)]


def _record_text(record, where: str) -> str:
    if not isinstance(record, dict):
        raise SecateursError(f"{where}: a calibration record must be a JSON object")
    if "instruction" in record:
        return ALPACA_TEMPLATE.format(instruction=record["instruction"], input=record.get("input", ""))
    if "text" in record:
        return record["text"]
    raise SecateursError(f"{where}: a calibration record needs a 'text' field or Alpaca 'instruction'/'input' fields")


def _tokenize(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    return tokenizer(text, verbose=False, **kwargs)["input_ids"]


SELF_BATCH = 64  # samples decoded together: decoding is bound by reading the weights, so a wide batch is nearly free


def self_generated(model, tokenizer, num_samples: int, max_length: int, seed: int) -> list[list[int]]:
    """Ancestral sampling from BOS (temperature 1, no truncation, EOS suppressed so every sample has
    max_length tokens), cached per (model identity, seed, num_samples, max_length)."""
    start = getattr(tokenizer, "bos_token_id", None)
    if start is None:
        start = getattr(tokenizer, "eos_token_id", None)
    if start is None:
        raise SecateursError("'self' calibration needs a tokenizer with a BOS or EOS token to start from")

    vocab = int(model.get_output_embeddings().weight.shape[0])
    key = dict(model=model_identity(model), seed=seed, num_samples=num_samples, max_length=max_length, start=int(start),
               sampler=SAMPLER)
    cached = calibration_cache.read(key, vocab)
    if cached is not None:
        status(f"calibration: reusing {num_samples} x {max_length} tokens sampled from this model earlier "
               f"({calibration_cache.path(key)})")
        return cached
    banned = [int(t) for t in _token_ids(getattr(tokenizer, "eos_token_id", None)) if 0 <= int(t) < vocab]
    samples = []
    with phase(f"calibration: sampling {num_samples} x {max_length} tokens from the model ('self')"), \
            torch.random.fork_rng(devices=[]), threads.working("decode"):
        torch.manual_seed(seed)
        steps = bar(total=-(-num_samples // SELF_BATCH) * (max_length - 1), desc="sampling", unit="step")
        for offset in range(0, num_samples, SELF_BATCH):
            n = min(SELF_BATCH, num_samples - offset)
            samples.extend(sample_sequences(model, start, n, max_length, banned, steps))
        steps.close()
    calibration_cache.write(key, samples)
    return samples


def _token_ids(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


SAMPLER = "inverse-cdf"  # in the cache key: samples drawn another way are other samples


def draw_tokens(logits: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logits) by inverse-CDF sampling: torch.multinomial took 59 ms
    for 32 rows of a 49,152-token vocabulary on 2 cores, this 10 ms (a sixth of a SmolLM2 decode
    step). A token of probability zero (suppressed EOS) is never drawn."""
    probs = torch.softmax(logits.float(), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
    impossible = probs.gather(1, tokens) == 0  # float rounding at the top of the CDF
    return torch.where(impossible, probs.argmax(-1, keepdim=True), tokens)


@torch.inference_mode()
def sample_sequences(model, start: int, n: int, length: int, banned: list[int], steps) -> list[list[int]]:
    """A plain decode loop with the KV cache: `generate`'s machinery cost 2.7x the forward passes
    themselves on SmolLM2 (80 s vs 29 s for 8 x 128 tokens on one loaded core)."""
    device = input_device(model)
    tokens = torch.full((n, 1), start, dtype=torch.long, device=device)
    out, past = [tokens], None
    for _ in range(length - 1):
        result = model(input_ids=tokens, past_key_values=past, use_cache=True)
        past = result.past_key_values
        logits = result.logits[:, -1].float()
        if banned:
            logits[:, banned] = float("-inf")
        tokens = draw_tokens(logits)
        out.append(tokens)
        steps.update()
    return torch.cat(out, dim=1).cpu().tolist()


def load_calibration(spec: str | None, tokenizer, *, model=None, num_samples: int = DEFAULT_SAMPLES,
                     max_length: int = DEFAULT_LENGTH,
                     seed: int = 0, batch_size: int = 8) -> Calibration:
    """Build calibration batches from `spec` (see the module docstring)."""
    spec = spec or DEFAULT_SOURCE
    if num_samples < 1 or max_length < 2 or batch_size < 1:
        raise SecateursError("calibration needs num_samples >= 1, max_length >= 2 and batch_size >= 1")
    if model is not None:
        check_calibration_length(model.config, max_length)
    if tokenizer is None:
        raise SecateursError("calibration needs a tokenizer; the model folder has none")
    rng = random.Random(seed)
    description = {"source": spec, "num_samples": num_samples, "max_length": max_length, "seed": seed}
    text, texts = None, None
    if spec == "self":
        if model is None:
            raise SecateursError("'self' calibration samples text from the model: pass the model")
        samples = self_generated(model, tokenizer, num_samples, max_length, seed)
        description["kind"] = "model-generated (ancestral sampling from BOS)"
    elif spec == "tinystories":
        text = resources.files("secateurs").joinpath("data", "tinystories_sample.txt").read_text(encoding="utf-8")
    elif spec.startswith("hf:"):
        texts = hf_texts(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise SecateursError(f"calibration source not found: {spec} (a text or .jsonl file, hf:NAME:SPLIT, "
                                 "'self' or 'tinystories')")
        if path.suffix == ".jsonl":
            texts = _read_jsonl(path)
        else:
            text = read_text_file(path, "calibration file").replace("\r\n", "\n")
    if text is not None:
        samples = _text_windows(_tokenize(tokenizer, text), num_samples, max_length, rng)
        description["kind"] = "random token windows of a text"
    elif texts is not None:
        texts = [t for t in texts if t.strip()]
        if len(texts) < num_samples:
            log.warning("secateurs: WARNING: the calibration source has %d usable records, fewer than the %d "
                        "samples asked for; using all %d", len(texts), num_samples, len(texts))
        chosen = rng.sample(texts, num_samples) if len(texts) > num_samples else texts
        samples = [_tokenize(tokenizer, t, max_length) for t in chosen]
        description["kind"] = "one sample per record (truncated)"
    samples = [s for s in samples if len(s) >= 2]
    if not samples:
        raise SecateursError(f"calibration source {spec} gives no sample of at least 2 tokens")
    batches = padded_batches(samples, batch_size, _pad_id(tokenizer))
    calibration = Calibration(batches, description, _hash(batches))
    description.update(samples=calibration.num_samples, tokens=calibration.num_tokens, batch_size=batch_size)
    return calibration


def as_calibration(calibration, tokenizer, *, model=None, options: dict | None = None) -> Calibration:
    """`calibration` itself when it is already a Calibration, else its source spec loaded with
    `options` (load_calibration's keywords): the one place a spec becomes data."""
    if isinstance(calibration, Calibration):
        return calibration
    return load_calibration(calibration, tokenizer, model=model, **(options or {}))


def check_calibration_length(config, max_length: int | None) -> None:
    """A calibration sample longer than the model's context is meaningless (and 'self' would
    generate it for minutes): refuse it before any work."""
    context = getattr(config, "max_position_embeddings", None)
    if max_length and context and max_length > context:
        raise SecateursError(f"--calib-length {max_length} exceeds the model's context of {context} tokens; use at "
                             f"most {context}")


def hf_texts(spec: str) -> list[str]:
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3):
        raise SecateursError("use hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    try:
        import datasets  # noqa: PLC0415 (optional: only hf: sources need datasets)
    except ImportError as exc:
        raise SecateursError("hf: calibration sources need the `datasets` package (pip install datasets)") from exc
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, ...
        raise SecateursError(f"could not load dataset {name!r} ({exc}); use a local text or jsonl file") from exc
    return [_record_text(dict(r), f"{spec}[{i}]") for i, r in enumerate(data)]
