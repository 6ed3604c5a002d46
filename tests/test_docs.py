"""The documentation runs: every shell and Python block of README.md and docs/**/*.md is executed here, page
by page and in order (each page in its own working folder, its Python blocks sharing one namespace), on the
tiny stories260K model and the small texts in tests/data. A block that cannot run here carries, on the line
before it, `<!-- needs: WHAT, because WHY -->`, and every block that is not run must carry one.

The examples are written for real names, which this test maps to the tiny assets (NAMES below): `smollm2`
(SmolLM2-135M) -> tests/data/stories260K-hf, `c4.jsonl` -> the C4 excerpt, `wiki.test.raw` -> the WikiText-2
excerpt, `commonsense` -> the task excerpts. A shell block runs line by line (a trailing backslash continues a
line, `#` starts a comment); every command must be `secateurs ...`, run in this process through
`secateurs.cli.main.main` and expected to exit 0.

The generated pages are checked too: the results pages take every file in benchmarks/results/ (and a new
one, with its header, plot and all), and the command-line reference holds every subcommand's help."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import C4_HEAD, STORIES, TASKS, WIKITEXT_HEAD

import secateurs
from secateurs.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NAMES = {"smollm2": STORIES, "c4.jsonl": C4_HEAD, "wiki.test.raw": WIKITEXT_HEAD, "commonsense": TASKS}
SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w-]*)")
NEEDS = re.compile(r"^\s*<!--\s*needs:\s*(?P<what>\S.*?),?\s+because\s+(?P<why>\S.*?)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    needs: re.Match | None  # the `<!-- needs: ... -->` mark on the line before, if any

    def __str__(self):
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.lang})"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page (indented ones in lists and admonitions too)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening.group("indent"), opening.group("fence")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)), len(lines))
        code = "\n".join(line[len(indent):] for line in lines[i + 1:end])
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        found.append(Block(page, i + 1, opening.group("lang").lower(), code, NEEDS.match(before)))
        i = end + 1
    return found


def runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.lang in SHELL | PYTHON]


def mapped(code: str) -> str:
    """The example with its real names replaced by the tiny assets' paths."""
    for name, path in NAMES.items():
        code = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w-])", str(path), code)
    return code


def shell_commands(code: str) -> list[list[str]]:
    joined = re.sub(r"\\\n", " ", code)
    return [argv for argv in (shlex.split(line, comments=True) for line in joined.splitlines()) if argv]


def run_shell(block: Block) -> None:
    for argv in shell_commands(mapped(block.code)):
        assert argv[0] == "secateurs", (f"{block}: `{shlex.join(argv)}` is not a secateurs command; run it here "
                                        "or mark the block `<!-- needs: ..., because ... -->`")
        try:
            code = main(argv[1:])
        except SystemExit as exit_:  # argparse's own exits (--help, a refused option)
            code = exit_.code
        assert code in (0, None), f"{block}: `{shlex.join(argv)}` exited {code}"


def run_python(block: Block, namespace: dict) -> None:
    exec(compile(mapped(block.code), str(block), "exec"), namespace)  # noqa: S102 - the page's own example


PAGES_WITH_EXAMPLES = [p for p in PAGES if any(b.needs is None for b in runnable(p))]


def test_the_names_the_examples_use_exist():
    assert all(path.exists() for path in NAMES.values())


def test_every_block_that_is_not_run_says_what_it_needs_and_why():
    """A shell or Python block is run unless marked; a mark names what the block needs and why. Blocks in
    other languages (text, json, yaml) are output or data, never run."""
    unmarked_bad, marks = [], 0
    for page in PAGES:
        for block in runnable(page):
            if block.needs:
                marks += 1
                assert block.needs.group("what") and block.needs.group("why"), block
            elif block.lang in SHELL:
                commands = shell_commands(block.code)
                unmarked_bad += [f"{block}: {argv[0]}" for argv in commands if argv[0] != "secateurs"]
    assert unmarked_bad == [] and marks > 0


def test_the_readme_keeps_its_two_commands_at_the_top():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = blocks(ROOT / "README.md")[0]
    assert readme.count("\n") <= 250
    assert first.code.index("secateurs demo --out runs/demo --force") < first.code.index(
        'pip install -r requirements-ci.txt -e ".[dev]" && ruff check && python -m pytest -n auto')


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_examples_of_the_page_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__docs__"}
    for block in runnable(page):
        if block.needs is None:
            run_shell(block) if block.lang in SHELL else run_python(block, namespace)


# -- the generated pages --------------------------------------------------------------------------------------


def load_script(name: str):
    pytest.importorskip("mkdocs_gen_files", reason="the generators run under mkdocs: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # defines page()/pages(); writes nothing outside `mkdocs build`
    return module


def test_the_results_pages_show_every_result_file():
    texts, _ = load_script("gen_results").pages()
    everything = "\n".join(texts.values())
    results = ROOT / "benchmarks" / "results"
    missing = [p.name for p in sorted(results.iterdir()) if p.is_file() and p.suffix in (".md", ".json", ".txt")
               and f"benchmarks/results/{p.name}" not in everything]
    assert missing == []
    assert "results/index.md" in texts and "results/recovery.md" in texts


def test_the_results_pages_take_a_new_result_with_its_command_machine_and_plot(tmp_path):
    """A result the index has never seen (as the benchmark scripts write them: a JSON with its header, its
    Markdown, a plot, a plot its Markdown links) gets its section with the command from its header and the load it
    records."""
    gen = load_script("gen_results")
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (tmp_path / "benchmarks" / "newbench.py").write_text("")
    header = {"command": "python benchmarks/newbench.py --fast", "secateurs": "0.1.0",
              "machine": {"cpu": "Some CPU", "cpu_count": 4, "torch_threads": 4, "load_average": [0.5, 0.25, 0.1],
                          "date": "2026-12-05T10:00:00+00:00"}}
    (results / "newbench_small.json").write_text(json.dumps({"header": header, "rows": []}))
    (results / "newbench_small.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (results / "newbench_rows").mkdir()
    (results / "newbench_rows" / "row.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "benchmarks" / "newbench.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # outside the results folder
    (results / "newbench_small.md").write_text("# New bench\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n"
                                               "![a row](newbench_rows/row.png)\n![gone](newbench_rows/gone.png)\n"
                                               "![outside](../newbench.png)\n")
    (results / "orphan.json").write_text(json.dumps({"x": 1}))
    texts, images = gen.pages(results, tmp_path / "benchmarks" / "README.md")
    page = texts["results/newbench.md"]
    assert "Command: `python benchmarks/newbench.py --fast`" in page
    assert "Some CPU; 4 cores; torch threads 4; load average 0.50, 0.25, 0.10 at the start" in page
    assert "**New bench**" in page and "| 1 | 2 |" in page and "![newbench_small](img/newbench_small.png)" in page
    assert "![a row](img/newbench_rows-row.png)" in page  # a plot the Markdown links, copied with its folder
    assert "![gone](newbench_rows/gone.png)" in page and "![outside](../newbench.png)" in page  # left as written
    assert images == {"results/img/newbench_small.png": results / "newbench_small.png",
                      "results/img/newbench_rows-row.png": (results / "newbench_rows" / "row.png").resolve()}
    assert "not listed in `benchmarks/README.md`" in texts["results/other.md"]
    assert "[newbench_small](newbench.md#newbench_small)" in texts["results/index.md"]


def test_the_cli_reference_holds_every_subcommands_help():
    page = load_script("gen_cli").page()
    for command in build_parser().commands:
        assert f"## {command.prog}\n" in page
        assert command.format_help().splitlines()[0] in page


def test_the_api_reference_lists_every_public_name():
    gen = load_script("gen_api")
    page = gen.page()
    for name in secateurs.__all__:
        if name != "__version__":
            assert re.search(rf"^::: secateurs\.[\w.]+\.{name}$", page, re.M), name
    assert "::: secateurs.pipeline.stages.Recover" in page and "::: secateurs.planning.plan.PruningPlan" in page
