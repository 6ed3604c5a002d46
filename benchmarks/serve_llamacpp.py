"""SmolLM2-135M pruned five ways, exported with `secateurs export` and served by llama.cpp
(llama-cpp-python) on this CPU: prefill and decode tokens/s beside their ideals, and llama.cpp's
perplexity on the file vs transformers' on the model it came from.

    python benchmarks/serve_llamacpp.py [--threads 1] [--repeats 3] [--ppl-tokens 8192]

Models: dense, AMP 20%, FLAP 20%, HARP N=8, consensus k=6 (`secateurs prune smollm2 ...`, calibrated
on 32 C4 samples of 128 tokens), each exported as f32 and q8_0. Per file:
* prefill: one 512-token prompt (WikiText-2 tokens) into an empty cache, tokens/s;
* decode: 128 greedy steps after that prompt, one token per llama.cpp call, tokens/s;
* flash attention on (llama-cli's default on CPU), so every layer's KV cache has its own width;
* ideal ratios: prefill from FLOPs at 512 tokens (secateurs.planning.accounting), decode from the bytes one
  step reads (the GGUF file's tensors + the f16 KV cache at the mean context of the decode);
* perplexity: WikiText-2 test, first N tokens (HF tokenizer, the same ids for both engines),
  non-overlapping windows of 128, every token after the first of a window scored (seq128, as
  `secateurs eval`), llama.cpp's logits vs transformers' (float32, `load_pruned`).
Median of --repeats, dense and pruned interleaved per repeat. Writes
benchmarks/results/{--name}.{json,md} (default serve_llamacpp).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from common import ASSETS, ROOT, header_markdown, result_header
from transformers import AutoTokenizer

from secateurs.evaluation.perplexity import load_text, perplexity
from secateurs.export import export_gguf, plan_export
from secateurs.files.output import write_file
from secateurs.planning.accounting import model_stats
from secateurs.storage.loading import load_model
from secateurs.storage.pruned import load_pruned, save_pruned

WIKI = ASSETS / "text" / "wikitext-2-raw" / "wiki.test.raw"
C4 = ASSETS / "text" / "c4" / "c4_sample_1000.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
CALIB = ["--calib", str(C4), "--calib-samples", "32", "--calib-length", "128"]
VARIANTS = {  # name -> `secateurs prune smollm2` arguments (None: the dense model itself)
    "dense": None,
    "AMP 20%": ["--method", "amp", "--ratio", "0.2"],
    "FLAP 20%": ["--method", "flap", "--ratio", "0.2"],
    "HARP N=8": ["--method", "harp", "--top-layers", "8"],
    "consensus k=6": ["--method", "consensus", "--layers", "6"],
}
OUTTYPES = ("f32", "q8_0")
PROMPT, DECODE = 512, 128


def secateurs(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-m", "secateurs", *args, "--quiet"], check=True, env=env)


def make_models(work: Path, threads: int) -> dict[str, Path]:
    """Pruned folders (reused when present) and the dense model saved the same way."""
    folders = {}
    for name, args in VARIANTS.items():
        folder = work / name.replace(" ", "_").replace("%", "pct").replace("=", "")
        if not (folder / "config.json").is_file():
            if args is None:
                model, tokenizer = load_model("smollm2", dtype=torch.float32)
                save_pruned(model, None, folder, tokenizer=tokenizer)
            else:
                stats = ["--stats", str(work / "smollm2.stats.safetensors")] if args[1] in ("amp", "flap") else []
                secateurs("prune", "smollm2", *args, *CALIB, *stats, "--threads", str(threads), "--out", str(folder))
        folders[name] = folder
    return folders


def gguf_bytes(path: Path) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def engine(path: Path, threads: int, n_ctx: int, logits_all: bool = False):
    import llama_cpp  # noqa: PLC0415 (optional: the serve extra)

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, flash_attn=True, verbose=False, seed=0)


def last_logits(llm) -> np.ndarray:
    import llama_cpp  # noqa: PLC0415 (optional: the serve extra)

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def speed(llm, prompt: list[int]) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one run from an empty cache."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - start)
    token = int(np.argmax(last_logits(llm)))
    start = time.perf_counter()
    for _ in range(DECODE):
        llm.eval([token])
        token = int(np.argmax(last_logits(llm)))
    return prefill, DECODE / (time.perf_counter() - start)


def windows_perplexity(path: Path, windows: list[list[int]], threads: int) -> float:
    """llama.cpp's perplexity on the given windows (all of one length): every token after the first of a
    window, scored from the logits of the tokens before it, as secateurs.evaluation.perplexity scores them."""
    seq = len(windows[0])
    llm = engine(path, threads, n_ctx=seq, logits_all=True)
    nll, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.array(llm.scores[:seq - 1], dtype=np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))
        nll -= logp[np.arange(seq - 1), window[1:]].sum()
        count += seq - 1
    return math.exp(nll / count)


def llamacpp_perplexity(path: Path, ids: list[int], threads: int, seq: int = 128) -> float:
    """Non-overlapping windows of `seq` tokens of `ids`, the ragged tail dropped."""
    return windows_perplexity(path, [ids[start:start + seq] for start in range(0, len(ids) // seq * seq, seq)],
                              threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp and torch threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per file, median reported (default: 3)")
    parser.add_argument("--ppl-tokens", type=int, default=8192,
                        help="WikiText-2 tokens for perplexity (default: 8192)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "serve_llamacpp", help="models and GGUF files")
    parser.add_argument("--name", default="serve_llamacpp", help="results file stem (default: serve_llamacpp)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    header = result_header()
    header["llama_cpp_python"] = importlib.metadata.version("llama-cpp-python")
    folders = make_models(args.work, args.threads)
    tokenizer = AutoTokenizer.from_pretrained(folders["dense"])
    ids = tokenizer(load_text(str(WIKI))[0], return_tensors="pt", verbose=False).input_ids[0][:args.ppl_tokens]
    prompt = ids[:PROMPT].tolist()

    rows: dict[str, dict] = {}
    for name, folder in folders.items():
        model = load_pruned(folder, dtype=torch.float32)
        stats = model_stats(model)
        kv_per_token = sum(layer.kv_cache_bytes_per_token for layer in stats.layers) // 2  # f16 in llama.cpp
        rows[name] = {
            "folder": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
            "params": stats.total_params, "prefill_flops": stats.prefill_flops(PROMPT),
            "kv_bytes_per_token_f16": kv_per_token,
            "transformers_ppl": round(perplexity(model, tokenizer, "", seq_len=128, ids=ids,
                                                 progress=False)["perplexity"], 3),
            "files": {},
        }
        del model
        for outtype in OUTTYPES:
            path = export_gguf(folder, args.work / f"{folder.name}.{outtype}.gguf", outtype, force=True)
            rows[name]["files"][outtype] = {"path": path.name, "bytes": path.stat().st_size,
                                            "tensor_bytes": gguf_bytes(path)}
    for name, folder in folders.items():
        rows[name]["arch"] = plan_export(load_pruned(folder))[0]
    # speed: every file once per repeat, models interleaved
    timings = {(name, outtype): [] for name in rows for outtype in OUTTYPES}
    engines = {key: engine(args.work / rows[key[0]]["files"][key[1]]["path"], args.threads, PROMPT + DECODE + 8)
               for key in timings}
    for key, llm in engines.items():
        speed(llm, prompt[:64])  # warm-up
    for _ in range(args.repeats):
        for key, llm in engines.items():
            timings[key].append(speed(llm, prompt))
    del engines
    for (name, outtype), runs in timings.items():
        entry = rows[name]["files"][outtype]
        entry["prefill_tokens_per_s"] = round(statistics.median(r[0] for r in runs), 1)
        entry["decode_tokens_per_s"] = round(statistics.median(r[1] for r in runs), 1)
        entry["prefill_spread"] = round((max(r[0] for r in runs) - min(r[0] for r in runs))
                                        / entry["prefill_tokens_per_s"], 3)
        entry["decode_spread"] = round((max(r[1] for r in runs) - min(r[1] for r in runs))
                                       / entry["decode_tokens_per_s"], 3)
        entry["llamacpp_ppl"] = round(llamacpp_perplexity(args.work / entry["path"], ids.tolist(), args.threads), 3)
    mean_context = PROMPT + DECODE / 2
    for name, row in rows.items():
        for outtype, entry in row["files"].items():
            dense = rows["dense"]["files"][outtype]
            step_bytes = entry["tensor_bytes"] + row["kv_bytes_per_token_f16"] * mean_context
            dense_bytes = dense["tensor_bytes"] + rows["dense"]["kv_bytes_per_token_f16"] * mean_context
            entry["prefill_x"] = round(entry["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"], 3)
            entry["prefill_ideal_x"] = round(rows["dense"]["prefill_flops"] / row["prefill_flops"], 3)
            entry["decode_x"] = round(entry["decode_tokens_per_s"] / dense["decode_tokens_per_s"], 3)
            entry["decode_ideal_x"] = round(dense_bytes / step_bytes, 3)
            entry["decode_x_of_ideal"] = round(entry["decode_x"] / entry["decode_ideal_x"], 3)
    result = {"header": header, "load_average_after": [round(x, 2) for x in os.getloadavg()], "threads": args.threads,
              "repeats": args.repeats,
              "prompt_tokens": PROMPT, "decode_tokens": DECODE, "ppl_tokens": int(ids.numel()), "ppl_seq_len": 128,
              "seconds": round(time.time() - started), "models": rows}
    write_file(RESULTS / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
    write_file(RESULTS / f"{args.name}.md", markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [
        "# SmolLM2-135M pruned, served by llama.cpp", "", header_markdown(r["header"]),
        f"llama-cpp-python {r['header']['llama_cpp_python']}, {r['threads']} thread(s); load average "
        f"{r['load_average_after']} after; {r['seconds']} s in all.", "",
        f"Prefill: one {r['prompt_tokens']}-token prompt; decode: {r['decode_tokens']} greedy tokens after it; median "
        f"of {r['repeats']}, files interleaved. x = pruned / dense, ideal: FLOPs at {r['prompt_tokens']} tokens "
        "(prefill), bytes read per step, tensors + f16 KV cache (decode). Perplexity: WikiText-2 test, first "
        f"{r['ppl_tokens']} tokens, windows of {r['ppl_seq_len']}, llama.cpp on the file vs transformers (float32) "
        "on the folder it was exported from.", "",
        "| model | arch | type | MiB | prefill tok/s | x (ideal) | decode tok/s | x (ideal) | of ideal | ppl llama.cpp "
        "| ppl transformers |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in r["models"].items():
        for outtype, e in row["files"].items():
            lines.append(
                f"| {name} | {row['arch']} | {outtype} | {e['bytes'] / 2**20:.1f} | {e['prefill_tokens_per_s']:.0f} | "
                f"{e['prefill_x']:.2f} ({e['prefill_ideal_x']:.2f}) | {e['decode_tokens_per_s']:.1f} | "
                f"{e['decode_x']:.2f} ({e['decode_ideal_x']:.2f}) | {e['decode_x_of_ideal']:.2f} | "
                f"{e['llamacpp_ppl']:.2f} | {row['transformers_ppl']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
