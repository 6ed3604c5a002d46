"""Probe (issue 15): what should the sequential least-squares re-fit aim at? SmolLM2-135M, 20% of all
parameters from the MLPs (a plan with attention share 0, what the split search chooses on this model),
C4 calibration (32 x 128), WikiText-2 first 8,192 tokens, seq 128.

Targets compared for down_proj over the kept neurons, fitted layer by layer on the inputs x_p the
already pruned layers below produce (ridge toward the sliced weights, lambda = D x mean diag G):
* local:    W x_p                 (what secateurs' sequential mode does today);
* dense:    W x_d                 (what the dense layer wrote on the dense model's inputs);
* residual: h_d_out - h_p_mid     (the dense model's residual stream after the layer, minus what the
                                    pruned path has before its MLP: the MLP also absorbs the error
                                    accumulated below);
* residual+attn: residual, and o_proj (all heads kept) re-fitted toward h_d_mid - h_p_in.

    PYTHONPATH=src python benchmarks/width_target_probe.py [--allocation global] [--damping 0.3 ...]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from secateurs.adapters import get_adapter
from secateurs.adapters.base import set_linear
from secateurs.calibration.data import load_calibration
from secateurs.evaluation.perplexity import perplexity, read_text
from secateurs.storage.loading import load_model
from secateurs.methods import make_plan
from secateurs.calibration.runner import run_layer
from secateurs.calibration.streaming import capture_layer_calls
from secateurs.surgery.apply import apply_layer_plan

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def ridge(weight, gram, cross, kept, damping):
    """argmin_W' ||targets - W' x[kept]||^2 + lam ||W' - W[:, kept]||^2, from G = sum x x^T and
    cross = sum targets x[kept]^T."""
    lam = damping * float(gram.diagonal().mean())
    w_kept = weight[:, kept]
    system = gram[kept][:, kept] + lam * torch.eye(len(kept), dtype=gram.dtype)
    return torch.linalg.solve(system, (cross + lam * w_kept).t()).t()


def run_with_capture(layer, linear, hidden, kwargs, mask):
    seen = {}

    def hook(module, args, output):
        seen["x"], seen["y"] = args[0].detach(), output.detach()

    handle = linear.register_forward_hook(hook)
    try:
        out = run_layer(layer, hidden, kwargs, mask)
    finally:
        handle.remove()
    return out, seen["x"], seen["y"]


@torch.inference_mode()
def refit(model, plan, calibration, target: str, damping: float, attn_damping: float):
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    hidden0, kwargs = capture_layer_calls(model, calibration)
    masks = [b["attention_mask"] for b in calibration.batches]
    dense, pruned = list(hidden0), list(hidden0)
    fits = {}
    for lp in plan.layers:
        layer, i = layers[lp.index], lp.index
        dense_layer = copy.deepcopy(layer)  # the dense path keeps the unpruned, un-fitted weights
        dense_down = adapter.mlp_output_linear(dense_layer)
        down, o_proj = adapter.mlp_output_linear(layer), adapter.attention_output_linear(layer)
        W = down.weight.detach().double()
        kept = torch.as_tensor(plan.resolve_layer(lp)[2])
        attn_fit = None
        if target == "residual+attn":
            Wo = o_proj.weight.detach().double()
            G = torch.zeros(Wo.shape[1], Wo.shape[1], dtype=torch.float64)
            C = torch.zeros(Wo.shape[0], Wo.shape[1], dtype=torch.float64)
            for b in range(len(masks)):
                m = masks[b].bool().reshape(-1)
                hd_out, _, yd = run_with_capture(dense_layer, dense_down, dense[b], kwargs[i][b], masks[b])
                # h_d_mid = h_d_out - mlp output
                hd_mid = (hd_out - yd).reshape(-1, hd_out.shape[-1])[m].double()
                _, xp, yp = run_with_capture(layer, o_proj, pruned[b], kwargs[i][b], masks[b])
                xp = xp.reshape(-1, xp.shape[-1])[m].double()
                hp_in = pruned[b].reshape(-1, hd_out.shape[-1])[m].double()
                G += xp.t() @ xp
                C += (hd_mid - hp_in).t() @ xp
            attn_fit = ridge(Wo, G, C, torch.arange(Wo.shape[1]), attn_damping)
            set_linear(o_proj, attn_fit.to(o_proj.weight.dtype).contiguous(), o_proj.bias)
        G = torch.zeros(W.shape[1], W.shape[1], dtype=torch.float64)
        C = torch.zeros(W.shape[0], len(kept), dtype=torch.float64)
        mids, xs = [], []
        for b in range(len(masks)):
            m = masks[b].bool().reshape(-1)
            hd_out, xd, yd = run_with_capture(dense_layer, dense_down, dense[b], kwargs[i][b], masks[b])
            hp_out, xp, yp = run_with_capture(layer, down, pruned[b], kwargs[i][b], masks[b])
            shape = hp_out.shape
            xp2 = xp.reshape(-1, xp.shape[-1])[m].double()
            G += xp2.t() @ xp2
            if target == "local":
                t = yp.reshape(-1, shape[-1])[m].double()
            elif target == "dense":
                t = yd.reshape(-1, shape[-1])[m].double()
            else:
                t = (hd_out - (hp_out - yp)).reshape(-1, shape[-1])[m].double()
            C += t.t() @ xp2[:, kept]
            mids.append(hp_out - yp)
            xs.append(xp)
            dense[b] = hd_out
        Wn = ridge(W, G, C, kept, damping)
        fits[i] = (Wn, attn_fit)
        wk = Wn.to(xs[0].dtype)
        for b in range(len(masks)):
            pruned[b] = (mids[b] + xs[b][..., kept] @ wk.t()) * masks[b][..., None].to(wk.dtype)
    return fits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--targets", default="local,dense,residual,residual+attn")
    ap.add_argument("--damping", type=float, default=0.3)
    ap.add_argument("--attn-damping", type=float, default=0.3)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    model, tok = load_model("smollm2", "float32")
    calibration = load_calibration(str(ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"), tok, num_samples=32,
                                   max_length=128, batch_size=8)
    text = read_text(ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw")
    plan = make_plan(model, "amp", args.ratio, tokenizer=tok, calibration=calibration, allocation=args.allocation,
                     split=0.0, progress=False)
    adapter = get_adapter(model)
    for target in args.targets.split(","):
        start = time.perf_counter()
        work = copy.deepcopy(model)
        fits = refit(work, plan, calibration, target, args.damping, args.attn_damping)
        layers = adapter.decoder_layers(work)
        with torch.no_grad():
            for lp in plan.layers:
                heads, kv, neurons = plan.resolve_layer(lp)
                apply_layer_plan(adapter, layers[lp.index], lp, heads, kv, neurons)
                down = adapter.mlp_output_linear(layers[lp.index])
                set_linear(down, fits[lp.index][0].float().contiguous(), down.bias)
        seconds = time.perf_counter() - start
        ppl = perplexity(work, tok, text, 128, max_tokens=args.tokens, progress=False)["perplexity"]
        print(f"{args.allocation} {args.ratio} target={target} damping={args.damping} attn_damping={args.attn_damping}: "
              f"ppl {ppl:.2f} (first {args.tokens} tokens); fit {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
