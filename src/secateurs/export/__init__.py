"""Exports to serving formats: GGUF for llama.cpp (secateurs.export.gguf_export)."""

from secateurs.export.gguf_export import OUTTYPES, export_gguf, plan_export

__all__ = ["OUTTYPES", "export_gguf", "plan_export"]
