"""Shared fixtures: tiny random models of every family (float64, built from configs, offline),
the real stories260K model, and a masking reference for exactness tests."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from secateurs.adapters import get_adapter

ASSETS = Path(os.environ.get("SECATEURS_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
STORIES = ASSETS / "models" / "stories260K-hf"
TINYSTORIES_TEXT = ASSETS / "text" / "tinystories" / "tinystories_sample.txt"

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
    heads and down_proj input columns of removed neurons zeroed, removed layers skipped."""
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
    return ref


def input_ids(batch: int = 2, length: int = 12, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


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
