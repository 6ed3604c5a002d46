"""Probe (issue 15): does structured-OBS neuron selection beat AMP's when both are followed by the
same least-squares re-fit? SmolLM2-135M, 20% of all parameters from the MLPs (amp-mlp's uniform
shapes), C4 calibration (32 x 128), dense re-fit (damping 0.3), WikiText-2 first 8,192 tokens, seq 128.

Selections compared, same kept count per layer:
* amp: mean |activation| of each neuron (secateurs' amp-mlp);
* obs-oneshot: the structured OBS cost ||W_down[:, j]||^2 / [(G + lambda I)^-1]_jj of removing
  neuron j with optimal compensation of the other columns (G: Gram of the down_proj inputs);
* obs-greedy (--greedy): the same cost, removing one neuron at a time and updating W and the
  inverse (ZipLM / SlimGPT style); slow in this plain-PyTorch form.

    PYTHONPATH=src python benchmarks/width_obs_probe.py [--greedy]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from secateurs.adapters import get_adapter
from secateurs.calibration import load_calibration
from secateurs.evaluation.perplexity import perplexity, read_text
from secateurs.loading import load_model
from secateurs.methods import make_plan
from secateurs.reconstruction import Reconstruction, apply_plan_dense
from secateurs.statistics import collect_statistics

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
DAMPING = 0.3


def _inverse(gram: torch.Tensor) -> torch.Tensor:
    lam = DAMPING * gram.diagonal().mean()
    return torch.linalg.inv(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype))


def obs_oneshot(weight: torch.Tensor, gram: torch.Tensor, removed: int) -> torch.Tensor:
    return (weight ** 2).sum(0) / _inverse(gram).diagonal()


def obs_greedy(weight: torch.Tensor, gram: torch.Tensor, removed: int) -> torch.Tensor:
    inverse, weight = _inverse(gram), weight.clone()
    alive, score = torch.ones(gram.shape[0], dtype=torch.bool), torch.ones(gram.shape[0], dtype=gram.dtype)
    for step in range(removed):
        cost = ((weight ** 2).sum(0) / inverse.diagonal()).masked_fill(~alive, float("inf"))
        j = int(cost.argmin())
        score[j], alive[j] = step - removed - 1.0, False  # removed earlier = lower
        pivot = inverse[j, j]
        weight -= torch.outer(weight[:, j], inverse[j, :]) / pivot
        inverse -= torch.outer(inverse[:, j], inverse[j, :]) / pivot
    return score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--greedy", action="store_true")
    args = ap.parse_args()
    model, tok = load_model("smollm2", "float32")
    calibration = load_calibration(str(ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"), tok, num_samples=32,
                                   max_length=128, batch_size=8)
    stats = collect_statistics(model, calibration, progress=False, gram=True)
    text = read_text(ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw")
    plan = make_plan(model, "amp-mlp", 0.2, tokenizer=tok, calibration=calibration, statistics=stats,
                     allocation="uniform", progress=False)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    selections = {"amp": None, "obs-oneshot": obs_oneshot, **({"obs-greedy": obs_greedy} if args.greedy else {})}
    for name, select in selections.items():
        variant, start = copy.deepcopy(plan), time.perf_counter()
        if select is not None:
            for lp, mlp in zip(variant.layers, stats.mlp):
                weight = adapter.mlp_output_linear(layers[lp.index]).weight.detach().double()
                kept = len(lp.neurons)
                scores = select(weight, mlp.gram.double(), weight.shape[1] - kept)
                lp.neurons = sorted(torch.topk(scores, kept).indices.tolist())
        seconds = time.perf_counter() - start
        pruned = apply_plan_dense(copy.deepcopy(model), variant, stats, Reconstruction("dense", DAMPING))
        ppl = perplexity(pruned, tok, text, 128, max_tokens=8192, progress=False)["perplexity"]
        print(f"{name} + dense re-fit: WikiText-2 ppl (seq 128, first 8,192 tokens) {ppl:.2f}; selection {seconds:.1f} s",
              flush=True)


if __name__ == "__main__":
    main()
