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
