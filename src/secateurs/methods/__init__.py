"""Pruning methods: each turns a model (+ data) into a PruningPlan; `prune` applies it. One file per
method (amp, wanda_sp, magnitude, random, flap, harp; depth.py holds consensus and the depth
baselines), the shared parts in base.py (the protocol) and width.py, all of them in registry.py."""

from secateurs.methods.api import make_plan, prune, reconstruction_for
from secateurs.methods.registry import METHODS, get_method

__all__ = ["METHODS", "get_method", "make_plan", "prune", "reconstruction_for"]
