r"""NL-means of a Dask array through ``dask.array.map_overlap`` (what :func:`nlref.nl_means` calls for one).

Each chunk carries ``m`` samples of its neighbours on every side
(:func:`nlref.nlmeans.fast.halo`), taken by ``map_overlap`` with
``boundary="none"``; at the array's true edges the halo is nlref's own reflect
padding, made inside the task (:func:`nlref.nlmeans.chunk.denoise_with_halo`).
So the result equals the in-memory call bit for bit.

``map_overlap`` takes a halo only from the adjacent chunks, so chunks smaller
than the halo are merged first (:func:`chunks_for_halo`); an axis shorter than
the halo becomes one chunk, which takes no halo from Dask at all (its whole
halo is reflection, as in memory).
"""

from __future__ import annotations

import numpy as np

from .checks import NOT_FINITE, check_lazy, check_workers, sigma_axes
from .chunk import denoise_with_halo
from .fast import halo
from .median import resolve_lazy, sigma_from_filtered
from .noise import filter_dtype, second_difference, second_differences
from .params import check_arguments, check_working_memory, run_parameters

__all__ = ["nl_means_dask", "resolve_parameters_dask", "estimate_sigma_dask", "chunks_for_halo", "filtered_dask",
           "without_empty_chunks"]


def without_empty_chunks(image):
    """``image`` with its chunks of size 0 dropped (the same values, lazily; ``image`` itself when it has none).

    Dask allows a chunk of size 0 (``da.concatenate`` with an empty piece,
    ``from_array`` with such ``chunks``), but its reductions do not always
    take one: in dask 2026.8, ``max`` of a 2-D array whose first chunk along
    axis 0 is empty raises "all the input array dimensions ... must match
    exactly". Every chunked pass and the denoising run on the chunks that
    hold samples. The image must not be empty (``check_lazy``).
    """
    chunks = tuple(tuple(c for c in axis if c) for axis in image.chunks)
    return image if chunks == tuple(image.chunks) else image.rechunk(chunks)


def _second_differences_block(block, *, axes):
    """[1, -2, 1] along each of ``axes`` in turn, keeping the valid part (the halo is 1 sample wide)."""
    if isinstance(block, np.ndarray):  # the same bits in fewer temporaries
        return second_differences(block, axes, block.dtype)
    for axis in axes:
        block = second_difference(block, axis)
    return block


def filtered_dask(image, channel_axis):
    """The absolute second differences of every channel (lazy), as :func:`nlref.estimate_sigma` filters them.

    Chunk by chunk: a halo of one sample along every filtered axis, and the
    same operations in the same order as in memory (so the values are equal
    bit for bit). Returns (one lazy array per channel, number of filtered axes).
    """
    import dask.array as da

    dtype = filter_dtype(image.dtype)
    x = image if np.dtype(image.dtype) == dtype else image.astype(dtype)
    x = x[None, ...] if channel_axis is None else da.moveaxis(x, channel_axis, 0)
    axes = [1 + a for a in sigma_axes(x.shape[1:], image.shape)]
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


def estimate_sigma_dask(image, *, channel_axis=None):
    """:func:`nlref.estimate_sigma` of a Dask array, exactly (equal to the in-memory estimate).

    The median of the absolute second differences is found by histogram
    selection (:mod:`nlref.nlmeans.median`): about three reads of the data
    per channel, each chunk-local (memory of one chunk per task), on the
    scheduler that is active.

    Parameters
    ----------
    image : dask.array.Array
        As for :func:`nlref.estimate_sigma`; NumPy- or CuPy-backed chunks.
    channel_axis : int, optional

    Returns
    -------
    sigma : float
    """
    import dask
    import dask.array as da

    channel_axis, _ = check_lazy(image, channel_axis)
    image = without_empty_chunks(image)
    values, dims = filtered_dask(image, channel_axis)
    lazy = {"extremes": [(v.min(), v.max()) for v in values]}
    if np.dtype(image.dtype).kind == "f":  # in the same pass: NaN or Inf in the image
        lazy["finite"] = da.isfinite(image).all()
    (stats,) = dask.compute(lazy)
    if not bool(stats.get("finite", True)):
        raise ValueError(NOT_FINITE)
    return sigma_from_filtered(values, dims, stats["extremes"])


def resolve_parameters_dask(image, *, sigma=None, h=None, patch_size=None, search_size=None, channel_axis=None,
                            aggregation="pixel", data_range=None):
    """:func:`nlref.resolve_parameters` for a Dask array: once, for the whole array.

    One pass over the data checks that every value is finite and reads the
    peak and, when the noise must be estimated, the range of the second
    differences; the exact median adds about two passes
    (:func:`nlref.nlmeans.median.resolve_lazy`).

    Returns
    -------
    params : dict
        As :func:`nlref.resolve_parameters`.
    """
    channel_axis, spatial = check_lazy(image, channel_axis)
    image = without_empty_chunks(image)
    return resolve_lazy(image, lambda: filtered_dask(image, channel_axis), spatial, sigma=sigma, h=h,
                        patch_size=patch_size, search_size=search_size, channel_axis=channel_axis,
                        aggregation=aggregation, data_range=data_range)


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


def _work_chunks(image, channel_axis, depth):
    """The chunks the denoising runs on: every one at least as large as the halo ``depth`` (one per spatial
    axis), and the channels in one chunk (patch distances sum over them)."""
    axes = [i for i in range(image.ndim) if i != channel_axis]
    work_chunks = list(image.chunks)
    for a, m in zip(axes, depth):
        work_chunks[a] = chunks_for_halo(image.chunks[a], m)
    if channel_axis is not None:
        work_chunks[channel_axis] = (image.shape[channel_axis],)
    return tuple(work_chunks)


def _denoise_block(block, *, block_info=None, channel_axis, halo_width, params, workers):
    """One chunk with the halo Dask gave it -> its denoised centre (map_overlap's function).

    ``halo_width`` is the halo per spatial axis. Where the chunk touches the
    array's edge, the halo is missing (``boundary="none"``, or no overlap at
    all along an axis that is one chunk).
    """
    info = block_info[0]
    location, count = info["chunk-location"], info["num-chunks"]
    axes = [i for i in range(block.ndim) if i != channel_axis]
    missing = [(m if location[a] == 0 else 0, m if location[a] == count[a] - 1 else 0)
               for a, m in zip(axes, halo_width)]
    return denoise_with_halo(block, missing, channel_axis=channel_axis, params=params, workers=workers)


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
        passed through). Any shape the in-memory call takes, also axes
        shorter than the halo.
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
    workers = check_workers(workers)
    channel_axis, spatial = check_lazy(image, channel_axis)
    given_chunks, image = image.chunks, without_empty_chunks(image)
    if patch_size is not None and search_size is not None:  # the chunks' memory, known before any pass
        sizes = check_arguments(spatial, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                                aggregation=aggregation, data_range=data_range)
        check_working_memory(_work_chunks(image, channel_axis, halo(sizes["patch_size"], sizes["search_size"],
                                                                    aggregation)),
                             channel_axis, sizes, aggregation, np.dtype(image.dtype), workers)
    p = resolve_parameters_dask(image, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                                channel_axis=channel_axis, aggregation=aggregation, data_range=data_range)
    params = run_parameters(p, aggregation)
    depth = halo(p["patch_size"], p["search_size"], aggregation)
    work_chunks = _work_chunks(image, channel_axis, depth)
    x = image.rechunk(work_chunks, method="tasks") if work_chunks != image.chunks else image

    check_working_memory(x.chunks, channel_axis, p, aggregation, np.dtype(image.dtype), workers)

    # an axis in one chunk takes nothing from Dask (its halo is all reflection, made in the task);
    # map_overlap refuses a depth larger than an axis
    axes = [i for i in range(image.ndim) if i != channel_axis]
    overlap = {a: (m if len(x.chunks[a]) > 1 else 0) for a, m in zip(axes, depth)}
    if channel_axis is not None:
        overlap[channel_axis] = 0
    out = da.map_overlap(_denoise_block, x, depth=overlap, boundary="none", trim=False, allow_rechunk=False,
                         chunks=x.chunks, dtype=image.dtype, meta=image._meta, token="nl_means",
                         channel_axis=channel_axis, halo_width=tuple(depth), params=params, workers=workers)
    return out.rechunk(given_chunks, method="tasks") if out.chunks != given_chunks else out
