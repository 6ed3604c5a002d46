"""Perplexity: equals a direct float64 computation, honours window lengths and protocols, refuses
windows beyond the model's context, reads WikiText/C4-style sources."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import C4_HEAD, STORIES, TINYSTORIES_TEXT, tiny_model

from secateurs.adapters import get_adapter
from secateurs.calibration.runner import NLL_CHUNK_ROWS, summed_next_token_nll
from secateurs.errors import SecateursError
from secateurs.evaluation.perplexity import evaluate_perplexity, load_text, perplexity, resolve_seq_len
from secateurs.storage.loading import load_model


class CharTokenizer:
    """Token id = byte value % vocab: deterministic, offline, no special tokens."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text, return_tensors=None, verbose=False):
        ids = torch.tensor([[b % self.vocab for b in text.encode()]])
        return type("Enc", (), {"input_ids": ids})()


def direct_nll(model, ids: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """Independent reference: one window at a time, log_softmax in float64, explicit sum."""
    total, count = 0.0, 0
    for w in range(ids.numel() // seq_len):
        window = ids[w * seq_len:(w + 1) * seq_len][None]
        with torch.no_grad():
            logp = torch.log_softmax(model(window).logits[0].double(), dim=-1)
        for t in range(seq_len - 1):
            total -= logp[t, window[0, t + 1]].item()
            count += 1
    return total, count


TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 6


def test_perplexity_equals_direct_computation_and_window_count():
    model = tiny_model("llama-gqa")  # float64, vocab 64, context 128
    tok = CharTokenizer(64)
    ids = tok(TEXT).input_ids[0]
    for seq_len, batch in ((16, 3), (37, 2), (128, 8)):
        r = perplexity(model, tok, TEXT, seq_len=seq_len, batch_size=batch, progress=False)
        total, count = direct_nll(model, ids, seq_len)
        assert r["windows"] == ids.numel() // seq_len
        assert r["tokens"] == count == r["windows"] * (seq_len - 1)
        assert r["nll"] == pytest.approx(total / count, rel=1e-12)
        assert r["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-12)


def test_window_lengths_reach_the_model_and_batches_are_capped():
    model = tiny_model("llama-mha")
    shapes = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: shapes.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape)),
        with_kwargs=True)
    tok = CharTokenizer(64)
    r = perplexity(model, tok, TEXT, seq_len=32, batch_size=8, max_batch_tokens=64, progress=False)
    assert r["batch_size"] == 2  # 64 tokens per batch / 32 per window
    assert all(s[1] == 32 for s in shapes) and max(s[0] for s in shapes) == 2
    assert sum(s[0] for s in shapes) == r["windows"]
    limited = perplexity(model, tok, TEXT, seq_len=32, max_windows=3, progress=False)
    assert limited["windows"] == 3 and limited["tokens"] == 3 * 31
    capped = perplexity(model, tok, TEXT, seq_len=32, max_tokens=100, progress=False)
    assert capped["windows"] == 3  # 100 // 32


def test_protocols_and_context_refusal():
    stories, tok = load_model(str(STORIES), dtype="float32")
    assert resolve_seq_len(stories, "seq128") == ("seq128", 128)
    assert resolve_seq_len(stories, "context") == ("context", 512)
    assert resolve_seq_len(stories, 64) == ("seq64", 64)
    with pytest.raises(SecateursError, match="exceeds the model's context of 512"):
        resolve_seq_len(stories, "seq2048")
    with pytest.raises(SecateursError, match="exceeds the model's context of 512"):
        perplexity(stories, tok, "once upon a time " * 400, seq_len=2048, progress=False)
    with pytest.raises(SecateursError, match="unknown perplexity protocol"):
        resolve_seq_len(stories, "seq-long")
    # several protocols at once: all checked before any work, each result names its protocol
    with pytest.raises(SecateursError, match="512"):
        evaluate_perplexity(stories, tok, "x", ["seq128", "seq2048"], progress=False)
    text = TINYSTORIES_TEXT.read_text()
    rs = evaluate_perplexity(stories, tok, text, ["seq128", "context"], progress=False)
    assert [(r["protocol"], r["seq_len"]) for r in rs] == [("seq128", 128), ("context", 512)]
    n = len(tok(text).input_ids)
    assert [r["windows"] for r in rs] == [n // 128, n // 512]
    assert 5 < rs[0]["perplexity"] < 8  # the real model on its own domain (README: 6.17 at 256)


def test_too_short_text_is_refused():
    model = tiny_model("llama-mha")
    with pytest.raises(SecateursError, match="fewer than one window"):
        perplexity(model, CharTokenizer(64), "short", seq_len=32, progress=False)


def test_sources_wikitext_crlf_and_c4_jsonl(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_bytes(b" = Title = \r\n Line one .\r\n Line two .\r\n")
    text, info = load_text(raw)
    assert text == " = Title = \n Line one .\n Line two .\n" and info["sha256"] and info["name"] == "wiki.test.raw"
    jl = tmp_path / "c4.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "url": "u"}) for t in ("first doc", "second\r\ndoc", "third")))
    text, info = load_text(jl, max_docs=2)
    assert text == "first doc second\ndoc"
    with pytest.raises(SecateursError, match="no string field 'body'"):
        load_text(jl, field="body")
    with pytest.raises(SecateursError, match="not found"):
        load_text(tmp_path / "missing.txt")


def test_real_c4_sample_reads():
    text, info = load_text(C4_HEAD, max_docs=3)
    assert text.startswith("Beginners BBQ Class Taking Place in Missoula!")


def test_one_next_token_nll_on_adapter_logits_equals_the_models_own_loss(family):
    """runner.summed_next_token_nll (used by perplexity, depth scoring and HARP's search) on final-normed
    hidden states through the adapter's logits equals cross-entropy of the model's own forward: family
    quirks (gemma2's soft-capping) come from the adapter, ignored targets are skipped, and rows beyond
    one chunk are scored."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = torch.randint(0, 64, (3, NLL_CHUNK_ROWS // 2 + 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
        targets = ids[:, 1:].clone()
        targets[0, :5] = -1
        expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 64), targets.reshape(-1),
                                                     ignore_index=-1, reduction="sum")
        normed = out.hidden_states[-1][:, :-1]
        got, count = summed_next_token_nll(normed, targets, lambda rows: adapter.logits(model, rows))
        from_logits, _ = summed_next_token_nll(out.logits[:, :-1], targets)
    assert count == targets.numel() - 5 and count > NLL_CHUNK_ROWS
    assert got == pytest.approx(expected.item(), rel=1e-12)
    assert from_logits == pytest.approx(expected.item(), rel=1e-12)


class BosTokenizer(CharTokenizer):
    """CharTokenizer that, like Gemma's, puts its BOS (id 2) before the text."""

    bos_token_id = 2

    def __call__(self, text, return_tensors=None, verbose=False):
        ids = super().__call__(text).input_ids
        return type("Enc", (), {"input_ids": torch.cat([torch.tensor([[self.bos_token_id]]), ids], dim=1)})()


def test_gemma_windows_each_start_with_bos_and_other_families_do_not():
    """Gemma (its adapter's bos_every_window) is measured with its BOS at the start of every window: a window
    is BOS + seq_len - 1 text tokens, and every text token of the window is scored. Llama is unchanged."""
    gemma, tok = tiny_model("gemma2"), BosTokenizer(64)
    text_ids = CharTokenizer(64)(TEXT).input_ids[0]
    seq_len = 16
    r = perplexity(gemma, tok, TEXT, seq_len=seq_len, batch_size=3, progress=False)
    windows = text_ids.numel() // (seq_len - 1)
    total, count = 0.0, 0
    for w in range(windows):
        window = torch.cat([torch.tensor([2]), text_ids[w * (seq_len - 1):(w + 1) * (seq_len - 1)]])
        t, c = direct_nll(gemma, window, seq_len)
        total, count = total + t, count + c
    assert r["windows"] == windows and r["tokens"] == count == windows * (seq_len - 1)
    assert r["window_start_token"] == 2
    assert r["nll"] == pytest.approx(total / count, rel=1e-12)
    llama = tiny_model("llama-gqa")
    plain = perplexity(llama, tok, TEXT, seq_len=seq_len, batch_size=3, progress=False)
    ids = tok(TEXT).input_ids[0]
    assert "window_start_token" not in plain and plain["windows"] == ids.numel() // seq_len
