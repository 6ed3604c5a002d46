"""Consensus's own pipeline: remove one layer, recover, re-score the rest on the recovered model,
repeat. Each round's scores see the model as the previous rounds left it (fine-tuned), which
one-shot and plain iterative removal (scores on the dense model with layers skipped) cannot.

The token budget is split evenly over the rounds, so `tokens` means the same with and without
iteration; each round continues the seeded data order where the previous one stopped, so the rounds
train on different text, as one run of the whole budget would. The plan records the original
indices of the removed layers and, for each round, the scoring table (in original indices) and what
recovery gained; recovery.json concatenates the rounds' curves (validation loss jumps at each
removal and falls as the round trains). Validation runs as often as in one run of the whole budget
(about ten times in all, plus each round's before and after), not ten times per round: on SmolLM2
with six rounds, validating took a quarter (200k tokens) to two thirds (50k) of the training time
otherwise.
"""

from __future__ import annotations

import copy

from secateurs.calibration.data import as_calibration
from secateurs.errors import SecateursError
from secateurs.methods.depth import DEPTH_METHODS, depth_plan, layers_for_target
from secateurs.methods.options import DepthOptions
from secateurs.planning.accounting import model_stats
from secateurs.planning.geometry import identity_plan
from secateurs.recovery.api import recover
from secateurs.recovery.data import sources_read_once
from secateurs.recovery.settings import RecoverySettings
from secateurs.recovery.trainer import LoopSettings
from secateurs.runtime.progress import status
from secateurs.surgery.apply import apply_plan
from secateurs.version import __version__


def prune_depth_recovering(model, tokenizer, method: str = "consensus", ratio: float | None = None, *,
                           options: DepthOptions | None = None, calibration=None,
                           calibration_options: dict | None = None, recovery: RecoverySettings | None = None,
                           ratio_of: str = "all", layers_equivalent: float | None = None, seed: int = 0,
                           progress: bool = True):
    """Remove `options.layers` (or the layers of `ratio`) one at a time from `model` (in place),
    scoring with the depth `options` (metrics, protected layers, scoring tokens) and recovering after
    each removal by distillation from the dense model with the `recovery` settings, whose `tokens` is
    the whole budget (`seed` seeds scoring and every round's recovery). Returns (model, plan,
    recovery record)."""
    options = options if options is not None else DepthOptions()
    recovery = _checked(method, recovery if recovery is not None else RecoverySettings())
    layers = options.layers
    if layers is None:
        layers, _ = layers_for_target(model, None if layers_equivalent is not None else ratio, ratio_of,
                                      layers_equivalent)
    budget = recovery.tokens
    if layers < 1 or budget < layers:
        raise SecateursError(f"{budget} recovery tokens cannot be split over {layers} removals")
    # once, from the dense model
    calib = as_calibration(calibration, tokenizer, model=model, options=calibration_options)
    dense = copy.deepcopy(model)
    params_before = model_stats(model).total_params
    plan = identity_plan(model)
    kept = list(range(len(plan.layers)))  # original index of each layer still in the model
    rounds, records, offset = [], [], 0
    with sources_read_once():  # the same data file every round
        for r in range(layers):
            status(f"round {r + 1} of {layers}: scoring the {len(kept)} layers left")
            step = depth_plan(model, method, layers=1, metrics=options.metrics, protect_first=options.protect_first,
                              protect_last=options.protect_last, max_tokens=options.max_tokens, calibration=calib,
                              seed=seed, progress=progress)
            removed = kept.pop(step.provenance["layers_removed"][0])
            plan.layers[removed].removed = True
            apply_plan(model, step)
            tokens = budget // layers + (1 if r < budget % layers else 0)
            round_settings = recovery.replace(tokens=tokens, seed=seed, data_offset=offset)
            result = recover(model, dense, settings=round_settings, tokenizer=tokenizer, teacher_tokenizer=tokenizer,
                             plan=plan, progress=progress)
            records.append(result.record)
            offset += result.record["tokens"]["trained"] // result.record["batch"]["seq_len"]
            rounds.append({"removed": [removed], "table": _in_original_indices(step.provenance["rounds"][0]["table"],
                                                                              kept, removed),
                           "recovery": {k: result.record[k] for k in ("before", "after", "tokens")}})
    plan.provenance = {"method": method, "layers": layers, "layers_removed": [lp.index for lp in plan.layers
                                                                              if lp.removed],
                       "iterative": True, "recovered_between_removals": True, "metrics": step.provenance["metrics"],
                       "protect_first": options.protect_first, "protect_last": options.protect_last,
                       "max_tokens": options.max_tokens,
                       "seed": seed, "params_before": params_before, "params_after": model_stats(model).total_params,
                       "calibration": calib.description, "calibration_hash": calib.hash,
                       "base_model": plan.base.get("name_or_path"), "secateurs_version": __version__,
                       "rounds": rounds}
    return model, plan, combined_record(records)


def _checked(method: str, recovery: RecoverySettings) -> RecoverySettings:
    """Refuse what cannot recover between removals; the validation interval of the whole budget set."""
    if method not in DEPTH_METHODS or DEPTH_METHODS[method].choice != "rank":
        ranked = [m for m, spec in DEPTH_METHODS.items() if spec.choice == "rank"]
        raise SecateursError(f"recovering between removals needs a method that re-scores layers one by one "
                             f"({', '.join(ranked)}), not {method!r}")
    if recovery.save_every or recovery.resume:
        raise SecateursError("checkpoints and resume are per recovery run; between removals they are not supported")
    return recovery if recovery.eval_every is not None else recovery.replace(eval_every=whole_budget_interval(recovery))


def whole_budget_interval(recovery: RecoverySettings) -> int:
    """The validation interval (steps) of one recovery run over the whole budget (`recovery.tokens`)."""
    run = LoopSettings(tokens=recovery.tokens, batch_size=recovery.batch_size, grad_accum=recovery.grad_accum)
    return run.validation_interval(recovery.seq_len)


def _in_original_indices(table: list[dict], kept_after: list[int], removed: int) -> list[dict]:
    """A round's scoring table names layers of the model as it was then: map them back."""
    before = sorted(kept_after + [removed])
    return [{**row, "layer": before[row["layer"]]} for row in table]


def combined_record(records: list[dict]) -> dict:
    """One recovery.json for all rounds: curves end to end (tokens counted from the first round),
    totals summed, before = the first round's start, after = the last round's end."""
    last = copy.deepcopy(records[-1])
    offset, train, val = 0, [], []
    for record in records:
        train += [{**p, "tokens": p["tokens"] + offset} for p in record["curves"]["train"]]
        val += [{**p, "tokens": p["tokens"] + offset} for p in record["curves"]["val"]]
        offset += record["tokens"]["trained"]
    total = lambda key: round(sum(r[key] for r in records), 3)  # noqa: E731
    trained = sum(r["tokens"]["trained"] for r in records)
    last.update(curves={"train": train, "val": val}, before=records[0]["before"],
                tokens={"requested": sum(r["tokens"]["requested"] for r in records), "trained": trained,
                        "epochs": round(sum(r["tokens"]["epochs"] for r in records), 4)},
                training_seconds=total("training_seconds"), validation_seconds=total("validation_seconds"),
                wall_seconds=total("wall_seconds"),
                training_tokens_per_second=round(trained / max(1e-9, total("training_seconds")
                                                                - total("validation_seconds")), 2),
                rounds=[{"round": n + 1, "tokens": r["tokens"], "steps": r["steps"], "before": r["before"],
                         "after": r["after"]} for n, r in enumerate(records)])
    last["steps"] = {**last["steps"], "done": sum(r["steps"]["done"] for r in records),
                     "planned": sum(r["steps"]["planned"] for r in records)}
    return last
