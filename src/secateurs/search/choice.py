"""The architecture search's choice: one attention variant and one MLP variant per decoder layer,
picked by a mixed-integer program (Puzzle, arXiv 2411.19146).

The table lists, for every layer l, attention variants a and MLP variants m, each with a score (the
KL divergence of the model with that one block replaced from the dense model) and its costs. With a
binary x[l,a] per attention variant and y[l,m] per MLP variant the program is

    minimise    sum x[l,a] score(a) + sum y[l,m] score(m)
    subject to  sum_a x[l,a] = 1 and sum_m y[l,m] = 1 for every layer l
                fixed cost + sum of the chosen variants' costs <= limit, for every budget
                (params: parameters; kv: KV-cache bytes per token; decode: seconds per decode token)

plus the rules every choice obeys and the constraints a user sets:

* removing both blocks of a layer removes the whole layer; at least one block of the model stays (a
  plan keeps at least one layer);
* `keep_first` / `keep_last`: those layers keep their dense attention and dense MLP;
* `uniform`: every layer takes an attention of the same kind class and size (dense or fewer KV groups,
  the same count of KV groups) and an MLP of the same width; no value-path or removed blocks, so the
  result loads with stock `from_pretrained`;
* `max_attention_free`: at most K layers have no attention scores, counting every layer whose attention
  is the value path or removed (whole removed layers included): each such layer gives up its token
  mixing, whether or not its MLP stays;
* `whole_layers`: a block is removed only as part of a whole removed layer (attention removed exactly
  where the MLP is), the depth methods' search space.

The program is solved by scipy.optimize.milp (HiGHS) with no relative gap, so the result is the optimum
unless the time limit stops the solver first (then the best choice found, its gap recorded). The
chosen costs are summed again exactly; a choice that HiGHS's feasibility tolerance lets exceed a
budget is solved again with that budget tightened by the excess. A budget no choice can meet is
refused with the smallest cost reachable under the constraints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from secateurs.errors import SecateursError

BLOCK_KINDS = {"attention": ("dense", "kv", "value", "removed"), "mlp": ("dense", "width", "removed")}
ATTENTION_FREE = ("value", "removed")  # attention kinds without attention scores (no token mixing)
SIZED = ("dense", "kv", "width")  # kinds that keep a count of KV groups or neurons
BUDGET_KINDS = ("params", "kv", "decode")
BUDGET_UNITS = {"params": "parameters", "kv": "KV-cache bytes per token", "decode": "seconds per decode token"}
TIGHTENINGS = 4  # re-solves with a tightened budget row when tolerance let the rounded choice exceed it
_STATUS = {0: "optimal", 1: "time limit", 2: "infeasible", 3: "unbounded", 4: "solver error"}


@dataclass(frozen=True)
class Variant:
    """One way to build a block of one layer.

    id: unique within its layer and block (e.g. "dense", "kv2", "width86", "value", "removed");
    block: "attention" or "mlp"; kind: attention "dense" | "kv" (fewer KV groups, their query heads
    kept) | "value" (HARP's value path) | "removed", MLP "dense" | "width" (fewer neurons) | "removed";
    score: KL(dense || model with only this block replaced), 0 for the dense block;
    params: the block's parameters (its norms included); kv_bytes: its KV-cache bytes per token
    (0 for value and removed); decode: its seconds per decode token (secateurs.search.costs);
    size: the KV groups (attention dense / kv) or neurons (MLP dense / width) it keeps, 0 for value
    and removed. Costs are what the block costs when chosen, not what it saves."""

    id: str
    block: str
    kind: str
    score: float
    params: int = 0
    kv_bytes: int = 0
    decode: float = 0.0
    size: int = 0

    def __post_init__(self):
        if self.block not in BLOCK_KINDS or self.kind not in BLOCK_KINDS[self.block]:
            raise SecateursError(f"variant {self.id!r}: block {self.block!r} kind {self.kind!r} is not one of "
                                 f"{BLOCK_KINDS}")
        if not math.isfinite(self.score):
            raise SecateursError(f"variant {self.id!r}: score {self.score!r} is not a finite number")
        for name in ("params", "kv_bytes", "decode"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SecateursError(f"variant {self.id!r}: {name} must be a finite number >= 0, got {value!r}")
        if (self.size >= 1) != (self.kind in SIZED):
            raise SecateursError(f"variant {self.id!r}: a {self.kind} block keeps "
                                 f"{'at least one' if self.kind in SIZED else 'no'} KV group or neuron (size), "
                                 f"got {self.size}")

    def cost(self, kind: str) -> float:
        """Its cost of a budget kind: params, kv (bytes per token) or decode (seconds per token)."""
        return {"params": self.params, "kv": self.kv_bytes, "decode": self.decode}[kind]


@dataclass(frozen=True)
class LayerOptions:
    """The variants one decoder layer may take, per block (ids unique within each block)."""

    attention: tuple[Variant, ...]
    mlp: tuple[Variant, ...]

    def __post_init__(self):
        for block in ("attention", "mlp"):
            variants = getattr(self, block)
            if not variants:
                raise SecateursError(f"a layer needs at least one {block} variant")
            if any(v.block != block for v in variants):
                raise SecateursError(f"the {block} options hold a variant of another block")
            ids = [v.id for v in variants]
            if len(set(ids)) != len(ids):
                raise SecateursError(f"{block} variant ids repeat: {ids}")

    def by_kind(self, block: str, kinds: Sequence[str]) -> list[int]:
        return [i for i, v in enumerate(getattr(self, block)) if v.kind in kinds]


@dataclass(frozen=True)
class Table:
    """Every layer's options, in layer order, and the cost outside the decoder layers that every choice
    pays (embeddings, final norm, LM head): fixed_params, fixed_kv_bytes, fixed_decode."""

    layers: tuple[LayerOptions, ...]
    fixed_params: int = 0
    fixed_kv_bytes: int = 0
    fixed_decode: float = 0.0

    def fixed(self, kind: str) -> float:
        return {"params": self.fixed_params, "kv": self.fixed_kv_bytes, "decode": self.fixed_decode}[kind]


@dataclass(frozen=True)
class Budget:
    """kind: params | kv | decode; limit: the most the whole model may cost in that kind (fixed cost
    included): parameters, KV-cache bytes per token, or seconds per decode token."""

    kind: str
    limit: float

    def __post_init__(self):
        if self.kind not in BUDGET_KINDS:
            raise SecateursError(f"budget kind {self.kind!r} is not one of {BUDGET_KINDS}")
        if not (math.isfinite(self.limit) and self.limit >= 0):
            raise SecateursError(f"the {self.kind} budget must be a finite number >= 0, got {self.limit!r}")


@dataclass(frozen=True)
class Constraints:
    """keep_first / keep_last: that many first / last layers stay dense; uniform: one attention shape
    and one MLP width for every layer, no value-path or removed block; max_attention_free: at most
    that many layers with a value-path or removed attention (None: any); whole_layers: blocks are
    removed only as whole layers."""

    keep_first: int = 0
    keep_last: int = 0
    uniform: bool = False
    max_attention_free: int | None = None
    whole_layers: bool = False

    def __post_init__(self):
        for name in ("keep_first", "keep_last", "max_attention_free"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise SecateursError(f"{name} must be a whole number >= 0, got {value!r}")

    def kept_dense(self, count: int) -> set[int]:
        return set(range(min(self.keep_first, count))) | set(range(max(0, count - self.keep_last), count))


@dataclass(frozen=True)
class Choice:
    """The chosen variant of every layer's attention and MLP, the summed score (objective), the model's
    cost of every budget kind (fixed cost included), and the solver's report: status ("optimal" or
    "time limit": the best choice found when the time limit stopped HiGHS), message, mip_gap."""

    attention: tuple[Variant, ...]
    mlp: tuple[Variant, ...]
    objective: float
    costs: dict[str, float]
    status: str
    solver: dict = field(default_factory=dict)

    def removed_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.mlp) if m.kind == "removed"]

    def attention_free_layers(self) -> list[int]:
        return [i for i, a in enumerate(self.attention) if a.kind in ATTENTION_FREE]

    def to_dict(self) -> dict:
        """Plain data for a plan's provenance: per layer the ids and kinds, and the totals."""
        layers = [{"layer": i, "attention": a.id, "attention_kind": a.kind, "mlp": m.id, "mlp_kind": m.kind,
                   "score": a.score + m.score} for i, (a, m) in enumerate(zip(self.attention, self.mlp))]
        return {"objective": self.objective, "costs": dict(self.costs), "status": self.status,
                "solver": dict(self.solver), "layers": layers}


def choose(table: Table, budget: Budget | Sequence[Budget], constraints: Constraints | None = None, *,
           time_limit: float | None = None) -> Choice:
    """The variants of least summed score whose cost meets every budget under the constraints (see the
    module docstring). time_limit: seconds HiGHS may search (None: until optimal). Raises
    SecateursError for a budget no choice meets (naming the smallest reachable cost) or constraints
    no choice satisfies."""
    budgets = (budget,) if isinstance(budget, Budget) else tuple(budget)
    constraints = constraints or Constraints()
    if not table.layers:
        raise SecateursError("the table has no layers")
    if time_limit is not None and not (math.isfinite(time_limit) and time_limit > 0):
        raise SecateursError(f"the time limit must be a positive number of seconds, got {time_limit!r}")
    program = _Program(table, constraints)
    scores = np.array([v.score for v in program.variants] + [0.0] * program.extra)
    limits = [b.limit - table.fixed(b.kind) for b in budgets]
    for _ in range(TIGHTENINGS + 1):
        result = program.solve(scores, [(b.kind, limit) for b, limit in zip(budgets, limits)], time_limit)
        if result.x is None:
            if result.status in (1, 2):  # time limit without a choice, or infeasible: say which budget
                _refuse(program, budgets, time_limit if result.status == 1 else None)
            raise SecateursError(f"the solver failed ({_STATUS.get(result.status)}: {result.message})")
        picked = program.picked(result.x)
        over = [(i, _total(table, picked, b.kind) - b.limit) for i, b in enumerate(budgets)]
        over = [(i, excess) for i, excess in over if excess > 0]
        if not over:
            return _choice(table, program, picked, result)
        for i, excess in over:
            limits[i] -= excess * (1 + 1e-9) + 1e-12 * abs(budgets[i].limit)
    raise SecateursError(f"the solver's choice kept exceeding the budget after {TIGHTENINGS} tightenings")


def smallest_cost(table: Table, kind: str, constraints: Constraints | None = None) -> float:
    """The least cost of a budget kind (fixed cost included) any choice under the constraints reaches."""
    program = _Program(table, constraints or Constraints())
    costs = np.array([v.cost(kind) for v in program.variants] + [0.0] * program.extra, dtype=float)
    result = program.solve(costs, [], None)
    if result.x is None:
        raise SecateursError(f"no choice satisfies the constraints ({_describe(constraints or Constraints())}): "
                             f"{_why_infeasible(table, constraints)}")
    return _total(table, program.picked(result.x), kind)


class _Program:
    """The variables and constraint rows of one table under one set of constraints: x[l,a] and y[l,m]
    in layer order, then (with uniform) one binary per shape shared by every layer."""

    def __init__(self, table: Table, constraints: Constraints):
        self.table, self.constraints = table, constraints
        self.variants: list[Variant] = []
        self.columns: list[dict[str, list[int]]] = []  # per layer: block -> variable indices
        for options in table.layers:
            start = len(self.variants)
            self.variants += [*options.attention, *options.mlp]
            self.columns.append({"attention": list(range(start, start + len(options.attention))),
                                 "mlp": list(range(start + len(options.attention), len(self.variants)))})
        self.shapes = self._shapes() if constraints.uniform else {}
        self.extra = len(self.shapes)
        self.rows: list[tuple[dict[int, float], float, float]] = []  # (coefficients, lower, upper)
        self.lower = np.zeros(len(self.variants) + self.extra)
        self.upper = np.ones(len(self.variants) + self.extra)
        self._structure()

    def _shapes(self) -> dict[tuple[str, int], int]:
        signatures = sorted({(v.block, v.size) for v in self.variants if v.kind in SIZED})
        return {s: len(self.variants) + i for i, s in enumerate(signatures)}

    def _structure(self) -> None:
        c, layers = self.constraints, self.table.layers
        kept = c.kept_dense(len(layers))
        for index, options in enumerate(layers):
            cols = self.columns[index]
            for block in ("attention", "mlp"):
                self.rows.append(({j: 1.0 for j in cols[block]}, 1.0, 1.0))
                if index in kept:
                    dense = options.by_kind(block, ("dense",))
                    if not dense:
                        raise SecateursError(f"layer {index} is kept dense (keep_first {c.keep_first}, keep_last "
                                             f"{c.keep_last}) but has no dense {block} variant")
                    self.lower[cols[block][dense[0]]] = 1.0
            if c.whole_layers:  # attention removed exactly where the MLP is
                removed = {b: [cols[b][i] for i in options.by_kind(b, ("removed",))] for b in ("attention", "mlp")}
                self.rows.append(({j: 1.0 for j in removed["mlp"]} | {j: -1.0 for j in removed["attention"]},
                                  0.0, 0.0))
            if c.uniform:
                self._uniform(index)
        removed_blocks = {j: 1.0 for j, v in enumerate(self.variants) if v.kind == "removed"}
        if removed_blocks:  # one block kept somewhere: a layer of the model stays
            self.rows.append((removed_blocks, -np.inf, 2 * len(layers) - 1))
        if c.max_attention_free is not None:
            free = {j: 1.0 for cols in self.columns for j in cols["attention"]
                    if self.variants[j].kind in ATTENTION_FREE}
            self.rows.append((free, -np.inf, float(c.max_attention_free)))
        if c.uniform:
            for block in ("attention", "mlp"):
                self.rows.append(({j: 1.0 for (b, _), j in self.shapes.items() if b == block}, 1.0, 1.0))

    def _uniform(self, index: int) -> None:
        """Every layer's chosen block has the one shape whose binary is set; unsized kinds are excluded."""
        cols = self.columns[index]
        for block in ("attention", "mlp"):
            for j in cols[block]:
                if self.variants[j].kind not in SIZED:
                    self.upper[j] = 0.0
            for (b, size), u in self.shapes.items():
                if b == block:
                    row = {j: 1.0 for j in cols[block] if self.variants[j].size == size
                           and self.variants[j].kind in SIZED}
                    self.rows.append((row | {u: -1.0}, 0.0, 0.0))

    def solve(self, objective: np.ndarray, budgets: list[tuple[str, float]], time_limit: float | None):
        rows = list(self.rows)
        for kind, limit in budgets:
            costs = {j: float(v.cost(kind)) for j, v in enumerate(self.variants) if v.cost(kind)}
            scale = max([abs(limit), *costs.values(), 1e-300])  # coefficients of order one for HiGHS
            rows.append(({j: x / scale for j, x in costs.items()}, -np.inf, limit / scale))
        size = len(self.variants) + self.extra
        entries = [(r, j, x) for r, (coefficients, _, _) in enumerate(rows) for j, x in coefficients.items()]
        matrix = coo_array(([x for _, _, x in entries], ([r for r, _, _ in entries], [j for _, j, _ in entries])),
                           shape=(len(rows), size)).tocsr()
        options = {"mip_rel_gap": 0.0, "presolve": True}
        if time_limit is not None:
            options["time_limit"] = float(time_limit)
        return milp(objective, integrality=np.ones(size), bounds=Bounds(self.lower, self.upper),
                    constraints=LinearConstraint(matrix, [lo for _, lo, _ in rows], [hi for _, _, hi in rows]),
                    options=options)

    def picked(self, x: np.ndarray) -> list[tuple[Variant, Variant]]:
        """Per layer, the (attention, mlp) variants whose binaries are set in a solution."""
        out = []
        for cols in self.columns:
            attention = max(cols["attention"], key=lambda j: x[j])
            mlp = max(cols["mlp"], key=lambda j: x[j])
            out.append((self.variants[attention], self.variants[mlp]))
        return out


def _total(table: Table, picked: list[tuple[Variant, Variant]], kind: str) -> float:
    """A choice's cost of one kind, summed exactly (integers stay integers) with the fixed cost."""
    return table.fixed(kind) + sum(a.cost(kind) + m.cost(kind) for a, m in picked)


def _choice(table: Table, program: _Program, picked, result) -> Choice:
    attention, mlp = zip(*picked)
    objective = sum(a.score + m.score for a, m in picked)
    solver = {"status": _STATUS.get(result.status, str(result.status)), "message": result.message,
              "mip_gap": float(getattr(result, "mip_gap", 0.0) or 0.0),
              "nodes": int(getattr(result, "mip_node_count", 0) or 0), "variables": len(program.variants),
              "constraints": asdict(program.constraints)}
    return Choice(attention=tuple(attention), mlp=tuple(mlp), objective=objective,
                  costs={kind: _total(table, picked, kind) for kind in BUDGET_KINDS},
                  status=solver["status"], solver=solver)


def _refuse(program: _Program, budgets: tuple[Budget, ...], time_limit: float | None) -> None:
    """Raise the reason no choice was found: a budget beyond reach (its smallest reachable cost), the
    constraints themselves, the budgets only together, or the time limit."""
    table, constraints = program.table, program.constraints
    reach = {b.kind: smallest_cost(table, b.kind, constraints) for b in budgets}
    out = [b for b in budgets if reach[b.kind] > b.limit]
    if out:
        b = out[0]
        raise SecateursError(f"no choice meets the {b.kind} budget of {_amount(b.kind, b.limit)} "
                             f"{BUDGET_UNITS[b.kind]}: the smallest reachable under the constraints "
                             f"({_describe(constraints)}) is {_amount(b.kind, reach[b.kind])}; raise the budget or "
                             "loosen the constraints")
    if time_limit is not None:
        raise SecateursError(f"the solver found no choice within the time limit of {time_limit:g} s; raise it")
    shown = ", ".join(f"{b.kind} {_amount(b.kind, reach[b.kind])}" for b in budgets)
    raise SecateursError(f"each budget is reachable alone (smallest: {shown}) but no choice meets them all at once; "
                         "raise one of them")


def _why_infeasible(table: Table, constraints: Constraints | None) -> str:
    if constraints is not None and constraints.uniform:
        return ("uniform needs one attention size and one MLP width that every layer offers (dense or fewer KV "
                "groups; dense or narrower MLP)")
    return "no layer combination fits (check keep_first / keep_last against max_attention_free)"


def _describe(c: Constraints) -> str:
    parts = [f"keep_first {c.keep_first}", f"keep_last {c.keep_last}"]
    parts += ["uniform"] if c.uniform else []
    parts += [f"max_attention_free {c.max_attention_free}"] if c.max_attention_free is not None else []
    parts += ["whole_layers"] if c.whole_layers else []
    return ", ".join(parts)


def _amount(kind: str, value: float) -> str:
    return f"{value:.6g}" if kind == "decode" else f"{round(value):,}"
