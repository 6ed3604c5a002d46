"""Zero-shot accuracy through lm-evaluation-harness, offline from local jsonl files.

lm-eval scores the in-memory model (dense, pruned, or heterogeneous from `load_pruned`) through
its `HFLM` wrapper, so the numbers are the harness's own: same request construction, same
acc / acc_norm (byte-length normalised) and same standard errors as published tables.

Task data: with `data_dir`, a task NAME is read from `data_dir/NAME.jsonl` (or a known alias such
as `openbook_qa.jsonl`). The file's format is recognised from its first record and matched to a
task config shipped in `secateurs/evaluation/tasks/` (read through the `json` dataset builder,
so nothing touches the hub):

* llm-foundry ICL multiple choice ``{"query", "choices", "gold"}``;
* llm-foundry WinoGrande partial scoring ``{"context_options", "continuation", "gold"}``;
* the Hugging Face formats of piqa, arc, openbookqa, boolq and winogrande.

For the five standard tasks the llm-foundry prompt is completed to lm-eval's own (for instance
"Question: ...\\nAnswer:"), so scores are comparable with lm-eval's hub tasks. Names with no local
file go to lm-eval's registry (needs the hub or a populated datasets cache).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from functools import cache
from pathlib import Path

import yaml

from secateurs.errors import SecateursError
from secateurs.files.output import write_folder
from secateurs.runtime.progress import phase
from secateurs.settings.names import STANDARD_TASKS

TASK_DIR = Path(__file__).with_name("tasks")

FILE_ALIASES = {"openbookqa": ("openbookqa", "openbook_qa"), "arc_easy": ("arc_easy", "arc-easy"),
                "arc_challenge": ("arc_challenge", "arc-challenge")}
# llm-foundry queries lack lm-eval's answer cue; these complete them to lm-eval's prompts.
LLMFOUNDRY_PROMPTS = {
    "piqa": "{{query.strip()}}\nAnswer:",
    "arc_easy": "{{query.strip()}}\nAnswer:",
    "arc_challenge": "{{query.strip()}}\nAnswer:",
    "boolq": "{{query.strip()}}\nAnswer:",
    "openbookqa": "{{query}}",
}
# (format name, keys that identify it, task config)
FORMATS = (
    ("llm-foundry", {"query", "choices", "gold"}, "llmfoundry_mc.yaml"),
    ("llm-foundry-schema", {"context_options", "continuation", "gold"}, "llmfoundry_schema.yaml"),
    ("hf-piqa", {"goal", "sol1", "sol2", "label"}, "hf_piqa.yaml"),
    ("hf-openbookqa", {"question_stem", "choices", "answerKey"}, "hf_openbookqa.yaml"),
    ("hf-arc", {"question", "choices", "answerKey"}, "hf_arc.yaml"),
    ("hf-winogrande", {"sentence", "option1", "option2", "answer"}, "hf_winogrande.yaml"),
    ("hf-boolq", {"passage", "question"}, "hf_boolq.yaml"),
)
METRICS = ("acc", "acc_norm")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401, PLC0415 (optional: the eval extra)
    except ImportError as exc:
        raise SecateursError('zero-shot evaluation needs lm-eval: pip install "secateurs[eval]" '
                             "(lm-eval==0.4.13)") from exc


def parse_tasks(tasks: str | list[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise SecateursError("no tasks given; e.g. --tasks piqa,arc_easy,boolq,winogrande,openbookqa")
    if len(set(names)) != len(names):
        raise SecateursError(f"task listed twice in {names}")
    return names


def find_task_file(name: str, data_dir: str | Path) -> Path | None:
    """data_dir/NAME.jsonl (or .json, or a known alias), or None."""
    for stem in FILE_ALIASES.get(name, (name,)):
        for ext in (".jsonl", ".json"):
            path = Path(data_dir) / f"{stem}{ext}"
            if path.is_file():
                return path
    return None


def detect_format(path: Path) -> tuple[str, str]:
    """(format name, task config file) from the keys of the file's first record."""
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise SecateursError(f"task file {path} is empty")
    try:
        record = json.loads(first)
    except json.JSONDecodeError as exc:
        raise SecateursError(f"task file {path} is not jsonl (first line: {exc.msg})") from exc
    keys = set(record) if isinstance(record, dict) else set()
    for name, required, config in FORMATS:
        if required <= keys:
            return name, config
    known = "; ".join(f"{n}: {sorted(r)}" for n, r, _ in FORMATS)
    raise SecateursError(f"task file {path} has an unknown format (keys {sorted(keys)}); known formats: {known}")


@cache
def _task_template(config_file: str) -> dict:
    return yaml.safe_load((TASK_DIR / config_file).read_text(encoding="utf-8"))


def local_task_config(name: str, path: str | Path) -> dict:
    """An lm-eval task config (dict) that reads `path` offline under the task name `name`."""
    path = Path(path).resolve()
    fmt, config_file = detect_format(path)
    cfg = copy.deepcopy(_task_template(config_file))
    cfg["task"] = name
    cfg["dataset_kwargs"] = {"data_files": {"test": str(path)}}
    if fmt == "llm-foundry" and name in LLMFOUNDRY_PROMPTS:
        cfg["doc_to_text"] = LLMFOUNDRY_PROMPTS[name]
    cfg.setdefault("metadata", {})["secateurs_format"] = fmt
    return cfg


def export_task_configs(data_dir: str | Path, out_dir: str | Path, tasks=STANDARD_TASKS,
                        prefix: str = "secateurs_", force: bool = False) -> dict[str, Path]:
    """Write one lm-eval task YAML per local task file, named PREFIX+NAME (no clash with lm-eval's
    own hub tasks), so lm-eval itself (e.g. `accelerate launch -m lm_eval --include_path OUT`)
    runs them offline. Returns {task name: yaml path}."""

    names = parse_tasks(tasks)
    found = {n: find_task_file(n, data_dir) for n in names}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise SecateursError(f"no local file for {', '.join(missing)} in {data_dir}")
    out = Path(out_dir).expanduser().resolve()
    written = {}
    with write_folder(out, force=force, inputs=[data_dir], kind="tasks", what="tasks output folder") as tmp:
        for name, path in found.items():
            cfg = local_task_config(prefix + name, path)
            if Path(cfg["task"]).name != cfg["task"]:
                raise SecateursError(f"task name {cfg['task']!r} is not a plain file name")
            (tmp / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
            written[cfg["task"]] = out / f"{cfg['task']}.yaml"
    return written


@contextlib.contextmanager
def _quiet(logger_name: str = "lm_eval", level: int = logging.ERROR):
    logger = logging.getLogger(logger_name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def _stderr(value):
    return value if isinstance(value, (int, float)) else None


def zero_shot(model, tokenizer, tasks: str | list[str] = STANDARD_TASKS, *, data_dir: str | Path | None = None,
              limit: int | float | None = None, batch_size: int = 8, num_fewshot: int = 0,
              seed: int = 0, log_samples: bool = False) -> dict:
    """Accuracy of `model` on lm-eval tasks; local files from `data_dir` where they exist.

    Returns {"tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, samples, source, format}},
    "lm_eval_version", "limit", "num_fewshot"} (and "samples" with per-item records if log_samples).
    """
    names = parse_tasks(tasks)
    if tokenizer is None:
        raise SecateursError("zero-shot evaluation needs the model's tokenizer (none was loaded)")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise SecateursError(f"--data-dir {data_dir} is not a folder")
    if limit is not None and limit <= 0:
        raise SecateursError(f"limit must be positive, got {limit}")
    local = {n: find_task_file(n, data_dir) for n in names} if data_dir is not None else {}
    local = {n: p for n, p in local.items() if p is not None}
    hub = [n for n in names if n not in local]
    if not hub:  # everything is local: make sure nothing waits on the unreachable hub
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configs = {n: local_task_config(n, p) for n, p in local.items()}
    _require_lm_eval()
    import lm_eval  # noqa: PLC0415 (optional: the eval extra)
    from lm_eval import simple_evaluate  # noqa: PLC0415 (optional: the eval extra)
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415 (optional: the eval extra)
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 (optional: the eval extra)

    with phase(f"zero-shot {', '.join(names)} (lm-eval, limit {limit})"), _quiet():
        manager = TaskManager(include_defaults=bool(hub))
        if hub:
            missing = [n for n in hub if n not in manager.all_tasks]
            if missing:
                where = f" (no {', '.join(m + '.jsonl' for m in missing)} in {data_dir})" if data_dir else ""
                raise SecateursError(f"unknown task(s) {', '.join(missing)}{where}; give --data-dir with local "
                                     "jsonl files, or lm-eval task names")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = simple_evaluate(
                model=lm, tasks=[configs.get(n, n) for n in names], num_fewshot=num_fewshot, limit=limit,
                task_manager=manager, log_samples=log_samples, bootstrap_iters=1000, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        except (ConnectionError, OSError) as exc:
            raise SecateursError(f"lm-eval could not load task data ({exc}); offline, pass --data-dir with local "
                                 "jsonl files") from exc
    results = _task_results(out, names, local, configs)
    summary = {"tasks": results, "lm_eval_version": lm_eval.__version__, "limit": limit,
               "num_fewshot": num_fewshot, "batch_size": batch_size}
    accs = [r["acc"] for r in results.values() if r["acc"] is not None]
    if accs:
        summary["mean_acc"] = sum(accs) / len(accs)
    if log_samples:
        summary["samples"] = out.get("samples", {})
    return summary


def _task_results(out: dict, names: list[str], local: dict, configs: dict) -> dict:
    """{task: accuracies, sample counts and where its data came from}, read from lm-eval's output."""
    results = {}
    for n in names:
        r = out["results"][n]
        counts = out.get("n-samples", {}).get(n, {})
        results[n] = {
            "acc": r.get("acc,none"), "acc_stderr": _stderr(r.get("acc_stderr,none")),
            "acc_norm": r.get("acc_norm,none"), "acc_norm_stderr": _stderr(r.get("acc_norm_stderr,none")),
            "samples": counts.get("effective"), "available": counts.get("original"),
            "source": str(local[n]) if n in local else "lm-eval registry",
            "format": configs[n]["metadata"]["secateurs_format"] if n in configs else "lm-eval",
        }
    return results
