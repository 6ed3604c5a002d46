"""bench writes sane positive numbers and ideal ratios; report writes Markdown, HTML and PNGs;
sweep evaluates every method x ratio; the CLI wires eval/bench/report/sweep with exit status 2
on bad input."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import STORIES, TINYSTORIES_TEXT
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateurs.cli.main import main
from secateurs.criteria.magnitude import magnitude_scores
from secateurs.errors import SecateursError
from secateurs.evaluation.report import write_run_report
from secateurs.evaluation.speed import BenchConfig, bench_models, summarise
from secateurs.methods import prune
from secateurs.planning.accounting import compare_stats, model_stats
from secateurs.storage.pruned import save_pruned

PNG = b"\x89PNG\r\n\x1a\n"
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def pair():
    dense = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    pruned, plan = prune(copy.deepcopy(dense), method="magnitude", ratio=0.3)
    return dense, pruned, plan


@pytest.fixture(scope="module")
def run_dir(pair, tmp_path_factory):
    _, pruned, plan = pair
    return save_pruned(pruned, plan, tmp_path_factory.mktemp("runs") / "st30",
                       tokenizer=AutoTokenizer.from_pretrained(STORIES))


def test_summarise():
    s = summarise([1.0, 3.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3) and s["spread"] == 1.0


def test_bench_numbers_are_sane(pair):
    dense, pruned, _ = pair
    cfg = BenchConfig(batch_sizes=(1, 2), prompt_lengths=(8, 24), decode_tokens=4, repeats=2, warmup=1,
                      time_limit=2.0)
    r = bench_models({"dense": dense, "pruned": pruned}, cfg, progress=False)
    assert len(r["results"]) == 2 * 2 * 2
    for row in r["results"]:
        rounds = row["vs_baseline"]["rounds"]  # paired: both models measured as often, at least `repeats`
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s"):
            s = row[key]
            assert s["n"] == rounds >= 2 and 0 < s["min"] <= s["median"] <= s["max"] < float("inf")
        assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] >= r["models"][row["model"]]["weight_bytes"]
        v = row["vs_baseline"]
        if row["model"] == "dense":
            assert v["prefill_speedup"] == 1.0 and v["ideal_prefill_speedup"] == 1.0
        else:
            for metric in ("prefill", "decode"):  # a number where the paired rounds agreed, else why not
                e = v[metric]
                assert e["speedup"] > 0 if e["reliable"] else (e["speedup"] is None and e["reason"])
            # pruning ~30% of parameters: every ideal ratio is a speed-up, bounded by the parameter ratio
            for k in ("ideal_prefill_speedup", "ideal_decode_speedup_bytes", "ideal_decode_speedup_flops"):
                assert 1.1 < v[k] < 1 / 0.6, k
    cmp = compare_stats(model_stats(dense), model_stats(pruned))
    assert r["models"]["pruned"]["weight_bytes"] == cmp["weight_bytes_after"]
    assert r["machine"]["torch_threads"] >= 1 and r["config"]["repeats"] == 2


def test_bench_refuses_prompts_beyond_context(pair):
    dense, _, _ = pair
    with pytest.raises(SecateursError, match="exceeds the context of 512"):
        bench_models({"d": dense}, BenchConfig(prompt_lengths=(510,), decode_tokens=8), progress=False)


def test_report_writes_markdown_html_and_pngs(pair, run_dir, tmp_path):
    dense, _, plan = pair
    magnitude_scores(dense).save(tmp_path / "scores.safetensors")
    files = write_run_report(run_dir, tmp_path / "rep", scores=tmp_path / "scores.safetensors")
    md = files["markdown"].read_text()
    assert "| method | magnitude |" in md and "kept_per_layer.png" in md and "head_heatmap.png" in md
    assert "query heads kept" in md and f"{sum(len(plan.resolve_layer(lp)[0]) for lp in plan.layers)} of 40" in md
    assert "<table>" in files["html"].read_text() and "<img src='head_heatmap.png'" in files["html"].read_text()
    for key in ("kept_per_layer", "head_heatmap"):
        assert files[key].read_bytes()[:8] == PNG and files[key].stat().st_size > 5000
    assert "no importance scores" not in md


def test_cli_eval_bench_report_loop(run_dir, capsys):
    ev, bench = run_dir / "eval.json", run_dir / "bench.json"
    assert main(["eval", str(run_dir), "--baseline", str(STORIES), "--ppl", str(TINYSTORIES_TEXT),
                 "--protocol", "seq128,256", "--out", str(ev)]) == 0
    result = json.loads(ev.read_text())
    assert list(result["models"]) == ["stories260K-hf", "st30"]
    dense_ppl, pruned_ppl = ([r["perplexity"] for r in m["perplexity"]] for m in result["models"].values())
    assert [r["protocol"] for r in result["models"]["st30"]["perplexity"]] == ["seq128", "seq256"]
    assert all(5 < p < 8 for p in dense_ppl) and all(p > d for p, d in zip(pruned_ppl, dense_ppl))
    assert main(["bench", str(run_dir), "--baseline", str(STORIES), "--batch-sizes", "1", "--prompt-lengths", "16",
                 "--decode-tokens", "2", "--repeats", "2", "--time-limit", "2", "--out", str(bench)]) == 0
    assert json.loads(bench.read_text())["baseline"] == "stories260K-hf"
    assert not bench.with_suffix(".md").exists()  # only the named file is written
    assert main(["report", str(run_dir)]) == 0
    md = (run_dir / "report" / "report.md").read_text()
    assert "seq256" in md and "prefill x (ideal)" in md and f"{pruned_ppl[0]:.3f}" in md
    assert (run_dir / "report" / "report.html").exists()


def test_cli_bad_input_exits_2(run_dir, tmp_path, capsys):
    assert main(["eval", str(STORIES), "--ppl", str(TINYSTORIES_TEXT), "--protocol", "seq2048"]) == 2
    assert "exceeds the model's context of 512" in capsys.readouterr().err
    assert main(["eval", str(STORIES)]) == 2
    assert main(["eval", str(STORIES), "--ppl", str(tmp_path / "missing.txt")]) == 2
    assert main(["report", str(tmp_path)]) == 2
    assert main(["sweep", str(STORIES), "--methods", "no-such-method", "--ppl", str(TINYSTORIES_TEXT),
                 "--out", str(tmp_path / "s")]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_sweep_plots_every_method_and_ratio(tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", str(STORIES), "--methods", "magnitude,random", "--ratios", "0.2,0.4",
                 "--ppl", str(TINYSTORIES_TEXT), "--protocol", "seq128", "--out", str(out)]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    points = summary["points"]
    assert [(p["method"], p["ratio"]) for p in points] == [
        ("dense", 0.0), ("magnitude", 0.2), ("magnitude", 0.4), ("random", 0.2), ("random", 0.4)]
    dense = points[0]["ppl_seq128"]
    for p in points[1:]:
        assert p["ppl_seq128"] > dense and 0.1 < p["params_removed"] < 0.5
    mag = {p["ratio"]: p["ppl_seq128"] for p in points if p["method"] == "magnitude"}
    assert mag[0.4] > mag[0.2]  # more pruning, worse perplexity
    assert (out / "sweep_ppl_seq128.png").read_bytes()[:8] == PNG
    assert "| magnitude | 0.20 |" in (out / "sweep.md").read_text() and (out / "sweep.html").exists()
