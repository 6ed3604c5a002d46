"""Speed ratios that know when they are wrong: dense and pruned measured in paired rounds, rounds
repeated until the per-round ratios agree (interquartile range / median at most --max-spread) or
the time limit passes, and a ratio that never settled reported as "not measured reliably" with the
machine's load, never as a number. The stopping rule runs on a fake clock and fake measurements;
one real bench on stories260K checks what the command line writes."""

from __future__ import annotations

import copy
import itertools
import json
import os
import random

import numpy as np
import pytest
from conftest import STORIES
from transformers import AutoModelForCausalLM

from secateurs.cli.main import main
from secateurs.errors import SecateursError
from secateurs.evaluation import report, speed
from secateurs.evaluation.report import bench_blocks, check_bench_result, render_html, render_markdown
from secateurs.evaluation.speed import BenchConfig, bench_markdown, bench_models, ratio_of, run_rounds
from secateurs.methods import prune
from secateurs.pipeline import demo


class FakeClock:
    """Seconds that pass only when a fake measurement says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scripted(clock: FakeClock, ratios, dense_seconds: float = 0.1):
    """measure(label) for labels ('dense', 'pruned'): the dense model always takes dense_seconds for
    prefill and for decode; in round i the pruned one takes dense_seconds / ratios[i] (so its speed
    ratio that round is ratios[i]). Each measurement advances the clock by its own time."""
    counts = {"dense": 0, "pruned": 0}
    ratios = iter(ratios)

    def measure(label: str) -> dict:
        counts[label] += 1
        seconds = dense_seconds if label == "dense" else dense_seconds / next(ratios)
        clock.now += 2 * seconds
        return {"prefill_s": seconds, "ttft_s": seconds, "decode_s": seconds, "peak_extra_bytes": None}

    return measure, counts


def tight(n: int = 10_000, ratio: float = 1.25, jitter: float = 0.01, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [ratio * (1 + rng.uniform(-jitter, jitter)) for _ in range(n)]


def wild(n: int = 10_000, seed: int = 1) -> list[float]:
    """What a busy machine gave: per-round ratios from 0.3 to 13."""
    rng = random.Random(seed)
    return [rng.choice([0.32, 0.5, 1.0, 1.3, 4.0, 13.15]) * (1 + rng.uniform(-0.2, 0.2)) for _ in range(n)]


def iqr_spread(values) -> float:
    """Interquartile range / median, computed independently (numpy's linear percentiles)."""
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return (q3 - q1) / med


CONFIG = BenchConfig(batch_sizes=(1,), prompt_lengths=(8,), decode_tokens=2, repeats=5, warmup=1, max_spread=0.10,
                     time_limit=30.0)


# -- the stopping rule, on a fake clock ---------------------------------------------------------------
def test_quiet_machine_stops_after_the_minimum_rounds_with_the_ratio():
    clock = FakeClock()
    measure, counts = scripted(clock, [1.25] + tight())  # the first (warm-up) round is not measured
    shape = run_rounds(measure, ["dense", "pruned"], CONFIG, clock=clock)
    assert shape["stopped_by"] == "spread" and shape["rounds"] == CONFIG.repeats
    assert counts == {"dense": 1 + 5, "pruned": 1 + 5}  # warm-up + the minimum, interleaved
    assert shape["seconds"] < CONFIG.time_limit
    entry = speed.ratio_entry(speed.pair_ratios(shape["runs"], "dense", "pruned")["prefill"], CONFIG, "busy")
    assert entry["reliable"] and entry["reason"] is None and entry["speedup"] == pytest.approx(1.25, rel=0.01)
    assert entry["spread"] <= 0.10


def test_rounds_alternate_baseline_then_model():
    order = []
    clock = FakeClock()
    measure, _ = scripted(clock, tight())
    run_rounds(lambda label: order.append(label) or measure(label), ["dense", "pruned"],
               BenchConfig(repeats=3, warmup=0), clock=clock)
    assert order == ["dense", "pruned"] * 3


def test_busy_machine_runs_to_the_time_limit_and_reports_unreliable(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 2.9, 2.5))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    clock = FakeClock()
    measure, counts = scripted(clock, wild())
    shape = run_rounds(measure, ["dense", "pruned"], CONFIG, clock=clock)
    assert shape["stopped_by"] == "time limit"
    per_round = 2 * 0.1 * 2  # at least the dense model's prefill + decode, twice over
    assert CONFIG.time_limit <= shape["seconds"] < CONFIG.time_limit + 40 * per_round
    assert shape["rounds"] > CONFIG.repeats and (shape["load"], shape["cores"]) == (3.2, 2)
    ratios = speed.pair_ratios(shape["runs"], "dense", "pruned")["decode"]
    assert len(ratios) == shape["rounds"] and iqr_spread(ratios) > 0.10
    entry = speed.ratio_entry(ratios, CONFIG, speed.busy_reason(shape["load"], shape["cores"]))
    assert entry == {"speedup": None, "reliable": False, "spread": pytest.approx(iqr_spread(ratios)),
                     "reason": "machine busy: load 3.2 on 2 cores"}


def test_spread_falling_below_the_threshold_mid_way_stops_there():
    ratios = wild(12) + [1.25] * 10_000  # the machine quietens after 12 rounds
    expected = next(n for n in itertools.count(CONFIG.repeats) if iqr_spread(ratios[:n]) <= CONFIG.max_spread)
    assert 12 < expected < 100  # the rule has to wait for the quiet rounds to outnumber the wild ones
    clock = FakeClock()
    measure, counts = scripted(clock, [1.0] + ratios)
    patient = BenchConfig(repeats=5, warmup=1, max_spread=0.10, time_limit=1000.0)
    shape = run_rounds(measure, ["dense", "pruned"], patient, clock=clock)
    assert shape["stopped_by"] == "spread" and shape["rounds"] == expected
    assert counts["pruned"] == 1 + expected and shape["seconds"] < patient.time_limit


def test_one_model_runs_the_minimum_rounds_and_a_round_cap_bounds_the_rest():
    clock = FakeClock()
    measure, counts = scripted(clock, wild())
    assert run_rounds(measure, ["dense"], CONFIG, clock=clock)["rounds"] == CONFIG.repeats
    clock = FakeClock()
    measure, _ = scripted(clock, wild())
    capped = BenchConfig(repeats=5, warmup=0, time_limit=1e9, max_rounds=40)
    assert run_rounds(measure, ["dense", "pruned"], capped, clock=clock)["stopped_by"] == "round cap"


def test_too_few_rounds_within_the_time_limit_is_not_a_measurement():
    """One slow round past the limit: a single pair shows no spread, so it says nothing reliable."""
    clock = FakeClock()
    measure, _ = scripted(clock, [1.25, 1.25], dense_seconds=100.0)
    shape = run_rounds(measure, ["dense", "pruned"], BenchConfig(repeats=1, warmup=0, time_limit=60.0), clock=clock)
    assert (shape["rounds"], shape["stopped_by"]) == (1, "time limit")
    entry = speed.ratio_entry(speed.pair_ratios(shape["runs"], "dense", "pruned")["prefill"], CONFIG, "busy")
    assert entry["speedup"] is None and "too few to judge the spread" in entry["reason"]


def test_the_module_clock_is_what_the_loop_reads_by_default(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(speed, "clock", clock)
    measure, _ = scripted(clock, wild())
    shape = run_rounds(measure, ["dense", "pruned"], CONFIG)
    assert shape["stopped_by"] == "time limit" and shape["seconds"] >= CONFIG.time_limit


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.26, 1.0])
def test_a_threshold_above_the_never_printed_limit_is_refused(bad):
    with pytest.raises(SecateursError, match="never reported"):
        BenchConfig(max_spread=bad).validate()


# -- what a bench result says, in JSON, Markdown, the report and the plots ----------------------------
@pytest.fixture(scope="module")
def models():
    dense = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    pruned, _ = prune(copy.deepcopy(dense), method="magnitude", ratio=0.3)
    return {"dense": dense, "pruned": pruned}


def fake_bench(models, ratios, monkeypatch, config=CONFIG) -> dict:
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 2.9, 2.5))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    clock = FakeClock()
    measure, _ = scripted(clock, ratios)
    labels = {id(m): label for label, m in models.items()}
    result = bench_models(models, config, progress=False, clock=clock,
                          measure=lambda model, b, n, d, seed: measure(labels[id(model)]))
    return json.loads(json.dumps(result, allow_nan=False))  # what bench.json holds


def test_busy_bench_json_and_markdown_say_not_measured_reliably(models, monkeypatch):
    result = fake_bench(models, [1.0] + wild(), monkeypatch)
    assert result["reliable"] is False and result["config"]["max_spread"] == 0.1
    dense_row, pruned_row = result["results"]
    v = pruned_row["vs_baseline"]
    assert v["prefill_speedup"] is None and v["decode_speedup"] is None and v["reliable"] is False
    for metric in ("prefill", "decode"):
        assert v[metric]["speedup"] is None and v[metric]["reliable"] is False and v[metric]["spread"] > 0.10
        assert v[metric]["reason"] == "machine busy: load 3.2 on 2 cores"
        assert len(v["pairs"][metric]) == v["rounds"] == pruned_row["prefill_tokens_per_s"]["n"]
    assert v["stopped_by"] == "time limit" and v["seconds"] >= CONFIG.time_limit
    assert pruned_row["prefill_tokens_per_s"]["median"] > 0  # the absolute medians are still given
    assert dense_row["vs_baseline"]["prefill_speedup"] == 1.0 and dense_row["vs_baseline"]["reliable"]

    text = bench_markdown(result)
    line = next(row for row in text.splitlines() if row.startswith("| pruned | 1 | 8 |"))
    ideal_p, ideal_d = v["ideal_prefill_speedup"], v["ideal_decode_speedup_bytes"]
    assert line.endswith(f"| not measured reliably (machine busy: load 3.2 on 2 cores) (ideal {ideal_p:.2f}) "
                         f"| not measured reliably (machine busy: load 3.2 on 2 cores) (ideal {ideal_d:.2f}) |")
    check_bench_result(result, "bench.json")
    blocks = bench_blocks(result)
    md, page = render_markdown(blocks), render_html(blocks, "t")
    assert md.count("not measured reliably (machine busy: load 3.2 on 2 cores)") == 2
    assert page.count("not measured reliably (machine busy: load 3.2 on 2 cores)") == 2


def test_quiet_bench_json_and_markdown_give_the_paired_ratio(models, monkeypatch):
    result = fake_bench(models, [1.0] + tight(), monkeypatch)
    assert result["reliable"] is True
    v = result["results"][1]["vs_baseline"]
    assert v["rounds"] == CONFIG.repeats and v["stopped_by"] == "spread"
    for metric in ("prefill", "decode"):
        assert v[f"{metric}_speedup"] == v[metric]["speedup"] == pytest.approx(1.25, rel=0.01)
        assert v[metric]["reliable"] and v[metric]["reason"] is None and v[metric]["spread"] <= 0.10
    line = next(row for row in bench_markdown(result).splitlines() if row.startswith("| pruned | 1 | 8 |"))
    assert f"| {v['prefill_speedup']:.2f} ±{100 * v['prefill']['spread']:.0f}% " \
           f"({v['ideal_prefill_speedup']:.2f}) |" in line and "not measured" not in line
    check_bench_result(result, "bench.json")
    assert "not measured" not in render_markdown(bench_blocks(result))


def test_a_ratio_more_spread_than_25_percent_is_never_printed(models, monkeypatch):
    """Whatever a file claims: a 'reliable' ratio with a 30% spread, and a bench.json written before
    paired rounds whose medians spread ±1021% (the demo's 'prefill x13.15, decode x0.32')."""
    result = fake_bench(models, [1.0] + tight(), monkeypatch)
    row = result["results"][1]
    claimed = copy.deepcopy(result)
    claimed["results"][1]["vs_baseline"]["prefill"]["spread"] = 0.30
    assert ratio_of(claimed, claimed["results"][1], "prefill")["speedup"] is None
    assert "13.15" not in bench_markdown(claimed) and "not measured reliably (spread ±30%" in bench_markdown(claimed)

    old = copy.deepcopy(result)  # the old layout: no per-metric entries, no paired rounds
    del old["config"]["max_spread"], old["config"]["time_limit"], old["config"]["max_rounds"], old["reliable"]
    for r in old["results"]:
        for key in ("prefill", "decode", "reliable", "rounds", "seconds", "stopped_by", "pairs"):
            r["vs_baseline"].pop(key, None)
    old_row = old["results"][1]
    old_row["vs_baseline"].update(prefill_speedup=13.15, decode_speedup=0.32)
    old_row["prefill_tokens_per_s"]["spread"] = 10.21
    text = bench_markdown(old)
    assert "13.15" not in text and "not measured reliably (medians spread ±1021%" in text

    check_bench_result(old, "old bench.json")  # old files stay readable
    assert ratio_of(old, old_row, "decode")["speedup"] == 0.32  # both medians within 25%: still shown
    assert row["vs_baseline"]["prefill"]["reliable"]


def test_check_bench_result_refuses_a_reliable_flag_that_is_not_a_flag(models, monkeypatch):
    result = fake_bench(models, [1.0] + tight(), monkeypatch)
    result["results"][1]["vs_baseline"]["prefill"]["reliable"] = "yes"
    with pytest.raises(SecateursError, match=r"'results\[1\]\.vs_baseline\.prefill\.reliable' must be true or false"):
        check_bench_result(result, "bench.json")


def test_demo_speed_rows_and_before_after_plot_mark_an_unreliable_ratio(models, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")

    busy = fake_bench(models, [1.0] + wild(), monkeypatch)
    measured = demo._Measured(dense_eval={}, pruned_eval={}, bench=busy, sample="", recovery=None)
    entries = {metric: measured.speed_ratio(metric) for metric in ("prefill", "decode")}
    assert all(e["speedup"] is None and e["reason"] == "machine busy: load 3.2 on 2 cores" for e in entries.values())
    ppl = {"perplexity": [{"perplexity": 7.0, "protocol": "seq128", "windows": 4}]}
    summary = {"params_before": 260_032, "params_after": 180_000, "weight_bytes_before": 1_040_128,
               "weight_bytes_after": 720_000, "eval_text": "t", "params_removed_fraction": 0.3, "prune_seconds": 1.0,
               "measured_speed": entries}
    rows = demo._side_by_side(summary, ppl, ppl, measured.speed_row("dense"), measured.speed_row("pruned"), busy,
                              None, entries)
    speed_rows = [r for r in rows if "tok/s" in r[0]]
    assert len(speed_rows) == 2 and all(r[3].startswith("not measured reliably (machine busy: load 3.2 on 2 cores)")
                                        for r in speed_rows)
    note = demo._speed_note(summary, busy)
    assert "could not be measured reliably (machine busy: load 3.2 on 2 cores)" in note and "no number" in note
    bars = demo._bar_rows(summary, ppl, ppl, measured.speed_row("pruned"), None, entries)
    assert [r[2] for r in bars if "tok/s" in r[0]] == [report.UNRELIABLE, report.UNRELIABLE]

    drawn = {}
    real_save = report._save

    def save(plt, fig, path):
        drawn["fig"] = fig
        return real_save(plt, fig, path)

    monkeypatch.setattr(report, "_save", save)
    path = report.plot_before_after(bars, tmp_path / "before_after.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = drawn["fig"].axes[0]
    assert len(ax.patches) == 2 * len(bars) - 2  # a dense bar per metric, a pruned bar for all but the two speeds
    assert [t.get_text() for t in ax.texts].count("unreliable") == 2


# -- one real bench through the command line ----------------------------------------------------------
def test_cli_bench_records_paired_rounds_and_the_reliable_flag(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(STORIES), "--baseline", str(STORIES), "--batch-sizes", "1", "--prompt-lengths", "8",
                 "--decode-tokens", "2", "--repeats", "3", "--max-spread", "0.2", "--time-limit", "3",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["config"]["max_spread"] == 0.2 and result["config"]["time_limit"] == 3.0
    assert result["config"]["repeats"] == 3 and isinstance(result["reliable"], bool)
    base, model = result["results"]
    assert (base["model"], model["model"]) == ("stories260K-hf", "stories260K-hf'")
    v = model["vs_baseline"]
    assert v["stopped_by"] in ("spread", "time limit", "round cap") and v["rounds"] >= 3
    assert v["rounds"] == base["prefill_tokens_per_s"]["n"] == model["decode_tokens_per_s"]["n"]
    for metric in ("prefill", "decode"):
        assert len(v["pairs"][metric]) == v["rounds"]
        entry = v[metric]
        assert set(entry) == {"speedup", "reliable", "spread", "reason"} and isinstance(entry["reliable"], bool)
        assert (entry["speedup"] is None) == (not entry["reliable"]) == (entry["reason"] is not None)
        assert v[f"{metric}_speedup"] == entry["speedup"]
        if not entry["reliable"]:
            assert entry["reason"].startswith("machine busy: load ") and entry["spread"] > 0.2
            assert f"not measured reliably ({entry['reason']})" in printed
    assert result["reliable"] == (v["prefill"]["reliable"] and v["decode"]["reliable"])
    assert "alternating rounds" in printed and "| rounds |" in printed
