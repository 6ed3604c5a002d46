"""Writes reference/api.md at build time (mkdocs-gen-files): the public names of `secateurs` (its `_PUBLIC`
table) and of `secateurs.pipeline` (its `_EXPORTS` table), read from the two `__init__.py` files without
importing them, each rendered by mkdocstrings from its docstring. A name added to either table appears here."""

from __future__ import annotations

import ast
from pathlib import Path

import mkdocs_gen_files

SRC = Path(__file__).resolve().parents[1] / "src" / "secateurs"


LAZY_TABLES = ("_PUBLIC", "_EXPORTS")  # the packages' tables of names imported on first use


def source_of(module: str) -> Path:
    path = SRC.parent.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def table(module: str) -> dict[str, str]:
    """A package's table of lazily imported names (public name -> full module name), {} without one."""
    for node in ast.parse(source_of(module).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) in LAZY_TABLES for t in node.targets):
            names = ast.literal_eval(node.value)
            return {k: v if v.startswith("secateurs") else f"{module}.{v}" for k, v in names.items()}
    return {}


def defining_module(module: str, name: str) -> str:
    """The module whose code defines `name`, following lazy tables and `from X import name` re-exports, so
    that mkdocstrings (which reads the code without importing it) finds the object."""
    tree = ast.parse(source_of(module).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return module
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == name for a in node.names):
            return defining_module(node.module, name)
    lazy = table(module)
    if name in lazy:
        return defining_module(lazy[name], name)
    return module


INTRO = """# Python API

The names `import secateurs` offers, then the stages of `secateurs.pipeline`. Every entry below is rendered
from the code's own docstrings when the site is built. `secateurs` imports each name on first use, so
`import secateurs` alone does not import torch: `secateurs.prune`, `secateurs.recover`, `secateurs.PruneJob`
and the rest below are all reached as attributes of the package.

Models are loaded with `secateurs.storage.loading.load_model(source)`: a folder, a `.gguf` file, a hub id or
an alias (`smollm2`, `gemma3-270m`); it returns `(model, tokenizer)`.
"""


def page() -> str:
    top = {name: defining_module(module, name) for name, module in table("secateurs").items()}
    stages = {name: defining_module(module, name) for name, module in table("secateurs.pipeline").items()}
    parts = [INTRO, "## secateurs\n"]
    parts += [entry(module, name) for name, module in top.items()]
    parts.append("## secateurs.pipeline\n\nA run is a list of stages; `secateurs.pipeline.run` checks every "
                 "stage (options, data, the outputs it claims) before any executes, then runs them in order.\n")
    parts += [entry(module, name) for name, module in sorted(stages.items()) if top.get(name) != module]
    return "\n".join(parts)


def entry(module: str, name: str) -> str:
    return f"::: {module}.{name}\n    options:\n      heading_level: 3\n"


def write() -> None:
    with mkdocs_gen_files.open("reference/api.md", "w") as out:
        out.write(page())


if __name__ in ("<run_path>", "__main__"):  # mkdocs-gen-files runs it with runpy.run_path
    write()
