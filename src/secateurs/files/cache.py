"""Where secateurs keeps what it can rebuild but should not rebuild every run: $SECATEURS_CACHE,
or ~/.cache/secateurs. Subfolders: calibration/ ('self' samples), models/ (dequantised GGUF
models). Deleting it costs only time."""

from __future__ import annotations

import os
from pathlib import Path


def root() -> Path:
    value = os.environ.get("SECATEURS_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "secateurs"
