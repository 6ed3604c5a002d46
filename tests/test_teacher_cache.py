"""The teacher-logit cache (secateurs.recovery.teacher_cache, cached_teacher): with K = the vocabulary the
cached loss is the live teacher's, value and gradient; with K < vocabulary it differs by the stated bound;
a cache made for another run, or changed after it was written, is refused; an interrupted write resumes
to the identical cache; `recover --teacher-cache` trains stories260K with no teacher loaded."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import STORIES, TINYSTORIES_TEXT, WIKITEXT_HEAD
from safetensors.torch import load_file, save_file

import secateurs.storage.loading
from secateurs.cli.main import main
from secateurs.errors import SecateursError
from secateurs.methods import prune
from secateurs.recovery import RECOVERY_FILENAME, recover
from secateurs.recovery import teacher_cache as writer
from secateurs.recovery.cached_teacher import (
    MANIFEST,
    TeacherCacheError,
    drawn_sequences,
    file_sha256,
    open_teacher_cache,
)
from secateurs.recovery.data import load_recovery_data
from secateurs.recovery.objectives import Objective, chunked_loss, top_k_terms
from secateurs.recovery.settings import RecoverySettings, TeacherLogitsSettings
from secateurs.recovery.teacher_cache import PAD_LOG_PROBABILITY, sampled_rows, top_k_rows, write_teacher_logits
from secateurs.storage.loading import load_model
from secateurs.storage.pruned import save_pruned

SEQ, TOKENS, VAL = 64, 512, 128
DATA = dict(data=str(TINYSTORIES_TEXT), tokens=TOKENS, val_tokens=VAL, seq_len=SEQ)


@pytest.fixture(scope="module")
def stories64():
    return load_model(str(STORIES), dtype="float64")


def _student(dense, seed: int = 0):
    student = copy.deepcopy(dense)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.02)
    return student


def _cache(teacher, tok, folder, **changes):
    settings = TeacherLogitsSettings(**{**DATA, "shard_sequences": 3, **changes})
    return write_teacher_logits(teacher, tok, settings, folder, progress=False)


def _run(folder, **changes):
    return RecoverySettings(**{**DATA, "teacher_cache": str(folder), **changes})


def _data(tok, **changes):
    s = {**DATA, **changes}
    return load_recovery_data(s["data"], tok, seq_len=s["seq_len"], tokens=s["tokens"], val_tokens=s["val_tokens"])


@pytest.mark.parametrize("temperature, kd_ratio", [(1.0, 1.0), (2.0, 0.7)])
def test_a_full_vocabulary_cache_gives_the_live_teachers_loss_and_gradients(stories64, tmp_path, temperature,
                                                                            kd_ratio):
    dense, tok = stories64
    student = _student(dense)
    folder = _cache(dense, tok, tmp_path / "c", top_k=512, temperature=temperature, cache_dtype="float32",
                    selection="top-k")
    data = _data(tok)
    cache = open_teacher_cache(_run(folder, temperature=temperature, kd_ratio=kd_ratio), data, student, dense,
                               None, tok)
    rows = drawn_sequences(len(data.train_ids), 0, TOKENS // SEQ)[:3]
    ids, labels = data.train_ids[rows], data.train_labels[rows]
    objective = Objective("kd", kd_ratio, temperature, chunk_rows=37)
    results = []
    for teacher in (dense, cache):
        student.zero_grad(set_to_none=True)
        sums = chunked_loss(student.requires_grad_(True), teacher, ids, labels, objective, scale=0.01)
        results.append((sums["loss"], [p.grad.clone() for p in student.parameters()]))
    (live, live_grads), (cached, cached_grads) = results
    assert cached == pytest.approx(live, rel=1e-7)  # float32 log-probabilities of a float64 teacher
    for a, b in zip(live_grads, cached_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))


def test_top_k_loss_is_below_the_full_kl_by_the_rests_own_kl_and_its_gradient_by_at_most_twice_the_rest():
    """With p_r the teacher's mass off its top K and p~, q~ both distributions renormalised off the K tokens:
    KL - KL_K = p_r * KL(p~ || q~), so 0 <= KL - KL_K <= p_r * max log(p~ / q~); KL_K grows with K; and
    the gradients with respect to the logits differ by p_r * ||p~ - q~||_1 <= 2 p_r per position."""
    generator = torch.Generator().manual_seed(0)
    z_t = torch.randn(40, 300, generator=generator, dtype=torch.float64) * 3
    z_s = z_t + torch.randn(40, 300, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 300, (40,), generator=generator)
    objective = Objective("kd", 1.0, 1.0)
    full = top_k_rows(z_t, 300, 1.0)
    _, metrics, full_grad = top_k_terms(objective, z_s, full, targets, with_grad=True, with_metrics=True)
    log_p, log_q = torch.log_softmax(z_t, -1), torch.log_softmax(z_s, -1)
    assert metrics["kl"] == pytest.approx(float((log_p.exp() * (log_p - log_q)).sum()), rel=1e-12)
    previous = None
    for k in (1, 8, 64, 299):
        top = top_k_rows(z_t, k, 1.0)
        per_row = [top_k_terms(objective, z_s[i:i + 1], top[i:i + 1], targets[i:i + 1], with_grad=False,
                                with_metrics=True)[1]["kl"] for i in range(40)]
        _, _, grad = top_k_terms(objective, z_s, top, targets, with_grad=True, with_metrics=False)
        off = torch.ones_like(z_t, dtype=torch.bool).scatter_(-1, top.indices, False)
        p_rest = top.rest.exp()
        p_tilde = torch.where(off, log_p - top.rest[:, None], -torch.inf)
        q_tilde = torch.where(off, log_q - torch.logsumexp(log_q.masked_fill(~off, -torch.inf), -1, keepdim=True),
                              -torch.inf)
        rest_kl = torch.where(off, p_tilde.exp() * (p_tilde - q_tilde), 0.0).sum(-1)
        gap = (log_p.exp() * (log_p - log_q)).sum(-1) - torch.tensor(per_row, dtype=torch.float64)
        torch.testing.assert_close(gap, p_rest * rest_kl, rtol=1e-9, atol=1e-12)
        assert (gap >= -1e-12).all()
        assert (gap <= p_rest * torch.where(off, p_tilde - q_tilde, -torch.inf).amax(-1) + 1e-12).all()
        assert ((grad - full_grad).abs().sum(-1) <= 2 * p_rest + 1e-12).all()
        total = sum(per_row)
        assert previous is None or total >= previous - 1e-12
        previous = total


def test_a_sampled_cache_row_is_the_draws_frequencies_and_its_gradient_is_unbiased():
    """A sampled row holds the distinct tokens of K draws at log(count / K) (the rest: the most probable
    undrawn tokens at probability 0, every id once); its gradient is exactly q minus those frequencies, and
    averaged over draws it tends to the live teacher's gradient q - p, which the top-K cache's does not."""
    generator = torch.Generator().manual_seed(0)
    z_t = torch.randn(6, 300, generator=generator, dtype=torch.float64) * 2
    z_s = z_t + torch.randn(6, 300, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 300, (6,), generator=generator)
    objective, draws, rounds = Objective("kd", 1.0, 1.0), 16, 2000
    p, q = torch.softmax(z_t, -1), torch.softmax(z_s, -1)
    mean_grad = torch.zeros_like(z_t)
    for _ in range(rounds):
        row = sampled_rows(z_t, draws, 1.0, generator)
        assert row.indices.shape == (6, draws) and (row.indices.sort(-1).values.diff(dim=-1) > 0).all()
        assert torch.isinf(row.rest).all() and (row.rest < 0).all()
        drawn = row.values > PAD_LOG_PROBABILITY
        counts = torch.where(drawn, row.values.exp() * draws, torch.zeros_like(row.values))
        torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-9)
        torch.testing.assert_close(counts.sum(-1), torch.full((6,), float(draws), dtype=torch.float64))
        frequencies = torch.zeros_like(p).scatter_(-1, row.indices, counts / draws)
        _, _, grad = top_k_terms(objective, z_s, row, targets, with_grad=True, with_metrics=False)
        torch.testing.assert_close(grad, q - frequencies, rtol=0, atol=1e-12)
        mean_grad += grad / rounds
    live = q - p  # the standard error of the mean frequency is at most sqrt(0.25 / (16 * 2000)) = 0.0028
    assert (mean_grad - live).abs().max() < 0.015
    _, _, top_grad = top_k_terms(objective, z_s, top_k_rows(z_t, draws, 1.0), targets, with_grad=True,
                                 with_metrics=False)
    assert (top_grad - live).abs().sum() > 3 * (mean_grad - live).abs().sum()


def test_a_cache_for_another_run_is_refused_naming_what_differs(stories64, tmp_path):
    dense, tok = stories64
    folder = _cache(dense, tok, tmp_path / "c", temperature=2.0)
    student, data = _student(dense), _data(tok)
    open_teacher_cache(_run(folder, temperature=2.0), data, student, dense, None, tok)  # this run's own: accepted
    with pytest.raises(TeacherCacheError, match="its teacher's fingerprint is .*, the teacher given"):
        open_teacher_cache(_run(folder, temperature=2.0), data, student, _student(dense, 1), None, tok)
    with pytest.raises(TeacherCacheError, match="its temperature is 2.0, this run's 1.0"):
        open_teacher_cache(_run(folder), data, student, None, None, tok)
    with pytest.raises(TeacherCacheError, match="its seq_len is 64, this run's 32"):
        open_teacher_cache(_run(folder, temperature=2.0, seq_len=32), _data(tok, seq_len=32), student, None, None,
                           tok)
    other = _data(tok, data=str(WIKITEXT_HEAD))
    with pytest.raises(TeacherCacheError, match="its data hash is"):
        open_teacher_cache(_run(folder, temperature=2.0, data=str(WIKITEXT_HEAD)), other, student, None, None, tok)
    with pytest.raises(TeacherCacheError, match="write it with --tokens 2048 or more"):
        open_teacher_cache(_run(folder, temperature=2.0, tokens=4 * TOKENS), _data(tok, tokens=4 * TOKENS),
                           student, None, None, tok)
    with pytest.raises(SecateursError, match="teacher's hidden states"):
        _run(folder, hidden_weight=1.0)
    with pytest.raises(SecateursError, match="data 'self'"):
        _run(folder, data="self")


def _manifest(folder):
    return json.loads((folder / MANIFEST).read_text())


@pytest.mark.parametrize("damage, match", [
    ("flip a byte of a shard", "differs from what the manifest records"),
    ("a shard name leaving the folder", "not a shard of this cache"),
    ("a shard of NaN, its hash recorded", "not finite"),
    ("a token id past the vocabulary, its hash recorded", "outside the vocabulary"),
    ("a shard removed", "missing"),
    ("the manifest cut short", "not JSON"),
])
def test_a_cache_changed_after_it_was_written_is_refused(stories64, tmp_path, damage, match):
    dense, tok = stories64
    folder = _cache(dense, tok, tmp_path / "c", cache_dtype="float32")
    manifest, shard = _manifest(folder), folder / "train-00001.safetensors"
    if damage == "flip a byte of a shard":
        raw = bytearray(shard.read_bytes())
        raw[-3] ^= 0x40
        shard.write_bytes(bytes(raw))
    elif damage == "a shard name leaving the folder":
        manifest["shards"][1]["file"] = "../train-00001.safetensors"
    elif damage == "a shard removed":
        shard.unlink()
    elif damage == "the manifest cut short":
        (folder / MANIFEST).write_text((folder / MANIFEST).read_text()[:100])
    else:
        tensors = load_file(shard)
        if "NaN" in damage:
            tensors["values"][0, 0] = float("nan")
        else:
            tensors["indices"][0, 0] = 512
        save_file(tensors, shard)
        manifest["shards"][1].update(bytes=shard.stat().st_size, sha256=file_sha256(shard))
    if damage != "the manifest cut short":
        (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TeacherCacheError, match=match):
        open_teacher_cache(_run(folder), _data(tok), _student(dense), None, None, tok)


@pytest.mark.parametrize("selection", ["top-k", "sampled"])
def test_an_interrupted_write_resumes_to_the_identical_cache(stories64, tmp_path, monkeypatch, selection):
    dense, tok = stories64
    whole = _cache(dense, tok, tmp_path / "whole", selection=selection)
    calls = {"n": 0}
    real = writer.shard_tensors

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "shard_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _cache(dense, tok, tmp_path / "cut", selection=selection)
    monkeypatch.setattr(writer, "shard_tensors", real)
    cut = tmp_path / "cut"
    assert len(_manifest(cut)["shards"]) == 2 and not _manifest(cut)["complete"]
    with pytest.raises(TeacherCacheError, match="incomplete"):
        open_teacher_cache(_run(cut), _data(tok), _student(dense), None, None, tok)
    with pytest.raises(SecateursError, match="holds a teacher-logit cache"):
        _cache(dense, tok, cut)
    other = "top-k" if selection == "sampled" else "sampled"
    for change in ({"top_k": 8}, {"selection": other}):
        with pytest.raises(TeacherCacheError, match="other settings"):
            write_teacher_logits(dense, tok, TeacherLogitsSettings(**{**DATA, "shard_sequences": 3,
                                                                      "selection": selection, **change}), cut,
                                 resume=True, progress=False)
    write_teacher_logits(dense, tok, TeacherLogitsSettings(**{**DATA, "shard_sequences": 3, "selection": selection}),
                         cut, resume=True, progress=False)
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in cut.iterdir())
    for name in names:
        if name.endswith(".safetensors") or name == MANIFEST:
            assert (whole / name).read_bytes() == (cut / name).read_bytes(), name
    open_teacher_cache(_run(cut), _data(tok), _student(dense), dense, None, tok)  # every shard passes the checks


def test_recover_from_a_cache_trains_with_no_teacher_loaded(tmp_path, capsys, monkeypatch):
    dense, tok = load_model(str(STORIES), dtype="float32")
    pruned, plan = prune(copy.deepcopy(dense), tok, method="amp", ratio=0.2, calibration=str(TINYSTORIES_TEXT),
                         calibration_options={"num_samples": 8, "max_length": 64}, progress=False)
    twin = save_pruned(pruned, plan, tmp_path / "pruned", tokenizer=tok)
    common = ["--data", str(TINYSTORIES_TEXT), "--tokens", str(TOKENS), "--train-length", str(SEQ),
              "--val-tokens", str(VAL)]
    cache = tmp_path / "cache"
    assert main(["teacher-logits", str(STORIES), *common, "--top-k", "32", "--out", str(cache), "--quiet"]) == 0
    assert _manifest(cache)["complete"] and _manifest(cache)["binding"]["cache_dtype"] == "float16"
    loaded = []
    real = secateurs.storage.loading.load_model

    def recording(source, *args, **kwargs):
        loaded.append(str(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(secateurs.storage.loading, "load_model", recording)
    args = ["recover", str(twin), *common, "--teacher-cache", str(cache), "--out", str(tmp_path / "rec"), "--quiet"]
    assert main(args) == 0
    assert loaded == [str(twin)]  # the student alone: no teacher model
    record = json.loads((tmp_path / "rec" / RECOVERY_FILENAME).read_text())
    assert record["teacher"] is None and record["teacher_cache"]["top_k"] == 32
    assert record["teacher_cache"]["selection"] == "sampled"  # the default
    assert record["objective"]["kind"] == "kd" and record["after"]["kl"] < record["before"]["kl"]
    capsys.readouterr()
    assert main([*args[:-3], "--quiet", "--out", str(tmp_path / "rec2"), "--teacher", str(STORIES)]) == 2
    assert "drop --teacher" in capsys.readouterr().err
    assert main([*args[:-3], "--quiet", "--out", str(tmp_path / "rec3"), "--temperature", "2"]) == 2
    assert "its temperature is 1.0, this run's 2.0" in capsys.readouterr().err
    with pytest.raises(TeacherCacheError, match="the dense model the student was pruned from"):
        recover(copy.deepcopy(pruned), settings=_run(cache), tokenizer=tok, progress=False,
                plan=plan.__class__.from_dict({**plan.to_dict(), "provenance": {**plan.provenance,
                                                                                "base_identity": "0" * 16}}))


def test_prune_recover_trains_from_the_cache_of_the_model_it_prunes(tmp_path, capsys):
    common = ["--data", str(TINYSTORIES_TEXT), "--tokens", str(TOKENS), "--train-length", str(SEQ),
              "--val-tokens", str(VAL), "--quiet"]
    cache = tmp_path / "cache"
    assert main(["teacher-logits", str(STORIES), *common, "--out", str(cache)]) == 0
    assert main(["teacher-logits", str(STORIES), *common, "--out", str(cache)]) == 2  # neither --force nor --resume
    assert "holds a teacher-logit cache" in capsys.readouterr().err
    assert main(["teacher-logits", str(STORIES), *common, "--data", "self", "--out", str(tmp_path / "c2")]) == 2
    assert "'self'" in capsys.readouterr().err
    assert main(["prune", str(STORIES), "--method", "amp", "--ratio", "0.2", "--calib", str(TINYSTORIES_TEXT),
                 "--calib-samples", "8", "--recover", "--teacher-cache", str(cache), *common,
                 "--out", str(tmp_path / "pruned")]) == 0
    record = json.loads((tmp_path / "pruned" / RECOVERY_FILENAME).read_text())
    assert record["teacher_cache"]["path"] == str(cache) and record["after"]["kl"] < record["before"]["kl"]
