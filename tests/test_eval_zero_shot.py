"""lm-eval integration, offline: every local task runs on stories260K with --limit, and the accuracy
on hand-checked tiny tasks is exactly what it must be (and agrees with a direct computation)."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import STORIES, TASKS  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from secateurs.cli.main import main  # noqa: E402
from secateurs.errors import SecateursError  # noqa: E402
from secateurs.evaluation.zero_shot import STANDARD_TASKS, detect_format, local_task_config, zero_shot  # noqa: E402
from secateurs.storage.loading import load_model  # noqa: E402

DATA = TASKS  # the first 20 rows of each standard task

# Hand-checked on stories260K (a TinyStories model): in every item the first choice is the story
# continuation and the second nonsense for a children's story, by a margin of >= 70 nats. Gold
# points at the story continuation in the first three items and, on purpose, at the nonsense in
# the fourth, so a correct harness must report exactly 3/4 (acc and acc_norm alike).
STORY_MC = [
    {"query": "Once upon a time, there was a little girl named", "choices": ["Lily.", "Xylophone quantum."], "gold": 0},
    {"query": "She loved to play outside in the", "choices": ["park.", "spreadsheet."], "gold": 0},
    {"query": "One day, she saw a big, red", "choices": ["ball.", "algorithm."], "gold": 0},
    {"query": "The cat said", "choices": ["meow.", "electromagnetism."], "gold": 1},
]
# WinoGrande-style partial scoring: the same continuation after each context. The story context is
# the model's choice in both items; gold is right in the first and deliberately wrong in the second.
STORY_SCHEMA = [
    {"context_options": ["Once upon a time, there was a little girl named Lily",
                         "Quarterly revenue of the semiconductor firm grew"],
     "continuation": "She loved to play outside.", "gold": 0},
    {"context_options": ["Once upon a time, there was a little girl named Lily",
                         "Quarterly revenue of the semiconductor firm grew"],
     "continuation": "She loved to play outside.", "gold": 1},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def stories():
    return load_model(str(STORIES), dtype="float32")


@pytest.fixture(scope="module")
def hand_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hand_tasks")
    write_jsonl(d / "story_mc.jsonl", STORY_MC)
    write_jsonl(d / "story_schema.jsonl", STORY_SCHEMA)
    return d


def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """Direct computation the way lm-eval splits a request: tokens of context+continuation after
    the context's tokens are scored."""
    whole = tok(context + continuation).input_ids
    ctx = tok(context).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_hand_checked_tasks_exact_accuracy(stories, hand_dir):
    model, tok = stories
    out = zero_shot(model, tok, ["story_mc", "story_schema"], data_dir=hand_dir, log_samples=True)
    mc, schema = out["tasks"]["story_mc"], out["tasks"]["story_schema"]
    assert (mc["acc"], mc["acc_norm"], mc["samples"]) == (0.75, 0.75, 4)
    assert mc["format"] == "llm-foundry" and schema["format"] == "llm-foundry-schema"
    assert (schema["acc"], schema["samples"]) == (0.5, 2) and schema["acc_norm"] is None
    assert mc["acc_stderr"] == pytest.approx(0.25)  # sample std (ddof 1) of [1,1,1,0] / sqrt(4)
    # the harness's log-likelihoods are the model's own
    for item, sample in zip(STORY_MC, out["samples"]["story_mc"]):
        got = [r[0] for r in sample["filtered_resps"]]
        want = [continuation_logprob(model, tok, item["query"], " " + c) for c in item["choices"]]
        assert got == pytest.approx(want, abs=1e-3)
        assert want[0] > want[1] + 30  # the hand check: the story continuation wins by far


def test_every_local_task_runs_offline_with_limit(stories):
    model, tok = stories
    out = zero_shot(model, tok, list(STANDARD_TASKS), data_dir=DATA, limit=3)
    assert set(out["tasks"]) == set(STANDARD_TASKS)
    for name, r in out["tasks"].items():
        assert r["samples"] == 3 and r["available"] > 3, name
        assert r["acc"] in (0, 1 / 3, 2 / 3, 1), name
        assert r["acc_stderr"] is not None, name
        if name != "winogrande":
            assert r["acc_norm"] in (0, 1 / 3, 2 / 3, 1), name
    assert out["tasks"]["openbookqa"]["source"].endswith("openbook_qa.jsonl")
    assert out["tasks"]["winogrande"]["format"] == "llm-foundry-schema"
    assert out["lm_eval_version"] == "0.4.13" and out["limit"] == 3


def test_prompts_match_lm_eval_tasks(tmp_path):
    piqa = local_task_config("piqa", DATA / "piqa.jsonl")
    assert piqa["doc_to_text"] == "{{query.strip()}}\nAnswer:" and piqa["doc_to_choice"] == "choices"
    assert local_task_config("openbookqa", DATA / "openbook_qa.jsonl")["doc_to_text"] == "{{query}}"
    hf = write_jsonl(tmp_path / "piqa.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}])
    assert detect_format(hf)[0] == "hf-piqa"
    wg = write_jsonl(tmp_path / "wg.jsonl", [{"sentence": "A _ b", "option1": "x", "option2": "y", "answer": "2"}])
    assert detect_format(wg)[0] == "hf-winogrande"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    with pytest.raises(SecateursError, match="unknown format"):
        detect_format(bad)


def test_hf_format_winogrande_and_piqa_score(stories, tmp_path):
    """The HF-format configs produce the same requests as the llm-foundry ones on equivalent data."""
    model, tok = stories
    write_jsonl(tmp_path / "winogrande.jsonl", [
        {"sentence": "Once upon a time, there was a little girl named Lily _ loved to play outside.",
         "option1": ". She", "option2": " and the semiconductor firm", "answer": "1"}])
    write_jsonl(tmp_path / "piqa.jsonl", [{"goal": "The cat said", "sol1": "meow.", "sol2": "electromagnetism.",
                                           "label": 0}])
    out = zero_shot(model, tok, ["winogrande", "piqa"], data_dir=tmp_path)
    assert out["tasks"]["winogrande"]["format"] == "hf-winogrande"
    assert out["tasks"]["piqa"]["acc"] == 1.0


def test_bad_input(stories, tmp_path):
    model, tok = stories
    with pytest.raises(SecateursError, match="not a folder"):
        zero_shot(model, tok, ["piqa"], data_dir=tmp_path / "nope")
    with pytest.raises(SecateursError, match="no tasks"):
        zero_shot(model, tok, " , ", data_dir=DATA)
    with pytest.raises(SecateursError, match="tokenizer"):
        zero_shot(model, None, ["piqa"], data_dir=DATA)


def test_exported_task_yamls_run_in_lm_eval_itself(stories, hand_dir, tmp_path):
    """`secateurs tasks` writes YAMLs that lm-eval's own runners (lm_eval CLI, accelerate launch)
    load with --include_path, offline, and that score exactly like zero_shot()."""
    out = tmp_path / "yamls"
    assert main(["tasks", "--data-dir", str(hand_dir), "--tasks", "story_mc,story_schema", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.yaml")) == ["secateurs_story_mc.yaml", "secateurs_story_schema.yaml"]
    manager = TaskManager(include_path=str(out), include_defaults=False)
    assert {"secateurs_story_mc", "secateurs_story_schema"} <= set(manager.all_tasks)
    model, tok = stories
    res = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8), task_manager=manager,
                          tasks=["secateurs_story_mc", "secateurs_story_schema"])["results"]
    assert res["secateurs_story_mc"]["acc,none"] == 0.75 and res["secateurs_story_schema"]["acc,none"] == 0.5
    assert main(["tasks", "--data-dir", str(hand_dir), "--tasks", "piqa", "--out", str(out)]) == 2
