r"""NL-means on Dask arrays: chunk by chunk, with a halo that makes the result exact.

An output pixel of NL-means depends only on the input within a fixed distance
of it: the search radius plus the patch radius (pixel-wise), or the search
radius plus twice the patch radius (patch-wise: a pixel takes the estimates of
every patch covering it). :func:`nlref.nlmeans.fast.halo` gives that distance
``m`` per axis. So a chunk can be denoised on its own once it carries ``m``
samples of its neighbours on every side:

* between chunks, the halo is the neighbours' samples (``dask.array.map_overlap``
  with ``boundary="none"``);
* at the array's true edges, the halo is nlref's own reflect padding, the same
  that the in-memory call applies to the whole array (``numpy.pad``'s
  ``"reflect"``; dask's ``boundary="reflect"`` is NumPy's ``"symmetric"``, a
  different image, and is never used).

Each chunk then runs the offset loop of :func:`nlref.nlmeans.fast.nl_means_fast_padded`
on its padded block: the same operations, in the same order, on the same
numbers as the in-memory call, so the result is equal bit for bit (with the
same ``workers`` per chunk as the in-memory call; different thread counts only
reorder a sum).

Parameters are resolved once, for the whole array, before any chunk runs (the
noise estimate, the presets, ``h``, the data range), never per chunk. The noise
estimate is :func:`nlref.estimate_sigma`'s: the median of the absolute second
differences, computed exactly on the whole array by histogram selection (a
few passes over the data, see :func:`estimate_sigma_dask`).
"""

from __future__ import annotations

import math
import numbers
import sys

import numpy as np

from ..backend import array_namespace, reflect_pad
from .fast import halo, nl_means_fast_padded, working_memory
from .noise import _MAD_TO_SIGMA, _second_difference

__all__ = ["is_dask_array", "nl_means_dask", "resolve_parameters_dask", "estimate_sigma_dask", "chunks_for_halo"]

#: Bins of each histogram pass of the exact median (the selection narrows to one bin per pass).
HISTOGRAM_BINS = 2**12
#: A bin with at most this many samples is fetched and sorted instead of being split again.
GATHER_LIMIT = 2**22


def is_dask_array(x):
    """Whether ``x`` is a ``dask.array.Array`` (without importing dask)."""
    module = sys.modules.get("dask.array")
    return module is not None and isinstance(x, module.Array)


def _check(image, channel_axis):
    """The cheap checks of nl_means (dtype, axes, size), on the shape and dtype only, never the data."""
    from .api import _check_axes

    dtype = np.dtype(image.dtype)
    if dtype.kind not in "iuf":
        raise TypeError(f"image must hold real numbers (integer or floating point); got dtype {dtype}")
    if any(math.isnan(n) for n in image.shape):
        raise ValueError(f"image has chunks of unknown size (shape {image.shape}); call compute_chunk_sizes() first")
    return _check_axes(tuple(image.shape), channel_axis)


def _moveaxis(image, channel_axis):
    import dask.array as da

    return da.moveaxis(image, channel_axis, 0)


def _second_differences_block(block, *, axes):
    """[1, -2, 1] along each of ``axes`` in turn, keeping the valid part (the halo is 1 sample wide)."""
    for axis in axes:
        block = _second_difference(None, block, axis)
    return block


def _filtered(image, channel_axis):
    """|second differences| of every channel (lazy), as :func:`nlref.estimate_sigma` filters them.

    Chunk by chunk: a halo of one sample along every filtered axis, and the
    same operations in the same order as in memory (so the values are equal
    bit for bit).
    """
    import dask.array as da

    x = image if np.dtype(image.dtype).kind == "f" else image.astype(np.float64)
    x = x[None, ...] if channel_axis is None else _moveaxis(x, channel_axis)
    axes = [a for a in range(1, x.ndim) if x.shape[a] >= 3]
    if not axes:
        raise ValueError(f"image needs an axis with at least 3 samples to estimate sigma; shape {tuple(image.shape)}")
    chunks = [chunks_for_halo(c, 2) if a in axes else c for a, c in enumerate(x.chunks)]
    x = x.rechunk(tuple(chunks), method="tasks") if tuple(chunks) != x.chunks else x
    out_chunks = []
    for a, c in enumerate(x.chunks):
        if a in axes:  # the valid part loses one sample at each end of the axis
            c = list(c)
            c[0] -= 1
            c[-1] -= 1
        out_chunks.append(tuple(c))
    filtered = da.map_overlap(_second_differences_block, x, depth={a: 1 if a in axes else 0 for a in range(x.ndim)},
                              boundary="none", trim=False, allow_rechunk=False, chunks=tuple(out_chunks),
                              dtype=x.dtype, meta=x._meta, axes=tuple(axes))
    return [abs(filtered[c, ...]) for c in range(x.shape[0])], len(axes)


def _histogram_block(block, lo, hi):
    """numpy.histogram of one block, shaped (1, ..., 1, bins) to stack along the block grid."""
    counts = np.histogram(np.asarray(block), bins=HISTOGRAM_BINS, range=(lo, hi))[0]
    return counts.reshape((1,) * block.ndim + (HISTOGRAM_BINS,))


def _histogram(values, lo, hi):
    """numpy.histogram(values, HISTOGRAM_BINS, (lo, hi)) of a Dask array, block by block (lazy)."""
    grid = tuple((1,) * n for n in values.numblocks) + ((HISTOGRAM_BINS,),)
    parts = values.map_blocks(_histogram_block, lo, hi, chunks=grid, new_axis=values.ndim, dtype=np.int64,
                              meta=np.empty((0,) * (values.ndim + 1), np.int64))
    return parts.sum(axis=tuple(range(values.ndim)))


def _in_bin(values, lo, hi, last):
    """Lazy mask of the samples in the bin [lo, hi) ([lo, hi] for the last bin), as numpy.histogram counts them."""
    x = values.astype(np.result_type(lo))
    return (x >= lo) & ((x <= hi) if last else (x < hi))


def _select(values, ranks, lo, hi, rounds=0):
    """The ``ranks``-th smallest samples (0-based) of the dask array ``values``, all of which lie in [lo, hi].

    Each round is one histogram pass of ``HISTOGRAM_BINS`` bins over
    [lo, hi]; the bin holding a rank is then either fetched and sorted (at most
    :data:`GATHER_LIMIT` samples: one more pass) or narrowed to its own
    smallest and largest sample (one more pass) and split again.
    """
    import dask

    if lo == hi or rounds > 64:
        return {k: values.dtype.type(lo) for k in ranks}
    edges = np.histogram_bin_edges(np.empty(0, dtype=values.dtype), bins=HISTOGRAM_BINS, range=(lo, hi))
    counts = _histogram(values, lo, hi).compute()
    starts = np.cumsum(counts) - counts
    bins = {}
    for k in ranks:
        j = int(np.searchsorted(starts + counts, k, side="right"))
        bins.setdefault(j, []).append(k)
    masks = {j: _in_bin(values, edges[j], edges[j + 1], j == HISTOGRAM_BINS - 1) for j in bins}
    small = [j for j in bins if counts[j] <= GATHER_LIMIT]
    large = [j for j in bins if counts[j] > GATHER_LIMIT]
    top = values.dtype.type(np.inf)
    gathered, ranges = dask.compute([values[masks[j]] for j in small],
                                    [(dask.array.where(masks[j], values, top).min(),
                                      dask.array.where(masks[j], values, -top).max()) for j in large])
    found = {}
    for j, inside in zip(small, gathered):
        ordered = np.sort(np.asarray(inside))
        found.update({k: ordered[k - starts[j]] for k in bins[j]})
    for j, (b_lo, b_hi) in zip(large, ranges):
        inner = _select(values, [k - starts[j] for k in bins[j]], b_lo.item(), b_hi.item(), rounds + 1)
        found.update({k: inner[k - starts[j]] for k in bins[j]})
    return {k: values.dtype.type(v) for k, v in found.items()}


def estimate_sigma_dask(image, *, channel_axis=None):
    """:func:`nlref.estimate_sigma` of a Dask array, exactly (equal to the in-memory estimate).

    The median of the absolute second differences is found by selection, not
    by sorting the whole array: one pass finds each channel's smallest and
    largest value, one pass histograms them into ``HISTOGRAM_BINS`` bins,
    and one pass fetches the (small) bin that holds the median and sorts it.
    Heavily repeated values (integer images) take one more pass per narrowing.
    So the estimate costs about three reads of the data per channel, each
    chunk-local (memory of one chunk per task), and runs on the scheduler that
    is active.

    Parameters
    ----------
    image : dask.array.Array
        As for :func:`nlref.estimate_sigma`.
    channel_axis : int, optional

    Returns
    -------
    sigma : float
    """
    import dask

    channel_axis, _ = _check(image, channel_axis)
    values, dims = _filtered(image, channel_axis)
    extremes = dask.compute(*[(v.min(), v.max()) for v in values])
    return _sigma_from(values, dims, extremes)


def _sigma_from(values, dims, extremes):
    per_channel = []
    for v, (lo, hi) in zip(values, extremes):
        n = math.prod(v.shape)
        ranks = sorted({(n - 1) // 2, n // 2})
        found = _select(v, ranks, lo.item(), hi.item())
        median = (found[(n - 1) // 2] + found[n // 2]) / 2.0
        per_channel.append(float(median) / (_MAD_TO_SIGMA * math.sqrt(6.0**dims)))
    return sum(per_channel) / len(per_channel)


def resolve_parameters_dask(image, *, sigma=None, h=None, patch_size=None, search_size=None, channel_axis=None,
                            aggregation="pixel", data_range=None):
    """:func:`nlref.resolve_parameters` for a Dask array: once, for the whole array.

    One pass over the data checks that every value is finite and, when needed,
    finds the largest magnitude (the default ``data_range`` of a float image)
    and each channel's range of second differences (for the noise estimate,
    :func:`estimate_sigma_dask`, which adds about two passes). Given ``sigma``,
    ``h``, ``patch_size``, ``search_size`` (and ``data_range``), only the
    finiteness pass remains.

    Returns
    -------
    params : dict
        As :func:`nlref.resolve_parameters`.
    """
    import dask

    from .api import _resolve

    channel_axis, spatial = _check(image, channel_axis)
    is_float = np.dtype(image.dtype).kind == "f"
    preset = h is None or patch_size is None or search_size is None
    need_noise = sigma is None and preset
    need_peak = is_float and preset and data_range is None
    lazy = {"finite": dask.array.isfinite(image).all()} if is_float else {}
    if need_peak:
        lazy["peak"] = abs(image).max()
    if need_noise:
        values, dims = _filtered(image, channel_axis)
        lazy["extremes"] = [(v.min(), v.max()) for v in values]
    (stats,) = dask.compute(lazy)
    if is_float and not bool(stats["finite"]):
        raise ValueError("image contains NaN or Inf values; NL-means needs finite input (replace or mask them first)")
    if need_peak:  # the rule of nlref.nlmeans.api._default_data_range
        data_range = 1.0 if float(stats["peak"]) <= 4.0 else 255.0
    noise = _sigma_from(values, dims, stats["extremes"]) if need_noise else None
    params = _resolve(np, image, spatial, sigma=noise if need_noise else sigma, h=h, patch_size=patch_size,
                      search_size=search_size, channel_axis=channel_axis, aggregation=aggregation,
                      data_range=data_range)
    if need_noise:
        params["sigma_source"] = "estimated"
        if h is not None:  # h given: the estimate only chose the preset sizes, as in memory
            params["sigma"] = 0.0
    return params


def chunks_for_halo(chunks, depth):
    """Merge chunks smaller than ``depth`` with their neighbours (one axis).

    ``map_overlap`` takes a halo only from the adjacent chunks, so every chunk
    must hold at least ``depth`` samples; an axis shorter than that becomes one
    chunk. Chunks already large enough are kept as they are.

    Parameters
    ----------
    chunks : tuple of int
        The chunk sizes along one axis.
    depth : int
        The halo on each side.

    Returns
    -------
    chunks : tuple of int
        Same total, every chunk ``>= depth`` (or one chunk).
    """
    if all(c >= depth for c in chunks):
        return tuple(chunks)
    merged, run = [], 0
    for c in chunks:
        run += c
        if run >= depth:
            merged.append(run)
            run = 0
    if run:
        if merged:
            merged[-1] += run
        else:
            merged.append(run)
    return tuple(merged)


def _denoise_block(block, *, block_info=None, channel_axis, halo_width, params, workers):
    """One chunk with its halo -> its denoised centre (map_overlap's function).

    ``halo_width`` is the halo per spatial axis. Where the chunk touches the
    array's edge, the halo is missing (``boundary="none"``) and is made here
    by reflection, exactly as the in-memory call pads the whole array.
    """
    from .api import _from_working, _to_working

    info = block_info[0]
    location, count = info["chunk-location"], info["num-chunks"]
    axes = [i for i in range(block.ndim) if i != channel_axis]
    xp = array_namespace(block, names=["image"])
    v = _to_working(xp, block, channel_axis)
    widths = [(0, 0)] + [(m if location[a] == 0 else 0, m if location[a] == count[a] - 1 else 0)
                         for a, m in zip(axes, halo_width)]
    padded = reflect_pad(v, widths)
    inside = [(before, n - after) for (before, after), n in zip(widths[1:], padded.shape[1:])]
    u = nl_means_fast_padded(padded, inside=inside, workers=workers, **params)
    return _from_working(xp, u, block, channel_axis)


def nl_means_dask(image, *, sigma=None, h=None, patch_size=None, search_size=None, channel_axis=None,
                  aggregation="pixel", method="fast", data_range=None, workers=None, progress=False):
    """:func:`nlref.nl_means` of a Dask array, chunk by chunk; returns a lazy Dask array.

    Called by :func:`nlref.nl_means` for Dask input (same arguments). The
    parameters are resolved once for the whole array
    (:func:`resolve_parameters_dask`: this reads the data one to three times
    before returning); the denoising itself is lazy: one ``map_overlap`` task
    per chunk, each holding its chunk, its halo and the offset loop's buffers.

    Parameters
    ----------
    image : dask.array.Array
        NumPy- or CuPy-backed chunks (the chunks' type is kept: ``meta`` is
        passed through).
    workers : int, optional
        Threads per chunk (default 1: Dask already runs chunks in parallel).
    progress : bool
        Ignored: use Dask's progress bars (``dask.diagnostics.ProgressBar``,
        ``distributed.progress``) on the result.
    Other parameters
        As for :func:`nlref.nl_means`.

    Returns
    -------
    denoised : dask.array.Array
        Lazy; the input's shape, dtype, chunks and chunk type.

    Raises
    ------
    ValueError, TypeError
        As :func:`nlref.nl_means`, and ``method="naive"`` (the readable
        specification is for small in-memory inputs).
    """
    import dask.array as da

    if method != "fast":
        raise ValueError(f"method must be 'fast' for a Dask array (the naive method is for small inputs); "
                         f"got {method!r}")
    if workers is None:
        workers = 1
    elif isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"workers must be a positive int or None; got {workers!r}")
    channel_axis, spatial = _check(image, channel_axis)
    p = resolve_parameters_dask(image, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                                channel_axis=channel_axis, aggregation=aggregation, data_range=data_range)
    params = dict(h=p["h"], sigma=p["sigma"], patch_size=p["patch_size"], search_size=p["search_size"],
                  aggregation=aggregation)
    depth = halo(p["patch_size"], p["search_size"], aggregation)

    # every chunk at least as large as the halo; the channels in one chunk (distances sum over them)
    axes = [i for i in range(image.ndim) if i != channel_axis]
    work_chunks = list(image.chunks)
    for a, m in zip(axes, depth):
        work_chunks[a] = chunks_for_halo(image.chunks[a], m)
    if channel_axis is not None:
        work_chunks[channel_axis] = (image.shape[channel_axis],)
    x = image.rechunk(tuple(work_chunks), method="tasks") if tuple(work_chunks) != image.chunks else image

    from .api import WORKING_MEMORY_LIMIT

    channels = 1 if channel_axis is None else image.shape[channel_axis]
    largest = [max(x.chunks[a]) for a in axes]
    need = working_memory(largest, channels, p["patch_size"], p["search_size"], aggregation,
                          8 if image.dtype == np.float64 else 4, workers)
    if need > WORKING_MEMORY_LIMIT:
        raise ValueError(
            f"one chunk of {tuple(largest)} needs about {need / 2**30:.2f} GiB of working memory, above the limit of "
            f"{WORKING_MEMORY_LIMIT / 2**30:.2f} GiB (nlref.nlmeans.api.WORKING_MEMORY_LIMIT); use smaller chunks"
        )

    overlap = {a: m for a, m in zip(axes, depth)}
    if channel_axis is not None:
        overlap[channel_axis] = 0
    out = da.map_overlap(_denoise_block, x, depth=overlap, boundary="none", trim=False, allow_rechunk=False,
                         chunks=x.chunks, dtype=image.dtype, meta=image._meta, token="nl_means",
                         channel_axis=channel_axis, halo_width=tuple(depth), params=params, workers=workers)
    return out.rechunk(image.chunks, method="tasks") if out.chunks != image.chunks else out
