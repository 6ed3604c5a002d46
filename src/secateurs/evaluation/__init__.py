"""Evaluation: perplexity (both paper protocols), zero-shot accuracy through lm-eval (offline task
configs for local jsonl), speed and memory against a baseline, and reports with plots.

Heavy optional dependencies (lm-eval, matplotlib) are imported only when used."""

from secateurs.evaluation.perplexity import PROTOCOLS, evaluate_perplexity, load_text, perplexity, read_text

__all__ = ["PROTOCOLS", "evaluate_perplexity", "load_text", "perplexity", "read_text"]
