"""One evaluation of one model: perplexity under the chosen protocols plus zero-shot tasks. Used by
`secateurs eval` and `secateurs sweep`, so both write results in the same shape."""

from __future__ import annotations

from dataclasses import dataclass, field

from secateurs.errors import SecateursError
from secateurs.evaluation.perplexity import DEFAULT_MAX_BATCH_TOKENS, evaluate_perplexity, load_text, resolve_seq_len
from secateurs.evaluation.settings import EvaluationSettings
from secateurs.evaluation.zero_shot import parse_tasks, zero_shot
from secateurs.settings.values import parse_list


@dataclass
class EvalSpec:
    text: str | None = None            # perplexity text (already read), or None
    protocols: list[str] = field(default_factory=lambda: ["seq128"])
    batch_size: int = 8
    max_windows: int | None = None
    max_tokens: int | None = None
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    tasks: list[str] | None = None     # zero-shot task names, or None
    data_dir: str | None = None
    limit: int | float | None = None
    num_fewshot: int = 0
    eval_batch_size: int = 8

    @classmethod
    def from_settings(cls, settings: EvaluationSettings) -> tuple[EvalSpec, dict | None]:
        """(the spec of `settings`, with its text read; what load_text says of the text, or None),
        refusing settings that apply only with another and a spec with nothing to evaluate."""
        settings.check()
        text, text_info = (None, None)
        if settings.ppl:
            text, text_info = load_text(settings.ppl, field=settings.text_field or "text", max_docs=settings.max_docs)
        spec = cls(text=text, protocols=parse_list(settings.protocol, str, "protocols"), batch_size=settings.batch_size,
                   max_windows=settings.max_windows, max_tokens=settings.max_tokens,
                   max_batch_tokens=settings.max_batch_tokens,
                   tasks=parse_tasks(settings.tasks) if settings.tasks else None, data_dir=settings.data_dir,
                   limit=settings.items_per_task, num_fewshot=settings.num_fewshot,
                   eval_batch_size=settings.eval_batch_size)
        if spec.text is None and not spec.tasks:
            raise SecateursError("nothing to evaluate: give --ppl TEXT and/or --tasks NAMES")
        return spec, text_info

    def evaluated_tokens(self, model) -> int | None:
        """How many tokens of the text the perplexity reads at most (None: all of it): the share of a
        recovery's data that overlaps the evaluation is measured on these."""
        if self.max_windows is None:
            return self.max_tokens
        longest = max(resolve_seq_len(model, p)[1] for p in self.protocols)
        count = self.max_windows * longest
        return min(count, self.max_tokens) if self.max_tokens else count

    def check(self, model) -> None:
        """Fail before any work: no metric asked, or a window the model cannot take."""
        if self.text is None and not self.tasks:
            raise SecateursError("nothing to evaluate: give --ppl TEXT and/or --tasks NAMES")
        if self.text is not None:
            for p in self.protocols:
                resolve_seq_len(model, p)


def evaluate(model, tokenizer, spec: EvalSpec | EvaluationSettings, progress: bool = True) -> dict:
    """{"perplexity": [per protocol], "zero_shot": {...}} for one model; `spec` may be the
    EvaluationSettings (its text is read here)."""
    if isinstance(spec, EvaluationSettings):
        spec = EvalSpec.from_settings(spec)[0]
    spec.check(model)
    out: dict = {}
    if spec.text is not None:
        out["perplexity"] = evaluate_perplexity(
            model, tokenizer, spec.text, spec.protocols, batch_size=spec.batch_size, max_windows=spec.max_windows,
            max_tokens=spec.max_tokens, max_batch_tokens=spec.max_batch_tokens, progress=progress)
    if spec.tasks:
        out["zero_shot"] = zero_shot(model, tokenizer, spec.tasks, data_dir=spec.data_dir, limit=spec.limit,
                                     batch_size=spec.eval_batch_size, num_fewshot=spec.num_fewshot)
    return out
