"""Parameters chosen from the noise level, after Buades, Coll & Morel (IPOL 2011).

IPOL's table gives, for a noise standard deviation ``sigma`` on the 0..255
scale, a patch size, a search-window size and ``h = factor * sigma``. The sizes
are used as published. The factors are not: IPOL tuned them for its own
patch-wise method, so nlref recalibrated them for each of its aggregations by
a sweep on bundled images (``benchmarks/calibrate_presets.py``; the results and
the command are in ``docs/nlmeans.md``). IPOL's factors are kept here for
comparison.

For volumes and videos (more than two spatial axes) the table applies to the
last two axes (the image plane); every leading axis (depth or time) gets a
3-sample patch and a 5-sample search window, and h a smaller factor where the
window reaches along a leading axis. All sizes are clipped to the
image: at most the largest odd number not above the axis length.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

__all__ = ["Preset", "IPOL_GREY", "IPOL_COLOUR", "H_FACTORS", "preset_for"]


@dataclass(frozen=True)
class Preset:
    """One row of the table: sigma bracket (upper bound, 0..255 scale) and sizes."""

    sigma_max: float
    patch: int
    search: int
    ipol_factor: float


# sigma_max, patch (full width), search window (full width), IPOL h / sigma
IPOL_GREY = (
    Preset(15, 3, 21, 0.40),
    Preset(30, 5, 21, 0.40),
    Preset(45, 7, 35, 0.35),
    Preset(75, 9, 35, 0.35),
    Preset(float("inf"), 11, 35, 0.30),
)
IPOL_COLOUR = (
    Preset(25, 3, 21, 0.55),
    Preset(55, 5, 35, 0.40),
    Preset(float("inf"), 7, 35, 0.35),
)

# nlref's calibrated h / sigma, per (colour, aggregation), one per table row;
# measured by benchmarks/calibrate_presets.py (see docs/nlmeans.md).
H_FACTORS = {
    (False, "pixel"): (0.90, 0.75, 0.55, 0.40, 0.35),
    (False, "patch"): (0.85, 0.70, 0.45, 0.35, 0.30),
    (True, "pixel"): (0.75, 0.50, 0.35),
    (True, "patch"): (0.65, 0.40, 0.30),
}

LEADING_AXIS_PATCH = 3
LEADING_AXIS_SEARCH = 5
# With three or more spatial axes h is this multiple of the 2-D value (more
# candidates per window: less smoothing per candidate is needed); measured by
# benchmarks/calibrate_presets.py --part 3d.
LEADING_AXES_H_SCALE = {"pixel": 0.90, "patch": 0.85}


def _largest_odd_at_most(n: int, value: int) -> int:
    return max(1, min(value, n if n % 2 else n - 1))


def preset_for(sigma_255, *, colour, aggregation, shape, search_size=None):
    """Patch size, search size and h factor for a noise level.

    Parameters
    ----------
    sigma_255 : float
        Noise standard deviation on the 0..255 scale.
    colour : bool
        Whether the image has channels (IPOL's colour table).
    aggregation : {"pixel", "patch"}
    shape : tuple of int
        Spatial shape of the image (sizes are clipped to it).
    search_size : tuple of int, optional
        The search window that will be used, where it is not the preset's (given by the
        caller). The leading-axis multiplier of h (``LEADING_AXES_H_SCALE``) applies only
        when this window reaches along a leading axis: a window one sample wide there (a
        clip of one or two frames, or ``search_size=(1, 21, 21)``) holds the candidates of
        the 2-D window, and takes the 2-D factor.

    Returns
    -------
    patch_size, search_size : tuple of int
    h_factor : float
        ``h = h_factor * sigma``.
    row : Preset
        The table row used.
    """
    if isinstance(sigma_255, bool) or not isinstance(sigma_255, numbers.Real) or not sigma_255 >= 0:
        raise ValueError(f"sigma_255 must be a number >= 0, got {sigma_255!r}")  # NaN too: not a bare StopIteration
    if not isinstance(colour, bool):  # a dict lookup took 1 for True and raised KeyError for "no"
        raise ValueError(f"colour must be True or False, got {colour!r}")
    if aggregation not in ("pixel", "patch"):
        raise ValueError(f"aggregation must be 'pixel' or 'patch', got {aggregation!r}")
    if (not isinstance(shape, (tuple, list)) or not shape
            or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in shape)):
        raise ValueError(f"shape must be a non-empty tuple of positive ints (the image's spatial shape), "
                         f"got {shape!r}")
    table = IPOL_COLOUR if colour else IPOL_GREY
    index = next(i for i, row in enumerate(table) if sigma_255 <= row.sigma_max)
    row = table[index]
    plane = len(shape) - 2
    patch, search = [], []
    for axis, n in enumerate(shape):
        leading = axis < plane
        patch.append(_largest_odd_at_most(n, LEADING_AXIS_PATCH if leading else row.patch))
        search.append(_largest_odd_at_most(n, LEADING_AXIS_SEARCH if leading else row.search))
    factor = H_FACTORS[(colour, aggregation)][index]
    window = tuple(search) if search_size is None else tuple(search_size)
    if any(width > 1 for width in window[:plane]):  # more candidates than the 2-D window: less h each
        factor *= LEADING_AXES_H_SCALE[aggregation]
    return tuple(patch), tuple(search), factor, row
