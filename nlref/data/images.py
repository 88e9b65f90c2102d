"""Clean test signals in [0, 1], float32, as NumPy arrays.

Move them to another library with ``xp.asarray(...)`` (for CuPy: one line,
``cupy.asarray(nlref.data.camera())``). The images are scikit-image's bundled
ones; the volume and the video are built procedurally, so nothing is fetched.
"""

from __future__ import annotations

import numpy as np

__all__ = ["camera", "astronaut", "volume", "video", "waves"]


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

    Returns
    -------
    vol : ndarray, shape ``shape``, float32 in [0, 1]
    """
    rng = np.random.default_rng(seed)
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
    axes = [np.arange(lo, hi, dtype=np.float64) for lo, hi in ranges]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    wave = sum(np.sin(g / (9.0 + 4 * i)) for i, g in enumerate(grids)) / len(grids)
    return (0.5 + 0.3 * wave).astype(np.float32)


def video(frames=8, size=128, *, step=(2, 3)):
    """A short grey video: a ``size`` x ``size`` window panning across ``camera``.

    Frame ``t`` is the crop starting at ``(96 + t*step[0], 160 + t*step[1])``:
    real image content with uniform motion, the case multi-frame denoisers
    are built for.

    Returns
    -------
    clip : ndarray, shape (frames, size, size), float32 in [0, 1]
    """
    img = camera()
    y0, x0 = 96, 160
    if y0 + (frames - 1) * step[0] + size > img.shape[0] or x0 + (frames - 1) * step[1] + size > img.shape[1]:
        raise ValueError(f"frames={frames}, size={size}, step={step} pan beyond the 512x512 camera image")
    return np.stack(
        [img[y0 + t * step[0] : y0 + t * step[0] + size, x0 + t * step[1] : x0 + t * step[1] + size] for t in range(frames)]
    )
