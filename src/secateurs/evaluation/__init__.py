"""Evaluation: perplexity (both paper protocols), zero-shot accuracy through lm-eval (offline task
configs for local jsonl), speed and memory against a baseline, and reports with plots.

Heavy dependencies (torch, lm-eval, matplotlib) are imported only when used: the CLI's parsers
(secateurs.cli.evaluation) must not pay for them. Nothing here imports secateurs.methods."""

from importlib import import_module

__all__ = ["PROTOCOLS", "evaluate_perplexity", "load_text", "perplexity", "read_text"]


def __getattr__(name: str):
    if name in __all__:
        value = getattr(import_module("secateurs.evaluation.perplexity"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'secateurs.evaluation' has no attribute {name!r}")
