"""Range-checked numeric flag types, shared by every command's parser.

    p.add_argument("--num-shards", type=flags.integer(1))
    p.add_argument("--target-shard-mb", type=flags.number(0, low_open=True))

A value out of range (or not a finite number) is an `argparse.ArgumentTypeError`, which
`errors.ArgumentParser` turns into one line naming the flag, exit 2.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _range(low: float | None, high: float | None, low_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"<= {high:g}")
    return " and ".join(parts)


def _checked(kind: str, convert, low, high, low_open: bool) -> Callable[[str], float]:
    wanted = f"{kind} {_range(low, high, low_open)}".strip()

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.__name__ = kind.replace(" ", "_")  # argparse names the type in some messages
    return parse


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (either bound optional)."""
    return _checked("an integer", int, low, high, False)


def number(
    low: float | None = None, high: float | None = None, *, low_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite float in [low, high], or (low, high] with `low_open`."""
    return _checked("a number", float, low, high, low_open)


positive_int = integer(1)
non_negative_int = integer(0)
fraction = number(0.0, 1.0)
positive_number = number(0.0, low_open=True)
non_negative_number = number(0.0)
