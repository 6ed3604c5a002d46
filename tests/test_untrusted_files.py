"""Plans and result files are user files, read defensively: every malformed one is refused through
the CLI with exit status 2 and one `secateurs: error:` line naming the file and what is wrong (never
"unexpected failure"), nothing is written, and the inputs stay byte-identical. Plans come from real
pruned runs of stories260K (magnitude and HARP), edited."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import STORIES

import secateurs.planning.plan
from secateurs.cli.main import main
from secateurs.planning.plan import ALPHA_MAX, PLAN_FILENAME


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real pruned folders of stories260K, made once: {"magnitude": folder, "harp": folder}."""
    root = tmp_path_factory.mktemp("runs")
    out = {"magnitude": root / "magnitude", "harp": root / "harp"}
    assert main(["prune", str(STORIES), "--method", "magnitude", "--ratio", "0.2", "--out", str(out["magnitude"]),
                 "--quiet"]) == 0
    assert main(["prune", str(STORIES), "--method", "harp", "--top-layers", "2", "--out", str(out["harp"]),
                 "--quiet"]) == 0
    return out


@pytest.fixture
def run_copy(runs, tmp_path):
    """A private copy of the magnitude run (its files may be replaced by a test)."""
    folder = tmp_path / "run"
    shutil.copytree(runs["magnitude"], folder)
    return folder


def _plan(runs, tmp_path, change, method="magnitude", name="plan.json") -> Path:
    """The run's plan, edited by change(dict), written as a user's plan file."""
    data = json.loads((runs[method] / PLAN_FILENAME).read_text())
    change(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _refused(argv, capsys, *needles) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("secateurs: error:")]
    assert code == 2, (argv, err)
    assert len(lines) == 1 and "unexpected failure" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _every_plan_reader(plan: Path, tmp_path: Path, capsys, *needles) -> None:
    """plan show, report and prune --plan all refuse the file, write nothing and leave it as it was."""
    before = plan.read_bytes()
    _refused(["plan", "show", str(plan)], capsys, str(plan), *needles)
    _refused(["report", str(plan), "--out", str(tmp_path / "report")], capsys, str(plan), *needles)
    _refused(["prune", str(STORIES), "--plan", str(plan), "--out", str(tmp_path / "pruned")], capsys, str(plan),
             *needles)
    assert not (tmp_path / "report").exists() and not (tmp_path / "pruned").exists()
    assert not (plan.parent / "report").exists()
    assert plan.read_bytes() == before


# -- plans: size, depth, encoding ----------------------------------------------------------------

def test_plan_nested_200000_levels_is_refused(tmp_path, capsys):
    plan = tmp_path / "deep.json"
    plan.write_text("[" * 200_000 + "]" * 200_000)
    _every_plan_reader(plan, tmp_path, capsys, "nests more than 32 levels")


def test_plan_over_the_size_limit_is_refused(runs, tmp_path, capsys, monkeypatch):
    plan = _plan(runs, tmp_path, lambda d: None)
    monkeypatch.setattr(secateurs.planning.plan, "PLAN_MAX_BYTES", plan.stat().st_size - 1)
    _refused(["plan", "show", str(plan)], capsys, str(plan), "secateurs reads at most")


@pytest.mark.parametrize("content, needle", [
    (bytes(range(256)) * 4, "not UTF-8"),
    ("{\"format\": \"secateurs.plan/1\", \"name\": \"caf\u00e9\"}".encode("latin-1"), "not UTF-8"),
    (b"\x00\x01PK\x03\x04 not json at all", "not valid JSON"),
    (b"[1, 2, 3]", "not a secateurs plan"),
    (b'{"format": "secateurs.plan/1", "base": {}, "layers": 1e999}', "finite numbers only"),
    (b'{"format": "secateurs.plan/1", "base": ' + b"9" * 5000 + b"}", "finite numbers only"),
])
def test_garbage_plan_files_are_refused(tmp_path, capsys, content, needle):
    plan = tmp_path / "plan.json"
    plan.write_bytes(content)
    _every_plan_reader(plan, tmp_path, capsys, needle)


# -- plans: every index against the plan's own base shapes ---------------------------------------

def _set_layer(position, **fields):
    def change(d):
        d["layers"][position].update(fields)
    return change


@pytest.mark.parametrize("change, needles", [
    (_set_layer(4, index=7), ["layer entry 4 has index 7", "5 layers"]),
    (_set_layer(0, index=-1), ["layer entry 0 has index -1"]),
    (lambda d: d["layers"].append({"index": 5}), ["6 layer entries", "5 layers"]),
    (lambda d: d["layers"].pop(), ["4 layer entries", "5 layers"]),
    (_set_layer(2, heads=[0, 1, 2, 3, 4, 5, 6, 9]), ["layer 2 heads", "[0, 8)", "got 9"]),
    (_set_layer(2, heads=[-3, 0, 1, 2, 3, 4, 5, 6]), ["layer 2 heads", "got -3"]),
    (_set_layer(3, kv_heads=[1, 2, 4]), ["layer 3 kv_heads", "[0, 4)", "got 4"]),
    (_set_layer(1, neurons=[0, 1, 172, 500]), ["layer 1 neurons", "[0, 172)", "got 172, 500"]),
    (_set_layer(1, neurons=[0, 1, 1]), ["layer 1 neurons", "duplicate indices [1]"]),
    (_set_layer(0, removed=True, neurons=[999]), ["layer 0 neurons", "got 999"]),
    (lambda d: d["base"].update(num_hidden_layers=10**9), ["base.num_hidden_layers", "1000000000"]),
    (lambda d: d["base"]["layer_shapes"].__setitem__(0, [8, 4, 10**12]), ["layer_shapes[0]", "1000000000000"]),
    (lambda d: d["base"]["layer_shapes"].__setitem__(0, [8, 3, 172]), ["layer_shapes[0]", "multiple of kv_heads"]),
    (lambda d: d["base"].update(layer_shapes="8,4,172"), ["base.layer_shapes"]),
    (lambda d: d["base"].update(name_or_path=["x"]), ["base.name_or_path"]),
])
def test_plan_indices_out_of_the_base_shapes_are_refused(runs, tmp_path, capsys, change, needles):
    _every_plan_reader(_plan(runs, tmp_path, change), tmp_path, capsys, *needles)


# -- plans: HARP alphas and the counts a plan records ---------------------------------------------

def _alpha(value):
    def change(d):
        d["layers"][4]["attention"] = {"mode": "value", "alpha": value}
    return change


@pytest.mark.parametrize("value", [1e30, -50, 0, 0.0, ALPHA_MAX * 1.01, "0.5", True, None])
def test_implausible_harp_alphas_are_refused(runs, tmp_path, capsys, value):
    plan = _plan(runs, tmp_path, _alpha(value), method="harp")
    _every_plan_reader(plan, tmp_path, capsys, "layer 4", "alpha")


def test_unknown_attention_fields_are_refused(runs, tmp_path, capsys):
    plan = _plan(runs, tmp_path, lambda d: d["layers"][4]["attention"].update(scale=3), method="harp")
    _every_plan_reader(plan, tmp_path, capsys, "layer entry 4", "'attention'")


def test_a_plausible_alpha_still_applies(runs, tmp_path, capsys):
    plan = _plan(runs, tmp_path, _alpha(0.5), method="harp")
    before = plan.read_bytes()
    assert main(["plan", "show", str(plan)]) == 0
    assert "alpha 0.5" in capsys.readouterr().out
    out = tmp_path / "pruned"
    assert main(["prune", str(STORIES), "--plan", str(plan), "--out", str(out), "--quiet"]) == 0
    saved = json.loads((out / PLAN_FILENAME).read_text())
    assert saved["layers"][4]["attention"] == {"mode": "value", "alpha": 0.5}
    assert plan.read_bytes() == before


@pytest.mark.parametrize("key, value", [
    ("params_after", -5), ("params_after", 0), ("params_after", "208192"), ("params_after", 2.5e5),
    ("params_before", True), ("params_before", 10**16), ("achieved_ratio_of_all", 3),
    ("requested_params_removed", -1), ("ratio", "a lot"), ("recovered_between_removals", "yes"),
    ("reconstruction", {"mode": "sequential", "damping": -1}), ("reconstruction", {"mode": "x"}),
    ("alphas", {"4": 1e30}), ("method", 7),
])
def test_implausible_provenance_counts_are_refused(runs, tmp_path, capsys, key, value):
    plan = _plan(runs, tmp_path, lambda d: d["provenance"].update({key: value}))
    _every_plan_reader(plan, tmp_path, capsys, f"provenance.{key}")


def test_reapplied_plan_records_the_counts_it_measures(runs, tmp_path, capsys):
    """A plausible but wrong params_after / params_before in a user's plan never reaches the new folder."""
    original = json.loads((runs["magnitude"] / PLAN_FILENAME).read_text())["provenance"]
    plan = _plan(runs, tmp_path, lambda d: d["provenance"].update(params_after=123, params_before=456))
    assert main(["plan", "show", str(plan)]) == 0  # plausible: shown as the file records it
    capsys.readouterr()
    out = tmp_path / "again"
    assert main(["prune", str(STORIES), "--plan", str(plan), "--out", str(out)]) == 0
    assert f"parameters {original['params_before']:,} -> {original['params_after']:,}" in capsys.readouterr().out
    saved = json.loads((out / PLAN_FILENAME).read_text())["provenance"]
    assert (saved["params_before"], saved["params_after"]) == (original["params_before"], original["params_after"])
    assert (saved["params_before"], saved["params_after"]) == (260_032, 208_192)


# -- eval / bench results given to report ----------------------------------------------------------

BAD_RESULTS = {
    "binary": bytes(range(256)) * 8,
    "latin-1": "{\"models\": {\"caf\u00e9\": {}}}".encode("latin-1"),
    "empty": b"",
    "not JSON": b"models: {}",
    "a list": b"[1, 2]",
    "text": b'"eval"',
    "NaN": b'{"models": {"a": {"perplexity": [{"protocol": "x", "seq_len": 1, "perplexity": NaN, "windows": 1}]}}}',
    "deep": b'{"models": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}
BAD_RESULT_NEEDLES = {"binary": "not UTF-8", "latin-1": "not UTF-8", "empty": "not valid JSON",
                      "not JSON": "not valid JSON", "a list": "not an object", "text": "not an object",
                      "NaN": "finite numbers only", "deep": "nests more than"}

PPL = {"protocol": "seq256", "seq_len": 256, "perplexity": 7.5, "windows": 3}
WRONG_EVAL = {
    "models not a dict": ({"models": ["a", "b"]}, "'models'"),
    "models missing": ({"text": None}, "'models' is missing"),
    "a model not a dict": ({"models": {"a": 3}}, "'models.a'"),
    "perplexity a string": ({"models": {"a": {"perplexity": [{**PPL, "perplexity": "7.5"}]}}},
                            "'models.a.perplexity[0].perplexity'"),
    "perplexity not a list": ({"models": {"a": {"perplexity": {"seq256": 7.5}}}}, "'models.a.perplexity'"),
    "seq_len a list": ({"models": {"a": {"perplexity": [{**PPL, "seq_len": [256]}]}}},
                       "'models.a.perplexity[0].seq_len'"),
    "windows missing": ({"models": {"a": {"perplexity": [{k: v for k, v in PPL.items() if k != "windows"}]}}},
                        "'models.a.perplexity[0].windows' is missing"),
    "text a string": ({"models": {}, "text": "tinystories"}, "'text'"),
    "zero_shot tasks a list": ({"models": {"a": {"zero_shot": {"tasks": ["arc"]}}}}, "'models.a.zero_shot.tasks'"),
    "acc a string": ({"models": {"a": {"zero_shot": {"tasks": {"arc": {"acc": "high"}}}}}},
                     "'models.a.zero_shot.tasks.arc.acc'"),
}
WRONG_BENCH = {
    "results missing": ({"config": {"repeats": 1, "warmup": 0, "decode_tokens": 2}, "device": "cpu", "machine": {},
                         "models": {}}, "'results' is missing"),
    "config a list": ({"config": [1], "device": "cpu", "machine": {}, "models": {}, "results": []}, "'config'"),
    "a result's rate a number": (
        {"config": {"repeats": 1, "warmup": 0, "decode_tokens": 2}, "device": "cpu", "machine": {}, "models": {},
         "results": [{"model": "a", "batch": 1, "prompt_length": 16, "prefill_tokens_per_s": 100.0}]},
        "'results[0].prefill_tokens_per_s'"),
    "params a string": ({"config": {"repeats": 1, "warmup": 0, "decode_tokens": 2}, "device": "cpu", "machine": {},
                         "models": {"a": {"params": "260k", "weight_bytes": 1}}, "results": []},
                        "'models.a.params'"),
}


def _report_refused(run: Path, extra: list[str], capsys, *needles) -> None:
    """report RUN [extra] is refused; no report folder appears anywhere; the run folder is unchanged."""
    before = snapshot(run.parent)
    out = run.parent / "report-out"
    _refused(["report", str(run), *extra, "--out", str(out)], capsys, *needles)
    _refused(["report", str(run), *extra], capsys, *needles)  # the default output, RUN/report
    assert not out.exists() and not (run / "report").exists()
    assert snapshot(run.parent) == before


@pytest.mark.parametrize("flag", ["--eval", "--bench"])
@pytest.mark.parametrize("case", sorted(BAD_RESULTS))
def test_garbage_result_files_given_to_report_are_refused(run_copy, tmp_path, capsys, flag, case):
    given = tmp_path / "given.json"
    given.write_bytes(BAD_RESULTS[case])
    _report_refused(run_copy, [flag, str(given)], capsys, str(given), BAD_RESULT_NEEDLES[case])


@pytest.mark.parametrize("name", ["eval.json", "bench.json"])
@pytest.mark.parametrize("case", ["binary", "a list", "NaN"])
def test_garbage_result_files_found_in_the_run_are_refused(run_copy, capsys, name, case):
    (run_copy / name).write_bytes(BAD_RESULTS[case])
    _report_refused(run_copy, [], capsys, str(run_copy / name), BAD_RESULT_NEEDLES[case])


@pytest.mark.parametrize("kind, case", [("eval", c) for c in sorted(WRONG_EVAL)]
                         + [("bench", c) for c in sorted(WRONG_BENCH)])
def test_results_with_wrong_fields_are_refused(run_copy, tmp_path, capsys, kind, case):
    data, needle = (WRONG_EVAL if kind == "eval" else WRONG_BENCH)[case]
    given = tmp_path / f"{kind}.json"
    given.write_text(json.dumps(data))
    _report_refused(run_copy, [f"--{kind}", str(given)], capsys, str(given), f"{kind} result", needle)
    (run_copy / f"{kind}.json").write_text(json.dumps(data))  # found by default: the same refusal
    _report_refused(run_copy, [], capsys, str(run_copy / f"{kind}.json"), needle)


def test_recovery_record_with_wrong_fields_is_refused(run_copy, capsys):
    (run_copy / "recovery.json").write_text(json.dumps({"before": [1], "curves": {"train": []}}))
    _report_refused(run_copy, [], capsys, "recovery.json", "'before'")
    (run_copy / "recovery.json").write_text(json.dumps({"curves": {"train": [{"tokens": 1, "loss": "x"}]}}))
    _report_refused(run_copy, [], capsys, "recovery.json", "curves.train")


def test_a_minimal_valid_eval_result_still_reports(run_copy, tmp_path, capsys):
    """Only what the report reads is required (text may be null, zero_shot absent)."""
    given = tmp_path / "eval.json"
    given.write_text(json.dumps({"text": None, "models": {"dense": {"perplexity": [PPL]},
                                                          "pruned": {"perplexity": [{**PPL, "perplexity": 9.25}]}}}))
    out = tmp_path / "report"
    assert main(["report", str(run_copy), "--eval", str(given), "--out", str(out)]) == 0
    assert "9.250 (3 windows)" in (out / "report.md").read_text()


# -- the run folder's own plan --------------------------------------------------------------------

@pytest.mark.parametrize("content, needle", [
    (bytes(range(256)) * 4, "not UTF-8"),
    (b"\x89PNG\r\n\x1a\n", "not UTF-8"),
    (b"", "not valid JSON"),
    (b'{"format": "secateurs.plan/1", "base": "llama", "layers": []}', "'base'"),
    (b"[" * 50 + b"]" * 50, "nests more than"),
])
def test_report_of_a_run_with_a_garbage_plan_is_refused(run_copy, capsys, content, needle):
    (run_copy / PLAN_FILENAME).write_bytes(content)
    _report_refused(run_copy, [], capsys, PLAN_FILENAME, needle)


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.update(layers="all"), "'layers'"),
    (lambda d: d.update(provenance=[1]), "'provenance'"),
    (lambda d: d["layers"][0].update(heads="0-7"), "'heads'"),
    (lambda d: d["layers"][2].update(index=9), "index 9"),
    (lambda d: d["provenance"].update(params_after=-5), "provenance.params_after"),
])
def test_report_of_a_run_with_a_wrongly_typed_plan_is_refused(run_copy, capsys, change, needle):
    data = json.loads((run_copy / PLAN_FILENAME).read_text())
    change(data)
    (run_copy / PLAN_FILENAME).write_text(json.dumps(data))
    _report_refused(run_copy, [], capsys, PLAN_FILENAME, needle)
    _refused(["plan", "show", str(run_copy)], capsys, needle)
    assert not (run_copy / "report").exists()
