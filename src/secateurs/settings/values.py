"""Argument types for the command line: every number is checked when it is parsed, so a bad value
is refused with a one-line message before any model is loaded."""

from __future__ import annotations

import argparse
import math

from secateurs.errors import SecateursError


class CommandLineError(Exception):
    """An argument argparse or a type below refused (the CLI prints it and exits with status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse that reports through the CLI's one error path instead of exiting from inside."""

    def error(self, message: str):
        raise CommandLineError(f"{self.prog}: {message} (see {self.prog} --help)")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def fraction(text: str) -> float:
    """A fraction of parameters to remove: [0, 1)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1)")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def nonnegative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def at_least(minimum: int):
    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} must be at least {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def int_in(minimum: int, maximum: int, why: str = ""):
    """A whole number in [minimum, maximum]; `why` says where the upper bound comes from."""
    def parse(text: str) -> int:
        value = _integer(text)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{text} is outside [{minimum}, {maximum:,}]" + (f" ({why})" if why else ""))
        return value

    parse.__name__ = f"integer in [{minimum}, {maximum}]"
    return parse


def float_in(low: float, high: float, why: str = "", low_open: bool = False, high_open: bool = False):
    """A finite number between low and high (each end closed unless *_open)."""
    def parse(text: str) -> float:
        value = finite_float(text)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {interval}" + (f" ({why})" if why else ""))
        return value

    parse.__name__ = "number"
    return parse


def thread_count(text: str) -> int:
    """Torch CPU threads: 1 up to the cores this process may run on (more only wait for each other)."""
    from secateurs.runtime.threads import affinity_cores

    value = positive_int(text)
    cores = affinity_cores()
    if value > cores:
        raise argparse.ArgumentTypeError(f"{text} threads, but this process may run on {cores} core(s); more threads "
                                         "than cores only wait for each other")
    return value


def task_prefix(text: str) -> str:
    """An lm-eval task name prefix: letters, digits, '_' and '.' (a name starting with '-' would read
    as an option on lm-eval's command line)."""
    import re

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
