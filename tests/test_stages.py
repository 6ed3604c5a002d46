"""A run is a list of stages (secateurs.pipeline.stages) that secateurs.pipeline.run checks, then
executes in order: prune -> recover -> export -> evaluate in one run writes what the four commands
write; the commands build their stage lists from their arguments; below the command line nothing
reads an argparse Namespace, and neither the pipeline nor the command line tests a method's name."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest
from conftest import STORIES, TINYSTORIES_TEXT

import secateurs
from secateurs.cli.evaluation import bench_stages, eval_stages, sweep_stages
from secateurs.cli.main import build_parser, demo_stages, export_stages, main, prune_job, recover_stages
from secateurs.evaluation.speed import BenchConfig
from secateurs.methods.options import METHOD_NAMES
from secateurs.pipeline import Bench, Evaluate, Export, Prune, Recover, Sweep, run
from secateurs.pipeline.demo import Demo
from secateurs.runtime import threads

SRC = Path(secateurs.__file__).parent
CALIB = ["--calib", str(TINYSTORIES_TEXT), "--calib-samples", "8", "--calib-length", "64"]
RECOVERY = ["--data", str(TINYSTORIES_TEXT), "--tokens", "1024", "--train-length", "64", "--train-batch-size", "2",
            "--val-tokens", "256"]
EVAL = ["--ppl", str(TINYSTORIES_TEXT), "--max-windows", "4"]
RUN_FACTS = ("seconds", "tok_per_s", "tokens_per_s", "tokens_per_second", "elapsed", "machine", "threads",
             "allocator", "peak")


def _without_run_facts(value):
    """A result less what describes the run rather than its result (times, speeds, the machine)."""
    if isinstance(value, dict):
        return {k: _without_run_facts(v) for k, v in value.items() if not any(f in k for f in RUN_FACTS)}
    if isinstance(value, list):
        return [_without_run_facts(v) for v in value]
    return value


def _digest(path: Path) -> dict[str, str]:
    """sha256 of every file (JSON results with times compared without them)."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    out = {}
    for f in files:
        data = f.read_bytes()
        if f.name in ("recovery.json", "eval.json"):
            data = json.dumps(_without_run_facts(json.loads(data)), sort_keys=True).encode()
        out[str(f.relative_to(path)) if f != path else f.name] = hashlib.sha256(data).hexdigest()
    return out


def _commands(work: Path) -> list[list[str]]:
    return [["prune", str(STORIES), "--method", "amp", "--ratio", "0.2", *CALIB, "--threads", "1",
             "--out", str(work / "pruned")],
            ["recover", str(work / "pruned"), "--teacher", str(STORIES), *RECOVERY, "--threads", "1",
             "--out", str(work / "recovered")],
            ["export", str(work / "recovered"), "--out", str(work / "model.gguf")],
            ["eval", str(work / "recovered"), *EVAL, "--threads", "1", "--out", str(work / "eval.json")]]


def test_one_run_of_stages_writes_what_the_four_commands_write(tmp_path, capsys):
    """prune -> recover -> export -> evaluate as one run (the pruned model and the dense teacher passed
    in memory) equals the four commands, file by file; the runs write at the same paths, one after
    the other, so that recorded paths agree too."""
    work = tmp_path / "work"
    commands = _commands(work)
    for argv in commands:
        assert main(["--quiet", *argv]) == 0, argv
    separate = {name: _digest(work / name) for name in ("pruned", "recovered", "model.gguf", "eval.json")}
    work.rename(tmp_path / "separate")
    parse = build_parser().parse_args
    job = prune_job(parse(commands[0]))
    recover = recover_stages(parse(commands[1]))[0]
    evaluate = eval_stages(parse(commands[3]))[0]
    stages = [Prune(job), Recover(str(work / "recovered"), recover.settings, teacher=str(STORIES)),
              Export(str(work / "model.gguf")), Evaluate(evaluate.settings, out=str(work / "eval.json"))]
    threads.set_override(1)
    try:
        state = run(stages)
    finally:
        threads.set_override(None)
    assert [type(r).__name__ for r in state.results] == ["PruneResult", "Recovered", "PosixPath", "dict"]
    assert state.results[-1]["models"]["recovered"]["source"] == str(work / "recovered")
    together = {name: _digest(work / name) for name in ("pruned", "recovered", "model.gguf", "eval.json")}
    for name in separate:
        assert together[name] == separate[name], name
    assert len(together["pruned"]) > 3 and "model.safetensors" in together["recovered"]


def test_an_output_that_may_not_be_written_is_refused_before_any_stage_works(tmp_path):
    """Every stage is checked before the first executes: a taken export path stops the run before
    the pruning starts."""
    (tmp_path / "model.gguf").write_text("not ours")
    job = prune_job(build_parser().parse_args(["prune", str(STORIES), "--method", "magnitude", "--out",
                                               str(tmp_path / "pruned")]))
    with pytest.raises(secateurs.SecateursError, match="not a secateurs"):
        run([Prune(job), Export(str(tmp_path / "model.gguf"))])
    assert not (tmp_path / "pruned").exists()


def test_the_commands_build_their_stage_lists_from_their_arguments(tmp_path):
    parse = build_parser().parse_args
    [demo] = demo_stages(parse(["demo", "--model", str(STORIES), "--method", "flap", "--ratio", "0.1",
                                "--recover-tokens", "0", "--bench-decode-tokens", "4", "--out", str(tmp_path / "d")]))
    assert isinstance(demo, Demo) and demo.job.method == "flap" and demo.job.ratio == 0.1
    assert demo.job.out == str(tmp_path / "d") and demo.recover_tokens == 0 and demo.bench.decode_tokens == 4
    assert demo.spec.max_windows == 64 and demo.text is None  # the demo's caps, the bundled text

    [sweep] = sweep_stages(parse(["sweep", str(STORIES), "--methods", "magnitude,random", "--ratios", "0.1,0.3",
                                  *EVAL, "--seed", "2", "--out", str(tmp_path / "s")]))
    assert isinstance(sweep, Sweep) and sweep.methods == ("magnitude", "random") and sweep.ratios == (0.1, 0.3)
    assert sweep.prune.seed == 2 and sweep.evaluation.settings.ppl == str(TINYSTORIES_TEXT)

    [evaluate] = eval_stages(parse(["eval", "m", "--baseline", "dense", *EVAL, "--out", str(tmp_path / "e.json")]))
    assert isinstance(evaluate, Evaluate) and evaluate.models == ("m",) and evaluate.baseline == "dense"
    assert evaluate.settings.max_windows == 4 and evaluate.out == str(tmp_path / "e.json")

    [bench] = bench_stages(parse(["bench", "m", "--baseline", "dense", "--batch-sizes", "1", "--prompt-lengths",
                                  "16,32", "--decode-tokens", "3"]))
    assert isinstance(bench, Bench) and bench.models == ("m",) and bench.baseline == "dense"
    assert bench.config == BenchConfig(batch_sizes=(1,), prompt_lengths=(16, 32), decode_tokens=3, repeats=5,
                                       warmup=1, max_spread=0.10, time_limit=60.0)

    [recover] = recover_stages(parse(["recover", "p", "--teacher", "t", *RECOVERY, "--seed", "4", "--out", "r"]))
    assert recover.student == "p" and recover.teacher == "t" and recover.settings.seed == 4
    assert recover.settings.tokens == 1024
    [export] = export_stages(parse(["export", "p", "--outtype", "q8_0", "--out", "p.gguf"]))
    assert export.model == "p" and export.settings.outtype == "q8_0"


def _modules(*folders: str):
    for folder in folders:
        for path in sorted((SRC / folder).rglob("*.py") if folder else SRC.rglob("*.py")):
            yield path, ast.parse(path.read_text())


# The torch-free declarations the command line builds its flags from: argument types that raise
# argparse.ArgumentTypeError. They describe options; none runs a command or reads parsed arguments (that
# is cli/declared.py's job).
DECLARATIONS = {"settings/values.py", "methods/options.py"}


def test_nothing_below_the_command_line_reads_argparse():
    for path, tree in _modules(""):
        where = str(path.relative_to(SRC))
        if where.startswith("cli/"):
            continue
        for node in ast.walk(tree):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert "argparse" not in imported or where in DECLARATIONS, where
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                    annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                    assert "Namespace" not in annotation, (where, node.name, arg.arg)


def test_neither_the_pipeline_nor_the_command_line_tests_a_method_name():
    """A method's kind, defaults, aliases and execution are its own (secateurs.methods): no comparison
    with a method's name in pipeline/ or cli/."""
    names = set(METHOD_NAMES)
    for path, tree in _modules("pipeline", "cli"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                constants = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                assert not any(c.value in names for c in constants), (path.name, node.lineno, ast.unparse(node))


def test_only_recovery_runs_under_several_launched_processes(tmp_path, monkeypatch, capsys):
    """A launcher's WORLD_SIZE > 1 with a prune without --recover (or any stage but Recover and TeacherLogits)
    is refused before anything runs."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "p"
    assert main(["prune", str(STORIES), "--method", "magnitude", "--ratio", "0.2", "--out", str(out)]) == 2
    assert "only recovery and teacher-logits run in several processes (Prune runs in one)" in capsys.readouterr().err
    assert not out.exists()
