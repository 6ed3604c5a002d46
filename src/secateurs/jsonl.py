"""Reading user text and jsonl files, with errors that name the file (and line) and say what is wrong."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from secateurs.errors import SecateursError


def read_text_file(path: str | Path, what: str = "text file") -> str:
    """A UTF-8 text file, or a clear refusal (missing, a folder, binary, not UTF-8)."""
    path = Path(path)
    if not path.exists():
        raise SecateursError(f"{what} not found: {path}")
    if not path.is_file():
        raise SecateursError(f"{what} {path} is not a file")
    data = path.read_bytes()
    if b"\x00" in data:
        raise SecateursError(f"{what} {path} is a binary file, not text; give a UTF-8 text or .jsonl file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SecateursError(f"{what} {path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from exc


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (weights of hundreds of MB stay out of memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, record) for every non-blank line."""
    path = Path(path)
    for number, line in enumerate(read_text_file(path, "jsonl file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise SecateursError(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
