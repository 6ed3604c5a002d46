"""Recovery data: a source -> fixed-length packed sequences with labels, split into a training set
and a held-out validation slice, with a description and a hash for recovery.json.

Sources are the calibration sources (secateurs.calibration.data): a text file, a .jsonl file of
``text`` records or of Alpaca records (instruction / input / output), ``hf:NAME[:CONFIG]:SPLIT``,
``tinystories`` and ``self`` (text sampled from the teacher, the offline default). Documents are
tokenised, joined with EOS and cut into sequences of exactly ``seq_len`` tokens (the ragged tail
is dropped), so no token is padding. Alpaca records are rendered with the Stanford Alpaca
template the AMP and LLM-Pruner fine-tuning scripts use, and only the response (+ EOS) is
learned: prompt tokens carry the label -100.

A local file is checked record by record before anything loads (`check_recovery_source`): UTF-8
(the offset of the first bad byte otherwise), every .jsonl line a JSON object, Alpaca fields and
``text`` strings (``null`` would train as the text "None", an object as its repr).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from secateurs.calibration.data import hf_texts, self_generated
from secateurs.errors import SecateursError
from secateurs.evaluation.perplexity import load_text
from secateurs.files.jsonl import file_sha256, iter_jsonl, read_text_file

IGNORE_INDEX = -100
# Stanford Alpaca's training prompts (used by the AMP paper's fine_tune.py, as by LLM-Pruner's).
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


class RecoveryDataError(SecateursError):
    """Recovery data that cannot be used (missing, too short, overlapping the evaluation text)."""


@dataclass
class RecoveryData:
    """Packed sequences: ``train`` and ``val`` are (n, seq_len) input ids with labels of the same
    shape (IGNORE_INDEX where no loss is taken)."""

    train_ids: torch.Tensor
    train_labels: torch.Tensor
    val_ids: torch.Tensor
    val_labels: torch.Tensor
    description: dict = field(default_factory=dict)
    hash: str = ""

    @property
    def seq_len(self) -> int:
        return int(self.train_ids.shape[1])


def alpaca_prompt(record: dict) -> str:
    template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise RecoveryDataError("recovery data is packed with EOS between documents; the tokenizer has no EOS token")
    return int(eos)


def _encode(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]


def _document_stream(docs: list[str], tokenizer) -> tuple[list[int], list[int]]:
    """Documents tokenised and joined by EOS; every token is a target."""
    eos = _eos_id(tokenizer)
    ids: list[int] = []
    for doc in docs:
        ids.extend(_encode(tokenizer, doc))
        ids.append(eos)
    return ids, list(ids)


def alpaca_stream(records: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Alpaca records as one token stream: prompt tokens labelled IGNORE_INDEX, response + EOS learned.
    Prompt and response are tokenised apart so the boundary is exact."""
    eos = _eos_id(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for record in records:
        prompt = _encode(tokenizer, alpaca_prompt(record))
        response = _encode(tokenizer, str(record["output"]), special=False) + [eos]
        ids += prompt + response
        labels += [IGNORE_INDEX] * len(prompt) + response
    return ids, labels


NAMED_SOURCES = ("self", "tinystories")  # and hf:NAME[:CONFIG]:SPLIT: not local files


def _is_named_source(spec) -> bool:
    return isinstance(spec, str) and (spec in NAMED_SOURCES or spec.startswith("hf:"))


def _local_path(spec) -> Path:
    """The file a recovery data spec names, or a refusal naming what a spec can be."""
    path = Path(os.fspath(spec)).expanduser()
    if not path.is_file():
        raise RecoveryDataError(f"recovery data not found: {spec} (a text or .jsonl file, hf:NAME:SPLIT, "
                                "'tinystories' or 'self')")
    return path


def _read_text(path: Path) -> str:
    return read_text_file(path, "recovery data", RecoveryDataError)


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _check_record(record, where: str) -> dict:
    """One .jsonl record: a JSON object, Alpaca ('instruction', 'output' and the optional 'input'
    strings) or text (a string 'text'); anything else would train on its Python repr."""
    if not isinstance(record, dict):
        raise RecoveryDataError(f"{where}: a recovery record must be a JSON object, not {_json_kind(record)}")
    if "instruction" in record:
        if "output" not in record:
            raise RecoveryDataError(f"{where}: an Alpaca record needs an 'output' (the response to learn)")
        for key in ("instruction", "input", "output"):
            if key in record and not isinstance(record[key], str):
                hint = "; leave 'input' out (or give \"\") when there is none" if key == "input" else ""
                raise RecoveryDataError(f"{where}: field {key!r} of an Alpaca record must be a string, not "
                                        f"{_json_kind(record[key])}{hint}")
        return record
    if "text" not in record:
        raise RecoveryDataError(f"{where}: a recovery record needs a string 'text' field or Alpaca "
                                "'instruction'/'input'/'output' fields")
    if not isinstance(record["text"], str):
        raise RecoveryDataError(f"{where}: field 'text' of a recovery record must be a string, not "
                                f"{_json_kind(record['text'])}")
    return record


def _jsonl_records(path: Path) -> list[dict]:
    """Every record of a .jsonl file, checked (lines counted from 1, on '\\n' as editors count them),
    all Alpaca or all text."""
    records = [_check_record(record, f"{path}:{number}")
               for number, record in iter_jsonl(path, "recovery data", RecoveryDataError)]
    alpaca = sum("instruction" in r for r in records)
    if alpaca and alpaca != len(records):
        raise RecoveryDataError(f"{path} mixes Alpaca records and text records; use one kind per file")
    return records


def check_recovery_source(spec) -> dict | None:
    """Check a local recovery data file before any weights load, without a tokenizer: it exists,
    it is UTF-8, and (.jsonl) every record is usable. Returns {"path", "kind", "records" or "chars"};
    None for the sources that are not local files ('self', 'tinystories', 'hf:...'), which pass."""
    if spec is None or _is_named_source(spec):
        return None
    path = _local_path(spec)
    if path.suffix != ".jsonl":
        return {"path": str(path), "kind": "text file", "chars": len(_read_text(path))}
    records = _jsonl_records(path)
    alpaca = bool(records) and "instruction" in records[0]
    return {"path": str(path), "kind": "Alpaca records" if alpaca else "jsonl text records", "records": len(records)}


def _read_source(spec: str, tokenizer, *, teacher, seq_len: int, self_samples: int,
                 seed: int) -> tuple[list[int], list[int], dict]:
    """(ids, labels, description) of a whole source."""
    description: dict = {"source": spec}
    if spec == "self":
        if teacher is None:
            raise RecoveryDataError("'self' recovery data is text sampled from the teacher: pass a teacher, or "
                                    "give a text or .jsonl file")
        samples = self_generated(teacher, tokenizer, self_samples, seq_len, seed)
        ids = [t for s in samples for t in s[:seq_len]]
        description.update(kind="teacher-generated (ancestral sampling from BOS)", samples=len(samples))
        return ids, list(ids), description
    if spec == "tinystories":
        text = resources.files("secateurs").joinpath("data", "tinystories_sample.txt").read_text(encoding="utf-8")
        ids, labels = _document_stream([text], tokenizer)
        description["kind"] = "bundled TinyStories sample"
        return ids, labels, description
    if isinstance(spec, str) and spec.startswith("hf:"):
        docs = hf_texts(spec)
        ids, labels = _document_stream([d for d in docs if d.strip()], tokenizer)
        description.update(kind="Hugging Face dataset, documents joined by EOS", documents=len(docs))
        return ids, labels, description
    path = _local_path(spec)
    description.update(path=str(path.resolve()), sha256=file_sha256(path))
    if path.suffix != ".jsonl":
        text = _read_text(path).replace("\r\n", "\n")
        ids, labels = _document_stream([text] if text.strip() else [], tokenizer)
        description["kind"] = "text file"
        return ids, labels, description
    records = _jsonl_records(path)
    alpaca = [r for r in records if "instruction" in r]
    if alpaca:
        ids, labels = alpaca_stream(alpaca, tokenizer)
        description.update(kind="Alpaca records, Stanford Alpaca template, loss on the response (+EOS) only",
                           documents=len(alpaca))
    else:
        docs = [r["text"] for r in records if r["text"].strip()]
        ids, labels = _document_stream(docs, tokenizer)
        description.update(kind="jsonl text records joined by EOS", documents=len(docs))
    return ids, labels, description


class EvaluationText(str):
    """An evaluation file of which a run evaluates only the first `max_tokens` tokens (None: all of
    it), as `recover --ppl FILE --ppl-tokens N` does. It is the path (a str), so it goes wherever a
    path goes (the inputs a run never writes); the overlap check measures the share on the
    evaluated tokens only, so that an evaluated slice cannot hide in a large file."""

    max_tokens: int | None

    def __new__(cls, path: str | os.PathLike, max_tokens: int | None = None):
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise RecoveryDataError(f"the evaluated token count of {path} must be a positive integer or None, "
                                    f"got {max_tokens!r}")
        text = super().__new__(cls, os.fspath(path))
        text.max_tokens = max_tokens
        return text

    def __repr__(self) -> str:
        return f"EvaluationText({str(self)!r}, max_tokens={self.max_tokens!r})"

    def __reduce__(self):
        return EvaluationText, (str(self), self.max_tokens)


def _evaluation_entry(entry) -> tuple[Path, int | None]:
    """(path, evaluated tokens or None for the whole file) of an evaluation_files entry: a path, an
    EvaluationText or a (path, max_tokens) pair."""
    if isinstance(entry, (tuple, list)) and len(entry) == 2:
        entry = EvaluationText(*entry)
    return Path(os.fspath(entry)).expanduser(), getattr(entry, "max_tokens", None)


def refuse_evaluation_overlap(spec: str, evaluation_files: list | None) -> None:
    """Training on the text a run then evaluates on would report memorisation as recovery: refuse
    a data file that is an evaluation file (same path or same bytes). Checked before anything loads;
    `refuse_shared_text` then checks the content, once the data is tokenised."""
    if not evaluation_files or spec is None or _is_named_source(spec):
        return
    path = Path(os.fspath(spec)).expanduser()
    if not path.is_file():
        return
    digest = None
    for entry in evaluation_files:
        other, _ = _evaluation_entry(entry)
        if not other.is_file():
            continue
        if other.resolve() == path.resolve():
            raise RecoveryDataError(f"recovery data {path} is the evaluation text of this run; recover on other "
                                    "text (e.g. C4), never on what you then evaluate")
        digest = digest or file_sha256(path)
        if file_sha256(other) == digest:
            raise RecoveryDataError(f"recovery data {path} has the same content as the evaluation text {other}; "
                                    "recover on other text")


OVERLAP_NGRAM = 13  # tokens; the n-gram length of GPT-3's contamination check
OVERLAP_LIMIT = 0.01  # measured (SmolLM2 tokenizer): C4 sample vs WikiText-2 test 0.0, WikiText's two halves 0.0003


def _ngram_hashes(ids, n: int) -> np.ndarray:
    """A 64-bit polynomial hash of every window of n tokens (wrapping arithmetic, vectorised)."""
    tokens = np.asarray(ids, dtype=np.uint64)
    windows = tokens.size - n + 1
    if windows < 1:
        return np.empty(0, dtype=np.uint64)
    hashes = np.zeros(windows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            hashes = hashes * np.uint64(1099511628211) + tokens[k:k + windows] + np.uint64(1)
    return hashes


def shared_ngram_fraction(data_ids, evaluation_ids, n: int = OVERLAP_NGRAM) -> float:
    """The fraction of the evaluation text's n-token windows that also occur in the data."""
    evaluation = _ngram_hashes(evaluation_ids, n)
    return float(np.isin(evaluation, _ngram_hashes(data_ids, n)).mean()) if evaluation.size else 0.0


def refuse_shared_text(spec: str, ids: list[int], tokenizer, evaluation_files: list | None) -> list[dict]:
    """Refuse recovery data that holds the evaluation text under another name or format (a copy as
    jsonl, an excerpt, a concatenation): more than OVERLAP_LIMIT of the evaluated text's 13-token
    windows found in the data. The evaluated text is what the run measures: the first `max_tokens`
    tokens of an EvaluationText (or a (path, max_tokens) entry), the whole file for a plain path, so
    a large file does not dilute its evaluated slice. Returns each file's shared fraction and the
    tokens it was measured on, for recovery.json."""

    found = []
    for entry in evaluation_files or []:
        other, limit = _evaluation_entry(entry)
        if not other.is_file():
            continue
        evaluated = _encode(tokenizer, load_text(other)[0])
        whole = len(evaluated)
        if limit is not None:
            evaluated = evaluated[:limit]
        part = f" (its first {len(evaluated):,} tokens, the part evaluated)" if len(evaluated) < whole else ""
        fraction = shared_ngram_fraction(ids, evaluated)
        if fraction > OVERLAP_LIMIT:
            raise RecoveryDataError(f"recovery data {spec} contains the evaluation text {other}{part}: "
                                    f"{fraction:.1%} of its {OVERLAP_NGRAM}-token windows occur in the data "
                                    f"(different texts share under {OVERLAP_LIMIT:.0%}); recover on other text")
        found.append({"file": other.name, "ngram": OVERLAP_NGRAM, "shared_fraction": round(fraction, 6),
                      "evaluated_tokens": len(evaluated)})
    return found


_SOURCES_READ: contextvars.ContextVar[dict | None] = contextvars.ContextVar("recovery_sources_read", default=None)


@contextlib.contextmanager
def sources_read_once():
    """Within this block a source is read and tokenised once however many runs use it: Consensus's
    rounds each recover on the same file, and re-tokenising a large corpus every round costs minutes."""
    reset = _SOURCES_READ.set({})
    try:
        yield
    finally:
        _SOURCES_READ.reset(reset)


def _read_source_once(spec: str, tokenizer, **how) -> tuple[list[int], list[int], dict]:
    read = _SOURCES_READ.get()
    if read is None:
        return _read_source(spec, tokenizer, **how)
    sampled = spec == "self"  # only sampled text depends on the teacher, the sample count and the seed
    key = (spec, id(tokenizer), how["seq_len"], *((id(how["teacher"]), how["self_samples"], how["seed"]) if sampled
                                                  else ()))
    if key not in read:
        read[key] = _read_source(spec, tokenizer, **how)
    ids, labels, description = read[key]
    return ids, labels, dict(description)


def load_recovery_data(spec: str, tokenizer, *, seq_len: int, tokens: int, val_tokens: int, seed: int = 0,
                       teacher=None, evaluation_files: list | None = None,
                       self_samples: int | None = None) -> RecoveryData:
    """Pack `spec` into sequences of seq_len tokens; hold out ceil(val_tokens / seq_len) of them
    (a seeded random choice) for validation. 'self' samples just enough text from the teacher
    for `tokens` training tokens plus the validation slice, or exactly `self_samples` sequences
    (fewer than the budget needs: the run goes over them several times; the same count, length
    and seed as a pruning run's 'self' calibration reuse its cached samples). `evaluation_files`:
    texts the run evaluates, refused as data (paths: the whole file; EvaluationText(path, max_tokens)
    or (path, max_tokens): the first max_tokens tokens, the part evaluated)."""
    if tokenizer is None:
        raise RecoveryDataError("recovery data needs a tokenizer; the model folder has none")
    if seq_len < 2:
        raise RecoveryDataError(f"seq_len must be at least 2 tokens, got {seq_len}")
    refuse_evaluation_overlap(spec, evaluation_files)
    num_val = math.ceil(val_tokens / seq_len) if val_tokens > 0 else 0
    if self_samples is None:
        self_samples = num_val + max(1, math.ceil(tokens / seq_len))
    elif isinstance(self_samples, bool) or not isinstance(self_samples, int) or self_samples < num_val + 1:
        raise RecoveryDataError(f"self_samples must be an integer above the {num_val} validation sequences, "
                                f"got {self_samples!r}")
    ids, labels, description = _read_source_once(spec, tokenizer, teacher=teacher, seq_len=seq_len,
                                                 self_samples=self_samples, seed=seed)
    overlap = refuse_shared_text(spec, ids, tokenizer, evaluation_files)
    count = len(ids) // seq_len
    if count == 0:
        raise RecoveryDataError(f"recovery data {spec} gives {len(ids)} tokens, fewer than one sequence of "
                                f"{seq_len}; give more text or a shorter --seq-len")
    if count < num_val + 1:
        raise RecoveryDataError(f"recovery data {spec} gives {count} sequences of {seq_len} tokens: too few for "
                                f"{num_val} validation sequences ({val_tokens} validation tokens) and at least one "
                                "to train on; give more text, or fewer --val-tokens")
    all_ids = torch.tensor(ids[: count * seq_len], dtype=torch.long).reshape(count, seq_len)
    all_labels = torch.tensor(labels[: count * seq_len], dtype=torch.long).reshape(count, seq_len)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    val, train = order[:num_val].sort().values, order[num_val:].sort().values
    data = RecoveryData(all_ids[train], all_labels[train], all_ids[val], all_labels[val])
    if int((data.train_labels[:, 1:] != IGNORE_INDEX).sum()) == 0:
        raise RecoveryDataError(f"recovery data {spec} has no token to learn in its training sequences")
    h = hashlib.sha256()
    for t in (data.train_ids, data.train_labels, data.val_ids, data.val_labels):
        h.update(t.numpy().tobytes())
    data.hash = h.hexdigest()[:16]
    description.update(seq_len=seq_len, tokens_read=len(ids), sequences=count, train_sequences=len(train),
                       val_sequences=len(val), train_tokens_available=len(train) * seq_len,
                       supervised_fraction=round(float((all_labels != IGNORE_INDEX).float().mean()), 4),
                       split_seed=seed, **({"evaluation_overlap": overlap} if overlap else {}))
    data.description = description
    return data
