"""Evaluation: perplexity under both paper protocols (perplexity.py), zero-shot accuracy through lm-eval
with offline task configs for local jsonl (zero_shot.py), one model's whole evaluation (suite.py), speed and
memory against a baseline (speed.py), and reports with plots (report.py).

Heavy dependencies (torch, lm-eval, matplotlib) are imported only by the modules that use them: the CLI's
parsers (secateurs.cli.evaluation) must not pay for them. Nothing here imports secateurs.methods."""
