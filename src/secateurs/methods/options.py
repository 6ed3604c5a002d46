"""Every method's options, as typed frozen dataclasses: the one declaration that the library checks
keywords against and that the command line builds its method flags and `prune --help` from.

Each field carries its flag, help and argparse type in its metadata (`option(...)`); its default is
the library's default, stated in the help. Kept without torch, so that `secateurs --help` answers
at once; each method's file imports its options class from here (`OPTIONS_BY_METHOD` says which
class belongs to which method, and a test checks the registry agrees).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from secateurs.settings.values import finite_list, fraction, name_list, nonnegative_int, positive_int
from secateurs.errors import SecateursError
from secateurs.settings.names import (ALLOCATIONS, DEPTH_METHOD_NAMES, GQA_MODES, ROUNDINGS, SELECTIONS, SPLITS,
                             WIDTH_METHODS)

SPLIT_SAMPLES = 8  # calibration samples the split candidates are scored on
CONSENSUS_METRICS = ("cka", "cosine", "angular", "wasserstein", "procrustes", "permutation")


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


def option(default: Any, help: str, flag: str | None = "", **argparse_keywords) -> Any:
    """A dataclass field that is also a command-line flag: `flag` '' derives it from the field's name
    (--round-to for round_to), None keeps the option library-only."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help, "argparse": argparse_keywords})


def flag_of(f: dataclasses.Field) -> str | None:
    flag = f.metadata.get("flag", None)
    return "--" + f.name.replace("_", "-") if flag == "" else flag


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options: `from_keywords` refuses what the method does not take."""

    title: ClassVar[str] = ""  # the --help group the flags of this class's own fields appear in

    @classmethod
    def from_keywords(cls, method: str, keywords: dict[str, Any]) -> "MethodOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in keywords if k not in names)
        if unknown:
            detail = "; ".join(f"{k} applies to {', '.join(methods_taking(k)) or 'no method'}" for k in unknown)
            raise SecateursError(f"method {method!r} does not take {', '.join(unknown)} ({detail}); its options are: "
                                 f"{', '.join(sorted(names)) or 'none'}")
        return cls(**keywords)


def _gqa_option() -> Any:
    return option("groups", "grouped-query attention: remove whole KV groups, or the same number of heads in each "
                            "group (FLAP: groups only)", choices=GQA_MODES)


@dataclass(frozen=True)
class WidthOptions(MethodOptions):
    """What every score-based width method takes (see secateurs.planning.budget and secateurs.planning.allocation)."""

    title: ClassVar[str] = "width methods (amp*, wanda-sp*, magnitude, random; see README 'Beyond the paper')"
    selection: str = option("standard", "standard: drop the lowest scores; reversed: drop the highest (sanity "
                                        "check); random", choices=SELECTIONS)
    gqa: str = _gqa_option()
    rounding: str = option("balanced", "balanced: closest to the target; paper: official AMP shapes; structures: "
                                       "--ratio is a fraction of heads and of neurons", choices=ROUNDINGS)
    round_to: int = option(1, "keep neuron counts a multiple of M", type=positive_int, metavar="M")
    allocation: str | None = option(None, "uniform: every layer the same widths (stock from_pretrained loads it); "
                                          "global: one threshold on per-layer standardised scores, layers differ "
                                          "(loads with load_pruned) (default: uniform)",
                                    choices=ALLOCATIONS)
    split: str | float | None = option(None, "attention's share of the removed parameters: balanced (same fraction "
                                             "of head units as of neurons), search (the candidate with the lowest "
                                             "calibration KL) or a number in [0, 1] (default: search for amp in memory, "
                                             "else balanced)",
                                       type=attention_split, metavar="SPLIT")
    split_samples: int = option(SPLIT_SAMPLES, "calibration samples the split candidates are scored on", flag=None)


@dataclass(frozen=True)
class AmpOptions(WidthOptions):
    title: ClassVar[str] = "AMP (amp, amp-heads, amp-mlp)"
    averaging: str = option("prompt", "score averaging: per prompt then over prompts (the paper), or over all tokens",
                            choices=("prompt", "token"))


@dataclass(frozen=True)
class FlapOptions(MethodOptions):
    gqa: str = _gqa_option()


@dataclass(frozen=True)
class DepthOptions(MethodOptions):
    title: ClassVar[str] = "depth methods (consensus, depth-*): remove whole decoder layers"
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
    top_layers: int | None = option(None, "the top N layers (default: the fewest that reach --ratio; --layers N is "
                                          "read as this for HARP)", type=positive_int, metavar="N")
    alpha_grid: tuple | list | None = option(None, "alpha values to search (default: 0.0,0.1,...,1.0)",
                                             type=finite_list, metavar="A,B,...")
    flap_ratio: float | None = option(None, "then prune R of all parameters from the MLPs with FLAP (as the paper "
                                            "pairs them)", type=fraction, metavar="R")


_WIDTH_OPTIONS = {"amp": AmpOptions, "amp-heads": AmpOptions, "amp-mlp": AmpOptions, "flap": FlapOptions,
                  "harp": HarpOptions}
OPTIONS_BY_METHOD: dict[str, type[MethodOptions]] = {
    **{name: _WIDTH_OPTIONS.get(name, WidthOptions) for name in WIDTH_METHODS},
    **{name: DepthOptions for name in DEPTH_METHOD_NAMES}}
OPTION_CLASSES = (WidthOptions, AmpOptions, DepthOptions, HarpOptions)  # each field's flag declared once, in this order



def methods_taking(name: str) -> list[str]:
    """The methods whose options include `name` (for the message refusing it elsewhere)."""
    return [m for m, cls in OPTIONS_BY_METHOD.items() if name in {f.name for f in dataclasses.fields(cls)}]
