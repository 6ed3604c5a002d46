"""The recovery memory plan (secateurs.recovery.memory): its arithmetic on known shapes, the strategy
it chooses and refuses, `recover --dry-run` (configs only, no weights), the one check a real run
makes before loading, and the plan against the peak resident memory of CPU runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from conftest import STORIES, TINYSTORIES_TEXT, benchmark_module
from transformers import LlamaConfig

import secateurs.storage.checkpoint
import secateurs.storage.loading
import secateurs.storage.pruned
from secateurs.cli.main import main
from secateurs.errors import SecateursError
from secateurs.recovery import estimate, memory
from secateurs.recovery.memory import (
    MEMORY_MARGIN,
    choose_strategy,
    plan_for_models,
    plan_memory,
    shapes_of,
    skeleton,
)
from secateurs.recovery.settings import RecoverySettings
from secateurs.storage.pruned import load_pruned, meta_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"
GIB = 2**30
# hidden 64, 2 layers, 4 heads of 16 (2 KV heads), 128 neurons, vocabulary 1000, untied, float32
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000, tie_word_embeddings=False, dtype="float32")


def tiny_model():
    return meta_model(LlamaConfig(**TINY))


def tiny_params() -> tuple[int, int]:
    """(every parameter, the sum of in + out features of the seven projections of one layer)."""
    h, i, kv = 64, 128, 2 * 16
    layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h  # q, k, v, o, gate/up/down, two norms
    return 2 * 1000 * h + h + 2 * layer, (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)


def test_weights_gradients_and_adamw_state_are_exact_byte_counts():
    params, adapted = tiny_params()
    model = tiny_model()
    shapes = shapes_of(model)
    assert shapes.params == params == sum(p.numel() for p in model.parameters())
    assert shapes.head_params == 1000 * 64 and shapes.root_params == 2 * 1000 * 64 + 64
    s = RecoverySettings(batch_size=4, seq_len=32, tokens=10_000)
    plan = plan_memory(shapes, shapes, s, processes=1)
    full = plan.device("ddp", "full")
    assert (full.student_weights, full.gradients, full.optimizer, full.best_weights) == (
        4 * params, 4 * params, 8 * params, 4 * params)
    assert full.teacher_weights == 4 * params and full.gathered == 0
    lora = plan.device("ddp", "lora")
    adapters = 8 * 2 * adapted  # rank 8, two layers
    assert plan.trainable_params("lora") == adapters
    assert (lora.gradients, lora.optimizer, lora.best_weights) == (4 * adapters, 8 * adapters, 4 * adapters)
    assert lora.student_weights == 4 * params + 4 * adapters  # the base weights, frozen, and the adapters
    assert full.step_peak == full.student_weights + full.gradients + full.optimizer + full.best_weights \
        + full.teacher_weights
    assert full.peak == max(full.forward_peak, full.step_peak)


def test_fsdp_divides_the_student_over_the_processes_and_gathers_a_root_and_two_layers():
    shapes = shapes_of(tiny_model())
    s = RecoverySettings(batch_size=4, seq_len=32, tokens=10_000)
    one, four = plan_memory(shapes, shapes, s, 1), plan_memory(shapes, shapes, s, 4)
    ddp, fsdp = four.device("ddp"), four.device("fsdp")
    assert fsdp.student_weights == -(-ddp.student_weights // 4) and fsdp.optimizer == -(-ddp.optimizer // 4)
    assert fsdp.gradients == -(-ddp.gradients // 4)
    assert fsdp.gathered == 4 * (shapes.root_params + 2 * shapes.largest_layer)
    assert fsdp.teacher_weights == ddp.teacher_weights  # the teacher is replicated
    assert four.tokens_per_process == 32 and one.tokens_per_process == 128  # the batch is of all processes
    assert ddp.activations * 4 == one.device("ddp").activations


def test_activation_checkpointing_keeps_one_hidden_state_per_layer():
    shapes = shapes_of(tiny_model())
    s = RecoverySettings(batch_size=4, seq_len=32, tokens=10_000)
    plain = plan_memory(shapes, None, s).device("ddp")
    checkpointed = plan_memory(shapes, None, s.replace(gradient_checkpointing=True)).device("ddp")
    assert checkpointed.activations < plain.activations
    assert plain.teacher_weights == plain.teacher_activations == 0  # no teacher in the loss


def test_the_published_llama_configs_give_the_published_parameter_counts():
    for name, params in (("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496)):
        config = json.loads((CONFIGS / name / "config.json").read_text())
        assert config["vocab_size"] == 128256 and config["rope_scaling"]["rope_type"] == "llama3"
        assert shapes_of(skeleton(CONFIGS / name / "config.json")).params == params


def test_assume_ratio_cuts_a_fifth_of_all_parameters_in_heads_and_neurons():
    dense = shapes_of(skeleton(CONFIGS / "llama-3.1-8b"))
    cut = shapes_of(skeleton(CONFIGS / "llama-3.1-8b", assume_ratio=0.2))
    assert abs(1 - cut.params / dense.params - 0.2) < 0.001
    first = cut.layers[0]
    assert all(layer == first for layer in cut.layers)  # every layer alike
    assert first.heads < 32 and first.kv_width < 8 * 128 and first.intermediate < 14336
    assert first.heads % (first.kv_width // 128) == 0  # whole KV groups


def test_a_pruned_folder_plans_from_its_config_what_its_loaded_model_holds(tmp_path, capsys):
    assert main(["prune", str(STORIES), "--method", "magnitude", "--ratio", "0.3", "--allocation", "global",
                 "--out", str(tmp_path / "pruned"), "--quiet"]) == 0
    capsys.readouterr()
    shapes = shapes_of(skeleton(tmp_path / "pruned"))
    assert len({layer.intermediate for layer in shapes.layers}) > 1  # per-layer widths
    assert shapes == shapes_of(load_pruned(tmp_path / "pruned"))


def test_choose_strategy_prefers_ddp_then_fsdp_and_refuses_with_the_numbers():
    shapes = shapes_of(skeleton(CONFIGS / "llama-3.1-8b"))
    s = RecoverySettings(batch_size=8, seq_len=2048, tokens=10**8)
    plan = plan_memory(shapes, shapes, s, 8, "cuda")
    ddp, fsdp = plan.device("ddp").peak, plan.device("fsdp").peak
    assert fsdp < ddp
    assert choose_strategy(plan, 2 * ddp) == "ddp"
    assert choose_strategy(plan, int((fsdp + ddp) / 2 / MEMORY_MARGIN)) == "fsdp"
    assert choose_strategy(plan, None) == "ddp"  # memory unknown: nothing refused
    assert choose_strategy(plan, 2 * ddp, "fsdp") == "fsdp"  # the strategy setting wins
    with pytest.raises(SecateursError, match=r"ddp \d+\.\d\d GiB, fsdp \d+\.\d\d GiB") as refusal:
        choose_strategy(plan, fsdp // 2)
    assert f"{fsdp // 2 / GIB:,.2f} GiB" in str(refusal.value)
    with pytest.raises(SecateursError, match="ddp"):
        choose_strategy(plan, int((fsdp + ddp) / 2 / MEMORY_MARGIN), "ddp")
    single = plan_memory(shapes, shapes, s, 1, "cuda")
    assert choose_strategy(single, 2 * single.device("ddp").peak) == "ddp"
    with pytest.raises(SecateursError, match=r"\(1 process, full: ddp [\d.,]+ GiB\)"):  # one process: ddp alone
        choose_strategy(single, single.device("ddp").peak // 2)


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight read fails the test."""
    def fail(*args, **kwargs):
        pytest.fail("weights were read")

    monkeypatch.setattr(secateurs.storage.loading, "load_model", fail)
    monkeypatch.setattr(secateurs.storage.pruned, "load_file", fail)
    monkeypatch.setattr(secateurs.storage.checkpoint, "safe_open", fail)
    monkeypatch.setattr(safetensors.torch, "load_file", fail)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)


def test_dry_run_prints_every_strategy_and_the_choice_without_weights(no_weights, capsys, tmp_path):
    config = tmp_path / "dense"
    config.mkdir()
    shutil.copy(CONFIGS / "llama-3.1-8b" / "config.json", config / "config.json")  # a folder with no weights
    code = main(["recover", str(config / "config.json"), "--teacher", str(config), "--assume-ratio", "0.2",
                 "--dry-run", "--processes", "8", "--device-memory", "80", "--device", "cuda",
                 "--train-batch-size", "8", "--train-length", "2048"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "8 processes" in out and "6,424,236,032 parameters" in out and "teacher 8,030,261,248" in out
    assert "|      ddp |     fsdp |" in out and "| AdamW moments" in out and "| peak  " in out
    assert "chosen: fsdp (80.00 GiB per device" in out
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.json", "dense"]  # nothing written


def test_dry_run_refuses_what_fits_nowhere_after_printing_the_plan(no_weights, capsys):
    code = main(["recover", str(CONFIGS / "llama-3.1-70b"), "--teacher", str(CONFIGS / "llama-3.1-70b"),
                 "--dry-run", "--processes", "8", "--device-memory", "80", "--device", "cuda",
                 "--train-batch-size", "8"])
    captured = capsys.readouterr()
    assert code == 2 and "chosen: none (80.00 GiB per device)" in captured.out
    assert "secateurs: error: this recovery needs more memory per device than 90% of 80.00 GiB" in captured.err
    code = main(["recover", str(STORIES), "--teacher", str(STORIES), "--dry-run", "--processes", "3"])
    assert code == 2 and "must split evenly" in capsys.readouterr().err


def test_plan_flags_belong_to_dry_run_and_prune_refuses_it(capsys, tmp_path):
    code = main(["recover", str(STORIES), "--teacher", str(STORIES), "--out", str(tmp_path / "o"),
                 "--processes", "2"])
    assert code == 2 and "--processes describes the memory plan of --dry-run" in capsys.readouterr().err
    assert main(["recover", str(STORIES), "--teacher", str(STORIES)]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert main(["prune", str(STORIES), "--recover", "--dry-run", "--out", str(tmp_path / "p")]) == 2
    assert "--assume-ratio R --dry-run" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_cannot_fit_is_refused_before_any_weights_load(no_weights, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(estimate, "free_memory", lambda device: 64 * 2**20)  # 64 MiB free
    code = main(["recover", str(STORIES), "--teacher", str(STORIES), "--out", str(tmp_path / "o"),
                 "--data", str(TINYSTORIES_TEXT), "--tokens", str(2**20), "--train-batch-size", "64",
                 "--train-length", "512", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "needs more memory per device than 90% of 0.06 GiB (1 process, full: ddp " in err, err
    assert not (tmp_path / "o").exists()


def test_the_loaded_models_memory_counts_as_available():
    model = torch.nn.Linear(10, 10)
    assert memory.resident_bytes((model, None, model), torch.device("cpu")) == 110 * 4


# -- the plan against measured peaks ---------------------------------------------------------------------
@pytest.mark.glibc
@pytest.mark.parametrize("name", ["kd-full", "ce-long"])
def test_the_plan_is_within_a_fifth_of_the_measured_peak(name):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs /proc/self/clear_refs to reset the peak resident memory")
    bench = benchmark_module("memory_plan")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_plan.py"), "--measure", name], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_above_baseline"]
    plan = bench.planned(name)
    assert plan["gradients"] + plan["optimizer"] + plan["activations"] >= 10**9  # at least 1 GB of training state
    assert abs(plan["peak"] / measured - 1) <= bench.TOLERANCE, (plan, measured)


def test_the_measured_configurations_are_what_the_plan_reads():
    bench = benchmark_module("memory_plan")
    for name, case in bench.MEASURED.items():
        model = meta_model(bench.llama_config(case["model"]))
        plan = plan_for_models(model, model if case.get("teacher", True) else None, bench.settings_of(case))
        assert plan.device("ddp").to_dict() == bench.planned(name)
