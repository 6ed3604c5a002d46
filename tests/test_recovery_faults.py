"""Nothing lost on recovery's surfaces: a damaged resume checkpoint is refused (exit 2, naming the
folder and the file) before any step; only the schedulers the loop can drive are accepted; SIGTERM
at any moment of `secateurs recover` exits 143, leaves no temporary folder and no output, keeps the
last checkpoint whole, and --resume then ends with the weights of the run that never stopped."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import STORIES, TINYSTORIES_TEXT
from safetensors.torch import load_file, save_file
from transformers import get_scheduler
from transformers.trainer_utils import SchedulerType

from secateurs.cli.main import main
from secateurs.errors import SecateursError
from secateurs.files.output import MARKER
from secateurs.recovery import RecoveryError, recover
from secateurs.recovery.trainer import BEST_FILE, SCHEDULERS, SETTINGS_FILE, STATE_FILE, WEIGHTS_FILE, check_scheduler
from secateurs.storage.loading import load_model

SRC = Path(__file__).resolve().parents[1] / "src"
SEQ = 32
STEPS = 30  # of the CLI runs: long enough to be stopped in the middle, short enough for seconds
CRASH_AT = 3  # the library checkpoint: written after step 3


# -- the scheduler whitelist -------------------------------------------------------------------------

def _drive(name: str, warmup: int, steps: int) -> list[float]:
    """What RecoveryLoop does with a scheduler: make it with warm-up and total steps only, step it once
    per optimiser step, save and reload its state as a checkpoint does (weights_only)."""
    weight = torch.nn.Parameter(torch.ones(3, 2))
    optimizer = torch.optim.AdamW([weight], lr=1e-3, fused=True)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    rates = []
    for _ in range(steps):
        weight.sum().backward()
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    saved = io.BytesIO()
    torch.save(scheduler.state_dict(), saved)
    saved.seek(0)
    scheduler.load_state_dict(torch.load(saved, weights_only=True))
    return rates


def _works(name: str) -> bool:
    try:
        for warmup, steps in ((0, 1), (1, 4), (2, 10)):
            _drive(name, warmup, steps)
    except Exception:  # noqa: BLE001 - a scheduler the loop cannot drive fails in any way
        return False
    return True


def test_every_whitelisted_scheduler_runs_and_every_other_is_refused():
    known = {s.value for s in SchedulerType}
    assert set(SCHEDULERS) <= known and len(set(SCHEDULERS)) == len(SCHEDULERS)
    for name in SCHEDULERS:
        assert check_scheduler(name) == name
        rates = _drive(name, 1, 5)
        assert all(r >= 0 and r == r for r in rates), (name, rates)
    others = sorted(known - set(SCHEDULERS))
    assert others, "transformers knows no scheduler this loop refuses: the test lost its point"
    for name in others:
        with pytest.raises(SecateursError, match="cosine"):  # the message names the ones to use
            check_scheduler(name)
        assert not _works(name), f"{name} now works with the loop: add it to SCHEDULERS"
    for name in ("bogus", "", "Cosine", None):
        with pytest.raises(SecateursError, match="unknown scheduler"):
            check_scheduler(name)
    assert check_scheduler("polynomial", lr=1e-4) == "polynomial"
    with pytest.raises(SecateursError, match="raise --lr"):  # get_scheduler itself would raise ValueError
        check_scheduler("polynomial", lr=1e-7)


# -- damaged checkpoints: refused before any step -------------------------------------------------------

@pytest.fixture(scope="module")
def student_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "student"
    assert main(["prune", str(STORIES), "--method", "magnitude", "--ratio", "0.2", "--out", str(folder),
                 "--threads", "1", "--quiet"]) == 0
    return folder


@pytest.fixture(scope="module")
def models(student_folder):
    student, tok = load_model(str(student_folder), dtype="float32")
    teacher, _ = load_model(str(STORIES), dtype="float32")
    return student, teacher, tok


def _library_run(models, ckpt, **extra):
    student, teacher, tok = models
    return recover(copy.deepcopy(student), teacher, data=str(TINYSTORIES_TEXT), tokens=8 * 2 * SEQ, tokenizer=tok,
                   seq_len=SEQ, batch_size=2, val_tokens=2 * SEQ, eval_every=2, save_every=1, checkpoint_dir=ckpt,
                   progress=False, **extra)


@pytest.fixture(scope="module")
def checkpoint(models, tmp_path_factory):
    """A checkpoint written after step CRASH_AT of a run that then crashed."""
    class Crash(Exception):
        pass

    def crash(record, loop):
        if record["step"] == CRASH_AT:
            raise Crash

    ckpt = tmp_path_factory.mktemp("library") / "ckpt"
    with pytest.raises(Crash):
        _library_run(models, ckpt, on_step=crash)
    assert (ckpt / BEST_FILE).is_file()
    return ckpt


def _state(folder: Path) -> dict:
    return torch.load(folder / STATE_FILE, weights_only=True)


def _rewrite_state(change):
    def apply(folder: Path):
        state = _state(folder)
        change(state)
        torch.save(state, folder / STATE_FILE)
    return apply


def _rewrite_weights(name: str, change):
    def apply(folder: Path):
        weights = load_file(folder / name)
        change(weights)
        save_file(weights, folder / name)
    return apply


def _truncate(name: str, keep: float = 0.5):
    def apply(folder: Path):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:int(len(data) * keep)])
    return apply


def _overwrite(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def _remove(name: str):
    return lambda folder: (folder / name).unlink()


def _first(weights: dict) -> str:
    return sorted(weights)[0]


def _optimizer_entry(state: dict) -> dict:
    return next(iter(state["optimizer"]["state"].values()))


class _Evil:
    """A pickle that would create a folder when loaded without weights_only."""

    target = ""

    def __reduce__(self):
        return os.makedirs, (self.target,)


def _evil_pickle(folder: Path):
    _Evil.target = str(folder.parent / "pwned")
    (folder / STATE_FILE).write_bytes(pickle.dumps({"step": _Evil()}))


GARBAGE = bytes(range(256)) * 8

DAMAGE = {
    # the trainer state (torch.save, read with weights_only)
    "state truncated": (STATE_FILE, _truncate(STATE_FILE), "not a trainer state"),
    "state cut to a few bytes": (STATE_FILE, _truncate(STATE_FILE, 0.001), "not a trainer state"),
    "state empty": (STATE_FILE, _overwrite(STATE_FILE, b""), "not a trainer state"),
    "state garbage": (STATE_FILE, _overwrite(STATE_FILE, GARBAGE), "not a trainer state"),
    "state a pickle that runs code": (STATE_FILE, _evil_pickle, "not a trainer state"),
    "state missing": ("", _remove(STATE_FILE), "checkpoint"),  # refused by recover(): no checkpoint there
    "state not a dict": (STATE_FILE, lambda f: torch.save([1, 2, 3], f / STATE_FILE), "not a trainer state"),
    "state lacks the optimiser": (STATE_FILE, _rewrite_state(lambda s: s.pop("optimizer")), "lacks optimizer"),
    "step a string": (STATE_FILE, _rewrite_state(lambda s: s.update(step="3")), "step"),
    "step past the end": (STATE_FILE, _rewrite_state(lambda s: s.update(step=10**6)), "step"),
    "rng state cut": (STATE_FILE, _rewrite_state(lambda s: s.update(rng=s["rng"][:100])), "RNG"),
    "history not JSON": (STATE_FILE, _rewrite_state(lambda s: s.update(history="{oops")), "history"),
    "history without val": (STATE_FILE, _rewrite_state(lambda s: s.update(history='{"train": []}')), "history"),
    "best a number": (STATE_FILE, _rewrite_state(lambda s: s.update(best="3")), "best validation"),
    "moment of another shape": (STATE_FILE, _rewrite_state(
        lambda s: _optimizer_entry(s).update(exp_avg=torch.zeros(7))), "shape"),
    "moment an integer tensor": (STATE_FILE, _rewrite_state(
        lambda s: _optimizer_entry(s).update(exp_avg_sq=_optimizer_entry(s)["exp_avg_sq"].long())), "floating"),
    "moment not finite": (STATE_FILE, _rewrite_state(
        lambda s: _optimizer_entry(s)["exp_avg"].fill_(float("nan"))), "non-finite"),
    "step count a number": (STATE_FILE, _rewrite_state(lambda s: _optimizer_entry(s).update(step=3)), "not a tensor"),
    "learning rate a string": (STATE_FILE, _rewrite_state(
        lambda s: s["optimizer"]["param_groups"][0].update(lr="fast")), "lr"),
    "a parameter group missing": (STATE_FILE, _rewrite_state(
        lambda s: s["optimizer"]["param_groups"].pop()), "parameter groups"),
    "a parameter missing from a group": (STATE_FILE, _rewrite_state(
        lambda s: s["optimizer"]["param_groups"][0]["params"].pop()), "parameter group 0"),
    "state of an unknown parameter": (STATE_FILE, _rewrite_state(
        lambda s: s["optimizer"]["state"].update({10**6: {}})), "no group lists"),
    "scheduler epoch a string": (STATE_FILE, _rewrite_state(lambda s: s["scheduler"].update(last_epoch="3")),
                                 "scheduler"),
    "scheduler attribute injected": (STATE_FILE, _rewrite_state(lambda s: s["scheduler"].update(step=1)),
                                     "other entries (step)"),
    "learning rate missing": (STATE_FILE, _rewrite_state(lambda s: s["optimizer"]["param_groups"][1].pop("lr")),
                              "other entries (lr)"),
    "scheduler lambda state injected": (STATE_FILE, _rewrite_state(
        lambda s: s["scheduler"]["lr_lambdas"][0].update(func=1)), "scheduler"),
    # the settings the run was made with (JSON)
    "settings missing": (SETTINGS_FILE, _remove(SETTINGS_FILE), "missing"),
    "settings empty": (SETTINGS_FILE, _overwrite(SETTINGS_FILE, b""), "not valid JSON"),
    "settings truncated": (SETTINGS_FILE, _truncate(SETTINGS_FILE), "not valid JSON"),
    "settings binary": (SETTINGS_FILE, _overwrite(SETTINGS_FILE, GARBAGE), "not text"),
    "settings a list": (SETTINGS_FILE, _overwrite(SETTINGS_FILE, b"[1, 2]"), "not the run's settings"),
    # the trainable weights and the best weights (safetensors)
    "weights truncated": (WEIGHTS_FILE, _truncate(WEIGHTS_FILE, 0.9), "not a safetensors file"),
    "weights header only": (WEIGHTS_FILE, _truncate(WEIGHTS_FILE, 0.002), "not a safetensors file"),
    "weights garbage": (WEIGHTS_FILE, _overwrite(WEIGHTS_FILE, GARBAGE), "not a safetensors file"),
    "weights missing": (WEIGHTS_FILE, _remove(WEIGHTS_FILE), "missing"),
    "weights lack a tensor": (WEIGHTS_FILE, _rewrite_weights(WEIGHTS_FILE, lambda w: w.pop(_first(w))),
                              "other trainable weights"),
    "weights of another shape": (WEIGHTS_FILE, _rewrite_weights(
        WEIGHTS_FILE, lambda w: w.update({_first(w): torch.zeros(1)})), "this run trains it as"),
    "weights of another dtype": (WEIGHTS_FILE, _rewrite_weights(
        WEIGHTS_FILE, lambda w: w.update({_first(w): w[_first(w)].double()})), "this run trains it as"),
    "weights not finite": (WEIGHTS_FILE, _rewrite_weights(
        WEIGHTS_FILE, lambda w: w[_first(w)].view(-1)[0].fill_(float("inf"))), "non-finite"),
    "best weights truncated": (BEST_FILE, _truncate(BEST_FILE), "not a safetensors file"),
    "best weights missing": (BEST_FILE, _remove(BEST_FILE), "missing"),
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_damaged_checkpoints_are_refused_before_any_step(models, checkpoint, tmp_path):
    """Each damage, alone, on a copy of a good checkpoint: a RecoveryError (exit 2 on the command line)
    naming the folder and the file and saying what to do; no step taken, the folder left as it was."""
    assert issubclass(RecoveryError, SecateursError)
    for case, (name, damage, expected) in DAMAGE.items():
        ckpt = tmp_path / case.replace(" ", "-")
        shutil.copytree(checkpoint, ckpt)
        damage(ckpt)
        before = _snapshot(ckpt)
        steps = []
        with pytest.raises(RecoveryError) as refused:
            _library_run(models, ckpt, resume=True, on_step=lambda record, loop: steps.append(record["step"]))
        message = str(refused.value)
        assert name in message and str(ckpt) in message and "without" in message and "resume" in message, \
            (case, message)
        assert expected in message, (case, message)
        assert "Traceback" not in message and "weights_only=False" not in message, (case, message)
        assert steps == [], f"{case}: trained {steps} before refusing"
        assert _snapshot(ckpt) == before, case
        shutil.rmtree(ckpt)
    for case, damage in {"marker garbage": _overwrite(MARKER, GARBAGE), "marker missing": _remove(MARKER)}.items():
        ckpt = tmp_path / case.replace(" ", "-")  # the folder's secateurs marker: refused by recover() itself
        shutil.copytree(checkpoint, ckpt)
        damage(ckpt)
        steps = []
        with pytest.raises(SecateursError, match=str(ckpt)):
            _library_run(models, ckpt, resume=True, on_step=lambda record, loop: steps.append(record["step"]))
        assert steps == [], case
    assert not (checkpoint.parent / "pwned").exists(), "the state file's pickle ran code"
    resumed = _library_run(models, checkpoint, resume=True)  # the undamaged checkpoint still resumes
    assert resumed.record["steps"]["resumed_at"] == [CRASH_AT]


def test_settings_of_another_type_are_other_settings(models, checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    settings = json.loads((ckpt / SETTINGS_FILE).read_text())
    (ckpt / SETTINGS_FILE).write_text(json.dumps({**settings, "loop": "fast"}))
    with pytest.raises(RecoveryError, match=r"other settings \(loop\)"):
        _library_run(models, ckpt, resume=True)


# -- SIGTERM: exit 143, nothing partial, the last checkpoint whole, and a bit-identical resume -----------

def _command(student_folder: Path, out: Path) -> list[str]:
    return ["recover", str(student_folder), "--teacher", str(STORIES), "--data", str(TINYSTORIES_TEXT),
            "--tokens", str(STEPS * 2 * SEQ), "--train-length", str(SEQ), "--val-tokens", str(2 * SEQ),
            "--save-every", "1", "--threads", "1", "--out", str(out)]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    assert tensors, f"no weights in {folder}"
    return tensors


@pytest.fixture(scope="module")
def uninterrupted(student_folder, tmp_path_factory):
    """The weights of the run that was never stopped (the same command, in this process)."""
    out = tmp_path_factory.mktemp("whole") / "out"
    assert main(_command(student_folder, out)) == 0
    assert not out.with_name("out.checkpoints").exists()
    return _weights(out)


def _terminate_when(command: list[str], ready, what: str, timeout: float = 120.0) -> str:
    """Run `secateurs COMMAND` in a child, send it SIGTERM as soon as ready(stderr so far) holds,
    and return its stderr once it has exited with 143."""
    child = subprocess.Popen([sys.executable, "-m", "secateurs", *command], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: child.stderr.read1(4096), b"")), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while not ready(b"".join(chunks).decode(errors="replace")):
            if child.poll() is not None or time.monotonic() > deadline:
                reader.join(5)
                pytest.fail(f"the run ended (status {child.poll()}) before {what}:\n"
                            f"{b''.join(chunks).decode(errors='replace')[-3000:]}")
            time.sleep(0.001)
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        reader.join(5)
        child.stderr.close()
    err = b"".join(chunks).decode(errors="replace")
    assert code == 143, f"SIGTERM {what}: status {code}\n{err[-3000:]}"
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("secateurs: ")]
    assert "terminated" in lines[-1] and "Traceback" not in err, err[-3000:]
    return err


def _no_leftovers(parent: Path) -> None:
    left = sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)
    assert not left, f"temporary folders left behind: {left}"
    assert not (parent / "out").exists(), "an interrupted run created its output"


def _checkpoint_step(ckpt: Path) -> int:
    """The step of a whole checkpoint: every file reads back (the loop checks the rest on resume)."""
    json.loads((ckpt / SETTINGS_FILE).read_text())
    assert load_file(ckpt / WEIGHTS_FILE) and load_file(ckpt / BEST_FILE)
    return int(_state(ckpt)["step"])


def _resumes_to(command: list[str], uninterrupted: dict, parent: Path) -> None:
    assert main([*command, "--resume"]) == 0
    resumed = _weights(parent / "out")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs from the uninterrupted run's"
    assert not (parent / "out.checkpoints").exists()  # the default checkpoint folder goes after success
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_sigterm_while_loading_leaves_nothing(student_folder, tmp_path):
    command = _command(student_folder, tmp_path / "out")
    _terminate_when(command, lambda err: "secateurs: loading" in err, "while loading")
    _no_leftovers(tmp_path)
    assert not (tmp_path / "out.checkpoints").exists()


def test_sigterm_after_the_first_checkpoint_resumes_bit_identically(student_folder, uninterrupted, tmp_path,
                                                                   capsys):
    """Stopped once the first checkpoint is in place; a damaged copy of it is refused on the command line
    with exit 2, and the checkpoint as it was then resumes to the uninterrupted run's weights."""
    command = _command(student_folder, tmp_path / "out")
    ckpt = tmp_path / "out.checkpoints"
    _terminate_when(command, lambda err: ckpt.is_dir(), "after the first checkpoint")
    _no_leftovers(tmp_path)
    assert 1 <= _checkpoint_step(ckpt) < STEPS
    state = (ckpt / STATE_FILE).read_bytes()
    (ckpt / STATE_FILE).write_bytes(state[: len(state) // 2])
    capsys.readouterr()
    assert main([*command, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"secateurs: error: --resume: the checkpoint in {ckpt} is damaged: {STATE_FILE}" in err, err
    assert "without --resume" in err and "Traceback" not in err
    _no_leftovers(tmp_path)
    (ckpt / STATE_FILE).write_bytes(state)
    _resumes_to(command, uninterrupted, tmp_path)


def test_sigterm_while_writing_a_later_checkpoint_resumes_bit_identically(student_folder, uninterrupted, tmp_path):
    """Stopped mid-run, after several checkpoints, while the next one is being written: its temporary
    folder goes, the one before stays whole, and the resume ends where the uninterrupted run did."""
    command = _command(student_folder, tmp_path / "out")
    ckpt = tmp_path / "out.checkpoints"
    inodes: list[int] = []

    def writing_after_three(err: str) -> bool:
        try:
            inode = ckpt.stat().st_ino  # each checkpoint is a new folder swapped in (inodes may recur)
        except FileNotFoundError:
            return False
        if not inodes or inodes[-1] != inode:
            inodes.append(inode)
        return len(inodes) >= 3 and any(tmp_path.glob(".out.checkpoints.tmp-*"))

    _terminate_when(command, writing_after_three, "while writing the third or a later checkpoint")
    _no_leftovers(tmp_path)
    assert 3 <= _checkpoint_step(ckpt) < STEPS
    _resumes_to(command, uninterrupted, tmp_path)
