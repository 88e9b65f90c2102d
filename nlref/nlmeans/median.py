r"""The exact median of a Dask array by histogram selection, and the parameters of a lazy array.

:func:`nlref.estimate_sigma` takes the median of the absolute second
differences. On an array larger than memory that median is found by
selection, not by sorting: one pass finds the smallest and largest value, one
pass histograms them into :data:`HISTOGRAM_BINS` bins, and one pass fetches
the (small) bin that holds the median and sorts it. A bin too large to fetch
(heavily repeated values, as in integer images) is narrowed to its own
smallest and largest value and split again (one more pass each round).

The bins are built in the data's own floating-point type where it can
represent :data:`HISTOGRAM_BINS` distinct edges over the range, else in
float64 (exact for float16 and float32 values), and where even float64 cannot
(a range a few float64 steps wide), from the distinct edges it can, plus a
last bin holding only the range's top value, so every round narrows the range.

Both chunked routes (:mod:`.overlap` for Dask arrays, :mod:`.store` for arrays
in a store) resolve their parameters here (:func:`resolve_lazy`): one pass
checks that every value is finite, reads the peak magnitude and each channel's
range of second differences, then the selection passes, then the parameter
rules of :func:`nlref.nlmeans.params.resolve`.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import array_namespace, device, to_numpy
from .checks import NOT_FINITE
from .noise import check_filtered, sigma_from_median
from .params import check_arguments, check_h, check_patch_fits, needs_noise, resolve

__all__ = ["HISTOGRAM_BINS", "GATHER_LIMIT", "bin_edges", "histogram_block", "in_bin_samples", "select",
           "sigma_from_filtered", "resolve_lazy"]

#: Bins of each histogram pass of the exact median (the selection narrows to one bin per pass).
HISTOGRAM_BINS = 2**12
#: A bin with at most this many samples is fetched and sorted instead of being split again.
GATHER_LIMIT = 2**22
#: Narrowing rounds after which the selection stops with an error (each round narrows the range strictly).
MAX_ROUNDS = 200


def bin_edges(lo, hi, dtype):
    """The edges of one histogram round over [lo, hi], and whether they are NumPy's uniform bins.

    Returns ``(edges, uniform)``: ``edges`` in ``dtype`` where it holds
    :data:`HISTOGRAM_BINS` + 1 strictly increasing edges (``numpy.histogram``
    computes the same ones from ``bins`` and ``range``), else in float64;
    where float64 cannot either, its distinct edges and ``hi`` once more (so
    the last bin is ``[hi, hi]``, and every other bin lies below ``hi``).
    Bins are ``[e_j, e_{j+1})``, the last one closed, as ``numpy.histogram``
    counts them.
    """
    for kind in (np.dtype(dtype), np.dtype(np.float64)):
        edges = np.linspace(kind.type(lo), kind.type(hi), HISTOGRAM_BINS + 1, endpoint=True, dtype=kind)
        if np.all(edges[:-1] < edges[1:]):
            return edges, True
    return np.append(np.unique(edges), edges[-1]), False


def _counts(block, edges, uniform):
    """Samples of ``block`` per bin (a NumPy int64 array), array-agnostic."""
    if isinstance(block, np.ndarray):
        x = block.astype(edges.dtype, copy=False).reshape(-1)
        if uniform:  # NumPy's uniform bins: one multiply per sample, no search
            return np.histogram(x, bins=edges.size - 1, range=(edges[0], edges[-1]))[0]
        return np.histogram(x, bins=edges)[0]
    xp = array_namespace(block)
    x = xp.sort(xp.reshape(xp.astype(block, getattr(xp, edges.dtype.name)), (-1,)))
    e = xp.asarray(edges, device=device(block))
    below = xp.concat([xp.searchsorted(x, e[:-1], side="left"), xp.searchsorted(x, e[-1:], side="right")])
    return to_numpy(below[1:] - below[:-1]).astype(np.int64)


def histogram_block(block, edges, uniform):
    """The histogram of one block, shaped (1, ..., 1, bins) to stack along the block grid."""
    return _counts(block, edges, uniform).reshape((1,) * block.ndim + (edges.size - 1,))


def _histogram(values, edges, uniform):
    """The histogram of a Dask array over ``edges``, block by block (lazy)."""
    bins = edges.size - 1
    grid = tuple((1,) * n for n in values.numblocks) + ((bins,),)
    parts = values.map_blocks(histogram_block, edges, uniform, chunks=grid, new_axis=values.ndim, dtype=np.int64,
                              meta=np.empty((0,) * (values.ndim + 1), np.int64))
    return parts.sum(axis=tuple(range(values.ndim)))


def _in_bin(x, lo, hi, last):
    """Mask of the samples of ``x`` (already in the edges' type) in [lo, hi) ([lo, hi] for the last bin)."""
    return (x >= lo) & ((x <= hi) if last else (x < hi))


def in_bin_samples(block, edge_dtype, lo, hi, last):
    """The samples of one block in the bin (a short 1-D NumPy array in the block's dtype), array-agnostic."""
    xp = array_namespace(block)
    x = xp.reshape(block, (-1,))
    mask = _in_bin(xp.astype(x, getattr(xp, np.dtype(edge_dtype).name)), float(lo), float(hi), last)
    return to_numpy(x[mask])


def _gather(values, edge_dtype, lo, hi, last):
    """The samples of the Dask array ``values`` in the bin, fetched block by block (lazy list, one task per block).

    Not ``values[mask]``: boolean indexing makes chunks of unknown size, which
    Dask then rechunks (a shuffle between workers on a cluster).
    """
    import dask

    return [dask.delayed(in_bin_samples)(block, edge_dtype, lo, hi, last) for block in values.to_delayed().ravel()]


def _scalar(x, dtype):
    """A computed 0-d value (NumPy, CuPy, ...) as a NumPy scalar of ``dtype`` (exact: floats round-trip)."""
    return np.dtype(dtype).type(x.item() if hasattr(x, "item") else x)


def select(values, ranks, lo, hi, rounds=0):
    """The ``ranks``-th smallest samples (0-based) of the Dask array ``values``, all of which lie in [lo, hi].

    Each round is one histogram pass over [lo, hi]; the bin holding a rank is
    then either fetched and sorted (at most :data:`GATHER_LIMIT` samples: one
    more pass) or narrowed to its own smallest and largest sample (one more
    pass) and split again.

    Returns
    -------
    found : dict
        rank -> the sample, a NumPy scalar of ``values.dtype``.
    """
    import dask
    import dask.array as da

    dtype = np.dtype(values.dtype)
    if lo == hi:
        return {k: dtype.type(lo) for k in ranks}
    if rounds > MAX_ROUNDS:
        raise RuntimeError(f"the exact median did not converge in {MAX_ROUNDS} rounds on [{lo!r}, {hi!r}]")
    edges, uniform = bin_edges(lo, hi, dtype)
    last_bin = edges.size - 2
    counts = _histogram(values, edges, uniform).compute()
    starts = np.cumsum(counts) - counts
    bins = {}
    for k in ranks:
        j = int(np.searchsorted(starts + counts, k, side="right"))
        bins.setdefault(j, []).append(k)
    small = [j for j in bins if counts[j] <= GATHER_LIMIT]
    large = [j for j in bins if counts[j] > GATHER_LIMIT]
    top = dtype.type(np.inf)
    ranges = []
    for j in large:
        mask = _in_bin(values.astype(edges.dtype), float(edges[j]), float(edges[j + 1]), j == last_bin)
        ranges.append((da.where(mask, values, top).min(), da.where(mask, values, -top).max()))
    gathered, ranges = dask.compute([_gather(values, edges.dtype, edges[j], edges[j + 1], j == last_bin)
                                     for j in small], ranges)
    found = {}
    for j, parts in zip(small, gathered):
        ordered = np.sort(np.concatenate(parts))
        found.update({k: ordered[k - starts[j]] for k in bins[j]})
    for j, (b_lo, b_hi) in zip(large, ranges):
        inner = select(values, [k - starts[j] for k in bins[j]], _scalar(b_lo, dtype), _scalar(b_hi, dtype),
                       rounds + 1)
        found.update({k: inner[k - starts[j]] for k in bins[j]})
    return {k: dtype.type(v) for k, v in found.items()}


def sigma_from_filtered(values, dims, extremes):
    """:func:`nlref.estimate_sigma` from each channel's lazy absolute second differences and their (min, max).

    The image must be finite: a non-finite extreme is then an overflow of the filter's float.
    """
    check_filtered(all(math.isfinite(float(e)) for pair in extremes for e in pair), values[0].dtype)
    per_channel = []
    for v, (lo, hi) in zip(values, extremes):
        dtype = np.dtype(v.dtype)
        n = math.prod(v.shape)
        ranks = sorted({(n - 1) // 2, n // 2})
        found = select(v, ranks, _scalar(lo, dtype), _scalar(hi, dtype))
        per_channel.append(sigma_from_median((found[(n - 1) // 2] + found[n // 2]) / 2.0, dims))
    return sum(per_channel) / len(per_channel)


def resolve_lazy(image, filtered, spatial, *, sigma, h, patch_size, search_size, channel_axis, aggregation,
                 data_range):
    """The parameters of the lazy (Dask) array ``image``; ``filtered()`` gives its second differences (lazy).

    The arguments are checked first, with what the shape and dtype decide
    (a patch wider than the image, an ``h`` the working dtype cannot carry):
    no pass over the data for a bad one.
    Then one pass checks that every value is finite and, in the same pass,
    reads what the parameter rules need: the largest magnitude of a float
    image (its default ``data_range``) unless ``data_range`` is given, and,
    when the noise must be estimated, each channel's range of second
    differences (the exact median then adds about two passes). Given
    ``sigma``, or ``h`` and both sizes, that one pass is all.
    """
    import dask

    args = check_arguments(spatial, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                           aggregation=aggregation, data_range=data_range)
    # what the shape, the dtype and the arguments alone decide, before any pass over the data
    patch = args["patch_size"]
    if patch is not None:
        check_patch_fits(patch, spatial, image.shape)
    if args["h"] is not None:  # a sigma left out is 0 once h is given (an estimate only picks a preset's size)
        channels = 1 if channel_axis is None else image.shape[channel_axis]
        check_h(image.dtype, h=args["h"], sigma=args["sigma"] or 0.0,
                values_per_patch=None if patch is None else channels * math.prod(patch))
    is_float = np.dtype(image.dtype).kind == "f"
    need_noise = needs_noise(sigma, h, patch_size, search_size)
    # the presets' scale and the units check read it, and params.check_computable (in the same pass)
    need_peak = is_float or np.dtype(image.dtype).itemsize == 8
    lazy = {"finite": dask.array.isfinite(image).all()} if is_float else {}
    if need_peak:
        # the largest magnitude, from the extremes (abs of int64's minimum wraps to itself)
        lazy["peak"] = [image.max(), image.min()] if not is_float else abs(image).max()
    if need_noise:
        values, dims = filtered()
        lazy["extremes"] = [(v.min(), v.max()) for v in values]
    (stats,) = dask.compute(lazy)
    if is_float and not bool(stats["finite"]):
        raise ValueError(NOT_FINITE)
    noise = sigma_from_filtered(values, dims, stats["extremes"]) if need_noise else None
    return resolve(np, image, spatial, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                   channel_axis=channel_axis, aggregation=aggregation, data_range=data_range,
                   peak=_magnitude(stats["peak"]) if need_peak else None, noise=noise)


def _magnitude(peak):
    """The largest magnitude from ``abs(image).max()`` (floats) or the pair (max, min) (integers)."""
    return max(abs(float(v)) for v in peak) if isinstance(peak, list) else float(peak)
