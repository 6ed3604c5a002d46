"""The cache of 'self' calibration samples: text sampled from a model is the slow part of the
default calibration, and for one model, seed and size it is always the same, so it is sampled
once and read back afterwards.

Files live in $SECATEURS_CACHE/calibration (default ~/.cache/secateurs/calibration), one JSON file
per (model identity, seed, num_samples, max_length, start token, sampler), written atomically through
secateurs.files.output. A file is trusted only when every recorded field matches the request and the
samples are exactly num_samples lists of max_length integer token ids in [0, vocab); anything else
(corrupt, truncated, another model's, hand-edited) is ignored with a warning and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from secateurs.files.cache import root
from secateurs.files.output import write_file

log = logging.getLogger("secateurs")
FORMAT = "secateurs-self-calibration"
VERSION = 1


def folder() -> Path:
    return root() / "calibration"


def path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return folder() / f"self-{key['model']}-{digest}.json"


def _valid(data, key: dict, vocab: int) -> bool:
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        return False
    if data.get("key") != key:
        return False
    samples = data.get("samples")
    if not isinstance(samples, list) or len(samples) != key["num_samples"]:
        return False
    return all(isinstance(s, list) and len(s) == key["max_length"]
               and all(type(t) is int and 0 <= t < vocab for t in s) for s in samples)


def read(key: dict, vocab: int) -> list[list[int]] | None:
    """The cached samples for `key`, or None (missing, or not trustworthy: then it is rewritten)."""
    file = path(key)
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not _valid(data, key, vocab):
        log.warning("secateurs: WARNING: ignoring the calibration cache file %s (corrupt, or not made for this model "
                    "and these settings); sampling again and rewriting it", file)
        return None
    return data["samples"]


def write(key: dict, samples: list[list[int]]) -> Path | None:
    """Store the samples; a cache that cannot be written costs only the next run's time, so it warns."""
    file = path(key)
    try:
        return write_file(file, json.dumps({"format": FORMAT, "version": VERSION, "key": key, "samples": samples}))
    except OSError as exc:
        log.warning("secateurs: WARNING: could not write the calibration cache %s (%s); the next run samples again",
                    file, exc.strerror or exc)
        return None
