"""Reading jsonl files with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from secateurs.errors import SecateursError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, record) for every non-blank line."""
    path = Path(path)
    if not path.exists():
        raise SecateursError(f"jsonl file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise SecateursError(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
