"""On a CUDA device (every test here is marked `cuda` and skips, saying so, where there is none): physical
surgery equals masking with the models on the GPU and gives the CPU's numbers (float64, the exactness tests'
plans), one recovery step trains on the GPU as on the CPU, and `secateurs prune --device cuda` writes the
weights a CPU run of the same plan writes. benchmarks/gpu_check.sh runs these with a prune, a recovery and a
speed comparison on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import STORIES, TINYSTORIES_TEXT, input_ids, masked_reference, tiny_model
from test_surgery_exact import KINDS, exactness_plan  # the CPU exactness tests' plans

from secateurs.cli.main import main
from secateurs.methods import prune
from secateurs.planning.plan import PLAN_FILENAME
from secateurs.recovery import recover
from secateurs.storage.loading import load_model
from secateurs.storage.pruned import load_pruned
from secateurs.surgery.apply import apply_plan

pytestmark = pytest.mark.cuda

GPU = "cuda"
SEQ = 64


def _devices(model) -> set[str]:
    return {p.device.type for p in model.parameters()}


@pytest.mark.parametrize("kind", KINDS)
def test_surgery_matches_masking_on_cuda(family, kind):
    dense = tiny_model(family)
    plan = exactness_plan(dense, kind)
    reference = masked_reference(dense, plan).to(GPU)
    pruned = apply_plan(copy.deepcopy(dense).to(GPU), plan)
    assert _devices(pruned) == {"cuda"}
    ids = input_ids()
    with torch.no_grad():
        want = reference(ids.to(GPU)).logits
        got = pruned(ids.to(GPU)).logits
        on_cpu = apply_plan(copy.deepcopy(dense), plan)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    torch.testing.assert_close(got.cpu(), on_cpu, atol=1e-10, rtol=0)
    assert sum(p.numel() for p in pruned.parameters()) <= sum(p.numel() for p in dense.parameters())


def test_generate_matches_masking_on_cuda(family):
    dense = tiny_model(family)
    plan = exactness_plan(dense, "mixed")
    reference = masked_reference(dense, plan).to(GPU)
    pruned = apply_plan(copy.deepcopy(dense).to(GPU), plan)
    ids = input_ids(batch=1, length=5).to(GPU)
    kwargs = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=0)
    want, got = reference.generate(ids, **kwargs), pruned.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-9, rtol=0)


def _one_step(student, teacher, plan, tokenizer, device: str):
    """One full fine-tuning step of KD recovery (2 sequences of SEQ tokens) with both models on `device`."""
    return recover(copy.deepcopy(student).to(device), copy.deepcopy(teacher).to(device), data=str(TINYSTORIES_TEXT),
                   tokens=2 * SEQ, tokenizer=tokenizer, plan=plan, seq_len=SEQ, batch_size=2, val_tokens=2 * SEQ,
                   progress=False)


def test_one_recovery_step_on_cuda():
    """The same step on the GPU and on the CPU: same data, same losses (float32 rounding apart), and the
    GPU's student stays on the GPU."""
    dense, tokenizer = load_model(str(STORIES), dtype="float32")
    student, plan = prune(copy.deepcopy(dense), method="magnitude", ratio=0.2, progress=False)
    gpu = _one_step(student, dense, plan, tokenizer, GPU)
    cpu = _one_step(student, dense, plan, tokenizer, "cpu")
    assert gpu.record["device"].startswith("cuda") and _devices(gpu.model) == {"cuda"}
    assert gpu.record["steps"]["done"] == cpu.record["steps"]["done"] == 1
    assert gpu.record["data"]["hash"] == cpu.record["data"]["hash"]
    assert gpu.record["before"]["loss"] == pytest.approx(cpu.record["before"]["loss"], rel=1e-4)
    [gpu_step], [cpu_step] = gpu.record["curves"]["train"], cpu.record["curves"]["train"]
    assert gpu_step["loss"] == pytest.approx(cpu_step["loss"], rel=1e-4)
    assert gpu.record["after"]["loss"] == pytest.approx(cpu.record["after"]["loss"], rel=1e-3)
    assert gpu.record["after"]["loss"] < gpu.record["before"]["loss"]


def test_cli_prune_on_cuda_writes_what_the_cpu_writes(tmp_path, capsys):
    """`prune --device cuda` on stories260K, then its plan re-applied on the CPU: the same weights, bit for bit
    (surgery selects rows and columns; it computes nothing)."""
    gpu, cpu = tmp_path / "gpu", tmp_path / "cpu"
    assert main(["prune", str(STORIES), "--method", "magnitude", "--ratio", "0.2", "--device", GPU, "--out",
                 str(gpu), "--quiet"]) == 0
    assert main(["prune", str(STORIES), "--plan", str(gpu / PLAN_FILENAME), "--out", str(cpu), "--quiet"]) == 0
    pruned = load_pruned(gpu)
    want, got = load_pruned(cpu).state_dict(), pruned.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert pruned.num_parameters() < load_model(str(STORIES), dtype="float32")[0].num_parameters()
