r"""Chapter one: averaging N noisy copies of an image.

With independent Gaussian noise of standard deviation :math:`\sigma`,

.. math::

    v_k = u + n_k,\quad n_k \sim \mathcal N(0, \sigma^2 I),\qquad
    \bar v_N = \frac1N \sum_{k=1}^N v_k = u + \frac1N \sum_k n_k,

so the residual :math:`\bar v_N - u` is Gaussian with variance
:math:`\sigma^2 / N`: every doubling of the copies halves the noise variance,
a straight line of slope -1 on a log-log plot. NL-means is the same average
taken over *similar pixels of one image* instead of over copies.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Sequence

from ._typing import Array, Seed
from .backend import array_namespace, check_not_masked, dtype_name, normal, require_real

__all__ = ["add_gaussian_noise", "noisy_copies", "average", "residual_variance", "averaging_curve"]


def _float_dtype(xp, x):
    return x.dtype if xp.isdtype(x.dtype, "real floating") else xp.float32


def _check_image(x, name):
    """Refuse a masked array and anything but real numbers or bools (a complex image lost its imaginary part)."""
    check_not_masked(x, name)
    require_real(x, name, bools=True)


def _check_finite(xp, x, name):
    if xp.isdtype(x.dtype, "real floating") and not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name} contains NaN or Inf values; replace them first (numpy.nan_to_num, or by "
                         "interpolation)")


def _check_sigma(sigma):
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite real number >= 0; got {sigma!r}")
    return float(sigma)


def add_gaussian_noise(image: Array, sigma: float, *, seed: Seed = None) -> Array:
    """``image + sigma * n`` with ``n`` standard normal (seeded).

    Parameters
    ----------
    image : array
        Any shape; integer images are converted to float32 (values unchanged).
    sigma : float
        Noise standard deviation (>= 0), in image units.
    seed : int, numpy.random.Generator or None
        The same seed gives the same noise on every backend.

    Returns
    -------
    noisy : array, same shape, library and device as ``image``; floating point.
        The first of ``noisy_copies(image, sigma, n, seed=seed)``, for any ``n``.

    Warns (``UserWarning``) when ``sigma`` looks like the 0..255 versus 0..1 mix-up.
    """
    return _noisy_copies(image, sigma, 1, seed)[0, ...]


def _units_doubt(xp, image, sigma):
    """A message when ``sigma`` is in 0..255 units on a 0..1 image, or in 0..1 units on a 0..255 one."""
    if sigma == 0 or math.prod(image.shape) == 0:
        return None
    peak = float(xp.max(xp.abs(xp.astype(image, xp.float64))))
    if peak <= 4 and sigma > 4:
        return (f"sigma={sigma:g} on an image whose values lie within [-4, 4] (0..1 units): the noise would drown "
                f"the image; sigma is in the image's units, so 20 grey levels on a 0..1 image is sigma=20/255")
    if peak > 4 and not xp.isdtype(image.dtype, "real floating") and sigma < 0.5:
        return (f"sigma={sigma:g} on an integer image with values up to {peak:g} is less than half a unit; sigma is "
                f"in the image's units, so 20 grey levels on a uint8 image is sigma=20, not 20/255")
    return None


def noisy_copies(image: Array, sigma: float, n: int, *, seed: Seed = None) -> Array:
    """``n`` independent noisy copies of ``image``, stacked: shape ``(n, *image.shape)``.

    Warns (``UserWarning``) when ``sigma`` looks like the 0..255 versus 0..1 mix-up.
    """
    return _noisy_copies(image, sigma, n, seed)


def _noisy_copies(image, sigma, n, seed):
    """noisy_copies, with its warning pointed at the public function's caller."""
    xp = array_namespace(image, names=["image"])
    _check_image(image, "image")
    _check_finite(xp, image, "image")
    sigma = _check_sigma(sigma)
    doubt = _units_doubt(xp, image, sigma)
    if doubt:
        warnings.warn(doubt, UserWarning, stacklevel=3)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    n = int(n)
    dtype = _float_dtype(xp, image)
    if sigma > float(xp.finfo(dtype).max) / 16:  # a normal sample reaches 6: sigma * noise would be inf
        raise ValueError(f"sigma={sigma:g} is too large for {dtype_name(dtype)} noise (its largest value is "
                         f"{float(xp.finfo(dtype).max):g}): the noisy image would hold inf")
    noise = xp.astype(normal((n,) + tuple(image.shape), seed=seed, like=image), dtype)
    return xp.astype(image, dtype)[None, ...] + sigma * noise


def average(copies: Array | Sequence[Array], *, axis: int = 0) -> Array:
    """The pixel-wise mean of a stack of copies along ``axis``.

    Parameters
    ----------
    copies : array, or a list or tuple of arrays of one shape
        A stack (``noisy_copies``' output), or the copies themselves: ``average([a, b])``
        is the mean of ``a`` and ``b`` (they are stacked along ``axis`` first).
    axis : int
        The axis that counts the copies.

    Returns
    -------
    array, of the copies' library; integer copies are averaged in float32.
    """
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int; got {axis!r}")
    if isinstance(copies, (list, tuple)):
        if not copies:
            raise ValueError("copies is an empty list: give at least one array to average")
        names = [f"copies[{i}]" for i in range(len(copies))]
        xp = array_namespace(*copies, names=names)
        for name, c in zip(names, copies):
            _check_image(c, name)
        shapes = {tuple(c.shape) for c in copies}
        if len(shapes) > 1:
            raise ValueError(f"copies must all have one shape to be averaged; got shapes {sorted(shapes)}")
        dtypes = {c.dtype for c in copies}
        if len(dtypes) > 1:
            raise TypeError(f"copies must share one dtype; got {sorted(str(d) for d in dtypes)}: convert them first")
        copies = xp.stack(list(copies), axis=axis)
    else:
        xp = array_namespace(copies, names=["copies"])
        _check_image(copies, "copies")
    if not -copies.ndim <= axis < copies.ndim:
        raise ValueError(f"axis {axis} is out of range for copies with {copies.ndim} axes")
    if copies.shape[axis] == 0:
        raise ValueError(f"copies holds no copy along axis {axis} (shape {tuple(copies.shape)}): there is nothing "
                         "to average")
    return xp.mean(xp.astype(copies, _float_dtype(xp, copies)), axis=axis)


def residual_variance(estimate: Array, clean: Array) -> float:
    """Mean squared difference ``mean((estimate - clean)**2)`` as a Python float.

    Computed in the estimate's dtype when it is float32 or float64 (``clean`` is cast to it),
    else in float64: integer images would wrap around, a clean image cast to the estimate's
    integers would lose its fractions, and float16 squares overflow above 256.
    """
    xp = array_namespace(estimate, clean, names=["estimate", "clean"])
    for name, a in (("estimate", estimate), ("clean", clean)):
        _check_image(a, name)
    if tuple(estimate.shape) != tuple(clean.shape):
        raise ValueError(f"estimate and clean must have one shape; got {tuple(estimate.shape)} and "
                         f"{tuple(clean.shape)}")
    if math.prod(estimate.shape) == 0:
        raise ValueError(f"estimate and clean are empty (shape {tuple(estimate.shape)}): there is no residual")
    for name, a in (("estimate", estimate), ("clean", clean)):
        _check_finite(xp, a, name)
    if dtype_name(estimate.dtype) not in ("float32", "float64"):
        estimate = xp.astype(estimate, xp.float64)
    d = estimate - xp.astype(clean, estimate.dtype)
    return float(xp.mean(d * d))


def averaging_curve(image: Array, sigma: float, counts: Iterable[int], *, seed: Seed = 0) -> list[float]:
    """Measured residual variance of the average of N copies, for each N in ``counts``.

    The copies are drawn once (``max(counts)`` of them) and the first N are
    averaged, so the curve is one experiment, as in a lab.

    Returns
    -------
    variances : list of float
        ``variances[i]`` belongs to ``counts[i]``; compare with ``sigma**2 / N``.
    """
    if isinstance(counts, numbers.Integral) or not hasattr(counts, "__iter__"):
        raise TypeError(f"counts must be a sequence of positive ints (how many copies to average, e.g. "
                        f"[1, 2, 4, 8]); got {counts!r}")
    given = list(counts)
    if not given or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 1 for c in given):
        raise ValueError(f"counts must be positive ints; got {given!r}")
    counts = [int(c) for c in given]
    copies = noisy_copies(image, sigma, max(counts), seed=seed)
    return [residual_variance(average(copies[:n, ...]), image) for n in counts]
