"""Sharded checkpoint files (torch.distributed.checkpoint, DCP): every process writes the shards of the
tensors it holds into one folder, and reads back the parts its own tensors need, whatever the number
of processes that wrote them (two processes' shards resume in one, one process's whole tensors in
two). A tensor is named by a flat key; sharded tensors (DTensors) and whole ones mix freely.

A checkpoint folder is untrusted when it is read back. torch 2.13's FileSystemReader reads the
folder's `.metadata` with pickle.load, which runs whatever code a crafted file names, and DCP reads
non-tensor entries with torch.load(weights_only=False). So here `.metadata` is read with a restricted
unpickler that builds nothing but DCP's metadata records, torch sizes, dtypes and layouts, and paths
(pickle's documented "restricting globals"; torch's own weights-only unpickler reads only torch.save
files), and the metadata is checked against the tensors this run expects before any shard is read:
the same names, shapes and dtypes, no non-tensor entry, chunks inside their tensors, data in plain
files of the folder within their sizes. The shards themselves are tensors, which DCP reads with
torch.load(weights_only=True). Whatever is wrong is a DamagedShards with the reason, never code run.
"""

from __future__ import annotations

import importlib
import math
import os
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)

from secateurs.errors import SecateursError

METADATA_FILE = ".metadata"
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    **{(_METADATA_MODULE, name): True for name in ("Metadata", "TensorStorageMetadata", "TensorProperties",
                                                    "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                                    "_MEM_FORMAT_ENCODING")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): True,
    ("torch.serialization", "_get_layout"): True,  # a layout from its name (torch.strided)
    ("torch", "Size"): True,
    ("pathlib", "PosixPath"): True,  # the checkpoint's path when it was written
    ("pathlib", "PurePosixPath"): True,
    ("pathlib", "WindowsPath"): True,
    ("pathlib", "PureWindowsPath"): True,
}


class DamagedShards(SecateursError):
    """The shards of a checkpoint cannot be read into this run's tensors (the reason is the message)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and nothing else: any other global refuses the file."""

    def find_class(self, module: str, name: str):
        if _ALLOWED.get((module, name)):
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a checkpoint's metadata never holds")


def read_metadata(folder: str | os.PathLike) -> Metadata:
    """The folder's DCP metadata, read without running code; DamagedShards when it is not readable."""
    path = Path(folder) / METADATA_FILE
    if path.is_symlink() or not path.is_file():
        raise DamagedShards(f"{METADATA_FILE} is missing")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError as exc:
        raise DamagedShards(f"{METADATA_FILE} cannot be read ({exc.strerror or exc})") from exc
    except Exception as exc:  # noqa: BLE001 - an untrusted file: whatever the unpickler raises means damaged
        raise DamagedShards(f"{METADATA_FILE} is not the metadata of a sharded checkpoint ({type(exc).__name__}: "
                            f"{str(exc)[:160]})") from None
    if not isinstance(metadata, Metadata):
        raise DamagedShards(f"{METADATA_FILE} holds a {type(metadata).__name__}, not a checkpoint's metadata")
    return metadata


class CheckedReader(FileSystemReader):
    """DCP's file reader whose metadata is read by `read_metadata` (never unpickled freely)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _is_offsets(values, shape) -> bool:
    return isinstance(values, torch.Size | tuple | list) and len(values) == len(shape) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in values)


def _chunk_problem(key: str, chunk, shape) -> str | None:
    if not isinstance(chunk, ChunkStorageMetadata) or not _is_offsets(chunk.offsets, shape) or not _is_offsets(
            chunk.sizes, shape):
        return f"a chunk of {key} is not a chunk of a {len(shape)}-dimensional tensor"
    if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(chunk.offsets, chunk.sizes, shape)):
        return f"a chunk of {key} lies outside its shape {tuple(shape)}"
    return None


def _tensor_problem(key: str, entry, expected: torch.Tensor) -> str | None:
    shape = tuple(expected.shape)
    if not isinstance(entry, TensorStorageMetadata):
        return f"{key} is not stored as a tensor"
    dtype = getattr(entry.properties, "dtype", None)
    if not _is_offsets(entry.size, shape) or tuple(entry.size) != shape or dtype != expected.dtype:
        return f"{key} is stored as {dtype} {tuple(entry.size)}; this run has it as {expected.dtype} {shape}"
    if not isinstance(entry.chunks, list) or not entry.chunks:
        return f"{key} has no chunks"
    for chunk in entry.chunks:
        problem = _chunk_problem(key, chunk, shape)
        if problem:
            return problem
    if sum(math.prod(c.sizes) for c in entry.chunks) != math.prod(shape):
        return f"the chunks of {key} do not cover it once"
    return None


def _storage_problem(folder: Path, metadata: Metadata, expected: dict) -> str | None:
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        return "the metadata has no storage table"
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or index.fqn not in expected:
            return "the storage table names a tensor this run does not have"
        name, offset, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if not (isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")):
            return f"the storage table points outside the folder ({str(name)[:80]!r})"
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
            return f"the storage table has no offset and length in {name}"
        if getattr(info, "transform_descriptors", None):
            return f"the storage table transforms {name}, which secateurs never writes"
        if name not in sizes:
            path = folder / name
            if path.is_symlink() or not path.is_file():
                return f"the shard file {name} is missing"
            sizes[name] = path.stat().st_size
        if offset + length > sizes[name]:
            return f"the shard file {name} is shorter than its table says (truncated?)"
    for key, entry in metadata.state_dict_metadata.items():
        for chunk in entry.chunks:
            if MetadataIndex(key, chunk.offsets) not in storage:
                return f"a chunk of {key} has no data in the storage table"
    return None


def metadata_problem(folder: str | os.PathLike, metadata: Metadata, expected: dict) -> str | None:
    """What in `metadata` does not fit the tensors `expected` ({key: tensor}), or None."""
    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict):
        return "the metadata lists no tensors"
    missing, extra = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    if missing or extra:
        some = ", ".join([*(f"{k} missing" for k in missing[:2]), *(f"{k} unexpected" for k in extra[:2])])
        return f"it holds other tensors than this run's ({len(missing)} missing, {len(extra)} unexpected: {some})"
    for key, tensor in expected.items():
        problem = _tensor_problem(key, entries[key], tensor)
        if problem:
            return problem
    mappings = metadata.planner_data
    names = (isinstance(path, tuple | list) and all(isinstance(p, str | int) for p in path)
             for path in (mappings.values() if isinstance(mappings, dict) else [None]))
    if mappings is not None and not all(names):
        return "the metadata's key table is not a table of names"
    return _storage_problem(Path(folder), metadata, expected)


def _grouped() -> bool:
    """Whether the processes of a group read and write together (else one process alone)."""
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _alone_is_meant():
    """One process reads and writes by design: DCP's warning that it assumes so is not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save(folder: str | os.PathLike, tensors: dict) -> None:
    """Write {key: tensor} (sharded or whole) into `folder` (a collective: every process calls it with
    its own shards of the same keys)."""
    with _alone_is_meant():
        dcp.save(tensors, storage_writer=FileSystemWriter(folder), no_dist=not _grouped())


def check(folder: str | os.PathLike, expected: dict) -> None:
    """Refuse (DamagedShards) shards in `folder` that do not fit the tensors `expected`."""
    problem = metadata_problem(folder, read_metadata(folder), expected)
    if problem:
        raise DamagedShards(problem)


def load(folder: str | os.PathLike, tensors: dict) -> None:
    """Read the checked shards of `folder` into {key: tensor} in place (a collective)."""
    check(folder, tensors)
    try:
        with _alone_is_meant():
            dcp.load(tensors, storage_reader=CheckedReader(folder), no_dist=not _grouped())
    except Exception as exc:  # noqa: BLE001 - an untrusted folder: whatever the reader raises means damaged
        lines = str(exc).strip().splitlines()
        raise DamagedShards(f"its shards cannot be read ({type(exc).__name__}: {(lines or [''])[-1][:160]})") from exc
