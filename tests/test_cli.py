"""CLI: commands work end to end on the real stories260K model; bad input gives exit status 2,
a message that says what to do, and writes nothing."""

from __future__ import annotations

import json

from conftest import STORIES, tiny_model

from secateurs.cli.main import main
from secateurs.methods import make_plan


def test_info(capsys):
    assert main(["info", str(STORIES)]) == 0
    out = capsys.readouterr().out
    assert "llama, 5 layers" in out and "parameters 260,032" in out


def test_prune_then_plan_show(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(STORIES), "--method", "magnitude", "--ratio", "0.2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "260,032 -> 208,192" in text and (out / "model.safetensors").exists()
    assert main(["plan", "show", str(out)]) == 0
    assert "6/8" in capsys.readouterr().out
    # re-applying the saved plan gives the same model
    again = tmp_path / "again"
    assert main(["prune", str(STORIES), "--plan", str(out / "pruning_plan.json"), "--out", str(again)]) == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_demo_on_stories(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(STORIES), "--out", str(out), "--max-windows", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert report["perplexity_pruned"]["windows"] == 4
    assert (out / "report.md").exists() and (out / "model" / "pruning_plan.json").exists()


def _fails(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_bad_input_is_reported_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    _fails(["prune", str(tmp_path / "missing"), "--out", str(out)], capsys, "model path not found")
    _fails(["prune", str(STORIES), "--ratio", "1.2", "--out", str(out)], capsys, "[0, 1)")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(["info", str(empty)], capsys, "no config.json")
    assert not out.exists()
    out.mkdir()
    _fails(["prune", str(STORIES), "--out", str(out)], capsys, "--force")
    assert list(out.iterdir()) == []
    _fails(["plan", "show", str(tmp_path / "nope.json")], capsys, "plan file not found")


def test_plan_for_another_model_is_refused(tmp_path, capsys):
    plan_file = make_plan(tiny_model("llama-gqa"), "magnitude", 0.5).save(tmp_path / "plan.json")
    out = tmp_path / "out"
    _fails(["prune", str(STORIES), "--plan", str(plan_file), "--out", str(out)], capsys, "another model")
    assert not out.exists()
