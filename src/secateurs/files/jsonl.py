"""Reading user text and jsonl files, with errors that name the file (and line) and say what is wrong."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from secateurs.errors import SecateursError


def decode_utf8(data: bytes, path: str | Path, what: str, error: type[Exception] = SecateursError) -> str:
    """`data` as UTF-8 text, or `error` naming the file, the offset, line and value of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{what} {path} is not UTF-8 text: the first bad byte is at offset {exc.start} (line {line}, "
                    f"byte 0x{data[exc.start]:02x}); convert it to UTF-8") from exc


def read_text_file(path: str | Path, what: str = "text file", error: type[Exception] = SecateursError) -> str:
    """A UTF-8 text file, or a clear refusal (missing, a folder, binary, not UTF-8) as `error`."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} not found: {path}")
    if not path.is_file():
        raise error(f"{what} {path} is not a file")
    data = path.read_bytes()
    if b"\x00" in data:
        raise error(f"{what} {path} is a binary file, not text; give a UTF-8 text or .jsonl file")
    return decode_utf8(data, path, what, error)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (weights of hundreds of MB stay out of memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def iter_jsonl(path: str | Path, what: str = "jsonl file",
               error: type[Exception] = SecateursError) -> Iterator[tuple[int, object]]:
    """(line number, record) for every non-blank line. Lines end at '\n' only, as JSON Lines and editors
    count them (str.splitlines would also break at U+2028 or a form feed, which may stand raw inside a
    JSON string); a leading byte-order mark is dropped."""
    path = Path(path)
    text = read_text_file(path, what, error).removeprefix("\ufeff")
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
