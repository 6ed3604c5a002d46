"""Argument types for the command line: every number is checked when it is parsed, so a bad value
is refused with a one-line message before any model is loaded. The numeric types (`Number`) also
check the values the library is given, with the same bounds and the same words."""

from __future__ import annotations

import argparse
import math
import re

from secateurs.errors import SecateursError
from secateurs.runtime.threads import affinity_cores


class CommandLineError(Exception):
    """An argument argparse or a type below refused (the CLI prints it and exits with status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse that reports through the CLI's one error path instead of exiting from inside."""

    def error(self, message: str):
        raise CommandLineError(f"{self.prog}: {message} (see {self.prog} --help)")


class Number:
    """A number within bounds, one object for both sides: called on command-line text it is an
    argparse type (argparse.ArgumentTypeError), and `check(name, value)` refuses a value given to the
    library (SecateursError) with the same words, so a bound is declared and worded once.

    `kind` is int or float (float: finite); `low`/`high` are the bounds (None: unbounded), each end
    closed unless *_open; `why` says where the bound comes from."""

    def __init__(self, kind: type, low: float | None = None, high: float | None = None, why: str = "",
                 low_open: bool = False, high_open: bool = False, name: str = "number"):
        self.kind, self.low, self.high, self.why = kind, low, high, why
        self.low_open, self.high_open, self.__name__ = low_open, high_open, name

    def __call__(self, text: str):
        value = _integer(text) if self.kind is int else _finite(text)
        problem = self.problem(value, text)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    def problem(self, value, shown: str) -> str | None:
        """What is wrong with `value` (written `shown`), or None."""
        low, high = self.low, self.high
        below = low is not None and (value < low or (self.low_open and value == low))
        if high is not None:  # an interval
            if not (below or value > high or (self.high_open and value == high)):
                return None
            ends = (f"{low:g}", f"{high:g}") if self.kind is float else (f"{low}", f"{high:,}")
            interval = f"{'(' if self.low_open else '['}{ends[0]}, {ends[1]}{')' if self.high_open else ']'}"
            return f"{shown} is outside {interval}" + (f" ({self.why})" if self.why else "")
        if not below:
            return None
        if low == 0 and not self.low_open:
            return f"{shown} must be 0 or more"
        return f"{shown} must be greater than {low:g}" if self.low_open else f"{shown} must be at least {low}"

    def check(self, name: str, value) -> None:
        """Refuse a library value of the wrong type or outside the bounds (None is left to the caller)."""
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise SecateursError(f"{name} must be a whole number, got {value!r}")
        if self.kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                                   or not math.isfinite(value)):
            raise SecateursError(f"{name} must be a finite number, got {value!r}")
        problem = self.problem(value, str(value))
        if problem:
            raise SecateursError(f"{name}: {problem}")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


finite_float = Number(float)
positive_float = Number(float, 0, low_open=True)
nonnegative_float = Number(float, 0)
positive_int = Number(int, 1)
nonnegative_int = Number(int, 0)


def fraction(text: str) -> float:
    """A fraction of parameters to remove: [0, 1)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1)")
    return value


def at_least(minimum: int) -> Number:
    return Number(int, minimum, name=f"integer >= {minimum}")


def int_in(minimum: int, maximum: int, why: str = "") -> Number:
    """A whole number in [minimum, maximum]; `why` says where the upper bound comes from."""
    return Number(int, minimum, maximum, why, name=f"integer in [{minimum}, {maximum}]")


def float_in(low: float, high: float, why: str = "", low_open: bool = False, high_open: bool = False) -> Number:
    """A finite number between low and high (each end closed unless *_open)."""
    return Number(float, low, high, why, low_open, high_open)


TOKENS = at_least(2)  # a token count (windows, sequences): one object, so every parser holds the same type


def thread_count(text: str) -> int:
    """Torch CPU threads: 1 up to the cores this process may run on (more only wait for each other)."""

    value = positive_int(text)
    cores = affinity_cores()
    if value > cores:
        raise argparse.ArgumentTypeError(f"{text} threads, but this process may run on {cores} core(s); more threads "
                                         "than cores only wait for each other")
    return value


def task_prefix(text: str) -> str:
    """An lm-eval task name prefix: letters, digits, '_' and '.' (a name starting with '-' would read
    as an option on lm-eval's command line)."""

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.]*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a task name prefix holds letters, digits, '_' and '.' (and does "
                                         "not start with '.')")
    return text


def finite_list(text: str) -> list[float]:
    """Comma-separated finite numbers (e.g. HARP's alpha grid)."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, none empty")
    return [finite_float(t) for t in items]


def name_list(text: str) -> list[str]:
    """Comma-separated names, none empty."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated names, none empty")
    return items


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value; give a path or name")
    return text


def parse_list(text: str, kind=str, what: str = "values") -> list:
    try:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise SecateursError(f"could not parse {what} {text!r}: {exc}") from exc
    if not items:
        raise SecateursError(f"no {what} given")
    return items
