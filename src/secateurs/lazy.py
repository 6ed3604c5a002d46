"""Public names a package imports on first use (PEP 562): a package's table says where each of its names
lives, so that `import secateurs.cli` and the command line's parsers load without torch, and a name is
imported only by the code that asks for it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module


def lazy_names(package: str, table: dict[str, str]) -> Callable[[str], object]:
    """The module `__getattr__` of `package`: `table` maps a public name to the module defining it; the
    value is imported when first asked for, then kept in the package."""

    def __getattr__(name: str) -> object:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(table[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
