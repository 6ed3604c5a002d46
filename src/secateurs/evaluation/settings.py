"""What an evaluation measures, declared once: `EvaluationSettings` holds the perplexity text and
protocols and the zero-shot tasks as the user gives them; `secateurs eval`, `sweep` and `demo` build
their flags from it (secateurs.settings.fields), and secateurs.evaluation.suite turns it into the
EvalSpec it runs (the text read, the protocols and tasks parsed). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from secateurs.errors import SecateursError
from secateurs.settings.fields import check_declared, from_keywords, option
from secateurs.settings.values import TOKENS, int_in, nonempty, positive_float, positive_int

PERPLEXITY, ZERO_SHOT = "perplexity", "zero-shot (lm-eval)"  # the --help groups
FEWSHOT = int_in(0, 64, "published few-shot settings use at most 25")
EVAL_BATCH = int_in(1, 4096, "lm-eval pads every request of a batch")
DEFAULT_MAX_BATCH_TOKENS = 8192  # tokens per forward pass of the perplexity windows


@dataclass(frozen=True)
class EvaluationSettings:
    """Perplexity on a text under one or more protocols, and zero-shot accuracy on lm-eval tasks."""

    ppl: str | None = option(None, "text file (e.g. wikitext-2-raw/wiki.test.raw) or C4-style .jsonl to measure "
                                   "perplexity on", flag=("--ppl", "--text"), group=PERPLEXITY, metavar="SOURCE",
                             type=nonempty)
    protocol: str = option("seq128", "comma list of seq128 (LLM-Pruner/FLAP), seq2048 (Wanda/SliceGPT), seq4096, "
                                     "context, or window lengths in tokens (default: {default})",
                           flag=("--protocol", "--seq-len"), group=PERPLEXITY, type=nonempty)
    batch_size: int = option(8, "windows per forward pass (default: {default})", group=PERPLEXITY, type=positive_int)
    max_batch_tokens: int = option(DEFAULT_MAX_BATCH_TOKENS, "cap on tokens per forward pass, bounds memory at long "
                                                             "windows (default: {default})",
                                   group=PERPLEXITY, type=positive_int)
    max_windows: int | None = option(None, "at most this many windows (default: {default})", unset="all",
                                     group=PERPLEXITY, type=positive_int)
    max_tokens: int | None = option(None, "use only the first N tokens of the text (quick runs)", group=PERPLEXITY,
                                    type=TOKENS)
    text_field: str | None = option(None, "field of .jsonl records holding the text (default: text)",
                                    group=PERPLEXITY, type=nonempty)
    max_docs: int | None = option(None, ".jsonl: use the first N documents (SparseGPT/Wanda C4: 1100)",
                                  group=PERPLEXITY, type=positive_int)
    tasks: str | None = option(None, "comma list, e.g. piqa,arc_easy,boolq,winogrande,openbookqa", group=ZERO_SHOT,
                               type=nonempty)
    data_dir: str | None = option(None, "folder of local task files NAME.jsonl (llm-foundry or HF format); tasks not "
                                        "found there come from lm-eval's registry (needs the hub)",
                                  group=ZERO_SHOT, type=nonempty)
    limit: float | None = option(None, "at most N items per task (a fraction if < 1) (default: {default})",
                                 unset="all", group=ZERO_SHOT, type=positive_float)
    num_fewshot: int = option(0, "few-shot examples (default: {default}; at most 64)", group=ZERO_SHOT, type=FEWSHOT)
    eval_batch_size: int = option(8, "lm-eval batch size (default: {default}; at most 4,096)", group=ZERO_SHOT,
                                  type=EVAL_BATCH)

    def __post_init__(self):
        check_declared(self)

    @classmethod
    def from_keywords(cls, keywords: dict) -> EvaluationSettings:
        return from_keywords(cls, keywords, "evaluation")

    @property
    def items_per_task(self) -> int | float | None:
        """`limit` as lm-eval takes it: a count (a whole number from 1 up) or a fraction below 1."""
        return int(self.limit) if self.limit is not None and self.limit >= 1 else self.limit

    def check(self) -> None:
        """Refuse settings that apply only with another (`secateurs eval` and `sweep`; the demo has
        defaults for the text and tasks)."""
        if self.data_dir and not self.tasks:
            raise SecateursError("--data-dir holds the task files of --tasks; it applies with --tasks")
        if self.limit is not None and not self.tasks:
            raise SecateursError("--limit caps the items of each zero-shot task; it applies with --tasks")
        jsonl = bool(self.ppl and str(self.ppl).endswith(".jsonl"))
        if self.text_field and not jsonl:
            raise SecateursError("--text-field names the field of .jsonl records holding the text; it applies with "
                                 "a --ppl .jsonl file")
        if self.max_docs and not jsonl:
            raise SecateursError("--max-docs counts the documents of a --ppl .jsonl file; it applies with one")
