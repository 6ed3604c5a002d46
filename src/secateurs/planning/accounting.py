"""Parameter, FLOP and byte accounting, per layer and in total, before and after pruning.

Counts come from the real modules (meta tensors work, so a 70B config is counted without
weights). Shared parameters (tied embeddings) are counted once. A HARP layer has no token mixing
and no KV cache; a removed MLP has no parameters, no FLOPs and 0 neurons.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from secateurs.adapters import get_adapter
from secateurs.adapters.value_attention import is_replaced


@dataclass
class LayerStats:
    index: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    attention_params: int
    mlp_params: int
    other_params: int
    linear_flops_per_token: int
    attention_flops_per_context_token: int
    kv_cache_bytes_per_token: int

    @property
    def params(self) -> int:
        return self.attention_params + self.mlp_params + self.other_params


@dataclass
class ModelStats:
    total_params: int
    layer_params: int
    weight_bytes: int
    lm_head_flops_per_token: int
    layers: list[LayerStats] = field(default_factory=list)

    def prefill_flops(self, tokens: int) -> int:
        """Forward FLOPs of a causal prefill of `tokens` tokens (token t attends to t+1 positions)."""
        mixing = sum(s.attention_flops_per_context_token for s in self.layers) * tokens * (tokens + 1) // 2
        return tokens * self.linear_flops_per_token + mixing

    def decode_flops_per_token(self, context: int) -> int:
        """FLOPs to produce one token with `context` tokens already in the KV cache."""
        attention = sum(s.attention_flops_per_context_token for s in self.layers)
        return self.linear_flops_per_token + attention * (context + 1)

    @property
    def linear_flops_per_token(self) -> int:
        return sum(s.linear_flops_per_token for s in self.layers) + self.lm_head_flops_per_token

    @property
    def kv_cache_bytes_per_token(self) -> int:
        return sum(s.kv_cache_bytes_per_token for s in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["linear_flops_per_token"] = self.linear_flops_per_token
        d["kv_cache_bytes_per_token"] = self.kv_cache_bytes_per_token
        return d


def _numel(module: nn.Module, seen: set[int]) -> int:
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _linear_flops(module: nn.Module) -> int:
    return sum(2 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def model_stats(model: nn.Module) -> ModelStats:
    """Unique parameter counts, weight bytes and per-token FLOPs of a model, per decoder layer."""
    adapter = get_adapter(model)
    seen: set[int] = set()
    layers = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        shape = adapter.layer_shape(layer)
        attn = _numel(adapter.attention(layer), seen)
        mlp = _numel(adapter.mlp(layer), seen)
        other = _numel(layer, seen)
        d = adapter.head_dim(layer)
        # the KV cache is kept in the attention's dtype (a layer without attention weights holds none)
        dtype_bytes = next((p.element_size() for p in adapter.attention(layer).parameters()), 0)
        mixing = not is_replaced(adapter.attention(layer))  # HARP layers: no token mixing, no KV cache
        layers.append(LayerStats(
            index=i, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
            intermediate_size=shape.intermediate_size, attention_params=attn, mlp_params=mlp,
            other_params=other, linear_flops_per_token=_linear_flops(layer),
            attention_flops_per_context_token=4 * shape.num_heads * d * mixing,
            kv_cache_bytes_per_token=2 * shape.num_kv_heads * d * dtype_bytes * mixing,
        ))
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    weight_bytes = sum(p.numel() * p.element_size() for p in unique.values())
    head = model.get_output_embeddings()
    head_flops = 2 * head.weight.numel() if head is not None else 0
    return ModelStats(
        total_params=total, layer_params=sum(s.params for s in layers), weight_bytes=weight_bytes,
        lm_head_flops_per_token=head_flops, layers=layers,
    )


def format_stats(stats: ModelStats, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(
        f"parameters {stats.total_params:,} (decoder layers {stats.layer_params:,}), "
        f"weights {stats.weight_bytes / 2**20:,.1f} MiB, "
        f"{stats.linear_flops_per_token / 1e6:,.1f} MFLOPs/token (+ attention mixing)"
    )
    lines.append(f"{'layer':>5} {'heads':>5} {'kv':>3} {'mlp':>7} {'attn params':>12} {'mlp params':>12}")
    for s in stats.layers:
        lines.append(f"{s.index:>5} {s.num_heads:>5} {s.num_kv_heads:>3} {s.intermediate_size:>7} "
                     f"{s.attention_params:>12,} {s.mlp_params:>12,}")
    return "\n".join(lines)


def compare_stats(before: ModelStats, after: ModelStats, tokens: int = 512) -> dict:
    """Before/after totals and the ideal speedups they imply (FLOPs for prefill, bytes for decode)."""
    return {
        "params_before": before.total_params,
        "params_after": after.total_params,
        "params_removed_fraction": 1 - after.total_params / before.total_params,
        "weight_bytes_before": before.weight_bytes,
        "weight_bytes_after": after.weight_bytes,
        "prefill_tokens": tokens,
        "prefill_flops_before": before.prefill_flops(tokens),
        "prefill_flops_after": after.prefill_flops(tokens),
        "ideal_prefill_speedup": before.prefill_flops(tokens) / after.prefill_flops(tokens),
        "ideal_decode_speedup": before.weight_bytes / after.weight_bytes,
    }
