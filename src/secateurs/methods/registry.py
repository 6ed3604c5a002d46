"""Every method by name: one class per method, one file per method (depth methods share depth.py).
To add a method: write its file (a Method subclass, or a ScoredWidthMethod with a `score`), add it
here and its name to secateurs.settings.names (the CLI's choices, kept without torch)."""

from __future__ import annotations

from secateurs.errors import SecateursError
from secateurs.methods.amp import Amp, AmpHeads, AmpMlp
from secateurs.methods.base import Method
from secateurs.methods.depth import DEPTH_METHODS
from secateurs.methods.flap import Flap
from secateurs.methods.harp import Harp
from secateurs.methods.magnitude import Magnitude
from secateurs.methods.random import Random
from secateurs.methods.search import Search
from secateurs.methods.wanda_sp import WandaSp, WandaSpHeads

METHODS: dict[str, Method] = {m.name: m() for m in (Amp, AmpHeads, AmpMlp, WandaSp, WandaSpHeads, Flap, Magnitude,
                                                       Random, Harp, Search)}
METHODS.update(DEPTH_METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise SecateursError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
