"""Recovery in several processes (torchrun): two processes of one sequence each give the run of one
process of two sequences, with every process holding the whole student (ddp) or the student sharded
over them (fsdp, with its sharded checkpoints resumed by another number of processes, and on two
"nodes" of one machine); a process that sees WORLD_SIZE > 1 without the others is refused before any
weights load, and a sharded checkpoint whose metadata would run code is refused as damaged.

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
import pickle
import shutil
import socket
import subprocess
import sys
import uuid
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


def _pruned_stories(tmp_path_factory, name: str, method: str) -> Path:
    """stories260K pruned by `method` at 20%, in float64."""
    out = tmp_path_factory.mktemp("distributed") / name
    assert main(["--quiet", "prune", str(STORIES), "--method", method, "--ratio", "0.2", "--calib",
                 str(TINYSTORIES_TEXT), "--calib-samples", "8", "--calib-length", "64", "--dtype", "float64",
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    return _pruned_stories(tmp_path_factory, "pruned", "amp")


def _launch(program: list[str], processes: int) -> subprocess.CompletedProcess:
    """`program` (a script or `-m module` and its arguments) under torchrun in `processes` processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--rdzv-endpoint", "localhost:0",
               "--nproc_per_node", str(processes), *program]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def _torchrun(args: list[str], processes: int) -> subprocess.CompletedProcess:
    return _launch(["-m", "secateurs", "--quiet", *args], processes)


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
    assert done.stdout.count(f"saved to {two.resolve()}") == 1, done.stdout  # process 0 alone reports
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert next(iter(weights_one.values())).dtype == next(iter(weights_two.values())).dtype
    assert _max_difference(weights_one, weights_two) < TOLERANCE
    record_one = json.loads((one / "recovery.json").read_text())
    record_two = json.loads((two / "recovery.json").read_text())
    assert "processes" not in record_one
    assert record_two["processes"] == {"world_size": 2, "strategy": "ddp", "teacher_sharded": False,
                                     "batch_size_per_process": 1}
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


# -- fully sharded (fsdp) ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def per_layer(tmp_path_factory) -> Path:
    """FLAP's cut: every layer its own heads and MLP width, with compensation biases."""
    out = _pruned_stories(tmp_path_factory, "per-layer", "flap")
    assert json.loads((out / "config.json").read_text())["secateurs"]["heterogeneous"]
    return out


FSDP = ["--strategy", "fsdp"]
# LoRA without clipping (the norm of sharded gradients without clip_grad_norm_), with gradient accumulation
FSDP_LORA = ["--lora", "--lora-dropout", "0", "--grad-accum", "2", "--kd-ratio", "0.5", "--max-grad-norm", "0",
             "--val-tokens", "192"]


def _assert_same_run(one: Path, two: Path) -> dict:
    assert _max_difference(load_file(one / "model.safetensors"), load_file(two / "model.safetensors")) < TOLERANCE
    record_one = json.loads((one / "recovery.json").read_text())
    record_two = json.loads((two / "recovery.json").read_text())
    for curve in ("train", "val"):
        a, b = record_one["curves"][curve], record_two["curves"][curve]
        assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) > 1
        assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < TOLERANCE
    assert record_one["parametrisation"] == record_two["parametrisation"]
    return record_two


@pytest.mark.parametrize("method", [FULL, FSDP_LORA], ids=["full", "lora"])
@pytest.mark.parametrize("student", ["pruned", "per_layer"], ids=["gqa", "per-layer"])
def test_fsdp_two_processes_equal_one(student, method, request, tmp_path):
    source = request.getfixturevalue(student)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["--quiet", *_recover_args(source, one, method)]) == 0
    done = _torchrun(_recover_args(source, two, [*method, *FSDP]), processes=2)
    assert done.returncode == 0, done.stderr[-4000:]
    record = _assert_same_run(one, two)
    assert record["processes"] == {"world_size": 2, "strategy": "fsdp", "teacher_sharded": False,
                                   "batch_size_per_process": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_nodes(args: list[str]) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents of one process each, meeting at a c10d rendezvous on this machine."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{_free_port()}", "--rdzv-id",
               uuid.uuid4().hex, "-m", "secateurs", "--quiet", *args]
    nodes = [subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    return [subprocess.CompletedProcess(command, n.wait(timeout=300), *n.communicate()) for n in nodes]


def test_fsdp_on_two_nodes_and_its_checkpoint_resumed_in_one_process(pruned, tmp_path):
    """Two nodes of one process each write sharded checkpoints (every third step); one process resumes
    the step-6 one and ends where they and the uninterrupted one-process run end."""
    checkpoints = [*FULL, *FSDP, "--save-every", "3", "--checkpoint-dir", str(tmp_path / "checkpoints")]
    assert main(["--quiet", *_recover_args(pruned, tmp_path / "one", FULL)]) == 0
    for node in _two_nodes(_recover_args(pruned, tmp_path / "two", checkpoints)):
        assert node.returncode == 0, node.stderr[-4000:]
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    shards = tmp_path / "checkpoints" / "shards"
    sizes = {p.name: p.stat().st_size for p in shards.glob("*.distcp")}
    assert sorted(sizes) == ["__0_0.distcp", "__1_0.distcp"]
    assert max(sizes.values()) < 0.6 * sum(sizes.values())  # each process wrote its half: the weights were sharded
    assert main(["--quiet", *_recover_args(pruned, tmp_path / "resumed", [*checkpoints, "--resume"])]) == 0
    record = _assert_same_run(tmp_path / "one", tmp_path / "resumed")
    assert record["steps"]["resumed_at"] == [6] and record["steps"]["done"] == 8 and "processes" not in record


@pytest.fixture(scope="module")
def one_process_checkpoint(pruned, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(the uninterrupted run's output, a sharded checkpoint of one process at step 6, its settings)."""
    folder = tmp_path_factory.mktemp("fsdp-one")
    checkpoints = [*FULL, *FSDP, "--save-every", "3", "--checkpoint-dir", str(folder / "checkpoints")]
    assert main(["--quiet", *_recover_args(pruned, folder / "one", checkpoints)]) == 0
    assert sorted(p.name for p in (folder / "checkpoints" / "shards").glob("*.distcp")) == ["__0_0.distcp"]
    return folder / "one", folder / "checkpoints", checkpoints


def test_fsdp_checkpoint_of_one_process_resumes_in_two(pruned, one_process_checkpoint, tmp_path):
    one, checkpoint, checkpoints = one_process_checkpoint
    resumable = tmp_path / "checkpoints"
    shutil.copytree(checkpoint, resumable)
    settings = [*checkpoints[:-1], str(resumable), "--resume"]
    done = _torchrun(_recover_args(pruned, tmp_path / "two", settings), processes=2)
    assert done.returncode == 0, done.stderr[-4000:]
    record = _assert_same_run(one, tmp_path / "two")
    assert record["steps"]["resumed_at"] == [6] and record["processes"]["strategy"] == "fsdp"


class _Code:
    """A pickle that runs a command when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _resume_refusal(pruned, checkpoint: Path, settings: list[str], out: Path, capsys) -> str:
    assert main(["--quiet", *_recover_args(pruned, out, [*settings[:-1], str(checkpoint), "--resume"])]) == 2
    assert not out.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("damage", ["code in the metadata", "a shard cut short", "a path out of the folder"])
def test_damaged_sharded_checkpoint_is_refused_before_any_step(pruned, one_process_checkpoint, tmp_path, capsys,
                                                               damage):
    _, checkpoint, settings = one_process_checkpoint
    folder = tmp_path / "checkpoints"
    shutil.copytree(checkpoint, folder)
    shards, marker = folder / "shards", tmp_path / "code-ran"
    if damage == "code in the metadata":
        (shards / ".metadata").write_bytes(pickle.dumps(_Code(marker)))
        expected = "names posix.system"
    elif damage == "a shard cut short":
        data = (shards / "__0_0.distcp").read_bytes()
        (shards / "__0_0.distcp").write_bytes(data[: len(data) // 2])
        expected = "shorter than its table says"
    else:
        text = (shards / ".metadata").read_bytes().replace(b"__0_0.distcp", b"../_0.distcp")  # the same length
        (shards / ".metadata").write_bytes(text)
        expected = "points outside the folder"
    err = _resume_refusal(pruned, folder, settings, tmp_path / "out", capsys)
    assert f"the checkpoint in {folder} is damaged: shards" in err and expected in err, err
    assert not marker.exists()


def test_checkpoint_of_another_strategy_is_refused(pruned, one_process_checkpoint, tmp_path, capsys):
    _, checkpoint, settings = one_process_checkpoint
    ddp = [s for s in settings if s not in FSDP]
    err = _resume_refusal(pruned, checkpoint, ddp, tmp_path / "out", capsys)
    assert "written by a run with --strategy fsdp" in err and "resume with --strategy fsdp" in err, err


# -- a sharded teacher, and the models loaded once ----------------------------------------------------

SHARDED_TEACHER = [*FSDP, "--teacher-sharding", "sharded"]


@pytest.mark.parametrize("method", [FULL, FSDP_LORA], ids=["full", "lora"])
def test_fsdp_with_a_sharded_teacher_equals_one_process(pruned, tmp_path, method):
    """Two processes of one sequence each, the student and the teacher sharded over them and loaded
    once (process 0 reads the weights), give the run of one process of two sequences."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["--quiet", *_recover_args(pruned, one, method)]) == 0
    done = _torchrun(_recover_args(pruned, two, [*method, *SHARDED_TEACHER]), processes=2)
    assert done.returncode == 0, done.stderr[-4000:]
    assert _assert_same_run(one, two)["processes"]["teacher_sharded"] is True


LOAD_ONCE = """
import sys, torch, torch.distributed as dist
from secateurs.runtime import sharding
from secateurs.runtime.distributed import join
from secateurs.storage import loading
from secateurs.recovery.lora import attach_lora
from secateurs.adapters import get_adapter
from secateurs.recovery.objectives import final_hidden
source, lora, out = sys.argv[1], sys.argv[2] == "lora", sys.argv[3]
world = join("cpu")
reads = []
def load():
    reads.append(source)
    return loading.load_model(source, "float64", "cpu")
model, tokenizer = sharding.load_once(load, world)
whole, _ = loading.load_model(source, "float64", "cpu")  # what every process loading the folder holds
meta = sharding.on_meta(model)
if lora:
    torch.manual_seed(0)
    attach_lora(model, 4, 8, 0.0)
    torch.manual_seed(0)
    attach_lora(whole, 4, 8, 0.0)
state = sharding.full_state(model) if world.main else None
sharded = sharding.shard(model, get_adapter(model).decoder_layers(model), final_hidden, device=torch.device("cpu"),
                         processes=world.size, home=torch.device("cpu"))
sharding.fill_from_main(model, state, torch.device("cpu"), world.main)
sharding.unshard(sharded)
same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), whole.state_dict().values()))
same = same and list(model.state_dict()) == list(whole.state_dict())
buffers = all(torch.equal(a, b) for a, b in zip(model.buffers(), whole.buffers()))
tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
with open(f"{out}/rank{world.rank}", "w") as f:
    f.write(f"rank={world.rank} reads={len(reads)} meta={meta} same={same} buffers={buffers} tied={tied} "
            f"tokenizer={tokenizer is not None}")
"""


@pytest.mark.parametrize("lora", ["full", "lora"])
@pytest.mark.parametrize("student", ["pruned", "per_layer"], ids=["gqa", "per-layer"])
def test_loaded_once_gives_every_process_the_weights(student, lora, request, tmp_path):
    """Process 0 alone reads the folder; the other builds the model on the meta device; once sharded and
    filled from process 0 (then gathered whole) both hold bit for bit the weights and buffers of the folder
    loaded in full, tied weights still one parameter."""
    script = tmp_path / "load_once.py"
    script.write_text(LOAD_ONCE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--rdzv-endpoint", "localhost:0",
               "--nproc_per_node", "2", str(script), str(request.getfixturevalue(student)), lora, str(tmp_path)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)]
    tied = "True" if json.loads((STORIES / "config.json").read_text()).get("tie_word_embeddings", True) else "False"
    assert results == [f"rank=0 reads=1 meta=False same=True buffers=True tied={tied} tokenizer=True",
                       f"rank=1 reads=0 meta=True same=True buffers=True tied={tied} tokenizer=True"]


CACHE_SCRIPT = """
import sys
from secateurs.recovery.settings import TeacherLogitsSettings
from secateurs.recovery.teacher_cache import write_teacher_logits
from secateurs.storage.loading import load_model

teacher, tok = load_model(sys.argv[1], dtype="float32")
settings = TeacherLogitsSettings(data=sys.argv[2], tokens=1024, val_tokens=192, seq_len=64, top_k=16,
                                 shard_sequences=3, selection=sys.argv[5])
write_teacher_logits(teacher, tok, settings, sys.argv[3], resume=sys.argv[4] == "resume", progress=False)
"""


def _cache_files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".secateurs")}


@pytest.mark.parametrize("selection", ["top-k", "sampled"])
def test_teacher_cache_written_by_two_processes_is_the_one_of_one(tmp_path, selection):
    """Every process computes every other shard and process 0 writes them in order: the files are the
    one-process write's, byte for byte (a sampled cache's draws too: each shard's own seed), also when
    two processes resume a write one process began."""
    script = tmp_path / "cache.py"
    script.write_text(CACHE_SCRIPT)

    def write(out: Path, processes: int, mode: str = "new") -> None:
        program = [str(script), str(STORIES), str(TINYSTORIES_TEXT), str(out), mode, selection]
        done = (_launch(program, processes) if processes > 1 else
                subprocess.run([sys.executable, *program], env=ENV, capture_output=True, text=True, timeout=300))
        assert done.returncode == 0, done.stderr[-4000:]

    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    write(one, 1)
    write(two, 2)
    files = _cache_files(one)
    manifest = json.loads(files["manifest.json"])
    assert len(manifest["shards"]) == manifest["planned_shards"] >= 5 and manifest["complete"]
    assert _cache_files(two) == files
    shutil.copytree(one, resumed)  # an interrupted write: its first shard done, the manifest saying so
    for entry in manifest["shards"][1:]:
        (resumed / entry["file"]).unlink()
    (resumed / "manifest.json").write_text(json.dumps({**manifest, "shards": manifest["shards"][:1],
                                                       "complete": False}, indent=1) + "\n")
    write(resumed, 2, "resume")
    assert _cache_files(resumed) == files


def test_prune_recover_in_two_processes_equals_one(tmp_path):
    """`prune --recover` under a launcher: process 0 prunes and samples the teacher's own recovery data
    (`--data self`), the others take its plan, weights and data, and the two processes together train to
    the one-process run of the same global batch."""
    def args(out: Path) -> list[str]:
        return ["prune", str(STORIES), "--method", "amp", "--ratio", "0.2", "--calib", str(TINYSTORIES_TEXT),
                "--calib-samples", "8", "--calib-length", "64", "--dtype", "float64", "--recover", "--data", "self",
                "--tokens", "512", "--val-tokens", "128", "--train-length", "64", "--train-batch-size", "2",
                "--threads", "1", "--out", str(out)]

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["--quiet", *args(one)]) == 0
    done = _torchrun(args(two), processes=2)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count(f"saved to {two.resolve()}") == 1, done.stdout  # process 0 alone reports
    assert _max_difference(load_file(one / "model.safetensors"), load_file(two / "model.safetensors")) < TOLERANCE
    plan_one, plan_two = (json.loads((f / "pruning_plan.json").read_text()) for f in (one, two))
    assert plan_one["layers"] == plan_two["layers"]
    record_one, record_two = (json.loads((f / "recovery.json").read_text()) for f in (one, two))
    assert record_two["processes"]["world_size"] == 2 and record_one["steps"] == record_two["steps"]
    assert record_one["data"]["hash"] == record_two["data"]["hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
