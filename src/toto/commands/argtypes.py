"""Argument types for counts, sizes and rates: an impossible value (``--fps 0``, ``--n-codes 0``,
``--steps -3``) is refused when the line is parsed, with the option named, instead of being
replaced by a default or failing later with a traceback."""

from __future__ import annotations

import argparse
import math


def _number(kind, lowest: float, strict: bool):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(v) or (v <= lowest if strict else v < lowest):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lowest:g}, got {text}")
        return v

    parse.__name__ = f"{'positive' if strict else 'non-negative'} {kind.__name__}"  # argparse names it in errors
    return parse


positive_int = _number(int, 0, strict=True)
positive_float = _number(float, 0.0, strict=True)
nonnegative_int = _number(int, 0, strict=False)
nonnegative_float = _number(float, 0.0, strict=False)
