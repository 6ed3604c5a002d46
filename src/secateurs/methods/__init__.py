"""Pruning methods: each turns a model (+ data) into a PruningPlan; `prune` applies it."""

from secateurs.methods.api import METHODS, make_plan, prune, reconstruction_for

__all__ = ["METHODS", "make_plan", "prune", "reconstruction_for"]
