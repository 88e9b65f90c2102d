"""Image quality: mean squared error and PSNR (array-agnostic)."""

from __future__ import annotations

import math
import numbers
import warnings

from ._typing import Array
from .backend import array_namespace, dtype_name

__all__ = ["mse", "psnr"]


def mse(reference: Array, estimate: Array) -> float:
    """Mean squared error as a Python float (computed in float64 on the device)."""
    xp = array_namespace(reference, estimate, names=["reference", "estimate"])
    if tuple(reference.shape) != tuple(estimate.shape):
        raise ValueError(f"reference and estimate must have one shape; got {reference.shape} and {estimate.shape}")
    d = xp.astype(reference, xp.float64) - xp.astype(estimate, xp.float64)
    return float(xp.mean(d * d))


def psnr(reference: Array, estimate: Array, *, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range**2 / mse)`` in dB.

    ``data_range`` defaults to 255 for uint8 references, 65535 for uint16 and
    1.0 for floating point (images in [0, 1]).
    """
    xp = array_namespace(reference, estimate, names=["reference", "estimate"])  # a clear error for bad input
    if data_range is None and tuple(reference.shape) == tuple(estimate.shape) and math.prod(reference.shape):
        peaks = [float(xp.max(xp.abs(xp.astype(a, xp.float64)))) for a in (reference, estimate)]
        if min(peaks) > 0 and max(peaks) > 32 and min(peaks) <= 4:
            warnings.warn(f"reference (values up to {peaks[0]:g}) and estimate (values up to {peaks[1]:g}) look like "
                          "images in different units (0..255 and 0..1): convert one first, e.g. multiply the 0..1 "
                          "one by 255", UserWarning, stacklevel=2)
    if data_range is None:
        data_range = {"uint8": 255.0, "uint16": 65535.0}.get(dtype_name(reference.dtype), 1.0)
    elif (isinstance(data_range, bool) or not isinstance(data_range, numbers.Real) or not math.isfinite(data_range)
          or data_range <= 0):
        raise ValueError(f"data_range must be a positive number (the images' value range, e.g. 1.0 or 255); "
                         f"got {data_range!r}")
    err = mse(reference, estimate)
    return math.inf if err == 0 else 10.0 * math.log10(data_range**2 / err)
