"""Width pruning beyond the paper (issue 15): least-squares reconstruction, global per-layer
allocation and the data-chosen attention share keep the exactness and round-trip guarantees."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from typing import ClassVar

import pytest
import torch
from conftest import STORIES, TINYSTORIES_TEXT, input_ids, tiny_model
from transformers import AutoModelForCausalLM

from secateurs.adapters import get_adapter
from secateurs.calibration.data import Calibration
from secateurs.calibration.statistics import InputStats, Statistics, check_finite, collect_statistics
from secateurs.cli.main import build_parser, main
from secateurs.errors import SecateursError
from secateurs.methods import api, make_plan, prune
from secateurs.methods.amp import Amp
from secateurs.methods.options import AmpOptions
from secateurs.planning import split
from secateurs.planning.budget import Geometry, target_params
from secateurs.planning.plan import PruningPlan
from secateurs.settings.values import CommandLineError
from secateurs.storage.loading import load_model
from secateurs.storage.pruned import load_pruned, save_pruned
from secateurs.surgery.reconstruction import Reconstruction, prune_and_refit_layer, ridge_refit


def _calibration(seed: int = 0) -> Calibration:
    """Four right-padded batches of two 16-token rows (112 real tokens) over a 64-token vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for lengths in ([16, 12], [16, 9], [14, 16], [16, 13]):
        ids = torch.randint(1, 64, (2, 16), generator=gen)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            mask[row, :n] = 1
            ids[row, n:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return Calibration(batches, {"source": "test"}, f"width-{seed}")


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids() if ids is None else ids).logits


def _down_proj_inputs(model, calibration, index: int) -> torch.Tensor:
    """The real-token inputs of layer `index`'s MLP output projection, (tokens, neurons)."""
    adapter = get_adapter(model)
    seen = []
    linear = adapter.mlp_output_linear(adapter.decoder_layers(model)[index])
    handle = linear.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        for batch in calibration.batches:
            with torch.no_grad():
                model(**batch)
    finally:
        handle.remove()
    return torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, calibration.batches)])


@pytest.mark.parametrize("mode", ["sequential", "dense"])
def test_reconstruction_with_everything_kept_returns_the_original_weights(mode):
    model = tiny_model("llama-bias")
    pruned, plan = prune(copy.deepcopy(model), method="amp", ratio=0.0, calibration=_calibration(), reconstruct=mode,
                         progress=False)
    assert plan.provenance["reconstruction"]["mode"] == mode
    for (name, a), (_, b) in zip(model.state_dict().items(), pruned.state_dict().items()):
        assert torch.equal(a, b), name
    stats = collect_statistics(model, _calibration(), progress=False, gram=True)
    down = get_adapter(model).mlp_output_linear(get_adapter(model).decoder_layers(model)[0])
    everything = torch.arange(down.in_features)
    weight, bias = ridge_refit(down.weight, stats.mlp[0].gram, everything, 0.1, bias=down.bias,
                               channel_sum=stats.mlp[0].channel_sum, tokens=stats.mlp[0].tokens, fit_bias=True)
    torch.testing.assert_close(weight, down.weight, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(bias, down.bias, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("fit_bias", [False, True])
def test_refit_lowers_the_output_error_and_equals_a_direct_ridge_lstsq(fit_bias):
    model = tiny_model("llama-gqa")
    calibration = _calibration()
    stats = collect_statistics(model, calibration, progress=False, gram=True)
    x = _down_proj_inputs(model, calibration, 1)
    assert x.shape[0] == stats.mlp[1].tokens
    torch.testing.assert_close(stats.mlp[1].gram, x.t() @ x, rtol=1e-10, atol=1e-10)
    weight = get_adapter(model).mlp_output_linear(get_adapter(model).decoder_layers(model)[1]).weight.detach()
    kept = torch.arange(0, weight.shape[1], 2)
    damping = 0.1
    new_weight, new_bias = ridge_refit(weight, stats.mlp[1].gram, kept, damping, channel_sum=stats.mlp[1].channel_sum,
                                       tokens=stats.mlp[1].tokens, fit_bias=fit_bias)
    target = x @ weight.t()
    fitted = x[:, kept] @ new_weight.t() + (new_bias if fit_bias else 0)
    sliced = x[:, kept] @ weight[:, kept].t()
    assert (target - fitted).pow(2).sum() <= (target - sliced).pow(2).sum()
    # the same problem as one least-squares system: [X_S 1; sqrt(lam) I 0] theta = [Y; sqrt(lam) W_S^T]
    lam = damping * float(stats.mlp[1].gram.diagonal().mean())
    k = len(kept)
    design = torch.cat([x[:, kept], torch.ones(len(x), 1, dtype=x.dtype)], 1) if fit_bias else x[:, kept]
    ridge = torch.zeros(k, design.shape[1], dtype=x.dtype)
    ridge[:, :k] = lam ** 0.5 * torch.eye(k, dtype=x.dtype)
    solution = torch.linalg.lstsq(torch.cat([design, ridge]), torch.cat([target, lam ** 0.5 * weight[:, kept].t()])
                                  ).solution
    torch.testing.assert_close(new_weight, solution[:k].t(), rtol=1e-6, atol=1e-7)
    if fit_bias:
        torch.testing.assert_close(new_bias, solution[k], rtol=1e-6, atol=1e-7)


def test_sequential_reconstruction_fits_each_layer_on_the_pruned_layers_below():
    """Layer 1's fit uses the Gram of its inputs after layer 0 was pruned and re-fitted: it equals a
    dense-mode fit computed on the model whose layer 0 alone is already done."""
    model, calibration = tiny_model("qwen2"), _calibration()
    plan = make_plan(model, "amp", 0.3, calibration=calibration, progress=False)
    sequential, _ = prune(copy.deepcopy(model), plan=plan, calibration=calibration, reconstruct="sequential",
                          progress=False)
    first = PruningPlan.from_dict(plan.to_dict())
    for lp in first.layers[1:]:
        lp.heads = lp.kv_heads = lp.neurons = None
    step, _ = prune(copy.deepcopy(model), plan=first, calibration=calibration, reconstruct="dense", progress=False)
    stats = collect_statistics(step, calibration, progress=False, gram=True)
    expected = copy.deepcopy(step)

    adapter = get_adapter(expected)
    prune_and_refit_layer(adapter, adapter.decoder_layers(expected)[1], plan, plan.layers[1], stats.attention[1],
                          stats.mlp[1], Reconstruction("dense"))
    got = adapter.decoder_layers(sequential)[1]
    want = adapter.decoder_layers(expected)[1]
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("name, method", [("llama-gqa", "amp"), ("phi", "amp"), ("phi3", "wanda-sp"),
                                          ("gemma2", "amp"), ("qwen2", "flap"), ("llama-bias", "magnitude"),
                                          ("mistral", "random"), ("qwen3", "amp-mlp")])
def test_every_width_method_reconstructs_and_round_trips(tmp_path, name, method):
    model, calibration = tiny_model(name), _calibration()
    plain, _ = prune(copy.deepcopy(model), method=method, ratio=0.3, calibration=calibration, reconstruct="none",
                     progress=False)
    fitted, plan = prune(copy.deepcopy(model), method=method, ratio=0.3, reconstruct="sequential", progress=False,
                         calibration=calibration)
    adapter = get_adapter(fitted)
    assert plan.pruned_shapes() == [(s.num_heads, s.num_kv_heads, s.intermediate_size)
                                    for s in map(adapter.layer_shape, adapter.decoder_layers(fitted))]
    assert not torch.equal(_logits(plain), _logits(fitted))
    out = save_pruned(fitted, plan, tmp_path / "out")
    assert torch.equal(_logits(load_pruned(out)), _logits(fitted))


def test_reconstruction_cuts_the_calibration_error_of_the_pruned_model():
    model, calibration = tiny_model("llama-gqa"), _calibration()
    dense = torch.cat([_logits(model, b["input_ids"])[b["attention_mask"].bool()] for b in calibration.batches])

    def error(pruned):
        got = torch.cat([_logits(pruned, b["input_ids"])[b["attention_mask"].bool()] for b in calibration.batches])
        return float((got - dense).pow(2).mean())

    plan = make_plan(model, "amp", 0.3, calibration=calibration, progress=False)
    plain = error(prune(copy.deepcopy(model), plan=plan, progress=False)[0])
    for mode in ("dense", "sequential"):
        assert error(prune(copy.deepcopy(model), plan=plan, calibration=calibration, reconstruct=mode,
                           progress=False)[0]) < plain


@pytest.mark.parametrize("name, gqa", [("llama-gqa", "groups"), ("llama-gqa", "in-group"), ("qwen2", "groups"),
                                       ("phi3", "in-group"), ("gemma2", "groups")])
def test_global_allocation_meets_the_target_within_one_structure_and_keeps_gqa(tmp_path, name, gqa):
    model, calibration = tiny_model(name, num_hidden_layers=6), _calibration()
    geo = Geometry.of(model)
    target, _ = target_params(geo, 0.3)
    plan = make_plan(model, "amp", 0.3, calibration=calibration, allocation="global", split=0.3, gqa=gqa,
                     progress=False)
    largest = max(max(c.neuron, c.kv_head + c.head * s.group_size) for c, s in zip(geo.costs, geo.shapes))
    assert abs(plan.provenance["achieved_params_removed"] - target) <= largest
    assert plan.provenance["allocation"] == "global"
    shapes = plan.pruned_shapes()  # resolves every layer under the GQA rule
    assert len(set(shapes)) > 1  # layers differ
    for (heads, kv, _), lp in zip(shapes, plan.layers):
        full_heads, full_kv, _ = plan.layer_shape(lp.index)
        assert heads % kv == 0 and (kv == full_kv if gqa == "in-group" else heads // kv == full_heads // full_kv)
    pruned, _ = prune(copy.deepcopy(model), plan=plan, progress=False)
    out = save_pruned(pruned, plan, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["secateurs"]["heterogeneous"] and not config["secateurs"]["stock_loadable"]
    assert torch.equal(_logits(load_pruned(out)), _logits(pruned))


def test_chosen_split_is_recorded_and_reapplying_the_plan_reproduces_the_model(tmp_path):
    model, calibration = tiny_model("llama-gqa"), _calibration()
    pruned, plan = prune(copy.deepcopy(model), method="amp", ratio=0.3, calibration=calibration, allocation="global",
                         split="search", reconstruct="sequential", progress=False)
    split = plan.provenance["split"]
    assert split["rule"] == "search" and len(split["candidates"]) >= 3
    assert split["attention_share"] == min(split["candidates"], key=lambda c: (c["kl"], c["attention_share"]))[
        "attention_share"]
    assert all(c["kl"] >= 0 for c in split["candidates"])
    path = plan.save(tmp_path / "plan.json")
    again, _ = prune(copy.deepcopy(model), plan=PruningPlan.load(path), calibration=calibration, progress=False)
    for (name, a), (_, b) in zip(pruned.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    out = save_pruned(pruned, plan, tmp_path / "out")
    assert torch.equal(_logits(load_pruned(out)), _logits(pruned))


def test_split_candidates_keeping_the_same_structures_are_scored_once(monkeypatch):
    """On a GQA model several shares round to the same whole KV groups; the search masks each
    distinct plan once and gives the shares that share it the same KL."""
    model, calibration = tiny_model("llama-gqa"), _calibration()
    few = make_plan(model, "amp", 0.1, calibration=calibration, split="balanced", progress=False)
    many = make_plan(model, "amp", 0.3, calibration=calibration, split="balanced", progress=False)
    twin = PruningPlan.from_dict(few.to_dict())  # another object, the same structures
    masked_plans = []
    real_masked = split.masked
    monkeypatch.setattr(split, "masked", lambda m, p: masked_plans.append(p) or real_masked(m, p))
    plans = {0.0: few, 0.5: twin, 1.0: many}
    share, evidence = split.choose_attention_share(model, calibration, list(plans), plans.__getitem__, samples=4,
                                                   progress=False)
    assert {id(p) for p in masked_plans} == {id(few), id(many)}
    kl = {c["attention_share"]: c["kl"] for c in evidence["candidates"]}
    assert set(kl) == {0.0, 0.5, 1.0} and kl[0.0] == kl[0.5] != kl[1.0]
    assert share == min(kl, key=lambda s: (kl[s], s))


def test_refit_pass_without_scores_still_refuses_non_finite_activations():
    """The re-fit pass collects no importance scores; a NaN at a real token must still stop it
    (the check reads the channel sums too), while NaN at padding is ignored."""
    x = torch.ones(1, 3, 4)
    x[0, 2, 1] = float("nan")
    padded = InputStats.zeros(2, 4, gram=True)
    padded.add(None, x, torch.tensor([[1, 1, 0]]))
    check_finite(0, InputStats.zeros(2, 0), padded)
    assert padded.tokens == 2 and torch.equal(padded.unit_token_sum, torch.zeros(2, dtype=torch.float64))
    real = InputStats.zeros(2, 4, gram=True)
    real.add(None, x, torch.ones(1, 3))
    with pytest.raises(SecateursError, match="non-finite activations"):
        check_finite(5, InputStats.zeros(2, 0), real)


def test_split_search_on_uniform_layers_stays_stock_loadable(tmp_path):
    model, calibration = tiny_model("llama-gqa"), _calibration()
    pruned, plan = prune(copy.deepcopy(model), method="amp", ratio=0.3, calibration=calibration, split="search",
                         progress=False)
    assert len(set(plan.pruned_shapes())) == 1
    out = save_pruned(pruned, plan, tmp_path / "out")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out).eval()), _logits(pruned))


@pytest.mark.parametrize("name", ["llama-gqa", "gemma2"])
def test_amp_default_searches_the_split_and_refits_on_the_same_data(name):
    """amp's default (README "Beyond the paper"): the searched split (finite KL on right-padded
    calibration, where a whole-model forward of gemma2's eager attention turns real tokens NaN) and
    the sequential re-fit, both on the calibration data of the scores."""
    model, calibration = tiny_model(name), _calibration()
    pruned, plan = prune(copy.deepcopy(model), method="amp", ratio=0.3, calibration=calibration, progress=False)
    split = plan.provenance["split"]
    assert split["rule"] == "search" and all(math.isfinite(c["kl"]) for c in split["candidates"])
    assert plan.provenance["reconstruction"] == {"mode": "sequential", "damping": 0.3, "bias": False,
                                                 "calibration_hash": calibration.hash}
    shapes, _ = prune(copy.deepcopy(model), plan=plan, reconstruct="none", progress=False)
    assert not torch.equal(_logits(shapes), _logits(pruned))  # the re-fit changed weights


def test_split_search_needs_the_weights_in_memory(tmp_path):
    """A device-mapped model gets the balanced split by default; a search asked for is refused
    before any calibration work."""
    tiny_model("llama-gqa").save_pretrained(tmp_path / "dense")
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(4)}}
    mapped, _ = load_model(str(tmp_path / "dense"), "float64", device_map=device_map,
                           offload_folder=str(tmp_path / "offload"))
    plan = make_plan(mapped, "amp", 0.3, calibration=_calibration(), progress=False)
    in_memory = make_plan(tiny_model("llama-gqa"), "amp", 0.3, calibration=_calibration(), split="balanced",
                          progress=False)
    assert plan.to_dict()["layers"] == in_memory.to_dict()["layers"]
    with pytest.raises(SecateursError, match="needs the model in memory"):
        make_plan(mapped, "amp", 0.3, calibration="self", split="search", progress=False)


def test_paper_rounding_and_non_scoring_methods_refuse_the_knobs_and_a_depth_plan_refits_nothing():
    model, calibration = tiny_model("llama-gqa"), _calibration()
    for method, options in (("amp", {"rounding": "paper", "allocation": "global"}), ("flap", {"split": "search"}),
                            ("amp-heads", {"allocation": "global"}), ("consensus", {"allocation": "global"})):
        with pytest.raises(SecateursError):
            make_plan(model, method, 0.2, calibration=calibration, progress=False, **options)
    with pytest.raises(SecateursError):
        prune(copy.deepcopy(model), method="amp", ratio=0.2, calibration=calibration, reconstruct="sequential",
              damping=0.0, progress=False)
    plan = make_plan(model, "depth-random", None, layers=1, progress=False)
    for mode in ("dense", "sequential"):  # a plan that narrows no block: the re-fit has nothing to change
        refitted, _ = prune(copy.deepcopy(model), plan=plan, calibration=calibration, reconstruct=mode,
                            progress=False)
        plain, _ = prune(copy.deepcopy(model), plan=plan, reconstruct="none", progress=False)
        assert refitted.state_dict().keys() == plain.state_dict().keys()
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in refitted.state_dict().items())


def test_gram_statistics_save_and_load(tmp_path):
    stats = collect_statistics(tiny_model("phi"), _calibration(), progress=False, gram=True)
    stats.save(tmp_path / "stats.safetensors")
    loaded = Statistics.load(tmp_path / "stats.safetensors")
    for a, b in zip(stats.attention + stats.mlp, loaded.attention + loaded.mlp):
        assert torch.equal(a.gram, b.gram)


def test_streamed_reconstruction_equals_in_memory(tmp_path):
    """prune --streamed --reconstruct: one layer in memory, fits applied shard by shard, the same
    weights as the in-memory run."""
    common = ["--method", "amp", "--ratio", "0.2", "--calib", str(TINYSTORIES_TEXT), "--calib-samples", "8",
              "--reconstruct", "--reconstruct-bias", "--allocation", "global"]
    assert main(["prune", str(STORIES), *common, "--out", str(tmp_path / "full")]) == 0
    assert main(["prune", str(STORIES), *common, "--streamed", "--out", str(tmp_path / "streamed")]) == 0
    plans = [json.loads((tmp_path / d / "pruning_plan.json").read_text()) for d in ("full", "streamed")]
    assert plans[0]["layers"] == plans[1]["layers"]
    assert plans[0]["provenance"]["reconstruction"] == plans[1]["provenance"]["reconstruction"]
    full, streamed = load_pruned(tmp_path / "full"), load_pruned(tmp_path / "streamed")
    assert any(n.endswith("down_proj.bias") for n in full.state_dict())  # --reconstruct-bias added one
    for (name, a), (_, b) in zip(full.state_dict().items(), streamed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    ids = torch.randint(1, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(full, ids), _logits(streamed, ids), rtol=1e-4, atol=1e-4)
    # a plan that records reconstruction cannot be applied to offloaded weights: refused, not
    # silently written without its fits; --reconstruct none applies its shapes only
    plan = str(tmp_path / "full" / "pruning_plan.json")
    mapped = ["prune", str(STORIES), "--plan", plan, "--device-map", '{"": "cpu"}']
    assert main([*mapped, "--out", str(tmp_path / "mapped")]) == 2 and not (tmp_path / "mapped").exists()
    assert main([*mapped, "--reconstruct", "none", "--out", str(tmp_path / "shapes")]) == 0
    assert "reconstruction" in json.loads((tmp_path / "shapes" / "pruning_plan.json").read_text())["provenance"]


def test_method_defaults_apply_to_balanced_rounding_only(monkeypatch):
    """A default combination a method declares (its options class) never reaches paper rounding,
    whose plan stays byte-identical."""
    @dataclasses.dataclass(frozen=True)
    class GlobalAmpOptions(AmpOptions):
        reconstruct: ClassVar[str | None] = "dense"
        allocation: str = "global"
        split: str | float = 0.0

    model, calibration = tiny_model("llama-gqa"), _calibration()
    paper = make_plan(model, "amp", 0.3, calibration=calibration, rounding="paper", progress=False).to_json()
    monkeypatch.setattr(Amp, "options", GlobalAmpOptions)
    assert make_plan(model, "amp", 0.3, calibration=calibration, rounding="paper", progress=False).to_json() == paper
    assert api.reconstruction_for("amp", rounding="paper") is None
    assert api.reconstruction_for("amp").mode == "dense"
    plan = make_plan(model, "amp", 0.3, calibration=calibration, progress=False)
    assert plan.provenance["allocation"] == "global" and plan.provenance["split"]["attention_share"] == 0.0


def test_cli_split_values():
    parse = build_parser().parse_args
    assert parse(["prune", "m", "--out", "o", "--split", "search"]).method_split == "search"
    assert parse(["prune", "m", "--out", "o", "--split", "0.25", "--reconstruct"]).method_split == 0.25
    assert parse(["prune", "m", "--out", "o", "--reconstruct"]).reconstruct == "sequential"
    with pytest.raises(CommandLineError, match="split"):
        parse(["prune", "m", "--out", "o", "--split", "1.5"])
