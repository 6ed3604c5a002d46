"""The library runs a pruning job (secateurs.pipeline.jobs): every method gives the same plan and the same
weights in memory, streamed from the checkpoint and device-mapped with disk offload; each method's
options are its own, and an option it does not take is refused before any work."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from conftest import STORIES, TINYSTORIES_TEXT, tiny_model
from safetensors.torch import load_file

import secateurs.evaluation
from secateurs.cli.main import build_parser, main, method_options_of
from secateurs.errors import SecateursError
from secateurs.methods import METHODS, get_method, make_plan
from secateurs.methods.options import OPTIONS_BY_METHOD, flag_of, methods_taking
from secateurs.pipeline import run
from secateurs.pipeline.jobs import PruneJob

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
              "model.layers.3": "cpu", "model.layers.4": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
              "lm_head": "cpu"}
CASES = {  # method: (ratio, options)
    "amp": (0.2, {"split": "balanced"}), "amp-heads": (0.1, {}), "amp-mlp": (0.1, {"averaging": "token"}),
    "wanda-sp": (0.2, {}), "wanda-sp-heads": (0.1, {}), "flap": (0.2, {}), "magnitude": (0.2, {"gqa": "in-group"}),
    "random": (0.2, {}), "harp": (None, {"top_layers": 2, "alpha_grid": [0.0, 0.5, 1.0]}),
    "consensus": (None, {"layers": 2, "metrics": ["cka", "angular", "nll", "bi"], "iterative": True}),
    "depth-bi": (None, {"layers": 1}), "depth-angular": (None, {"layers": 2}), "depth-cka": (None, {"layers": 1}),
    "depth-ppl": (None, {"layers": 1}), "depth-random": (None, {"layers": 1}),
    "search": (0.2, {"scoring_tokens": 64, "mlp_fractions": [0.5]}),
}
# amp's defaults (split search, sequential re-fit) need the weights in memory; a device-mapped run takes
# the balanced split and no re-fit by default (test_width_quality covers both), so this compares them given.
RECONSTRUCTION = {"amp": {"reconstruct": "none"}, "search": {"reconstruct": "none"}}


def test_every_registered_method_is_covered():
    assert sorted(CASES) == sorted(METHODS)


@pytest.mark.parametrize("method", sorted(CASES))
def test_every_method_gives_one_plan_and_one_model_in_memory_streamed_and_device_mapped(tmp_path, method):
    ratio, options = CASES[method]
    job = PruneJob(str(STORIES), "", method=method, ratio=ratio, options=options, calibration=str(TINYSTORIES_TEXT),
                   calibration_options={"num_samples": 8, "max_length": 64}, seed=3, inputs=[str(STORIES)],
                   reconstruction=RECONSTRUCTION.get(method, {}))
    results = {}
    for memory in ("in-memory", "streamed", "device-map"):
        extra = ({"device_map": DEVICE_MAP, "offload_folder": str(tmp_path / "offload")} if memory == "device-map"
                 else {})
        results[memory] = run(dataclasses.replace(job, out=str(tmp_path / memory), memory=memory, **extra))
    plans = {m: json.loads((r.out / "pruning_plan.json").read_text()) for m, r in results.items()}
    weights = {m: load_file(r.out / "model.safetensors") for m, r in results.items()}
    reference = plans["in-memory"]
    for memory in ("streamed", "device-map"):
        assert plans[memory]["layers"] == reference["layers"], memory
        for key in ("method", "seed", "calibration_hash", "alphas", "rounds", "layers_removed", "achieved_params"):
            assert plans[memory]["provenance"].get(key) == reference["provenance"].get(key), (memory, key)
        assert weights[memory].keys() == weights["in-memory"].keys()
        assert all((weights[memory][k] == v).all() for k, v in weights["in-memory"].items()), memory
    assert results["in-memory"].comparison["params_after"] < results["in-memory"].comparison["params_before"]


def test_options_a_method_does_not_take_are_refused_with_who_takes_them():
    model = tiny_model("llama-gqa")
    with pytest.raises(SecateursError, match=r"'magnitude' does not take layers \(layers applies to consensus, "):
        make_plan(model, "magnitude", 0.2, layers=2)
    with pytest.raises(SecateursError, match=r"'consensus' does not take averaging \(averaging applies to amp, "
                                             r"amp-heads, amp-mlp\)"):
        make_plan(model, "consensus", layers=1, averaging="token")
    with pytest.raises(SecateursError, match="'harp' does not take selection"):
        make_plan(model, "harp", top_layers=1, selection="reversed")
    with pytest.raises(SecateursError, match="does not take colour .*applies to no method"):
        make_plan(model, "amp", 0.2, colour="red")
    with pytest.raises(SecateursError, match="unknown method 'nope'"):
        get_method("nope")
    assert methods_taking("top_layers") == ["harp"] and "flap" in methods_taking("gqa")


def test_command_line_flags_and_help_come_from_the_options_dataclasses(capsys):
    """The options dataclasses are the one declaration: the registry's methods hold the classes the
    command line reads (without torch), every option field with a flag is in `prune --help` with the
    methods that take it, and a flag reaches the method as its field."""
    assert {name: type(m).options for name, m in METHODS.items()} == OPTIONS_BY_METHOD
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "--help"])
    text = capsys.readouterr().out
    for name, cls in OPTIONS_BY_METHOD.items():
        flags = [flag_of(f) for f in dataclasses.fields(cls) if flag_of(f)]
        line = next(x for x in text.splitlines() if x.startswith("  ") and not x.startswith("   ")
                    and name in x.split(":")[0].strip().split(", "))
        assert line.split(": ", 1)[1].split() == (flags or ["(none)"])
        assert all(f"  {flag}" in text for flag in flags)
    args = parser.parse_args(["prune", "m", "--out", "o", "--method", "consensus", "--depth-tokens", "64",
                              "--protect-last", "2"])
    # given flags only: defaults are the method's
    assert method_options_of(args) == {"max_tokens": 64, "protect_last": 2}
    args = parser.parse_args(["prune", "m", "--out", "o", "--method", "flap", "--rounding", "balanced"])
    with pytest.raises(SecateursError, match="--rounding applies to amp, .*not to 'flap'"):
        method_options_of(args)


@pytest.mark.parametrize("method", sorted(CASES))
def test_each_method_declares_its_needs_and_its_options(method):
    spec = get_method(method)
    assert spec.name == method and spec.summary
    fields = {f.name for f in dataclasses.fields(spec.options)}
    assert set(CASES[method][1]) <= fields  # the options the tests give are the method's own
    data_free = method in ("magnitude", "random", "depth-random")
    assert spec.needs.calibration is not data_free
    assert spec.needs.statistics is (method in ("amp", "amp-heads", "amp-mlp", "wanda-sp", "wanda-sp-heads", "flap"))


def test_cli_refuses_a_flag_the_method_does_not_take_and_reads_harp_layers_as_top_layers(tmp_path, capsys):
    assert main(["prune", str(STORIES), "--method", "consensus", "--layers", "1", "--rounding", "paper",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--rounding applies to amp, " in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["prune", str(STORIES), "--method", "harp", "--layers", "1", "--alpha-grid", "0,1", "--calib",
                 str(TINYSTORIES_TEXT), "--calib-samples", "4", "--calib-length", "32",
                 "--out", str(tmp_path / "h")]) == 0
    assert "--top-layers" in capsys.readouterr().err
    assert json.loads((tmp_path / "h" / "pruning_plan.json").read_text())["provenance"]["harp_layers"] == 1


def test_evaluation_never_imports_methods_or_runs_pruning():
    """Layering: evaluation reads models; pruning recipes (methods, the pipeline, sweeps) sit above it."""
    above = ("secateurs.methods", "secateurs.pipeline", "secateurs.cli")
    for path in Path(secateurs.evaluation.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith(above) for n in names), (path.name, names)


def test_a_library_job_never_writes_into_what_it_reads(tmp_path):
    """Without `inputs`, a job still protects its model folder and calibration file."""
    model = tmp_path / "model"
    shutil.copytree(STORIES, model)
    job = PruneJob(str(model), str(model / "pruned"), method="magnitude", ratio=0.2)
    assert job.inputs == [str(model.resolve())]
    with pytest.raises(SecateursError, match="lies inside it, and the input model and files are never written"):
        run(job)
    assert not (model / "pruned").exists()
