"""Importance criteria: each returns StructureScores (higher = more important)."""

from secateurs.criteria.scores import StructureScores

__all__ = ["StructureScores"]
