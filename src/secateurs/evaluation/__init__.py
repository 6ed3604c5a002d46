"""Evaluation: perplexity now; zero-shot and speed arrive with the evaluation issue."""
