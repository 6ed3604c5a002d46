"""One output policy for every writer (secateurs.files.output): recover, report, sweep, tasks, bench, eval,
export and checkpoints replace only an output of their own kind, only with --force, never a sibling,
never through a symbolic link, one run at a time; recovery options that cannot finish or fit are
refused before the first step. Every refusal leaves the victims byte-identical."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import gguf
import pytest
import safetensors.torch
import transformers.modeling_utils
from conftest import STORIES, TASKS, TINYSTORIES_TEXT
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import secateurs.storage.loading
from secateurs.cli.main import main
from secateurs.files import output
from secateurs.recovery import trainer

PRUNE = ["--method", "magnitude", "--ratio", "0.2"]
TINY = ["--data", str(TINYSTORIES_TEXT), "--tokens", "256", "--train-length", "32", "--val-tokens", "64",
        "--train-batch-size", "2"]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder (None) under root, hidden ones included."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def refused(argv, capsys, message="") -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "secateurs: error:" in err and "Traceback" not in err and "unexpected" not in err, err
    assert message in err, err
    return err


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """A magnitude-pruned stories260K (a secateurs model folder)."""
    out = tmp_path_factory.mktemp("pruned") / "student"
    assert main(["prune", str(STORIES), *PRUNE, "--out", str(out)]) == 0
    return out


@pytest.fixture
def world(tmp_path, pruned) -> Path:
    """tmp/student (pruned), tmp/other (another secateurs model), tmp/README.md, tmp/notes.json."""
    shutil.copytree(pruned, tmp_path / "student")
    shutil.copytree(pruned, tmp_path / "other")
    (tmp_path / "README.md").write_text("# not ours\n")
    (tmp_path / "notes.json").write_text('{"mine": true}\n')
    return tmp_path


def recover_args(world: Path, student: Path, out: Path, *extra) -> list[str]:
    return ["recover", str(student), "--teacher", str(STORIES), "--out", str(out), *TINY, "--threads", "1", *extra]


# -- checkpoints: created by the run, removed only if they are that run's -------------------------

def test_recover_without_checkpoints_never_touches_out_checkpoints(world, capsys):
    foreign = world / "rec.checkpoints"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    before = tree(foreign)
    assert main(recover_args(world, world / "student", world / "rec")) == 0
    assert tree(foreign) == before


def test_an_input_named_like_the_checkpoint_folder_survives(world, capsys):
    student = world / "student.checkpoints"
    os.rename(world / "student", student)
    before = tree(world)
    assert main(recover_args(world, student, world / "student")) == 0  # no --save-every: no checkpoint folder
    assert {k: v for k, v in tree(world).items() if k.startswith("student.checkpoints")} == \
        {k: v for k, v in before.items() if k.startswith("student.checkpoints")}
    shutil.rmtree(world / "student")
    before = tree(world)
    refused(recover_args(world, student, world / "student", "--save-every", "2"), capsys, "input")
    assert tree(world) == before


def test_the_working_directory_is_never_the_checkpoint_folder(world, capsys, monkeypatch):
    project = world / "proj.checkpoints"
    project.mkdir()
    (project / "data.txt").write_text("keep")
    monkeypatch.chdir(project)
    before = tree(world)
    refused(recover_args(world, world / "student", Path("../proj"), "--save-every", "2"), capsys, "working directory")
    assert tree(world) == before
    assert main(recover_args(world, world / "student", Path("../proj"))) == 0  # no checkpoints: nothing touched
    assert (project / "data.txt").read_text() == "keep"


def test_checkpoint_dir_that_is_a_model_is_refused_even_with_force(world, capsys):
    before = tree(world)
    for extra in ([], ["--force"]):
        refused(recover_args(world, world / "student", world / "rec", "--save-every", "2", "--checkpoint-dir",
                             str(world / "other"), *extra), capsys)
    assert tree(world) == before


def test_default_checkpoints_are_removed_only_when_they_are_this_runs(world, capsys):
    assert main(recover_args(world, world / "student", world / "rec", "--save-every", "2")) == 0
    assert not (world / "rec.checkpoints").exists()  # this run's checkpoints go once the model is saved
    ours = world / "ckpt"
    ours.mkdir()
    (ours / output.MARKER).write_text(json.dumps({"writer": "secateurs", "kind": "recovery-checkpoint", "run": "a"}))
    assert not output.remove_own_folder(ours, "recovery-checkpoint", {"run": "b"})  # another run's
    assert not output.remove_own_folder(ours, "model", {"run": "a"})  # another kind
    assert ours.exists() and output.remove_own_folder(ours, "recovery-checkpoint", {"run": "a"})
    assert not ours.exists()


def test_a_fresh_run_never_replaces_a_checkpoint_without_force(world, capsys):
    ckpt = world / "ckpt"
    ckpt.mkdir()
    (ckpt / output.MARKER).write_text(json.dumps({"writer": "secateurs", "kind": "recovery-checkpoint", "run": "x"}))
    (ckpt / "state.pt").write_bytes(b"earlier")
    before = tree(world)
    refused(recover_args(world, world / "student", world / "rec", "--save-every", "2", "--checkpoint-dir", str(ckpt)),
            capsys, "earlier run")
    assert tree(world) == before


# -- report, sweep, tasks: --force and the same kind ----------------------------------------------

def test_report_never_replaces_its_input_or_another_kind(world, capsys):
    before = tree(world)
    refused(["report", str(world / "student"), "--out", str(world / "student"), "--force"], capsys)
    refused(["report", str(world / "student"), "--out", str(world / "other"), "--force"], capsys, "not a report")
    refused(["report", str(world / "student"), "--out", str(world / "student" / "config.json"), "--force"], capsys)
    assert tree(world) == before
    assert main(["report", str(world / "student"), "--out", str(world / "page")]) == 0
    page = tree(world / "page")
    refused(["report", str(world / "student"), "--out", str(world / "page")], capsys, "--force")
    assert tree(world / "page") == page
    assert main(["report", str(world / "student"), "--out", str(world / "page"), "--force"]) == 0
    assert main(["report", str(world / "student")]) == 0  # the default RUN/report, beside the model
    assert main(["report", str(world / "student"), "--force"]) == 0


def test_tasks_and_sweep_replace_only_their_own_kind_with_force(world, capsys):
    before = tree(world)
    tasks = ["tasks", "--data-dir", str(TASKS), "--tasks", "piqa"]
    refused([*tasks, "--out", str(world / "other"), "--force"], capsys, "not a tasks")
    refused(["sweep", str(STORIES), "--methods", "magnitude", "--ratios", "0.2", "--ppl", str(TINYSTORIES_TEXT),
             "--max-windows", "1", "--out", str(world / "other"), "--force"], capsys, "not a sweep")
    assert tree(world) == before
    assert main([*tasks, "--out", str(world / "t")]) == 0
    refused([*tasks, "--out", str(world / "t")], capsys, "--force")
    assert main([*tasks, "--out", str(world / "t"), "--force"]) == 0


# -- single files: only the named path, --force and a secateurs result of the same kind -------------

def test_bench_writes_only_the_named_file(world, capsys):
    before = tree(world)
    out = world / "README.json"
    assert main(["bench", str(STORIES), "--batch-sizes", "1", "--prompt-lengths", "8", "--decode-tokens", "2",
                 "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    after = tree(world)
    assert {k: v for k, v in after.items() if k != "README.json"} == before
    assert json.loads(out.read_text())["written_by"]["kind"] == "bench"


def test_eval_out_replaces_only_its_own_results_with_force(world, capsys):
    evaluate = ["eval", str(STORIES), "--ppl", str(TINYSTORIES_TEXT), "--max-windows", "1"]
    before = tree(world)
    refused([*evaluate, "--out", str(world / "notes.json")], capsys)
    refused([*evaluate, "--out", str(world / "notes.json"), "--force"], capsys, "not a secateurs eval")
    link = world / "link.json"
    link.symlink_to(world / "notes.json")
    refused([*evaluate, "--out", str(link), "--force"], capsys, "symbolic link")
    link.unlink()
    assert tree(world) == before
    assert main([*evaluate, "--out", str(world / "e.json")]) == 0
    refused([*evaluate, "--out", str(world / "e.json")], capsys, "--force")
    assert main([*evaluate, "--out", str(world / "e.json"), "--force"]) == 0
    bench = world / "b.json"
    bench.write_text(json.dumps({"written_by": output.result_marker("bench"), "models": {}, "machine": {}}))
    refused([*evaluate, "--out", str(bench), "--force"], capsys, "not a secateurs eval")


def test_symlinked_output_folders_are_refused_before_resolving(world, capsys):
    (world / "alias").symlink_to(world / "other")
    before = tree(world)
    refused(["prune", str(STORIES), *PRUNE, "--out", str(world / "alias"), "--force"], capsys, "symbolic link")
    refused(["report", str(world / "student"), "--out", str(world / "alias"), "--force"], capsys, "symbolic link")
    assert tree(world) == before


def test_export_replaces_only_a_gguf_secateurs_wrote(world, capsys):
    foreign = world / "foreign.gguf"
    writer = gguf.GGUFWriter(foreign, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = tree(world)
    refused(["export", str(world / "student"), "--out", str(foreign), "--force"], capsys, "not a secateurs gguf")
    assert tree(world) == before
    ours = world / "ours.gguf"
    assert main(["export", str(world / "student"), "--out", str(ours)]) == 0
    refused(["export", str(world / "student"), "--out", str(ours)], capsys, "--force")
    assert main(["export", str(world / "student"), "--out", str(ours), "--force"]) == 0


# -- one run per output --------------------------------------------------------------------------

def test_a_second_run_on_the_same_output_is_refused(world, capsys):
    out = (world / "busy").resolve()
    lock = output._lock_folder() / (hashlib.sha256(os.fsencode(out)).hexdigest()[:40] + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what another secateurs process holds while it runs
        before = tree(world)
        refused(["prune", str(STORIES), *PRUNE, "--out", str(out)], capsys, "another secateurs run")
        refused(recover_args(world, world / "student", world / "r", "--save-every", "2", "--checkpoint-dir", str(out)),
                capsys, "another secateurs run")
        assert tree(world) == before
    finally:
        os.close(fd)
    assert main(["prune", str(STORIES), *PRUNE, "--out", str(out)]) == 0  # free once that run ends


# -- faults: one line, nothing partial ------------------------------------------------------------

@pytest.mark.parametrize("command", ["prune", "recover", "export"])
def test_disk_full_is_one_line_and_leaves_nothing(world, capsys, monkeypatch, command):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]) if len(args) > 1 else None)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", lambda self, *a, **k: full(None, "x.gguf"))
    before = tree(world)
    argv = {"prune": ["prune", str(STORIES), *PRUNE, "--out", str(world / "o")],
            "recover": recover_args(world, world / "student", world / "o"),
            "export": ["export", str(world / "student"), "--out", str(world / "o.gguf")]}[command]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "secateurs: error: disk full" in err and "MiB free" in err, err
    assert tree(world) == before  # no output, no temporary file left


# -- recovery options: refused before the first step, with the numbers ------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--tokens", str(10**13)], "--max-hours"),
    (["--self-samples", str(10**9), "--data", "self"], "--max-hours"),
    (["--train-batch-size", "100000", "--tokens", str(10**8), "--max-hours", "1e9"], "free"),
    (["--grad-accum", "1000000"], "more than the budget"),
    (["--max-grad-norm", "-1"], "0 or more"),
    (["--scheduler", "bogus"], "invalid choice"),
    (["--scheduler", "reduce_lr_on_plateau"], "invalid choice"),
    (["--max-hours", "0"], "greater than 0"),
])
def test_recovery_budgets_are_checked_before_any_weights_load(world, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(secateurs.storage.loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    monkeypatch.setattr(trainer.RecoveryLoop, "run", lambda *a, **k: pytest.fail("training started"))
    before = tree(world)
    refused(recover_args(world, world / "student", world / "rec", *extra), capsys, message)
    assert tree(world) == before


def test_the_estimate_is_printed_and_a_foreign_teacher_is_named(world, capsys):
    other = world / "teacher"
    shutil.copytree(STORIES, other)
    state = {k: v * 1.01 for k, v in load_file(other / "model.safetensors").items()}
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    args = ["recover", str(world / "student"), "--teacher", str(other), *TINY, "--threads", "1"]
    assert main([*args, "--out", str(world / "a")]) == 0
    err = capsys.readouterr().err
    assert "recovery estimate:" in err and "--max-hours 72" in err
    assert "WARNING: the teacher" in err and "not the model this student was pruned from" in err
    assert main([*args, "--out", str(world / "b"), "--teacher-any"]) == 0
    assert "WARNING: the teacher" not in capsys.readouterr().err
    assert main(recover_args(world, world / "student", world / "c")) == 0  # its own parent: no warning
    assert "WARNING: the teacher" not in capsys.readouterr().err


def test_prune_plan_refuses_options_it_would_ignore(world, capsys):
    plan = world / "student" / "pruning_plan.json"
    before = tree(world)
    for extra in (["--method", "amp"], ["--ratio", "0.5"], ["--top-layers", "2"]):
        refused(["prune", str(STORIES), "--plan", str(plan), *extra, "--out", str(world / "p")], capsys, extra[0])
    assert tree(world) == before
    assert main(["prune", str(STORIES), "--plan", str(plan), "--out", str(world / "p")]) == 0


def test_prune_recover_budget_is_checked_before_the_model_loads(world, capsys, monkeypatch):
    monkeypatch.setattr(secateurs.storage.loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    before = tree(world)
    refused(["prune", str(STORIES), *PRUNE, "--recover", "--data", str(TINYSTORIES_TEXT), "--tokens", str(10**13),
             "--out", str(world / "p")], capsys, "--max-hours")
    refused(["prune", str(STORIES), *PRUNE, "--recover", "--data", str(TINYSTORIES_TEXT), "--grad-accum", "1000000",
             "--out", str(world / "p")], capsys, "more than the budget")
    assert tree(world) == before


def test_disk_full_is_recognised_whatever_raised_it(tmp_path):
    output._failed_write(tmp_path / "out", 3 * 2**20)
    for exc in (OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded"),
                SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                OSError("11008 requested and 5936 written")):  # numpy's tofile, gguf's writer
        message = output.disk_full_message(exc)
        assert message.startswith(f"disk full while writing {tmp_path / 'out'} (about 3.0 MiB needed; "), exc
        assert "MiB free there" in message
    for exc in (OSError(errno.EACCES, "Permission denied"), ValueError("no space for this idea"), KeyError("x")):
        assert output.disk_full_message(exc) is None


@pytest.mark.parametrize("extra", [["--kd-ratio", "0.5"], ["--temperature", "2"]])
def test_distillation_settings_with_cross_entropy_are_refused(world, capsys, extra):
    before = tree(world)
    refused(recover_args(world, world / "student", world / "rec", "--objective", "ce", *extra), capsys,
            "objective 'kd'")
    assert tree(world) == before


def test_evaluation_options_without_what_they_apply_to_are_refused(world, capsys):
    evaluate = ["eval", str(STORIES), "--ppl", str(TINYSTORIES_TEXT), "--max-windows", "1"]
    for extra, message in ((["--limit", "5"], "--limit"), (["--data-dir", str(TASKS)], "--data-dir"),
                           (["--text-field", "body"], "--text-field"), (["--max-docs", "3"], "--max-docs")):
        refused([*evaluate, *extra], capsys, message)
