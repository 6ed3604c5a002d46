"""Writes reference/cli.md at build time (mkdocs-gen-files): the help of `secateurs` and of every subcommand,
as `secateurs.cli.main.build_parser()` builds them, so the page cannot drift from the parsers."""

from __future__ import annotations

import os

import mkdocs_gen_files

from secateurs.cli.main import build_parser

COLUMNS = "86"  # argparse wraps help at the terminal width ($COLUMNS): a fixed width that fits the page's code blocks

INTRO = """# Command-line reference

Generated from the command line's own parsers (`secateurs.cli.main.build_parser()`) each time the site is
built: what follows is exactly what `secateurs --help` and `secateurs COMMAND --help` print. Every option
has one name, type, default and meaning in every subcommand that takes it.

Exit status: 0 done; 2 refused (one `secateurs: error: ...` line saying what is wrong and what to do; nothing
written); 1 failed (a fault such as a full disk, or an unexpected failure: `--debug` adds the traceback);
130 interrupted by Ctrl-C; 143 terminated by SIGTERM. An interrupted or failed run leaves no partial output.
"""


def page() -> str:
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS
    try:
        return help_page()
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def help_page() -> str:
    parser = build_parser()
    parts = [INTRO, "## secateurs\n", "```text\n" + parser.format_help() + "```\n"]
    for command in parser.commands:
        name = command.prog.removeprefix("secateurs ")
        parts += [f"## secateurs {name}\n", "```text\n" + command.format_help() + "```\n"]
    return "\n".join(parts)


def write() -> None:
    with mkdocs_gen_files.open("reference/cli.md", "w") as out:
        out.write(page())


if __name__ in ("<run_path>", "__main__"):  # mkdocs-gen-files runs it with runpy.run_path
    write()
