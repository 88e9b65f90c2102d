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

Two routes build those padded blocks. A Dask array goes through
``map_overlap`` (:func:`nl_means_dask`, what :func:`nlref.nl_means` calls),
where each chunk waits for its neighbours' halo pieces. An array in a store
(Zarr, HDF5, a memory map) goes through :func:`nl_means_store`, whose tasks
each read their own chunk and halo from the store: one task per chunk, none
waiting for another, so a worker holds only the chunks it computes.

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
import uuid

import numpy as np

from ..backend import array_namespace, reflect_pad
from .fast import halo, nl_means_fast_padded, working_memory
from .noise import _MAD_TO_SIGMA, _second_difference

__all__ = ["is_dask_array", "nl_means_dask", "resolve_parameters_dask", "estimate_sigma_dask", "chunks_for_halo",
           "nl_means_store", "resolve_parameters_store"]

#: Bins of each histogram pass of the exact median (the selection narrows to one bin per pass).
HISTOGRAM_BINS = 2**12
#: A bin with at most this many samples is fetched and sorted instead of being split again.
GATHER_LIMIT = 2**22


def is_dask_array(x):
    """Whether ``x`` is a ``dask.array.Array`` (without importing dask)."""
    module = sys.modules.get("dask.array")
    return module is not None and isinstance(x, module.Array)


def _check_not_stored(image, name="image"):
    """Refuse a Zarr array or HDF5 dataset where an in-memory array is expected, pointing to the chunked route.

    ``numpy.asarray`` would read the whole store into memory; the advice is
    :func:`nl_means_store` (or loading it knowingly, when it fits).
    """
    library = type(image).__module__.split(".")[0]
    if library in ("zarr", "h5py"):
        raise TypeError(f"{name} is a {library} {type(image).__name__}, an array in a store: denoise it chunk by chunk "
                        f"with nlref.nl_means_store({name}, chunks=...), or, if it fits in memory, load it first "
                        f"with {name}[...]")


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
    """Mask of the samples in the bin [lo, hi) ([lo, hi] for the last bin), as numpy.histogram counts them."""
    x = values.astype(np.result_type(lo))
    return (x >= lo) & ((x <= hi) if last else (x < hi))


def _in_bin_samples(block, lo, hi, last):
    """The samples of one block that lie in the bin (a short 1-D array)."""
    block = np.asarray(block)
    return block[_in_bin(block, lo, hi, last)]


def _gather(values, lo, hi, last):
    """The samples of the Dask array ``values`` in the bin, fetched block by block (lazy list, one task per block).

    Not ``values[mask]``: boolean indexing makes chunks of unknown size, which
    Dask then rechunks (a shuffle between workers on a cluster).
    """
    import dask

    return [dask.delayed(_in_bin_samples)(block, lo, hi, last) for block in values.to_delayed().ravel()]


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
    small = [j for j in bins if counts[j] <= GATHER_LIMIT]
    large = [j for j in bins if counts[j] > GATHER_LIMIT]
    masks = {j: _in_bin(values, edges[j], edges[j + 1], j == HISTOGRAM_BINS - 1) for j in large}
    top = values.dtype.type(np.inf)
    gathered, ranges = dask.compute([_gather(values, edges[j], edges[j + 1], j == HISTOGRAM_BINS - 1) for j in small],
                                    [(dask.array.where(masks[j], values, top).min(),
                                      dask.array.where(masks[j], values, -top).max()) for j in large])
    found = {}
    for j, parts in zip(small, gathered):
        ordered = np.sort(np.concatenate(parts))
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

    One pass over the data checks that every value is finite and, in the same
    pass, finds the largest magnitude of a float image (its default
    ``data_range``, read by the presets and the units check, unless
    ``data_range`` is given) and, when the noise must be estimated, each
    channel's range of second differences (:func:`estimate_sigma_dask` then
    adds about two passes). Given ``sigma``, or ``h`` and both sizes, that
    one pass is all.

    Returns
    -------
    params : dict
        As :func:`nlref.resolve_parameters`.
    """
    channel_axis, spatial = _check(image, channel_axis)
    return _resolve_lazy(image, lambda: _filtered(image, channel_axis), spatial, sigma=sigma, h=h,
                         patch_size=patch_size, search_size=search_size, channel_axis=channel_axis,
                         aggregation=aggregation, data_range=data_range)


def _resolve_lazy(image, filtered, spatial, *, sigma, h, patch_size, search_size, channel_axis, aggregation,
                  data_range):
    """The parameters of the lazy array ``image``; ``filtered()`` gives its second differences (lazy)."""
    import dask

    from .api import _resolve

    is_float = np.dtype(image.dtype).kind == "f"
    preset = h is None or patch_size is None or search_size is None
    need_noise = sigma is None and preset
    need_peak = is_float and data_range is None  # the presets' scale and the units check both read it
    lazy = {"finite": dask.array.isfinite(image).all()} if is_float else {}
    if need_peak:
        lazy["peak"] = abs(image).max()
    if need_noise:
        values, dims = filtered()
        lazy["extremes"] = [(v.min(), v.max()) for v in values]
    (stats,) = dask.compute(lazy)
    if is_float and not bool(stats["finite"]):
        raise ValueError("image contains NaN or Inf values; NL-means needs finite input (replace or mask them first)")
    noise = _sigma_from(values, dims, stats["extremes"]) if need_noise else None
    params = _resolve(np, image, spatial, sigma=noise if need_noise else sigma, h=h, patch_size=patch_size,
                      search_size=search_size, channel_axis=channel_axis, aggregation=aggregation,
                      data_range=data_range, peak=float(stats["peak"]) if need_peak else None)
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


def _denoise_with_halo(block, missing, *, channel_axis, params, workers):
    """A block read with whatever halo the array has around it -> the denoised chunk at its centre.

    ``missing`` gives, per spatial axis, the ``(before, after)`` samples of the
    halo that lie outside the array: they are made here by reflection, exactly
    as the in-memory call pads the whole array.
    """
    from .api import _from_working, _to_working

    xp = array_namespace(block, names=["image"])
    v = _to_working(xp, block, channel_axis)
    padded = reflect_pad(v, [(0, 0), *missing])
    inside = [(before, n - after) for (before, after), n in zip(missing, padded.shape[1:])]
    u = nl_means_fast_padded(padded, inside=inside, workers=workers, **params)
    return _from_working(xp, u, block, channel_axis)


def _denoise_block(block, *, block_info=None, channel_axis, halo_width, params, workers):
    """One chunk with its halo -> its denoised centre (map_overlap's function).

    ``halo_width`` is the halo per spatial axis. Where the chunk touches the
    array's edge, the halo is missing (``boundary="none"``).
    """
    info = block_info[0]
    location, count = info["chunk-location"], info["num-chunks"]
    axes = [i for i in range(block.ndim) if i != channel_axis]
    missing = [(m if location[a] == 0 else 0, m if location[a] == count[a] - 1 else 0)
               for a, m in zip(axes, halo_width)]
    return _denoise_with_halo(block, missing, channel_axis=channel_axis, params=params, workers=workers)


def _check_working_memory(chunks, channel_axis, params, aggregation, dtype, workers):
    """Refuse, before any work, chunks whose offset loop would not fit in WORKING_MEMORY_LIMIT."""
    from .api import WORKING_MEMORY_LIMIT

    channels = 1 if channel_axis is None else sum(chunks[channel_axis])
    largest = [max(c) for a, c in enumerate(chunks) if a != channel_axis]
    need = working_memory(largest, channels, params["patch_size"], params["search_size"], aggregation,
                          8 if dtype == np.float64 else 4, workers)
    if need > WORKING_MEMORY_LIMIT:
        raise ValueError(
            f"one chunk of {tuple(largest)} needs about {need / 2**30:.2f} GiB of working memory, above the limit of "
            f"{WORKING_MEMORY_LIMIT / 2**30:.2f} GiB (nlref.nlmeans.api.WORKING_MEMORY_LIMIT); use smaller chunks"
        )


def _check_workers(workers):
    if workers is None:
        return 1
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"workers must be a positive int or None; got {workers!r}")
    return int(workers)


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
    workers = _check_workers(workers)
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

    _check_working_memory(x.chunks, channel_axis, p, aggregation, np.dtype(image.dtype), workers)

    overlap = {a: m for a, m in zip(axes, depth)}
    if channel_axis is not None:
        overlap[channel_axis] = 0
    out = da.map_overlap(_denoise_block, x, depth=overlap, boundary="none", trim=False, allow_rechunk=False,
                         chunks=x.chunks, dtype=image.dtype, meta=image._meta, token="nl_means",
                         channel_axis=channel_axis, halo_width=tuple(depth), params=params, workers=workers)
    return out.rechunk(image.chunks, method="tasks") if out.chunks != image.chunks else out


# ---- arrays in a store: every task reads its own chunk and halo, no task waits for another ----


def _read_with_halo(source, key, shape, depth):
    """``source[key]`` grown by ``depth`` samples per axis (clipped to the array), and what the clip cut off.

    Returns the block (a NumPy array) and, per axis, the ``(before, after)``
    samples of the halo that lie outside the array.
    """
    read, missing = [], []
    for s, n, m in zip(key, shape, depth):
        start, stop, _ = s.indices(n)
        lo, hi = max(start - m, 0), min(stop + m, n)
        read.append(slice(lo, hi))
        missing.append((m - (start - lo), m - (hi - stop)))
    return np.asarray(source[tuple(read)]), missing


class _StoredBlocks:
    """An array computed block by block from ``source``, for ``dask.array.from_array``.

    Dask calls ``self[key]`` once per chunk, with ``key`` a tuple of slices;
    the subclass reads what it needs from ``source`` there. Nothing else is
    shared between tasks, so the graph has one task per chunk and no task
    depends on another: a worker holds only the chunks it is computing.
    """

    def __init__(self, source, shape, dtype):
        self.source, self.shape, self.dtype = source, tuple(shape), np.dtype(dtype)

    @property
    def ndim(self):
        return len(self.shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if len(key) != self.ndim or not all(isinstance(s, slice) and s.step in (None, 1) for s in key):
            raise IndexError(f"{type(self).__name__} is read by chunks (one slice per axis); got {key!r}")
        return self._block(key)


class _Denoised(_StoredBlocks):
    """NL-means of ``source``: block ``key`` is read with its halo and denoised (one task per chunk)."""

    def __init__(self, source, *, channel_axis, halo_width, params, workers):
        super().__init__(source, source.shape, source.dtype)
        depth = list(halo_width)
        if channel_axis is not None:
            depth.insert(channel_axis, 0)
        self.channel_axis, self.depth, self.params, self.workers = channel_axis, tuple(depth), params, workers

    def _block(self, key):
        block, missing = _read_with_halo(self.source, key, self.shape, self.depth)
        if self.channel_axis is not None:
            del missing[self.channel_axis]
        return _denoise_with_halo(block, missing, channel_axis=self.channel_axis, params=self.params,
                                  workers=self.workers)


class _Filtered(_StoredBlocks):
    """|second differences| of ``source``, channel first, as :func:`nlref.estimate_sigma` filters it.

    Shape ``(C, ...)``: every axis in ``axes`` (channel-first numbering) is
    two samples shorter (the valid part). A block reads one more sample on
    each side along those axes, so its values are the whole array's, bit for
    bit.
    """

    def __init__(self, source, *, channel_axis, axes):
        moved = list(source.shape)
        channels = 1 if channel_axis is None else moved.pop(channel_axis)
        shape = [channels, *moved]
        for a in axes:
            shape[a] -= 2
        dtype = source.dtype if np.dtype(source.dtype).kind == "f" else np.float64
        super().__init__(source, shape, dtype)
        self.channel_axis, self.axes = channel_axis, tuple(axes)

    def _block(self, key):
        grown = [slice(s.start, s.stop + 2) if a in self.axes else s for a, s in enumerate(key)]
        spatial = grown[1:]
        if self.channel_axis is None:
            x = np.asarray(self.source[tuple(spatial)])[None, ...]
        else:
            spatial.insert(self.channel_axis, grown[0])
            x = np.moveaxis(np.asarray(self.source[tuple(spatial)]), self.channel_axis, 0)
        x = x if x.dtype.kind == "f" else x.astype(np.float64)
        return abs(_second_differences_block(x, axes=self.axes))


def _check_source(source):
    """The array-like a store-backed run reads: shape, dtype and NumPy slicing."""
    if not all(hasattr(source, name) for name in ("shape", "dtype", "__getitem__")):
        raise TypeError(f"source must be an array in a store (zarr.Array, h5py.Dataset, numpy.memmap) or any object "
                        f"with shape, dtype and NumPy slicing; got {type(source).__name__}")


def _store_chunks(source, chunks, channel_axis, spatial):
    """The chunk grid (one tuple per axis) from ``chunks``: the channel axis is never split."""
    if chunks is None:
        stored = getattr(source, "chunks", None)
        if not (isinstance(stored, tuple) and len(stored) == len(source.shape)):
            raise ValueError(f"chunks must be given: the source ({type(source).__name__}) has no chunk grid")
        sizes = [c for a, c in enumerate(stored) if a != channel_axis]
    elif isinstance(chunks, numbers.Integral) and not isinstance(chunks, bool):
        sizes = [int(chunks)] * len(spatial)
    else:
        sizes = list(chunks) if isinstance(chunks, (tuple, list)) else None
        if sizes is not None and channel_axis is not None and len(sizes) == len(source.shape):
            del sizes[channel_axis]
        if sizes is None or len(sizes) != len(spatial):
            raise ValueError(f"chunks must be an int or one int per spatial axis ({len(spatial)}); got {chunks!r}")
    if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 1 for c in sizes):
        raise ValueError(f"chunks must be positive ints; got {chunks!r}")
    sizes = [min(int(c), n) for c, n in zip(sizes, spatial)]
    if channel_axis is not None:
        sizes.insert(channel_axis, source.shape[channel_axis])
    return tuple(tuple([c] * (n // c) + ([n % c] if n % c else [])) for c, n in zip(sizes, source.shape))


def _from_blocks(blocks, chunks, prefix):
    """``blocks[key]`` per chunk, as a Dask array of independent tasks (``blocks`` travels inside each task)."""
    import dask.array as da

    return da.from_array(blocks, chunks=chunks, name=f"{prefix}-{uuid.uuid4().hex}", asarray=True, fancy=False,
                         lock=False, inline_array=True, meta=np.empty((0,) * len(blocks.shape), np.dtype(blocks.dtype)))


def _filtered_store(source, channel_axis, chunks):
    """:func:`_filtered` of a stored array: one task per chunk, each reading its chunk and a one-sample margin."""
    shape = list(source.shape)
    channels = 1 if channel_axis is None else shape.pop(channel_axis)
    axes = [a for a, n in enumerate(shape, start=1) if n >= 3]
    if not axes:
        raise ValueError(f"image needs an axis with at least 3 samples to estimate sigma; shape {tuple(source.shape)}")
    blocks = _Filtered(source, channel_axis=channel_axis, axes=axes)
    spatial_chunks = [max(c) for a, c in enumerate(chunks) if a != channel_axis]
    values = _from_blocks(blocks, (1, *spatial_chunks), "nlref-filtered")
    return [values[c, ...] for c in range(channels)], len(axes)


def resolve_parameters_store(source, *, chunks=None, sigma=None, h=None, patch_size=None, search_size=None,
                             channel_axis=None, aggregation="pixel", data_range=None):
    """:func:`nlref.resolve_parameters` for an array in a store: once, for the whole array.

    The same passes as :func:`resolve_parameters_dask`, each made of
    independent tasks, one per chunk, that read their chunk (and, for the
    noise estimate, one more sample on each side) straight from ``source``.

    Parameters
    ----------
    source, chunks
        As for :func:`nl_means_store`.
    Other parameters
        As for :func:`nlref.resolve_parameters`.
    """
    _check_source(source)
    channel_axis, spatial = _check(source, channel_axis)
    grid = _store_chunks(source, chunks, channel_axis, spatial)
    return _resolve_lazy(_from_blocks(source, grid, "nlref-source"), lambda: _filtered_store(source, channel_axis, grid), spatial,
                         sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                         channel_axis=channel_axis, aggregation=aggregation, data_range=data_range)


def nl_means_store(source, *, chunks=None, sigma=None, h=None, patch_size=None, search_size=None, channel_axis=None,
                   aggregation="pixel", data_range=None, workers=None):
    """NL-means of an array in a store (Zarr, HDF5, a memory map), chunk by chunk; returns a lazy Dask array.

    Each task reads its chunk and its halo straight from ``source``, pads
    reflectively where the chunk touches the array's edge and denoises it:
    one task per chunk, none depending on another. So a worker holds only
    the chunks it is computing (its threads times about 11 to 14
    (chunk + halo) bytes), whatever the size of the array, where a Dask
    array's ``map_overlap`` keeps neighbour chunks waiting for each other.
    The result equals :func:`nlref.nl_means` of the whole array in memory,
    bit for bit (with the same ``workers``).

    Parameters
    ----------
    source : array-like
        ``zarr.Array``, ``h5py.Dataset``, ``numpy.memmap``, a NumPy array,
        or any object with ``shape``, ``dtype`` and NumPy slicing that
        returns NumPy arrays. It must be readable where the tasks run (a
        path every worker of a cluster sees).
    chunks : int or tuple of int, optional
        Chunk size per spatial axis (one int for all); the channel axis is
        never split. Default: the store's own chunks. Chunks of any size
        work, also smaller than the halo (each task reads what it needs).
    workers : int, optional
        Threads per chunk (default 1: Dask runs chunks in parallel).
    Other parameters
        As for :func:`nlref.nl_means`; resolved once for the whole array
        (:func:`resolve_parameters_store`) before this returns.

    Returns
    -------
    denoised : dask.array.Array
        Lazy, NumPy-backed: the source's shape and dtype, the given chunks.
        Write it with ``dask.array.to_zarr`` or ``dask.array.store``.
    """
    _check_source(source)
    workers = _check_workers(workers)
    channel_axis, spatial = _check(source, channel_axis)
    grid = _store_chunks(source, chunks, channel_axis, spatial)
    p = resolve_parameters_store(source, chunks=chunks, sigma=sigma, h=h, patch_size=patch_size,
                                 search_size=search_size, channel_axis=channel_axis, aggregation=aggregation,
                                 data_range=data_range)
    params = dict(h=p["h"], sigma=p["sigma"], patch_size=p["patch_size"], search_size=p["search_size"],
                  aggregation=aggregation)
    _check_working_memory(grid, channel_axis, p, aggregation, np.dtype(source.dtype), workers)
    blocks = _Denoised(source, channel_axis=channel_axis,
                       halo_width=halo(p["patch_size"], p["search_size"], aggregation), params=params,
                       workers=workers)
    return _from_blocks(blocks, grid, "nlref-nl-means")
