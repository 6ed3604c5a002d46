"""PruningPlan: which structures stay. JSON on disk; the single source of truth for surgery.

A plan names kept query heads, kept KV heads and kept MLP neurons per layer (None = all kept),
or marks the layer removed, and carries the geometry of the model it was made for plus
provenance (method, ratio, calibration, seed, library version).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from secateurs.errors import PlanError

PLAN_FORMAT = "secateurs.plan/1"
PLAN_FILENAME = "pruning_plan.json"
CONFIG_KEY = "secateurs"  # the config.json entry that marks a pruned model


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
        secateurs.adapters.plans.plan_base)."""
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
            raise PlanError(f"{where} keeps no attention heads; a kept layer needs at least one (remove the layer instead)")
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
        neurons = _check_indices(lp.neurons, inter, f"{where} neurons")
        if not neurons:
            raise PlanError(f"{where} keeps no MLP neurons; a kept layer needs at least one (remove the layer instead)")
        if lp.attention is not None:
            mode = lp.attention.get("mode")
            if mode not in ("value", "removed"):
                raise PlanError(f"{where}: attention mode must be 'value' or 'removed', got {mode!r}")
            if len(heads) < num_heads:
                raise PlanError(f"{where}: a HARP layer keeps all heads (its value path uses every head)")
        comp = lp.compensation or {}
        for kind, removed in (("attention", (num_heads - len(heads)) * self.base["head_dim"]),
                              ("mlp", inter - len(neurons))):
            if kind in comp and len(comp[kind]) != removed:
                raise PlanError(f"{where}: {kind} compensation has {len(comp[kind])} values for {removed} removed channels")
        return heads, kv, neurons

    def pruned_shapes(self) -> list[tuple[int, int, int]]:
        """Shapes of the kept layers after surgery (validates every layer)."""
        out = []
        for lp in self.layers:
            if not lp.removed:
                heads, kv, neurons = self.resolve_layer(lp)
                out.append((len(heads), len(kv), len(neurons)))
        return out

    # -- provenance --------------------------------------------------------
    def mark_reapplied(self) -> "PruningPlan":
        """Record that this plan is being applied to fresh weights: layers chosen by a run that recovered
        between removals are now removed at once, so the new folder's weights were not recovered between
        removals (the choosing run's fact is kept as chosen_recovering_between_removals)."""
        if self.provenance.get("recovered_between_removals"):
            self.provenance = {**self.provenance, "recovered_between_removals": False,
                               "chosen_recovering_between_removals": True}
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
    def from_dict(cls, data: dict) -> "PruningPlan":
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
        layers = [_layer_from_dict(row, position) for position, row in enumerate(rows)]
        return cls(base=base, layers=layers, provenance=provenance)

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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruningPlan":
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILENAME
        if not path.exists():
            raise PlanError(f"plan file not found: {path}")
        if not path.is_file():
            raise PlanError(f"plan file {path} is not a file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

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
    for key in _BASE_INTS:
        if not _is_int(base.get(key)) or base[key] < 1:
            raise PlanError(f"plan base.{key} must be a positive whole number, got {base.get(key)!r}")
    shapes = base.get("layer_shapes")
    if (not isinstance(shapes, list) or len(shapes) != base["num_hidden_layers"]
            or not all(isinstance(s, list) and len(s) == 3 and all(_is_int(v) and v >= 1 for v in s) for s in shapes)):
        raise PlanError("plan base.layer_shapes must list [heads, kv_heads, neurons] (positive whole numbers) for "
                        "every layer")
    if any(h % kv for h, kv, _ in shapes):
        raise PlanError("plan base.layer_shapes: heads must be a multiple of kv_heads in every layer")


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
        if not isinstance(attention, dict) or attention.get("mode") not in ("value", "removed"):
            raise PlanError(f"{where}: 'attention' must be {{\"mode\": \"value\", \"alpha\": A}} or "
                            "{\"mode\": \"removed\"}")
        if attention["mode"] == "value" and not _is_finite_number(attention.get("alpha")):
            raise PlanError(f"{where}: attention alpha must be a finite number, got {attention.get('alpha')!r}")
    return LayerPlan(**row)


def _refuse_constant(name: str):
    raise PlanError(f"plan holds {name}; plans may hold finite numbers only")


def _compact_layer(lp: LayerPlan) -> dict:
    d = asdict(lp)
    return {k: v for k, v in d.items() if v is not None and not (k == "removed" and v is False)}


def _check_indices(indices, size: int, what: str) -> list[int]:
    if indices is None:
        return list(range(size))
    idx = sorted(int(i) for i in indices)
    if len(set(idx)) != len(idx):
        raise PlanError(f"{what}: duplicate indices")
    if idx and (idx[0] < 0 or idx[-1] >= size):
        raise PlanError(f"{what}: indices must lie in [0, {size}), got {idx[0]}..{idx[-1]}")
    return idx


def _short(value) -> str:
    return json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
