"""Recovery in several processes (torchrun): two processes of one sequence each give the run of one
process of two sequences, and a process that sees WORLD_SIZE > 1 without the others is refused
before any weights load.

Tolerance: the runs are in float64 and differ only in the order of floating-point additions (each
process's forward sees one sequence instead of two, the gradients and loss sums are added across
processes), about one unit in the last place (~1e-16) per operation. After the run's eight AdamW
steps the saved weights agree to ~5e-16 and the losses to ~2e-16 (measured); 1e-12 leaves that
room four orders over, while a process on the wrong share of the batch, gradients averaged instead
of summed or losses not summed over the processes move the weights by 1e-9 or more and the losses
by whole percents."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import STORIES, TINYSTORIES_TEXT
from safetensors.torch import load_file

from secateurs.cli.main import main
from secateurs.runtime.distributed import World

SRC = Path(__file__).resolve().parents[1] / "src"
TOLERANCE = 1e-12
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
for _name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)


def _recover_args(pruned: Path, out: Path, method: list[str]) -> list[str]:
    return ["recover", str(pruned), "--teacher", str(STORIES), "--data", str(TINYSTORIES_TEXT), "--tokens", "1024",
            "--train-length", "64", "--train-batch-size", "2", "--dtype", "float64", "--threads", "1",
            "--out", str(out), *method]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed") / "pruned"
    assert main(["--quiet", "prune", str(STORIES), "--method", "amp", "--ratio", "0.2", "--calib",
                 str(TINYSTORIES_TEXT), "--calib-samples", "8", "--calib-length", "64", "--dtype", "float64",
                 "--out", str(out)]) == 0
    return out


def _torchrun(args: list[str], processes: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--rdzv-endpoint", "localhost:0",
               "--nproc_per_node", str(processes), "-m", "secateurs", "--quiet", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# LoRA also with gradient accumulation, a mixed objective, a checkpoint and three validation sequences (the
# last validation batch is one sequence: the second process has none of it).
FULL = ["--full", "--val-tokens", "256"]
LORA = ["--lora", "--lora-dropout", "0", "--grad-accum", "2", "--kd-ratio", "0.5", "--save-every", "3",
        "--val-tokens", "192"]


@pytest.mark.parametrize("method", [FULL, LORA], ids=["full", "lora"])
def test_two_processes_equal_one(pruned, tmp_path, method):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["--quiet", *_recover_args(pruned, one, method)]) == 0
    done = _torchrun(_recover_args(pruned, two, method), processes=2)
    assert done.returncode == 0, done.stderr[-4000:]
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert next(iter(weights_one.values())).dtype == next(iter(weights_two.values())).dtype
    assert _max_difference(weights_one, weights_two) < TOLERANCE
    record_one = json.loads((one / "recovery.json").read_text())
    record_two = json.loads((two / "recovery.json").read_text())
    assert "processes" not in record_one
    assert record_two["processes"] == {"world_size": 2, "strategy": "ddp", "batch_size_per_process": 1}
    for curve in ("train", "val"):
        a, b = record_one["curves"][curve], record_two["curves"][curve]
        assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) > 1
        assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < TOLERANCE
    assert record_one["steps"] == record_two["steps"] and record_one["batch"] == record_two["batch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no checkpoints, no temporary folders


def test_checkpoint_of_two_processes_resumes_in_one(pruned, tmp_path):
    """A checkpoint holds the whole state (weights, optimiser, step), whatever the processes that
    wrote it: one process resumes the two processes' step-6 checkpoint and ends where they did."""
    checkpoints = [*FULL, "--save-every", "3", "--checkpoint-dir", str(tmp_path / "checkpoints")]
    done = _torchrun(_recover_args(pruned, tmp_path / "two", checkpoints), processes=2)
    assert done.returncode == 0, done.stderr[-4000:]
    assert main(["--quiet", *_recover_args(pruned, tmp_path / "resumed", [*checkpoints, "--resume"])]) == 0
    record = json.loads((tmp_path / "resumed" / "recovery.json").read_text())
    assert record["steps"]["resumed_at"] == [6] and record["steps"]["done"] == 8
    assert _max_difference(load_file(tmp_path / "two" / "model.safetensors"),
                           load_file(tmp_path / "resumed" / "model.safetensors")) < TOLERANCE


def test_world_without_the_others_is_refused_before_loading(pruned, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(pruned, student)
    (student / "model.safetensors").write_bytes(b"not weights")  # loading them would fail otherwise
    out = tmp_path / "out"
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}  # no MASTER_ADDR, MASTER_PORT: no launcher
    done = subprocess.run([sys.executable, "-m", "secateurs", *_recover_args(student, out, FULL)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "WORLD_SIZE is 2 but this process cannot form a process group" in done.stderr, done.stderr[-3000:]
    assert "MASTER_ADDR" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("count", [0, 1, 2, 5, 8])
def test_shares_are_contiguous_and_cover_in_rank_order(size, count):
    shares = [World(rank, size).share(10, 10 + count) for rank in range(size)]
    positions = [p for s in shares for p in range(s.start, s.stop)]
    assert positions == list(range(10, 10 + count))
    assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1


def test_refusal_of_process_zero_stops_every_process(pruned, tmp_path):
    """Process 0 alone checks the outputs; when it refuses, the others stop with its message."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.txt").write_text("not secateurs' output")
    done = _torchrun(_recover_args(pruned, out, FULL), processes=2)
    assert done.returncode != 0
    # the two processes write to one stderr, so their messages may interleave: count them, not lines
    errors = (done.stdout + done.stderr).split("secateurs: error: ")[1:]
    assert len(errors) == 2 and all("already exists" in e for e in errors), done.stderr[-3000:]
    assert sum(e.startswith("process 0 stopped the run: output folder") for e in errors) == 1
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]
