"""The first run of a new user: a fast --help, no silent phase, one vocabulary of options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from secateurs import progress

SRC = str(Path(__file__).resolve().parents[1] / "src")
COMMANDS = ([], ["info"], ["prune"], ["plan"], ["plan", "show"], ["demo"], ["eval"], ["bench"], ["report"],
            ["sweep"], ["tasks"])


def test_help_imports_no_heavy_library():
    code = ("import sys\nfrom secateurs.cli import main\n"
            f"for argv in {COMMANDS!r}:\n"
            "    try:\n        main(argv + ['--help'])\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
            "heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": SRC},
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage: secateurs demo" in run.stdout


def test_phase_prints_elapsed_time_and_quiet_silences(capsys):
    progress.set_quiet(False)
    try:
        with progress.phase("loading model"):
            pass
        with progress.phase("outer"):
            progress.status("inner line")
        assert list(progress.bar(range(3), desc="loop")) == [0, 1, 2]
        err = capsys.readouterr().err
        assert "secateurs: loading model ... done in 0.0 s\n" in err
        assert "secateurs: outer ...\nsecateurs: inner line\nsecateurs: outer done in" in err
        assert "loop" in err
        progress.set_quiet(True)
        with progress.phase("loading model"):
            progress.status("x")
        list(progress.bar(range(3), desc="loop"))
        assert capsys.readouterr().err == ""
    finally:
        progress.set_quiet(False)


def test_light_names_match_the_implementations():
    from secateurs import budget, names, selection
    from secateurs.methods import METHODS

    assert sorted(names.METHOD_NAMES) == sorted(METHODS)
    assert budget.GQA_MODES == names.GQA_MODES and selection.SELECTIONS == names.SELECTIONS


def test_self_calibration_is_cached_and_a_bad_cache_is_never_trusted(monkeypatch, caplog):
    import json

    import torch

    from secateurs import calibration, calibration_cache
    from secateurs.loading import load_model
    from tests.conftest import STORIES

    model, tok = load_model(str(STORIES), "float32")
    first = calibration.load_calibration("self", tok, model=model, num_samples=5, max_length=12, seed=3, batch_size=2)
    files = list(calibration_cache.folder().glob("self-*.json"))
    assert len(files) == 1
    key = json.loads(files[0].read_text())["key"]
    assert key["num_samples"] == 5 and key["max_length"] == 12 and key["seed"] == 3

    real_sample = calibration._sample

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached calibration should have been reused")

    monkeypatch.setattr(calibration, "_sample", no_generation)
    again = calibration.load_calibration("self", tok, model=model, num_samples=5, max_length=12, seed=3, batch_size=4)
    ids = lambda c: [r[m == 1].tolist() for b in c.batches for r, m in zip(b["input_ids"], b["attention_mask"])]
    assert ids(again) == ids(first) and all(len(s) == 12 for s in ids(first))

    vocab = model.get_output_embeddings().weight.shape[0]
    data = json.loads(files[0].read_text())
    for corrupt in ("{not json", json.dumps({**data, "samples": [[vocab] * 12] * 5}),
                    json.dumps({**data, "samples": [[1.0] * 12] * 5}), json.dumps({**data, "samples": data["samples"][:4]}),
                    json.dumps({**data, "key": {**key, "model": "another"}})):
        files[0].write_text(corrupt)
        calls = []
        monkeypatch.setattr(calibration, "_sample", lambda *a, **k: calls.append(1) or real_sample(*a, **k))
        with caplog.at_level("WARNING", logger="secateurs"):
            rebuilt = calibration.load_calibration("self", tok, model=model, num_samples=5, max_length=12, seed=3,
                                                   batch_size=2)
        assert calls and "ignoring the calibration cache" in caplog.text
        assert rebuilt.hash == first.hash  # same seed, same samples
        assert json.loads(files[0].read_text()) == data  # rewritten whole
        caplog.clear()
    other = calibration.load_calibration("self", tok, model=model, num_samples=5, max_length=12, seed=4, batch_size=2)
    assert other.hash != first.hash and len(list(calibration_cache.folder().glob("self-*.json"))) == 2
    assert torch.is_tensor(other.batches[0]["input_ids"])
