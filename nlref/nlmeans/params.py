"""The parameter rules of NL-means: argument checks, presets, units, working memory.

Below the routes (in memory, :mod:`.overlap` for Dask arrays, :mod:`.store`
for arrays in a store) and above :mod:`.checks` and :mod:`.noise`: every route
resolves its parameters with :func:`resolve`, given the array's noise estimate
and peak where a route has computed them its own way.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ..backend import dtype_name
from . import presets
from .fast import working_memory
from .checks import AGGREGATIONS, positive, sizes
from .noise import estimate_checked

__all__ = ["WORKING_MEMORY_LIMIT", "AGGREGATIONS", "is_integer_dtype", "integer_range", "units_doubt", "sizes",
           "positive", "default_data_range", "check_arguments", "needs_noise", "resolve", "to_working",
           "from_working", "working_dtype", "working_itemsize", "chunk_working_memory", "check_working_memory", "check_h",
           "check_patch_fits"]

#: A Dask or store chunk whose working memory (see :func:`nlref.nlmeans.fast.working_memory`)
#: exceeds this many bytes is refused; in memory, the limit where the machine's available
#: memory is not known, or the array is on a GPU (``nlref.nlmeans.api.memory_available``).
WORKING_MEMORY_LIMIT = 4 * 2**30


def is_integer_dtype(xp, dtype):
    """Whether ``dtype`` (of namespace ``xp``) is an integer type."""
    return xp.isdtype(dtype, "integral")


def integer_range(dtype):
    """(min, max) of an integer dtype, as floats."""
    info = np.iinfo(dtype_name(dtype))
    return float(info.min), float(info.max)


def units_doubt(name, value, image, xp, data_range, peak=None):
    """A message when ``value`` (sigma or h) is far outside the image's value range.

    NL-means takes sigma and h in the units of the image values. ``sigma=20`` on an
    image in 0..1 (noise larger than the whole signal range) blurs it flat; ``sigma=0.08``
    on an image in 0..255 (a tenth of a grey level) leaves it unchanged. Both are the
    0..255 versus 0..1 mix-up. The range is ``data_range`` when given, else the one
    :func:`default_data_range` reads from the dtype and values (1 for floats within
    [-4, 4], 255 for larger floats, the dtype's maximum for integers), from
    ``peak`` (the largest magnitude) where the caller has already read it.
    """
    if value <= 0:
        return None
    span = data_range if data_range is not None else default_data_range(xp, image, peak)
    if data_range is not None:
        scale = f"data_range={data_range:g}"
    elif is_integer_dtype(xp, image.dtype):
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


def default_data_range(xp, image, peak=None):
    """The signal range the preset table's 0..255 scale maps to (see nl_means).

    ``peak``: the image's largest magnitude, where the caller has already read it.
    """
    if is_integer_dtype(xp, image.dtype):
        lo, hi = integer_range(image.dtype)
        return hi - lo if lo < 0 else hi
    if peak is None:
        peak = float(xp.max(xp.abs(image)))
    return 1.0 if peak <= 4.0 else 255.0


def within_image(name, value, spatial):
    """:func:`sizes` for a search window, refused where it has more offsets than the whole image can use.

    A window ``2 n - 1`` wide along an axis of ``n`` samples, centred on any sample, already
    covers the axis; a wider one adds only mirrored copies of the padding. Wider along a short
    axis is harmless (``search_size=5`` on a stack of 2 frames), but a window with more offsets
    than ``prod(2 n - 1)`` compares mostly copies, at the cost of every offset: a typo such as
    ``search_size=1001`` on a 64 x 64 image (a million offsets, an hour) is refused before any work.
    """
    widths = sizes(name, value, spatial)
    whole = tuple(2 * n - 1 for n in spatial)
    if math.prod(widths) > math.prod(whole):
        shape = "x".join(map(str, spatial))
        raise ValueError(f"{name}={value!r} makes {math.prod(widths):,} offsets, more than the {math.prod(whole):,} "
                         f"that already reach every sample of the {shape} image from every sample "
                         f"({'x'.join(map(str, whole))}, 2 n - 1 per axis); choose at most that")
    return widths


def check_arguments(spatial, *, sigma, h, patch_size, search_size, aggregation, data_range):
    """The arguments of :func:`resolve`, checked and normalised before any pass over the data.

    Returns a dict of ``sigma``, ``h``, ``patch_size``, ``search_size``
    (tuples), ``aggregation`` and ``data_range``; raises TypeError/ValueError
    naming the argument.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")
    return dict(sigma=None if sigma is None else positive("sigma", sigma, allow_zero=True),
                h=None if h is None else positive("h", h, allow_zero=False),
                patch_size=None if patch_size is None else sizes("patch_size", patch_size, spatial),
                search_size=None if search_size is None else within_image("search_size", search_size, spatial),
                aggregation=aggregation,
                data_range=None if data_range is None else positive("data_range", data_range, allow_zero=False))


def needs_noise(sigma, h, patch_size, search_size):
    """Whether the noise must be estimated: no sigma given, and a preset must fill in h or a size."""
    return sigma is None and (h is None or patch_size is None or search_size is None)


def resolve(xp, image, spatial, *, sigma, h, patch_size, search_size, channel_axis, aggregation, data_range,
            peak=None, noise=None):
    """The parameters :func:`nlref.nl_means` uses, for an image whose shape and dtype are checked.

    ``peak``: the largest magnitude of a float image, where the caller has
    already read it (a lazy array, whose every read is a pass over the data); else it is read
    here, once, for the units check, the presets' scale and ``check_computable``.
    ``noise``: the noise estimate, where the caller has computed it (the
    chunked routes' exact median); else ``nlref.nlmeans.noise.estimate_checked``
    is called when a preset needs it. Only a ``sigma`` or ``h`` the caller
    gave is checked against the image's units (an estimate is in them by
    construction).
    """
    args = check_arguments(spatial, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                           aggregation=aggregation, data_range=data_range)
    if peak is None and not is_integer_dtype(xp, image.dtype):  # read once: the units check, the presets'
        peak = float(xp.max(xp.abs(image)))                       # scale and check_computable all use it
    sigma, h, patch_size, search_size, data_range = (args[k] for k in ("sigma", "h", "patch_size", "search_size",
                                                                       "data_range"))
    for name, value in (("sigma", sigma), ("h", h)):
        doubt = None if value is None else units_doubt(name, value, image, xp, data_range, peak)
        if doubt:
            warnings.warn(doubt, UserWarning, stacklevel=3)

    source = "given"
    if sigma is not None:
        noise = sigma
    if sigma is None:
        # the preset needs a noise level even when h is given
        if h is None or patch_size is None or search_size is None:
            noise = estimate_checked(xp, image, channel_axis) if noise is None else float(noise)  # checked
            source = "estimated"
        sigma = noise if h is None else 0.0

    row = None
    if h is None or patch_size is None or search_size is None:
        scale = 255.0 / (data_range if data_range is not None else default_data_range(xp, image, peak))
        p, s, factor, row = presets.preset_for(
            noise * scale, colour=channel_axis is not None and image.shape[channel_axis] > 1,
            aggregation=aggregation, shape=spatial, search_size=search_size
        )
        patch_size = patch_size or p
        search_size = search_size or s
        if h is None:
            h = factor * sigma if sigma > 0 else None
        if h is None:
            why = ("sigma=0 was given" if source == "given" else
                   "the noise level estimated from the image is 0 (a constant or noise-free image)")
            raise ValueError(f"cannot choose h: h is a multiple of sigma, and {why}; pass h explicitly")

    check_patch_fits(patch_size, spatial, image.shape)
    channels = 1 if channel_axis is None else image.shape[channel_axis]
    check_computable(xp, image, channels * math.prod(patch_size), h=h, sigma=sigma, peak=peak)
    return {
        "sigma": float(sigma),
        "h": float(h),
        "patch_size": patch_size,
        "search_size": search_size,
        "sigma_source": source,
        "preset": row,
    }


def check_patch_fits(patch_size, spatial, shape):
    """Refuse a patch (a tuple, one width per spatial axis) wider than the image along any axis."""
    for axis, (p, n) in enumerate(zip(patch_size, spatial)):
        if p > n:
            raise ValueError(
                f"patch_size={patch_size} is larger than the image along spatial axis {axis} "
                f"({p} > {n} samples, image shape {tuple(shape)})"
            )


def working_dtype(dtype):
    """The floating-point dtype NL-means computes in (see :func:`to_working`).

    float32 for float16, float32 and the 8- and 16-bit integers, whose every value it holds
    exactly; float64 for float64, longdouble and the 32- and 64-bit integers. int32 and uint32
    images were computed in float32, which holds integers exactly only up to 2^24: a constant
    uint32 image of 16,777,217 came back as 16,777,216, and one around 4e9 with 100 grey levels
    of detail came back flat. float64 holds every int32 and uint32 value, and int64 and uint64
    values up to 2^53 (larger ones are refused: ``check_computable``).
    """
    name = dtype_name(dtype)
    if name == "bfloat16":  # PyTorch's 16-bit float, which NumPy knows only where ml_dtypes registered it
        return np.float32
    d = np.dtype(name)
    return np.float64 if (d.kind == "f" and d.itemsize >= 8) or (d.kind in "iu" and d.itemsize >= 4) else np.float32


def working_itemsize(dtype):
    """Bytes per sample of :func:`working_dtype` (what the working-memory estimates count)."""
    return np.dtype(working_dtype(dtype)).itemsize


def _or_float64(work):
    """The way out a float64 image offers, where it does: not to a float64 image already (it computes in float64)."""
    return ", or pass a float64 image" if work != np.float64 else ""


def check_h(dtype, *, h, sigma, values_per_patch=None):
    """The part of ``check_computable`` that reads no image value: ``h`` and ``sigma`` against the working dtype.

    ``values_per_patch`` None (the patch still to come from a preset) skips the
    ``1 / (C P h^2)`` bound, which a wider patch relaxes. The chunked routes call
    it before their passes over the data, the in-memory route through
    ``check_computable``.
    """
    work = working_dtype(dtype)
    big = float(np.finfo(work).max)
    hh = h * h
    what = f"{np.dtype(work).name} (NL-means computes in it for {dtype_name(dtype)} images)"
    if not hh <= big:
        raise ValueError(f"h={h:g} is too large: h^2 overflows {what}; rescale the image (and h) to smaller units")
    if (hh == 0 or (values_per_patch is not None and 1.0 / (values_per_patch * hh) > big)
            or 2.0 * sigma * sigma / hh > big):
        raise ValueError(f"h={h:g} is too small for sigma={sigma:g}: 1 / h^2 or 2 sigma^2 / h^2 overflows {what}; "
                         f"rescale the image (and h, sigma) to larger units{_or_float64(work)}")


def check_computable(xp, image, values_per_patch, *, h, sigma, peak=None):
    """Refuse, before any work, an ``h``, ``sigma`` or image values that the working dtype cannot carry.

    The weights are ``exp(-max(d / (C P) - 2 sigma^2, 0) / h^2)`` with ``d`` a sum of ``C P``
    squared differences of image values. In float32 a tiny ``h`` makes ``1 / h^2`` infinite
    (below about 1e-19), and ``0 * inf`` is NaN: the result came back all NaN without a word. A
    huge ``h`` overflowed Python's ``h**2`` (float32's above about 1.8e19). Values near 1e19 make
    ``d`` itself overflow float32. ``peak``: the largest magnitude of the image where the caller
    has read it (:func:`resolve` does for float images); else the integer dtype's bound, or a
    read of the image's extremes for the integer types whose bound is too wide to tell.
    """
    check_h(image.dtype, h=h, sigma=sigma, values_per_patch=values_per_patch)
    work = working_dtype(image.dtype)
    big = float(np.finfo(work).max)
    what = f"{np.dtype(work).name} (NL-means computes in it for {dtype_name(image.dtype)} images)"
    if peak is None:
        if is_integer_dtype(xp, image.dtype):
            peak = max(abs(bound) for bound in integer_range(image.dtype))
        if peak is None or 4.0 * values_per_patch * peak * peak > big / 16:  # a wide integer type: read it
            peak = max(abs(float(xp.max(image))), abs(float(xp.min(image))))  # (abs of int64's minimum wraps)
    # the working dtype holds every integer below 2^24 (float32) or 2^53 (float64), not every one above: refused from
    # there (a float peak, read from an int64, may have been rounded down to it)
    bits = np.finfo(work).nmant + 1
    if is_integer_dtype(xp, image.dtype) and max(abs(bound) for bound in integer_range(image.dtype)) >= 2.0**bits:
        if peak is None or peak >= 2.0**bits:  # the bound says nothing: read the image's extremes
            peak = max(abs(float(xp.max(image))), abs(float(xp.min(image))))
        if peak >= 2.0**bits:
            raise ValueError(f"image values reach {peak:.3g}, at or above 2^{bits} = {2**bits:,}, beyond which {what} "
                             "does not hold every integer: the result would not keep the image's values (a constant "
                             "image would change); subtract an offset or rescale the image first")
    if 4.0 * values_per_patch * peak * peak > big / 16:
        limit = math.sqrt(big / 64 / values_per_patch)
        raise ValueError(f"image values reach {peak:.3g}, above about {limit:.2g}, where the sums of squared differences "
                         f"of a patch overflow {what}; rescale the image (and h, sigma){_or_float64(work)}")


def run_parameters(params, aggregation):
    """The keyword arguments of the fast path (``nl_means_fast`` and its padded form) from
    :func:`resolve`'s result (or a caller's copy of it, with lists for tuples)."""
    return dict(h=params["h"], sigma=params["sigma"], patch_size=tuple(params["patch_size"]),
                search_size=tuple(params["search_size"]), aggregation=aggregation)


def to_working(xp, image, channel_axis):
    """Channel-first floating-point copy: float64 stays float64, all else -> float32."""
    x = image if channel_axis is None else xp.moveaxis(image, channel_axis, 0)
    if channel_axis is None:
        x = x[None, ...]
    return xp.astype(x, getattr(xp, np.dtype(working_dtype(image.dtype)).name))


def from_working(xp, u, image, channel_axis):
    """Back to the caller's layout and dtype convention."""
    u = u[0, ...] if channel_axis is None else xp.moveaxis(u, 0, channel_axis)
    if is_integer_dtype(xp, image.dtype):
        info = np.iinfo(dtype_name(image.dtype))
        lo, hi = _representable(int(info.min), u.dtype, math.inf), _representable(int(info.max), u.dtype, -math.inf)
        return xp.astype(xp.clip(xp.round(u), min=lo, max=hi), image.dtype)
    return xp.astype(u, image.dtype)


def _representable(bound, dtype, toward):
    """The value of the float ``dtype`` nearest to the integer ``bound`` on the side of ``toward``, or ``bound`` itself.

    An int32 image's maximum, 2^31 - 1, is 2^31 in float32 (int64's is 2^63 even in float64):
    a clip there would still cast to an integer out of range, which wraps to the minimum; one
    float step below stays inside. (Python compares a float with an int exactly.)
    """
    f = np.asarray(bound, dtype=dtype_name(dtype))
    if (float(f) > bound) if toward < 0 else (float(f) < bound):
        f = np.nextafter(f, np.asarray(toward, dtype=f.dtype))
    return float(f)




def chunk_working_memory(chunks, channel_axis, params, aggregation, dtype, workers):
    """Bytes of working memory of one task on the largest chunk of ``chunks`` (:func:`.fast.working_memory`).

    ``chunks``: the chunk grid, one tuple of sizes per axis (the channel axis
    is one chunk); ``params``: ``patch_size`` and ``search_size``; ``dtype``:
    the array's.
    """
    channels = 1 if channel_axis is None else sum(chunks[channel_axis])
    largest = [max(c) for a, c in enumerate(chunks) if a != channel_axis]
    return working_memory(largest, channels, params["patch_size"], params["search_size"], aggregation,
                          working_itemsize(dtype), workers)


def check_working_memory(chunks, channel_axis, params, aggregation, dtype, workers):
    """Refuse, before any work, chunks whose offset loop would not fit in :data:`WORKING_MEMORY_LIMIT`.

    ``chunks``: the chunk grid, one tuple of sizes per axis (the channel axis
    is one chunk).
    """
    largest = [max(c) for a, c in enumerate(chunks) if a != channel_axis]
    need = chunk_working_memory(chunks, channel_axis, params, aggregation, dtype, workers)
    if need > WORKING_MEMORY_LIMIT:
        raise ValueError(
            f"one chunk of {tuple(largest)} needs about {need / 2**30:.2f} GiB of working memory, above the limit of "
            f"{WORKING_MEMORY_LIMIT / 2**30:.2f} GiB (nlref.nlmeans.WORKING_MEMORY_LIMIT); use smaller chunks"
        )
