"""Exports to serving formats: GGUF for llama.cpp (secateurs.export.gguf_export), with its settings
(secateurs.export.settings.ExportSettings). The public names are imported on first use, so that the
command line's parsers read ExportSettings without paying for torch."""

from secateurs.lazy import lazy_names

_PUBLIC = {"ExportSettings": "secateurs.export.settings", "OUTTYPES": "secateurs.export.gguf_export",
           "export_gguf": "secateurs.export.gguf_export", "plan_export": "secateurs.export.gguf_export"}

__all__ = sorted(_PUBLIC)


__getattr__ = lazy_names(__name__, _PUBLIC)
