"""Argument types for the benchmark scripts: a bad value is refused by argparse, before any work.

Each is given to ``parser.add_argument(..., type=...)``; argparse then prints
``argument --blocks: must be a whole number >= 1, got '0'`` and exits with status 2,
so a typo never costs minutes of measurements (or a 2 GB store) before a traceback.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def whole(minimum=1, *, odd=False):
    """An int at least ``minimum`` (and odd, if asked)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (odd and value % 2 == 0):
            raise argparse.ArgumentTypeError(f"must be {'an odd' if odd else 'a'} whole number >= {minimum}, "
                                             f"got {text!r}")
        return value
    return parse


def wholes(minimum=1, *, count=None):
    """A comma-separated list of ints, each at least ``minimum`` (``count`` of them, if given)."""
    def parse(text):
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            values = []
        if not values or min(values) < minimum or (count is not None and len(values) != count):
            size = f"{count} " if count is not None else ""
            raise argparse.ArgumentTypeError(f"must be {size}whole numbers >= {minimum} separated by commas, "
                                             f"e.g. {','.join([str(max(minimum, 64))] * (count or 2))}; got {text!r}")
        return values
    return parse


def positive(text):
    """A finite float above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def figure_path(text):
    """A file to save a figure to: its folder exists and its suffix is a format matplotlib writes."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    matplotlib.use("Agg")
    path = Path(text)
    formats = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise argparse.ArgumentTypeError(f"must end in a figure format ({', '.join('.' + f for f in sorted(formats))}), "
                                         f"got {text!r}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{str(path.parent)!r} is not an existing folder (from {text!r})")
    return path
