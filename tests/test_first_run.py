"""The first run of a new user: a fast --help, no silent phase, one vocabulary of options."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

import gguf
import pytest
import torch
from conftest import STORIES, TASKS
from transformers import AutoTokenizer

from secateurs.calibration import cache as calibration_cache
from secateurs.calibration import data as calibration
from secateurs.calibration.data import draw_tokens
from secateurs.cli.main import build_parser, main
from secateurs.evaluation.perplexity import perplexity
from secateurs.export.gguf_export import export_gguf
from secateurs.methods import METHODS
from secateurs.methods.options import METHOD_NAMES
from secateurs.planning import budget, selection
from secateurs.runtime import progress
from secateurs.runtime.identity import model_identity
from secateurs.settings import names
from secateurs.storage import loading
from secateurs.storage.loading import load_model
from secateurs.storage.pruned import load_pruned

SRC = str(Path(__file__).resolve().parents[1] / "src")
COMMANDS = ([], ["info"], ["prune"], ["plan"], ["plan", "show"], ["demo"], ["eval"], ["bench"], ["report"],
            ["sweep"], ["tasks"], ["export"])


def test_help_imports_no_heavy_library():
    code = ("import sys\nfrom secateurs.cli.main import main\n"
            f"for argv in {COMMANDS!r}:\n"
            "    try:\n        main(argv + ['--help'])\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
            "heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": SRC},
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage: secateurs demo" in run.stdout


def test_phase_prints_elapsed_time_and_quiet_silences(capsys, monkeypatch):
    monkeypatch.setenv("SECATEURS_PROGRESS", "bars")  # redraws counted below, as on a terminal

    progress.set_quiet(False)
    try:
        with progress.phase("loading model"):
            pass
        with progress.phase("outer"):
            progress.status("inner line")
        assert list(progress.bar(range(3), desc="loop")) == [0, 1, 2]
        err = capsys.readouterr().err
        assert "secateurs: loading model ...\nsecateurs: loading model ... done in 0.0 s\n" in err
        assert "secateurs: outer ...\nsecateurs: inner line\nsecateurs: outer ... done in" in err
        assert "loop" in err

        with progress.phase("parsing", heartbeat=0.05):
            time.sleep(0.3)
        assert capsys.readouterr().err.count("secateurs: parsing ... 0 s\n") >= 2  # a line every 0.05 s
        slow = progress.bar(total=2, desc="slow step", tick=0.05)  # one step longer than the tick:
        time.sleep(0.4)  # the bar is redrawn meanwhile, elapsed time moving
        slow.update()
        slow.close()
        time.sleep(0.15)
        assert capsys.readouterr().err.count("slow step") >= 4
        assert not any(t.name == "secateurs-bar-tick" for t in threading.enumerate())  # stops once closed
        progress.set_quiet(True)
        with progress.phase("loading model"):
            progress.status("x")
        list(progress.bar(range(3), desc="loop"))
        quiet_bar = progress.bar(total=1, desc="quiet", tick=0.01)
        time.sleep(0.05)
        quiet_bar.close()
        assert capsys.readouterr().err == ""
    finally:
        progress.set_quiet(False)


def test_light_names_match_the_implementations():
    assert sorted(METHOD_NAMES) == sorted(METHODS)
    assert all(METHODS[name].kind == METHODS[name].options.kind for name in METHOD_NAMES)
    assert budget.GQA_MODES == names.GQA_MODES and selection.SELECTIONS == names.SELECTIONS


def test_self_calibration_is_cached_and_a_bad_cache_is_never_trusted(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))  # this test's own cache
    model, tok = load_model(str(STORIES), "float32")
    first = calibration.load_calibration("self", tok, model=model, num_samples=5, max_length=12, seed=3, batch_size=2)
    files = list(calibration_cache.folder().glob("self-*.json"))
    assert len(files) == 1
    key = json.loads(files[0].read_text())["key"]
    assert key["num_samples"] == 5 and key["max_length"] == 12 and key["seed"] == 3

    real_sample = calibration.sample_sequences

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached calibration should have been reused")

    monkeypatch.setattr(calibration, "sample_sequences", no_generation)
    again = calibration.load_calibration("self", tok, model=model, num_samples=5, max_length=12, seed=3, batch_size=4)

    def ids(c):
        return [r[m == 1].tolist() for b in c.batches for r, m in zip(b["input_ids"], b["attention_mask"])]

    assert ids(again) == ids(first) and all(len(s) == 12 for s in ids(first))

    vocab = model.get_output_embeddings().weight.shape[0]
    data = json.loads(files[0].read_text())
    for corrupt in ("{not json", json.dumps({**data, "samples": [[vocab] * 12] * 5}),
                    json.dumps({**data, "samples": [[1.0] * 12] * 5}),
                    json.dumps({**data, "samples": data["samples"][:4]}),
                    json.dumps({**data, "key": {**key, "model": "another"}})):
        files[0].write_text(corrupt)
        calls = []
        monkeypatch.setattr(calibration, "sample_sequences", lambda *a, **k: calls.append(1) or real_sample(*a, **k))
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


def test_self_calibration_draws_tokens_in_proportion_and_never_a_suppressed_one():
    """The inverse-CDF sampler that replaced torch.multinomial: frequencies match the softmax
    (chi-square well inside its 99.9% bound), and a token of probability zero is never drawn, even
    where it is the last of the vocabulary (the top of the CDF, where rounding could reach it)."""
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    logits = probs.log().expand(20_000, -1).contiguous()  # log 0 = -inf, as suppressed EOS
    counts = torch.bincount(draw_tokens(logits).reshape(-1), minlength=6).double()
    assert counts[1] == 0 and counts[5] == 0
    expected = probs.double() * 20_000
    live = expected > 0
    chi2 = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001
    top_heavy = torch.tensor([[0.0, 0.0, 30.0, -float("inf")]]).expand(1000, -1)
    assert set(draw_tokens(top_heavy).reshape(-1).tolist()) <= {0, 1, 2}


# -- one vocabulary of options --------------------------------------------------------------------
SHARED = ("--dtype", "--device", "--threads", "--device-map", "--offload-folder", "--calib", "--calib-samples",
          "--calib-length", "--calib-batch-size", "--seed", "--protocol", "--ppl", "--batch-size",
          "--max-batch-tokens", "--max-windows", "--max-tokens", "--text-field", "--max-docs", "--tasks",
          "--data-dir", "--limit", "--num-fewshot", "--eval-batch-size", "--out", "--quiet", "--debug",
          # recovery: `recover` and `prune --recover`
          "--data", "--tokens", "--self-samples", "--objective", "--lora", "--full", "--lr", "--train-length",
          "--train-batch-size", "--val-tokens", "--patience", "--resume", "--max-grad-norm")
# defaults that differ on purpose: where the output goes, and the demo's caps that make it end in minutes
PER_COMMAND_DEFAULTS = {"--out", "--max-windows", "--limit", "--tasks"}  # tasks: all five by default


def _commands():
    return [(p.prog, p) for p in build_parser().commands]


def test_shared_options_have_one_name_type_and_default_everywhere():
    seen: dict[str, tuple] = {}
    for prog, parser in _commands():
        for action in parser._actions:
            name = next((o for o in action.option_strings if o.startswith("--")), None)
            canonical = next((s for s in SHARED if s in action.option_strings), None)
            if canonical is None:
                continue
            spelling = (tuple(action.option_strings), action.dest, action.type, type(action).__name__,
                        tuple(action.choices) if action.choices else None)
            if canonical not in PER_COMMAND_DEFAULTS and canonical not in ("--quiet", "--debug"):
                spelling += (action.default,)
            if canonical in seen:
                assert spelling == seen[canonical][0], f"{prog} {name}: {spelling} vs {seen[canonical]}"
            else:
                seen[canonical] = (spelling, prog)
    model_commands = {"secateurs info", "secateurs prune", "secateurs demo", "secateurs eval", "secateurs bench",
                      "secateurs sweep"}
    for prog, parser in _commands():
        options = {o for a in parser._actions for o in a.option_strings}
        if prog in model_commands:
            assert {"--dtype", "--device", "--threads", "--quiet"} <= options, prog
        if prog in {"secateurs prune", "secateurs demo", "secateurs sweep"}:
            assert {"--calib", "--calib-samples", "--calib-length", "--calib-batch-size", "--seed"} <= options, prog
        if prog in {"secateurs demo", "secateurs eval", "secateurs sweep"}:
            assert {"--protocol", "--seq-len", "--ppl", "--text", "--tasks", "--data-dir", "--limit"} <= options, prog


def test_every_argument_has_a_description():
    for prog, parser in _commands():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help.strip(), f"{prog} {action.option_strings or action.dest}"


def test_old_spellings_still_parse():
    args = build_parser().parse_args(["demo", "--seq-len", "64", "--text", "t.txt"])
    assert args.protocol == "64" and args.ppl == "t.txt"
    args = build_parser().parse_args(["eval", "m", "--protocol", "seq128", "--quiet"])
    assert args.protocol == "seq128" and args.quiet


# -- the demo ----------------------------------------------------------------------------------
def test_demo_end_to_end_writes_report_plots_speed_and_reuses_calibration(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))  # this test's own cache
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(STORIES), "--out", str(out), "--max-windows", "4", "--calib-samples", "4",
            "--calib-length", "32", "--data-dir", str(TASKS), "--tasks",
            "piqa,arc_easy", "--limit", "4", "--bench-prompt-length", "16", "--bench-decode-tokens", "4",
            "--bench-repeats", "1", "--seed", "5", "--recover-tokens", "256"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "secateurs: calibration: sampling 4 x 32 tokens" in captured.err
    assert "calibration: reusing 4 x 32 tokens" in captured.err  # recovery trained on the samples pruning drew
    assert f"saving to {out / 'model'} ..." in captured.err and ".tmp-" not in captured.err  # the final name
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert report["perplexity_pruned"]["windows"] == 4
    assert "tokens_per_second" not in report["perplexity_pruned"]  # speed comes from the measured bench only
    pngs = {"kept_per_layer.png", "head_heatmap.png", "before_after.png", "recovery_curve.png"}
    assert pngs <= {p.name for p in out.iterdir()} and set(report["plots"]) == pngs
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "prefill tok/s (batch 1, 16 tokens), measured (ideal)" in markdown
    assert "decode tok/s (batch 1, 4 steps), measured (ideal)" in markdown
    assert "piqa acc %" in markdown and "arc_easy acc %" in markdown
    assert "kept heads (no importance scores given)" not in markdown  # the heatmap shows this run's scores
    assert (out / "report.html").read_text().count("<img") == 4
    assert "| recovered | recovered / dense |" in markdown and "Recovered model, greedy:" in markdown
    record = json.loads((out / "recovered" / "recovery.json").read_text())
    assert record["tokens"]["trained"] == 256 and record["data"]["train_sequences"] == 3  # 4 samples, 1 held out
    assert record["after"]["loss"] <= record["before"]["loss"]  # the best weights are the ones kept
    recovered, pruned = load_pruned(out / "recovered"), load_pruned(out / "model")
    assert [p.shape for p in recovered.parameters()] == [p.shape for p in pruned.parameters()]
    text = resources.files("secateurs").joinpath("data", "tinystories_sample.txt").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(out / "recovered")
    for model, key in ((recovered, "perplexity_recovered"), (pruned, "perplexity_pruned")):  # what was saved is
        again = perplexity(model, tokenizer, text, seq_len=128, max_windows=4, progress=False)  # what was reported
        assert again["perplexity"] == pytest.approx(report[key]["perplexity"], rel=1e-5)
    bench = json.loads((out / "model" / "bench.json").read_text())
    assert {r["model"] for r in bench["results"]} == {"dense", "pruned"}
    assert all(r["prefill_tokens_per_s"]["median"] > 0 and r["decode_tokens_per_s"]["median"] > 0
               for r in bench["results"])
    assert (out / "model" / "importance_scores.safetensors").exists()

    def no_generation(*args, **kwargs):
        raise AssertionError("the second run should reuse the cached calibration")

    monkeypatch.setattr(calibration, "sample_sequences", no_generation)
    capsys.readouterr()  # the checks above loaded models (with bars)
    assert main(argv + ["--force", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no phase lines, no bars
    again = json.loads((out / "report.json").read_text())
    assert again["plan"]["calibration_hash"] == report["plan"]["calibration_hash"]
    progress.set_quiet(False)


def test_dequantised_gguf_cache_round_trip_and_damage(tmp_path, caplog):
    model, tok = loading.load_model(str(STORIES), "float32")
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    folder = loading.gguf_cache_folder(source)
    loading.cache_gguf_model(model, tok, folder)
    again, tok2 = loading.cached_gguf_model(folder, source, None)
    assert model_identity(again) == model_identity(model) and again.config._name_or_path == str(source)
    ids = torch.tensor([tok("Once upon a time")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # damaged weights (a sampled row changes), or ...
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="secateurs.storage.loading"):
        assert loading.cached_gguf_model(folder, source, None) is None
    weights.write_bytes(b"not safetensors")  # ... an unreadable file: ignored, never trusted
    assert loading.cached_gguf_model(folder, source, None) is None
    assert "ignoring the model cache" in caplog.text


def test_demo_without_matplotlib_stops_before_any_work(tmp_path, monkeypatch, capsys):
    """README command 1 once installed secateurs without the plots extra: the demo then failed after
    minutes of work, at the report. A missing plotting library is said before anything loads."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert main(["demo", "--model", str(STORIES), "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert 'pip install "secateurs[plots]"' in err and "loading" not in err
    assert not (tmp_path / "demo").exists()


def test_readme_command_1_installs_what_the_demo_needs():
    """The first command of the README installs the extras the demo imports (plots)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("python3 -m venv"))
    assert "secateurs demo" in command and ' -e ".[plots]"' in command and "torch==2.13.0" in command


def test_gguf_load_parses_the_file_once_and_gives_the_same_weights(tmp_path, monkeypatch):
    """A cold GGUF load memoises transformers' three parses of the file and its ~400 tensor-name
    maps (33 s -> 16 s for SmolLM2); the model and tokenizer are those of the unmemoised load."""
    model, tok = loading.load_model(str(STORIES), "float32")
    source = export_gguf(model, tmp_path / "stories.gguf", tokenizer=tok)
    monkeypatch.setattr(loading, "cache_gguf_model", lambda *a: None)
    parses = []
    original, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parses.append(a) or original(*a, **k))
    fast, fast_tok = loading._load_gguf(Path(source), None)
    assert len(parses) == 1 and gguf.get_tensor_name_map is name_map  # parsed once; the memo is undone after
    monkeypatch.setattr(loading, "_gguf_parsed_once", contextlib.nullcontext)
    slow, slow_tok = loading._load_gguf(Path(source), None)
    assert len(parses) > 2  # transformers' own behaviour without the memo: the premise of the speed-up
    assert fast.state_dict().keys() == slow.state_dict().keys()
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in slow.state_dict().items())
    assert fast_tok.get_vocab() == slow_tok.get_vocab()
    ids = torch.tensor([slow_tok("Once upon a time")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(fast(ids).logits, slow(ids).logits)
