"""How a model is exported, declared once: `ExportSettings` is what secateurs.export.export_gguf
writes with and what `secateurs export` builds its --format and --outtype flags from
(secateurs.settings.fields). No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from secateurs.errors import SecateursError
from secateurs.settings.fields import check_choices, from_keywords, option
from secateurs.settings.names import GGUF_OUTTYPES

FORMATS = ("gguf",)


@dataclass(frozen=True)
class ExportSettings:
    """The file format and the encoding of its weights."""

    format: str = option("gguf", "file format (default: {default}, for llama.cpp)", choices=FORMATS)
    outtype: str = option("f32", "weight encoding: f32 (exact), f16, bf16, q8_0 (8-bit blocks); norms and biases stay "
                                 "f32 (default: {default})", choices=GGUF_OUTTYPES)

    def __post_init__(self):
        check_choices(self)

    @classmethod
    def from_keywords(cls, keywords: dict) -> ExportSettings:
        return from_keywords(cls, keywords, "export")

    @classmethod
    def of(cls, settings: ExportSettings | None, **keywords) -> ExportSettings:
        """`settings`, or the settings the keywords given (not None) build; not both."""
        given = {k: v for k, v in keywords.items() if v is not None}
        if settings is None:
            return cls.from_keywords(given)
        if given:
            raise SecateursError(f"pass the export settings either as settings=ExportSettings(...) or as keywords, "
                                 f"not both (got settings and {', '.join(sorted(given))})")
        return settings
