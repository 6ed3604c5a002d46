"""Writes the results pages at build time (mkdocs-gen-files) from whatever benchmarks/results/ holds: an index
of every result, then one page per benchmark script with, for each result, the command that produced it (the
result's own header, else the table in benchmarks/README.md), the machine and its load, and its tables, text
and plots. Nothing of it is committed, so the pages are never older than the results they show."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_README = ROOT / "benchmarks" / "README.md"
KINDS = (".md", ".json", ".txt", ".png")
JSON_LINES_SHOWN = 60  # a JSON result without a Markdown twin is shown up to this many lines
ROW = re.compile(r"^\|\s*(`[^|]*`[^|]*?)\s*\|\s*(.+?)\s*\|\s*$")
SECTION = re.compile(r"^###\s+(.*?)\s*$")
MD_LINES_SHOWN = 150  # longer Markdown results (hundreds of fuzz cases) are cut here, with a pointer to the file
MACHINE_KEYS = ("machine", "machine_at_start", "machine_before")
LOAD_KEYS = ("load_average", "load_average_start", "load_at_start", "load_before", "load_average_before")
LOAD_END_KEYS = ("load_average_end", "load_after", "load_average_after")
LINKED_IMAGE = re.compile(r"(!\[[^\]]*\]\()([^)\s]+\.png)(\))")  # ![alt](a/relative/path.png) in a result


@dataclass
class Result:
    stem: str
    files: dict[str, Path] = field(default_factory=dict)  # suffix -> path
    script: str = "other"
    command: str | None = None


def listed_commands(readme: Path) -> dict[str, tuple[str, str]]:
    """benchmarks/README.md's result tables: file stem -> (script, command as written there)."""
    found, script = {}, None
    if not readme.is_file():
        return found
    for line in readme.read_text(encoding="utf-8").splitlines():
        heading = SECTION.match(line)
        if heading:  # "### NAME.py" lists that script's results; any other "###" section, other results
            script = heading.group(1).strip("`") if heading.group(1).strip("`").endswith(".py") else "other"
            continue
        row = ROW.match(line)
        if script is None or not row:
            continue
        names = re.findall(r"`([^`]+)`", row.group(1))
        for name in names:
            if not name.startswith(".") and "{" not in name:
                found.setdefault(Path(name).stem, (script, row.group(2)))
    return found


def script_of(stem: str, scripts: list[str]) -> str:
    """The benchmark script whose name starts the result's name (the longest such), else 'other'."""
    matches = [s for s in scripts if stem.startswith(s.removesuffix(".py"))]
    return max(matches, key=len) if matches else "other"


def collect(results: Path, readme: Path) -> list[Result]:
    listed = listed_commands(readme)
    scripts = sorted(p.name for p in results.parent.glob("*.py"))
    by_stem: dict[str, Result] = {}
    for path in sorted(results.iterdir()):
        if path.is_file() and path.suffix in KINDS:
            by_stem.setdefault(path.stem, Result(path.stem)).files[path.suffix] = path
    for result in by_stem.values():
        script, command = listed.get(result.stem, (script_of(result.stem, scripts), None))
        result.script, result.command = script, command
        data = read_json(result)
        header = data.get("header") if isinstance(data, dict) else None
        if isinstance(header, dict) and header.get("command"):
            result.command = f"`{header['command']}`"
    return sorted(by_stem.values(), key=lambda r: (r.script, r.stem))


def read_json(result: Result):
    path = result.files.get(".json")
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _load(values) -> str | None:
    if isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values):
        return ", ".join(f"{v:.2f}" for v in values)
    return None


def machine(data) -> str | None:
    """One line: CPU, cores, torch threads, load average at the start (and end), date; None when the JSON
    records none of it."""
    if not isinstance(data, dict):
        return None
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    header = data.get("header") if isinstance(data.get("header"), dict) else {}
    m = next((d[k] for d in (header, data, meta) for k in MACHINE_KEYS if isinstance(d.get(k), dict)), {})
    scopes = (m, data, meta)
    parts = []
    cpu = next((d["cpu"] for d in scopes if isinstance(d.get("cpu"), str)), None)
    cores = next((d[k] for d in scopes for k in ("cpu_count", "cores", "cpus", "cores_in_affinity") if k in d), None)
    threads = next((d[k] for d in scopes for k in ("torch_threads", "threads") if isinstance(d.get(k), int)), None)
    if cpu:
        parts.append(cpu)
    if cores:
        parts.append(f"{cores} cores")
    if threads:
        parts.append(f"torch threads {threads}")
    start = next((_load(d[k]) for d in scopes for k in LOAD_KEYS if _load(d.get(k))), None)
    ends = [data.get("machine_at_end"), data.get("machine_after")]
    end = next((_load(d[k]) for d in scopes for k in LOAD_END_KEYS if _load(d.get(k))), None) or next(
        (_load(d.get("load_average")) for d in ends if isinstance(d, dict) and _load(d.get("load_average"))), None)
    if start:
        parts.append(f"load average {start} at the start" + (f", {end} at the end" if end else ""))
    date = next((d["date"] for d in scopes if isinstance(d.get("date"), str)), None)
    if date:
        parts.append(date)
    return "; ".join(parts) or None


def demoted(markdown: str) -> str:
    """The result's Markdown with its own headings as bold lines: they sit under the result's heading and stay
    out of the page's table of contents."""
    out, fenced = [], False
    for line in markdown.splitlines():
        fenced ^= line.startswith("```")
        heading = None if fenced else re.match(r"#{1,6} +(.*?)\s*#*\s*$", line)
        out.append(f"**{heading.group(1)}**" if heading else line)
    return "\n".join(out).strip()


def shown_markdown(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) <= MD_LINES_SHOWN:
        return demoted("\n".join(lines))
    return (demoted("\n".join(lines[:MD_LINES_SHOWN])) + f"\n\n*({len(lines) - MD_LINES_SHOWN:,} more lines in "
            f"`benchmarks/results/{path.name}`.)*")


def with_images(markdown: str, folder: Path, image_path) -> str:
    """The result's Markdown with each PNG it links (a path relative to its folder, inside that folder) copied
    into the site under a name that keeps its subfolder; a link to anything else is left as written."""
    def link(m: re.Match) -> str:
        png = (folder / m.group(2)).resolve()
        if not png.is_file() or not png.is_relative_to(folder.resolve()):
            return m.group(0)
        return m.group(1) + image_path(png, m.group(2).replace("/", "-")) + m.group(3)

    return LINKED_IMAGE.sub(link, markdown)


def json_excerpt(data) -> str:
    lines = json.dumps(data, indent=1, ensure_ascii=False).splitlines()
    shown = "\n".join(lines[:JSON_LINES_SHOWN])
    more = f"\n... ({len(lines) - JSON_LINES_SHOWN:,} more lines in the file)" if len(lines) > JSON_LINES_SHOWN else ""
    return f'??? note "JSON ({len(lines):,} lines)"\n\n    ```json\n' + _indent(shown + more) + "\n    ```\n"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def section(result: Result, image_path) -> str:
    names = ", ".join(f"`benchmarks/results/{p.name}`" for p in result.files.values())
    data = read_json(result)
    where = machine(data) or ("as the result's text below records it" if ".md" in result.files or ".txt" in
                              result.files else "not recorded")
    command = result.command or "not listed in `benchmarks/README.md`"
    parts = [f"## {result.stem}\n", f"Files: {names}\n", f"Command: {command}\n", f"Machine: {where}\n"]
    if ".md" in result.files:
        md = result.files[".md"]
        parts.append(with_images(shown_markdown(md), md.parent, image_path) + "\n")
    if ".txt" in result.files:
        text = result.files[".txt"].read_text(encoding="utf-8").rstrip()
        parts.append('??? abstract "Console output"\n\n    ```text\n' + _indent(text) + "\n    ```\n")
    if ".json" in result.files and ".md" not in result.files and data is not None:
        parts.append(json_excerpt(data))
    if ".png" in result.files:
        parts.append(f"![{result.stem}]({image_path(result.files['.png'])})\n")
    return "\n".join(parts)


def page_name(script: str) -> str:
    return script.removesuffix(".py").replace("_", "-")


def index(results: list[Result]) -> str:
    parts = [INDEX_INTRO]
    for script in sorted({r.script for r in results}):
        title = f"`{script}`" if script != "other" else "other results"
        parts += [f"## [{title}]({page_name(script)}.md)\n", "| result | machine and load |", "| --- | --- |"]
        parts += [f"| [{r.stem}]({page_name(r.script)}.md#{anchor(r.stem)}) | "
                  f"{(machine(read_json(r)) or 'recorded in the result').replace('|', '/')} |"
                  for r in results if r.script == script]
        parts.append("")
    return "\n".join(parts)


def anchor(stem: str) -> str:
    """The heading id Python-Markdown's toc extension gives `## stem`."""
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", stem).strip().lower())


INDEX_INTRO = """# Results

Every measurement in `benchmarks/results/`, as the benchmark scripts wrote it. These pages are generated from
those files each time the site is built (`docs/gen_results.py`): a new result file appears here by itself.
Each entry gives the command that produced it (the command the result records in its header, else the one
`benchmarks/README.md` lists for it, where a command *reconstructed from the recorded settings* is marked so),
the machine and its load average, then the result itself. Most were measured on a 2-core CPU shared with other
work; read speed numbers beside the load they name. The guides quote these results where they matter: see
[choose a method](../guide/choose-a-method.md) and [recover](../guide/recover.md).

"""


def pages(results_dir: Path = RESULTS, readme: Path = BENCHMARKS_README) -> tuple[dict[str, str], dict[str, Path]]:
    """Page path (under results/) -> Markdown, and image path (under results/) -> the PNG to copy."""
    results = collect(results_dir, readme)
    images: dict[str, Path] = {}

    def image_path(png: Path, name: str | None = None) -> str:
        images[f"results/img/{name or png.name}"] = png
        return f"img/{name or png.name}"

    scripts = sorted({r.script for r in results})
    out = {}
    for script in scripts:
        title = f"# Results of `{script}`\n\n" if script != "other" else "# Other results\n\n"
        out[f"results/{page_name(script)}.md"] = title + "\n".join(
            section(r, image_path) for r in results if r.script == script)
    out["results/index.md"] = index(results)
    return out, images


def write() -> None:
    texts, images = pages()
    for path, text in texts.items():
        with mkdocs_gen_files.open(path, "w") as out:
            out.write(text)
    for path, png in images.items():
        with mkdocs_gen_files.open(path, "wb") as out:
            out.write(png.read_bytes())


if __name__ in ("<run_path>", "__main__"):  # mkdocs-gen-files runs it with runpy.run_path
    write()
