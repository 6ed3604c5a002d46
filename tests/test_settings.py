"""Settings declared once (secateurs.settings.fields): RecoverySettings, ExportSettings and
EvaluationSettings are what the library takes and what the command line's flags are built from, so a
flag and its setting cannot drift apart, a bound is refused in the same words on both sides, and the
object and the keywords it is built from run the same."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import pytest
import torch
from conftest import STORIES, TINYSTORIES_TEXT

from secateurs.cli.main import build_parser, main
from secateurs.cli.options import evaluation_settings, export_settings, recovery_settings
from secateurs.errors import SecateursError
from secateurs.evaluation.settings import EvaluationSettings
from secateurs.evaluation.suite import EvalSpec, evaluate
from secateurs.export import export_gguf
from secateurs.export.settings import ExportSettings
from secateurs.methods import prune
from secateurs.methods.options import OPTIONS_BY_METHOD
from secateurs.recovery import recover
from secateurs.recovery.settings import LIBRARY_ONLY, RecoverySettings
from secateurs.settings.fields import flags_of
from secateurs.storage.loading import load_model

SEQ = 32
RUN_FACTS = ("seconds", "per_second", "per_s", "threads", "allocator", "device")  # the run, not its result


def _parser(command: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command]


def _flags(cls) -> set[str]:
    return {flag for f in dataclasses.fields(cls) for flag in flags_of(f)}


def _group_flags(parser: argparse.ArgumentParser, title: str) -> set[str]:
    group = next(g for g in parser._action_groups if g.title == title)
    return {o for a in group._group_actions for o in a.option_strings}


# -- one declaration, every flag ------------------------------------------------------------------

def test_every_recovery_setting_is_a_flag_of_recover_and_every_recovery_flag_a_setting():
    parser = _parser("recover")
    text = parser.format_help()
    declared = _flags(RecoverySettings)
    assert {f.name for f in dataclasses.fields(RecoverySettings) if not flags_of(f)} == set(LIBRARY_ONLY) == {
        "chunk_rows", "data_offset"}
    for flag in declared:
        assert flag in text, flag
    options = {o for a in parser._actions for o in a.option_strings}
    assert declared <= options
    assert _group_flags(parser, "recovery") == declared - {"--seed"}  # --seed: the command's own (also prune's)
    prune_group = _group_flags(_parser("prune"), "recovery (with --recover)")
    assert prune_group == declared - {"--seed"}


def test_recover_help_states_each_default_once_and_as_declared():
    text = " ".join(_parser("recover").format_help().split())
    for phrase in ("training budget in tokens (default: 200000)", "LoRA rank (with --lora; default: 8)",
                   "distillation temperature T (loss scaled by T^2; default: 1)",
                   "held-out validation tokens (default: 4096; 0: none)", "(default: cosine)",
                   "peak learning rate (default: 1e-4 full, 3e-4 LoRA)", "default: 72)",
                   "--lora train LoRA adapters", "--full train every weight (default)", "--train-length N"):
        assert phrase in text, phrase
    assert "{default" not in text


def test_export_and_evaluation_flags_are_their_settings():
    assert _flags(ExportSettings) == {"--format", "--outtype"} <= {
        o for a in _parser("export")._actions for o in a.option_strings}
    for command in ("eval", "sweep", "demo"):
        parser = _parser(command)
        flags = _group_flags(parser, "perplexity") | _group_flags(parser, "zero-shot (lm-eval)")
        assert flags == _flags(EvaluationSettings), command
    demo = _parser("demo").parse_args(["--quiet"])
    assert (demo.max_windows, demo.limit) == (64, 50)  # the demo's caps; eval's defaults are the class's
    assert evaluation_settings(_parser("eval").parse_args(["m"])) == EvaluationSettings()
    assert export_settings(_parser("export").parse_args(["m", "--out", "x.gguf"])) == ExportSettings()


# -- the same bound, the same words ---------------------------------------------------------------

@pytest.mark.parametrize("flag, keywords, value", [
    ("--temperature", {}, 150), ("--hidden-weight", {}, 2000), ("--lora-r", {"method": "lora"}, 200000),
    ("--lora-alpha", {"method": "lora"}, 0), ("--lora-dropout", {"method": "lora"}, 1), ("--max-hours", {}, 0),
    ("--patience", {}, -1), ("--eval-every", {}, 0), ("--self-samples", {}, 0),
])
def test_a_bound_is_refused_by_the_command_line_and_the_library_in_the_same_words(tmp_path, capsys, flag, keywords,
                                                                                   value):
    name = next(f.name for f in dataclasses.fields(RecoverySettings) if flag in flags_of(f))
    with pytest.raises(SecateursError) as refused:
        RecoverySettings(**keywords, **{name: value})
    library = str(refused.value)
    assert library.startswith(f"{name} ({flag}): ")
    problem = library.split(": ", 1)[1]
    switch = ["--lora"] if keywords else []
    argv = ["recover", str(STORIES), "--teacher", str(STORIES), "--out", str(tmp_path / "o"), *switch, flag, str(value)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {problem} (see" in err, err
    assert not (tmp_path / "o").exists()


def test_unknown_or_doubled_settings_are_refused_naming_the_valid_ones(tmp_path):
    with pytest.raises(SecateursError, match=r"unknown recovery setting learning_rate; the recovery settings are: "
                                             r"data, tokens, .*\blr\b"):
        RecoverySettings.from_keywords({"learning_rate": 1e-3})
    with pytest.raises(SecateursError, match="unknown recovery setting learning_rate"):
        recover(None, None, learning_rate=1e-3)
    with pytest.raises(SecateursError, match="either as settings=RecoverySettings"):
        recover(None, None, settings=RecoverySettings(), tokens=100)
    with pytest.raises(SecateursError, match="unknown export setting quant"):
        ExportSettings.from_keywords({"quant": "q8_0"})
    with pytest.raises(SecateursError, match=r"outtype \(--outtype\) 'q4_k': choose one of f32, f16, bf16, q8_0"):
        ExportSettings(outtype="q4_k")
    with pytest.raises(SecateursError, match="either as settings=ExportSettings"):
        export_gguf(str(STORIES), tmp_path / "m.gguf", "f16", settings=ExportSettings())
    with pytest.raises(SecateursError, match="unknown evaluation setting windows"):
        EvaluationSettings.from_keywords({"windows": 3})
    with pytest.raises(SecateursError, match=r"num_fewshot \(--num-fewshot\): 65 is outside \[0, 64\]"):
        EvaluationSettings(num_fewshot=65)


def test_settings_that_apply_only_with_another_are_refused_when_built():
    for keywords, message in (({"lora_r": 4}, "apply with method 'lora'"),
                              ({"self_samples": 3, "data": str(TINYSTORIES_TEXT)}, "applies with data 'self'"),
                              ({"checkpoint_dir": "ckpt"}, "applies with save_every"),
                              ({"objective": "ce", "hidden_weight": 1.0}, "needs objective 'kd'"),
                              ({"preset": "bogus"}, "unknown preset")):
        with pytest.raises(SecateursError, match=message):
            RecoverySettings(**keywords)
    assert RecoverySettings(preset="amp-paper", lora_r=4).lora == {"r": 4, "alpha": 16, "dropout": 0.05}
    with pytest.raises(SecateursError, match="distils from a teacher"):
        RecoverySettings(objective="kd").check(has_teacher=False)
    with pytest.raises(SecateursError, match="--limit caps"):
        EvaluationSettings(limit=5).check()


def test_the_command_line_builds_the_settings_the_library_takes():
    args = _parser("recover").parse_args(["p", "--out", "o", "--lora", "--lora-r", "4", "--train-length", "32",
                                          "--patience", "0", "--max-grad-norm", "0", "--tokens", "640"])
    assert recovery_settings(args, seed=3) == RecoverySettings(method="lora", lora_r=4, seq_len=32, patience=None,
                                                               max_grad_norm=None, tokens=640, seed=3)
    assert recovery_settings(_parser("recover").parse_args(["p", "--out", "o"])) == RecoverySettings()


# -- the object and its keywords run the same -----------------------------------------------------

@pytest.fixture(scope="module")
def stories():
    return load_model(str(STORIES), dtype="float32")


def _stable(value):
    """`value` without the facts of the run (times, speeds, threads, device)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not any(f in k for f in RUN_FACTS)}
    return [_stable(v) for v in value] if isinstance(value, list) else value


def _files(folder) -> dict[str, bytes]:
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            out[f.name] = json.dumps(_stable(json.loads(data))).encode() if f.name == "recovery.json" else data
    return out


def test_settings_object_and_keywords_recover_byte_identically(stories, tmp_path):
    dense, tok = stories
    pruned, plan = prune(copy.deepcopy(dense), tok, method="magnitude", ratio=0.2, progress=False)
    keywords = dict(data=str(TINYSTORIES_TEXT), tokens=4 * 2 * SEQ, seq_len=SEQ, batch_size=2, val_tokens=2 * SEQ,
                    method="lora", lora_r=4, seed=1)
    common = dict(tokenizer=tok, teacher_tokenizer=tok, plan=plan, progress=False)
    recover(copy.deepcopy(pruned), dense, out=tmp_path / "keywords", **common, **keywords)
    recover(copy.deepcopy(pruned), dense, settings=RecoverySettings(**keywords), out=tmp_path / "object", **common)
    by_keywords, by_object = _files(tmp_path / "keywords"), _files(tmp_path / "object")
    assert "model.safetensors" in by_object and "recovery.json" in by_object
    assert by_keywords == by_object


def test_export_and_evaluation_settings_round_trip(stories, tmp_path):
    model, tok = stories
    a = export_gguf(model, tmp_path / "a.gguf", "q8_0", tokenizer=tok)
    b = export_gguf(model, tmp_path / "b.gguf", tokenizer=tok, settings=ExportSettings(outtype="q8_0"))
    assert a.read_bytes() == b.read_bytes()
    settings = EvaluationSettings(ppl=str(TINYSTORIES_TEXT), max_windows=2, max_tokens=512, protocol="seq128,64")
    assert EvaluationSettings.from_keywords(dataclasses.asdict(settings)) == settings
    spec, info = EvalSpec.from_settings(settings)
    assert spec.protocols == ["seq128", "64"] and info is not None
    by_settings, by_spec = evaluate(model, tok, settings, progress=False), evaluate(model, tok, spec, progress=False)
    assert _stable(by_settings) == _stable(by_spec) and len(by_spec["perplexity"]) == 2


def test_prune_takes_the_method_options_as_one_object_with_the_same_result(tmp_path):
    """prune(..., method_options=AmpOptions(...)) equals the same options given as keywords; another method's
    class and an option given both ways are refused."""
    def pruned(**given):
        model, tok = load_model(str(STORIES))
        prune(model, tok, "magnitude", 0.2, **given)
        return model

    options = OPTIONS_BY_METHOD["magnitude"]
    by_object = pruned(method_options=options(gqa="in-group"))
    by_keywords = pruned(gqa="in-group")
    default = pruned()
    same = [torch.equal(a, b) for a, b in zip(by_object.state_dict().values(), by_keywords.state_dict().values())]
    assert all(same) and len(by_object.state_dict()) == len(by_keywords.state_dict())
    assert [p.shape for p in by_object.parameters()] != [p.shape for p in default.parameters()]
    with pytest.raises(SecateursError, match="takes"):
        pruned(method_options=OPTIONS_BY_METHOD["harp"]())
    with pytest.raises(SecateursError, match="both"):
        pruned(method_options=options(gqa="in-group"), gqa="groups")
