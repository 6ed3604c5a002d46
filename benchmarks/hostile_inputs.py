"""Hostile and careless input against the CLI: every case is classified by what it did.

    damage          a victim changed or went away: the input model, the pruned student, a sibling
                    folder secateurs wrote for another run, an unrelated file (README.md, a notes
                    JSON), the working directory, or any file or folder that existed before the run
                    outside the case's own outputs (changed, removed, or a folder gone)
    silent          bad input accepted: exit status 0 (or a NaN reached the saved weights, or the
                    run was still working when the per-case time limit stopped it)
    traceback       a raw Python traceback (an exception escaped `main`) or an "unexpected failure"
    refused         exit status 2 with a `secateurs: error:` line, nothing written     <- the goal
    handled         the right answer where refusing is not it (see each case's `handled`): disk
                    full -> exit 1 with a `secateurs: error: ... disk full ...` line, SIGTERM -> exit
                    143 with the "terminated" line; a teacher that is not the student's parent ->
                    exit 0 with a line about the teacher; a run that now leaves the data alone
                    -> exit 0; always without damage, without a `.NAME.tmp-*` / `.NAME.old-*`
                    left behind, and without the output the run did not finish       <- the goal
    accepted-valid  a fuzz value that is valid for its option (VALID_VALUES, reason per option)
                    and exit status 0                                                  <- fine
    other           anything else (exit 1 with a plain message, exit 2 that wrote something, a
                    case whose setup failed)

Each case runs in a fresh folder (the case root) holding a world of victims: M/model (the dense
input, stories260K), M/victim.txt, S (a pruned student secateurs wrote, made once per probe run and
copied), sibling_run (another secateurs output), README.md, and the working directory (the case
root, or a folder inside it). Snapshots record files (hash), folders and symbolic links, before and
after. Cases run in-process (`secateurs.cli.main.main`) one at a time with a time limit (60 s; a case
still running then is "silent": accepted and working), stderr captured at the file-descriptor level
too, and the runner puts back the working directory (also when the case deleted it), signal
handlers, torch's thread count and every monkeypatch, whatever the tested code did.

Faults are simulated in-process: "disk full" turns every write under the case root (or under the
part named) into ENOSPC: open() for writing yields a file on /dev/full, safetensors' save_file writes
a few bytes and raises SafetensorError("... No space left on device (os error 28)") and torch.save
writes a few bytes and raises OSError(ENOSPC) (what a full disk does to each of them).
SIGTERM is sent by the process to itself after a given recovery step, or while a checkpoint file is
being written.

The fuzz cases are generated from the parsers (`secateurs.cli.main.build_parser()`): every option of
recover, report, sweep, tasks, bench, eval and export that takes a value, each given 0, -1, 1e13
(10000000000000 for whole-number options), nan, inf, '', a non-UTF-8 file and a directory.

Run it on any checkout (PYTHONPATH=that/src) to compare versions:

    PYTHONPATH=src python benchmarks/hostile_inputs.py --out benchmarks/results/hostile_inputs.json
    PYTHONPATH=src python benchmarks/hostile_inputs.py --only 'bench --out README' --only 'disk full'
    PYTHONPATH=src python benchmarks/hostile_inputs.py --classes      # classes and their case counts
    PYTHONPATH=src python benchmarks/hostile_inputs.py --list         # every case, no run

Needs ../shared/assets (stories260K). On a shared machine: OMP_NUM_THREADS=1. Memory is capped
(--memory-limit-gb, RLIMIT_DATA) so that a case allocating without bound fails instead of taking
the machine down.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no case waits on the network: names that are not on disk fail fast

import argparse
import contextlib
import errno
import gc
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from safetensors import SafetensorError

import secateurs
from secateurs.cli.main import build_parser
from secateurs.cli.main import main as cli_main

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
STORIES = ASSETS / "models" / "stories260K-hf"
TEXT = ASSETS / "text" / "tinystories" / "tinystories_sample.txt"
WIKI = ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw"
TASKS = ASSETS / "commonsense" / "llm-foundry"
PRUNE = ["--method", "magnitude", "--ratio", "0.2"]
LIMIT_S = 60  # per case; a case still running then was accepted (verdict "silent")
SETUP_LIMIT_S = 120
# Every recovery case is tiny: stories260K, 256 tokens in sequences of 32, 64 validation tokens.
TINY = ["--tokens", "256", "--train-length", "32", "--val-tokens", "64", "--threads", "1"]
VERDICTS = ("refused", "handled", "accepted-valid", "damage", "silent", "traceback", "other")
DEFAULT_WRITES = ("out", "out.gguf", "out.json", "out.md", "out.checkpoints", "d", "s")
_TEMP = re.compile(r"^(\..+\.(tmp|old)-\d+-.*|\.secateurs-probe-.*)$")
_REAL_OPEN = open  # the probe reads through this even while a case has open() patched
FUZZ_COMMANDS = ("recover", "report", "sweep", "tasks", "bench", "eval", "export")
BIG = "1e13"
BIG_INT = "10000000000000"
NONUTF8, DIRECTORY = "<non-UTF-8 file>", "<directory>"
FUZZ_VALUES = ("0", "-1", BIG, "nan", "inf", "", NONUTF8, DIRECTORY)  # BIG becomes BIG_INT for whole numbers

# Fuzz values that are valid for their option: exit 0 there is "accepted-valid", not "silent".
# (command, flag, value) -> why the value is valid. Values as given (BIG_INT for whole numbers).
_CAP = "a cap ('at most N' / 'first N'): more than there is means all of it"
VALID_VALUES = {
    ("recover", "--val-tokens", "0"): "documented: 0 means no validation",
    ("recover", "--patience", "0"): "documented: 0 means never stop early",
    ("recover", "--patience", BIG_INT): "never stopping early, as 0 does",
    ("recover", "--max-grad-norm", "0"): "documented: 0 turns gradient clipping off",
    ("recover", "--hidden-weight", "0"): "the default: hidden-state matching off",
    ("recover", "--weight-decay", "0"): "the default weight decay",
    ("recover", "--warmup-ratio", "0"): "no warm-up is a valid schedule ([0, 1))",
    ("recover", "--kd-ratio", "0"): "pure cross-entropy, inside the documented [0, 1]",
    ("recover", "--lora-dropout", "0"): "no dropout is valid (0 <= dropout < 1)",
    ("recover", "--seed", "0"): "the default seed",
    ("recover", "--seed", BIG_INT): "any non-negative whole number is a seed",
    ("recover", "--eval-every", BIG_INT): "beyond the run: the loop still validates at its last step",
    ("recover", "--save-every", BIG_INT): "beyond the run: no checkpoint, as without --save-every",
    ("recover", "--ppl-tokens", BIG_INT): _CAP,
    ("sweep", "--seed", "0"): "the default seed",
    ("sweep", "--seed", BIG_INT): "any non-negative whole number is a seed",
    ("bench", "--warmup", "0"): "no unmeasured warm-up round is valid",
    **{(c, "--num-fewshot", "0"): "the default: zero-shot" for c in ("eval", "sweep")},
    **{(c, f, BIG_INT): _CAP for c in ("eval", "sweep")
       for f in ("--max-windows", "--max-tokens", "--max-docs", "--max-batch-tokens")},
    **{(c, "--limit", BIG): _CAP for c in ("eval", "sweep")},
    **{(c, "--batch-size", BIG_INT): "windows per pass, bounded by --max-batch-tokens and the windows there are"
       for c in ("eval", "sweep")},
    **{(c, "--text-field", v): "any string names a .jsonl field (a .txt text has none to read)"
       for c in ("eval", "sweep") for v in ("0", "-1", BIG, "nan", "inf")},
    **{("tasks", "--prefix", v): "letters, digits, '_' and '.' make a task name prefix"
       for v in ("0", BIG, "nan", "inf")},
    **{(c, "--out", v): "a folder may be named so (a new folder, created by the run)"
       for c in ("recover", "report", "sweep", "tasks") for v in ("0", "-1", BIG, "nan", "inf")},
    ("recover", "--max-hours", BIG): "documented: the limit on the estimated time; a large one means no limit",
    ("recover", "--max-grad-norm", BIG): "a clipping norm no gradient reaches: clipping never acts, as with 0",
}


# -- snapshots and the world ------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root, relative: ('d',) a folder, ('l', target) a symbolic link (not
    followed), ('f', sha1) a file."""
    out: dict[str, tuple] = {}
    if not root.is_dir():
        return out
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        for name in dirs + files:
            path = os.path.join(folder, name)
            key = os.path.normpath(os.path.join(rel, name))
            if os.path.islink(path):
                out[key] = ("l", os.readlink(path))
            elif name in dirs:
                out[key] = ("d",)
            else:
                try:
                    with _REAL_OPEN(path, "rb") as handle:
                        out[key] = ("f", hashlib.sha1(handle.read()).hexdigest())
                except OSError as exc:
                    out[key] = ("?", exc.strerror)
    return out


def world_paths(root: Path) -> dict:
    """The world's paths (nothing created: listing the cases needs only their names)."""
    return {"model": str(root / "M" / "model"), "parent": str(root / "M"), "binary": str(root / "binary.txt"),
            "folder": str(root / "a_folder"), "tiny": str(root / "tiny.txt"), "student": str(root / "S"),
            "sibling": str(root / "sibling_run"), "readme": str(root / "README.md"),
            "stories": str(root / "stories.txt")}


def make_world(root: Path, cache: Path | None = None) -> dict:
    w = world_paths(root)
    parent = root / "M"
    shutil.copytree(STORIES, parent / "model")
    (parent / "victim.txt").write_text("must survive")
    Path(w["binary"]).write_bytes(b"\x00\x01\x02\xff" * 64)
    (root / "a_folder").mkdir()
    (root / "tiny.txt").write_text("Once upon a")
    student = cache / "student" if cache is not None else None
    shutil.copytree(student if student is not None and student.is_dir() else STORIES, w["student"])
    shutil.copytree(w["student"], w["sibling"])  # another run's output: a folder secateurs wrote
    Path(w["readme"]).write_text("# my project\n\nNothing here may be touched.\n")
    shutil.copy(TEXT, w["stories"])
    for p in [root, *root.rglob("*")]:  # the assets are read-only; the copies should not be
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    return w


def prepare_cache(cache: Path) -> Path:
    """The pruned student every recovery, report and export case starts from: pruned once per probe run."""
    cache.mkdir(parents=True, exist_ok=True)
    code, err, escaped = run_main(["prune", str(STORIES), *PRUNE, "--threads", "1", "--out", str(cache / "student")],
                                  limit_s=SETUP_LIMIT_S, cwd=cache)
    if code != 0:
        print(f"warning: could not prune the student (exit {code}, {escaped or ''}): {_last_message([], err)}; "
              "the dense model stands in for it", file=sys.stderr)
    return cache


# -- running one case in-process ---------------------------------------------------------------------
class RanTooLong(BaseException):
    """Raised by the alarm: the case was accepted and kept working (e.g. generating for minutes)."""


class ProbeTerminated(BaseException):
    """SIGTERM that reached the probe's own handler: the CLI had none installed at that moment."""


def _alarm(signum, frame):
    raise RanTooLong()


def _probe_sigterm(signum, frame):
    raise ProbeTerminated()


@contextlib.contextmanager
def _capture_fd2():
    """Also capture what reaches file descriptor 2 directly (logging handlers bound to the real
    stderr, C libraries): yields a list that receives the text."""
    text: list[str] = []
    try:
        sys.__stderr__.flush()
    except (AttributeError, ValueError, OSError):
        pass
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield text
        finally:
            try:
                sys.__stderr__.flush()
            except (AttributeError, ValueError, OSError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read().decode("utf-8", "replace"))


def _existing(path: str) -> str:
    """path, or its nearest parent that still exists."""
    p = Path(path)
    while not p.is_dir() and p != p.parent:
        p = p.parent
    return str(p)


def run_main(argv: list[str], limit_s: int = LIMIT_S, cwd: str | os.PathLike | None = None,
             patches=()) -> tuple[int | None, str, str | None]:
    """(exit status or None when an exception escaped, stderr, escaped exception type).

    Robust to the tested code: the working directory (even when the case removed it), signal
    handlers, torch's thread count and the patches are put back whatever happened."""
    saved_cwd = os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT)}
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    err = io.StringIO()
    escaped, code = None, None
    with _capture_fd2() as fd_text:
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stderr(err))
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            try:
                if cwd is not None:
                    os.chdir(cwd)
                for patch in patches:
                    stack.enter_context(patch)
                signal.signal(signal.SIGTERM, _probe_sigterm)  # the CLI puts its own in place while it runs
                signal.signal(signal.SIGALRM, _alarm)
                signal.alarm(limit_s)
                try:
                    code = cli_main(argv)
                finally:
                    signal.alarm(0)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 2
            except RanTooLong:
                code, escaped = None, "ran-too-long"
            except BaseException as exc:  # noqa: BLE001 - this is what we measure
                code, escaped = None, type(exc).__name__
                err.write(f"\n[probe] escaped: {type(exc).__name__}: {str(exc)[:300]}\n")
    signal.alarm(0)
    for s, handler in handlers.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    os.chdir(_existing(saved_cwd))
    if torch is None:
        torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads or _INITIAL_THREADS or 1)
    return code, err.getvalue() + "".join(fd_text), escaped


_INITIAL_THREADS: int | None = None


# -- faults: disk full, SIGTERM ------------------------------------------------------------------------
@contextlib.contextmanager
def _patched(pairs: dict):
    """Replace each original (a key of `pairs`, found by identity) by its replacement wherever a
    loaded module holds it, under any name (`from safetensors.torch import save_file as
    safe_save_file` included); a module imported meanwhile picks the replacement up from its source
    module. Everything is put back afterwards, in the modules imported meanwhile too."""
    by_id = {id(k): v for k, v in pairs.items()}
    back = {id(v): k for k, v in pairs.items()}

    def swap(table: dict) -> None:
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict) or namespace is globals():  # the probe keeps the originals
                continue
            for name, value in list(namespace.items()):
                if id(value) in table:
                    try:
                        namespace[name] = table[id(value)]
                    except Exception:  # noqa: BLE001 - a module that refuses is left as it is
                        pass

    swap(by_id)
    try:
        yield
    finally:
        swap(back)


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(path))


@contextlib.contextmanager
def disk_full(affected, fired: dict):
    """Every write to a path for which affected(absolute path) holds fails as on a full disk:
    open() for writing creates the file and hands back one on /dev/full (whose writes fail with
    ENOSPC), safetensors' save_file writes a few bytes and raises its SafetensorError (as its writer does
    on a full disk), torch.save writes a few bytes and raises ENOSPC."""
    import safetensors.torch  # noqa: PLC0415 (after the memory cap: imports torch)
    import torch  # noqa: PLC0415 (after the memory cap)

    real_save_file, real_torch_save = safetensors.torch.save_file, torch.save

    def hit(file) -> bool:
        if isinstance(file, (str, bytes, os.PathLike)) and affected(os.path.abspath(os.fsdecode(file))):
            fired["fault"] = fired.get("fault", 0) + 1
            return True
        return False

    def fake_open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, *args, **kwargs):
        if any(c in mode for c in "wax+") and hit(file):
            binary = "b" in mode
            _REAL_OPEN(file, mode.replace("+", ""), encoding=None if binary else "utf-8").close()  # created
            return _REAL_OPEN("/dev/full", "wb" if binary else "w", buffering, encoding, errors, newline)
        return _REAL_OPEN(file, mode, buffering, encoding, errors, newline, *args, **kwargs)

    def fake_save_file(tensors, filename, *args, **kwargs):
        if hit(filename):
            with _REAL_OPEN(filename, "wb") as handle:
                handle.write(b"\x08\x00\x00\x00partial")  # what a full disk leaves
            # safetensors' own error, worded as its Rust writer words a full disk
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, *args, **kwargs)

    def fake_torch_save(obj, f, *args, **kwargs):
        if hit(f):
            with _REAL_OPEN(f, "wb") as handle:
                handle.write(b"PK\x03\x04partial")
            raise _enospc(f)
        return real_torch_save(obj, f, *args, **kwargs)

    with _patched({_REAL_OPEN: fake_open, real_save_file: fake_save_file, real_torch_save: fake_torch_save}):
        yield


def _kill_self(fired: dict):
    fired["trigger"] = fired.get("trigger", 0) + 1
    os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def sigterm_after_steps(steps: int, fired: dict | None = None, fallback_s: float = 2.0):
    """SIGTERM right after the recovery loop's optimiser step number `steps` (a timer after
    fallback_s where the loop cannot be hooked)."""
    fired = {} if fired is None else fired
    try:
        from secateurs.recovery.trainer import RecoveryLoop  # noqa: PLC0415 (imports torch: after the memory cap; a checkout without it falls back to a timer)

        original = RecoveryLoop.train_step
    except (ImportError, AttributeError):
        timer = threading.Timer(fallback_s, _kill_self, (fired,))
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
        return
    done = [0]

    def train_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        done[0] += 1
        if done[0] == steps:
            _kill_self(fired)
        return result

    RecoveryLoop.train_step = train_step
    try:
        yield
    finally:
        RecoveryLoop.train_step = original


@contextlib.contextmanager
def sigterm_while_writing(parts: tuple[str, ...], fired: dict):
    """SIGTERM while a checkpoint is being written: right after a safetensors file whose path holds
    one of `parts` is on disk, before its folder is complete and swapped in."""
    import safetensors.torch  # noqa: PLC0415 (after the memory cap: imports torch)

    real = safetensors.torch.save_file

    def fake_save_file(tensors, filename, *args, **kwargs):
        result = real(tensors, filename, *args, **kwargs)
        if any(part in os.fsdecode(filename) for part in parts):
            _kill_self(fired)
        return result

    with _patched({real: fake_save_file}):
        yield


def _patches_for(case: dict, root: Path, fired: dict) -> list:
    """The case's fault (disk full under the case root, or only where the path holds one of
    fault['parts']) and trigger (SIGTERM after a step, or while a checkpoint is written)."""
    patches = []
    fault = case.get("fault")
    if fault is not None:
        prefix, parts = str(root.resolve()), fault.get("parts")
        patches.append(disk_full(lambda p: p.startswith(prefix) and (not parts or any(x in p for x in parts)), fired))
    trigger = case.get("trigger")
    if trigger and trigger.get("after_steps"):
        patches.append(sigterm_after_steps(trigger["after_steps"], fired))
    if trigger and trigger.get("while_writing"):
        patches.append(sigterm_while_writing(tuple(trigger["while_writing"]), fired))
    return patches


# -- setups --------------------------------------------------------------------------------------------
def _nan_in(folder: Path) -> bool:
    from safetensors.torch import load_file  # noqa: PLC0415 (after the memory cap: imports torch)

    for f in folder.glob("*.safetensors"):
        if any(t.is_floating_point() and not bool(t.isfinite().all()) for t in load_file(f).values()):
            return True
    return False


def _setup_previous_output(root: Path, w: dict) -> None:
    run_main(["prune", w["model"], "--method", "magnitude", "--ratio", "0.4", "--out", str(root / "prev")],
             limit_s=SETUP_LIMIT_S)


def _setup_foreign_folder(root: Path, w: dict) -> None:
    (root / "photos").mkdir()
    (root / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not ours")


def _setup_sharded(root: Path, w: dict, evil: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 (after the memory cap: imports torch)

    folder = root / "sharded"
    AutoModelForCausalLM.from_pretrained(STORIES).save_pretrained(folder, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(folder)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(data["weight_map"])[0]
    shutil.copy(folder / data["weight_map"][first], root / "evil.safetensors")
    data["weight_map"][first] = evil
    index.write_text(json.dumps(data))


def _plan_with_layer(source: Path, target: Path, layer: str) -> None:
    """Copy a plan, its last layer-4 row replaced by `layer` (raw JSON text)."""
    rows = source.read_text().split("\n")
    last = max(i for i, r in enumerate(rows) if r.strip().startswith('{"index": 4'))
    rows[last] = "    " + layer
    target.write_text("\n".join(rows))


def _setup_plan(root: Path, w: dict, layer: str) -> None:
    _setup_previous_output(root, w)
    _plan_with_layer(root / "prev" / "pruning_plan.json", root / "plan.json", layer)


def _setup_student_plan(root: Path, w: dict, layer: str) -> None:
    _plan_with_layer(Path(w["student"]) / "pruning_plan.json", root / "plan.json", layer)


def _setup_plan_provenance(root: Path, w: dict, **changes) -> None:
    data = json.loads((Path(w["student"]) / "pruning_plan.json").read_text())
    data["provenance"].update(changes)
    (root / "plan.json").write_text(json.dumps(data, indent=2))


def _setup_broken_model(root: Path, w: dict, kind: str) -> None:
    folder = root / "broken"
    shutil.copytree(STORIES, folder)
    for p in [folder, *folder.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    weights = folder / "model.safetensors"
    if kind == "unknown_type":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "nonesuch"}))
    elif kind == "config_not_json":
        (folder / "config.json").write_text("{ not json")
    elif kind == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif kind == "garbled_weights":
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00" + b"garbage!" * 100)
    elif kind == "no_weights":
        weights.unlink()


def _perturbed_copy(source: Path, target: Path, factor: float) -> None:
    from safetensors.torch import load_file, save_file  # noqa: PLC0415 (after the memory cap: imports torch)

    shutil.copytree(source, target)
    for p in [target, *target.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    state = {k: v * factor for k, v in load_file(target / "model.safetensors").items()}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})


def _setup_other_stats(root: Path, w: dict) -> None:
    run_main(["prune", w["model"], "--method", "amp", "--calib", "tinystories", "--calib-samples", "4",
              "--calib-length", "32", "--stats", str(root / "stats.safetensors"), "--out", str(root / "statsrun")],
             limit_s=SETUP_LIMIT_S)
    _perturbed_copy(STORIES, root / "other", 1.01)


def _setup_bad_plan_in_folder(root: Path, w: dict) -> None:
    _setup_previous_output(root, w)
    plan = root / "prev" / "pruning_plan.json"
    plan.write_text(plan.read_text().replace('"index": 0, ', '"index": 0, "removed": true, ', 1))


def _setup_user_folder(root: Path, w: dict, name: str) -> None:
    """A folder of the user's that happens to be called NAME (e.g. out.checkpoints)."""
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "notes.txt").write_text("the user's own files\n")


def _setup_models_in(root: Path, w: dict, folder: str) -> None:
    """folder/teacher (the dense model) and folder/student (the pruned one), plus the user's notes."""
    _setup_user_folder(root, w, folder)
    shutil.copytree(w["model"], root / folder / "teacher")
    shutil.copytree(w["student"], root / folder / "student")


def _setup_overlap(root: Path, w: dict) -> None:
    """Recovery data holding the first ~2,500 tokens of the evaluation text (WikiText-2 test, 806k
    tokens: 0.3% of its 13-token windows, under the 1% the check allows), then stories."""
    head = WIKI.read_text(encoding="utf-8")[:4000]
    (root / "mixed.txt").write_text(head + "\n\n" + TEXT.read_text(encoding="utf-8"))


def _setup_alpaca(root: Path, w: dict, record: dict) -> None:
    story = TEXT.read_text(encoding="utf-8").split(".")
    lines = []
    for i in range(60):
        r = {"instruction": f"Tell part {i} of the story.", "input": "", "output": story[i % len(story)].strip() + "."}
        r.update(record)
        lines.append(json.dumps(r))
    (root / "alpaca.jsonl").write_text("\n".join(lines) + "\n")


def _setup_nonutf8_jsonl(root: Path, w: dict) -> None:
    (root / "data.jsonl").write_bytes(b'{"text": "Once upon a time \xff\xfe there was"}\n' * 200)


def _setup_checkpoint(root: Path, w: dict, corrupt: str) -> None:
    """A real checkpoint in root/ckpt (a run stopped by SIGTERM after 3 steps, --save-every 1),
    then corrupted."""
    argv = _recover_argv(w, root, "first") + ["--save-every", "1", "--checkpoint-dir", str(root / "ckpt")]
    run_main(argv, limit_s=SETUP_LIMIT_S, patches=[sigterm_after_steps(3)])
    ckpt = root / "ckpt"
    if not (ckpt / "trainer_state.pt").is_file():
        raise RuntimeError(f"no checkpoint was written in {ckpt} (the case needs one to corrupt)")
    shutil.rmtree(root / "first", ignore_errors=True)
    if corrupt == "truncated state":
        state = ckpt / "trainer_state.pt"
        state.write_bytes(state.read_bytes()[:100])
    elif corrupt == "garbage settings":
        (ckpt / "settings.json").write_bytes(b"\xff\xfe{ garbage")
    elif corrupt == "settings not an object":
        (ckpt / "settings.json").write_text("[1, 2, 3]\n")
    elif corrupt == "missing settings":
        (ckpt / "settings.json").unlink()
    elif corrupt == "truncated weights":
        weights = ckpt / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])


def _setup_deep_plan(root: Path, w: dict) -> None:
    depth = 200_000
    (root / "deep.json").write_text('{"format": "secateurs.plan/1", "base": ' + "[" * depth + "]" * depth + "}")


def _setup_eval_json(root: Path, w: dict, content: bytes) -> None:
    (root / "bad_eval.json").write_bytes(content)


def _setup_notes_json(root: Path, w: dict, link: bool) -> None:
    (root / "notes.json").write_text('{"my": "notes", "keep": true}\n')
    if link:
        (root / "link.json").symlink_to("notes.json")


def _recover_argv(w: dict, root: Path, out: str = "out", teacher: str | None = None, data: str | None = None) -> list:
    return ["recover", w["student"], "--teacher", teacher or w["model"], "--data", data or w["stories"], *TINY,
            "--out", str(root / out)]


def _prune_recover_argv(w: dict, root: Path, out: str = "out") -> list:
    return ["prune", w["model"], *PRUNE, "--recover", "--data", w["stories"], *TINY, "--out", str(root / out)]


# -- the cases -------------------------------------------------------------------------------------
_TEACHER_LINE = r"(?im)^(?!.*(\.\.\.( done in [\d.]+ s)?$|it/s|tok/s|%\|)).*\bteacher\b"
DISK_FULL = {"exit": 1, "stderr": r"(?m)^secateurs: error:.*disk full", "absent": ("out", "out.gguf")}
TERMINATED = {"exit": 143, "stderr": r"(?im)^secateurs: terminated", "absent": ("out",)}
LEFT_ALONE = {"exit": 0}  # a run that leaves the data alone is as good as a refusal


def cases(w: dict, root: Path) -> list[dict]:
    """Each case: name, class, argv, setup(root, world), and optionally writes (paths under
    root the case may create or replace), victims (extra paths that must survive: (path, strict);
    strict also forbids additions inside), cwd (run from this folder, relative to root), handled
    (outcomes that count as right besides a refusal), fault, trigger, valid (the reason an
    exit-0 fuzz value is valid). Paths are built inside root."""
    m, out = w["model"], str(root / "out")
    s = w["student"]
    c = []

    def add(name, klass, argv, setup=None, writes=None, **more):
        if klass == "10 data destroyed":
            more.setdefault("handled", [LEFT_ALONE])  # a run that leaves the data alone is as good as a refusal
        c.append({"name": name, "class": klass, "argv": argv, "setup": setup, "writes": writes, **more})

    # -- the first probe's cases, unchanged --------------------------------------------------------
    add("--out is the parent of the input, --force", "1 output location",
        ["prune", m, *PRUNE, "--out", w["parent"], "--force"])
    add("--out is the input, --force", "1 output location", ["prune", m, *PRUNE, "--out", m, "--force"])
    add("--out inside the input", "1 output location", ["prune", m, *PRUNE, "--out", m + "/sub"])
    add("--out '' --force", "1 output location", ["prune", m, *PRUNE, "--out", "", "--force"])
    add("--out . --force", "1 output location", ["prune", m, *PRUNE, "--out", ".", "--force"])
    add("--out / --force", "1 output location", ["prune", m, *PRUNE, "--out", "/", "--force"])
    add("--force on a foreign folder", "1 output location",
        ["prune", m, *PRUNE, "--out", str(root / "photos"), "--force"], _setup_foreign_folder)
    add("--out is a file, --force", "1 output location",
        ["prune", m, *PRUNE, "--out", str(root / "M" / "victim.txt"), "--force"])
    add("demo --out is the input's parent, --force", "1 output location",
        ["demo", "--model", m, "--out", w["parent"], "--force"])
    for evil in ("../evil.safetensors", "/tmp/secateurs-evil.safetensors", "config.json"):
        for flag in ([], ["--streamed", "--calib", str(TEXT)], ["--device-map", '{"": "cpu"}']):
            add(f"index names {evil!r} {' '.join(flag[:1]) or 'in memory'}", "2 path traversal",
                ["prune", str(root / "sharded"), *PRUNE, *flag, "--out", out],
                lambda r, w, e=evil: _setup_sharded(r, w, e))
    for layer in ('{"index": 4, "attention": {"mode": "value", "alpha": NaN}}',
                  '{"index": 4, "neurons": [0, 1], "compensation": {"mlp": [NaN]}}',
                  '{"index": 4, "attention": {"mode": "value", "alpha": "0.5"}}', '{"index": 4, "heads": "all"}',
                  '{"index": "4"}', '{"index": 4, "bogus": 1}', '{"index": 4, "attention": {"mode": "fast"}}'):
        add(f"plan layer {layer}", "4 non-finite / 8 bad plan",
            ["prune", m, "--plan", str(root / "plan.json"), "--out", out],
            lambda r, w, row=layer: _setup_plan(r, w, row))
    add("--alpha-grid 5,nan", "4 non-finite",
        ["prune", m, "--method", "harp", "--top-layers", "2", "--alpha-grid", "5,nan", "--out", out])
    add("--ratio nan", "4 non-finite", ["prune", m, "--ratio", "nan", "--out", out])
    add("--flap-ratio nan", "4 non-finite",
        ["prune", m, "--method", "harp", "--top-layers", "2", "--flap-ratio", "nan", "--out", out])
    add("--stats from another model", "5 foreign cache",
        ["prune", str(root / "other"), "--method", "amp", "--stats", str(root / "stats.safetensors"), "--out", out],
        _setup_other_stats)
    add("--stats with other calibration settings", "5 foreign cache",
        ["prune", m, "--method", "amp", "--calib", "tinystories", "--calib-samples", "8", "--stats",
         str(root / "stats.safetensors"), "--out", out], _setup_other_stats)
    add("plan show: plan disagrees with the weights", "6 plan vs weights", ["plan", "show", str(root / "prev")],
        _setup_bad_plan_in_folder)
    add("eval: plan disagrees with the weights", "6 plan vs weights",
        ["eval", str(root / "prev"), "--ppl", str(TEXT), "--max-windows", "1"], _setup_bad_plan_in_folder)
    add("--calib-length 100000 (self)", "7 unchecked option",
        ["prune", m, "--method", "amp", "--calib-length", "100000", "--out", out])
    add("--calib-length 100000 (text)", "7 unchecked option",
        ["prune", m, "--method", "amp", "--calib", str(TEXT), "--calib-length", "100000", "--out", out])
    add("--metrics ''", "7 unchecked option", ["prune", m, "--method", "consensus", "--metrics", "", "--out", out])
    add("--round-to 0", "7 unchecked option", ["prune", m, *PRUNE, "--round-to", "0", "--out", out])
    add("--layers-equivalent -1", "7 unchecked option", ["prune", m, *PRUNE, "--layers-equivalent", "-1", "--out", out])
    add("4-token calibration file", "7 unchecked option",
        ["prune", m, "--method", "amp", "--calib", w["tiny"], "--out", out])
    for kind in ("unknown_type", "config_not_json", "truncated_weights", "garbled_weights", "no_weights"):
        add(f"model folder: {kind}", "8/9 broken model", ["prune", str(root / "broken"), *PRUNE, "--out", out],
            lambda r, w, k=kind: _setup_broken_model(r, w, k))
    for name, data in (("empty", b""), ("garbage", b"GGUF" + bytes(range(64))), ("text", b"hello")):
        add(f"GGUF file: {name}", "8 broken model", ["info", str(root / f"{name}.gguf")],
            lambda r, w, n=name, d=data: (r / f"{n}.gguf").write_bytes(d))
    add("binary calibration file", "8 bad file", ["prune", m, "--method", "amp", "--calib", w["binary"], "--out", out])
    add("binary perplexity file", "8 bad file", ["eval", m, "--ppl", w["binary"]])
    add("binary plan file", "8 bad file", ["prune", m, "--plan", w["binary"], "--out", out])
    add("--device cuda without CUDA", "8 device", ["prune", m, *PRUNE, "--device", "cuda", "--out", out])
    add("--device nonsense", "8 device", ["prune", m, *PRUNE, "--device", "tpu", "--out", out])
    add("unwritable --out", "8 output location", ["prune", m, *PRUNE, "--out", "/proc/secateurs-out"])
    add("--out under a file", "8 output location", ["prune", m, *PRUNE, "--out", str(root / "M" / "victim.txt" / "x")])
    add("eval --out is a folder", "8 output location",
        ["eval", m, "--ppl", str(TEXT), "--max-windows", "1", "--out", w["folder"]])
    add("eval --out over the model's config.json", "1 output location",
        ["eval", m, "--ppl", str(TEXT), "--max-windows", "1", "--out", m + "/config.json"])
    for option, values in {"--ratio": ["-0.1", "1.5", "inf", "abc"], "--calib-samples": ["0", "-1"],
                           "--calib-length": ["1", "0"], "--calib-batch-size": ["0"], "--seed": ["-1"],
                           "--layers": ["0", "-2"], "--depth-tokens": ["0"], "--dtype": ["float7"],
                           "--calib": [w["folder"], str(root / "missing.txt")]}.items():
        for value in values:
            extra = ["--method", "consensus"] if option in ("--layers", "--depth-tokens") else []
            add(f"{option} {value}", "fuzz", ["prune", m, "--out", out, option, value, *extra])
    for argv in (["eval", m, "--ppl", str(TEXT), "--batch-size", "0"],
                 ["eval", m, "--ppl", str(TEXT), "--limit", "nan"],
                 ["bench", m, "--repeats", "0"], ["bench", m, "--threads", "-1"], ["bench", m, "--batch-sizes", "0"],
                 ["sweep", m, "--ratios", "nan", "--ppl", str(TEXT), "--out", str(root / "s")],
                 ["demo", "--model", m, "--seq-len", "0", "--out", str(root / "d")]):
        add(" ".join(argv[:1] + argv[2:4] + argv[-2:]), "fuzz", argv)

    # -- 10 data destroyed (each exited 0, or with no warning) -------------------------------------
    k = "10 data destroyed"
    add("recover deletes a user folder called OUT.checkpoints (no --save-every)", k, _recover_argv(w, root),
        lambda r, w: _setup_user_folder(r, w, "out.checkpoints"), victims=[("out.checkpoints", True)])
    add("recover student.checkpoints --out student deletes the input student", k,
        [*_recover_argv(w, root)[:-2], "--out", str(root / "student")],
        lambda r, w: shutil.copytree(w["student"], r / "student.checkpoints"),
        writes=("student",), victims=[("student.checkpoints", True)])
    _recover = _recover_argv(w, root)
    add("recover proj.checkpoints/student --teacher proj.checkpoints/teacher --out proj deletes both", k,
        ["recover", str(root / "proj.checkpoints" / "student"), "--teacher", str(root / "proj.checkpoints" / "teacher"),
         *_recover[4:-2], "--out", str(root / "proj")],
        lambda r, w: _setup_models_in(r, w, "proj.checkpoints"), writes=("proj",),
        victims=[("proj.checkpoints", True)])
    add("recover run from inside proj.checkpoints with --out ../proj deletes the working directory", k,
        [*_recover[:-2], "--out", "../proj"], lambda r, w: _setup_user_folder(r, w, "proj.checkpoints"),
        cwd="proj.checkpoints", writes=("proj",), victims=[("proj.checkpoints", True)])
    add("prune --recover deletes a user folder called OUT.checkpoints", k, _prune_recover_argv(w, root),
        lambda r, w: _setup_user_folder(r, w, "out.checkpoints"), victims=[("out.checkpoints", True)])
    add("prune --recover run from inside proj.checkpoints with --out ../proj deletes the working directory", k,
        [*_prune_recover_argv(w, root)[:-2], "--out", "../proj"],
        lambda r, w: _setup_user_folder(r, w, "proj.checkpoints"),
        cwd="proj.checkpoints", writes=("proj",), victims=[("proj.checkpoints", True)])
    add("recover --checkpoint-dir is another pruned model's folder (no --force)", k,
        [*_recover, "--save-every", "1", "--checkpoint-dir", w["sibling"]])
    add("report model --out model replaces the input model with the report", k, ["report", s, "--out", s])
    add("report --out is another run's secateurs folder (no --force)", k, ["report", s, "--out", w["sibling"]])
    add("sweep --out is another run's secateurs folder (no --force)", k,
        ["sweep", m, "--ratios", "0.2", "--ppl", w["stories"], "--max-windows", "1", "--threads", "1",
         "--out", w["sibling"]])
    add("tasks --out is another run's secateurs folder (no --force)", k,
        ["tasks", "--data-dir", str(TASKS), "--tasks", "piqa", "--out", w["sibling"]])
    add("bench --out README.json overwrites README.md beside it", k,
        ["bench", m, "--batch-sizes", "1", "--prompt-lengths", "8", "--decode-tokens", "2", "--repeats", "1",
         "--warmup", "0", "--threads", "1", "--out", str(root / "README.json")], writes=("README.json",))

    # -- 11 silently accepted ------------------------------------------------------------------------
    k = "11 silently accepted"
    add("recover --ppl FILE --ppl-tokens 2048, data holding those 2048 tokens", k,
        [*_recover_argv(w, root, data=str(root / "mixed.txt")), "--ppl", str(WIKI), "--ppl-tokens", "2048"],
        _setup_overlap)
    add("recover --tokens 10000000000000", k, [*_recover, "--tokens", "10000000000000"])
    add("recover --data self --self-samples 1000000000", k,
        [a for a in _recover if a not in ("--data", w["stories"])] + ["--data", "self", "--self-samples", "1000000000"])
    add("recover --grad-accum 1000000", k, [*_recover, "--grad-accum", "1000000"])
    add("recover --train-batch-size 100000", k, [*_recover, "--train-batch-size", "100000"])
    add("recover --max-grad-norm -1", k, [*_recover, "--max-grad-norm=-1"])
    for label, record in (("instruction null", {"instruction": None}),
                          ("instruction an object", {"instruction": {"a": 1}}),
                          ("input an object", {"input": {"k": "v"}}), ("output null", {"output": None}),
                          ("output a list", {"output": ["a", "b"]})):
        add(f"recover on Alpaca records with {label}", k, _recover_argv(w, root, data=str(root / "alpaca.jsonl")),
            lambda r, w, rec=record: _setup_alpaca(r, w, rec))
    add("recover --teacher a perturbed copy of the dense model (not the student's parent)", k,
        _recover_argv(w, root, teacher=str(root / "impostor")),
        lambda r, w: _perturbed_copy(Path(w["model"]), r / "impostor", 1.05),
        handled=[{"exit": 0, "stderr": _TEACHER_LINE}])
    for alpha in ("1e30", "-50"):
        layer = f'{{"index": 4, "attention": {{"mode": "value", "alpha": {alpha}}}}}'
        add(f"prune --plan with a HARP alpha of {alpha}", k,
            ["prune", m, "--plan", str(root / "plan.json"), "--out", out],
            lambda r, w, row=layer: _setup_student_plan(r, w, row))
    add("prune --plan with --method and --ratio given", k,
        ["prune", m, "--plan", str(Path(s) / "pruning_plan.json"), "--method", "magnitude", "--ratio", "0.5",
         "--out", out])
    add("prune --plan re-applying a plan with params_after -5", k,
        ["prune", m, "--plan", str(root / "plan.json"), "--out", out],
        lambda r, w: _setup_plan_provenance(r, w, params_after=-5))
    add("eval --out overwrites an existing non-result JSON (no --force)", k,
        ["eval", m, "--ppl", w["stories"], "--max-windows", "1", "--threads", "1", "--out", str(root / "notes.json")],
        lambda r, w: _setup_notes_json(r, w, link=False))
    add("eval --out through a symlink to an existing non-result JSON (no --force)", k,
        ["eval", m, "--ppl", w["stories"], "--max-windows", "1", "--threads", "1", "--out", str(root / "link.json")],
        lambda r, w: _setup_notes_json(r, w, link=True))

    # -- 12 unexpected failure instead of a refusal ------------------------------------------------
    k = "12 unexpected failure"
    add("recover --data a non-UTF-8 text file", k, _recover_argv(w, root, data=w["binary"]))
    add("recover --data a non-UTF-8 .jsonl", k, _recover_argv(w, root, data=str(root / "data.jsonl")),
        _setup_nonutf8_jsonl)
    add("prune --recover --data a non-UTF-8 text file", k,
        [*_prune_recover_argv(w, root)[:-2], "--data", w["binary"], "--out", out])
    add("recover --scheduler bogus", k, [*_recover, "--scheduler", "bogus"])
    for corrupt in ("truncated state", "garbage settings", "settings not an object", "missing settings",
                    "truncated weights"):
        add(f"recover --resume from a checkpoint with {corrupt}", k,
            [*_recover, "--save-every", "1", "--checkpoint-dir", str(root / "ckpt"), "--resume"],
            lambda r, w, x=corrupt: _setup_checkpoint(r, w, x), writes=("out", "ckpt", "first"))
    add("prune --plan nested 200,000 levels deep", k, ["prune", m, "--plan", str(root / "deep.json"), "--out", out],
        _setup_deep_plan)
    add("plan show on a plan nested 200,000 levels deep", k, ["plan", "show", str(root / "deep.json")],
        _setup_deep_plan)
    add("report on a plan nested 200,000 levels deep", k, ["report", str(root / "deep.json"), "--out", out],
        _setup_deep_plan)
    add("plan show: a plan layer index out of range", k, ["plan", "show", str(root / "plan.json")],
        lambda r, w: _setup_student_plan(r, w, '{"index": 99}'))
    add("report: a plan layer index out of range", k, ["report", str(root / "plan.json"), "--out", out],
        lambda r, w: _setup_student_plan(r, w, '{"index": 99}'))
    add("report --eval a binary file", k, ["report", s, "--eval", w["binary"], "--out", out])
    for label, content in (("a list", b"[1, 2, 3]\n"), ("models a list", b'{"models": [1, 2], "machine": {}}\n'),
                           ("a model's results a number", b'{"models": {"m": 5}, "machine": {}}\n'),
                           ("binary bytes named .json", b"\x00\xff\xfe\x01" * 32)):
        add(f"report --eval an eval.json holding {label}", k,
            ["report", s, "--eval", str(root / "bad_eval.json"), "--out", out],
            lambda r, w, b=content: _setup_eval_json(r, w, b))

    # -- 13 disk full: exit 1, one line saying so, no partial output -------------------------------------
    k = "13 disk full"
    add("disk full in export", k, ["export", s, "--out", str(root / "out.gguf")], fault={}, handled=[DISK_FULL])
    add("disk full in prune", k, ["prune", m, *PRUNE, "--threads", "1", "--out", out], fault={}, handled=[DISK_FULL])
    add("disk full in recover", k, _recover, fault={}, handled=[DISK_FULL])
    add("disk full in recover's checkpoint writes", k,
        [*_recover, "--save-every", "1", "--checkpoint-dir", str(root / "ckpt")],
        fault={"parts": ("/ckpt/", "/.ckpt.")},
        writes=("out", "ckpt"), handled=[{**DISK_FULL, "absent": ("out", "ckpt")}])
    add("disk full in prune --recover", k, _prune_recover_argv(w, root), fault={}, handled=[DISK_FULL])

    # -- 14 SIGTERM during a recovery with checkpoints: exit 143, nothing half-written -------------------
    k = "14 SIGTERM"
    add("SIGTERM after step 2 of recover --save-every 1", k, [*_recover, "--save-every", "1"],
        trigger={"after_steps": 2}, handled=[TERMINATED])
    add("SIGTERM while recover writes a checkpoint", k, [*_recover, "--save-every", "1"],
        trigger={"while_writing": ("checkpoint", "trainable.safetensors")}, handled=[TERMINATED])
    add("SIGTERM after step 2 of prune --recover --save-every 1", k,
        [*_prune_recover_argv(w, root), "--save-every", "1"],
        trigger={"after_steps": 2}, handled=[TERMINATED])

    # -- fuzz: every option of the commands below, from their parsers ------------------------------------
    c += fuzz_cases(w, root)
    return c


# -- fuzz cases from the parsers ----------------------------------------------------------------------
_OPTIONS: dict[str, list] = {}


def _value_options(command: str) -> list[tuple[str, tuple[str, ...], bool]]:
    """(flag, every spelling, integer-typed) of each option of `command` that takes a value (flags,
    help and version left out), from secateurs.cli.main.build_parser() (read once per probe run)."""
    if not _OPTIONS:
        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        for name in FUZZ_COMMANDS:
            _OPTIONS[name] = []
            for action in sub.choices[name]._actions:
                if not action.option_strings or action.nargs == 0 or isinstance(
                        action, (argparse._HelpAction, argparse._VersionAction, argparse._StoreConstAction,
                                 argparse._CountAction)):
                    continue
                flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
                _OPTIONS[name].append((flag, tuple(action.option_strings), _integer_typed(action)))
    return _OPTIONS[command]


def _integer_typed(action) -> bool:
    if action.type is None or action.choices:
        return False
    try:
        value = action.type("7")
    except Exception:  # noqa: BLE001 - a type that refuses 7 is not a whole-number type
        return False
    return isinstance(value, int) and not isinstance(value, bool)


def _fuzz_bases(w: dict, root: Path) -> dict[str, list[str]]:
    """A valid, quick command line for each fuzzed command; each fuzz case sets one option on it."""
    out = str(root / "out")
    one = ["--threads", "1"]
    return {
        "recover": _recover_argv(w, root),
        "report": ["report", w["student"], "--out", out],
        "sweep": ["sweep", w["model"], "--ratios", "0.2", "--ppl", w["stories"], "--max-windows", "1", *one,
                  "--out", out],
        "tasks": ["tasks", "--data-dir", str(TASKS), "--tasks", "piqa", "--out", out],
        "bench": ["bench", w["model"], "--batch-sizes", "1", "--prompt-lengths", "8", "--decode-tokens", "2",
                  "--repeats", "1", "--warmup", "0", *one, "--out", out + ".json"],
        "eval": ["eval", w["model"], "--ppl", w["stories"], "--max-windows", "1", *one],
        "export": ["export", w["student"], "--out", out + ".gguf"],
    }


def _with_option(base: list[str], spellings: tuple[str, ...], flag: str, value: str) -> list[str]:
    """base without any spelling of the option (and its value), then FLAG=VALUE."""
    argv, skip = [], False
    for token in base:
        if skip:
            skip = False
        elif token in spellings:
            skip = True
        elif not any(token.startswith(s + "=") for s in spellings if s.startswith("--")):
            argv.append(token)
    return argv + [f"{flag}={value}"]


def fuzz_cases(w: dict, root: Path) -> list[dict]:
    bases = _fuzz_bases(w, root)
    c = []
    for command in FUZZ_COMMANDS:
        for flag, spellings, integer in _value_options(command):
            for value in FUZZ_VALUES:
                given = {NONUTF8: w["binary"], DIRECTORY: w["folder"]}.get(value, BIG_INT if value == BIG and integer
                                                                             else value)
                label = value if value in (NONUTF8, DIRECTORY) else repr(given) if given == "" else given
                c.append({"name": f"{command} {flag}={label}", "class": f"fuzz {command}",
                          "argv": _with_option(bases[command], spellings, flag, given), "setup": None, "writes": None,
                          "valid": VALID_VALUES.get((command, flag, given))})
    return c


# -- classification ----------------------------------------------------------------------------------
def _under(key: str, prefix: str) -> bool:
    return prefix in (".", "") or key == prefix or key.startswith(prefix.rstrip("/") + "/")


def _victims(case: dict, world: dict, root: Path) -> list[tuple[str, bool]]:
    """(path relative to root, strict): every change, removal (and with strict, addition) inside is damage."""
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    victims = [(rel(world["model"]), True), (rel(world["parent"]) + "/victim.txt", False),
               (rel(world["student"]), True), (rel(world["sibling"]), True), (rel(world["readme"]), False),
               (case.get("cwd") or ".", False)]
    return victims + [tuple(v) for v in case.get("victims") or ()]


def _damage(before: dict, after: dict, victims, writes) -> list[str]:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    found = []
    for key in changed:
        what = "removed" if key not in after else "added" if key not in before else "changed"
        hit = [path for path, strict in victims if _under(key, path) and (what != "added" or strict) and path != "."]
        if hit:
            found.append(f"victim {hit[0]}: {key} {what}")
        elif what != "added" and not any(_under(key, wr) for wr in writes):
            found.append(f"{key} {what}")
    return found


def _handled(specs, code, err: str, temps: list[str], root: Path) -> str | None:
    """The evidence (the stderr line that matched, or 'exit N') when an outcome of `specs` holds."""
    for spec in specs or ():
        if code != spec.get("exit"):
            continue
        found = re.search(spec["stderr"], err) if spec.get("stderr") else None
        if spec.get("stderr") and not found:
            continue
        if temps or any((root / p).exists() for p in spec.get("absent", ())):
            continue
        if found:
            start = err.rfind("\n", 0, found.start()) + 1
            end = err.find("\n", found.end())
            return err[start:end if end >= 0 else None].strip()[:240]
        return f"exit {code}"
    return None


def classify(case: dict, root: Path, world: dict | None = None) -> dict:
    world = world or world_paths(root)
    before = snapshot(root)
    started = time.perf_counter()
    cwd = root / case["cwd"] if case.get("cwd") else root
    fired: dict = {}
    code, err, escaped = run_main(case["argv"], limit_s=case.get("limit_s", LIMIT_S), cwd=cwd,
                                  patches=_patches_for(case, root, fired))
    after = snapshot(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    writes = case.get("writes") or DEFAULT_WRITES
    damage = _damage(before, after, _victims(case, world, root), writes)
    if not root.is_dir():
        damage.append("the case root (the working directory's parent) is gone")
    temps = [k for k in after if k not in before and _TEMP.match(os.path.basename(k))]
    lines = [ln for ln in err.splitlines() if ln.startswith("secateurs: error:")]
    nan_saved = (root / "out").is_dir() and _safe_nan_in(root / "out")
    evidence = None
    if damage or Path("/tmp/secateurs-evil.safetensors").exists():
        verdict = "damage"
    elif escaped == "ran-too-long":
        verdict = "silent"  # accepted, still working when stopped
    elif escaped or "Traceback" in err or "unexpected failure" in err:
        verdict = "traceback"
    elif evidence := _handled(case.get("handled"), code, err, temps, root):
        verdict = "handled"
    elif code == 0 or nan_saved:
        verdict = "accepted-valid" if code == 0 and case.get("valid") and not nan_saved else "silent"
    elif code == 2 and lines and not changed:
        verdict = "refused"
    else:
        verdict = "other"
    message = evidence if verdict == "handled" else _last_message(lines, err)
    missed = [x for x in ("fault", "trigger") if case.get(x) is not None and not fired.get(x)]
    if missed and verdict not in ("damage", "traceback"):  # the case did not test what it is about
        verdict, message = "other", f"probe: the {' and '.join(missed)} never fired (exit {code}); {message}"
    return {"name": case["name"], "class": case["class"], "verdict": verdict, "exit": code, "escaped": escaped,
            "message": message, "damage": damage[:5], "changed": changed[:5], "temps": temps[:5],
            "valid": case.get("valid"), "seconds": round(time.perf_counter() - started, 2)}


def _safe_nan_in(folder: Path) -> bool:
    try:
        return _nan_in(folder)
    except Exception:  # noqa: BLE001 - an unreadable output is no NaN finding
        return False


def _last_message(lines: list[str], err: str) -> str:
    if lines:
        return lines[-1][len("secateurs: error: "):][:240]
    tail = [ln for ln in err.strip().splitlines() if ln.strip()]
    return tail[-1][:240] if tail else ""


# -- the command line --------------------------------------------------------------------------------
def _write_text(path: Path, text: str) -> None:
    """Atomically, without secateurs (the probe must work on a broken checkout)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _selected(all_cases: list[dict], only: list[str] | None) -> list[tuple[int, dict]]:
    """(index, case) of the cases whose 'class: name' holds one of `only` (case-insensitive substrings)."""
    picked = []
    for index, case in enumerate(all_cases):
        text = f"{case['class']}: {case['name']}".lower()
        if not only or any(p.lower() in text for p in only):
            picked.append((index, case))
    return picked


def _limit_memory(gib: float) -> None:
    if gib <= 0:
        return
    limit = int(gib * 2**30)
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def main() -> int:
    global LIMIT_S
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results here (.json, and .md beside it)")
    parser.add_argument("--label", default="", help="name of the version measured (e.g. a commit)")
    parser.add_argument("--only", action="append", metavar="PATTERN",
                        help="run only the cases whose 'class: name' contains PATTERN (case-insensitive; repeatable)")
    parser.add_argument("--limit-s", type=int, default=LIMIT_S,
                        help=f"seconds a case may run before it counts as accepted (default: {LIMIT_S})")
    parser.add_argument("--classes", action="store_true", help="list the classes with their case counts, run nothing")
    parser.add_argument("--list", action="store_true", help="list the cases (class, name), run nothing")
    parser.add_argument("--memory-limit-gb", type=float, default=8.0,
                        help="cap the probe's memory (RLIMIT_DATA), so a case allocating without bound fails instead "
                             "of taking the machine down (default: 8; 0: no cap)")
    args = parser.parse_args()
    LIMIT_S = args.limit_s

    with tempfile.TemporaryDirectory(prefix="hostile-") as scratch_name:
        scratch = Path(scratch_name)
        probe_root = scratch / "probe"
        listing = cases(world_paths(probe_root), probe_root)
        selected = _selected(listing, args.only)
        if args.classes or args.list:
            counts: dict[str, int] = {}
            for _, case in selected:
                counts[case["class"]] = counts.get(case["class"], 0) + 1
            if args.list:
                for index, case in selected:
                    print(f"{index:>4}  {case['class']:<24} {case['name']}")
            for klass, n in counts.items():
                print(f"{n:>5}  {klass}")
            print(f"{len(selected):>5}  cases in all")
            return 0
        if not selected:
            print(f"no case matches {args.only}", file=sys.stderr)
            return 2
        _limit_memory(args.memory_limit_gb)
        import torch  # noqa: PLC0415 (after the memory cap)

        global _INITIAL_THREADS
        _INITIAL_THREADS = torch.get_num_threads()
        from common import header_markdown, result_header  # noqa: PLC0415 (after the memory cap: imports torch)

        header = result_header()
        origin = os.getcwd()
        cache = prepare_cache(scratch / "cache")
        results = []
        for index, case in selected:
            root = scratch / f"case{index}"
            root.mkdir()
            os.chdir(root)  # '.' and '' mean this case's folder
            started = time.perf_counter()
            try:
                world = make_world(root, cache)
                specific = cases(world, root)[index]
                same = specific["name"].replace(str(root), "ROOT") == case["name"].replace(str(probe_root), "ROOT")
                assert same, (specific["name"], case["name"])
                try:
                    if specific["setup"]:
                        specific["setup"](root, world)
                except Exception as exc:  # noqa: BLE001 - the case cannot be measured; say why
                    results.append({"name": case["name"], "class": case["class"], "verdict": "other", "exit": None,
                                    "escaped": None, "message": f"setup failed: {type(exc).__name__}: {exc}"[:240],
                                    "damage": [], "changed": [], "temps": [], "valid": None,
                                    "seconds": round(time.perf_counter() - started, 2)})
                else:
                    results.append(classify(specific, root, world))
            finally:
                os.chdir(origin)
                Path("/tmp/secateurs-evil.safetensors").unlink(missing_ok=True)
                shutil.rmtree(root, ignore_errors=True)
                gc.collect()
            r = results[-1]
            print(f"{r['verdict']:>14}  {r['class']:<22} {r['name'][:70]:<70} {r['message'][:80]}", flush=True)
    counts = {v: sum(r["verdict"] == v for r in results) for v in VERDICTS}
    by_class: dict[str, dict[str, int]] = {}
    for r in results:
        by_class.setdefault(r["class"], {}).setdefault(r["verdict"], 0)
        by_class[r["class"]][r["verdict"]] += 1
    print(json.dumps(counts))
    if args.out:
        payload = {"header": header, "label": args.label, "secateurs": getattr(secateurs, "__file__", ""),
                   "counts": counts, "by_class": by_class, "only": args.only, "cases": results,
                   "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
        _write_text(Path(args.out), json.dumps(payload, indent=2) + "\n")
        md = [f"# Hostile inputs: {args.label}", "", header_markdown(header),
              f"{len(results)} cases: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
              "", "| class | " + " | ".join(VERDICTS) + " |", "| --- |" + " --- |" * len(VERDICTS)]
        md += [f"| {k} | " + " | ".join(str(v.get(x, 0)) for x in VERDICTS) + " |" for k, v in by_class.items()]
        md += ["", "| class | case | verdict | exit | message |", "| --- | --- | --- | --- | --- |"]
        md += [f"| {r['class']} | {r['name'].replace('|', '/')} | {r['verdict']} | {r['exit']} | "
               f"{(r['message'] or r['escaped'] or '; '.join(r['damage'])).replace('|', '/')[:120]} |" for r in results]
        _write_text(Path(args.out).with_suffix(".md"), "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
