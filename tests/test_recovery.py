"""Recovery after pruning (secateurs.recover): distillation and cross-entropy, LoRA (merged) and full
fine-tuning, on the real stories260K model pruned in every form; data packing and Alpaca masking;
bit-identical resume; refusals before any work."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import STORIES, TINYSTORIES_TEXT, WIKITEXT_HEAD, input_ids, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import secateurs
import secateurs.storage.loading
from secateurs.cli.main import main
from secateurs.errors import OutputExistsError, SecateursError
from secateurs.evaluation.perplexity import perplexity
from secateurs.methods import make_plan, prune
from secateurs.methods.options import DepthOptions
from secateurs.planning.geometry import identity_plan
from secateurs.planning.plan import PLAN_FILENAME, PruningPlan
from secateurs.recovery import RECOVERY_FILENAME, RecoveryError, recover
from secateurs.recovery import data as recovery_data
from secateurs.recovery.data import IGNORE_INDEX, alpaca_prompt, alpaca_stream, load_recovery_data
from secateurs.recovery.iterative import prune_depth_recovering, whole_budget_interval
from secateurs.recovery.lora import lora_target_names
from secateurs.recovery.objectives import Objective, chunked_loss
from secateurs.recovery.settings import RecoverySettings
from secateurs.recovery.trainer import DataOrder, LoopSettings, RecoveryLoop
from secateurs.runtime.offload import has_offloaded_weights
from secateurs.storage.loading import load_model
from secateurs.storage.pruned import load_pruned, save_pruned
from secateurs.surgery.apply import apply_plan

SEQ = 64
QUICK = dict(seq_len=SEQ, batch_size=2, val_tokens=4 * SEQ, progress=False)


@pytest.fixture(scope="module")
def stories():
    return load_model(str(STORIES), dtype="float32")


@pytest.fixture(scope="module")
def amp20(stories):
    dense, tok = stories
    return prune(copy.deepcopy(dense), tok, method="amp", ratio=0.2, calibration=str(TINYSTORIES_TEXT),
                 calibration_options={"num_samples": 8, "max_length": 64}, progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ids():
    return input_ids(2, 24, vocab=512, seed=3)


# -- the objectives ------------------------------------------------------------------


@pytest.mark.parametrize("kind, kd_ratio, temperature", [("kd", 0.7, 2.0), ("kd", 0.6, 1.0), ("kd", 1.0, 1.0),
                                                          ("kd", 1.0, 3.0), ("ce", 0.0, 1.0)])
@pytest.mark.parametrize("family", ["llama-gqa", "gemma2", "phi", "phi3"])
def test_chunked_loss_and_gradients_equal_the_full_logits_reference(family, kind, kd_ratio, temperature):
    """Row chunks, the written-out logit gradient and the two-stage backward give the loss and the
    gradients autograd gives the plain full-logits formula, for each mix of KL and cross-entropy."""
    student, teacher = tiny_model(family, seed=0), tiny_model(family, seed=1)
    ids = input_ids(2, 12)
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    objective = Objective(kind, kd_ratio=kd_ratio, temperature=temperature, chunk_rows=5)
    sums = chunked_loss(student, teacher if kind == "kd" else None, ids, labels, objective, scale=1 / n)
    chunked = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    zs, zt, y = student(ids).logits[:, :-1], teacher(ids).logits[:, :-1].detach(), labels[:, 1:]
    mask = y != IGNORE_INDEX
    zs, zt, y = zs[mask], zt[mask], y[mask]
    t = temperature
    kl = torch.nn.functional.kl_div(torch.log_softmax(zs / t, -1), torch.log_softmax(zt / t, -1), log_target=True,
                                    reduction="none").sum(-1)
    reference = (kd_ratio * t * t * kl + (1 - kd_ratio) * torch.nn.functional.cross_entropy(zs, y, reduction="none"))
    reference = reference.mean()
    reference.backward()
    assert sums["tokens"] == n
    assert sums["loss"] / n == pytest.approx(reference.item(), rel=1e-12)
    for name, p in student.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-10, atol=1e-12)
    measured = chunked_loss(student, teacher if kind == "kd" else None, ids, labels, objective, backward=False)
    assert measured["loss"] == pytest.approx(sums["loss"], rel=1e-12)  # validation: the same loss, and
    assert measured["nll"] == pytest.approx(torch.nn.functional.cross_entropy(zs, y, reduction="sum").item(), rel=1e-12)
    if kind == "kd":  # the KL at T = 1 whatever the training temperature
        kl1 = torch.nn.functional.kl_div(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1), log_target=True,
                                         reduction="sum")
        assert measured["kl"] == pytest.approx(kl1.item(), rel=1e-12)


@pytest.mark.parametrize("family", ["llama-gqa", "gemma2", "phi3"])
def test_hidden_state_term_matches_each_student_layer_with_its_source_layer(family):
    """After depth pruning, student layer j is matched with the teacher layer the plan kept as j;
    loss and gradients equal a direct computation with hooks on both models."""
    teacher = tiny_model(family, seed=1)
    plan = identity_plan(teacher)
    plan.layers[1].removed = True
    student = apply_plan(copy.deepcopy(teacher), plan)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    ids = input_ids(2, 12)
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    objective = Objective("kd", chunk_rows=5, hidden_weight=0.5, layer_map=tuple(plan.kept_layer_indices()))
    sums = chunked_loss(student, teacher, ids, labels, objective, scale=1 / n)
    chunked = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    outputs = {}
    hooks = [layer.register_forward_hook(
                 lambda m, a, o, key=(who, i): outputs.__setitem__(key, o[0] if isinstance(o, tuple) else o))
             for who, model in (("s", student), ("t", teacher)) for i, layer in enumerate(model.model.layers)]
    zs = student(ids).logits[:, :-1]
    with torch.no_grad():
        zt = teacher(ids).logits[:, :-1]
    for h in hooks:
        h.remove()
    mask = labels[:, 1:] != IGNORE_INDEX
    kl = torch.nn.functional.kl_div(torch.log_softmax(zs[mask], -1), torch.log_softmax(zt[mask], -1),
                                    log_target=True, reduction="none").sum(-1)
    terms = []
    for j, source in enumerate(plan.kept_layer_indices()):
        h_s, h_t = outputs["s", j][:, :-1][mask], outputs["t", source][:, :-1][mask]
        terms.append((h_s - h_t).pow(2).sum(-1) / h_t.pow(2).sum(-1))
    reference = (kl + 0.5 * torch.stack(terms).mean(0)).mean()
    reference.backward()
    assert sums["loss"] / n == pytest.approx(reference.item(), rel=1e-12)
    for name, p in student.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-10, atol=1e-12)


def test_hidden_state_distillation_of_a_depth_pruned_model(stories):
    dense, tok = stories
    plan = identity_plan(dense)
    plan.layers[2].removed = True
    pruned = apply_plan(copy.deepcopy(dense), plan)
    result = recover(pruned, dense, data=str(TINYSTORIES_TEXT), tokens=8 * 2 * SEQ, tokenizer=tok, plan=plan,
                     hidden_weight=1.0, lr=5e-4, patience=None, **QUICK)
    before, after = result.record["before"], result.record["after"]
    assert after["hidden"] < before["hidden"] and after["kl"] < before["kl"]
    assert result.record["objective"]["layer_map"] == [0, 1, 3, 4]
    with pytest.raises(SecateursError, match="plan"):
        recover(apply_plan(copy.deepcopy(dense), plan), dense, data=str(TINYSTORIES_TEXT), tokens=2 * SEQ,
                tokenizer=tok, hidden_weight=1.0, **QUICK)


# -- recovery lowers the loss -------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "lora"])
def test_distillation_lowers_validation_kl_and_perplexity(stories, amp20, method):
    dense, tok = stories
    pruned, plan = amp20
    # amp's default already re-fits the layers (validation KL 0.78 instead of 1.13): a gentle rate
    lr = 5e-4 if method == "full" else 3e-3
    result = recover(copy.deepcopy(pruned), dense, data=str(TINYSTORIES_TEXT), tokens=10 * 2 * SEQ, tokenizer=tok,
                     teacher_tokenizer=tok, plan=plan, method=method, lr=lr, patience=None, **QUICK)
    before, after = result.record["before"], result.record["after"]
    assert after["kl"] < 0.85 * before["kl"]
    assert after["perplexity"] < before["perplexity"]
    assert result.record["steps"]["done"] == 10 and result.record["tokens"]["trained"] == 10 * 2 * SEQ
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert not any("lora" in n for n, _ in result.model.named_parameters())
    if method == "lora":
        lora = result.record["parametrisation"]["lora"]
        # seven projections x 5 layers
        assert lora["r"] == 8 and lora["alpha"] == 16 and lora["target_modules"] == 7 * 5


def test_early_stop_keeps_the_best_validated_weights(stories, amp20):
    dense, tok = stories
    pruned, _ = amp20
    result = recover(copy.deepcopy(pruned), dense, data=str(TINYSTORIES_TEXT), tokens=30 * 2 * SEQ, tokenizer=tok,
                     lr=0.3, warmup_ratio=0.0, scheduler="constant", eval_every=1, patience=2, **QUICK)
    steps, val = result.record["steps"], result.record["curves"]["val"]
    assert steps["stopped_early"] and steps["done"] < steps["planned"]
    best = min(val, key=lambda r: r["loss"])
    assert result.record["after"] == best and steps["best_step"] == best["step"]
    assert [r["loss"] > best["loss"] for r in val[-2:]] == [True, True]
    if best["step"] != steps["done"]:
        assert steps["restored_best_step"] == best["step"]


def test_patience_counts_trained_validations_and_the_start_still_wins_when_nothing_beats_it(stories, amp20):
    """An already recovered model first rises above its start at the peak learning rate; that
    must not end the run. A run that only gets worse must still end at the start's weights."""
    dense, tok = stories
    data = load_recovery_data(str(TINYSTORIES_TEXT), tok, seq_len=SEQ, tokens=8 * SEQ, val_tokens=2 * SEQ)

    def stops(losses):
        student = copy.deepcopy(amp20[0]).requires_grad_(True)
        loop = RecoveryLoop(student, dense, data, Objective("kd"), LoopSettings(tokens=8 * SEQ, patience=3),
                            progress=False)
        for step, loss in enumerate(losses):
            with torch.no_grad():
                next(iter(loop.params.values())).fill_(step)  # weights that say which validation they are
            if loop._record_validation({"step": step, "loss": loss}):
                loop._restore_best()
                return step, next(iter(loop.params.values())).flatten()[0].item()
        return None, loop.best["step"]

    assert stops([0.90, 0.99, 0.95, 0.93, 0.89, 0.88]) == (None, 5)  # rises, then falls below the start
    assert stops([0.90, 0.99, 1.00, 1.10, 1.20]) == (4, 0.0)  # only worse: stops, back to the start's weights
    assert stops([0.90, 0.80, 0.85, 0.86, 0.87]) == (4, 1.0)  # the usual case: back to the best trained step


def test_cross_entropy_without_teacher_lowers_perplexity(stories, amp20):
    _, tok = stories
    pruned, plan = amp20
    result = recover(copy.deepcopy(pruned), None, data=str(TINYSTORIES_TEXT), tokens=12 * 2 * SEQ, tokenizer=tok,
                     plan=plan, lr=2e-3, **QUICK)
    assert result.record["objective"]["kind"] == "ce" and result.record["teacher"] is None
    assert result.record["after"]["perplexity"] < 0.95 * result.record["before"]["perplexity"]


def test_lora_merged_equals_unmerged_in_float64(stories, amp20):
    """The logits of the trained, unmerged LoRA model (captured at the last validation) equal those
    of the merged model recover() returns."""
    dense, tok = stories
    pruned, plan = amp20
    student, teacher = copy.deepcopy(pruned).double(), copy.deepcopy(dense).double()
    ids = _ids()
    seen = {}

    def capture(val, model):
        seen[val["step"]] = _logits(model, ids)

    result = recover(student, teacher, data=str(TINYSTORIES_TEXT), tokens=6 * 2 * SEQ, tokenizer=tok, method="lora",
                     lr=1e-2, patience=None, on_validation=capture, **QUICK)
    unmerged = seen[6]
    merged = _logits(result.model, ids)
    assert (unmerged - seen[0]).abs().max() > 1e-3  # the adapters did change the model
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-10)


def test_lora_targets_come_from_the_adapters():
    for family, expected in (
            ("llama-gqa", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
            ("phi", {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}),
            ("phi3", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"})):
        model = tiny_model(family)
        names = lora_target_names(model)
        assert {n.rsplit(".", 1)[1] for n in names} == expected
        assert len(names) == len(expected) * model.config.num_hidden_layers


# -- the recovered folder ----------------------------------------------------------


def test_recovered_folder_reloads_like_its_pruned_twin(stories, amp20, tmp_path):
    dense, tok = stories
    pruned, plan = amp20
    twin = save_pruned(pruned, plan, tmp_path / "pruned", tokenizer=tok)
    result = recover(load_pruned(twin), dense, data=str(TINYSTORIES_TEXT), tokens=4 * 2 * SEQ, tokenizer=tok,
                     teacher_tokenizer=tok, plan=PruningPlan.load(twin), out=tmp_path / "recovered", method="lora",
                     **QUICK)
    out = result.out
    twin_info = json.loads((twin / "config.json").read_text())["secateurs"]
    info = json.loads((out / "config.json").read_text())["secateurs"]
    assert info == twin_info and info["stock_loadable"]
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    torch.testing.assert_close(_logits(stock, ids), _logits(result.model, ids), rtol=0, atol=0)
    assert not torch.equal(_logits(stock, ids), _logits(pruned, ids))
    assert (out / PLAN_FILENAME).read_text() == (twin / PLAN_FILENAME).read_text()
    record = json.loads((out / RECOVERY_FILENAME).read_text())
    assert record["data"]["sha256"] and record["data"]["hash"] == result.record["data"]["hash"]
    assert record["teacher"]["is_plan_base"] is True
    assert len(record["curves"]["train"]) == 4 and record["curves"]["val"][0]["step"] == 0
    assert record["optimizer"]["name"] == "AdamW" and record["parametrisation"]["lora"]["merged"]
    assert not (tmp_path / "recovered.checkpoints").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def _forms(dense, tok):
    """Every pruned form of stories260K (8 heads in 4 KV groups, 172 neurons, 5 layers)."""
    plans = {}
    plans["uniform"] = make_plan(dense, "amp", 0.2, tokenizer=tok, calibration=str(TINYSTORIES_TEXT),
                                 calibration_options={"num_samples": 8, "max_length": 64}, progress=False)
    het = identity_plan(dense)
    het.layers[0].kv_heads = [0, 2, 3]
    het.layers[1].neurons = list(range(0, 172, 2))
    het.layers[3].heads = [0, 2, 4, 6]
    plans["heterogeneous"] = het
    plans["flap"] = make_plan(dense, "flap", 0.2, tokenizer=tok, calibration=str(TINYSTORIES_TEXT),
                              calibration_options={"num_samples": 8, "max_length": 64}, progress=False)
    harp = identity_plan(dense)
    harp.layers[4].attention = {"mode": "value", "alpha": 0.5}
    harp.layers[3].attention = {"mode": "removed"}
    plans["harp"] = harp
    depth = identity_plan(dense)
    depth.layers[2].removed = True
    plans["depth"] = depth
    return plans


@pytest.mark.parametrize("form", ["uniform", "heterogeneous", "flap", "harp", "depth"])
def test_every_pruned_form_trains_saves_and_reloads(stories, form, tmp_path):
    dense, tok = stories
    plan = _forms(dense, tok)[form]
    pruned = apply_plan(copy.deepcopy(dense), plan)
    twin = save_pruned(pruned, plan, tmp_path / "pruned", tokenizer=tok)
    before = {n: p.detach().clone() for n, p in pruned.named_parameters()}
    for method in ("lora", "full"):
        student = load_pruned(twin)
        result = recover(student, dense, data=str(TINYSTORIES_TEXT), tokens=3 * 2 * SEQ, tokenizer=tok,
                         plan=plan, out=tmp_path / method, method=method, lr=1e-3 if method == "lora" else 5e-4,
                         patience=None, **QUICK)
        after = dict(result.model.named_parameters())
        assert set(after) == set(before)  # same structure: no adapter left, nothing lost
        assert any(not torch.equal(after[n], before[n]) for n in before)
        assert result.record["after"]["kl"] < result.record["before"]["kl"]
        reloaded = load_pruned(result.out)
        torch.testing.assert_close(_logits(reloaded, _ids()), _logits(result.model, _ids()), rtol=0, atol=0)
        info = json.loads((result.out / "config.json").read_text())["secateurs"]
        assert info == json.loads((twin / "config.json").read_text())["secateurs"]
    if form == "flap":
        assert "extra_parameters" in info and not info["stock_loadable"]


def test_harp_fused_matrix_is_a_lora_target(stories):
    dense, _ = stories
    harp = identity_plan(dense)
    harp.layers[4].attention = {"mode": "value", "alpha": 0.5}
    harp.layers[3].attention = {"mode": "removed"}
    names = lora_target_names(apply_plan(copy.deepcopy(dense), harp))
    assert "model.layers.4.self_attn.fused" in names
    assert not any(n.startswith("model.layers.3.self_attn") for n in names)
    assert len(names) == 7 * 3 + 1 + 3 + 3  # 3 full layers, layer 4: fused + MLP, layer 3: MLP only


# -- resume ------------------------------------------------------------------------


def test_resume_after_k_steps_equals_the_uninterrupted_run(stories, amp20, tmp_path):
    dense, tok = stories
    pruned, plan = amp20
    run = dict(data=str(TINYSTORIES_TEXT), tokens=7 * 2 * SEQ, tokenizer=tok, method="lora", lr=5e-3,
               lora_dropout=0.2, eval_every=2, **QUICK)
    whole = recover(copy.deepcopy(pruned), dense, **run)

    class Crash(Exception):
        pass

    def crash_at_4(record, loop):
        if record["step"] == 4:
            raise Crash

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        recover(copy.deepcopy(pruned), dense, checkpoint_dir=ckpt, save_every=2, on_step=crash_at_4, **run)
    with pytest.raises(RecoveryError, match="other settings"):
        recover(copy.deepcopy(pruned), dense, checkpoint_dir=ckpt, save_every=2, resume=True, **{**run, "lr": 1e-3})
    with pytest.raises(RecoveryError, match="earlier run"):  # a new run never clobbers a checkpoint
        recover(copy.deepcopy(pruned), dense, checkpoint_dir=ckpt, save_every=2, **run)
    resumed = recover(copy.deepcopy(pruned), dense, checkpoint_dir=ckpt, save_every=2, resume=True, **run)
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    assert ([r["loss"] for r in resumed.record["curves"]["train"]]
            == [r["loss"] for r in whole.record["curves"]["train"]])
    assert resumed.record["curves"]["val"] == whole.record["curves"]["val"]
    assert resumed.record["steps"]["resumed_at"] == [4]


def test_same_seed_same_weights(stories, amp20):
    dense, tok = stories
    pruned, _ = amp20
    run = dict(data=str(TINYSTORIES_TEXT), tokens=3 * 2 * SEQ, tokenizer=tok, method="lora", **QUICK)
    a = recover(copy.deepcopy(pruned), dense, seed=1, **run).model
    b = recover(copy.deepcopy(pruned), dense, seed=1, **run).model
    c = recover(copy.deepcopy(pruned), dense, seed=2, **run).model
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_data_offset_continues_the_seeded_order():
    """A run with data_offset k trains on the sequences that follow the first k of the same seeded
    order (across the epoch boundary), so Consensus's rounds see new text rather than the same start."""
    whole = DataOrder(7, 2, seed=3)
    later = DataOrder(7, 2, seed=3, offset=4)
    sequence = torch.cat([whole.batch(m) for m in range(6)])  # 12 positions: one epoch and 5 of the next
    assert torch.equal(torch.cat([later.batch(m) for m in range(4)]), sequence[4:12])
    assert sorted(sequence[:7].tolist()) == list(range(7))


def test_gradient_accumulation_and_checkpointing_do_not_change_the_result(stories, amp20):
    """batch 2 = batch 1 x 2 micro-batches (the loss is averaged over the step's tokens), and
    gradient checkpointing recomputes the same activations (and the same LoRA dropout masks)."""
    dense, tok = stories
    pruned, _ = amp20
    student64, teacher64 = copy.deepcopy(pruned).double(), copy.deepcopy(dense).double()
    run = dict(data=str(TINYSTORIES_TEXT), tokens=3 * 2 * SEQ, tokenizer=tok, seq_len=SEQ, val_tokens=2 * SEQ,
               progress=False, lr=1e-3)
    plain = recover(copy.deepcopy(student64), teacher64, batch_size=2, **run).model
    accumulated = recover(copy.deepcopy(student64), teacher64, batch_size=1, grad_accum=2, **run).model
    for a, b in zip(plain.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    lora = recover(copy.deepcopy(pruned), dense, method="lora", batch_size=2, **run).model
    checkpointed = recover(copy.deepcopy(pruned), dense, method="lora", batch_size=2, gradient_checkpointing=True,
                           **run).model
    for a, b in zip(lora.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not checkpointed.is_activation_checkpointing


def test_bf16_autocast_trains_with_float32_weights_and_losses(stories, amp20):
    dense, tok = stories
    pruned, _ = amp20
    result = recover(copy.deepcopy(pruned), dense, data=str(TINYSTORIES_TEXT), tokens=4 * 2 * SEQ, tokenizer=tok,
                     bf16=True, lr=5e-4, patience=None, **QUICK)
    assert result.record["objective"]["bf16_autocast"]
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert result.record["after"]["kl"] < result.record["before"]["kl"]


# -- data ----------------------------------------------------------------------------


def test_self_data_is_sampled_from_the_teacher(stories):
    dense, tok = stories
    data = load_recovery_data("self", tok, seq_len=SEQ, tokens=3 * SEQ, val_tokens=SEQ, teacher=dense)
    assert data.train_ids.shape == (3, SEQ) and data.val_ids.shape == (1, SEQ)
    assert (data.train_ids[:, 0] == tok.bos_token_id).all()
    assert "teacher-generated" in data.description["kind"]
    again = load_recovery_data("self", tok, seq_len=SEQ, tokens=3 * SEQ, val_tokens=SEQ, teacher=dense)
    assert data.hash == again.hash
    with pytest.raises(SecateursError, match="teacher"):
        load_recovery_data("self", tok, seq_len=SEQ, tokens=3 * SEQ, val_tokens=SEQ)
    fixed = load_recovery_data("self", tok, seq_len=SEQ, tokens=9 * SEQ, val_tokens=SEQ, teacher=dense, self_samples=4)
    assert fixed.hash == data.hash  # the same 4 samples (cached), not 10: the budget goes over them 3 times
    with pytest.raises(SecateursError, match="above the 1 validation"):
        load_recovery_data("self", tok, seq_len=SEQ, tokens=3 * SEQ, val_tokens=SEQ, teacher=dense, self_samples=1)



def test_alpaca_learns_the_response_only(stories, tmp_path):
    _, tok = stories
    record = {"instruction": "Tell a story", "input": "about a cat", "output": "The cat sat on the mat."}
    ids, labels = alpaca_stream([record], tok)
    prompt = tok(alpaca_prompt(record))["input_ids"]
    response = tok(record["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == prompt + response
    assert labels == [IGNORE_INDEX] * len(prompt) + response
    assert alpaca_prompt(record).endswith("### Input:\nabout a cat\n\n### Response:\n")
    assert "### Input" not in alpaca_prompt({"instruction": "Say hi", "input": "", "output": "hi"})
    # through the loader: packed sequences keep exactly the response tokens as targets
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(record) for _ in range(12)) + "\n")
    data = load_recovery_data(str(path), tok, seq_len=len(ids), tokens=1000, val_tokens=len(ids))
    assert data.train_ids.shape[1] == len(ids) and data.val_ids.shape[0] == 1
    for row_ids, row_labels in zip(data.train_ids, data.train_labels):
        assert row_labels.tolist() == labels and row_ids.tolist() == ids
    assert "response" in data.description["kind"]


def test_text_is_packed_into_full_sequences_with_a_held_out_slice(stories):
    _, tok = stories
    data = load_recovery_data(str(TINYSTORIES_TEXT), tok, seq_len=SEQ, tokens=10_000, val_tokens=3 * SEQ, seed=5)
    assert data.val_ids.shape == (3, SEQ) and data.train_ids.shape[1] == SEQ
    assert (data.train_labels == data.train_ids).all()
    train_rows = {tuple(r.tolist()) for r in data.train_ids}
    assert not any(tuple(r.tolist()) in train_rows for r in data.val_ids)
    assert data.hash == load_recovery_data(str(TINYSTORIES_TEXT), tok, seq_len=SEQ, tokens=10_000,
                                           val_tokens=3 * SEQ, seed=5).hash


# -- refusals: a clear error, nothing written --------------------------------------


def _refuses(tmp_path, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(SecateursError, match=match):
        recover(out=out, **kwargs)
    assert not out.exists() and not (tmp_path / "out.checkpoints").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_bad_inputs_are_refused_before_any_work(stories, amp20, tmp_path):
    dense, tok = stories
    pruned, plan = amp20
    base = dict(student=copy.deepcopy(pruned), teacher=dense, data=str(TINYSTORIES_TEXT), tokens=1024, tokenizer=tok,
                teacher_tokenizer=tok, plan=plan, **QUICK)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time")
    _refuses(tmp_path, "not found", **{**base, "data": str(tmp_path / "missing.txt")})
    _refuses(tmp_path, "fewer than one sequence", **{**base, "data": str(empty)})
    _refuses(tmp_path, "fewer than one sequence", **{**base, "data": str(short)})
    _refuses(tmp_path, "too few", **{**base, "val_tokens": 100 * SEQ})
    for tokens in (0, -5, 1.5):
        _refuses(tmp_path, "positive integer", **{**base, "tokens": tokens})
    _refuses(tmp_path, "distils from a teacher", **{**base, "teacher": None, "objective": "kd"})
    other_vocab = AutoModelForCausalLM.from_config(copy.deepcopy(dense.config).__class__(
        **{**dense.config.to_dict(), "vocab_size": 600}))
    _refuses(tmp_path, "vocabulary", **{**base, "teacher": other_vocab})
    other_family = tiny_model("phi", vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2).float()
    _refuses(tmp_path, "phi model", **{**base, "teacher": other_family})
    other_tok = copy.deepcopy(tok)
    other_tok.add_tokens(["zzqqxx"])
    _refuses(tmp_path, "tokenizer differs", **{**base, "teacher_tokenizer": other_tok})
    _refuses(tmp_path, "evaluation text", **{**base, "evaluation_files": [str(TINYSTORIES_TEXT)]})
    copy_of_eval = tmp_path / "copy.txt"
    copy_of_eval.write_bytes(TINYSTORIES_TEXT.read_bytes())
    _refuses(tmp_path, "same content", **{**base, "evaluation_files": [str(copy_of_eval)]})
    story = TINYSTORIES_TEXT.read_text()
    excerpt = tmp_path / "excerpt.txt"  # an evaluation text the data holds part of
    excerpt.write_text(story[len(story) // 3: 2 * len(story) // 3])
    _refuses(tmp_path, "contains the evaluation text", **{**base, "evaluation_files": [str(excerpt)]})
    as_jsonl = tmp_path / "stories.jsonl"  # the evaluation text under another name and format
    as_jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in story.split("\n\n") if p.strip()))
    _refuses(tmp_path, "contains the evaluation text", **{**base, "data": str(as_jsonl),
                                                          "evaluation_files": [str(TINYSTORIES_TEXT)]})
    _refuses(tmp_path, "learning rate", **{**base, "lr": -1.0})
    _refuses(tmp_path, "data_offset must be an integer", **{**base, "data_offset": -1})
    _refuses(tmp_path, "no checkpoint", **{**base, "resume": True})
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        recover(out=existing, **base)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_non_finite_training_is_refused_and_nothing_is_saved(stories, amp20, tmp_path):
    dense, tok = stories
    pruned, plan = amp20
    with pytest.raises(RecoveryError, match="nothing was saved"):
        recover(copy.deepcopy(pruned), dense, data=str(TINYSTORIES_TEXT), tokens=6 * 2 * SEQ, tokenizer=tok,
                plan=plan, out=tmp_path / "out", lr=1e30, max_grad_norm=None, warmup_ratio=0.0, **QUICK)
    assert not (tmp_path / "out").exists()


def test_package_root_exports_recover():
    assert secateurs.recover is recover


# -- CLI -----------------------------------------------------------------------------


def test_cli_recover_writes_a_recovered_folder(stories, amp20, tmp_path, capsys):
    dense, tok = stories
    pruned, plan = amp20
    twin = save_pruned(pruned, plan, tmp_path / "pruned", tokenizer=tok)
    args = ["recover", str(twin), "--teacher", str(STORIES), "--data", str(TINYSTORIES_TEXT),
            "--tokens", str(3 * 2 * SEQ), "--train-length", str(SEQ), "--val-tokens", str(2 * SEQ),
            "--preset", "amp-paper", "--out", str(tmp_path / "rec")]
    assert main(args) == 0
    assert "saved to" in capsys.readouterr().out
    record = json.loads((tmp_path / "rec" / RECOVERY_FILENAME).read_text())
    assert record["parametrisation"]["preset"] == "amp-paper" and record["optimizer"]["lr"] == 3e-4
    AutoModelForCausalLM.from_pretrained(tmp_path / "rec")
    assert main(["report", str(tmp_path / "rec"), "--out", str(tmp_path / "page")]) == 0  # the recovery shows in
    page = (tmp_path / "page" / "report.md").read_text()  # the report: its table and its curve
    assert "### Recovery" in page and "| tokens trained | 384 |" in page and "recovery_curve.png" in page
    assert (tmp_path / "page" / "recovery_curve.png").read_bytes()[:4] == b"\x89PNG"
    record["curves"]["val"][1]["loss"] = float("nan")  # a damaged record is refused, not plotted
    (tmp_path / "rec" / RECOVERY_FILENAME).write_text(json.dumps(record))
    assert main(["report", str(tmp_path / "rec"), "--out", str(tmp_path / "page2")]) == 2
    assert "holds NaN" in capsys.readouterr().err and not (tmp_path / "page2").exists()
    assert main(args) == 2  # the output exists now
    assert main([*args[:-1], str(tmp_path / "rec3"), "--tokens", "0"]) == 2  # checked when parsed
    assert main([*args[:-1], str(tmp_path / "rec2"), "--ppl", str(TINYSTORIES_TEXT)]) == 2  # data = evaluation text
    assert "evaluation text" in capsys.readouterr().err
    assert not (tmp_path / "rec2").exists()


def test_cli_recover_reports_perplexity_before_and_after_as_measured_apart(stories, amp20, tmp_path, capsys):
    """`recover --ppl TEXT` prints the perplexity of the pruned model and of the saved recovered
    model on TEXT, the numbers `perplexity` gives each of them on its own, and says on stderr what it
    measures while it does (on a real model each measurement takes minutes)."""
    dense, tok = stories
    pruned, plan = amp20
    twin = save_pruned(pruned, plan, tmp_path / "pruned", tokenizer=tok)
    wikitext = WIKITEXT_HEAD
    assert main(["recover", str(twin), "--teacher", str(STORIES), "--data", str(TINYSTORIES_TEXT),
                 "--tokens", str(2 * 2 * SEQ), "--train-length", str(SEQ), "--val-tokens", str(2 * SEQ),
                 "--ppl", str(wikitext), "--ppl-tokens", "1024", "--out", str(tmp_path / "rec")]) == 0
    captured = capsys.readouterr()
    line = next(x for x in captured.out.splitlines() if x.startswith("perplexity on"))
    before, after = (float(x) for x in line.rsplit(": ", 1)[1].split(" -> "))
    ids = tok(wikitext.read_text(), return_tensors="pt").input_ids[0][:1024]
    for folder, printed in (("pruned", before), ("rec", after)):
        measured = perplexity(load_pruned(tmp_path / folder), tok, "", seq_len=128, ids=ids, progress=False)
        assert measured["perplexity"] == pytest.approx(printed, abs=0.006), folder
    assert before != after
    record = json.loads((tmp_path / "rec" / RECOVERY_FILENAME).read_text())
    assert record["data"]["evaluation_overlap"] == [{"file": "wiki.test.raw", "ngram": 13, "shared_fraction": 0.0,
                                                        "evaluated_tokens": 1024}]
    assert record["allocator"]["retained"] is True  # a CPU run keeps freed memory (secateurs.recovery.allocator)
    for when in ("before", "after"):
        assert f"perplexity on wiki.test.raw {when} recovery (seq 128, first 1,024 tokens) ... done in" in captured.err


def test_recover_places_teacher_and_student_with_accelerate(stories, amp20, tmp_path, capsys, monkeypatch):
    """--device-map places the teacher (here half its layers offloaded to disk), --student-device-map
    the student (a CPU map): the recovered weights equal those of the run without maps (same seed,
    same data). A student map that offloads is refused before training, nothing written."""
    dense, tok = stories
    pruned, plan = amp20
    twin = save_pruned(pruned, plan, tmp_path / "pruned", tokenizer=tok)
    base = ["recover", str(twin), "--teacher", str(STORIES), "--data", str(TINYSTORIES_TEXT),
            "--tokens", str(2 * 2 * SEQ), "--train-length", str(SEQ), "--val-tokens", str(2 * SEQ),
            "--dtype", "float32"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    layers = {f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(5)}
    offloading = json.dumps({"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "model.rotary_emb": "cpu",
                             "lm_head": "cpu"})
    on_cpu = json.dumps({"model": "cpu", "lm_head": "cpu"})
    placed = ["--device-map", offloading, "--offload-folder", str(tmp_path / "offload"), "--student-device-map", on_cpu]

    loaded, real_load = [], secateurs.storage.loading.load_model
    monkeypatch.setattr(secateurs.storage.loading, "load_model",
                        lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    assert main([*base, *placed, "--out", str(tmp_path / "placed")]) == 0
    (student, _), (teacher, _) = loaded
    assert (set(getattr(student, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
            and not has_offloaded_weights(student))
    assert "disk" in teacher.hf_device_map.values() and has_offloaded_weights(teacher)
    monkeypatch.undo()
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    mapped = load_file(tmp_path / "placed" / "model.safetensors")
    assert plain.keys() == mapped.keys() and all(torch.equal(plain[k], mapped[k]) for k in plain)
    assert not torch.equal(plain["model.layers.0.mlp.down_proj.weight"], pruned.model.layers[0].mlp.down_proj.weight)
    capsys.readouterr()
    refused = [*base, "--student-device-map", offloading, "--offload-folder", str(tmp_path / "offload2"),
               "--out", str(tmp_path / "refused")]
    assert main(refused) == 2
    assert "offloads some of its weights" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_prune_recover_is_prune_then_recover_in_one_command(tmp_path, capsys):
    """`prune --recover` saves what `prune` then `recover` save: the same plan, the same recovered
    weights (same seed, same data), so one command equals the two."""
    calib = ["--calib", str(TINYSTORIES_TEXT), "--calib-samples", "8", "--calib-length", str(SEQ)]
    recovery = ["--data", str(TINYSTORIES_TEXT), "--tokens", str(3 * 2 * SEQ), "--train-length", str(SEQ),
                "--val-tokens", str(2 * SEQ), "--lr", "5e-4"]
    prune_args = ["prune", str(STORIES), "--method", "amp", "--ratio", "0.2", *calib]
    assert main([*prune_args, "--recover", *recovery, "--out", str(tmp_path / "one")]) == 0
    assert main([*prune_args, "--out", str(tmp_path / "pruned")]) == 0
    assert main(["recover", str(tmp_path / "pruned"), "--teacher", str(STORIES), *recovery,
                 "--out", str(tmp_path / "two")]) == 0
    one, two = load_pruned(tmp_path / "one"), load_pruned(tmp_path / "two")
    assert (tmp_path / "one" / PLAN_FILENAME).read_text() == (tmp_path / "two" / PLAN_FILENAME).read_text()
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        assert torch.equal(a, b), name
    pruned = load_pruned(tmp_path / "pruned")
    assert not torch.equal(_logits(one, _ids()), _logits(pruned, _ids()))  # it did train
    assert json.loads((tmp_path / "one" / RECOVERY_FILENAME).read_text())["tokens"]["trained"] == 3 * 2 * SEQ
    capsys.readouterr()
    assert main([*prune_args, *recovery, "--out", str(tmp_path / "three")]) == 2  # options without --recover
    assert "apply with --recover" in capsys.readouterr().err
    assert main([*prune_args, "--recover", "--streamed", "--out", str(tmp_path / "four")]) == 2
    assert "in memory" in capsys.readouterr().err
    assert not (tmp_path / "three").exists() and not (tmp_path / "four").exists()
    # prune's own options reach the pruning step too (--reconstruct was once dropped on this path)
    assert main([*prune_args, "--reconstruct", "--recover", *recovery, "--out", str(tmp_path / "five")]) == 0
    assert PruningPlan.load(tmp_path / "five").provenance["reconstruction"]


def test_consensus_recovers_between_removals_and_rescores_the_recovered_model(stories, tmp_path, capsys):
    """Consensus's pipeline: remove a layer, recover, re-score on the recovered model. Round 2's
    scores differ from plain iterative removal (which scores the dense model with layers skipped),
    the plan names original layers, and recovery.json holds both rounds end to end."""
    depth = ["prune", str(STORIES), "--method", "consensus", "--layers", "2", "--iterative", "--metrics",
             "cosine,angular", "--calib", str(TINYSTORIES_TEXT), "--calib-samples", "8", "--calib-length", str(SEQ)]
    recovery = ["--data", str(TINYSTORIES_TEXT), "--tokens", str(2 * 2 * 2 * SEQ), "--train-length", str(SEQ),
                "--val-tokens", str(2 * SEQ), "--lr", "1e-3"]
    assert main([*depth, "--recover", *recovery, "--out", str(tmp_path / "rec")]) == 0
    assert main([*depth, "--out", str(tmp_path / "plain")]) == 0
    plan = PruningPlan.load(tmp_path / "rec")
    plain = PruningPlan.load(tmp_path / "plain")
    removed = plan.provenance["layers_removed"]
    assert len(removed) == 2 and [lp.index for lp in plan.layers if lp.removed] == removed
    first, second = plan.provenance["rounds"]
    assert first["table"] == plain.provenance["rounds"][0]["table"]  # round 1 scores the dense model: the same
    assert first["removed"] == plain.provenance["rounds"][0]["removed"]
    assert {row["layer"] for row in second["table"]} == {row["layer"] for row in first["table"]} - set(first["removed"])
    plain_second = {row["layer"]: row["scores"] for row in plain.provenance["rounds"][1]["table"]}
    assert any(row["scores"] != plain_second[row["layer"]] for row in second["table"])  # scored after recovery
    record = json.loads((tmp_path / "rec" / RECOVERY_FILENAME).read_text())
    assert [r["tokens"]["trained"] for r in record["rounds"]] == [2 * 2 * SEQ, 2 * 2 * SEQ]
    assert [r["tokens"]["data_offset"] for r in record["rounds"]] == [0, 2 * 2]  # round 2 trains on new text
    tokens = [p["tokens"] for p in record["curves"]["val"]]
    assert tokens == sorted(tokens) and tokens[-1] == 2 * 2 * 2 * SEQ
    model = load_pruned(tmp_path / "rec")
    assert len(model.model.layers) == 3
    # the chosen layers re-apply to the dense model (README's two-step recipe): `--plan` of the recovered
    # folder removes the same layers from the dense weights, not the recovered ones, and recovers once
    assert main(["prune", str(STORIES), "--plan", str(tmp_path / "rec"), "--out", str(tmp_path / "again")]) == 0
    expected = apply_plan(copy.deepcopy(stories[0]), plan).state_dict()
    again = load_pruned(tmp_path / "again").state_dict()
    assert again.keys() == expected.keys() and all(torch.equal(again[k], expected[k]) for k in expected)
    assert plan.provenance["recovered_between_removals"] is True
    reapplied = PruningPlan.load(tmp_path / "again").provenance  # its weights were not recovered between removals
    assert reapplied["recovered_between_removals"] is False and reapplied["chosen_recovering_between_removals"]
    assert main(["prune", str(STORIES), "--plan", str(tmp_path / "rec"), "--streamed", "--out",
                 str(tmp_path / "again-streamed")]) == 0  # the streamed path re-applies it the same way
    streamed = PruningPlan.load(tmp_path / "again-streamed").provenance
    assert streamed["recovered_between_removals"] is False and streamed["chosen_recovering_between_removals"]
    weight = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(again[weight], model.state_dict()[weight])  # the recovered run's weights stay there
    assert main(["prune", str(STORIES), "--plan", str(tmp_path / "rec"), "--recover", *recovery, "--out",
                 str(tmp_path / "again-recovered")]) == 0
    once = json.loads((tmp_path / "again-recovered" / RECOVERY_FILENAME).read_text())
    assert once["tokens"]["trained"] == 2 * 2 * 2 * SEQ and "rounds" not in once  # the whole budget, one run
    assert [lp.index for lp in PruningPlan.load(tmp_path / "again-recovered").layers if lp.removed] == removed
    capsys.readouterr()
    assert main([*depth[:4], "amp", *depth[5:], "--recover", "--out", str(tmp_path / "x")]) == 2


def test_consensus_rounds_validate_as_often_as_one_run_of_the_budget(stories, monkeypatch):
    """k rounds of B/k tokens validate at one run's interval over B (about ten times in all, plus each
    round's before and after), not ten times per round; an explicit eval_every still rules. The data
    file is tokenised once for all rounds."""
    model, tok = stories
    reads, read = [], recovery_data._read_source

    def counted_read(spec, *args, **kwargs):
        reads.append(spec)
        return read(spec, *args, **kwargs)

    monkeypatch.setattr(recovery_data, "_read_source", counted_read)
    steps = 40  # the whole budget: 40 steps of 2 x SEQ tokens, so one run would validate every 4 steps

    def validations(**recovery):
        _, _, record = prune_depth_recovering(
            copy.deepcopy(model), tok, "consensus", options=DepthOptions(layers=2, metrics=["cosine", "angular"]),
            calibration=str(TINYSTORIES_TEXT), calibration_options={"num_samples": 8, "max_length": SEQ},
            recovery=RecoverySettings(data=str(TINYSTORIES_TEXT), tokens=steps * 2 * SEQ, seq_len=SEQ, batch_size=2,
                                      val_tokens=2 * SEQ, patience=None, **recovery), progress=False)
        return [p["step"] for p in record["curves"]["val"]]

    assert whole_budget_interval(RecoverySettings(tokens=steps * 2 * SEQ, seq_len=SEQ, batch_size=2)) == 4
    assert validations() == [0, 4, 8, 12, 16, 20] * 2  # each round: before, then every 4 of its 20 steps
    assert reads == [str(TINYSTORIES_TEXT)]
    assert validations(eval_every=10) == [0, 10, 20] * 2
