"""Settings declared once: a frozen dataclass whose fields carry their flag, help and argparse type
(`option(...)`). From that one declaration the library builds the object from keywords (unknown ones
refused, `from_keywords`), checks every bounded value with the same words the command line uses
(`check_declared`), and the command line builds its flags from it (secateurs.cli.declared). No torch or
argparse here.

A field's help may hold `{default}` (with a format spec, `{default:g}`): the default is written there.
Otherwise the help gets " (default: X)" appended, unless the default is None or False, the field is a
switch, or the help already words its default itself (it says "default").
"""

from __future__ import annotations

import dataclasses
from typing import Any

from secateurs.errors import SecateursError
from secateurs.settings.values import Number


def option(default: Any, help: str, flag: str | tuple[str, ...] | None = "", *, group: str | None = None,
           unset: str | None = None, switches: dict[str, tuple[Any, str]] | None = None, shared: bool = False,
           **argparse_keywords) -> Any:
    """A dataclass field that is also a command-line flag. `flag` '' derives it from the field's name
    (--round-to for round_to), a tuple gives aliases (the first is the name), None keeps the setting
    library-only. `group`: the --help group it appears in; `unset`: how the help names a None default;
    `switches`: {flag: (value, help)}, mutually exclusive flags that each store one value (--lora,
    --full); `shared`: the flag is the command's own (e.g. --seed, which also seeds calibration), read
    by the caller, never added here. The other keywords go to argparse's add_argument."""
    metadata = {"flag": flag, "help": help, "argparse": argparse_keywords, "group": group, "unset": unset,
                "switches": switches, "shared": shared}
    return dataclasses.field(default=default, metadata=metadata)


def flags_of(f: dataclasses.Field) -> tuple[str, ...]:
    """Every spelling of a field's flag (its switches for a switch field); () when library-only."""
    if f.metadata.get("switches"):
        return tuple(f.metadata["switches"])
    flag = f.metadata.get("flag", None)
    if flag == "":
        return ("--" + f.name.replace("_", "-"),)
    if flag is None:
        return ()
    return (flag,) if isinstance(flag, str) else tuple(flag)


def flag_of(f: dataclasses.Field) -> str | None:
    """A field's flag (its first spelling), or None for a library-only field."""
    flags = flags_of(f)
    return flags[0] if flags else None


def label(f: dataclasses.Field) -> str:
    """How messages name a setting: its keyword, and its flag when it has one."""
    flags = flags_of(f)
    return f"{f.name} ({'/'.join(flags)})" if flags else f.name


def help_of(f: dataclasses.Field, default: Any = dataclasses.MISSING) -> str:
    """A field's help with its default stated (see the module's docstring)."""
    default = f.default if default is dataclasses.MISSING else default
    text = f.metadata["help"]
    shown = f.metadata.get("unset") if default is None else default
    if "{default" in text:
        return text.format(default=shown)
    quiet = f.metadata["argparse"].get("action") or shown is None or shown is False or "default" in text
    return text if quiet else f"{text} (default: {shown})"


def from_keywords(cls, keywords: dict, what: str):
    """`cls(**keywords)`, refusing a keyword that is not one of its settings, with the valid ones named."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k for k in keywords if k not in names)
    if unknown:
        raise SecateursError(f"unknown {what} setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the "
                             f"{what} settings are: {', '.join(names)}")
    return cls(**keywords)


def check_declared(settings, skip: tuple[str, ...] = ()) -> None:
    """Refuse a value outside its declared bounds (fields typed with a settings.values.Number), with
    the words the command line uses for the same bound; None passes (an unset optional setting)."""
    for f in dataclasses.fields(settings):
        kind = f.metadata.get("argparse", {}).get("type")
        value = getattr(settings, f.name)
        if isinstance(kind, Number) and value is not None and f.name not in skip:
            kind.check(label(f), value)


def check_choices(settings) -> None:
    """Refuse a value that is not among its field's declared choices (None passes)."""
    for f in dataclasses.fields(settings):
        choices = f.metadata.get("argparse", {}).get("choices")
        value = getattr(settings, f.name)
        if choices is not None and value is not None and value not in choices:
            raise SecateursError(f"{label(f)} {value!r}: choose one of {', '.join(map(str, choices))}")
