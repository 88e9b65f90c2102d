"""Image quality: mean squared error and PSNR (array-agnostic)."""

from __future__ import annotations

import math
import numbers
import warnings

from ._typing import Array
from .backend import array_namespace, check_not_masked, dtype_name, require_real

__all__ = ["mse", "psnr"]

#: The value range PSNR assumes when ``data_range`` is not given, by the reference's dtype.
DEFAULT_RANGES = {"uint8": 255.0, "uint16": 65535.0}


def _check_pair(reference, estimate):
    """The namespace of two images of one shape, not empty, of real numbers (or bools), finite.

    A TypeError or ValueError naming the argument otherwise: a NaN gave a NaN PSNR, an inf a
    bare "math domain error", an empty pair NaN, and a complex image lost its imaginary part.
    """
    xp = array_namespace(reference, estimate, names=["reference", "estimate"])
    for name, a in (("reference", reference), ("estimate", estimate)):
        check_not_masked(a, name)
        require_real(a, name, bools=True)
    if tuple(reference.shape) != tuple(estimate.shape):
        raise ValueError(f"reference and estimate must have one shape; got {reference.shape} and {estimate.shape}")
    if math.prod(reference.shape) == 0:
        raise ValueError(f"reference and estimate are empty (shape {tuple(reference.shape)}): there is no error to "
                         "measure")
    for name, a in (("reference", reference), ("estimate", estimate)):
        if xp.isdtype(a.dtype, "real floating") and not bool(xp.all(xp.isfinite(a))):
            raise ValueError(f"{name} contains NaN or Inf values: the error of such an image is not a number")
    return xp


def _mse(xp, reference, estimate):
    d = xp.astype(reference, xp.float64) - xp.astype(estimate, xp.float64)
    return float(xp.mean(d * d))


def mse(reference: Array, estimate: Array) -> float:
    """Mean squared error as a Python float (computed in float64 on the device).

    Both images have one shape, hold real numbers (or bools) and are finite.
    """
    return _mse(_check_pair(reference, estimate), reference, estimate)


def psnr(reference: Array, estimate: Array, *, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range**2 / mse)`` in dB.

    ``data_range`` defaults to 255 for uint8 references, 65535 for uint16 and
    1.0 for floating point (images in [0, 1]) and bool. Other integer references
    (int8, int16, int32, int64, ...) have no such convention: pass ``data_range``.
    Identical images give ``inf``.
    """
    xp = _check_pair(reference, estimate)
    if data_range is None:
        peaks = [float(xp.max(xp.abs(xp.astype(a, xp.float64)))) for a in (reference, estimate)]
        if min(peaks) > 0 and max(peaks) > 32 and min(peaks) <= 4:
            warnings.warn(f"reference (values up to {peaks[0]:g}) and estimate (values up to {peaks[1]:g}) look like "
                          "images in different units (0..255 and 0..1): convert one first, e.g. multiply the 0..1 "
                          "one by 255", UserWarning, stacklevel=2)
        name = dtype_name(reference.dtype)
        if name in DEFAULT_RANGES:
            data_range = DEFAULT_RANGES[name]
        elif xp.isdtype(reference.dtype, "integral"):
            raise ValueError(f"data_range must be given for a reference of dtype {name}: nlref assumes 255 for uint8, 65535 "
                             "for uint16 and 1.0 for floats, and an int image has no such convention (a 0..255 "
                             "image stored as int64 would be scored on a range of 1); pass the images' value range, "
                             "e.g. data_range=255")
        else:
            data_range = 1.0
    elif (isinstance(data_range, bool) or not isinstance(data_range, numbers.Real) or not math.isfinite(data_range)
          or data_range <= 0):
        raise ValueError(f"data_range must be a positive number (the images' value range, e.g. 1.0 or 255); "
                         f"got {data_range!r}")
    err = _mse(xp, reference, estimate)
    if err == 0:
        return math.inf
    try:
        return 10.0 * math.log10(data_range**2 / err)
    except OverflowError:  # data_range above about 1e154: its square is not a float
        return 20.0 * math.log10(data_range) - 10.0 * math.log10(err)
