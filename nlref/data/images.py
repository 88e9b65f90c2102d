"""Clean test signals in [0, 1], float32, as NumPy arrays.

Move them to another library with ``xp.asarray(...)`` (for CuPy: one line,
``cupy.asarray(nlref.data.camera())``). The images are scikit-image's bundled
ones; the volume and the video are built procedurally, so nothing is fetched.
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import backend as B

__all__ = ["camera", "astronaut", "volume", "video", "waves"]


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int(name, value, what):
    """``value`` as a positive int (Python's or NumPy's, not a bool); else a ValueError naming ``name``."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 ({what}); got {value!r}")
    return int(value)


def _ints(name, value, count, minimum, what):
    """``value`` as a tuple of ``count`` ints (>= ``minimum`` unless it is None); else a ValueError naming ``name``."""
    try:
        items = tuple(value)
    except TypeError:
        items = None
    if (items is None or len(items) != count
            or not all(_is_int(v) and (minimum is None or v >= minimum) for v in items)):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be {count} ints{bound} {what}; got {value!r}")
    return tuple(int(v) for v in items)


def _unit(a):
    return (np.asarray(a, dtype=np.float32) / 255.0).astype(np.float32)


def camera():
    """The 512x512 grey ``camera`` image of scikit-image, float32 in [0, 1]."""
    from skimage import data

    return _unit(data.camera())


def astronaut():
    """The 512x512x3 colour ``astronaut`` image of scikit-image, float32 in [0, 1]."""
    from skimage import data

    return _unit(data.astronaut())


def volume(shape=(48, 64, 64), *, seed=0):
    """A smooth 3-D test volume: overlapping soft-edged balls of several intensities.

    Parameters
    ----------
    shape : (int, int, int)
        Depth, rows and columns, each at least 1.
    seed : int, numpy.random.Generator or None
        Where the balls are; the same seed gives the same volume.

    Returns
    -------
    vol : ndarray, shape ``shape``, float32 in [0, 1]
    """
    shape = _ints("shape", shape, 3, 1, "(depth, rows, cols)")
    rng = B.rng(seed)
    grids = np.meshgrid(*(np.linspace(0.0, 1.0, n, dtype=np.float32) for n in shape), indexing="ij")
    vol = np.full(shape, 0.2, dtype=np.float32)
    for _ in range(12):
        centre = rng.uniform(0.15, 0.85, size=3)
        radius = rng.uniform(0.08, 0.25)
        level = rng.uniform(0.3, 1.0)
        r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre)))
        inside = 1.0 / (1.0 + np.exp((r - radius) / 0.01))
        vol = vol * (1 - inside) + level * inside
    return vol.astype(np.float32)


def waves(ranges):
    """A piece of an unbounded smooth signal: sums of sines, 0.2 to 0.8, at global sample positions.

    Any piece can be made on its own and agrees with every other piece, so a
    volume of any size can be generated (and re-generated) chunk by chunk:
    the Dask example and benchmark build terabyte-scale test data this way.

    Parameters
    ----------
    ranges : sequence of (int, int)
        ``(start, stop)`` per axis: the piece ``[start, stop)`` of each axis.

    Returns
    -------
    piece : ndarray, float32, shape ``(stop - start, ...)``
    """
    try:
        pairs = [tuple(r) for r in ranges]
    except TypeError:
        pairs = None
    if (not pairs or any(len(p) != 2 or not all(_is_int(v) for v in p)
                         or p[0] >= p[1] for p in pairs)):
        raise ValueError(f"ranges must be a non-empty sequence of (start, stop) int pairs with start < stop, one per "
                         f"axis; got {ranges!r}")
    axes = [np.arange(lo, hi, dtype=np.float64) for lo, hi in ranges]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    wave = sum(np.sin(g / (9.0 + 4 * i)) for i, g in enumerate(grids)) / len(grids)
    return (0.5 + 0.3 * wave).astype(np.float32)


def video(frames=8, size=128, *, step=(2, 3)):
    """A short grey video: a ``size`` x ``size`` window panning across ``camera``.

    Frame ``t`` is the crop starting at ``(96 + t*step[0], 160 + t*step[1])``:
    real image content with uniform motion, the case multi-frame denoisers
    are built for. ``frames`` and ``size`` are ints >= 1, ``step`` two ints (negative
    pans up or left); the whole pan must stay inside the 512x512 image.

    Returns
    -------
    clip : ndarray, shape (frames, size, size), float32 in [0, 1]
    """
    frames = _int("frames", frames, "the number of frames")
    size = _int("size", size, "the frames' height and width")
    step = _ints("step", step, 2, None, "(rows, cols moved per frame)")
    img = camera()
    y0, x0 = 96, 160
    last = (y0 + (frames - 1) * step[0], x0 + (frames - 1) * step[1])
    if (min(y0, last[0]) < 0 or max(y0, last[0]) + size > img.shape[0]
            or min(x0, last[1]) < 0 or max(x0, last[1]) + size > img.shape[1]):
        raise ValueError(f"frames={frames}, size={size}, step={step} pan beyond the 512x512 camera image")
    return np.stack(
        [img[y0 + t * step[0] : y0 + t * step[0] + size, x0 + t * step[1] : x0 + t * step[1] + size] for t in range(frames)]
    )
