"""Reading a teacher-logit cache (written by secateurs.recovery.teacher_cache): its format, the checks
of an untrusted folder, and `TeacherCache`, the teacher a recovery run distils from without a model.

Everything read is checked before the first step: the manifest (its size, JSON, fields and types), that
it was made for this run (teacher, tokenizer, data hash, sequence length, validation split, seed,
temperature: every difference named), that it covers the training sequences the run draws, and every
shard: a file of the folder under the name the manifest gives (no path ever leaves the folder, no
symbolic link), its size and SHA-256 as recorded, its tensors' names, dtypes and shapes, the sequences
it holds, the supervised positions of each (from the run's own labels), token ids inside the vocabulary
and distinct per row, finite log-probabilities <= 0 whose mass with the rest's is 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from secateurs.errors import SecateursError
from secateurs.files.output import marker_record
from secateurs.recovery.data import IGNORE_INDEX, RecoveryData
from secateurs.recovery.objectives import CachedTeacher, TopK
from secateurs.recovery.settings import CACHE_SELECTIONS, RecoverySettings
from secateurs.recovery.trainer import DataOrder
from secateurs.runtime.identity import model_identity

FORMAT = "secateurs.teacher-logits/2"
KIND = "teacher-logits"  # the marker kind of a cache folder (secateurs.files.output)
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 2**20
TENSORS = ("sequences", "offsets", "values", "indices", "rest")
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
SHARD = re.compile(r"^(train|val)-\d{5}\.safetensors$")
MASS_TOLERANCE = 1e-2  # |sum of the K probabilities + the rest's - 1|: float16 values round by 2^-11 relative


class TeacherCacheError(SecateursError):
    """A teacher-logit cache that cannot be used: damaged, incomplete, or made for another run."""


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.safetensors"


def bytes_per_position(top_k: int, cache_dtype: str) -> int:
    """Disk bytes of one supervised position: K values, K int32 ids and the float32 rest."""
    return top_k * (VALUE_DTYPES[cache_dtype].itemsize + 4) + 4


def tokenizer_identity(tokenizer) -> str:
    """A short fingerprint of a tokenizer's vocabulary and its BOS and EOS ids."""
    special = [getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id")]
    text = json.dumps([sorted(tokenizer.get_vocab().items()), special])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def drawn_sequences(num_train: int, seed: int, positions: int, offset: int = 0) -> list[int]:
    """The distinct training sequences of positions [offset, offset + positions) of the seeded order
    (secateurs.recovery.trainer.DataOrder), in the order they are first drawn."""
    order = DataOrder(num_train, 1, seed, offset)
    seen: dict[int, None] = {}
    for position in range(positions):
        seen.setdefault(int(order.batch(position)[0]), None)
        if len(seen) == num_train:
            break
    return list(seen)


def shard_plan(data: RecoveryData, tokens: int, seed: int, shard_sequences: int) -> list[tuple[str, list[int]]]:
    """(split, sequence indices) of every shard: the validation sequences, then the training sequences
    that the first ceil(tokens / seq_len) positions of the seeded order draw."""
    drawn = drawn_sequences(len(data.train_ids), seed, math.ceil(tokens / data.seq_len))
    plan = []
    for split, indices in (("val", list(range(len(data.val_ids)))), ("train", drawn)):
        plan += [(split, indices[i:i + shard_sequences]) for i in range(0, len(indices), shard_sequences)]
    return plan


def sequence_key(ids: torch.Tensor, labels: torch.Tensor) -> bytes:
    """What finds a sequence's rows: its token ids and labels."""
    return hashlib.sha1(ids.to(torch.int64).numpy().tobytes() + labels.to(torch.int64).numpy().tobytes()).digest()


# -- the manifest ------------------------------------------------------------------------------------
def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


_BINDING = {"format": str, "teacher": dict, "tokenizer": str, "data": dict, "seq_len": int, "val_tokens": int,
            "seed": int, "temperature": float, "top_k": int, "selection": str, "cache_dtype": str, "tokens": int,
            "shard_sequences": int, "batch_size": int, "chunk_rows": int}


def _manifest_problem(manifest) -> str | None:
    """What makes a manifest unusable (its fields and their types), or None."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"is not a {FORMAT} manifest"
    bound, shards = manifest.get("binding"), manifest.get("shards")
    if not isinstance(bound, dict) or set(bound) != set(_BINDING):
        return "has no binding with the entries of one"
    for key, kind in _BINDING.items():
        value = bound[key]
        fits = (_is_int(value) if kind is int else isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) if kind is float else isinstance(value, kind))
        if not fits:
            return f"has a binding whose {key} is not a {kind.__name__}"
    teacher = bound["teacher"]
    if not (isinstance(teacher.get("identity"), str) and _is_int(teacher.get("vocab_size"), 1)
            and isinstance(bound["data"].get("hash"), str)):
        return "has a binding without the teacher's identity and vocabulary or the data hash"
    if (bound["cache_dtype"] not in VALUE_DTYPES or not 1 <= bound["top_k"] <= teacher["vocab_size"]
            or bound["selection"] not in CACHE_SELECTIONS):
        return (f"has a cache dtype {bound['cache_dtype']!r}, a K {bound['top_k']} or a selection "
                f"{bound['selection']!r} secateurs does not write")
    if not (_is_int(manifest.get("planned_shards"), 1) and isinstance(manifest.get("complete"), bool)
            and isinstance(shards, list) and len(shards) <= manifest["planned_shards"]):
        return "has no shard list, shard count or completion flag"
    for number, entry in enumerate(shards):
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and SHARD.match(entry["file"])
                and entry["file"] == shard_name(entry.get("split"), number) and _is_int(entry.get("sequences"), 1)
                and _is_int(entry.get("positions")) and _is_int(entry.get("bytes"), 1)
                and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            return f"lists a shard {number} that is not a shard of this cache (its name, counts, size or SHA-256)"
    return None


def read_manifest(folder) -> dict:
    """The manifest of the cache folder `folder`, checked (see _manifest_problem)."""
    folder = Path(folder).expanduser()
    if folder.is_symlink() or not folder.is_dir():
        raise TeacherCacheError(f"teacher-logit cache {folder}: not a folder (make one with `secateurs "
                                "teacher-logits`)")
    record = marker_record(folder)
    if record is None or record.get("kind") != KIND:
        raise TeacherCacheError(f"{folder} is not a teacher-logit cache secateurs wrote (no marker of one)")
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
        raise TeacherCacheError(f"teacher-logit cache {folder}: {MANIFEST} is missing, a link, or larger than "
                                f"{MAX_MANIFEST_BYTES // 2**20} MiB")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise TeacherCacheError(f"teacher-logit cache {folder}: {MANIFEST} is not JSON text") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise TeacherCacheError(f"teacher-logit cache {folder}: {MANIFEST} {problem}")
    return manifest


def binding_differences(found: dict, wanted: dict) -> list[str]:
    """'its X is A, this run's B' for every entry of `wanted` that differs from the cache's binding
    `found` (for "data", its hash when `wanted` gives only that)."""
    out = []
    for key, b in wanted.items():
        a = found.get(key)
        if key == "data" and set(b) == {"hash"}:
            a, b, key = a.get("hash"), b["hash"], "data hash"
        if a != b:
            out.append(f"its {key} is {a}, this run's {b}")
    return out


def check_cache_settings(settings: RecoverySettings, with_teacher: bool) -> dict:
    """Before any model loads: a cache folder that reads, is complete, and was made with this run's
    sequence length, validation split, seed and temperature (the rest is checked once the data is
    read). Returns its manifest."""
    if with_teacher:
        raise TeacherCacheError("--teacher-cache stands in for the teacher: drop --teacher (the cache names the "
                                "teacher that made it, and is checked against the student's plan)")
    manifest = read_manifest(settings.teacher_cache)
    if not manifest["complete"]:
        raise TeacherCacheError(f"teacher-logit cache {settings.teacher_cache} is incomplete "
                                f"({len(manifest['shards'])} of {manifest['planned_shards']} shards): finish it with "
                                "`secateurs teacher-logits ... --resume`")
    wanted = {"seq_len": settings.seq_len, "val_tokens": settings.val_tokens, "seed": settings.seed,
              "temperature": float(settings.temperature)}
    differences = binding_differences(manifest["binding"], wanted)
    if differences:
        raise TeacherCacheError(f"teacher-logit cache {settings.teacher_cache} was made for another run: "
                                f"{'; '.join(differences)}")
    return manifest


# -- the shards --------------------------------------------------------------------------------------
def _shard_problem(t: dict, entry: dict, indices: list[int], supervised: torch.Tensor, bound: dict) -> str | None:
    """What is wrong with one shard's tensors `t`, expected to hold `indices` with `supervised` positions each."""
    k, vocab = bound["top_k"], bound["teacher"]["vocab_size"]
    rows, n = entry["positions"], entry["sequences"]
    shapes = {"sequences": ((n,), torch.int64), "offsets": ((n + 1,), torch.int64),
              "values": ((rows, k), VALUE_DTYPES[bound["cache_dtype"]]), "indices": ((rows, k), torch.int32),
              "rest": ((rows,), torch.float32)}
    if set(t) != set(TENSORS):
        return f"holds the tensors {sorted(t)}, not {list(TENSORS)}"
    for name, (shape, dtype) in shapes.items():
        if tuple(t[name].shape) != shape or t[name].dtype != dtype:
            return f"holds {name} as {t[name].dtype} {tuple(t[name].shape)}, not {dtype} {shape}"
    if t["sequences"].tolist() != indices:
        return "holds other sequences than this data's seeded order"
    if t["offsets"][0] != 0 or not torch.equal(t["offsets"].diff(), supervised):
        return "has other supervised positions per sequence than this data's labels"
    index, values, rest = t["indices"], t["values"].float(), t["rest"]
    if rows and (index.min() < 0 or index.max() >= vocab):
        return f"holds token ids outside the vocabulary of {vocab}"
    if k > 1 and rows and (index.sort(dim=-1).values.diff(dim=-1) == 0).any():
        return "repeats a token id within a position"
    if not torch.isfinite(values).all() or (values > 0).any() or rest.isnan().any() or (rest > 0).any():
        return "holds log-probabilities that are not finite and <= 0 (or a rest that is NaN or > 0)"
    mass = torch.logsumexp(torch.cat([values, rest[:, None]], dim=-1), dim=-1).exp()
    if rows and ((mass - 1).abs() > MASS_TOLERANCE).any():
        return "holds probabilities whose mass with the rest's is not 1"
    return None


def _checked_shard(folder: Path, entry: dict, indices: list[int], labels: torch.Tensor, bound: dict) -> torch.Tensor:
    """Check one shard file (see the module docstring); returns its offsets."""
    path = folder / entry["file"]
    where = f"teacher-logit cache {folder}: {entry['file']}"
    if path.is_symlink() or not path.is_file():
        raise TeacherCacheError(f"{where} is missing (or a link)")
    if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
        raise TeacherCacheError(f"{where} differs from what the manifest records (size or SHA-256): changed or "
                                "damaged after it was written; write the cache again")
    try:
        tensors = load_file(path)
    except Exception as exc:  # noqa: BLE001 - an untrusted file: whatever the reader raises means damaged
        raise TeacherCacheError(f"{where} is not a safetensors file ({type(exc).__name__})") from exc
    supervised = (labels[indices, 1:] != IGNORE_INDEX).sum(1) if indices else torch.zeros(0, dtype=torch.int64)
    problem = _shard_problem(tensors, entry, indices, supervised, bound)
    if problem:
        raise TeacherCacheError(f"{where} {problem}")
    return tensors["offsets"]


class TeacherCache(CachedTeacher):
    """A checked cache bound to a run's data: `rows(ids, labels)` finds each sequence by its content."""

    def __init__(self, folder, manifest: dict, data: RecoveryData):
        self.folder, self.manifest = Path(folder).expanduser(), manifest
        bound = manifest["binding"]
        plan = shard_plan(data, bound["tokens"], bound["seed"], bound["shard_sequences"])
        if [(s, len(i)) for s, i in plan] != [(e["split"], e["sequences"]) for e in manifest["shards"]]:
            raise TeacherCacheError(f"teacher-logit cache {self.folder}: its shards are not those of this data's "
                                    "seeded order")
        self._where: dict[bytes, tuple[int, int]] = {}
        self._offsets, self._files = [], []
        for number, ((split, indices), entry) in enumerate(zip(plan, manifest["shards"])):
            ids, labels = (data.val_ids, data.val_labels) if split == "val" else (data.train_ids, data.train_labels)
            self._offsets.append(_checked_shard(self.folder, entry, indices, labels, bound).tolist())
            self._files.append(str(self.folder / entry["file"]))
            for row, i in enumerate(indices):
                self._where.setdefault(sequence_key(ids[i], labels[i]), (number, row))
        self.train = {i for s, indices in plan if s == "train" for i in indices}

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest["binding"], sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        bound = self.manifest["binding"]
        return {"path": str(self.folder), "fingerprint": self.fingerprint, "teacher": bound["teacher"],
                "top_k": bound["top_k"], "selection": bound["selection"], "temperature": bound["temperature"],
                "cache_dtype": bound["cache_dtype"],
                "tokens": bound["tokens"], "positions": sum(e["positions"] for e in self.manifest["shards"]),
                "bytes": sum(e["bytes"] for e in self.manifest["shards"])}

    def rows(self, ids: torch.Tensor, labels: torch.Tensor, device) -> TopK:
        """Each sequence's rows, read from its shard (memory-mapped; a shard is opened for the call only)."""
        places = []
        for r in range(ids.shape[0]):
            found = self._where.get(sequence_key(ids[r].cpu(), labels[r].cpu()))
            if found is None:
                raise TeacherCacheError(f"teacher-logit cache {self.folder} holds no rows for a sequence of this "
                                        "run (it covers the sequences of the data it was made from)")
            places.append(found)
        parts: dict[int, list] = {}
        for number in dict.fromkeys(n for n, _ in places):
            with safe_open(self._files[number], framework="pt") as handle:
                slices = [handle.get_slice(name) for name in ("values", "indices", "rest")]
                for r, (n, row) in enumerate(places):
                    if n == number:
                        start, stop = self._offsets[n][row], self._offsets[n][row + 1]
                        parts[r] = [s[start:stop] for s in slices]
        values, indices, rest = (torch.cat([parts[r][j] for r in range(len(places))]).to(device) for j in range(3))
        return TopK(values, indices, rest)


def open_teacher_cache(settings: RecoverySettings, data: RecoveryData, student, teacher, plan,
                       tokenizer) -> TeacherCache:
    """The cache of `settings.teacher_cache`, refused unless it was made by this run's teacher (the model
    given, else the dense model of the student's plan, unless teacher_any) with its tokenizer, data,
    sequence length, validation split, seed and temperature, and covers the training sequences the run
    draws."""
    manifest = check_cache_settings(settings, with_teacher=False)
    folder, bound = settings.teacher_cache, manifest["binding"]
    wanted = {"tokenizer": tokenizer_identity(tokenizer) if tokenizer is not None else bound["tokenizer"],
              "data": {"hash": data.hash}, "seq_len": settings.seq_len, "val_tokens": settings.val_tokens,
              "seed": settings.seed, "temperature": float(settings.temperature)}
    differences = binding_differences(bound, wanted)
    if bound["teacher"]["vocab_size"] != student.config.vocab_size:
        differences.append(f"its vocabulary is {bound['teacher']['vocab_size']}, the student's "
                           f"{student.config.vocab_size}")
    recorded = plan.provenance.get("base_identity") if plan is not None and not settings.teacher_any else None
    expected = model_identity(teacher) if teacher is not None else recorded
    if isinstance(expected, str) and expected != bound["teacher"]["identity"]:
        whose = "the teacher given" if teacher is not None else "the dense model the student was pruned from"
        differences.append(f"its teacher's fingerprint is {bound['teacher']['identity']}, {whose} {expected}")
    if differences:
        raise TeacherCacheError(f"teacher-logit cache {folder} was made for another run: {'; '.join(differences)}")
    cache = TeacherCache(folder, manifest, data)
    steps = math.ceil(settings.tokens / (settings.batch_size * settings.grad_accum * settings.seq_len))
    positions = steps * settings.grad_accum * settings.batch_size  # sequences drawn, as RecoveryLoop draws them
    needed = drawn_sequences(len(data.train_ids), settings.seed, positions, settings.data_offset)
    missing = [i for i in needed if i not in cache.train]
    if missing:
        raise TeacherCacheError(f"teacher-logit cache {folder} covers {len(cache.train)} training sequences of the "
                                f"seeded order and this run draws {len(needed)}, {len(missing)} of them not cached: "
                                f"write it with --tokens {(settings.data_offset + positions) * data.seq_len} or more")
    return cache

