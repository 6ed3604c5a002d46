"""The architecture search's block library and its KL scoring: a score from cached layer inputs equals
the KL of the whole model with the variant applied by surgery; every variant is its LayerPlan fragment
applied with the dense re-fit, and costs what it says; removed-layer scores rank layers as the depth
criterion computes them; `--method search` makes a plan within budget that saves, reloads and re-applies
to the same bytes."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import STORIES, TINYSTORIES_TEXT, benchmark_module, padded_calibration, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateurs.adapters import get_adapter
from secateurs.calibration.data import load_calibration
from secateurs.calibration.statistics import collect_statistics, zero_padding_hooks
from secateurs.cli.main import main
from secateurs.criteria.depth_scores import capture_traces, final_hidden, score_layers
from secateurs.errors import SecateursError
from secateurs.evaluation.report import layer_choices
from secateurs.methods import make_plan, prune
from secateurs.methods.search import (
    best_candidate,
    candidate_choices,
    choose_again,
    chosen_plans,
    recorded_scores,
    search_table,
)
from secateurs.planning.geometry import identity_plan
from secateurs.planning.plan import LayerPlan, PruningPlan
from secateurs.search.choice import Budget, Constraints, choose
from secateurs.search.costs import DecodeCosts, LinearFit
from secateurs.search.library import REFIT, BlockVariant, Library, build_library, dense_block_params, fit_value_alpha
from secateurs.search.scoring import after_samples, cache_scoring_data, score_library, scoring_calibration
from secateurs.storage.pruned import load_pruned, save_pruned
from secateurs.surgery.reconstruction import apply_plan_dense

FAMILIES = ("llama-gqa", "llama-bias", "qwen2", "gemma2", "phi3")


def library_of(model, calibration, layers, fractions=(0.25, 0.5)):
    stats = collect_statistics(model, calibration, progress=False, gram=True)
    data = cache_scoring_data(model, calibration, progress=False)
    alphas = {i: fit_value_alpha(model, i, data.inputs[i], data.kwargs[i], data.masks) for i in layers}
    return build_library(model, stats, layers, alphas=alphas, mlp_fractions=fractions), data


def surgery(model, library: Library, lp: LayerPlan):
    """A copy of the model with one layer's plan applied by surgery and the dense re-fit."""
    plan = identity_plan(model)
    plan.layers[lp.index] = lp
    return apply_plan_dense(copy.deepcopy(model), plan, library.stats, REFIT)


@torch.no_grad()
def whole_model_kl(dense, pruned, calibration) -> float:
    """Mean KL(dense || pruned) per real token, both models run whole on the calibration batches (padding
    zeroed after every layer, as calibration does: gemma2's fully padded sliding windows give NaN)."""
    state: dict = {}
    handles = [h for m in (dense, pruned) for h in zero_padding_hooks(get_adapter(m).decoder_layers(m), state)]
    total, count = 0.0, 0
    try:
        for batch in calibration.batches:
            state["mask"] = batch["attention_mask"]
            mask = batch["attention_mask"].bool()
            p = torch.log_softmax(dense(**batch).logits.double(), -1)[mask]
            q = torch.log_softmax(pruned(**batch).logits.double(), -1)[mask]
            total += float((p.exp() * (p - q)).sum())
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return total / count


@pytest.mark.parametrize("name", FAMILIES)
def test_scores_from_cached_layer_inputs_equal_the_whole_model_with_the_variant(name):
    model = tiny_model(name)
    calibration = padded_calibration()
    library, data = library_of(model, calibration, [1, 2])
    scores = score_library(model, library, data, progress=False)
    assert len(scores) == sum(len(v) for v in library.variants.values())
    for (i, block, variant), kl in scores.items():
        lp = library.layer_plan(i, **{block: variant})
        expected = whole_model_kl(model, surgery(model, library, lp), calibration)
        assert kl == pytest.approx(expected, rel=1e-9, abs=1e-12), (i, block, variant)
        assert (kl == 0) == (variant == "dense"), (i, block, variant)
    removed = library.layer_plan(1, "removed", "removed")  # both blocks removed: the whole layer
    assert removed.removed
    layer = dataclasses.replace(library.get(1, "attention", "removed"), fragment={"removed": True})
    cached = score_library(model, Library(model, library.stats, {1: [layer]}, base=library.base), data,
                           progress=False)[(1, "attention", "removed")]
    assert cached == pytest.approx(whole_model_kl(model, surgery(model, library, removed), calibration), rel=1e-9)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_variant_is_its_fragment_applied_by_surgery_and_costs_what_it_says(name):
    model = tiny_model(name)
    library, _ = library_of(model, padded_calibration(), [2], fractions=(0.125, 0.5, 0.875))
    adapter = get_adapter(model)
    dense_layer = adapter.decoder_layers(model)[2]
    dense_attention, dense_mlp = dense_block_params(adapter, dense_layer)
    kinds = {(v.block, v.kind) for v in library.variants[2]}
    assert kinds == {("attention", k) for k in ("dense", "kv", "value", "removed")} | {
        ("mlp", k) for k in ("dense", "width", "removed")}
    for v in library.variants[2]:
        lp = library.layer_plan(2, **{v.block: v.id})
        built = library.module(lp)
        cut = adapter.decoder_layers(surgery(model, library, lp))[2]
        assert built.state_dict().keys() == cut.state_dict().keys(), v.id
        assert all(torch.equal(t, cut.state_dict()[k]) for k, t in built.state_dict().items()), v.id
        size = sum(p.numel() for p in cut.parameters())
        other = dense_mlp if v.block == "attention" else dense_attention
        assert v.params == size - other, (v.id, v.params, size - other)
        shape = adapter.layer_shape(cut)
        kv_bytes = 2 * shape.num_kv_heads * adapter.head_dim(cut) * 8 if v.kind in ("dense", "kv") else 0
        assert v.kv_bytes == (kv_bytes if v.block == "attention" else 0), v.id
    assert [v.size for v in library.of(2, "mlp") if v.kind == "width"] == [42, 24, 6]  # 7/8, 1/2, 1/8 of 48
    assert all(len(library.variants[i]) == 2 for i in (0, 1, 3))  # dense blocks only outside the layers asked
    # the groups kept are the best by the sum of AMP's head scores
    scores = library.stats.attention[2].unit_mean("prompt")
    shape = adapter.layer_shape(dense_layer)
    group_scores = scores.reshape(shape.num_kv_heads, shape.group_size).sum(1)
    kv1 = library.get(2, "attention", "kv1")
    assert kv1.fragment["kv_heads"] == [int(group_scores.argmax())]


def test_the_value_alpha_is_the_least_squares_scale_of_the_value_path():
    """Scaling the layer's v_proj (and bias) by s scales the value path only (the attention probabilities do
    not depend on V): the fitted alpha falls by s, up to its 6-digit rounding."""
    model = tiny_model("llama-bias")
    calibration = padded_calibration()
    data = cache_scoring_data(model, calibration, progress=False)
    alpha = fit_value_alpha(model, 1, data.inputs[1], data.kwargs[1], data.masks)
    attention = get_adapter(model).attention(get_adapter(model).decoder_layers(model)[1])
    with torch.no_grad():
        attention.v_proj.weight *= 2.0
        attention.v_proj.bias *= 2.0
        attention.o_proj.weight /= 2.0
    again = fit_value_alpha(model, 1, data.inputs[1], data.kwargs[1], data.masks)
    assert again == pytest.approx(alpha, rel=1e-5) and 0 < alpha <= 10


@pytest.fixture(scope="module")
def stories():
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    return model, load_calibration(str(TINYSTORIES_TEXT), tokenizer, num_samples=8, max_length=64, seed=0)


def test_removed_layer_scores_are_the_depth_criterions_skip_and_rank_layers_as_its_nll(stories):
    """With the variants {dense, layer removed} only, a layer's score is the KL of the depth methods'
    own skipped-layer forward (depth_scores.final_hidden), and the layers rank as depth-ppl's NLL with
    the layer skipped ranks them."""
    model, calibration = stories
    stats = collect_statistics(model, calibration, progress=False, gram=True)
    data = cache_scoring_data(model, calibration, progress=False)
    variants = {i: [BlockVariant(i, "attention", "layer", "removed", {"removed": True}, 0, 0, 0, "layer/removed")]
                for i in range(5)}
    library = Library(model, stats, variants, base=identity_plan(model))
    scores = {i: kl for (i, _, _), kl in score_library(model, library, data, progress=False).items()}
    traces = capture_traces(model, calibration, max_tokens=None, progress=False)
    adapter = get_adapter(model)
    for i in range(5):
        total = 0.0
        with torch.inference_mode():
            for trace in traces:
                p = torch.log_softmax(adapter.logits(model, final_hidden(model, trace), torch.float64), -1)
                q = torch.log_softmax(adapter.logits(model, final_hidden(model, trace, skip=[i]), torch.float64), -1)
                total += float((p.exp() * (p - q))[trace.mask].sum())
        assert scores[i] == pytest.approx(total / data.tokens, rel=1e-9)
    nll = score_layers(model, traces, list(range(5)), ("nll",), progress=False).scores["nll"]
    assert sorted(range(5), key=scores.get) == sorted(range(5), key=nll.get)


def test_search_prunes_within_budget_and_the_plan_reapplies_to_the_same_bytes(tmp_path, capsys):
    common = ["--calib", str(TINYSTORIES_TEXT), "--calib-samples", "8", "--calib-length", "64"]
    out, again = tmp_path / "search", tmp_path / "again"
    assert main(["prune", str(STORIES), "--method", "search", "--ratio", "0.2", "--scoring-tokens", "128",
                 *common, "--out", str(out)]) == 0
    plan = PruningPlan.load(out)
    p = plan.provenance
    assert p["method"] == "search" and p["budget"] == "params" and p["scoring_tokens"] >= 128
    assert p["reconstruction"]["mode"] == "sequential"
    assert p["params_before"] - p["params_after"] >= p["requested_params_removed"]
    assert p["params_after"] == p["choice"]["costs"]["params"]
    rows = p["scores"]
    assert {r["layer"] for r in rows} == {1, 2, 3, 4} and all(r["kl"] >= 0 for r in rows)
    assert {"layer", "block", "variant", "params", "kv_bytes", "kl"} <= set(rows[0])
    assert main(["prune", str(STORIES), "--plan", str(out / "pruning_plan.json"), *common, "--out", str(again)]) == 0
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert json.loads((again / "pruning_plan.json").read_text())["layers"] == \
        json.loads((out / "pruning_plan.json").read_text())["layers"]
    model = load_pruned(out)
    assert sum(t.numel() for t in {id(t): t for t in model.parameters()}.values()) == p["params_after"]
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    assert torch.isfinite(model(ids).logits).all()


def test_scoring_tokens_are_the_first_whole_samples_holding_enough_tokens():
    calibration = padded_calibration()  # samples of 7, 4, 10 and 3 real tokens
    assert scoring_calibration(calibration, 8).description["scoring_tokens"] == 11
    chosen = scoring_calibration(calibration, 12)
    assert [b["input_ids"].shape[0] for b in chosen.batches] == [2, 1]
    assert chosen.description["scoring_tokens"] == 21 and chosen.num_tokens == 21
    assert scoring_calibration(calibration, 10**6).num_tokens == calibration.num_tokens
    rest = after_samples(calibration, 3)  # what the candidates are measured on: the samples after the scoring's
    assert [b["attention_mask"].sum(1).tolist() for b in rest.batches] == [[3]]
    assert after_samples(calibration, 1).num_tokens == 17 and not after_samples(calibration, 4).batches


@pytest.fixture(scope="module")
def stories32():
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    return model, tokenizer, load_calibration(str(TINYSTORIES_TEXT), tokenizer, num_samples=8, max_length=64, seed=0)


def test_uniform_search_keeps_one_shape_that_stock_from_pretrained_loads(stories32, tmp_path):
    model, tokenizer, calibration = stories32
    with pytest.raises(SecateursError, match="no layer can stay dense"):  # before any scoring
        make_plan(model, "search", 0.15, tokenizer=tokenizer, calibration=calibration, uniform=True, keep_first=1)
    pruned, plan = prune(copy.deepcopy(model), tokenizer, method="search", ratio=0.15, calibration=calibration,
                         uniform=True, scoring_tokens=64, progress=False)  # no layer kept dense by default
    kinds = {(r["block"], r["variant"].rstrip("0123456789")) for r in plan.provenance["scores"]}
    assert kinds == {("attention", "dense"), ("attention", "kv"), ("mlp", "dense"), ("mlp", "width")}
    assert len(set(plan.pruned_shapes())) == 1 and len(plan.pruned_shapes()) == 5
    assert plan.provenance["params_after"] <= plan.provenance["params_before"] - plan.provenance[
        "requested_params_removed"]
    save_pruned(pruned, plan, tmp_path / "u", tokenizer=tokenizer)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "u", dtype=torch.float32).eval()
    ids = calibration.batches[0]["input_ids"][:2]
    assert torch.allclose(stock(ids).logits, pruned(ids).logits, atol=1e-5)


def test_a_kv_budget_and_a_second_round_scored_around_the_first_choice(stories32):
    model, tokenizer, calibration = stories32
    plan = make_plan(model, "search", 0.5, tokenizer=tokenizer, calibration=calibration, budget="kv", rounds=2,
                     keep_first=0, max_attention_free=1, mlp_fractions=[0.5], scoring_tokens=64, progress=False)
    p = plan.provenance
    assert p["choice"]["costs"]["kv"] <= 0.5 * p["dense_kv_bytes_per_token"]
    assert len([lp for lp in plan.layers if lp.removed or lp.attention]) <= 1
    first = {(r["layer"], r["block"], r["variant"]): r["kl"] for r in p["scores"] if r["round"] == 1}
    second = {(r["layer"], r["block"], r["variant"]): r["kl"] for r in p["scores"] if r["round"] == 2}
    assert first.keys() == second.keys()
    assert any(second[k] > 0 for k in second if k[2] == "dense")  # around the first choice, dense is not free


def test_the_benchmarks_picture_of_a_chosen_architecture_is_the_reports(stories32):
    """benchmarks/search.py draws a search row from its `architecture` string: the per-layer choices it reads
    back equal `secateurs report`'s of the plan (HARP's alpha aside, which the string leaves out)."""
    bench = benchmark_module("search")
    model, tokenizer, calibration = stories32
    plan = make_plan(model, "search", 0.5, tokenizer=tokenizer, calibration=calibration, budget="kv", keep_first=0,
                     max_attention_free=2, mlp_fractions=[0.5], scoring_tokens=64, progress=False)
    expected = [{**c, "alpha": None} for c in layer_choices(plan)]
    assert len({c["attention"] for c in expected}) >= 2  # the budget leaves attention of more than one kind
    assert bench.choices_of(bench.architecture(plan), plan.base["layer_shapes"]) == expected


def test_a_decode_budget_reads_the_decode_cost_table(stories32, monkeypatch):
    """The decode budget prices every variant from the decode-cost table (here a fixed table: the measuring is
    secateurs.search.costs' own test) and removes its share of the dense model's decode seconds."""
    model, tokenizer, calibration = stories32
    table = DecodeCosts(attention=LinearFit(1e-4, 1e-3), mlp=LinearFit(0.0, 1e-5), value=3e-4, head=2e-3,
                        context=512)
    monkeypatch.setattr("secateurs.methods.search.decode_costs", lambda model: table)
    plan = make_plan(model, "search", 0.3, tokenizer=tokenizer, calibration=calibration, budget="decode",
                     mlp_fractions=[0.5], scoring_tokens=64, progress=False)
    p = plan.provenance
    dense = table.head + 5 * (table.attention(4) + table.mlp(172))
    assert p["dense_decode_seconds"] == pytest.approx(dense)
    assert p["choice"]["costs"]["decode"] <= 0.7 * dense + 1e-15


def test_choose_again_picks_another_budget_from_the_recorded_scores_as_a_full_search_would(stories32, monkeypatch):
    """A plan chosen again from an earlier search plan's recorded scores is the plan a full search at that
    budget makes, without scoring a variant; other calibration data or library settings are refused."""
    model, tokenizer, calibration = stories32
    common = {"tokenizer": tokenizer, "calibration": calibration, "progress": False}
    first = make_plan(model, "search", 0.2, mlp_fractions=[0.5], scoring_tokens=64, **common)
    full = make_plan(model, "search", 0.4, mlp_fractions=[0.5], scoring_tokens=64, **common)
    kv = make_plan(model, "search", 0.5, budget="kv", mlp_fractions=[0.5], scoring_tokens=64, **common)

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr("secateurs.methods.search.score_library", no_scoring)
    rows = first.provenance["scores"]
    assert recorded_scores(first) == {(r["layer"], r["block"], r["variant"]): r["kl"] for r in rows}
    same = choose_again(model, first, 0.2, **common)
    again = choose_again(model, first, 0.4, **common)
    again_kv = choose_again(model, first, 0.5, budget="kv", **common)
    for made, chosen in ((first, same), (full, again), (kv, again_kv)):
        assert chosen.layers == made.layers
        picked, expected = chosen.provenance["choice"], made.provenance["choice"]
        assert picked["costs"] == expected["costs"]  # scores recorded to 8 digits: the objective to ~1e-8
        assert picked["objective"] == pytest.approx(expected["objective"], rel=1e-7)
        assert chosen.provenance["scores"] == first.provenance["scores"]
        assert chosen.provenance["scores_measured_before"] is True
    assert again.provenance["choice"]["costs"]["params"] <= first.provenance["choice"]["costs"]["params"]
    other = load_calibration(str(TINYSTORIES_TEXT), tokenizer, num_samples=8, max_length=64, seed=1)
    with pytest.raises(SecateursError, match="other calibration data"):
        choose_again(model, first, 0.3, tokenizer=tokenizer, calibration=other, progress=False)
    with pytest.raises(SecateursError, match="no score for"):
        choose_again(model, first, 0.3, mlp_fractions=[0.25], **common)
    with pytest.raises(SecateursError, match="second round"):
        choose_again(model, first, 0.3, rounds=2, **common)


def test_each_candidate_architectures_kl_is_the_whole_model_with_its_blocks_and_the_least_is_kept():
    """The candidates (the program's choice, its choices among MLP variants only, attention variants only and
    uniform shapes) are measured whole: each KL equals the model with every chosen block applied by surgery
    and the dense re-fit, run whole; the one kept has the least KL."""
    model = tiny_model("llama-gqa")
    calibration = padded_calibration()
    layers = list(range(len(get_adapter(model).decoder_layers(model))))
    library, data = library_of(model, calibration, layers)
    table = search_table(model, library, score_library(model, library, data, progress=False))
    dense = table.fixed_params + sum(lo.attention[0].params + lo.mlp[0].params for lo in table.layers)
    budget, constraints = Budget("params", 0.8 * dense), Constraints()
    program = choose(table, budget, constraints)
    candidates = candidate_choices(table, budget, constraints, program)
    assert {"program", "mlp only", "attention only", "uniform"} <= candidates.keys()
    assert all(a.kind == "dense" for a in candidates["mlp only"].attention)
    assert all(m.kind == "dense" for m in candidates["attention only"].mlp)
    kept, records = best_candidate(model, library, data, table, budget, constraints, program)
    assert [r["name"] for r in records][0] == "program" and sum(r["picked"] for r in records) == 1
    for r in records:
        choice = candidates[r["name"]]
        plan = identity_plan(model)
        plan.layers = list(chosen_plans(library, choice).values())
        pruned = apply_plan_dense(copy.deepcopy(model), plan, library.stats, REFIT)
        assert r["kl"] == pytest.approx(whole_model_kl(model, pruned, calibration), rel=1e-7), r["name"]
        assert r["params"] == choice.costs["params"] <= budget.limit
    best = min(records, key=lambda r: r["kl"])
    assert best["picked"] and (kept.attention, kept.mlp) == (candidates[best["name"]].attention,
                                                             candidates[best["name"]].mlp)
    first_kept = Constraints(keep_first=1)
    uniform = candidate_choices(table, budget, first_kept, choose(table, budget, first_kept))["uniform"]
    assert uniform.attention[0].kind == uniform.mlp[0].kind == "dense"  # kept dense; one shape in the others
    assert len({(a.kind, a.size, m.kind, m.size) for a, m in zip(uniform.attention[1:], uniform.mlp[1:])}) == 1
    assert uniform.costs["params"] == sum(a.params + m.params for a, m in zip(uniform.attention, uniform.mlp)) + \
        table.fixed_params <= budget.limit


def test_without_candidates_the_search_keeps_the_programs_choice(stories32):
    model, tokenizer, calibration = stories32
    common = dict(tokenizer=tokenizer, calibration=calibration, mlp_fractions=[0.5], scoring_tokens=64,
                  progress=False)
    checked = make_plan(model, "search", 0.3, **common)
    plain = make_plan(model, "search", 0.3, candidates=False, **common)
    assert "candidates" not in plain.provenance
    records = checked.provenance["candidates"]
    assert {r["name"] for r in records} >= {"program", "uniform"}  # uniform outside the first layer, kept dense
    assert checked.provenance["candidate_samples_held_out"] is True  # measured on samples the scores did not see
    program = next(r for r in records if r["name"] == "program")
    assert program["params"] == plain.provenance["choice"]["costs"]["params"]
    picked = next(r for r in records if r["picked"])
    assert picked["kl"] == min(r["kl"] for r in records)
    assert checked.provenance["choice"]["costs"]["params"] == picked["params"]
    assert (checked.layers == plain.layers) == (picked["name"] == "program")
