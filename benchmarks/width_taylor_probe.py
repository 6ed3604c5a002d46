"""Probe (issue 15): do loss-aware (Taylor) neuron scores choose better neurons than AMP's mean
|activation| when both are followed by the same sequential least-squares re-fit? SmolLM2-135M,
20% of all parameters from the MLPs (uniform shapes, attention share 0: what the split search
chooses on this model), C4 calibration 32 x 128, WikiText-2 first 8,192 tokens, seq 128.

Scores of neuron j (a: its activation at the input of down_proj, g: d loss / d a, the
calibration next-token cross-entropy of the dense model):
* amp:      mean |a_j|;
* taylor1:  |sum_t a_j g_j|  (first-order loss change of zeroing j, LLM-Pruner's vector-wise term);
* fisher:   sum over samples of (sum_t a_j g_j)^2  (second-order, empirical Fisher);
* amp*fisher^(1/2) mixes: the geometric mean of the amp and sqrt(fisher) ranks' scores.

    PYTHONPATH=src python benchmarks/width_taylor_probe.py
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from secateurs.adapters import get_adapter
from secateurs.calibration.data import load_calibration
from secateurs.evaluation.perplexity import perplexity, read_text
from secateurs.storage.loading import load_model
from secateurs.methods import make_plan, prune

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def taylor_scores(model, calibration):
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    n = len(layers)
    first = [None] * n
    fisher = [None] * n
    handles = []

    def pre_hook(i):
        def hook(module, args):
            x = args[0]
            if not x.requires_grad:
                return

            def on_grad(g, x=x.detach()):
                prod = (x * g).double()  # (batch, tokens, neurons)
                per_sample = prod.sum(1)
                total = per_sample.sum(0)
                first[i] = total if first[i] is None else first[i] + total
                sq = (per_sample ** 2).sum(0)
                fisher[i] = sq if fisher[i] is None else fisher[i] + sq
            x.register_hook(on_grad)
        return hook

    for i, layer in enumerate(layers):
        handles.append(adapter.mlp_output_linear(layer).register_forward_pre_hook(pre_hook(i)))
    model.requires_grad_(True)
    try:
        for batch in calibration.batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            labels = ids.masked_fill(mask == 0, -100)
            out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        model.requires_grad_(False)
    return [f.abs() for f in first], fisher


def main() -> None:
    model, tok = load_model("smollm2", "float32")
    calibration = load_calibration(str(ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"), tok, num_samples=32,
                                   max_length=128, batch_size=8)
    text = read_text(ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw")
    scores_out = {}
    plan = make_plan(model, "amp", 0.2, tokenizer=tok, calibration=calibration, split=0.0, progress=False,
                     scores_out=scores_out)
    amp = scores_out["scores"].neurons
    start = time.perf_counter()
    first, fisher = taylor_scores(model, calibration)
    print(f"taylor scores: {time.perf_counter() - start:.1f} s", flush=True)

    def rank(s):
        return torch.argsort(torch.argsort(torch.as_tensor(s, dtype=torch.float64))).double()

    selections = {
        "amp": amp,
        "taylor1": first,
        "fisher": fisher,
        "amp-x-fisher-rank": [rank(a) + rank(f) for a, f in zip(amp, fisher)],
    }
    for name, scores in selections.items():
        variant = copy.deepcopy(plan)
        for lp in variant.layers:
            kept = len(lp.neurons)
            lp.neurons = sorted(torch.topk(torch.as_tensor(scores[lp.index], dtype=torch.float64), kept).indices.tolist())
        for reconstruct in ("none", "sequential"):
            pruned, _ = prune(copy.deepcopy(model), tok, plan=copy.deepcopy(variant), calibration=calibration,
                              reconstruct=reconstruct, progress=False)
            ppl = perplexity(pruned, tok, text, 128, max_tokens=8192, progress=False)["perplexity"]
            print(f"{name} reconstruct={reconstruct}: ppl {ppl:.2f} (first 8,192 tokens)", flush=True)


if __name__ == "__main__":
    main()
