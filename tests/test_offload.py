"""Models dispatched by accelerate with layers offloaded to CPU and disk: every kind of method
plans on them exactly as on the model in memory, and the plan is applied shard by shard."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STORIES, TINYSTORIES_TEXT, tiny_model
from transformers import AutoModelForCausalLM

from secateurs.calibration.data import Calibration
from secateurs.cli.main import main
from secateurs.errors import SecateursError
from secateurs.methods import make_plan
from secateurs.runtime.offload import has_offloaded_weights, parse_device_map
from secateurs.storage.checkpoint import prune_checkpoint
from secateurs.storage.loading import load_model
from secateurs.storage.pruned import load_pruned
from secateurs.surgery.apply import apply_plan

# layer 1 on disk, layer 2 in offloaded CPU memory, the rest plain
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
              "lm_head": "cpu"}


def _calibration(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (2, 3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 0, 9:] = 0  # padding must stay out of the statistics on the offloaded path too
    return Calibration([{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask)], {"source": "test"})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    model = tiny_model("llama-gqa")
    model.save_pretrained(root / "dense", max_shard_size="20KB")  # several shards
    return root


def _offloaded(folders):
    model, _ = load_model(str(folders / "dense"), "float64", device_map=DEVICE_MAP,
                          offload_folder=str(folders / "offload"))
    return model


@pytest.mark.parametrize("method, options", [
    ("amp", {"split": "balanced"}), ("flap", {}), ("magnitude", {}), ("wanda-sp", {}),
    ("consensus", {"layers": 1, "metrics": ["cka", "cosine", "bi"]}), ("harp", {"top_layers": 2}),
])
def test_offloaded_model_plans_like_the_model_in_memory(folders, method, options):
    offloaded = _offloaded(folders)
    assert has_offloaded_weights(offloaded)
    assert any(p.device.type == "meta" for p in offloaded.model.layers[1].parameters())
    dense = AutoModelForCausalLM.from_pretrained(folders / "dense", dtype=torch.float64).eval()
    ratio = None if method in ("consensus", "harp") else 0.3
    plans = [make_plan(m, method, ratio, calibration=_calibration(), progress=False, **options)
             for m in (offloaded, dense)]
    a, b = (json.loads(p.to_json()) for p in plans)
    for p in (a, b):
        p.pop("provenance")
    assert a == b


def test_offloaded_plan_is_applied_shard_by_shard_and_reloads(folders, tmp_path):
    offloaded = _offloaded(folders)
    plan = make_plan(offloaded, "flap", 0.3, calibration=_calibration(), progress=False)  # non-uniform, biases
    with pytest.raises(SecateursError, match="prune_checkpoint"):
        apply_plan(offloaded, plan)
    out = prune_checkpoint(folders / "dense", plan, tmp_path / "pruned")
    assert len(list(out.glob("*.safetensors"))) == len(list((folders / "dense").glob("*.safetensors")))
    reference = apply_plan(AutoModelForCausalLM.from_pretrained(folders / "dense", dtype=torch.float64).eval(), plan)

    reloaded = load_pruned(out, dtype=torch.float64)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-12)
    with pytest.raises(SecateursError, match="load_pruned"):  # per-layer shapes: no stock loading, no device map
        load_model(str(out), device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload1"))
    # a uniform result loads offloaded again, through stock from_pretrained
    uniform = make_plan(offloaded, "amp", 0.3, calibration=_calibration(), progress=False)
    out2 = prune_checkpoint(folders / "dense", uniform, tmp_path / "uniform")
    stock, _ = load_model(str(out2), "float64", device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload2"))
    assert has_offloaded_weights(stock)
    expected = apply_plan(AutoModelForCausalLM.from_pretrained(folders / "dense", dtype=torch.float64).eval(), uniform)
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, expected(ids).logits, rtol=0, atol=1e-12)


def test_cli_prune_with_a_device_map_equals_in_memory_prune(tmp_path):
    common = ["--method", "amp", "--ratio", "0.2", "--calib", str(TINYSTORIES_TEXT), "--calib-samples", "8",
              "--split", "balanced", "--reconstruct", "none"]  # amp's defaults need the weights in memory
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(5)}}
    assert main(["prune", str(STORIES), *common, "--out", str(tmp_path / "full")]) == 0
    assert main(["prune", str(STORIES), *common, "--device-map", json.dumps(device_map),
                 "--offload-folder", str(tmp_path / "offload"), "--out", str(tmp_path / "mapped")]) == 0
    full, mapped = tmp_path / "full", tmp_path / "mapped"
    assert json.loads((full / "pruning_plan.json").read_text())["layers"] == \
        json.loads((mapped / "pruning_plan.json").read_text())["layers"]
    assert (full / "model.safetensors").read_bytes() == (mapped / "model.safetensors").read_bytes()


def test_device_map_parsing_and_errors(tmp_path):
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"model": "cpu"}') == {"model": "cpu"}
    f = tmp_path / "map.json"
    f.write_text('{"model": "disk"}')
    assert parse_device_map(str(f)) == {"model": "disk"}
    with pytest.raises(SecateursError, match="JSON"):
        parse_device_map("everywhere")
    with pytest.raises(SecateursError, match="JSON object"):
        parse_device_map("[1, 2]")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")  # refused before it is read
    with pytest.raises(SecateursError, match="GGUF"):
        load_model(str(gguf), device_map="auto")
    assert main(["prune", str(tmp_path), "--device-map", "auto", "--streamed", "--out", str(tmp_path / "o")]) == 2
