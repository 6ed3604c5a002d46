"""Reports: one Markdown + HTML page per pruning run (plan summary, per-layer plots, importance
heatmap, before/after metrics), and sweep plots of perplexity and accuracy against ratio.

Pages are built as a list of blocks rendered twice (Markdown and a small self-contained HTML
template), so both say the same thing without a Markdown converter. Plots are PNGs from
matplotlib (the `plots` extra) with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from secateurs.errors import SecateursError
from secateurs.files.output import write_file, write_folder
from secateurs.planning.plan import PLAN_FILENAME, PruningPlan, read_json_file

SCORE_FILES = ("importance_scores.safetensors", "scores.safetensors")


# -- blocks -> Markdown / HTML ---------------------------------------------------------------
def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *body in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + body[0])
        elif kind == "p":
            out.append(body[0])
        elif kind == "table":
            header, rows = body
            out.append("| " + " | ".join(map(_md_cell, header)) + " |")
            out.append("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
            out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
        elif kind == "img":
            out.append(f"![{body[1]}]({body[0]})")
        elif kind == "pre":
            out.append("```\n" + body[0].rstrip("\n") + "\n```")
        out.append("")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em}"
        "td:not(:first-child){text-align:right}th{background:#f3f3f3}img{max-width:100%}"
        "pre{background:#f6f6f6;padding:1em;overflow-x:auto}")


def render_html(blocks: list[tuple], title: str) -> str:
    esc = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for kind, *body in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{esc(body[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{esc(body[0]).replace('`', '')}</p>")
        elif kind == "table":
            header, rows = body
            out.append("<table><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</table>")
        elif kind == "img":
            out.append(f"<p><img src='{esc(body[0])}' alt='{esc(body[1])}'></p>")
        elif kind == "pre":
            out.append(f"<pre>{esc(body[0])}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_page(blocks: list[tuple], out_dir: Path, stem: str, title: str) -> dict[str, Path]:
    md, page = out_dir / f"{stem}.md", out_dir / f"{stem}.html"
    write_file(md, render_markdown(blocks))
    write_file(page, render_html(blocks, title))
    return {"markdown": md, "html": page}


# -- plots ------------------------------------------------------------------------------------
def _plt():
    try:
        import matplotlib  # noqa: PLC0415 (optional: the plots extra)
    except ImportError as exc:
        raise SecateursError('plots need matplotlib: pip install "secateurs[plots]"') from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (optional: the plots extra)

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plan_arrays(plan) -> dict:
    """Per layer of the base model: base and kept heads / KV heads / neurons, and a layer x head
    kept mask (removed layers keep nothing)."""
    rows = {"layer": [], "heads": [], "kept_heads": [], "kv_heads": [], "kept_kv_heads": [], "neurons": [],
            "kept_neurons": [], "removed": [], "head_mask": []}
    for lp in plan.layers:
        h, kv, n = plan.layer_shape(lp.index)
        if lp.removed:
            kept_h, kept_kv, kept_n = [], [], []
        else:
            kept_h, kept_kv, kept_n = plan.resolve_layer(lp)
        for key, value in (("layer", lp.index), ("heads", h), ("kept_heads", len(kept_h)), ("kv_heads", kv),
                           ("kept_kv_heads", len(kept_kv)), ("neurons", n), ("kept_neurons", len(kept_n)),
                           ("removed", lp.removed), ("head_mask", [i in set(kept_h) for i in range(h)])):
            rows[key].append(value)
    return rows


def plot_kept_per_layer(plan, path: Path) -> Path:
    """Bars of kept query heads and kept MLP neurons per layer, against the base model's."""
    plt = _plt()
    a = plan_arrays(plan)
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.28 * len(a["layer"]) + 3), 5.5), sharex=True)
    for ax, base, kept, name in ((axes[0], "heads", "kept_heads", "query heads"),
                                 (axes[1], "neurons", "kept_neurons", "MLP neurons")):
        ax.bar(a["layer"], a[base], color="#dddddd", label="base model")
        ax.bar(a["layer"], a[kept], color="#2a7ab9", label="kept")
        for i, removed in zip(a["layer"], a["removed"]):
            if removed:
                ax.text(i, 0, "x", ha="center", va="bottom", color="#c0392b", fontweight="bold")
        ax.set_ylabel(name)
        ax.legend(loc="lower right", fontsize=8)
    axes[1].set_xlabel("layer (x = layer removed)")
    axes[0].set_title("kept structures per layer")
    return _save(plt, fig, path)


def plot_head_heatmap(plan, path: Path, scores=None) -> Path:
    """Layer x head heatmap of importance scores (normalised per layer to [0, 1], since score
    scales differ between layers), removed heads crossed out; without scores, the kept mask."""

    plt = _plt()
    a = plan_arrays(plan)
    width = max(a["heads"])
    grid = np.full((len(a["layer"]), width), np.nan)
    if scores is not None:
        for i, s in enumerate(scores.heads):
            v = s.float().numpy()
            span = v.max() - v.min()
            grid[i, :len(v)] = (v - v.min()) / span if span > 0 else 1.0
        crit = (scores.description or {}).get("criterion")
        label = "importance (per-layer min-max)"
        title = f"head importance{f' ({crit})' if crit else ''}, removed heads crossed"
    else:
        for i, mask in enumerate(a["head_mask"]):
            grid[i, :len(mask)] = mask
        label, title = "kept (1) / removed (0)", "kept heads (no importance scores given)"
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * width + 2), max(3, 0.25 * len(a["layer"]) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
    if scores is not None:
        for i, mask in enumerate(a["head_mask"]):
            for h, kept in enumerate(mask):
                if not kept:
                    ax.text(h, i, "x", ha="center", va="center", color="white", fontsize=8)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    return _save(plt, fig, path)


# Colours of the per-layer choice picture: a block's kind (the search's vocabulary).
CHOICE_COLOURS = {"dense": "#2a7ab9", "kv": "#8fc1e3", "width": "#8fc1e3", "value": "#e08e2b", "removed": "#c0392b"}
CHOICE_LABELS = {"dense": "dense", "kv": "fewer heads or neurons", "value": "value path (HARP)", "removed": "removed"}


def layer_choices(plan) -> list[dict]:
    """Per layer of the base model, what the plan made of its attention and its MLP: the kind (attention
    dense | kv | value | removed; MLP dense | width | removed), kept and base counts, HARP's alpha."""
    rows = []
    for lp in plan.layers:
        h, kv, n = plan.layer_shape(lp.index)
        heads, kvs, neurons = ([], [], []) if lp.removed else plan.resolve_layer(lp)
        mode = "removed" if lp.removed else (lp.attention or {}).get("mode")
        attention = mode or ("dense" if len(heads) == h else "kv")
        mlp_removed = lp.removed or getattr(lp, "mlp", None) is not None
        mlp = "removed" if mlp_removed else ("dense" if len(neurons) == n else "width")
        mixing = attention in ("dense", "kv")
        rows.append({"layer": lp.index, "attention": attention, "heads": len(heads) if mixing else 0, "base_heads": h,
                     "kv_heads": len(kvs) if mixing else 0, "base_kv_heads": kv,
                     "alpha": (lp.attention or {}).get("alpha"), "mlp": mlp,
                     "neurons": 0 if mlp_removed else len(neurons), "base_neurons": n, "layer_removed": lp.removed})
    return rows


def choice_rows(choices: list[dict]) -> list[list]:
    """Rows of the per-layer table: layer, attention (heads and KV kept, value path, removed), MLP width."""
    def attention(c):
        if c["attention"] == "value":
            return f"value path (alpha {c['alpha']})"
        if c["attention"] == "removed":
            return "layer removed" if c["layer_removed"] else "removed"
        counts = f"{c['heads']}/{c['base_heads']} heads, {c['kv_heads']}/{c['base_kv_heads']} KV"
        return f"dense ({counts})" if c["attention"] == "dense" else counts

    def mlp(c):
        if c["mlp"] == "removed":
            return "layer removed" if c["layer_removed"] else "removed"
        return f"dense ({c['neurons']:,})" if c["mlp"] == "dense" else f"{c['neurons']:,}/{c['base_neurons']:,}"

    return [[c["layer"], attention(c), mlp(c)] for c in choices]


def plot_layer_choices(choices: list[dict], path: Path) -> Path:
    """Two bar rows per layer: the attention (KV groups kept, the value path drawn full and hatched,
    removed as x) and the MLP (neurons kept), each coloured by its kind and relative to the base model."""
    plt = _plt()
    from matplotlib.patches import Patch  # noqa: PLC0415 (optional: the plots extra)

    layers = [c["layer"] for c in choices]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.3 * len(layers) + 3), 4.5), sharex=True)
    rows = ((axes[0], "attention", lambda c: 1.0 if c["attention"] == "value" else c["kv_heads"] / c["base_kv_heads"],
             "attention (KV kept)"),
            (axes[1], "mlp", lambda c: c["neurons"] / c["base_neurons"] if c["base_neurons"] else 0.0,
             "MLP (neurons kept)"))
    for ax, block, height, name in rows:
        kinds = [c[block] for c in choices]
        ax.bar(layers, [1.0] * len(layers), color="#eeeeee")
        ax.bar(layers, [height(c) for c in choices], color=[CHOICE_COLOURS[k] for k in kinds])
        value = [i for i, kind in zip(layers, kinds) if kind == "value"]
        if value:  # the value path has no heads to count: a full bar, hatched
            ax.bar(value, [1.0] * len(value), color=CHOICE_COLOURS["value"], hatch="//", edgecolor="#7a4a10")
        for i, kind in zip(layers, kinds):
            if kind == "removed":
                ax.text(i, 0, "x", ha="center", va="bottom", color=CHOICE_COLOURS["removed"], fontweight="bold")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(name, fontsize=8)
    used = {c[block] for c in choices for block in ("attention", "mlp")}
    shown = [k for k in CHOICE_LABELS if k in used or (k == "kv" and "width" in used)]
    axes[0].legend(handles=[Patch(color=CHOICE_COLOURS[k], label=CHOICE_LABELS[k]) for k in shown], fontsize=8,
                   loc="lower center", bbox_to_anchor=(0.5, 1.02), ncol=len(shown), frameon=False)
    axes[1].set_xlabel("layer (x = removed); bars relative to the base model")
    return _save(plt, fig, path)


def layer_choice_blocks(plan, out: Path) -> tuple[list[tuple], dict[str, Path]]:
    """The per-layer picture and table (blocks, plots) when the plan's layers differ in their attention
    or MLP; nothing for a plan that treats every layer alike."""
    choices = layer_choices(plan)
    keys = ("attention", "heads", "kv_heads", "alpha", "mlp", "neurons")
    if len({tuple(c[k] for k in keys) for c in choices}) < 2:
        return [], {}
    png = plot_layer_choices(choices, out / "layer_choices.png")
    return ([("h3", "Per-layer choices"), ("img", png.name, "attention and MLP per layer"),
             ("table", ["layer", "attention", "MLP"], choice_rows(choices))], {"layer_choices": png})


UNRELIABLE = "unreliable"  # a before/after value that was not measured reliably: marked, never drawn


def plot_before_after(rows: list[tuple], path: Path,
                      labels: tuple[str, ...] = ("dense", "pruned", "recovered")) -> Path:
    """Grouped bars, each metric relative to the dense model (= 1): rows of (metric, dense, pruned,
    ideal pruned/dense or None[, recovered or None]). Ideal ratios are drawn as black ticks over the
    pruned bar; a recovered bar is drawn when a row has one. A value of UNRELIABLE (a speed ratio
    whose paired rounds stayed too spread) gets no bar, only the word "unreliable" in its place."""
    plt = _plt()
    rows = [tuple(r) + (None,) * (5 - len(r)) for r in rows if r[1] and r[2] is not None]
    series = [(2, labels[1], "#2a7ab9")] + ([(4, labels[2], "#3a9a5b")] if any(r[4] is not None for r in rows) else [])
    width = 0.8 / (1 + len(series))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4))
    xs = range(len(rows))
    ax.bar([x - 0.4 + width / 2 for x in xs], [1.0] * len(rows), width=width, color="#bbbbbb", label=labels[0])
    for n, (column, label, color) in enumerate(series, start=1):
        place = [(x - 0.4 + width * (n + 0.5), r) for x, r in zip(xs, rows)]
        at = [(x, r[column] / r[1]) for x, r in place if r[column] is not None and r[column] != UNRELIABLE]
        ax.bar([x for x, _ in at], [v for _, v in at], width=width, color=color, label=label)
        for x, v in at:
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        for x, r in place:
            if r[column] == UNRELIABLE:
                ax.text(x, 0.03, "unreliable", rotation=90, ha="center", va="bottom", fontsize=7, color="#c0392b")
    pruned_x = [x - 0.4 + width * 1.5 for x in xs]
    ideal = [(px, r[3]) for px, r in zip(pruned_x, rows) if r[3] is not None]
    if ideal:
        ax.scatter([x for x, _ in ideal], [v for _, v in ideal], marker="_", s=400, color="black", zorder=3,
                   label="ideal (from the shapes)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r[0] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.axhline(1.0, color="#666666", linewidth=0.8)
    ax.set_ylabel(f"relative to {labels[0]}")
    ax.set_title("before / after (relative to the dense model)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _curve(points, what: str) -> tuple[list[float], list[float]]:
    """(tokens, loss) of a recovery curve read from a recovery.json (a file a user may hand us)."""

    if not isinstance(points, list):
        raise SecateursError(f"recovery.json: curves.{what} is not a list")
    xs, ys = [], []
    for p in points:
        x, y = (p.get("tokens"), p.get("loss")) if isinstance(p, dict) else (None, None)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (x, y)):
            raise SecateursError(f"recovery.json: a point of curves.{what} has no finite tokens and loss")
        xs.append(float(x))
        ys.append(float(y))
    return xs, ys


def plot_recovery_curve(record: dict, path: Path) -> Path:
    """Training loss per step and validation loss against tokens trained: did recovery converge?"""
    curves = record.get("curves") if isinstance(record.get("curves"), dict) else {}
    train, val = _curve(curves.get("train", []), "train"), _curve(curves.get("val", []), "val")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*train, color="#bbbbbb", linewidth=1, label="training loss (each step)")
    ax.plot(*val, marker="o", color="#2a7ab9", label="validation loss (held out)")
    kind = _dig(record, ("objective", "kind"))
    ax.set_xlabel("tokens trained")
    ax.set_ylabel(f"loss ({'KL to the dense model' if kind == 'kd' else 'cross-entropy'})")
    ax.set_title("recovery")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def recovery_facts(record: dict) -> list[list]:
    """The rows of the recovery table: objective, what trained, data, budget, validation before/after."""
    g = lambda *keys: _dig(record, keys)  # noqa: E731
    before, after = (r if isinstance(r, dict) else {} for r in (record.get("before"), record.get("after")))
    rows = [["objective", g("objective", "formula")], ["trained", g("parametrisation", "method")],
            ["data", f"{g('data', 'kind') or g('data', 'source')} ({g('data', 'source')})"],
            ["tokens trained", _fmt(g("tokens", "trained"))], ["steps", _fmt(g("steps", "done"))],
            ["learning rate", g("optimizer", "lr")], ["training tok/s", _fmt(record.get("training_tokens_per_second"))],
            ["wall seconds", _fmt(record.get("wall_seconds"))]]
    for key in ("loss", "perplexity"):
        if before.get(key) is not None and after.get(key) is not None:
            rows.append([f"validation {key}", f"{_fmt(before[key])} -> {_fmt(after[key])}"])
    return rows


def _dig(record: dict, keys: tuple):
    for k in keys:
        record = record.get(k) if isinstance(record, dict) else None
    return record if record is not None else "n/a"


def plot_sweep(points: list[dict], metric: str, path: Path, ylabel: str, log: bool = False) -> Path:
    """One line per method: `metric` against the achieved fraction of parameters removed (the
    dense model is the point at 0 on every line)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = [p for p in points if p["method"] == "dense" and p.get(metric) is not None]
    for method in sorted({p["method"] for p in points} - {"dense"}):
        pts = sorted([p for p in points if p["method"] == method and p.get(metric) is not None],
                     key=lambda p: p["params_removed"])
        pts = dense + pts
        if pts:
            errors = [p.get(f"{metric}_stderr") for p in pts]
            yerr = [e or 0.0 for e in errors] if any(e is not None for e in errors) else None
            ax.errorbar([p["params_removed"] for p in pts], [p[metric] for p in pts], yerr=yerr, marker="o",
                        capsize=3, label=method)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("fraction of parameters removed")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


# -- metric tables ----------------------------------------------------------------------------
def _fmt(x, digits=3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _acc(r: dict | None, key: str) -> str:
    if not r or r.get(key) is None:
        return "n/a"
    se = r.get(f"{key}_stderr")
    return f"{100 * r[key]:.1f} ± {100 * se:.1f}" if se is not None else f"{100 * r[key]:.1f}"


def eval_tables(ev: dict) -> list[tuple]:
    """Blocks comparing the models of an `secateurs eval` result (first = baseline if present)."""
    labels = list(ev["models"])
    blocks: list[tuple] = []
    ppl_keys = []
    for label in labels:
        for r in (ev["models"][label].get("perplexity") or []):
            if (r["protocol"], r["seq_len"]) not in ppl_keys:
                ppl_keys.append((r["protocol"], r["seq_len"]))
    if ppl_keys:
        src = (ev.get("text") or {}).get("name", "text")
        rows = []
        for protocol, seq in ppl_keys:
            row = [f"{src} {protocol}"]
            for label in labels:
                r = next((x for x in (ev["models"][label].get("perplexity") or []) if x["protocol"] == protocol), None)
                row.append(f"{r['perplexity']:.3f} ({r['windows']} windows)" if r else "n/a")
            rows.append(row)
        blocks.append(("table", ["perplexity"] + labels, rows))
    tasks = []
    for label in labels:
        for t in ((ev["models"][label].get("zero_shot") or {}).get("tasks") or {}):
            if t not in tasks:
                tasks.append(t)
    if tasks:
        rows = []
        for t in tasks:
            rs = [((ev["models"][label].get("zero_shot") or {}).get("tasks") or {}).get(t) for label in labels]
            n = next((r.get("samples") for r in rs if r), None)
            rows.append([f"{t} (n={n})"] + [f"{_acc(r, 'acc')} / {_acc(r, 'acc_norm')}" for r in rs])
        means = [(ev["models"][label].get("zero_shot") or {}).get("mean_acc") for label in labels]
        rows.append(["mean acc"] + [f"{100 * m:.1f}" if m is not None else "n/a" for m in means])
        blocks.append(("table", ["zero-shot acc / acc_norm (%)"] + labels, rows))
    return blocks


def bench_blocks(bench: dict) -> list[tuple]:
    """The speed section of a report: how it was measured, and one row per model and shape; a ratio
    whose paired rounds stayed too spread reads "not measured reliably (why)" instead of a number."""
    from secateurs.evaluation.speed import bench_intro, ratio_of, ratio_text  # noqa: PLC0415 (imports torch; report is torch-free without scores)

    header = ["model", "batch", "prompt", "rounds", "prefill tok/s (± spread)", "decode tok/s (± spread)", "TTFT ms",
              "peak MiB", "prefill x (ideal)", "decode x (ideal)"]
    rows = []
    for r in bench["results"]:
        v = r["vs_baseline"]
        rows.append([r["model"], r["batch"], r["prompt_length"], r["prefill_tokens_per_s"].get("n", "n/a"),
                     f"{r['prefill_tokens_per_s']['median']:,.0f} ±{100 * r['prefill_tokens_per_s']['spread']:.0f}%",
                     f"{r['decode_tokens_per_s']['median']:,.1f} ±{100 * r['decode_tokens_per_s']['spread']:.0f}%",
                     f"{1000 * r['ttft_s']['median']:,.1f}",
                     f"{r['peak_memory_bytes'] / 2**20:,.0f}" if r.get("peak_memory_bytes") else "n/a",
                     ratio_text(ratio_of(bench, r, "prefill"), v["ideal_prefill_speedup"]),
                     ratio_text(ratio_of(bench, r, "decode"), v["ideal_decode_speedup_bytes"])])
    return [("p", bench_intro(bench)), ("table", header, rows)]


# -- the run report ---------------------------------------------------------------------------
RESULT_MAX_BYTES = 64 * 2**20  # eval.json / bench.json / recovery.json: secateurs writes kilobytes to a few MiB


def _load_json(path: Path | None, what: str = "result file") -> dict | None:
    """A JSON object from a file a user hands us (secateurs.planning.plan.read_json_file's limits: size,
    depth, UTF-8, finite numbers); its fields are checked by the caller."""

    if path is None:
        return None
    data = read_json_file(path, what, max_bytes=RESULT_MAX_BYTES, error=SecateursError)
    if not isinstance(data, dict):
        raise SecateursError(f"{what} {path} holds a JSON {_kind(data)}, not an object; expected {_WRITER[what]}")
    return data


_WRITER = {"eval result": "the file `secateurs eval --out FILE` writes",
           "bench result": "the file `secateurs bench --out FILE` writes",
           "recovery record": "the recovery.json `secateurs recover` writes", "result file": "a secateurs result"}


def _kind(value) -> str:
    return {dict: "object", list: "list", str: "text", bool: "true/false", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


class _Fields:
    """Checks the fields a report reads from one user file, each refusal naming the file and the field."""

    def __init__(self, path, what: str):
        self.path, self.what = path, what

    def fail(self, field: str, expected: str, value) -> None:
        shown = json.dumps(value)[:60] if not isinstance(value, (dict, list)) else f"a {_kind(value)}"
        raise SecateursError(f"{self.what} {self.path}: field '{field}' must be {expected}, got {shown}; "
                             f"expected {_WRITER[self.what]}")

    def get(self, obj: dict, key: str, field: str, kind: str, *, required: bool = True, null: bool = False):
        name = f"{field}.{key}" if field else key
        if key not in obj:
            if required:
                raise SecateursError(f"{self.what} {self.path}: field '{name}' is missing; expected "
                                     f"{_WRITER[self.what]}")
            return None
        value = obj[key]
        if value is None and (null or not required):
            return None
        ok = {"object": isinstance(value, dict), "list": isinstance(value, list), "text": isinstance(value, str),
              "number": isinstance(value, (int, float)) and not isinstance(value, bool),
              "count": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
              "flag": isinstance(value, bool),
              "scalar": value is None or isinstance(value, (str, int, float, bool))}[kind]
        if not ok:
            self.fail(name, {"object": "an object", "list": "a list", "text": "text", "number": "a number",
                             "count": "a whole number >= 0", "flag": "true or false",
                             "scalar": "text or a number"}[kind]
                      + (" or null" if null or not required else ""), value)
        return value


def check_eval_result(ev: dict, path) -> dict:
    """Refuse an eval.json whose fields the report reads have the wrong types (SecateursError)."""
    f = _Fields(path, "eval result")
    models = f.get(ev, "models", "", "object")
    for label, model in models.items():
        where = f"models.{label}"
        if not isinstance(model, dict):
            f.fail(where, "an object", model)
        for i, r in enumerate(f.get(model, "perplexity", where, "list", required=False) or []):
            at = f"{where}.perplexity[{i}]"
            if not isinstance(r, dict):
                f.fail(at, "an object", r)
            f.get(r, "protocol", at, "text")
            f.get(r, "seq_len", at, "count")
            f.get(r, "perplexity", at, "number")
            f.get(r, "windows", at, "count")
        zs = f.get(model, "zero_shot", where, "object", required=False)
        if zs is not None:
            f.get(zs, "mean_acc", f"{where}.zero_shot", "number", required=False)
            for task, r in (f.get(zs, "tasks", f"{where}.zero_shot", "object", required=False) or {}).items():
                at = f"{where}.zero_shot.tasks.{task}"
                if r is None:
                    continue
                if not isinstance(r, dict):
                    f.fail(at, "an object", r)
                f.get(r, "samples", at, "scalar", required=False)
                for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
                    f.get(r, key, at, "number", required=False)
    text = f.get(ev, "text", "", "object", required=False)
    if text is not None:
        f.get(text, "name", "text", "scalar")
        f.get(text, "read_as", "text", "scalar")
    zero_shot = f.get(ev, "zero_shot", "", "object", required=False)
    if zero_shot is not None:
        for key in ("lm_eval_version", "num_fewshot", "limit"):
            f.get(zero_shot, key, "zero_shot", "scalar", required=False)
    return ev


def check_bench_result(bench: dict, path) -> dict:
    """Refuse a bench.json whose fields the report reads have the wrong types (SecateursError)."""
    f = _Fields(path, "bench result")
    config = f.get(bench, "config", "", "object")
    for key in ("repeats", "warmup", "decode_tokens"):
        f.get(config, key, "config", "count")
    f.get(bench, "device", "", "scalar")
    machine = f.get(bench, "machine", "", "object")
    for key in ("cpu", "torch_threads"):
        f.get(machine, key, "machine", "scalar", required=False)
    for label, m in f.get(bench, "models", "", "object").items():
        where = f"models.{label}"
        if not isinstance(m, dict):
            f.fail(where, "an object", m)
        f.get(m, "params", where, "count")
        f.get(m, "weight_bytes", where, "count")
        f.get(m, "disk_bytes", where, "count", required=False)
    for i, r in enumerate(f.get(bench, "results", "", "list")):
        at = f"results[{i}]"
        if not isinstance(r, dict):
            f.fail(at, "an object", r)
        f.get(r, "model", at, "scalar")
        f.get(r, "batch", at, "count")
        f.get(r, "prompt_length", at, "count")
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s"):
            rate = f.get(r, key, at, "object")
            for stat in ("median", "spread") if key != "ttft_s" else ("median",):
                f.get(rate, stat, f"{at}.{key}", "number")
        f.get(r, "peak_memory_bytes", at, "number", null=True)
        f.get(r["prefill_tokens_per_s"], "n", f"{at}.prefill_tokens_per_s", "count", required=False)
        vs = f.get(r, "vs_baseline", at, "object")
        for key in ("ideal_prefill_speedup", "ideal_decode_speedup_bytes"):
            f.get(vs, key, f"{at}.vs_baseline", "number")
        for key in ("prefill_speedup", "decode_speedup"):  # null: not measured reliably (paired rounds)
            f.get(vs, key, f"{at}.vs_baseline", "number", null=True)
        for metric in ("prefill", "decode"):  # written since paired rounds; older files have none
            entry = f.get(vs, metric, f"{at}.vs_baseline", "object", required=False)
            if entry is not None:
                where = f"{at}.vs_baseline.{metric}"
                f.get(entry, "reliable", where, "flag")
                f.get(entry, "speedup", where, "number", null=True)
                f.get(entry, "spread", where, "number", null=True)
                f.get(entry, "reason", where, "text", required=False)
    f.get(bench, "baseline", "", "text", required=False)
    for key in ("max_spread", "time_limit"):
        f.get(config, key, "config", "number", required=False)
    return bench


def check_recovery_record(record: dict, path) -> dict:
    """Refuse a recovery.json whose fields the report reads have the wrong types (SecateursError)."""
    f = _Fields(path, "recovery record")
    for key in ("objective", "parametrisation", "data", "tokens", "steps", "optimizer", "before", "after", "curves"):
        f.get(record, key, "", "object", required=False)
    curves = record.get("curves") or {}
    for what in ("train", "val"):
        try:
            _curve(curves.get(what, []), what)
        except SecateursError as exc:
            raise SecateursError(f"recovery record {path}: {str(exc).removeprefix('recovery.json: ')}") from exc
    return record


def read_report_inputs(run_dir: Path, eval_file=None, bench_file=None, scores=None) -> dict:
    """Everything a run report reads besides the plan, read and checked before anything is written:
    eval / bench results (the given files, else RUN/eval.json and RUN/bench.json when present),
    RUN/recovery.json when present, and the importance scores."""
    eval_file = eval_file or (run_dir / "eval.json" if (run_dir / "eval.json").exists() else None)
    bench_file = bench_file or (run_dir / "bench.json" if (run_dir / "bench.json").exists() else None)
    ev = _load_json(eval_file, "eval result")
    bench = _load_json(bench_file, "bench result")
    recovery_file = run_dir / "recovery.json"
    record = _load_json(recovery_file, "recovery record") if recovery_file.exists() else None
    return {"eval": ev and check_eval_result(ev, eval_file), "bench": bench and check_bench_result(bench, bench_file),
            "recovery": record and check_recovery_record(record, recovery_file),
            "scores": find_scores(run_dir, scores)}


def load_scores(path: str | Path):
    """StructureScores from a scores file, or AMP scores computed from a calibration statistics
    file (`secateurs prune --stats FILE`)."""
    from safetensors import safe_open  # noqa: PLC0415 (imports torch; report is torch-free without scores)

    from secateurs.criteria import StructureScores  # noqa: PLC0415 (imports torch; report is torch-free without scores)

    path = Path(path)
    if not path.exists():
        raise SecateursError(f"scores file {path} not found")
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
    except Exception as exc:  # not a safetensors file at all
        raise SecateursError(f"{path} is not a safetensors file ({exc})") from exc
    if "heads.0" in keys:
        return StructureScores.load(path)
    try:
        from secateurs.calibration.statistics import Statistics  # noqa: PLC0415 (imports torch; report is torch-free without scores)
        from secateurs.criteria.amp import amp_scores  # noqa: PLC0415 (imports torch; report is torch-free without scores)

        return amp_scores(Statistics.load(path))
    except Exception as exc:
        raise SecateursError(f"{path} holds neither importance scores nor calibration statistics ({exc})") from exc


def find_scores(run_dir: Path, scores: str | Path | None = None):
    """Importance scores for the heatmap: the given file, or one saved in the run folder."""
    if scores is not None:
        return load_scores(scores)
    for name in SCORE_FILES:
        if (run_dir / name).exists():
            return load_scores(run_dir / name)
    return None


def write_run_report(run_dir: str | Path, out_dir: str | Path | None = None, *, eval_file: str | Path | None = None,
                     bench_file: str | Path | None = None, scores: str | Path | None = None,
                     force: bool = False) -> dict[str, Path]:
    """Markdown + HTML + PNGs for a pruned model folder (or a plan file). eval/bench results default
    to eval.json / bench.json inside the folder when they exist. The report folder (default
    RUN/report) is never the run folder or one of its files; an existing one is replaced only with
    force, and only a report."""

    run_dir = Path(run_dir)
    if run_dir.is_file():
        plan_path, run_dir = run_dir, run_dir.parent
    else:
        plan_path = run_dir / PLAN_FILENAME
    if not plan_path.exists():
        raise SecateursError(f"no {PLAN_FILENAME} in {run_dir}; give a folder written by `secateurs prune` "
                             "or a plan file")
    plan = PruningPlan.load(plan_path)
    read = read_report_inputs(run_dir, eval_file, bench_file, scores)  # all refusals before anything is written
    final = out_dir if out_dir else run_dir / "report"
    here = Path(final).expanduser().resolve()
    # what the report reads, and every file of the run folder except an earlier report at `final`
    inputs = [i for i in (eval_file, bench_file, scores, plan_path) if i] + [
        p for p in run_dir.iterdir() if p.resolve() != here]
    with write_folder(final, force=force, inputs=inputs, kind="report", what="report folder") as tmp:
        files = _write_report(plan, run_dir, tmp, eval_file, bench_file, scores, read=read)
    final = Path(final).expanduser().resolve()
    return {kind: final / path.name for kind, path in files.items()}


def _write_report(plan, run_dir: Path, out: Path, eval_file, bench_file, scores, *, title: str | None = None,
                  intro: list[tuple] | None = None, extra_plots: dict[str, Path] | None = None,
                  summary_extra: dict | None = None, read: dict | None = None) -> dict[str, Path]:
    """The run report; the demo passes its own title, intro blocks (the side-by-side table), plots
    it drew and fields for report.json. read: what read_report_inputs returned (read here if None)."""
    read = read if read is not None else read_report_inputs(run_dir, eval_file, bench_file, scores)
    ev, bench, score_obj = read["eval"], read["bench"], read["scores"]

    kept_png = plot_kept_per_layer(plan, out / "kept_per_layer.png")
    heat_png = plot_head_heatmap(plan, out / "head_heatmap.png", score_obj)
    prov = plan.provenance
    a = plan_arrays(plan)
    title = title or f"Pruning report: {prov.get('base_model') or plan.base.get('name_or_path')}"
    blocks: list[tuple] = [("h1", title), *(intro or [])]
    facts = [["method", prov.get("method", "n/a")], ["requested ratio", prov.get("ratio", "n/a")],
             ["parameters before", _fmt(prov.get("params_before"))],
             ["parameters after", _fmt(prov.get("params_after"))]]
    if prov.get("params_before") and prov.get("params_after"):
        facts.append(["parameters removed", f"{100 * (1 - prov['params_after'] / prov['params_before']):.2f}%"])
    facts += [["layers kept", f"{sum(not r for r in a['removed'])} of {len(a['removed'])}"],
              ["query heads kept", f"{sum(a['kept_heads'])} of {sum(a['heads'])}"],
              ["MLP neurons kept", f"{sum(a['kept_neurons']):,} of {sum(a['neurons']):,}"],
              ["calibration", prov.get("calibration") or "none"], ["seed", prov.get("seed", "n/a")]]
    blocks += [("table", ["plan", "value"], facts)]
    blocks += [("h2", "Before / after")]
    if ev:
        blocks += [("p", _eval_intro(ev))] + eval_tables(ev)
    else:
        blocks.append(("p", "No evaluation results (run `secateurs eval MODEL --baseline DENSE --out "
                            f"{run_dir}/eval.json`)."))
    if bench:
        blocks += [("h3", "Speed and memory")] + bench_blocks(bench)
    else:
        blocks.append(("p", "No speed results (run `secateurs bench MODEL --baseline DENSE "
                             f"--out {run_dir}/bench.json`)."))
    plots = dict(extra_plots or {})
    record = read["recovery"]
    if "recovery_curve" not in plots and record is not None:  # a recovered model: how it was brought back
        blocks += [("h3", "Recovery"), ("table", ["recovery", "value"], recovery_facts(record))]
        plots["recovery_curve"] = plot_recovery_curve(record, out / "recovery_curve.png")
    blocks += [("img", p.name, kind.replace("_", " ")) for kind, p in plots.items()]
    blocks += [("h2", "Where the cuts fell"), ("img", kept_png.name, "kept heads and neurons per layer"),
               ("img", heat_png.name, "layer x head importance")]
    if score_obj is None:
        blocks.append(("p", "The heatmap shows the kept mask: no importance scores were found (pass --scores FILE, "
                            f"a StructureScores safetensors, or save one as {SCORE_FILES[0]} in the run folder)."))
    choice_blocks, choice_plots = layer_choice_blocks(plan, out)
    blocks += choice_blocks
    blocks += [("h2", "Plan"), ("pre", plan.summary())]
    files = write_page(blocks, out, "report", title)
    summary = {**(summary_extra or {}), "plan": plan.to_dict()["provenance"], "eval": ev, "bench": bench,
               "plots": [kept_png.name, heat_png.name, *(p.name for p in {**plots, **choice_plots}.values())]}
    write_file(out / "report.json", json.dumps(summary, indent=2, default=str) + "\n")
    return {**files, "json": out / "report.json", "kept_per_layer": kept_png, "head_heatmap": heat_png, **plots,
            **choice_plots}


def _eval_intro(ev: dict) -> str:
    parts = []
    if ev.get("text"):
        parts.append(f"Perplexity on {ev['text']['name']} ({ev['text']['read_as']}), non-overlapping windows, "
                     "ragged tail dropped.")
    if ev.get("zero_shot"):
        z = ev["zero_shot"]
        parts.append(f"Zero-shot with lm-eval {z.get('lm_eval_version')}, {z.get('num_fewshot', 0)}-shot, "
                     f"limit {z.get('limit') or 'none'}; ± is the standard error.")
    return " ".join(parts) or "Evaluation results."


def require_matplotlib():
    """matplotlib.pyplot, or a SecateursError saying how to install it (checked before long work)."""
    return _plt()


def write_report(plan, run_dir: Path, out: Path, eval_file, bench_file, scores, **parts) -> dict[str, Path]:
    """The run report with a caller's own title, intro blocks, plots and report.json fields (the demo's)."""
    return _write_report(plan, run_dir, out, eval_file, bench_file, scores, **parts)
