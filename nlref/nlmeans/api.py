"""The public entry point :func:`nl_means`: checks, conventions, presets, dispatch."""

from __future__ import annotations

import math
import numbers
import os
import warnings

import numpy as np

from ..backend import dtype_name, require_real
from . import presets
from .chunked import _check_not_stored, is_dask_array, nl_means_dask, resolve_parameters_dask
from .fast import nl_means_fast, working_memory
from .naive import nl_means_naive, patch_weights
from .noise import estimate_sigma

__all__ = ["nl_means", "nl_means_weights", "resolve_parameters", "WORKING_MEMORY_LIMIT", "NAIVE_COMPARISON_LIMIT"]

#: The fast method refuses requests whose working memory (see
#: :func:`nlref.nlmeans.fast.working_memory`) exceeds this many bytes.
WORKING_MEMORY_LIMIT = 4 * 2**30

#: The naive method refuses more patch comparisons (pixels x offsets) than this:
#: it is the readable specification, meant for small inputs.
NAIVE_COMPARISON_LIMIT = 2_000_000

_AGGREGATIONS = ("pixel", "patch")
_METHODS = ("fast", "naive")
_MAX_SPATIAL_DIMS = 4


def _is_integer_dtype(xp, dtype):
    return xp.isdtype(dtype, "integral")


def _integer_range(dtype):
    info = np.iinfo(dtype_name(dtype))
    return float(info.min), float(info.max)


def _check_axes(shape, channel_axis):
    """Validate the channel axis against ``shape``; return (channel_axis, spatial_shape).

    The checks every input shares, in memory, on Dask and in a store
    (:mod:`.chunked`): they read the shape only, never the data.
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
    if not 1 <= len(spatial) <= _MAX_SPATIAL_DIMS:
        raise ValueError(
            f"image must have 1 to {_MAX_SPATIAL_DIMS} spatial axes (plus an optional channel_axis); "
            f"got shape {tuple(shape)} with channel_axis={channel_axis}"
        )
    if math.prod(shape) == 0:
        raise ValueError(f"image is empty (shape {tuple(shape)})")
    return channel_axis, spatial


def _check_image(image, channel_axis):
    """Validate the image and channel axis; return (xp, channel_axis, spatial_shape)."""
    _check_not_stored(image)
    xp = require_real(image, "image")
    given = channel_axis
    channel_axis, spatial = _check_axes(tuple(image.shape), channel_axis)
    if not _is_integer_dtype(xp, image.dtype) and not bool(xp.all(xp.isfinite(image))):
        raise ValueError("image contains NaN or Inf values; NL-means needs finite input (replace or mask them first)")
    layout = _layout_doubt(tuple(image.shape), channel_axis, given)
    if layout:
        warnings.warn(layout, UserWarning, stacklevel=3)
    return xp, channel_axis, spatial


def _layout_doubt(shape, channel_axis, given):
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


def _units_doubt(name, value, image, xp, data_range, peak=None):
    """A message when ``value`` (sigma or h) is far outside the image's value range.

    NL-means takes sigma and h in the units of the image values. ``sigma=20`` on an
    image in 0..1 (noise larger than the whole signal range) blurs it flat; ``sigma=0.08``
    on an image in 0..255 (a tenth of a grey level) leaves it unchanged. Both are the
    0..255 versus 0..1 mix-up. The range is ``data_range`` when given, else the one
    :func:`_default_data_range` reads from the dtype and values (1 for floats within
    [-4, 4], 255 for larger floats, the dtype's maximum for integers), from
    ``peak`` (the largest magnitude) where the caller has already read it.
    """
    if value <= 0:
        return None
    span = data_range if data_range is not None else _default_data_range(xp, image, peak)
    if data_range is not None:
        scale = f"data_range={data_range:g}"
    elif _is_integer_dtype(xp, image.dtype):
        scale = f"{dtype_name(image.dtype)}, 0..{span:g}"
    else:
        scale = "float values within [-4, 4], read as 0..1" if span == 1 else "float values beyond [-4, 4], read as 0..255"
    limit = span if name == "sigma" else 2 * span
    if value > limit:
        return (f"{name}={value:g} is larger than the whole value range of the image ({scale}): NL-means would "
                f"blur the image flat. {name} is in the image's units: if it is in grey levels (0..255) and the "
                f"image in 0..1, pass {name}={value / 255:.4g}.")
    if span >= 255 and value < 0.5:
        return (f"{name}={value:.4g} is less than half a unit of an image in grey levels ({scale}): NL-means "
                f"would leave the image almost unchanged. {name} is in the image's units: if it is in 0..1 units "
                f"and the image in 0..255, pass {name}={value * 255:.4g}.")
    return None


def _sizes(name, value, spatial):
    """An int or one int per spatial axis -> tuple of odd positive ints."""
    d = len(spatial)
    if isinstance(value, (bool,)) or not (isinstance(value, numbers.Integral) or isinstance(value, (tuple, list))):
        raise TypeError(f"{name} must be an odd int or a tuple of {d} odd ints; got {value!r}")
    sizes = (value,) * d if isinstance(value, numbers.Integral) else tuple(value)
    if len(sizes) != d:
        raise ValueError(f"{name}={value!r} must give one size per spatial axis ({d} for shape {spatial})")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"{name} must hold ints; got {value!r}")
        if s < 1 or s % 2 == 0:
            raise ValueError(f"{name}={value!r}: sizes are full odd widths (1, 3, 5, ...), got {s}")
    return tuple(int(s) for s in sizes)


def _positive(name, value, allow_zero):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        allowed = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {allowed}; got {value}")
    return value


def _default_data_range(xp, image, peak=None):
    """The signal range the preset table's 0..255 scale maps to (see nl_means); ``peak``: max |image|, if read."""
    if _is_integer_dtype(xp, image.dtype):
        lo, hi = _integer_range(image.dtype)
        return hi - lo if lo < 0 else hi
    if peak is None:
        peak = float(xp.max(xp.abs(image)))
    return 1.0 if peak <= 4.0 else 255.0


def resolve_parameters(image, *, sigma=None, h=None, patch_size=None, search_size=None,
                       channel_axis=None, aggregation="pixel", data_range=None):
    """The parameters :func:`nl_means` would use for these arguments.

    Returns
    -------
    params : dict
        ``sigma``, ``h``, ``patch_size``, ``search_size`` (tuples, one per
        spatial axis), ``sigma_source`` ("given", "estimated") and ``preset``
        (the table row, or None when every size and h were given).
    """
    if is_dask_array(image):
        return resolve_parameters_dask(image, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                                       channel_axis=channel_axis, aggregation=aggregation, data_range=data_range)
    xp, channel_axis, spatial = _check_image(image, channel_axis)
    return _resolve(xp, image, spatial, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                    channel_axis=channel_axis, aggregation=aggregation, data_range=data_range)


def _resolve(xp, image, spatial, *, sigma, h, patch_size, search_size, channel_axis, aggregation, data_range,
             peak=None):
    """resolve_parameters for an image already checked by _check_image.

    ``peak``: the largest magnitude of a float image when the caller has
    already read it (a lazy array, whose every read is a pass over the data).
    """
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {_AGGREGATIONS}; got {aggregation!r}")
    if sigma is not None:
        sigma = _positive("sigma", sigma, allow_zero=True)
    if h is not None:
        h = _positive("h", h, allow_zero=False)
    if patch_size is not None:
        patch_size = _sizes("patch_size", patch_size, spatial)
    if search_size is not None:
        search_size = _sizes("search_size", search_size, spatial)
    if data_range is not None:
        data_range = _positive("data_range", data_range, allow_zero=False)
    for name, value in (("sigma", sigma), ("h", h)):
        doubt = None if value is None else _units_doubt(name, value, image, xp, data_range, peak)
        if doubt:
            warnings.warn(doubt, UserWarning, stacklevel=3)

    source = "given"
    noise = sigma
    if sigma is None:
        # the preset needs a noise level even when h is given
        if h is None or patch_size is None or search_size is None:
            noise = estimate_sigma(image, channel_axis=channel_axis)
            source = "estimated"
        sigma = noise if h is None else 0.0

    row = None
    if h is None or patch_size is None or search_size is None:
        scale = 255.0 / (data_range if data_range is not None else _default_data_range(xp, image, peak))
        p, s, factor, row = presets.preset_for(
            noise * scale, colour=channel_axis is not None and image.shape[channel_axis] > 1,
            aggregation=aggregation, shape=spatial
        )
        patch_size = patch_size or p
        search_size = search_size or s
        if h is None:
            h = factor * sigma if sigma > 0 else None
        if h is None:
            raise ValueError(
                "cannot choose h: the noise level is 0 (a constant or noise-free image); pass h explicitly"
            )

    for axis, (p, n) in enumerate(zip(patch_size, spatial)):
        if p > n:
            raise ValueError(
                f"patch_size={patch_size} is larger than the image along spatial axis {axis} "
                f"({p} > {n} samples, image shape {tuple(image.shape)})"
            )
    return {
        "sigma": float(sigma),
        "h": float(h),
        "patch_size": patch_size,
        "search_size": search_size,
        "sigma_source": source,
        "preset": row,
    }


def _to_working(xp, image, channel_axis):
    """Channel-first floating-point copy: float64 stays float64, all else -> float32."""
    x = image if channel_axis is None else xp.moveaxis(image, channel_axis, 0)
    if channel_axis is None:
        x = x[None, ...]
    dtype = xp.float64 if image.dtype == xp.float64 else xp.float32
    return xp.astype(x, dtype)


def _from_working(xp, u, image, channel_axis):
    """Back to the caller's layout and dtype convention."""
    u = u[0, ...] if channel_axis is None else xp.moveaxis(u, 0, channel_axis)
    if _is_integer_dtype(xp, image.dtype):
        lo, hi = _integer_range(image.dtype)
        return xp.astype(xp.clip(xp.round(u), min=lo, max=hi), image.dtype)
    return xp.astype(u, image.dtype)


def nl_means(image, *, sigma=None, h=None, patch_size=None, search_size=None, channel_axis=None,
             aggregation="pixel", method="fast", data_range=None, workers=None, progress=False):
    r"""Non-local means denoising of an image, a colour image, a volume or a video.

    .. math::

        \hat u(p) = \frac{\sum_{q \in S(p)} w(p, q)\, v(q)}{\sum_{q \in S(p)} w(p, q)},
        \qquad w(p, q) = \exp\Big(-\frac{\max(d^2(p, q) - 2\sigma^2, 0)}{h^2}\Big),

    with :math:`d^2` the mean squared difference of the patches around
    :math:`p` and :math:`q` (over patch pixels and channels), :math:`S(p)` the
    search window and reflection at the borders.

    Parameters
    ----------
    image : array
        Grey ``(H, W)``, colour ``(H, W, C)`` with ``channel_axis``, volume
        ``(D, H, W)``, video ``(T, H, W[, C])``, or a 1-D signal; 1 to 4
        spatial axes. NumPy, CuPy, PyTorch or any array-API library; float of
        any range, or integer (see Notes).
    sigma : float, optional
        Noise standard deviation, in the units of the image values. Enables
        the ``2 sigma^2`` correction and, with the other arguments left out,
        the presets. Estimated (:func:`nlref.estimate_sigma`) when neither
        ``sigma`` nor ``h`` is given.
    h : float, optional
        Filter strength (> 0), in image units. Default ``factor * sigma`` from
        the preset table.
    patch_size, search_size : int or tuple of int, optional
        Full odd widths (``7`` is a 7x7 patch; ``(5, 21, 21)`` is 5 frames by
        21x21 pixels). Default from the preset table.
    channel_axis : int, optional
        Axis of the channels; patch distances average over channels.
    aggregation : {"pixel", "patch"}
        ``"pixel"``: each pixel is the weighted mean of the centres of similar
        patches. ``"patch"``: whole patches are denoised and every pixel takes
        the mean of all patch estimates covering it (IPOL 2011).
    method : {"fast", "naive"}
        ``"fast"``: the offset loop (:mod:`nlref.nlmeans.fast`). ``"naive"``:
        the definition with explicit loops, for small inputs (at most
        :data:`NAIVE_COMPARISON_LIMIT` patch comparisons).
    data_range : float, optional
        Span of the clean signal, used only to place ``sigma`` in the preset
        table (whose sigmas are on the 0..255 scale). Default: the dtype's
        maximum for integer images (255 for uint8); for floats 1.0 when every
        value lies within [-4, 4], else 255.
    workers : int, optional
        Threads for the fast method on NumPy (default: the CPU count, at most 8;
        for a Dask array, threads per chunk, default 1). The result is the same
        to the bit for any value.
    progress : bool
        Show a progress bar over the offsets (fast method; for a Dask array use
        Dask's progress bars).

    Returns
    -------
    denoised : array
        Same shape, library, device and dtype as ``image``. A Dask array gives a
        lazy Dask array with the input's chunks, denoised chunk by chunk and
        equal to the in-memory result (:mod:`nlref.nlmeans.chunked`).

    Notes
    -----
    Computation is in float32, or float64 for float64 input. Integer images
    are denoised in their own units (a uint8 image with noise of 20 grey
    levels takes ``sigma=20``), with no rescaling; the result is rounded to the
    nearest integer, clipped to the dtype's range and returned in the input
    dtype.

    Raises
    ------
    TypeError
        Non-array input, arrays of unsupported dtype, wrongly typed arguments.
    ValueError
        NaN/Inf, empty images, wrong number of axes, bad channel_axis, even or
        non-positive sizes, a patch larger than the image, ``h <= 0``,
        ``sigma < 0``, unknown method or aggregation, and requests above the
        memory (fast) or size (naive) limits.

    Warns
    -----
    UserWarning
        ``sigma`` or ``h`` far outside the image's value range (the 0..255 versus
        0..1 mix-up: ``sigma=20`` on an image in 0..1), or a shape that suggests a
        missing or misplaced ``channel_axis`` (``(H, W, 3)`` without it).
    """
    if is_dask_array(image):  # chunk by chunk, exact: nlref.nlmeans.chunked
        return nl_means_dask(image, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                             channel_axis=channel_axis, aggregation=aggregation, method=method,
                             data_range=data_range, workers=workers, progress=progress)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
    xp, channel_axis, spatial = _check_image(image, channel_axis)
    params = _resolve(xp, image, spatial, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                      channel_axis=channel_axis, aggregation=aggregation, data_range=data_range)
    channels = 1 if channel_axis is None else image.shape[channel_axis]
    kwargs = dict(h=params["h"], sigma=params["sigma"], patch_size=params["patch_size"],
                  search_size=params["search_size"], aggregation=aggregation)
    n_offsets = math.prod(params["search_size"])

    if method == "naive":
        comparisons = math.prod(spatial) * n_offsets
        if comparisons > NAIVE_COMPARISON_LIMIT:
            raise ValueError(
                f"method='naive' would make {comparisons:,} patch comparisons (limit "
                f"{NAIVE_COMPARISON_LIMIT:,}, nlref.nlmeans.api.NAIVE_COMPARISON_LIMIT); it is the readable "
                "specification for small inputs: crop the image or use method='fast'"
            )
        u = nl_means_naive(_to_working(xp, image, channel_axis), **kwargs)
        return _from_working(xp, u, image, channel_axis)

    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    elif isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"workers must be a positive int or None; got {workers!r}")
    itemsize = 8 if image.dtype == xp.float64 else 4
    need = working_memory(spatial, channels, params["patch_size"], params["search_size"], aggregation, itemsize, workers)
    if need > WORKING_MEMORY_LIMIT:
        raise ValueError(
            f"this request needs about {need / 2**30:.2f} GiB of working memory, above the limit of "
            f"{WORKING_MEMORY_LIMIT / 2**30:.2f} GiB (nlref.nlmeans.api.WORKING_MEMORY_LIMIT); "
            "use fewer workers, a smaller search window, or process the data in tiles"
        )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        passes = 2 if aggregation == "patch" else 1
        bar = tqdm(total=passes * (n_offsets // 2), desc="nl_means", unit="offset")
    try:
        u = nl_means_fast(_to_working(xp, image, channel_axis), workers=workers,
                          progress=None if bar is None else bar.update, **kwargs)
    finally:
        if bar is not None:
            bar.close()
    return _from_working(xp, u, image, channel_axis)


def nl_means_weights(image, index, *, sigma=None, h=None, patch_size=None, search_size=None,
                     channel_axis=None, data_range=None):
    """The NL-means weights of one pixel over its search window (unnormalised).

    The first picture of "attention": how much each neighbour ``q`` of the
    pixel ``p = index`` contributes to its estimate. Arguments as for
    :func:`nl_means`; ``index`` gives one coordinate per spatial axis.

    Returns
    -------
    weights : array, shape search_size
        ``weights[o + search_size // 2] = w(p, p + o)``; the centre is 1.
    """
    xp, channel_axis, spatial = _check_image(image, channel_axis)
    params = _resolve(xp, image, spatial, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                      channel_axis=channel_axis, aggregation="pixel", data_range=data_range)
    index = tuple(int(i) for i in index)
    if len(index) != len(spatial) or not all(0 <= i < n for i, n in zip(index, spatial)):
        raise ValueError(f"index must give one in-range coordinate per spatial axis of shape {spatial}; got {index}")
    v = _to_working(xp, image, channel_axis)
    return patch_weights(v, index, h=params["h"], sigma=params["sigma"],
                         patch_size=params["patch_size"], search_size=params["search_size"])
