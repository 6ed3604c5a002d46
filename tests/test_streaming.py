"""Scale: layer-streamed statistics equal the full-forward ones; sequential mode sees pruned layers
below; interrupted runs resume to the identical plan; checkpoints prune shard by shard."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import STORIES, TINYSTORIES_TEXT, input_ids, padded_calibration, tiny_model
from transformers import AutoModelForCausalLM

from secateurs.adapters import get_adapter
from secateurs.calibration.data import load_calibration
from secateurs.calibration.statistics import collect_statistics
from secateurs.calibration.streaming import streamed_statistics
from secateurs.cli.main import main
from secateurs.methods import make_plan
from secateurs.planning.geometry import identity_plan
from secateurs.storage.checkpoint import CheckpointTensors, load_skeleton, prune_checkpoint
from secateurs.storage.loading import load_tokenizer
from secateurs.storage.pruned import load_pruned
from secateurs.surgery.apply import apply_layer_plan, apply_plan


def _close(a, b):
    for x, y in zip(a.attention + a.mlp, b.attention + b.mlp):
        for name in ("unit_prompt_mean_sum", "unit_token_sum", "channel_sum", "channel_sumsq"):
            torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=1e-9, atol=1e-9)
        assert (x.prompts, x.tokens) == (y.prompts, y.tokens)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2", "gemma2", "phi", "phi3", "mistral"])
def test_streamed_equals_full_forward(name):
    model = tiny_model(name)
    calib = padded_calibration()
    full = collect_statistics(model, calib, progress=False)
    streamed = streamed_statistics(model, calib, progress=False)
    _close(streamed, full)
    assert make_plan(model, "amp", 0.3, statistics=streamed, split="balanced").to_json() == \
        make_plan(model, "amp", 0.3, statistics=full, split="balanced").to_json()


def test_sequential_mode_measures_each_layer_after_the_ones_below_are_pruned():
    model = tiny_model("llama-gqa")
    calib = padded_calibration()
    plan = make_plan(model, "magnitude", 0.3)
    adapter_layers = model.model.layers

    def prune_layer(index, layer, a, m):
        lp = plan.layers[index]
        apply_layer_plan(get_adapter(model), layer, lp, *plan.resolve_layer(lp))

    work = copy.deepcopy(model)
    sequential = streamed_statistics(work, calib, mode="sequential", on_layer=prune_layer, progress=False)
    # layer 2 was measured with layers 0 and 1 pruned (and itself still dense)
    reference = copy.deepcopy(model)
    partial = identity_plan(reference)
    for i in (0, 1):
        partial.layers[i] = copy.deepcopy(plan.layers[i])
    full = collect_statistics(apply_plan(reference, partial), calib, progress=False)
    torch.testing.assert_close(sequential.mlp[2].unit_token_sum, full.mlp[2].unit_token_sum, rtol=1e-9, atol=1e-9)
    dense = collect_statistics(model, calib, progress=False)
    torch.testing.assert_close(sequential.mlp[0].unit_token_sum, dense.mlp[0].unit_token_sum, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(sequential.mlp[2].unit_token_sum, dense.mlp[2].unit_token_sum)
    assert len(adapter_layers) == 4


def test_interrupted_run_resumes_to_the_identical_plan(tmp_path):
    model = tiny_model("qwen3")
    calib = padded_calibration()

    def interrupt(index, layer, a, m):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        streamed_statistics(model, calib, cache_dir=tmp_path, on_layer=interrupt, progress=False)
    assert json.loads((tmp_path / "progress.json").read_text())["layers_done"] == 2
    seen = []
    resumed = streamed_statistics(model, calib, cache_dir=tmp_path, progress=False,
                                  on_layer=lambda i, *rest: seen.append(i))
    assert seen == [2, 3]  # only the unfinished layers ran
    fresh = streamed_statistics(model, calib, progress=False)
    _close(resumed, fresh)
    assert make_plan(model, "amp", 0.25, statistics=resumed, split="balanced").to_json() == \
        make_plan(model, "amp", 0.25, statistics=fresh, split="balanced").to_json()


def test_checkpoint_streaming_and_shard_by_shard_pruning(tmp_path):
    model = tiny_model("llama-gqa", tie_word_embeddings=False)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="40KB")
    files = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(files) > 2
    skeleton, tensors = load_skeleton(src, load_outside_layers=False)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    calib = padded_calibration()
    stats = streamed_statistics(skeleton, calib, checkpoint=tensors, progress=False)
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # every weight released again
    _close(stats, collect_statistics(model, calib, progress=False))
    plan = make_plan(skeleton, "amp", 0.3, statistics=stats)
    plan.layers[1].removed = True
    out = prune_checkpoint(src, plan, tmp_path / "out")
    assert sorted(p.name for p in out.glob("*.safetensors")) == files  # shards like the input's
    expected = apply_plan(copy.deepcopy(model), plan)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(load_pruned(out)(ids).logits, expected(ids).logits, atol=0, rtol=0)


def test_cli_streamed_prune_equals_in_memory_prune(tmp_path):
    common = ["--method", "amp", "--ratio", "0.2", "--calib", str(TINYSTORIES_TEXT), "--calib-samples", "8"]
    assert main(["prune", str(STORIES), *common, "--out", str(tmp_path / "full")]) == 0
    assert main(["prune", str(STORIES), *common, "--streamed", "--scores-cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "streamed")]) == 0
    full, streamed = tmp_path / "full", tmp_path / "streamed"
    assert (full / "model.safetensors").read_bytes() == (streamed / "model.safetensors").read_bytes()
    assert json.loads((full / "pruning_plan.json").read_text())["layers"] == \
        json.loads((streamed / "pruning_plan.json").read_text())["layers"]
    assert main(["prune", str(STORIES), "--streamed", "--method", "amp",
                 "--out", str(tmp_path / "no")]) == 2  # no --calib


@pytest.mark.parametrize("method, options", [
    ("consensus", {"layers": 2, "metrics": ["cka", "nll", "bi"]}), ("flap", {}), ("magnitude", {}),
    ("harp", {"top_layers": 2, "alpha_grid": [0.0, 1.0]}),
])
def test_lazy_skeleton_holds_one_decoder_layer_at_a_time(method, options, monkeypatch):
    """On a lazy skeleton, every method reads decoder layers one at a time: never two at once."""
    live: set[str] = set()
    most = [0]
    materialize, release = CheckpointTensors.materialize, CheckpointTensors.release

    def counting_materialize(self, module, prefix, device="cpu", skip=None):
        names = materialize(self, module, prefix, device, skip)
        if prefix.startswith("model.layers."):
            live.add(prefix)
            most[0] = max(most[0], len(live))
        return names

    def counting_release(self, module, names=None):
        release(self, module, names)
        live.difference_update(p for p in list(live) if module is _layer(p))

    skeleton, tensors = load_skeleton(STORIES, load_outside_layers=True, lazy_layers=True)
    layers = skeleton.model.layers

    def _layer(prefix):
        return layers[int(prefix.split(".")[2])]

    monkeypatch.setattr(CheckpointTensors, "materialize", counting_materialize)
    monkeypatch.setattr(CheckpointTensors, "release", counting_release)
    calib = load_calibration(str(TINYSTORIES_TEXT), load_tokenizer(STORIES), num_samples=8, max_length=64)
    stats = None
    if method == "flap":
        stats = streamed_statistics(skeleton, calib, checkpoint=tensors, progress=False)
    make_plan(skeleton, method, 0.2 if method in ("flap", "magnitude") else None, calibration=calib,
              statistics=stats, progress=False, **options)
    assert most[0] == 1 and not live
    assert all(p.device.type == "meta" for layer in layers for p in layer.parameters())
