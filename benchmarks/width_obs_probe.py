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
from secateurs.calibration.data import load_calibration
from secateurs.evaluation.perplexity import perplexity, read_text
from secateurs.storage.loading import load_model
from secateurs.methods import make_plan
from secateurs.surgery.reconstruction import Reconstruction, apply_plan_dense, apply_plan_sequential, prune_and_refit_layer
from secateurs.calibration.streaming import streamed_statistics
from secateurs.surgery.apply import sync_config
from secateurs.calibration.statistics import collect_statistics

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
DAMPING = 0.3


def _inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    lam = damping * gram.diagonal().mean()
    return torch.linalg.inv(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype))


def obs_oneshot(weight: torch.Tensor, gram: torch.Tensor, removed: int, damping: float) -> torch.Tensor:
    return (weight ** 2).sum(0) / _inverse(gram, damping).diagonal()


def obs_greedy(weight: torch.Tensor, gram: torch.Tensor, removed: int, damping: float) -> torch.Tensor:
    inverse, weight = _inverse(gram, damping), weight.clone()
    alive, score = torch.ones(gram.shape[0], dtype=torch.bool), torch.ones(gram.shape[0], dtype=gram.dtype)
    for step in range(removed):
        cost = ((weight ** 2).sum(0) / inverse.diagonal()).masked_fill(~alive, float("inf"))
        j = int(cost.argmin())
        score[j], alive[j] = step - removed - 1.0, False  # removed earlier = lower
        pivot = float(inverse[j, j])  # rank-one updates in place (BLAS ger): ~4 ms a step for 1536 wide
        weight.addr_(weight[:, j].clone(), inverse[j, :].clone(), alpha=-1.0 / pivot)
        inverse.addr_(inverse[:, j].clone(), inverse[j, :].clone(), alpha=-1.0 / pivot)
    return score


def reselect(lp, weight: torch.Tensor, gram: torch.Tensor, select, damping: float) -> None:
    """Give plan layer `lp` the neurons `select` ranks best from down_proj's weight and input Gram
    (the same kept count)."""
    weight, kept = weight.detach().double(), len(lp.neurons)
    if kept < weight.shape[1]:
        scores = select(weight, gram.double(), weight.shape[1] - kept, damping)
        lp.neurons = sorted(torch.topk(scores, kept).indices.tolist())


def sequential_with_selection(model, plan, calibration, select, damping):
    """The sequential re-fit, each layer's neurons chosen by `select` from the Gram of the inputs the
    pruned layers below produce (the same kept count as the plan)."""
    adapter = get_adapter(model)
    settings = Reconstruction("sequential", DAMPING)

    def on_layer(index, layer, attention, mlp):
        lp = plan.layers[index]
        reselect(lp, adapter.mlp_output_linear(layer).weight, mlp.gram, select, damping)
        prune_and_refit_layer(adapter, layer, plan, lp, attention, mlp, settings)
        attention.gram = mlp.gram = None

    streamed_statistics(model, calibration, mode="sequential", on_layer=on_layer, progress=False, gram=True,
                        scores=False)
    sync_config(model, plan)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--select-damping", type=float, nargs="+", default=[DAMPING],
                    help="damping of the selection's inverse (the re-fit keeps 0.3)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-amp", action="store_true")
    ap.add_argument("--refit", choices=("dense", "sequential"), default="dense",
                    help="sequential: the default's re-fit; OBS then chooses from the sequential pass's own Grams")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2", "float32")
    calibration = load_calibration(str(ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"), tok, num_samples=32,
                                   max_length=128, batch_size=8)
    # AMP's scores for the plan; the Gram matrices only for the dense re-fit (the sequential one collects its own)
    stats = collect_statistics(model, calibration, progress=False, gram=args.refit == "dense")
    text = read_text(ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw")
    plan = make_plan(model, "amp-mlp", 0.2, tokenizer=tok, calibration=calibration, statistics=stats,
                     allocation="uniform", progress=False)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    selections = {} if args.skip_amp else {"amp": (None, None)}
    for d in args.select_damping:
        selections[f"obs-oneshot d{d:g}"] = (obs_oneshot, d)
        if args.greedy:
            selections[f"obs-greedy d{d:g}"] = (obs_greedy, d)
    for name, (select, damping) in selections.items():
        variant, start = copy.deepcopy(plan), time.perf_counter()
        if args.refit == "dense":
            if select is not None:
                for lp, mlp in zip(variant.layers, stats.mlp):
                    reselect(lp, adapter.mlp_output_linear(layers[lp.index]).weight, mlp.gram, select, damping)
            pruned = apply_plan_dense(copy.deepcopy(model), variant, stats, Reconstruction("dense", DAMPING))
        elif select is None:
            pruned = apply_plan_sequential(copy.deepcopy(model), variant, calibration,
                                           Reconstruction("sequential", DAMPING), progress=False)
        else:
            pruned = sequential_with_selection(copy.deepcopy(model), variant, calibration, select, damping)
        seconds = time.perf_counter() - start
        ppl = perplexity(pruned, tok, text, 128, max_tokens=args.eval_tokens, progress=False)["perplexity"]
        print(f"{name} + {args.refit} re-fit: WikiText-2 ppl (seq 128, first {args.eval_tokens:,} tokens) {ppl:.2f}; "
              f"selection and re-fit {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
