"""Every method's options, as typed frozen dataclasses: the one declaration that the library checks
keywords against and that the command line builds its method flags and `prune --help` from.

Each field carries its flag, help and argparse type in its metadata (`option(...)`, from
secateurs.settings.fields, as every settings class's); its default is the library's default, stated in
the help. Kept without torch, so that `secateurs --help` answers at once; each method's file imports
its options class from here (`OPTIONS_BY_METHOD` says which class belongs to which method, and a test
checks the registry agrees).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from secateurs.errors import SecateursError
from secateurs.settings.fields import flag_of, option  # noqa: F401 - flag_of: this module's public name
from secateurs.settings.names import ALLOCATIONS, GQA_MODES, ROUNDINGS, SELECTIONS, SPLITS
from secateurs.settings.values import finite_list, fraction, name_list, nonnegative_int, positive_int

SPLIT_SAMPLES = 8  # calibration samples the split candidates are scored on
CONSENSUS_METRICS = ("cka", "cosine", "angular", "wasserstein", "procrustes", "permutation")
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))  # HARP's alpha search: 0.0, 0.1, ..., 1.0


def attention_split(text: str):
    """--split: a named rule or attention's share of the removed parameters in [0, 1]."""
    if text in SPLITS:
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"takes {', '.join(SPLITS)} or a share in [0, 1], got {text!r}")
    return value


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options: `from_keywords` refuses what the method does not take. The
    class declares what the methods using it are: their kind, the other names an option answers to
    (`aliases`: alias -> option) and the re-fit they default to (`reconstruct`, with balanced
    rounding; secateurs.methods.api.reconstruction_for). `given`: the options set explicitly."""

    title: ClassVar[str] = ""  # the --help group the flags of this class's own fields appear in
    kind: ClassVar[str] = "width"  # 'width' (heads, neurons), 'attention' (HARP) or 'depth' (whole layers)
    aliases: ClassVar[dict[str, str]] = {}
    reconstruct: ClassVar[str | None] = None
    given: frozenset = dataclasses.field(default=frozenset(), compare=False, repr=False, kw_only=True,
                                         metadata={"flag": None})

    @classmethod
    def option_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.name != "given"}

    @classmethod
    def canonical(cls, keywords: dict[str, Any]) -> dict[str, Any]:
        """`keywords` with each alias renamed to its option (an option given by its own name wins)."""
        out = dict(keywords)
        for alias, name in cls.aliases.items():
            if alias in out and name not in out:
                out[name] = out.pop(alias)
        return out

    @classmethod
    def from_keywords(cls, method: str, keywords: dict[str, Any]) -> MethodOptions:
        """The options of `keywords`; None for an option whose declared default is not None means
        'not given' (the declared default applies)."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        keywords = {k: v for k, v in cls.canonical(keywords).items() if v is not None or defaults.get(k, 0) is None}
        names = cls.option_names()
        unknown = sorted(k for k in keywords if k not in names)
        if unknown:
            detail = "; ".join(f"{k} applies to {', '.join(methods_taking(k)) or 'no method'}" for k in unknown)
            raise SecateursError(f"method {method!r} does not take {', '.join(unknown)} ({detail}); its options are: "
                                 f"{', '.join(sorted(names)) or 'none'}")
        return cls(**keywords, given=frozenset(keywords))


def _gqa_option() -> Any:
    return option("groups", "grouped-query attention: remove whole KV groups, or the same number of heads in each "
                            "group (FLAP: groups only)", choices=GQA_MODES)


def _split_option(default: str) -> Any:
    return option(default, "attention's share of the removed parameters: balanced (same fraction of head units as "
                           "of neurons), search (the candidate with the lowest calibration KL) or a number in [0, 1]; "
                           "a default search runs in memory with balanced rounding, else balanced",
                  type=attention_split, metavar="SPLIT")


@dataclass(frozen=True)
class WidthOptions(MethodOptions):
    """What every score-based width method takes (see secateurs.planning.budget and secateurs.planning.allocation)."""

    title: ClassVar[str] = "width methods (amp*, wanda-sp*, magnitude, random; see docs/guide/choose-a-method.md)"
    selection: str = option("standard", "standard: drop the lowest scores; reversed: drop the highest (sanity "
                                        "check); random", choices=SELECTIONS)
    gqa: str = _gqa_option()
    rounding: str = option("balanced", "balanced: closest to the target; paper: official AMP shapes; structures: "
                                       "--ratio is a fraction of heads and of neurons", choices=ROUNDINGS)
    round_to: int = option(1, "keep neuron counts a multiple of M", type=positive_int, metavar="M")
    allocation: str = option("uniform", "uniform: every layer the same widths (stock from_pretrained loads it); "
                                        "global: one threshold on per-layer standardised scores, layers differ "
                                        "(loads with load_pruned)",
                             choices=ALLOCATIONS)
    split: str | float = _split_option("balanced")
    split_samples: int = option(SPLIT_SAMPLES, "calibration samples the split candidates are scored on", flag=None)


@dataclass(frozen=True)
class AmpOptions(WidthOptions):
    title: ClassVar[str] = "AMP (amp, amp-heads, amp-mlp)"
    reconstruct: ClassVar[str | None] = "sequential"
    split: str | float = _split_option("search")
    averaging: str = option("prompt", "score averaging: per prompt then over prompts (the paper), or over all tokens",
                            choices=("prompt", "token"))


@dataclass(frozen=True)
class AmpPartOptions(AmpOptions):
    """The ablations that prune one part (amp-heads, amp-mlp): the stock budget, no re-fit by default."""

    reconstruct: ClassVar[str | None] = None
    split: str | float = _split_option("balanced")


@dataclass(frozen=True)
class FlapOptions(MethodOptions):
    gqa: str = _gqa_option()


@dataclass(frozen=True)
class DepthOptions(MethodOptions):
    title: ClassVar[str] = "depth methods (consensus, depth-*): remove whole decoder layers"
    kind: ClassVar[str] = "depth"
    layers: int | None = option(None, "remove K decoder layers (default: --ratio rounded to layers)",
                                type=positive_int, metavar="K")
    metrics: tuple | list | None = option(None, f"comma-separated consensus metrics (default: "
                                                f"{','.join(CONSENSUS_METRICS)}; also cka-unbiased, nll, bi)",
                                          type=name_list, metavar="M1,M2,...")
    iterative: bool = option(False, "remove one layer at a time, re-scoring the rest", action="store_true")
    protect_first: int = option(1, "never remove the first N layers", type=nonnegative_int, metavar="N")
    protect_last: int = option(1, "never remove the last N layers", type=nonnegative_int, metavar="N")
    max_tokens: int | None = option(2048, "score layers on a seeded subsample of N calibration tokens",
                                    flag="--depth-tokens", type=positive_int, metavar="N")


@dataclass(frozen=True)
class HarpOptions(MethodOptions):
    title: ClassVar[str] = "HARP (--method harp): identity-matrix attention in the top --top-layers layers"
    kind: ClassVar[str] = "attention"
    aliases: ClassVar[dict[str, str]] = {"layers": "top_layers"}  # --layers N: the top N layers
    top_layers: int | None = option(None, "the top N layers (default: the fewest that reach --ratio; --layers N is "
                                          "read as this for HARP)", type=positive_int, metavar="N")
    alpha_grid: tuple | list = option(ALPHA_GRID, "alpha values to search",
                                      type=finite_list, metavar="A,B,...")
    flap_ratio: float | None = option(None, "then prune R of all parameters from the MLPs with FLAP (as the paper "
                                            "pairs them)", type=fraction, metavar="R")


SEARCH_BUDGETS = ("params", "kv", "decode")
SEARCH_MLP_FRACTIONS = tuple(i / 8 for i in range(1, 8))  # MLP widths in the search's library: 1/8 .. 7/8 kept
SEARCH_SCORING_TOKENS = 512  # scoring tokens x vocabulary log-probabilities are held (SmolLM2: 100 MB)


@dataclass(frozen=True)
class SearchOptions(MethodOptions):
    title: ClassVar[str] = ("architecture search (--method search): one attention and one MLP variant per layer, "
                            "scored by KL, chosen under one budget")
    kind: ClassVar[str] = "search"
    reconstruct: ClassVar[str | None] = "sequential"
    budget: str = option("params", "what --ratio removes: params (of all parameters), kv (of the KV cache per "
                                   "token) or decode (of the decode time per token)", choices=SEARCH_BUDGETS)
    keep_first: int | None = option(None, "keep the first N layers dense (default: 1; 0 with --uniform, which keeps "
                                          "one shape in every layer)", type=nonnegative_int, metavar="N")
    keep_last: int = option(0, "keep the last N layers dense", type=nonnegative_int, metavar="N")
    uniform: bool = option(False, "one attention shape and one MLP width in every layer, no value path or removed "
                                  "block (stock from_pretrained loads the result)", action="store_true")
    max_attention_free: int | None = option(None, "at most N layers without attention scores (value path or "
                                                  "removed attention)", type=nonnegative_int, metavar="N")
    mlp_fractions: tuple | list = option(SEARCH_MLP_FRACTIONS, "MLP widths the library holds, as fractions of the "
                                                              "neurons kept", type=finite_list, metavar="F1,F2,...")
    scoring_tokens: int = option(SEARCH_SCORING_TOKENS, "calibration tokens (whole samples) the variants are scored "
                                                        "on", type=positive_int, metavar="N")
    rounds: int = option(1, "scoring rounds: 2 scores every variant again around the first round's choice",
                         flag="--search-rounds", type=int, choices=(1, 2), metavar="R")
    candidates: bool = option(True, "measure the whole-model KL of the program's choice and of its choices among "
                                    "MLP variants only, attention variants only and uniform shapes, and keep the "
                                    "least (--no-search-candidates: the program's choice as it is)",
                              flag="--search-candidates", action=argparse.BooleanOptionalAction)


# The one declaration of the methods by name (the registry's classes use the same options classes, a
# test checks it); their kinds are their options classes'.
OPTIONS_BY_METHOD: dict[str, type[MethodOptions]] = {
    "amp": AmpOptions, "amp-heads": AmpPartOptions, "amp-mlp": AmpPartOptions, "wanda-sp": WidthOptions,
    "wanda-sp-heads": WidthOptions, "flap": FlapOptions, "magnitude": WidthOptions, "random": WidthOptions,
    "harp": HarpOptions, "consensus": DepthOptions, "depth-bi": DepthOptions, "depth-angular": DepthOptions,
    "depth-cka": DepthOptions, "depth-ppl": DepthOptions, "depth-random": DepthOptions, "search": SearchOptions}
METHOD_NAMES = tuple(OPTIONS_BY_METHOD)
# each field's flag declared once, in this order
OPTION_CLASSES = (WidthOptions, AmpOptions, DepthOptions, HarpOptions, SearchOptions)


def methods_taking(name: str) -> list[str]:
    """The methods whose options include `name` (for the message refusing it elsewhere)."""
    return [m for m, cls in OPTIONS_BY_METHOD.items() if name in cls.option_names()]


def methods_of_kind(kind: str) -> tuple[str, ...]:
    """The methods of one kind ('width', 'attention', 'depth'), in declaration order."""
    return tuple(m for m, cls in OPTIONS_BY_METHOD.items() if cls.kind == kind)
