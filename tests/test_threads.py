"""The thread policy (secateurs.runtime.threads): fixed per kind of work from the process's cores, never from
the load; --threads overrides it; the counts are recorded; outputs are bit-identical across counts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STORIES

from secateurs.calibration import data as calibration
from secateurs.calibration.data import sample_sequences
from secateurs.cli.main import main
from secateurs.files.output import MARKER
from secateurs.runtime import threads
from secateurs.storage.loading import load_model


@pytest.fixture(autouse=True)
def _no_override():
    threads.set_override(None)
    yield
    threads.set_override(None)


def test_counts_per_kind_and_the_override(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = threads.cores()
    assert threads.count("decode") == 1 and threads.count("batched") == cores and threads.count("train") == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a process's share of a shared machine caps "every core"
    assert threads.cores() == 1 and threads.count("train") == 1
    threads.set_override(3)
    assert {threads.count(k) for k in threads.KINDS} == {3}
    assert threads.describe() == {"cores": 1, "override": 3, "decode": 3, "batched": 3, "train": 3}
    with pytest.raises(ValueError):
        threads.set_override(0)
    with pytest.raises(ValueError):
        threads.count("other")


def test_working_sets_and_restores_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads.working("decode") as n:
            assert n == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with threads.working("decode"):
                raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_self_sampling_decodes_on_the_decode_count(monkeypatch, tmp_path):
    model, tokenizer = load_model(str(STORIES))
    seen = []
    real = calibration.sample_sequences

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "sample_sequences", spy)
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    torch.set_num_threads(2)
    calibration.load_calibration("self", tokenizer, model=model, num_samples=2, max_length=8, seed=123)
    assert seen == [1] and torch.get_num_threads() == 2


def test_forward_and_decode_are_bit_identical_across_thread_counts():
    """Why decoding may run on another count than the rest: forward logits and the decode loop give
    the same bits at 1 and 2 threads (stories260K here; SmolLM2 in benchmarks/thread_policy.py).
    Training steps are not compared: their backward reductions may differ in the last bits, so the
    train count is fixed by the cores alone."""
    model, _ = load_model(str(STORIES))
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))

    class Steps:
        def update(self, *a):
            pass

    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                logits = model(ids).logits
            torch.manual_seed(0)
            samples = sample_sequences(model, 1, 4, 16, [], Steps())
            results.append((logits, samples))
    finally:
        torch.set_num_threads(before)
    (l1, s1), (l2, s2) = results
    assert torch.equal(l1, l2) and s1 == s2


def test_the_counts_are_recorded_in_every_output(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["prune", str(STORIES), "--method", "magnitude", "--ratio", "0.2", "--out", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / MARKER).read_text())["threads"]
    assert record == {"cores": threads.cores(), "override": None, "decode": 1, "batched": threads.cores(),
                      "train": threads.cores()}
    assert main(["prune", str(STORIES), "--method", "magnitude", "--ratio", "0.2", "--threads", "1", "--out",
                 str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / MARKER).read_text())["threads"]["override"] == 1
