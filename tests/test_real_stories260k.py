"""The real stories260K model (Llama, GQA 8 query / 4 KV heads): prune with magnitude at 20%,
save, reload, generate, measure perplexity on the TinyStories sample."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import STORIES, TINYSTORIES_TEXT
from transformers import AutoModelForCausalLM

from secateurs.evaluation.perplexity import perplexity, read_text
from secateurs.methods import prune
from secateurs.storage.loading import load_model
from secateurs.storage.pruned import load_pruned, save_pruned


@pytest.fixture(scope="module")
def stories():
    return load_model(str(STORIES), dtype="float32")


def test_dense_model_is_the_real_one(stories):
    model, tokenizer = stories
    ids = tokenizer("", return_tensors="pt").input_ids  # BOS only
    text = tokenizer.decode(model.generate(ids, max_new_tokens=24, do_sample=False)[0], skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little girl named Lily.")


def test_magnitude_20_percent_prune_save_reload_generate(stories, tmp_path, record_property):
    dense, tokenizer = stories
    text = read_text(TINYSTORIES_TEXT)
    dense_ppl = perplexity(dense, tokenizer, text, seq_len=256, progress=False)["perplexity"]
    model, plan = prune(AutoModelForCausalLM.from_pretrained(STORIES).eval(), method="magnitude", ratio=0.2)
    # 20% of all parameters, GQA respected: one whole KV group (2 of 8 heads) and 38 of 172 neurons per layer
    assert plan.pruned_shapes() == [(6, 3, 134)] * 5
    assert plan.provenance["params_before"] == 260_032 and plan.provenance["params_after"] == 208_192
    out = save_pruned(model, plan, tmp_path / "stories-mag20", tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # stock loader (exported as Mistral)
    assert json.loads((out / "config.json").read_text())["secateurs"]["stock_loadable"] is True
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    also = load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(also(ids).logits, model(ids).logits, atol=0, rtol=0)
    generated = reloaded.generate(ids, max_new_tokens=20, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 20
    assert len(tokenizer.decode(generated[0, ids.shape[1]:]).strip()) > 0
    pruned_ppl = perplexity(reloaded, tokenizer, text, seq_len=256, progress=False)["perplexity"]
    record_property("stories260k_ppl_dense", dense_ppl)
    record_property("stories260k_ppl_magnitude20", pruned_ppl)
    print(f"stories260K TinyStories ppl (seq 256): dense {dense_ppl:.3f}, magnitude 20% {pruned_ppl:.3f}")
    assert 5 < dense_ppl < 7  # the real model (random init scores about 520)
    assert math.isfinite(pruned_ppl) and dense_ppl < pruned_ppl < 520


def test_magnitude_beats_random_on_average(stories):
    """A weak but real property of the criterion on real weights: it beats chance."""
    dense, tokenizer = stories
    text = read_text(TINYSTORIES_TEXT)

    def ppl(method, seed=0):
        model, _ = prune(AutoModelForCausalLM.from_pretrained(STORIES).eval(), method=method, ratio=0.2, seed=seed)
        return perplexity(model, tokenizer, text, seq_len=256, progress=False)["perplexity"]

    random_mean = sum(ppl("random", s) for s in range(3)) / 3
    assert ppl("magnitude") < random_mean
