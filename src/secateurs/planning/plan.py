"""PruningPlan: which structures stay. JSON on disk; the single source of truth for surgery.

A plan names kept query heads, kept KV heads and kept MLP neurons per layer (None = all kept),
or marks the layer removed, may replace a layer's attention (HARP: a value path, or no attention)
or remove its MLP (the layer keeps its attention only), and carries the geometry of the model it
was made for plus provenance (method, ratio, calibration, seed, library version).

Plans are user files, read defensively (`PruningPlan.load` / `from_dict`): at most
PLAN_MAX_BYTES (512 MiB) and JSON_MAX_DEPTH (32) levels of nesting, UTF-8, finite numbers only;
every layer of the base listed once, in order; every index (heads, KV heads, neurons) inside the
base's own layer_shapes; HARP alphas finite and within (0, ALPHA_MAX]; `attention` and `mlp` one of
their modes and nothing else; the counts a plan records
(params_before, params_after, budget counts and fractions) plausible, and params_before /
params_after never carried over when a plan is re-applied (`mark_reapplied` drops them, the run
that applies it records what it measured).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from secateurs.errors import PlanError
from secateurs.files.jsonl import decode_utf8
from secateurs.files.output import write_file

PLAN_FORMAT = "secateurs.plan/1"
PLAN_FILENAME = "pruning_plan.json"
CONFIG_KEY = "secateurs"  # the config.json entry that marks a pruned model

# Limits on JSON read from a user (plans here; eval / bench / recovery results in the report). A
# plan lists kept indices and FLAP's compensation means: Llama-3.1-405B (126 layers x 53,248
# neurons) stays under 200 MB even with every list written out, so 512 MiB leaves margin while a
# larger file is refused before it is read. Secateurs' own files nest at most 6 levels deep (a
# HARP search curve: provenance > search_curves > layer > [alpha, ppl]); 32 leaves margin and
# stays far below the depth at which Python's JSON parser overflows its recursion limit (~1000).
PLAN_MAX_BYTES = 512 * 2**20
JSON_MAX_DEPTH = 32

# HARP's alpha scales the identity-matrix attention's value path (out = alpha * W_O expand(W_V x)).
# Calibration searches a grid in [0, 1] (DEFAULT_GRID 0.0, 0.1, ..., 1.0; the paper's released
# alphas for Llama-3.1-8B are 0.0 to 0.8); alpha = 1 is the block's own scale in the dense model
# and perplexity climbs steeply above it. alpha = 0 is written as {"mode": "removed"}, never as a
# value path of zeros, and a negative alpha (the attention's contribution with its sign flipped)
# is nothing a search produces. A plan's alpha must therefore be finite and in (0, ALPHA_MAX]:
# 10x the grid's top, room for a user's wider --alpha-grid, while 1e30 (which would overflow
# float16/bfloat16 weights once folded into o_proj) or -50 is refused as a tampered or broken plan.
ALPHA_MAX = 10.0

# The modes of a layer's MLP besides the neuron list: "removed" (the layer keeps its attention only).
MLP_MODES = ("removed",)

# Upper bounds on the base geometry a plan may declare (the largest real models are far below:
# 126 layers, 128 query heads, head_dim 256, hidden 18,432, 53,248 neurons, vocabulary 262,144),
# so a tampered plan cannot make secateurs build lists of billions of indices.
_BASE_LIMITS = {"num_hidden_layers": 4096, "hidden_size": 2**20, "head_dim": 2**16, "vocab_size": 2**24}
_SHAPE_LIMITS = (2**14, 2**14, 2**22)  # query heads, KV heads, MLP neurons per layer
_MAX_COUNT = 10**15  # parameter counts a plan may record (a quadrillion: far above any model)


@dataclass
class LayerPlan:
    index: int
    removed: bool = False
    heads: list[int] | None = None
    kv_heads: list[int] | None = None
    neurons: list[int] | None = None
    # Mean input of every removed channel, in channel order: {"attention": [...], "mlp": [...]}.
    # Surgery adds W[:, removed] @ mean to the output projection's bias (FLAP's compensation).
    compensation: dict | None = None
    # HARP: {"mode": "value", "alpha": a} (identity-matrix attention scaled by a) or {"mode": "removed"}.
    attention: dict | None = None
    # {"mode": "removed"}: the layer keeps its attention and loses its whole MLP (None: the MLP keeps
    # `neurons`). A removed MLP keeps no neurons and carries no MLP compensation.
    mlp: dict | None = None


@dataclass
class PruningPlan:
    base: dict
    layers: list[LayerPlan]
    provenance: dict = field(default_factory=dict)

    # -- queries -----------------------------------------------------------
    def kept_layer_indices(self) -> list[int]:
        return [lp.index for lp in self.layers if not lp.removed]

    def layer_shape(self, index: int) -> tuple[int, int, int]:
        """(num_heads, num_kv_heads, intermediate_size) of a layer of the base model."""
        return tuple(self.base["layer_shapes"][index])

    def check_compatible(self, here: dict) -> None:
        """Refuse a plan made for a model of another geometry (`here`: the model's
        secateurs.planning.geometry.plan_base)."""
        keys = ("model_type", "num_hidden_layers", "hidden_size", "head_dim", "vocab_size", "layer_shapes")
        diffs = [k for k in keys if here[k] != self.base.get(k)]
        if diffs:
            detail = "; ".join(f"{k}: plan {_short(self.base.get(k))} vs model {_short(here[k])}" for k in diffs)
            raise PlanError(
                f"this plan was made for another model ({self.base.get('name_or_path')}): {detail}. "
                "Apply it to the base model it was made for."
            )
        if len(self.layers) != here["num_hidden_layers"] or [lp.index for lp in self.layers] != list(
            range(here["num_hidden_layers"])
        ):
            raise PlanError("plan layers must list every layer of the base model once, in order")
        if not self.kept_layer_indices():
            raise PlanError("the plan removes every decoder layer; keep at least one")

    def resolve_layer(self, lp: LayerPlan) -> tuple[list[int], list[int], list[int]]:
        """Validated (kept query heads, kept KV heads, kept neurons) of one layer.

        GQA rule: query head h belongs to KV head h // G. Every kept KV head must keep the same
        number of its query heads (whole groups, or even pruning inside every group); anything
        else has no representation as a standard attention module and is refused.
        """
        num_heads, num_kv, inter = self.layer_shape(lp.index)
        group = num_heads // num_kv
        where = f"layer {lp.index}"
        heads = _check_indices(lp.heads, num_heads, f"{where} heads")
        kv_given = _check_indices(lp.kv_heads, num_kv, f"{where} kv_heads")
        if lp.heads is None and lp.kv_heads is not None:
            heads = [h for h in range(num_heads) if h // group in set(kv_given)]
        if not heads:
            raise PlanError(f"{where} keeps no attention heads; a kept layer needs at least one "
                            "(remove the layer instead)")
        per_group: dict[int, int] = {}
        for h in heads:
            per_group[h // group] = per_group.get(h // group, 0) + 1
        kv = sorted(per_group)
        if lp.kv_heads is not None and kv_given != kv:
            raise PlanError(
                f"{where}: kept KV heads {kv_given} do not match the groups of the kept query heads {kv} "
                f"(query head h uses KV head h // {group})"
            )
        counts = sorted(set(per_group.values()))
        if len(counts) > 1:
            raise PlanError(
                f"{where}: GQA split cannot be represented: kept query heads per KV group are "
                f"{[per_group[g] for g in kv]} (groups {kv}); keep whole KV groups or the same number "
                f"of query heads in every kept group"
            )
        neurons = _resolve_neurons(lp, inter, where)
        if lp.attention is not None:
            mode = lp.attention.get("mode")
            if mode not in ("value", "removed"):
                raise PlanError(f"{where}: attention mode must be 'value' or 'removed', got {mode!r}")
            if mode == "value":
                check_alpha(lp.attention.get("alpha"), where)
            if len(heads) < num_heads:
                raise PlanError(f"{where}: a HARP layer keeps all heads (its value path uses every head)")
        comp = lp.compensation or {}
        if lp.mlp is not None and "mlp" in comp:
            raise PlanError(f"{where}: a removed MLP has no output projection to carry MLP compensation")
        for kind, removed in (("attention", (num_heads - len(heads)) * self.base["head_dim"]),
                              ("mlp", inter - len(neurons))):
            if kind in comp and len(comp[kind]) != removed:
                raise PlanError(f"{where}: {kind} compensation has {len(comp[kind])} values for {removed} "
                                "removed channels")
        return heads, kv, neurons

    def removed_mlp_layers(self) -> list[int]:
        """Positions, among the kept layers (the pruned model's layer numbers), of the layers whose MLP is removed."""
        kept = [lp for lp in self.layers if not lp.removed]
        return [i for i, lp in enumerate(kept) if lp.mlp is not None]

    def pruned_shapes(self) -> list[tuple[int, int, int]]:
        """Shapes of the kept layers after surgery (validates every layer); a removed MLP has 0 neurons."""
        out = []
        for lp in self.layers:
            if not lp.removed:
                heads, kv, neurons = self.resolve_layer(lp)
                out.append((len(heads), len(kv), len(neurons)))
        return out

    # -- provenance --------------------------------------------------------
    def mark_reapplied(self) -> PruningPlan:
        """Record that this plan is being applied to fresh weights: layers chosen by a run that recovered
        between removals are now removed at once, so the new folder's weights were not recovered between
        removals (the choosing run's fact is kept as chosen_recovering_between_removals); the parameter
        counts the file records (MEASURED_COUNTS) are dropped, to be measured again by the run that
        applies the plan."""
        if self.provenance.get("recovered_between_removals"):
            self.provenance = {**self.provenance, "recovered_between_removals": False,
                               "chosen_recovering_between_removals": True}
        # what a run measured on the weights it wrote is never carried over from a (user's) file: the
        # run that applies the plan records its own counts (secateurs.methods.api.prune)
        self.provenance = {k: v for k, v in self.provenance.items() if k not in MEASURED_COUNTS}
        return self

    # -- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "base": self.base,
            "provenance": self.provenance,
            "layers": [_compact_layer(lp) for lp in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        """A plan from its JSON form; every field's type and value is checked (plans are user files)."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise PlanError(f"not a secateurs plan (format {found!r}, expected {PLAN_FORMAT!r})")
        base, rows, provenance = data.get("base"), data.get("layers"), data.get("provenance", {})
        _check_base(base)
        if not isinstance(rows, list) or not rows:
            raise PlanError("plan 'layers' must be a non-empty list of layer entries")
        if not isinstance(provenance, dict):
            raise PlanError("plan 'provenance' must be an object")
        _check_provenance(provenance)
        layers = [_layer_from_dict(row, position) for position, row in enumerate(rows)]
        count = base["num_hidden_layers"]
        for position, lp in enumerate(layers):
            if lp.index != position:
                raise PlanError(f"plan layer entry {position} has index {lp.index}; the base model has {count} layers "
                                f"and the plan lists each once, in order (index 0..{count - 1})")
        if len(layers) != count:
            raise PlanError(f"plan lists {len(layers)} layer entries; the base model has {count} layers "
                            "(base.num_hidden_layers), each listed once, in order")
        plan = cls(base=base, layers=layers, provenance=provenance)
        for lp in plan.layers:  # every index inside the base's own shapes, kept layers representable
            if lp.removed:
                num_heads, num_kv, inter = plan.layer_shape(lp.index)
                for key, size in (("heads", num_heads), ("kv_heads", num_kv), ("neurons", inter)):
                    _check_indices(getattr(lp, key), size, f"layer {lp.index} {key}")
            else:
                plan.resolve_layer(lp)
        return plan

    def to_json(self) -> str:
        """Readable and diff-friendly: header indented, one line per layer; deterministic."""
        d = self.to_dict()
        layers = d.pop("layers")
        try:
            head = json.dumps(d, indent=2, allow_nan=False)
            rows = ",\n".join("    " + json.dumps(row, allow_nan=False) for row in layers)
        except ValueError as exc:
            raise PlanError(f"the plan holds a NaN or infinite value ({exc}); it is not saved") from exc
        return head[:-2] + ',\n  "layers": [\n' + rows + "\n  ]\n}\n"

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILENAME
        return write_file(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILENAME
        if not path.exists():
            raise PlanError(f"plan file not found: {path}")
        data = read_json_file(path, "plan file", max_bytes=PLAN_MAX_BYTES, error=PlanError)
        try:
            return cls.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from exc

    # -- display -----------------------------------------------------------
    def summary(self) -> str:
        b, p = self.base, self.provenance
        lines = [
            f"plan for {b.get('name_or_path')} ({b['model_type']}, {b['num_hidden_layers']} layers, "
            f"hidden {b['hidden_size']}, head_dim {b['head_dim']})",
        ]
        if p:  # in full, one field a line: a provenance cut short cannot be reproduced
            lines.append("provenance:")
            lines += [f"  {k}: {_short(v)}" for k, v in p.items() if k != "per_layer"]
        lines.append(f"{'layers':>7}  {'heads':>9}  {'kv heads':>9}  {'neurons':>13}")
        rows: list[list] = []  # [first, last, text]: runs of layers with the same shapes share one row
        for lp in self.layers:
            h, kv, inter = self.layer_shape(lp.index)
            if lp.removed:
                text = f"{'removed':>9}"
            else:
                heads, kvs, neurons = self.resolve_layer(lp)
                harp = ""
                if lp.attention:
                    harp = "  attention " + ("removed" if lp.attention["mode"] == "removed"
                                             else f"-> value path, alpha {lp.attention.get('alpha')}")
                harp += "  mlp removed" if lp.mlp else ""
                text = f"{len(heads):>4}/{h:<4}  {len(kvs):>4}/{kv:<4}  {len(neurons):>6}/{inter:<6}{harp}"
            if rows and rows[-1][2] == text and rows[-1][1] == lp.index - 1:
                rows[-1][1] = lp.index
            else:
                rows.append([lp.index, lp.index, text])
        for first, last, text in rows:
            span = str(first) if first == last else f"{first}-{last}"
            lines.append(f"{span:>7}  {text}".rstrip())
        removed = sum(lp.removed for lp in self.layers)
        lines.append(f"layers removed: {removed} of {len(self.layers)}")
        return "\n".join(lines)


_BASE_INTS = ("num_hidden_layers", "hidden_size", "head_dim", "vocab_size")


def _check_base(base) -> None:
    if not isinstance(base, dict) or not isinstance(base.get("model_type"), str):
        raise PlanError("plan 'base' must be an object naming the model_type it was made for")
    if base.get("name_or_path") is not None and not isinstance(base["name_or_path"], str):
        raise PlanError(f"plan base.name_or_path must be text, got {_short(base['name_or_path'])[:80]}")
    for key in _BASE_INTS:
        if not _is_int(base.get(key)) or not 1 <= base[key] <= _BASE_LIMITS[key]:
            raise PlanError(f"plan base.{key} must be a whole number in [1, {_BASE_LIMITS[key]}], got "
                            f"{_short(base.get(key))[:80]}")
    shapes = base.get("layer_shapes")
    if (not isinstance(shapes, list) or len(shapes) != base["num_hidden_layers"]
            or not all(isinstance(s, list) and len(s) == 3 and all(_is_int(v) for v in s)
                       and s[0] >= 1 and s[1] >= 1 and s[2] >= 0 for s in shapes)):
        raise PlanError("plan base.layer_shapes must list [heads, kv_heads, neurons] (positive whole numbers; 0 "
                        "neurons for a layer whose MLP is removed) for every one of the base.num_hidden_layers = "
                        f"{base['num_hidden_layers']} layers")
    for i, shape in enumerate(shapes):
        for what, value, limit in zip(("heads", "kv_heads", "neurons"), shape, _SHAPE_LIMITS):
            if value > limit:
                raise PlanError(f"plan base.layer_shapes[{i}]: {value} {what} is more than any model has "
                                f"(at most {limit})")
        if shape[0] % shape[1]:
            raise PlanError(f"plan base.layer_shapes[{i}]: heads ({shape[0]}) must be a multiple of kv_heads "
                            f"({shape[1]})")


# Counts and fractions a plan's provenance may record, checked when a plan is read (a user file):
# MEASURED_COUNTS are what a run measured on the weights it wrote, dropped when the plan is applied
# again (mark_reapplied) and measured anew; the budget's counts and fractions describe the choosing run.
MEASURED_COUNTS = ("params_before", "params_after")
_BUDGET_COUNTS = ("requested_params_removed", "achieved_params_removed", "flap_target_params")
_FRACTIONS = ("ratio", "requested_ratio_of_all", "achieved_ratio_of_all", "flap_ratio")
_FLAGS = ("recovered_between_removals", "chosen_recovering_between_removals", "iterative")


def _check_provenance(p: dict) -> None:
    """Plausible values for what secateurs itself reads or shows from a plan's provenance."""
    for key in MEASURED_COUNTS:
        if key in p and not (_is_int(p[key]) and 1 <= p[key] <= _MAX_COUNT):
            raise PlanError(f"plan provenance.{key} must be a positive whole number (a parameter count), got "
                            f"{_short(p[key])[:80]}")
    for key in _BUDGET_COUNTS:
        if p.get(key) is not None and not (_is_int(p[key]) and 0 <= p[key] <= _MAX_COUNT):
            raise PlanError(f"plan provenance.{key} must be a whole number >= 0, got {_short(p[key])[:80]}")
    for key in _FRACTIONS:
        if p.get(key) is not None and not (_is_finite_number(p[key]) and 0 <= p[key] <= 1):
            raise PlanError(f"plan provenance.{key} must be a fraction in [0, 1], got {_short(p[key])[:80]}")
    for key in _FLAGS:
        if key in p and not isinstance(p[key], bool):
            raise PlanError(f"plan provenance.{key} must be true or false, got {_short(p[key])[:80]}")
    for key in ("method", "secateurs_version", "calibration_hash", "base_model"):
        if p.get(key) is not None and not isinstance(p[key], str):
            raise PlanError(f"plan provenance.{key} must be text, got {_short(p[key])[:80]}")
    recon = p.get("reconstruction")
    if recon is not None:
        if (not isinstance(recon, dict) or set(recon) - {"mode", "damping", "bias", "calibration_hash"}
                or recon.get("mode") not in ("sequential", "dense")
                or not (_is_finite_number(recon.get("damping", 1.0)) and recon.get("damping", 1.0) > 0)
                or not isinstance(recon.get("bias", False), bool)
                or not isinstance(recon.get("calibration_hash", ""), (str, type(None)))):
            raise PlanError("plan provenance.reconstruction must be {\"mode\": \"sequential\" or \"dense\", "
                            f"\"damping\": a positive number, \"bias\": true or false}}, got {_short(recon)[:120]}")
    alphas = p.get("alphas")
    if alphas is not None and (not isinstance(alphas, dict) or not all(
            _is_finite_number(a) and 0 <= a <= ALPHA_MAX for a in alphas.values())):
        raise PlanError(f"plan provenance.alphas must map layers to HARP alphas in [0, {ALPHA_MAX:g}], got "
                        f"{_short(alphas)[:120]}")


def check_alpha(alpha, where: str) -> float:
    """A HARP value-path alpha: a finite number in (0, ALPHA_MAX] (see ALPHA_MAX for why)."""
    if not _is_finite_number(alpha):
        raise PlanError(f"{where}: attention alpha must be a finite number, got {_short(alpha)[:80]}")
    if not 0 < alpha <= ALPHA_MAX:
        raise PlanError(f"{where}: attention alpha {alpha!r} is outside (0, {ALPHA_MAX:g}]: calibration searches "
                        "0..1 and alpha = 0 is written as {\"mode\": \"removed\"}; this plan was edited or broken")
    return alpha


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_LAYER_FIELDS = {f.name for f in fields(LayerPlan)}


def _layer_from_dict(row, position: int) -> LayerPlan:
    """Check one layer entry's fields and types (ranges are checked against the base by resolve_layer)."""
    where = f"plan layer entry {position}"
    if not isinstance(row, dict):
        raise PlanError(f"{where} must be an object")
    unknown = sorted(set(row) - _LAYER_FIELDS)
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {unknown}; known: {sorted(_LAYER_FIELDS)}")
    if not _is_int(row.get("index")):
        raise PlanError(f"{where}: 'index' must be a whole number")
    if not isinstance(row.get("removed", False), bool):
        raise PlanError(f"{where}: 'removed' must be true or false")
    for key in ("heads", "kv_heads", "neurons"):
        value = row.get(key)
        if value is not None and (not isinstance(value, list) or not all(_is_int(i) for i in value)):
            raise PlanError(f"{where}: '{key}' must be a list of whole numbers (or absent: all kept)")
    comp = row.get("compensation")
    if comp is not None:
        if not isinstance(comp, dict) or set(comp) - {"attention", "mlp"}:
            raise PlanError(f"{where}: 'compensation' must be an object with 'attention' and/or 'mlp' lists")
        for kind, values in comp.items():
            if not isinstance(values, list) or not all(_is_finite_number(v) for v in values):
                raise PlanError(f"{where}: compensation '{kind}' must be a list of finite numbers (no NaN or inf)")
    attention = row.get("attention")
    if attention is not None:
        if (not isinstance(attention, dict) or attention.get("mode") not in ("value", "removed")
                or set(attention) - {"mode", "alpha"}):
            raise PlanError(f"{where}: 'attention' must be {{\"mode\": \"value\", \"alpha\": A}} or "
                            f"{{\"mode\": \"removed\"}}, got {_short(attention)[:80]}")
        if attention["mode"] == "value":
            check_alpha(attention.get("alpha"), f"{where} (layer {row['index']})")
    mlp = row.get("mlp")
    if mlp is not None and (not isinstance(mlp, dict) or set(mlp) != {"mode"} or mlp["mode"] not in MLP_MODES):
        raise PlanError(f"{where}: 'mlp' must be {{\"mode\": \"removed\"}} (or absent: the MLP keeps 'neurons'), "
                        f"got {_short(mlp)[:80]}")
    return LayerPlan(**row)


def read_json_file(path: str | os.PathLike, what: str, *, max_bytes: int, error: type[Exception] = PlanError):
    """The JSON value of a file a user hands us, read defensively: a regular file of at most
    `max_bytes`, UTF-8 (a byte-order mark is allowed), nested at most JSON_MAX_DEPTH deep, finite
    numbers only (no NaN, Infinity or 1e999; integers of at most 30 digits). Anything else is
    refused with `error` naming the file; the caller checks the value's fields."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} not found")
    if not path.is_file():
        raise error(f"{what} {path} is not a regular file")
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{what} {path} is {size:,} bytes; secateurs reads at most {max_bytes:,} bytes "
                    f"({max_bytes / 2**20:g} MiB) here (is it the right file?)")
    with path.open("rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise error(f"{what} {path} grew past {max_bytes:,} bytes while being read")
    text = decode_utf8(raw, path, what, error).removeprefix("\ufeff")  # a byte-order mark is allowed
    depth = _json_depth(text, JSON_MAX_DEPTH)
    if depth > JSON_MAX_DEPTH:
        raise error(f"{what} {path} nests more than {JSON_MAX_DEPTH} levels deep; secateurs' own files nest a few "
                    "levels (is it the right file?)")

    def refuse(name):
        raise _NotFinite(name)

    def finite_float(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):
            raise _NotFinite(token)
        return value

    def short_int(token: str) -> int:
        if len(token.lstrip("-")) > 30:
            raise _NotFinite(f"an integer of {len(token)} digits")
        return int(token)

    try:
        return json.loads(text, parse_constant=refuse, parse_float=finite_float, parse_int=short_int)
    except _NotFinite as exc:
        raise error(f"{what} {path} holds {exc.args[0][:40]}; it may hold finite numbers only") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except (ValueError, RecursionError) as exc:  # belt and braces: the depth was checked above
        raise error(f"{what} {path} is not readable JSON ({type(exc).__name__}: {str(exc)[:120]})") from exc


class _NotFinite(Exception):
    """A NaN, Infinity, overflowing float or overlong integer met while parsing."""


_JSON_STRUCTURE = re.compile(r'[\[\]{}"]')
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def _json_depth(text: str, limit: int) -> int:
    """How deep the text's brackets nest (strings skipped), counting only up to limit + 1: the
    parser then never meets a nesting deep enough to exhaust its recursion. Linear time: an
    unterminated string ends the scan (the parser refuses that text anyway)."""
    depth = deepest = position = 0
    while True:
        found = _JSON_STRUCTURE.search(text, position)
        if found is None:
            return deepest
        char = found.group()
        if char == '"':
            string = _JSON_STRING.match(text, found.start())
            if string is None:
                return deepest
            position = string.end()
            continue
        position = found.end()
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        else:
            depth -= 1


def _compact_layer(lp: LayerPlan) -> dict:
    d = asdict(lp)
    return {k: v for k, v in d.items() if v is not None and not (k == "removed" and v is False)}


def _resolve_neurons(lp: LayerPlan, inter: int, where: str) -> list[int]:
    """A layer's kept neurons: none for a removed MLP (whose neuron list may only be empty), else at least one."""
    if lp.mlp is not None:
        if lp.mlp.get("mode") not in MLP_MODES or set(lp.mlp) != {"mode"}:
            raise PlanError(f"{where}: mlp must be {{\"mode\": \"removed\"}}, got {_short(lp.mlp)[:80]}")
        if lp.neurons:
            raise PlanError(f"{where}: the MLP is removed, so it keeps no neurons; leave 'neurons' out")
        return []
    neurons = _check_indices(lp.neurons, inter, f"{where} neurons")
    if not neurons:
        raise PlanError(f"{where} keeps no MLP neurons; a kept layer needs at least one, or mark its MLP removed "
                        "(mlp {\"mode\": \"removed\"}) or remove the layer")
    return neurons


def _check_indices(indices, size: int, what: str) -> list[int]:
    if indices is None:
        return list(range(size))
    idx = sorted(int(i) for i in indices)
    if len(set(idx)) != len(idx):
        twice = sorted({i for i, j in zip(idx, idx[1:]) if i == j})
        raise PlanError(f"{what}: duplicate indices {twice[:5]}")
    bad = [i for i in idx if not 0 <= i < size]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        raise PlanError(f"{what}: indices must lie in [0, {size}) (the plan's base.layer_shapes), got {shown}")
    return idx


def _short(value) -> str:
    return json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
