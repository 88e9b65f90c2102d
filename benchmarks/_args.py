"""Argument types for the benchmark scripts: a bad value is refused by argparse, before any work.

Each is given to ``parser.add_argument(..., type=...)``; argparse then prints
``argument --blocks: 0 is not a whole number >= 1`` and exits with status 2, so a typo
never costs minutes of measurements (or a 2 GB store) before a traceback. They are the
commands' own argument type (``nlref.cli._common``) with the benchmarks' rules; seeds take
the commands' ``seed_arg``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from nlref.cli._common import _argument, seed_arg

__all__ = ["whole", "wholes", "positive", "seed_arg", "figure_path"]


def whole(minimum=1, *, odd=False):
    """An int at least ``minimum`` (and odd, if asked)."""
    what = f"{'an odd' if odd else 'a'} whole number >= {minimum}"
    return lambda text: _argument(text, int, "a whole number", lambda v: v >= minimum and (v % 2 or not odd),
                                  f"is not {what}")


def wholes(minimum=1, *, count=None):
    """A comma-separated list of ints, each at least ``minimum`` (``count`` of them, if given)."""
    what = f"a list of {f'{count} ' if count else ''}whole numbers >= {minimum} separated by commas"
    example = ",".join([str(max(minimum, 64))] * (count or 2))
    return lambda text: _argument(text, lambda t: [int(part) for part in t.split(",")], f"{what}, e.g. {example}",
                                  lambda v: min(v) >= minimum and len(v) == (count or len(v)),
                                  f"is not {what}, e.g. {example}")


def positive(text):
    """A finite float above 0."""
    return _argument(text, float, "a number", lambda v: math.isfinite(v) and v > 0, "is not a number above 0")


def figure_path(text):
    """A file to save a figure to: its folder exists and its suffix is a format matplotlib writes."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    matplotlib.use("Agg")
    path = Path(text)
    formats = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        suffixes = ", ".join("." + f for f in sorted(formats))
        raise argparse.ArgumentTypeError(f"must end in a figure format ({suffixes}), got {text!r}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{str(path.parent)!r} is not an existing folder (from {text!r})")
    from nlref._files import folder_problem

    try:  # a read-only folder or a full disk, said now rather than after minutes of measurements
        problem = folder_problem(path.parent)
    except OSError as err:
        problem = str(err)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return path
