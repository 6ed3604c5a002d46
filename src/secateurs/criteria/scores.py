"""StructureScores: per-layer importance of every query head and MLP neuron.

Scores are kept apart from plans so one scoring pass serves many ratios; they save to
safetensors with their description in the metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from secateurs.files.output import writing_file


@dataclass
class StructureScores:
    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    description: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        tensors = {f"heads.{i}": t.float().contiguous() for i, t in enumerate(self.heads)}
        tensors.update({f"neurons.{i}": t.float().contiguous() for i, t in enumerate(self.neurons)})
        with writing_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"description": json.dumps(self.description)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> StructureScores:
        with safe_open(str(path), "pt") as f:
            description = json.loads(f.metadata().get("description", "{}"))
        tensors = load_file(str(path))
        n = sum(1 for k in tensors if k.startswith("heads."))
        return cls(
            heads=[tensors[f"heads.{i}"] for i in range(n)],
            neurons=[tensors[f"neurons.{i}"] for i in range(n)],
            description=description,
        )
