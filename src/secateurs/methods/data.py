"""The data a plan reads: the calibration set and the activation statistics, from what the caller
gave (objects, a saved statistics file, or a source spec), checked against what a saved file was
made on. PlanContext (secateurs.methods.base) hands them to the methods."""

from __future__ import annotations

import os

from secateurs.calibration.data import Calibration, as_calibration, load_calibration
from secateurs.calibration.statistics import Statistics, collect_statistics
from secateurs.errors import SecateursError
from secateurs.runtime.identity import model_identity


def resolve_statistics(model, tokenizer, calibration=None, statistics=None, calibration_options: dict | None = None,
                       progress: bool = True, gram: bool = False) -> Statistics:
    """Statistics from (in order): a Statistics object, a saved statistics file that exists, or a
    calibration pass (a Calibration, or a source spec loaded with calibration_options). A path
    given as `statistics` that does not exist yet is written after the pass, for reuse.
    gram=True: the statistics must hold Gram matrices (dense reconstruction)."""
    stats = None
    if isinstance(statistics, Statistics):
        stats = statistics
    elif statistics is not None and os.path.exists(statistics):
        stats = Statistics.load(statistics)
        check_statistics_source(stats, statistics, model_identity(model), calibration, calibration_options)
    if stats is not None:
        if gram and any(s.gram is None for s in stats.mlp):
            raise SecateursError("dense reconstruction needs statistics with Gram matrices; these have none (collect "
                                 "them with gram=True, or use sequential reconstruction)")
        return stats
    calibration = as_calibration(calibration, tokenizer, model=model, options=calibration_options)
    stats = collect_statistics(model, calibration, progress=progress, gram=gram)
    if statistics is not None:
        stats.description["model"] = model_identity(model)
        stats.save(statistics)
    return stats


def check_statistics_source(stats: Statistics, path, identity: str, calibration, calibration_options) -> None:
    """Refuse statistics made on another model or with other calibration settings than asked for."""
    made_on = stats.description.get("model")
    if made_on != identity:
        made_on = made_on or "unrecorded: an older secateurs"
        raise SecateursError(f"statistics file {path} was made on another model ({made_on} vs this model's "
                             f"{identity}); delete it or give another --stats path")
    recorded = stats.description.get("calibration") or {}
    settings = ("num_samples", "max_length", "seed")
    if isinstance(calibration, Calibration):
        asked = {k: calibration.description.get(k) for k in ("source", *settings)}
    else:
        options = calibration_options or {}  # only what the caller asked for explicitly is compared
        asked = {**({"source": calibration} if calibration is not None else {}),
                 **{k: options[k] for k in settings if options.get(k) is not None}}
    differs = {k: (recorded.get(k), v) for k, v in asked.items() if recorded.get(k) != v}
    if differs:
        detail = ", ".join(f"{k}: file {a!r} vs asked {b!r}" for k, (a, b) in differs.items())
        raise SecateursError(f"statistics file {path} was made with other calibration settings ({detail}); delete it, "
                             "give another --stats path, or ask for the settings it was made with")
    if isinstance(calibration, Calibration) and stats.description.get("calibration_hash") != calibration.hash:
        raise SecateursError(f"statistics file {path} was made on other calibration data than the one given")


def run_calibration(model, tokenizer, calibration=None, statistics=None, options: dict | None = None) -> Calibration:
    """The calibration data of a run: as given; else, when statistics (an object, or a file that
    exists) were made earlier, the very data they were made on, so that a split search and a
    re-fit see what the scores saw (not silently the default source); else the default source."""
    if calibration is None and statistics is not None:
        description = statistics.description if isinstance(statistics, Statistics) else (
            Statistics.read_description(statistics) if os.path.exists(statistics) else None)
        if description is not None:
            return recorded_calibration(description, statistics, tokenizer, model, options or {})
    return as_calibration(calibration, tokenizer, model=model, options=options)


def recorded_calibration(description: dict, where, tokenizer, model, options: dict) -> Calibration:
    recorded = description.get("calibration") or {}
    name = where if isinstance(where, str) else "the statistics given"
    if tokenizer is None:
        raise SecateursError(f"this run needs the calibration data behind {name} again (split search, re-fit), and "
                             "no tokenizer was given to read it: pass the tokenizer, or split='balanced' and "
                             "reconstruct='none'")
    if not recorded.get("source"):
        raise SecateursError(f"{name} records no calibration source, and this run needs the calibration data again "
                             "(split search, re-fit): give it with --calib")
    settings = {k: recorded[k] for k in ("num_samples", "max_length", "seed", "batch_size") if k in recorded}
    calibration = load_calibration(recorded["source"], tokenizer, model=model, **{**settings, **options})
    if description.get("calibration_hash") not in (None, calibration.hash):
        raise SecateursError(f"{name} was made on calibration data from {recorded['source']} that no longer reads the "
                             "same (the file changed?); give the calibration data with --calib, or delete the "
                             "statistics file")
    return calibration
