"""A teacher-logit cache: K tokens of the teacher's distribution at temperature T (drawn from it, or its
top K) on the recovery sequences, written once by `secateurs teacher-logits` so that `recover
--teacher-cache` distils with no teacher in memory and no teacher forward per step.

The sequences are the ones `recover` trains and validates on: the same data, tokenisation, sequence
length, validation split and seed (secateurs.recovery.data.load_recovery_data), the training sequences
in the order the training loop draws them (secateurs.recovery.trainer.DataOrder), so a cache made for
N tokens covers any run of up to N tokens. For every supervised position a top-K shard
(`selection="top-k"`) holds the K largest log-probabilities of softmax(z_t / T) (`values`, float32 or
float16), their token ids (`indices`, int32) and log(1 - their summed probability) (`rest`, float32; -inf
when K is the vocabulary), the rows of each sequence at `offsets`. A sampled cache (`selection="sampled"`,
the default) holds instead the tokens of K draws from that distribution with the log of their frequencies
(sampled_rows): the same tensors, its rest -inf. Shards (safetensors) are written one at a time, each
atomically, and `manifest.json` after each, so an interrupted write resumes at its first missing shard
(`resume=True`) and ends with the very cache an uninterrupted one writes.

Launched as several processes (torchrun, accelerate launch; secateurs.runtime.distributed), each
process holds the teacher and computes every N-th of the shards still to write, and process 0 (the
one that writes outputs) gathers them and writes them in order: the same files as one process
writes, N times as fast.

The manifest binds the cache to its teacher (secateurs.runtime.identity), tokenizer, data (the
RecoveryData hash), sequence length, validation split, seed, temperature, K, selection and token count.
The format and its reading, which treats the folder as untrusted, are secateurs.recovery.cached_teacher.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from secateurs.adapters import get_adapter
from secateurs.files.output import check_output_dir, marker_record, release, write_file, write_folder, writing_file
from secateurs.recovery.api import check_same_data
from secateurs.recovery.cached_teacher import (
    FORMAT,
    KIND,
    MANIFEST,
    VALUE_DTYPES,
    TeacherCacheError,
    binding_differences,
    bytes_per_position,
    file_sha256,
    read_manifest,
    shard_name,
    shard_plan,
    tokenizer_identity,
)
from secateurs.recovery.data import IGNORE_INDEX, RecoveryData, load_recovery_data
from secateurs.recovery.objectives import TopK, final_hidden
from secateurs.recovery.settings import TeacherLogitsSettings
from secateurs.runtime.distributed import join
from secateurs.runtime.identity import model_identity
from secateurs.runtime.offload import input_device
from secateurs.runtime.progress import bar as progress_bar
from secateurs.runtime.progress import status

_STRAY = re.compile(r"^\.(?:(?:train|val)-\d{5}\.safetensors|manifest\.json)\.tmp-\d+-\w+(?:\.safetensors|\.json)?$")


def log_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T), in at least float32."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return F.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)


def top_k_rows(logits: torch.Tensor, top_k: int, temperature: float) -> TopK:
    """The top-K log-probabilities of softmax(logits / T) (at least float32), their ids and the log of
    the mass of the other tokens."""
    log_p = log_probabilities(logits, temperature)
    values, indices = log_p.topk(min(top_k, log_p.shape[-1]), dim=-1)
    rest = torch.logsumexp(log_p.scatter(-1, indices, float("-inf")), dim=-1)
    return TopK(values, indices, rest)


PAD_LOG_PROBABILITY = -1e4  # a sampled row's columns no draw hit: exp() is 0 in float16 and float32


def sampled_rows(logits: torch.Tensor, draws: int, temperature: float, generator: torch.Generator) -> TopK:
    """`draws` tokens drawn with replacement from softmax(logits / T): the distinct tokens drawn with
    log(count / draws), then, so that every row holds min(draws, vocabulary) distinct ids, the most probable
    tokens not drawn at PAD_LOG_PROBABILITY (probability 0); the rest's mass is 0 (log: -inf). Its
    expectation over the draws is the teacher's distribution, so the distillation gradient q - p is
    unbiased (a top-K cache's is not: it gives the head the tail's mass as the student spreads it)."""
    log_p = log_probabilities(logits, temperature)
    drawn = torch.multinomial(log_p.exp(), draws, replacement=True, generator=generator)
    counts = torch.zeros_like(log_p).scatter_add_(-1, drawn, torch.ones_like(drawn, dtype=log_p.dtype))
    key = counts.mul(1e4).add_(log_p.clamp(min=-1e3))  # every token drawn first, then the most probable
    indices = key.topk(min(draws, log_p.shape[-1]), dim=-1).indices
    picked = counts.gather(-1, indices)
    values = torch.where(picked > 0, picked.div(draws).log(), torch.full_like(picked, PAD_LOG_PROBABILITY))
    return TopK(values, indices, torch.full(picked.shape[:1], float("-inf"), dtype=log_p.dtype, device=log_p.device))


def binding(teacher, tokenizer, data: RecoveryData, settings: TeacherLogitsSettings) -> dict:
    """What the cache's content depends on: every entry must match for a resume, and those a recovery
    run can differ in (teacher, tokenizer, data, seq_len, val_tokens, seed, temperature) for a run."""
    vocab = int(teacher.config.vocab_size)
    return {"format": FORMAT,
            "teacher": {"identity": model_identity(teacher), "name": getattr(teacher.config, "_name_or_path", None),
                        "vocab_size": vocab},
            "tokenizer": tokenizer_identity(tokenizer),
            "data": {"source": str(settings.data), "hash": data.hash, "train_sequences": len(data.train_ids),
                     "val_sequences": len(data.val_ids)},
            "seq_len": settings.seq_len, "val_tokens": settings.val_tokens, "seed": settings.seed,
            "temperature": float(settings.temperature), "top_k": min(settings.top_k, vocab),
            "selection": settings.selection,
            "cache_dtype": settings.cache_dtype, "tokens": settings.tokens,
            "shard_sequences": settings.shard_sequences, "batch_size": settings.batch_size,
            "chunk_rows": settings.chunk_rows}


def shard_tensors(teacher, ids: torch.Tensor, labels: torch.Tensor, indices: list[int], settings: dict,
                  number: int) -> dict:
    """The tensors of shard `number` (see the module docstring), computed `batch_size` sequences at a time;
    a sampled cache draws from a generator seeded by the cache's seed and the shard's number, so a shard is
    the same whichever process computes it and whether the write was resumed."""
    adapter, device = get_adapter(teacher), input_device(teacher)
    generator, seed = None, (settings["seed"] * 100_000 + number) % 2**63
    values, tokens, rests, counts = [], [], [], []
    for start in range(0, len(indices), settings["batch_size"]):
        rows = torch.tensor(indices[start:start + settings["batch_size"]])
        mask = labels[rows, 1:] != IGNORE_INDEX
        counts += mask.sum(1).tolist()
        with torch.no_grad():
            hidden = final_hidden(teacher, ids[rows])[:, :-1][mask.to(device)]
            for first in range(0, hidden.shape[0], settings["chunk_rows"]):
                logits = adapter.logits(teacher, hidden[first:first + settings["chunk_rows"]])
                if settings["selection"] == "sampled":
                    generator = generator or torch.Generator(logits.device).manual_seed(seed)
                    top = sampled_rows(logits, settings["top_k"], settings["temperature"], generator)
                else:
                    top = top_k_rows(logits, settings["top_k"], settings["temperature"])
                values.append(top.values.to("cpu", VALUE_DTYPES[settings["cache_dtype"]]))
                tokens.append(top.indices.to("cpu", torch.int32))
                rests.append(top.rest.to("cpu", torch.float32))
    offsets = torch.zeros(len(indices) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    k = settings["top_k"]
    return {"sequences": torch.tensor(indices, dtype=torch.int64), "offsets": offsets,
            "values": torch.cat(values) if values else torch.zeros(0, k, dtype=VALUE_DTYPES[settings["cache_dtype"]]),
            "indices": torch.cat(tokens) if tokens else torch.zeros(0, k, dtype=torch.int32),
            "rest": torch.cat(rests) if rests else torch.zeros(0, dtype=torch.float32)}


def _manifest(bound: dict, shards: list[dict], planned: int) -> dict:
    per_position = bytes_per_position(bound["top_k"], bound["cache_dtype"])
    return {"format": FORMAT, "binding": bound, "planned_shards": planned, "complete": len(shards) == planned,
            "bytes_per_position": per_position, "shards": shards}


def _write_manifest(folder: Path, bound: dict, shards: list[dict], planned: int) -> None:
    write_file(folder / MANIFEST, json.dumps(_manifest(bound, shards, planned), indent=1) + "\n")


def check_cache_output(out, force: bool, resume: bool, inputs) -> Path:
    """Claim the cache folder before any work: a resume needs a cache secateurs wrote there; a fresh
    write needs a new folder (or force over a teacher-logit cache)."""
    given = Path(out).expanduser()
    record = marker_record(given) if given.is_dir() and not given.is_symlink() else None
    holds_cache = record is not None and record.get("kind") == KIND
    if resume and not holds_cache:
        raise TeacherCacheError(f"--resume: no teacher-logit cache in {given} (no secateurs marker of one there); "
                                "run without --resume")
    if holds_cache and not (resume or force):
        raise TeacherCacheError(f"{given} holds a teacher-logit cache: continue it (--resume), or pass --force to "
                                "write a new one in its place")
    return check_output_dir(out, force or resume, inputs, what="cache folder", kind=KIND)


def _resumed_shards(folder: Path, bound: dict, planned: int) -> list[dict]:
    """The shards an interrupted write completed, checked against this write (same binding, same files)."""
    manifest = read_manifest(folder)
    differences = binding_differences(manifest["binding"], bound)
    if differences or manifest["planned_shards"] != planned:
        raise TeacherCacheError(f"--resume: the cache in {folder} was begun with other settings or inputs "
                                f"({'; '.join(differences) or 'another shard count'}); pass --force to start over")
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise TeacherCacheError(f"--resume: {path} differs from what the manifest records (changed after it "
                                    "was written); pass --force to start over")
    for stray in folder.iterdir():  # temporary files of a write that was killed (this run holds the folder now)
        if _STRAY.match(stray.name):
            stray.unlink(missing_ok=True)
    return list(manifest["shards"])


def write_teacher_logits(teacher, tokenizer, settings: TeacherLogitsSettings, out: str | os.PathLike, *,
                         force: bool = False, resume: bool = False, inputs=(), progress: bool = True) -> Path:
    """Write the cache of `teacher` on `settings.data` to the folder `out` (see the module docstring);
    resume=True continues an interrupted write of the same cache. Several launched processes share the
    shards (each with its own teacher) and process 0 writes them. Returns the folder."""
    world = join(input_device(teacher).type)
    inputs = [getattr(teacher.config, "_name_or_path", None), settings.data, *inputs]
    folder = world.from_main(check_cache_output, out, force, resume, inputs)
    s = settings
    data = load_recovery_data(s.data, tokenizer, seq_len=s.seq_len, tokens=s.tokens, val_tokens=s.val_tokens,
                              seed=s.seed)
    check_same_data(world, data)
    bound = binding(teacher, tokenizer, data, s)
    plan = shard_plan(data, s.tokens, s.seed, s.shard_sequences)
    shards = world.from_main(_begin, folder, bound, len(plan), resume, force, inputs)
    total = sum(len(indices) for _, indices in plan)
    bar = progress_bar(total=total, initial=sum(e["sequences"] for e in shards), unit="seq", desc="teacher-logits",
                       disable=not (progress and world.main))
    teacher.eval()
    pending = list(enumerate(plan))[len(shards):]
    try:
        for first in range(0, len(pending), world.size):
            mine = pending[first + world.rank] if first + world.rank < len(pending) else None
            computed = world.gather(_compute(teacher, data, mine, bound))
            for number, split, tensors in (c for c in computed or () if c is not None):
                shards.append(_write_shard(folder, split, number, tensors))
                _write_manifest(folder, bound, shards, len(plan))
                bar.update(int(tensors["sequences"].numel()))
    finally:
        bar.close()
        if world.main:
            release(folder)
    if progress and world.main:
        positions = sum(e["positions"] for e in shards)
        status(f"teacher-logit cache: {positions:,} positions, K={bound['top_k']} {bound['selection']}, "
               f"{sum(e['bytes'] for e in shards) / 2**20:,.1f} MiB in {len(shards)} shards at {folder}")
    return folder


def _begin(folder: Path, bound: dict, planned: int, resume: bool, force: bool, inputs) -> list[dict]:
    """The shards already written: those of the interrupted write being resumed, or none in a folder
    created now (holding only the manifest)."""
    if resume:
        return _resumed_shards(folder, bound, planned)
    with write_folder(folder, force, inputs, kind=KIND, what="cache folder") as tmp:
        (tmp / MANIFEST).write_text(json.dumps(_manifest(bound, [], planned), indent=1) + "\n")
    check_output_dir(folder, True, inputs, what="cache folder", kind=KIND)
    return []


def _compute(teacher, data: RecoveryData, shard: tuple | None, bound: dict) -> tuple | None:
    """(number, split, tensors) of `shard`, an entry (number, (split, indices)) of the shard plan; None
    for None (a process with no shard left in the last round)."""
    if shard is None:
        return None
    number, (split, indices) = shard
    ids, labels = (data.val_ids, data.val_labels) if split == "val" else (data.train_ids, data.train_labels)
    return number, split, shard_tensors(teacher, ids, labels, indices, bound, number)


def _write_shard(folder: Path, split: str, number: int, tensors: dict) -> dict:
    """Write one shard atomically; its manifest entry."""
    name = shard_name(split, number)
    with writing_file(folder / name) as tmp:
        save_file(tensors, tmp)
    return {"file": name, "split": split, "sequences": int(tensors["sequences"].numel()),
            "positions": int(tensors["values"].shape[0]), "bytes": (folder / name).stat().st_size,
            "sha256": file_sha256(folder / name)}
