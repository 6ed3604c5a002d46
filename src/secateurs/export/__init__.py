"""Exports to serving formats: GGUF for llama.cpp (secateurs.export.gguf_export), with its settings
(secateurs.export.settings.ExportSettings). The public names are imported on first use, so that the
command line's parsers read ExportSettings without paying for torch."""

from importlib import import_module

_PUBLIC = {"ExportSettings": "secateurs.export.settings", "OUTTYPES": "secateurs.export.gguf_export",
           "export_gguf": "secateurs.export.gguf_export", "plan_export": "secateurs.export.gguf_export"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'secateurs.export' has no attribute {name!r}")
