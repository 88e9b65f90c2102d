"""The checks every NL-means input shares, on its shape and dtype (and, in memory, its values).

The bottom of :mod:`nlref.nlmeans`: every other module may import from here,
this module imports none of them. The checks read the shape and dtype only,
never the data, except :func:`check_image` (an in-memory array, whose
finiteness check is one cheap pass).
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings

import numpy as np

from ..backend import array_namespace, check_not_masked, dtype_name, require_real

__all__ = ["MAX_SPATIAL_DIMS", "AGGREGATIONS", "sizes", "positive", "pixel_index", "check_kernel",
           "is_dask_array", "check_not_stored", "check_axes", "check_image", "check_lazy", "check_workers",
           "sigma_axes", "layout_doubt", "warn_layout"]

#: The most spatial axes an image may have (plus an optional channel axis).
MAX_SPATIAL_DIMS = 4


#: The error for an image holding NaN or Inf (every route says the same).
NOT_FINITE = ("image contains NaN or Inf values; NL-means needs finite input (replace them first, by interpolation "
              "or numpy.nan_to_num)")

#: The values of ``aggregation``, pixel-wise or patch-wise estimates.
AGGREGATIONS = ("pixel", "patch")


def sizes(name, value, spatial):
    """An int or one int per spatial axis -> tuple of odd positive ints."""
    d = len(spatial)
    if isinstance(value, (bool,)) or not (isinstance(value, numbers.Integral) or isinstance(value, (tuple, list))):
        raise TypeError(f"{name} must be an odd int or a tuple of {d} odd ints; got {value!r}")
    widths = (value,) * d if isinstance(value, numbers.Integral) else tuple(value)
    if len(widths) != d:
        raise ValueError(f"{name}={value!r} must give one size per spatial axis ({d} for shape {spatial})")
    for s in widths:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"{name} must hold ints; got {value!r}")
        if s < 1 or s % 2 == 0:
            raise ValueError(f"{name}={value!r}: sizes are full odd widths (1, 3, 5, ...), got {s}")
    return tuple(int(s) for s in widths)


def positive(name, value, allow_zero):
    """A finite real ``value`` >= 0 (or > 0), as float; else a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        allowed = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {allowed}; got {value}")
    return value


def pixel_index(index, spatial):
    """``index`` as a tuple of one in-range int per spatial axis (a bare int for a 1-D signal)."""
    example = "(row, col)" if len(spatial) == 2 else f"a tuple of {len(spatial)} ints"
    if isinstance(index, numbers.Integral) and not isinstance(index, bool):
        if len(spatial) != 1:
            raise ValueError(f"index must give one coordinate per spatial axis of shape {spatial}, e.g. "
                             f"{example}; got the single int {index!r}")
        index = (index,)
    if not isinstance(index, (tuple, list)) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in index):
        raise TypeError(f"index must be {example} (one int per spatial axis of shape {spatial}); got {index!r}")
    index = tuple(int(i) for i in index)
    if len(index) != len(spatial) or not all(0 <= i < n for i, n in zip(index, spatial)):
        raise ValueError(f"index must give one in-range coordinate per spatial axis of shape {spatial}; got {index}")
    return index


def check_kernel(func, v, *, h, sigma, patch_size, search_size, aggregation="pixel", index=None):
    """The arguments of the channel-first kernels (:mod:`.naive`, :func:`.fast.nl_means_fast`), checked.

    ``v`` must be a float32 or float64 array of shape (C, n_0, ..., n_{d-1}); ``h`` > 0 and
    ``sigma`` >= 0 finite; ``patch_size`` and ``search_size`` odd widths (an int or one per
    spatial axis); ``index``, where given, as :func:`pixel_index` takes it. Returns
    ``(h, sigma, patch_size, search_size, index)`` normalised (tuples of ints), or raises a
    TypeError or ValueError naming ``func`` and the argument. Shapes and dtypes only: no pass
    over the data.
    """
    array_namespace(v, names=["v"])  # an array of a known library, or a TypeError naming v
    check_not_masked(v, "v")
    if dtype_name(v.dtype) not in ("float32", "float64"):
        raise TypeError(f"{func}: v must be a float32 or float64 array (the working dtype), got dtype "
                        f"{dtype_name(v.dtype)}")
    if v.ndim < 2 or math.prod(v.shape) == 0:
        raise ValueError(f"{func}: v must be channel-first, shape (C, n_0, ..., n_(d-1)) with d >= 1 and no empty "
                         f"axis, got shape {tuple(v.shape)}")
    spatial = tuple(v.shape[1:])
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"{func}: aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")
    h, sigma = positive("h", h, allow_zero=False), positive("sigma", sigma, allow_zero=True)
    patch_size, search_size = sizes("patch_size", patch_size, spatial), sizes("search_size", search_size, spatial)
    if index is not None:
        index = pixel_index(index, spatial)
    return h, sigma, patch_size, search_size, index


def is_dask_array(x):
    """Whether ``x`` is a ``dask.array.Array`` (without importing dask)."""
    module = sys.modules.get("dask.array")
    return module is not None and isinstance(x, module.Array)


def check_not_stored(image, name="image"):
    """Refuse a Zarr array or HDF5 dataset where an in-memory array is expected, pointing to the chunked route.

    ``numpy.asarray`` would read the whole store into memory; the advice is
    :func:`nlref.nl_means_store` (or loading it knowingly, when it fits).
    """
    check_not_masked(image, name)
    library = type(image).__module__.split(".")[0]
    if library in ("zarr", "h5py"):
        raise TypeError(f"{name} is a {library} {type(image).__name__}, an array in a store: denoise it chunk by chunk "
                        f"with nlref.nl_means_store({name}, chunks=...), or, if it fits in memory, load it first "
                        f"with {name}[...]")


def check_axes(shape, channel_axis):
    """Validate the channel axis against ``shape``; return (channel_axis, spatial_shape).

    The checks every input shares, in memory, on Dask and in a store: they
    read the shape only, never the data.
    """
    ndim = len(shape)
    if channel_axis is not None:
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, numbers.Integral):
            raise TypeError(f"channel_axis must be an int or None; got {channel_axis!r}")
        if not -ndim <= channel_axis < ndim:
            raise ValueError(
                f"channel_axis={channel_axis} is out of range for an image with {ndim} axes "
                f"(allowed: {-ndim} .. {ndim - 1}, or None)"
            )
        channel_axis = int(channel_axis) % ndim
    spatial = tuple(n for i, n in enumerate(shape) if i != channel_axis)
    if not 1 <= len(spatial) <= MAX_SPATIAL_DIMS:
        raise ValueError(
            f"image must have 1 to {MAX_SPATIAL_DIMS} spatial axes (plus an optional channel_axis); "
            f"got shape {tuple(shape)} with channel_axis={channel_axis}"
        )
    if math.prod(shape) == 0:
        raise ValueError(f"image is empty (shape {tuple(shape)})")
    return channel_axis, spatial


def check_lazy(image, channel_axis):
    """The cheap checks of a lazy or stored array (dtype, axes, size), on its shape and dtype only.

    Returns (channel_axis, spatial_shape).
    """
    check_not_masked(image)
    dtype = np.dtype(image.dtype)
    if dtype.kind not in "iuf":
        raise TypeError(f"image must hold real numbers (integer or floating point); got dtype {dtype}")
    if any(math.isnan(n) for n in image.shape):
        raise ValueError(f"image has chunks of unknown size (shape {image.shape}); call compute_chunk_sizes() first")
    return check_axes(tuple(image.shape), channel_axis)


def check_image(image, channel_axis, *, stacklevel=3):
    """Validate an in-memory image and its channel axis; return (xp, channel_axis, spatial_shape).

    Refuses NaN and Inf (one pass over a float image) and warns where the
    shape suggests a missing or misplaced ``channel_axis``.
    """
    check_not_stored(image)
    xp = require_real(image, "image")
    given = channel_axis
    channel_axis, spatial = check_axes(tuple(image.shape), channel_axis)
    if not xp.isdtype(image.dtype, "integral") and not bool(xp.all(xp.isfinite(image))):
        raise ValueError(NOT_FINITE)
    warn_layout(image.shape, given, stacklevel=stacklevel + 1)  # one frame deeper than this function
    return xp, channel_axis, spatial


def layout_doubt(shape, channel_axis, given):
    """A message when the shape suggests that ``channel_axis`` is missing or points at the wrong axis.

    * ``(H, W, C)`` or ``(T, H, W, C)`` with C <= 4 and no ``channel_axis``: most likely a colour
      (or grey + alpha) image, which would be denoised as a volume of C slices;
    * a ``channel_axis`` with more than 4 entries while a spatial axis has at most 4
      (e.g. -1 on a channel-first ``(3, H, W)``), or more than 16 on a 2-D array (e.g. -1 on
      a grey ``(H, W)``, which would become W channels of a 1-D signal).
    """
    if channel_axis is None:
        if len(shape) in (3, 4) and shape[-1] <= 4 and min(shape[-3], shape[-2]) >= 16:
            return (f"image has shape {shape} and no channel_axis, so it is denoised as a volume with "
                    f"{shape[-1]} slice(s) along its last axis. For a colour image pass channel_axis=-1 "
                    "(and split off an alpha channel first: image[..., :-1]); for a volume, put the short "
                    "axis first (numpy.moveaxis(image, -1, 0)) and this warning goes away.")
        return None
    channels = shape[channel_axis]
    spatial = [(axis, n) for axis, n in enumerate(shape) if axis != channel_axis]
    short = [axis for axis, n in spatial if n <= 4]
    if channels > 4 and short:
        return (f"channel_axis={given} gives {channels} channels of shape {shape}, while axis {short[0]} "
                f"has only {shape[short[0]]} entries: did you mean channel_axis={short[0]}?")
    if channels > 16 and len(shape) == 2:
        return (f"channel_axis={given} on a 2-D array of shape {shape} makes it {channels} channels of a "
                f"1-D signal; a grey image takes channel_axis=None (the default).")
    return None


def check_workers(workers, default=1):
    """Threads: a positive int, or ``default`` for None (1 for a chunked run, where Dask already
    runs the chunks in parallel)."""
    if workers is None:
        return default
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"workers must be a positive int or None; got {workers!r}")
    return int(workers)


def sigma_axes(sizes, shape):
    """The indices of ``sizes`` (the spatial sizes) with at least 3 samples, the axes the noise
    estimate filters; a ValueError naming ``shape`` (the image's) when there is none."""
    axes = [a for a, n in enumerate(sizes) if n >= 3]
    if not axes:
        raise ValueError(f"image needs an axis with at least 3 samples to estimate sigma; shape {tuple(shape)}. "
                         "Pass sigma (or h and both sizes), which needs no estimate")
    return axes


def warn_layout(shape, channel_axis, stacklevel):
    """Warn (a UserWarning, ``stacklevel`` as ``warnings.warn`` counts it from here) where
    :func:`layout_doubt` doubts ``channel_axis`` for ``shape``: the chunked routes' form of what
    :func:`check_image` warns in memory (``(H, W, 3)`` on Dask was denoised as a 3-slice volume
    without a word)."""
    normal, _ = check_axes(tuple(shape), channel_axis)
    doubt = layout_doubt(tuple(shape), normal, channel_axis)
    if doubt:
        warnings.warn(doubt, UserWarning, stacklevel=stacklevel)
