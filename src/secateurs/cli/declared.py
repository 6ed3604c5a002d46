"""Command-line flags generated from settings declarations (secateurs.settings.fields): each field's flag,
help (with its default), type, choices and bounds become one argparse argument, and the parsed values are read
back into the settings' keywords. The one place an argparse Namespace meets a settings class."""

from __future__ import annotations

import argparse
import dataclasses

from secateurs.settings.fields import flags_of, help_of


def generated_fields(cls) -> list[dataclasses.Field]:
    """The fields whose flags the command line takes from the declaration."""
    return [f for f in dataclasses.fields(cls) if flags_of(f) and not f.metadata.get("shared")]


def destination(f: dataclasses.Field) -> str:
    given = f.metadata["argparse"].get("dest")
    return given or flags_of(f)[0][2:].replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser, cls, *, title: str | None = None, suppress: bool = False,
                  defaults: dict | None = None, notes: dict | None = None) -> None:
    """Add the flags of settings class `cls` to `parser`: in a group titled `title` (or each field's
    own group), with type, choices and bounds from the declaration. `suppress`: a flag not given
    leaves no attribute (the library's default applies, and `read_arguments` returns what was given);
    `defaults` replaces some fields' defaults on this parser; `notes` adds a sentence to some helps."""
    defaults, notes, groups = defaults or {}, notes or {}, {}
    for f in generated_fields(cls):
        where = title or f.metadata.get("group")
        if where not in groups:
            groups[where] = parser.add_argument_group(where) if where else parser
        target = groups[where]
        default = defaults.get(f.name, f.default)
        keywords = {k: v for k, v in f.metadata["argparse"].items() if k != "dest"}
        if f.metadata.get("switches"):
            exclusive = target.add_mutually_exclusive_group()
            for flag, (value, help) in f.metadata["switches"].items():
                exclusive.add_argument(flag, dest=destination(f), default=argparse.SUPPRESS if suppress else default,
                                       action="store_const", const=value, help=help)
            continue
        target.add_argument(*flags_of(f), dest=destination(f), default=argparse.SUPPRESS if suppress else default,
                            help=help_of(f, default) + notes.get(f.name, ""), **keywords)


def read_arguments(args: argparse.Namespace, cls) -> dict:
    """{field name: value} of `cls`'s flags found in `args` (with `suppress`: those given)."""
    return {f.name: getattr(args, destination(f)) for f in generated_fields(cls) if hasattr(args, destination(f))}
