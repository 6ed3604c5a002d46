"""Pruning methods: each turns a model (+ data) into a PruningPlan; `prune` applies it. One file per
method (amp, wanda_sp, magnitude, random, flap, harp; depth.py holds consensus and the depth
baselines), the shared parts in base.py (the protocol) and width.py, every method's options in
options.py (without torch, for the command line), all of them in registry.py.

The names below are imported on first use, so that `secateurs.methods.options` loads without torch."""

from __future__ import annotations

from secateurs.lazy import lazy_names

_EXPORTS = {"make_plan": "api", "prune": "api", "reconstruction_for": "api", "METHODS": "registry",
            "get_method": "registry"}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_names(__name__, {k: f"secateurs.methods.{v}" for k, v in _EXPORTS.items()})
