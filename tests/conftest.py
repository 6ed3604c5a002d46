"""Shared fixtures: tiny random models of every family (float64, built from configs, offline),
the real stories260K model, and a masking reference for exactness tests.

Data: tests/data (in the repository) holds the stories260K model and the small texts and task excerpts
the tests read. Bigger assets (whole evaluation files) come from $SECATEURS_ASSETS, else ../shared/assets
beside the repository; a test that needs one is marked `shared_asset(path)` and skips, saying which file
it needs, where that file is absent. Capability markers skip, with the reason, where the machine lacks
the capability: `cuda` (a CUDA device), `llama_cpp` (llama-cpp-python importable), `glibc` (glibc >= 2.33).
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import os
import platform
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from secateurs.adapters import get_adapter
from secateurs.calibration.data import Calibration

DATA = Path(__file__).resolve().parent / "data"  # in the repository: tests/data/README.md lists every file
ASSETS = Path(os.environ.get("SECATEURS_ASSETS") or Path(__file__).resolve().parents[2] / "shared" / "assets")
STORIES = DATA / "stories260K-hf"
TINYSTORIES_TEXT = DATA / "tinystories" / "tinystories_sample.txt"
WIKITEXT_HEAD = DATA / "wikitext-2-raw" / "wiki.test.raw"  # the first 21 lines of WikiText-2 test (8 KB)
C4_HEAD = DATA / "c4" / "c4_sample.jsonl"  # the first 5 documents of C4 en train shard 00000
TASKS = DATA / "commonsense"  # the first 20 rows of each standard task, llm-foundry format
WIKITEXT = ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw"  # the whole WikiText-2 test split (1.3 MB)
CUDA = torch.cuda.is_available()
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str):
    """A script of benchmarks/ imported as a module (its folder on the path while it loads, for its `common`)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
               max_position_embeddings=128, tie_word_embeddings=False)

# name -> (model_type, config overrides). Shapes chosen to exercise GQA, biases, head_dim != hidden/heads,
# partial rotary, fused projections and sliding windows.
FAMILIES = {
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8)),
    "llama-bias": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "mistral": ("mistral", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=4, sliding_window=6)),
    "qwen2": ("qwen2", dict(num_attention_heads=8, num_key_value_heads=2, use_sliding_window=True,
                            sliding_window=6, max_window_layers=2)),
    "qwen3": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8)),
    "gemma2": ("gemma2", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                              query_pre_attn_scalar=16, final_logit_softcapping=30.0,
                              attn_logit_softcapping=50.0, tie_word_embeddings=True)),
    "phi": ("phi", dict(num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5)),
    "phi3": ("phi3", dict(num_attention_heads=8, num_key_value_heads=4, pad_token_id=0)),
}


def tiny_config(name: str, **overrides):
    model_type, kwargs = FAMILIES[name]
    return AutoConfig.for_model(model_type, **{**_COMMON, **kwargs, **overrides})


def tiny_model(name: str, seed: int = 0, **overrides):
    """A random float64 model of the family; biases and norm weights randomised too, so that
    slicing mistakes cannot hide behind zeros and ones."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, **overrides), dtype=torch.float64)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0 if "bias" in n else 1))
    return model.eval()


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


class SkipLayer(nn.Module):
    """Stands in for a removed decoder layer in the dense reference: its output is discarded.
    It still runs, so its KV-cache slot fills as in the dense model (masks for sliding-window
    layers are built from the first such slot)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, *args, **kwargs):
        self.layer(hidden_states, *args, **kwargs)
        return hidden_states


@torch.no_grad()
def masked_reference(model, plan):
    """The dense model with the plan's removed structures masked: o_proj input columns of removed
    heads and down_proj input columns of removed neurons zeroed, removed layers skipped, the output
    of a removed MLP zeroed by a hook."""
    ref = copy.deepcopy(model)
    adapter = get_adapter(ref)
    layers = adapter.decoder_layers(ref)
    for lp in plan.layers:
        layer = layers[lp.index]
        if lp.removed:
            layers[lp.index] = SkipLayer(layer)
            continue
        heads, _, neurons = plan.resolve_layer(lp)
        d = adapter.head_dim(layer)
        o = adapter.attention_output_linear(layer).weight
        for h in set(range(o.shape[1] // d)) - set(heads):
            o[:, h * d:(h + 1) * d] = 0
        down = adapter.mlp_output_linear(layer).weight
        dropped = sorted(set(range(down.shape[1])) - set(neurons))
        down[:, dropped] = 0
        if lp.mlp is not None:  # the whole block's output, biases included
            adapter.mlp(layer).register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    return ref


def input_ids(batch: int = 2, length: int = 12, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded_calibration(seed: int = 0) -> Calibration:
    """Two batches with right padding (lengths 7, 4, 10 and 3) over a 64-token vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for lengths in ([7, 4], [10, 3]):
        width = max(lengths)
        ids = torch.randint(1, 64, (len(lengths), width), generator=gen)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            mask[row, :n] = 1
            ids[row, n:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return Calibration(batches, {"source": "test"}, "h")


def asset_missing(path: str | Path) -> str | None:
    """Why a bigger asset (a path under ASSETS, or relative to it) cannot be read here (None when it can)."""
    path = ASSETS / path
    if path.exists():
        return None
    if not path.is_relative_to(ASSETS):
        return f"needs {path}"
    return f"needs ../shared/assets/{path.relative_to(ASSETS)}; set SECATEURS_ASSETS (looked in {ASSETS})"


@functools.cache
def _llama_cpp_missing() -> str | None:
    """Why llama-cpp-python cannot be used here (None when it imports)."""
    try:
        importlib.import_module("llama_cpp")
    except Exception as exc:  # noqa: BLE001 - a missing package or a build that fails to load: both skip
        return f"needs llama-cpp-python (pip install -e '.[serve]'): import llama_cpp failed: {exc}"
    return None


def _glibc_missing() -> str | None:
    """Why glibc's malloc tuning and mallinfo2 (glibc >= 2.33) cannot be used here (None when they can)."""
    name, version = platform.libc_ver()
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if name == "glibc" and numbers >= (2, 33):
        return None
    return f"needs glibc >= 2.33 (mallinfo2); this process runs on {name or 'another C library'} {version}".rstrip()


CAPABILITIES = {  # marker -> why a test so marked cannot run here (None: it can)
    "cuda": lambda: None if CUDA else "needs a CUDA device (torch.cuda.is_available() is False)",
    "llama_cpp": _llama_cpp_missing,
    "glibc": _glibc_missing,
}


def pytest_collection_modifyitems(config, items):
    """Capability and shared_asset markers become skips with the reason where the machine lacks what they name."""
    for item in items:
        for name, missing in CAPABILITIES.items():
            if item.get_closest_marker(name) is not None and (reason := missing()):
                item.add_marker(pytest.mark.skip(reason=reason))
        for marker in item.iter_markers("shared_asset"):
            for reason in filter(None, map(asset_missing, marker.args)):
                item.add_marker(pytest.mark.skip(reason=reason))


def pytest_configure(config):
    """Under pytest-xdist (the README's test command runs `-n auto`), each worker gets its share of the
    cores for torch: with torch's default of one thread per core in every worker, the workers
    oversubscribe the machine and the suite runs slower than in one process."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)  # secateurs.runtime.threads reads a process's share from it
        torch.set_num_threads(share)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/secateurs."""
    old = os.environ.get("SECATEURS_CACHE")
    os.environ["SECATEURS_CACHE"] = str(tmp_path_factory.mktemp("secateurs-cache"))
    yield
    if old is None:
        os.environ.pop("SECATEURS_CACHE", None)
    else:
        os.environ["SECATEURS_CACHE"] = old
