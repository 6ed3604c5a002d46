"""The architecture search's choice (a mixed-integer program solved by HiGHS) against brute force, its
constraints and refusals, the decode-cost table's fitting and cache, and the report's per-layer picture."""

from __future__ import annotations

import copy
import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from conftest import STORIES, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateurs.adapters import get_adapter
from secateurs.calibration.data import load_calibration
from secateurs.calibration.statistics import collect_statistics
from secateurs.errors import SecateursError
from secateurs.evaluation.report import layer_choice_blocks, layer_choices, write_run_report
from secateurs.methods import make_plan, prune
from secateurs.methods.search import chosen_plans, search_table
from secateurs.planning.accounting import model_stats
from secateurs.planning.geometry import identity_plan
from secateurs.planning.plan import PruningPlan
from secateurs.search.choice import (
    ATTENTION_FREE,
    SIZED,
    Budget,
    Constraints,
    LayerOptions,
    Table,
    Variant,
    choose,
    smallest_cost,
)
from secateurs.search.costs import (
    CostSettings,
    LinearFit,
    cache_key,
    cache_path,
    decode_costs,
    fit_line,
    machine_key,
    widths,
)
from secateurs.search.library import build_library
from secateurs.search.scoring import cache_scoring_data, score_library

LAYERS = 5
KV_GROUPS, NEURONS = 4, 32


def _attention(kind: str, size: int, rng: random.Random) -> Variant:
    params = {"dense": 4 * 25, "kv": size * 25, "value": 30, "removed": 0}[kind] + rng.randint(0, 3)
    kv_bytes = 16 * size if kind in SIZED else 0
    decode = 0.0 if kind == "removed" else (size or 1) * rng.uniform(0.8, 1.2)
    score = 0.0 if kind == "dense" else rng.uniform(0.05, 3.0)
    return Variant(f"{kind}{size}", "attention", kind, score, params, kv_bytes, decode, size)


def _mlp(kind: str, size: int, rng: random.Random) -> Variant:
    params = 3 * size + rng.randint(0, 3) if kind != "removed" else 0
    decode = 0.0 if kind == "removed" else size * rng.uniform(0.08, 0.12)
    score = 0.0 if kind == "dense" else rng.uniform(0.05, 3.0)
    return Variant(f"{kind}{size}", "mlp", kind, score, params, 0, decode, size)


def random_table(seed: int, shared: bool = False) -> Table:
    """5 layers; each offers dense blocks and a random few of the narrower, value-path and removed ones,
    or (shared) every layer the same narrower sizes, so that a uniform choice has more than dense to pick."""
    rng = random.Random(seed)
    layers = []
    for _ in range(LAYERS):
        attention = [("dense", KV_GROUPS)] + rng.sample([("kv", 2), ("kv", 1), ("value", 0), ("removed", 0)],
                                                        rng.randint(1, 2))
        mlp = [("dense", NEURONS)] + rng.sample([("width", 16), ("width", 8), ("removed", 0)], rng.randint(1, 2))
        if shared:
            attention, mlp = [("dense", KV_GROUPS), ("kv", 2), ("kv", 1)], [("dense", NEURONS), ("width", 16),
                                                                              ("width", 8)]
        layers.append(LayerOptions(tuple(_attention(k, s, rng) for k, s in attention),
                                   tuple(_mlp(k, s, rng) for k, s in mlp)))
    return Table(tuple(layers), fixed_params=rng.randint(50, 100), fixed_kv_bytes=0, fixed_decode=rng.uniform(0, 1))


def brute_force(table: Table, budgets: list[Budget], constraints: Constraints):
    """Every combination of (attention, MLP) per layer, vectorised: (objectives, feasible mask, per-layer
    attention indices, per-layer MLP indices)."""
    pairs = [[(a, m) for a in range(len(o.attention)) for m in range(len(o.mlp))] for o in table.layers]
    grid = np.stack(np.meshgrid(*[np.arange(len(p)) for p in pairs], indexing="ij")).reshape(len(pairs), -1)
    att = np.stack([np.array([p[0] for p in pairs[i]])[grid[i]] for i in range(len(pairs))])
    mlp = np.stack([np.array([p[1] for p in pairs[i]])[grid[i]] for i in range(len(pairs))])

    def per_layer(block, index, value):
        return np.stack([np.array([value(v) for v in getattr(o, block)], dtype=object)[index[i]]
                         for i, o in enumerate(table.layers)])

    a_kind, m_kind = per_layer("attention", att, lambda v: v.kind), per_layer("mlp", mlp, lambda v: v.kind)
    a_size, m_size = per_layer("attention", att, lambda v: v.size), per_layer("mlp", mlp, lambda v: v.size)
    objective = (per_layer("attention", att, lambda v: v.score) + per_layer("mlp", mlp, lambda v: v.score)).sum(0)
    ok = np.ones(grid.shape[1], dtype=bool)
    for b in budgets:
        cost = per_layer("attention", att, lambda v, b=b: v.cost(b.kind)) + per_layer(
            "mlp", mlp, lambda v, b=b: v.cost(b.kind))
        ok &= (cost.sum(0) + table.fixed(b.kind)) <= b.limit
    for i in constraints.kept_dense(len(table.layers)):
        ok &= (a_kind[i] == "dense") & (m_kind[i] == "dense")
    removed_blocks = (a_kind == "removed").sum(0) + (m_kind == "removed").sum(0)
    ok &= removed_blocks < 2 * len(table.layers)
    if constraints.uniform:
        sized = np.isin(a_kind, SIZED).all(0) & np.isin(m_kind, SIZED).all(0)
        ok &= sized & (a_size == a_size[0]).all(0) & (m_size == m_size[0]).all(0)
    if constraints.max_attention_free is not None:
        ok &= np.isin(a_kind, ATTENTION_FREE).sum(0) <= constraints.max_attention_free
    if constraints.whole_layers:
        ok &= ((a_kind == "removed") == (m_kind == "removed")).all(0)
    return objective.astype(float), ok, att, mlp


CASES = [  # (budget kinds, constraints)
    (("params",), Constraints()),
    (("kv",), Constraints(keep_first=1)),
    (("decode",), Constraints(keep_last=1, max_attention_free=1)),
    (("params", "decode"), Constraints(keep_first=1, keep_last=1)),
    (("params",), Constraints(uniform=True)),
    (("params",), Constraints(whole_layers=True, max_attention_free=2)),
]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("kinds,constraints", CASES)
def test_choice_equals_brute_force_and_meets_the_budget(seed, kinds, constraints):
    table = random_table(seed, shared=constraints.uniform)
    rng = random.Random(100 + seed)
    dense_choice = choose(table, [], constraints)  # no budget: every block dense, score 0
    assert dense_choice.objective == 0 and all(v.kind == "dense" for v in dense_choice.attention + dense_choice.mlp)
    budgets = [Budget(k, table.fixed(k) + rng.uniform(0.45, 0.9) * (dense_choice.costs[k] - table.fixed(k)))
               for k in kinds]
    objective, ok, att, mlp = brute_force(table, budgets, constraints)
    if not ok.any():
        with pytest.raises(SecateursError, match="no choice meets|each budget is reachable"):
            choose(table, budgets, constraints)
        return
    choice = choose(table, budgets, constraints)
    best = objective[ok].min()
    assert choice.status == "optimal"
    assert math.isclose(choice.objective, best, rel_tol=1e-9, abs_tol=1e-9)
    for b in budgets:
        assert choice.costs[b.kind] <= b.limit
    winners = np.flatnonzero(ok & np.isclose(objective, best, rtol=1e-9, atol=1e-12))
    if len(winners) == 1:  # a unique optimum: the very same choice
        w = winners[0]
        assert [v.id for v in choice.attention] == [table.layers[i].attention[att[i, w]].id for i in range(LAYERS)]
        assert [v.id for v in choice.mlp] == [table.layers[i].mlp[mlp[i, w]].id for i in range(LAYERS)]


@pytest.mark.parametrize("seed", range(4))
def test_uniform_takes_one_width_and_one_attention_shape(seed):
    table = random_table(seed, shared=True)
    dense = choose(table, [])
    budget = Budget("params", table.fixed_params + 0.6 * (dense.costs["params"] - table.fixed_params))
    try:
        choice = choose(table, budget, Constraints(uniform=True))
    except SecateursError as exc:  # no size offered by every layer fits: said so, checked against brute force
        assert not brute_force(table, [budget], Constraints(uniform=True))[1].any(), exc
        return
    assert choice.objective > 0 and choice.costs["params"] <= budget.limit
    assert len({v.size for v in choice.mlp}) == 1 and len({v.size for v in choice.attention}) == 1
    assert all(v.kind in SIZED for v in choice.attention + choice.mlp)


def test_keep_first_last_and_attention_free_limit():
    layer = LayerOptions(
        (Variant("dense", "attention", "dense", 0.0, 100, 64, size=4),
         Variant("value", "attention", "value", 0.1, 30), Variant("removed", "attention", "removed", 0.2)),
        (Variant("dense", "mlp", "dense", 0.0, 100, size=32), Variant("w8", "mlp", "width", 0.5, 25, size=8)))
    table = Table((layer,) * 5)
    budget = Budget("params", 5 * 200 - 4 * 70)  # forces four attention blocks to the value path or beyond
    free = choose(table, budget)
    assert len(free.attention_free_layers()) == 4
    kept = choose(table, budget, Constraints(keep_first=1, keep_last=1, max_attention_free=2))
    assert kept.attention[0].kind == kept.mlp[0].kind == kept.attention[-1].kind == kept.mlp[-1].kind == "dense"
    assert len(kept.attention_free_layers()) <= 2 and kept.costs["params"] <= budget.limit
    assert kept.objective > free.objective  # the constraints cost score
    with pytest.raises(SecateursError, match="smallest reachable .* is 475"):  # 2 x dense + 3 x (removed + w8)
        choose(table, Budget("params", 474), Constraints(keep_first=1, keep_last=1))


def test_infeasible_budget_names_the_smallest_reachable_cost():
    table = random_table(3)
    least = smallest_cost(table, "params", Constraints(keep_first=2))
    objective, ok, _, _ = brute_force(table, [Budget("params", least)], Constraints(keep_first=2))
    assert ok.any() and not brute_force(table, [Budget("params", least - 1)], Constraints(keep_first=2))[1].any()
    with pytest.raises(SecateursError, match=f"params budget of {least - 1:,} parameters.*smallest reachable.*"
                                             f"keep_first 2.* is {least:,}"):
        choose(table, Budget("params", least - 1), Constraints(keep_first=2))
    assert choose(table, Budget("params", least), Constraints(keep_first=2)).costs["params"] == least


def test_bad_tables_and_settings_are_refused():
    with pytest.raises(SecateursError, match="kind"):
        Variant("x", "mlp", "kv", 0.0, size=1)
    with pytest.raises(SecateursError, match="size"):
        Variant("x", "mlp", "width", 0.0)
    with pytest.raises(SecateursError, match="finite"):
        Variant("x", "mlp", "removed", math.nan)
    with pytest.raises(SecateursError, match="budget kind"):
        Budget("flops", 1)
    with pytest.raises(SecateursError, match="repeat"):
        LayerOptions((Variant("a", "attention", "removed", 0.0),) * 2, (Variant("m", "mlp", "removed", 0.0),))
    table = Table((LayerOptions((Variant("r", "attention", "removed", 0.0),), (Variant("m", "mlp", "removed", 0.),)),))
    with pytest.raises(SecateursError, match="no dense attention"):
        choose(table, [], Constraints(keep_first=1))
    with pytest.raises(SecateursError, match="time limit"):
        choose(random_table(0), [], time_limit=0)


def test_time_limit_is_passed_and_the_status_recorded():
    choice = choose(random_table(1), [], time_limit=10.0)
    assert choice.status == choice.solver["status"] == "optimal" and choice.solver["mip_gap"] == 0.0
    assert choice.to_dict()["layers"][0]["attention"] == "dense4"


@pytest.fixture(scope="module")
def stories():
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(STORIES)


def depth_table(model, scores: dict[int, float]) -> Table:
    """Dense or removed blocks only, a layer's depth score on its removed attention, removed only as whole
    layers: the depth methods' search space."""
    stats = model_stats(model)
    layers = []
    for s in stats.layers:
        layers.append(LayerOptions(
            (Variant("dense", "attention", "dense", 0.0, s.attention_params, size=s.num_kv_heads),
             Variant("removed", "attention", "removed", scores.get(s.index, 1e6))),
            (Variant("dense", "mlp", "dense", 0.0, s.mlp_params + s.other_params, size=s.intermediate_size),
             Variant("removed", "mlp", "removed", 0.0))))
    return Table(tuple(layers), fixed_params=stats.total_params - stats.layer_params)


@pytest.mark.parametrize("k", [1, 2])
def test_depth_scores_choose_the_layers_the_depth_method_removes(stories, k):
    """With depth-bi's real scores on stories260K, the program under a budget of k layers removes the k
    lowest-scored layers, as the depth method does (its first and last layers protected)."""
    model, tok = stories
    calib = load_calibration("tinystories", tok, num_samples=8, max_length=64, seed=0)
    plan = make_plan(model, "depth-bi", layers=k, calibration=calib, max_tokens=256, progress=False)
    rows = plan.provenance["rounds"][0]["table"]
    scores = {row["layer"]: row["scores"]["bi"] for row in rows}
    table = depth_table(model, scores)
    stats = model_stats(model)
    budget = Budget("params", stats.total_params - k * stats.layers[0].params)
    choice = choose(table, budget, Constraints(keep_first=1, keep_last=1, whole_layers=True))
    assert choice.removed_layers() == plan.provenance["layers_removed"]
    assert choice.costs["params"] == stats.total_params - k * stats.layers[0].params


def test_whole_layer_removal_is_both_blocks():
    model = tiny_model("llama-gqa", num_hidden_layers=4)
    table = depth_table(model, {1: 0.3, 2: 0.1})
    stats = model_stats(model)
    choice = choose(table, Budget("params", stats.total_params - stats.layers[2].params),
                    Constraints(whole_layers=True))
    assert choice.removed_layers() == [2] and choice.attention_free_layers() == [2]
    blocks = choose(table, Budget("params", stats.total_params - stats.layers[2].params))
    assert blocks.objective == 0.0  # free to remove MLPs alone (their score here is 0)


def test_report_draws_and_tables_mixed_per_layer_choices(tmp_path):
    """A plan whose layers differ (dense, fewer KV groups and neurons, HARP's value path with its MLP removed,
    a removed layer) gets the per-layer picture and table; a plan that treats every layer alike does not."""
    model = tiny_model("llama-gqa", num_hidden_layers=4)  # 8 query heads in 2 KV groups, 48 neurons
    plan = identity_plan(model)
    assert layer_choice_blocks(plan, tmp_path) == ([], {})
    plan.layers[1].kv_heads, plan.layers[1].neurons = [1], list(range(24))
    plan.layers[2].attention, plan.layers[2].mlp = {"mode": "value", "alpha": 0.5}, {"mode": "removed"}
    plan.layers[3].removed = True
    plan.save(tmp_path / "pruning_plan.json")
    files = write_run_report(tmp_path / "pruning_plan.json", tmp_path / "report")
    md = files["markdown"].read_text()
    assert "### Per-layer choices" in md and "![attention and MLP per layer](layer_choices.png)" in md
    for row in ("| 0 | dense (8/8 heads, 2/2 KV) | dense (48) |", "| 1 | 4/8 heads, 1/2 KV | 24/48 |",
                "| 2 | value path (alpha 0.5) | removed |", "| 3 | layer removed | layer removed |"):
        assert row in md
    png = files["layer_choices"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "layer_choices.png" in files["html"].read_text()
    kinds = [(c["attention"], c["mlp"]) for c in layer_choices(PruningPlan.load(tmp_path / "pruning_plan.json"))]
    assert kinds == [("dense", "dense"), ("kv", "width"), ("value", "removed"), ("removed", "removed")]


def test_fit_line_recovers_a_line_and_clips_at_zero():
    fit = fit_line([(4, 0.9), (2, 0.5), (1, 0.3)])  # 0.1 + 0.2 x
    assert math.isclose(fit.intercept, 0.1, abs_tol=1e-12) and math.isclose(fit.slope, 0.2, rel_tol=1e-12)
    assert math.isclose(fit(3), 0.7) and LinearFit(-1.0, 0.1)(2) == 0.0
    assert fit_line([(2, 0.4), (2, 0.6)]) == LinearFit(0.0, 0.25)  # one width: a line through 0
    with pytest.raises(SecateursError, match="finite"):
        fit_line([(1, math.nan), (2, 1.0)])
    assert widths(4, (1.0, 0.75, 0.5, 0.25)) == [4, 3, 2, 1] and widths(2, (1.0, 0.75, 0.5, 0.25)) == [2, 1]
    with pytest.raises(SecateursError, match="include 1"):
        CostSettings(fractions=(0.5, 0.25))


def fake_measure(calls: list):
    def measure(model, settings):
        calls.append(settings)
        return {"attention": [[2, 2e-4], [1, 1.5e-4]], "mlp": [[48, 3e-4], [24, 2e-4]], "value": 5e-5, "head": 1e-4}
    return measure


def test_decode_costs_are_fitted_cached_and_keyed_by_model_machine_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    model, calls = tiny_model("llama-gqa"), []
    costs = decode_costs(model, measure=fake_measure(calls))
    assert len(calls) == 1 and math.isclose(costs.attention(2), 2e-4) and math.isclose(costs.mlp(36), 2.5e-4)
    assert costs.block("attention", "removed") == costs.block("mlp", "removed") == 0.0
    assert costs.block("attention", "value") == 5e-5 and math.isclose(costs.block("attention", "kv", 1), 1.5e-4)
    assert math.isclose(costs.block("mlp", "width", 24), 2e-4) and costs.head == 1e-4
    assert cache_path(costs.key).parent == tmp_path / "decode_costs" and cache_path(costs.key).exists()
    assert decode_costs(model, measure=fake_measure(calls)) == costs and len(calls) == 1  # read from the cache
    decode_costs(model, refresh=True, measure=fake_measure(calls))
    assert len(calls) == 2
    cache_path(costs.key).write_text("{not json")  # an unreadable cache is measured again and replaced
    assert decode_costs(model, measure=fake_measure(calls)) == costs and len(calls) == 3
    other = decode_costs(tiny_model("llama-gqa", seed=1), measure=fake_measure(calls))  # other weights
    wider = decode_costs(model, CostSettings(context=1024), measure=fake_measure(calls))
    assert len(calls) == 5 and len({costs.key, other.key, wider.key}) == 3
    machine = machine_key(model)
    assert machine["dtype"] == "float64" and machine["device"] == "cpu" and machine["cpu_count"]
    assert cache_key("m", machine, CostSettings()) != cache_key("m", {**machine, "gpu": "another"}, CostSettings())


def test_measured_decode_costs_have_every_width_and_leave_the_model_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    model = tiny_model("llama-gqa")  # 2 KV groups, 48 neurons
    layers = list(get_adapter(model).decoder_layers(model))
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    costs = decode_costs(model, CostSettings(context=8, tokens=2, repeats=2, warmup=0))
    assert list(get_adapter(model).decoder_layers(model)) == layers
    assert torch.equal(model(ids).logits, before)
    assert [g for g, _ in costs.measured["attention"]] == [2, 1, 1, 1]
    assert [n for n, _ in costs.measured["mlp"]] == [48, 36, 24, 12]
    values = [s for _, s in costs.measured["attention"] + costs.measured["mlp"]] + [costs.value, costs.head]
    assert all(math.isfinite(v) and v > 0 for v in values)


def test_uniform_mlp_search_at_amp_mlps_parameters_keeps_amp_mlps_neurons(stories):
    """The search restricted to uniform MLP widths (every attention variant but dense left out of the
    library before scoring, no layer kept dense), its budget exactly the parameters of amp-mlp's plan at
    ratio 0.2 on stories260K, and a grid holding amp-mlp's width between a narrower and a wider one,
    chooses amp-mlp's width and, in every layer, amp-mlp's very neurons. The library ranks neurons by
    AMP's own score (mean |activation|, averaged per prompt), so the indices are the claim: the library's
    ranking (float64 argsort of a Gram statistics pass) is amp-mlp's (its own statistics pass, its
    selection). Re-fit off on both sides: the plans are equal, and surgery without re-fit gives the same
    bytes."""
    model, tok = stories
    calib = load_calibration("tinystories", tok, num_samples=8, max_length=64, seed=0)
    amp = make_plan(model, "amp-mlp", 0.2, calibration=calib, progress=False)
    inter = model.config.intermediate_size
    widths_kept = {len(lp.neurons) for lp in amp.layers}
    assert len(widths_kept) == 1 and all(lp.heads is None and lp.kv_heads is None for lp in amp.layers)
    width = widths_kept.pop()
    assert 0 < width < inter
    amp_model, _ = prune(copy.deepcopy(model), plan=amp, reconstruct="none", progress=False)
    budget = Budget("params", model_stats(amp_model).total_params)

    layers = list(range(model.config.num_hidden_layers))
    stats = collect_statistics(model, calib, progress=False, gram=True)
    library = build_library(model, stats, layers, alphas={}, sized_only=True,
                            mlp_fractions=(0.25, width / inter, 0.875))
    library = dataclasses.replace(library, variants={i: [v for v in vs if v.block == "mlp" or v.kind == "dense"]
                                                     for i, vs in library.variants.items()})
    assert {v.size for v in library.of(0, "mlp")} == {inter, 150, width, 43}
    scores = score_library(model, library, cache_scoring_data(model, calib, progress=False), progress=False)
    choice = choose(search_table(model, library, scores), budget, Constraints(0, 0, uniform=True))
    assert [v.size for v in choice.mlp] == [width] * len(layers) and {v.kind for v in choice.attention} == {"dense"}
    assert choice.costs["params"] == budget.limit  # the library's accounting is the pruned model's
    narrower = sum(scores[(i, "mlp", "width43")] for i in layers)
    assert choice.objective < narrower  # the width fits the budget best, not the only one that fits
    tighter = choose(search_table(model, library, scores), Budget("params", budget.limit - 1),
                     Constraints(0, 0, uniform=True))
    assert [v.size for v in tighter.mlp] == [43] * len(layers)  # the budget is exactly amp-mlp's width

    plan = identity_plan(model)
    plan.layers = list(chosen_plans(library, choice).values())
    assert plan.layers == amp.layers
    searched, _ = prune(copy.deepcopy(model), plan=plan, reconstruct="none", progress=False)
    ours, theirs = searched.state_dict(), amp_model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape and tensor.numpy().tobytes() == theirs[name].numpy().tobytes(), name
