"""The public entry point :func:`nl_means`: checks, conventions, presets, dispatch."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from .._typing import Array, Size
import numpy as np

from ..backend import array_namespace, available_memory, check_flag, device, dtype_name
from .checks import check_axes, check_image, check_workers, is_dask_array, pixel_index, warn_layout
from .fast import nl_means_fast, resolve_engine, working_memory
from .naive import nl_means_naive, patch_weights
from .noise import estimate_sigma as estimate_sigma_in_memory
from .overlap import estimate_sigma_dask, nl_means_dask, resolve_parameters_dask
from .params import WORKING_MEMORY_LIMIT, from_working, resolve, run_parameters, to_working, working_itemsize

__all__ = ["nl_means", "nl_means_weights", "resolve_parameters", "estimate_sigma", "check_limits", "memory_available",
           "WORKING_MEMORY_LIMIT", "NAIVE_COMPARISON_LIMIT"]

#: The naive method refuses more patch comparisons (pixels x offsets) than this:
#: it is the readable specification, meant for small inputs.
NAIVE_COMPARISON_LIMIT = 2_000_000

_METHODS = ("fast", "naive")


def estimate_sigma(image: Array, *, channel_axis: int | None = None) -> float:
    """Estimate the noise standard deviation of ``image`` (in its own units).

    The median absolute second difference, scaled to a Gaussian's standard
    deviation (:mod:`nlref.nlmeans.noise`). A Dask array is estimated chunk
    by chunk with the exact median (:func:`nlref.nlmeans.overlap.estimate_sigma_dask`),
    equal to the in-memory estimate.

    Parameters
    ----------
    image : array, shape (n_0, ..., n_{d-1}) or with one channel axis
        Floating point or integer; any array-API library, or a Dask array.
    channel_axis : int, optional
        The channel axis, if any (one estimate per channel, averaged).

    Returns
    -------
    sigma : float
        Python float, in the units of the image values.

    Notes
    -----
    Only axes with at least 3 samples are filtered. A noise-free image with
    smooth content gives values near 0; strong texture biases the estimate
    upwards (as for every single-image estimator).
    """
    if is_dask_array(image):  # exact median by histogram selection, chunk by chunk
        return estimate_sigma_dask(image, channel_axis=channel_axis)
    return estimate_sigma_in_memory(image, channel_axis=channel_axis)


def resolve_parameters(image: Array, *, sigma: float | None = None, h: float | None = None,
                       patch_size: Size | None = None, search_size: Size | None = None,
                       channel_axis: int | None = None, aggregation: str = "pixel",
                       data_range: float | None = None) -> dict:
    """The parameters :func:`nl_means` would use for these arguments.

    Returns
    -------
    params : dict
        ``sigma``, ``h``, ``patch_size``, ``search_size`` (tuples, one per
        spatial axis), ``sigma_source`` ("given", "estimated") and ``preset``
        (the table row, or None when every size and h were given).
    """
    if is_dask_array(image):
        warn_layout(image.shape, channel_axis, stacklevel=3)
        return resolve_parameters_dask(image, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                                       channel_axis=channel_axis, aggregation=aggregation, data_range=data_range)
    xp, channel_axis, spatial = check_image(image, channel_axis)
    return resolve(xp, image, spatial, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                    channel_axis=channel_axis, aggregation=aggregation, data_range=data_range)


def nl_means(image: Array, *, sigma: float | None = None, h: float | None = None, patch_size: Size | None = None,
             search_size: Size | None = None, channel_axis: int | None = None,
             aggregation: str = "pixel", method: str = "fast", data_range: float | None = None,
             workers: int | None = None, progress: bool = False) -> Array:
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
        21x21 pixels). Default from the preset table. A patch is at most as wide as
        the image; a search window has at most as many offsets as one ``2 n - 1`` wide
        along each axis of ``n`` samples, which reaches every sample from every sample.
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
        Threads for the fast method on NumPy (default: the CPU count, at most 8,
        fewer where the available memory holds fewer; for a Dask array, threads
        per chunk, default 1). The result is the same to the bit for any value.
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
    Computation is in float32, or in float64 for float64, longdouble and 32-
    or 64-bit integer input (a dtype whose every value float32 does not hold;
    int64 and uint64 values from 2^53 on are refused). Integer images
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
        memory the machine has available (fast) or the size limit (naive).

    Warns
    -----
    UserWarning
        ``sigma`` or ``h`` far outside the image's value range (the 0..255 versus
        0..1 mix-up: ``sigma=20`` on an image in 0..1), or a shape that suggests a
        missing or misplaced ``channel_axis`` (``(H, W, 3)`` without it).
    """
    progress = check_flag("progress", progress)
    if is_dask_array(image):  # chunk by chunk, exact: nlref.nlmeans.chunked
        warn_layout(image.shape, channel_axis, stacklevel=3)
        return nl_means_dask(image, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                             channel_axis=channel_axis, aggregation=aggregation, method=method,
                             data_range=data_range, workers=workers, progress=progress)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
    xp, channel_axis, spatial = check_image(image, channel_axis)
    params = resolve(xp, image, spatial, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                      channel_axis=channel_axis, aggregation=aggregation, data_range=data_range)
    kwargs = run_parameters(params, aggregation)
    n_offsets = math.prod(params["search_size"])
    workers = check_limits(image, params, channel_axis=channel_axis, aggregation=aggregation, method=method,
                           workers=workers)

    if method == "naive":
        u = nl_means_naive(to_working(xp, image, channel_axis), **kwargs)
        return from_working(xp, u, image, channel_axis)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        passes = 2 if aggregation == "patch" else 1
        bar = tqdm(total=passes * (n_offsets // 2), desc="nl_means", unit="offset")
    try:
        u = nl_means_fast(to_working(xp, image, channel_axis), workers=workers,
                          progress=None if bar is None else bar.update, **kwargs)
    finally:
        if bar is not None:
            bar.close()
    return from_working(xp, u, image, channel_axis)


def check_limits(image: Array, params: dict, *, channel_axis: int | None = None, aggregation: str = "pixel",
                 method: str = "fast", workers: int | None = None) -> int | None:
    """Refuse a request above the size limit of ``method="naive"`` or the memory available to ``"fast"``.

    ``params`` as ``resolve_parameters`` returns them for ``image`` (in memory) and these
    arguments. :func:`nl_means` calls it before any work; a caller that resolves the
    parameters itself (``nlref denoise``) calls it to learn before the work whether
    :func:`nl_means` would refuse. Reads the shape and dtype only. The fast method's working
    memory, estimated for the engine that will run (:func:`nlref.nlmeans.fast.working_memory`), is
    measured against :func:`memory_available`: the memory the machine has available now, for an
    array on the host. Returns ``workers`` checked for the fast method (the default: the CPU count,
    at most 8, lowered to as many as fit), None for the naive one; raises ValueError naming the
    image's size, the need, the memory available and what to do.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
    channel_axis, spatial = check_axes(tuple(image.shape), channel_axis)
    n_offsets = math.prod(params["search_size"])
    if method == "naive":
        comparisons = math.prod(spatial) * n_offsets
        if comparisons > NAIVE_COMPARISON_LIMIT:
            raise ValueError(
                f"method='naive' would make {comparisons:,} patch comparisons (limit "
                f"{NAIVE_COMPARISON_LIMIT:,}, nlref.nlmeans.api.NAIVE_COMPARISON_LIMIT); it is the readable "
                "specification for small inputs: crop the image or use method='fast'"
            )
        return None
    given = workers
    workers = check_workers(workers, default=min(os.cpu_count() or 1, 8))
    channels = 1 if channel_axis is None else image.shape[channel_axis]
    itemsize = working_itemsize(image.dtype)
    engine = resolve_engine(array_namespace(image, names=["image"]))

    def need(threads):
        return working_memory(spatial, channels, params["patch_size"], params["search_size"], aggregation, itemsize,
                              threads, engine=engine)

    available, source = memory_available(image)
    if need(workers) <= available:
        return workers
    if given is None and need(1) <= available:  # the default: as many threads as fit (the same bits for any)
        return max(t for t in range(1, workers + 1) if need(t) <= available)
    if given is None:  # not even one thread fits: its need is the figure to beat
        workers = 1
    fewer = ", or fewer workers" if workers > 1 and need(1) <= available else ""
    threads = f"{workers} thread{'s' if workers > 1 else ''}"
    raise ValueError(
        f"an image of shape {tuple(image.shape)} ({dtype_name(image.dtype)}, "
        f"{_size(math.prod(image.shape) * _itemsize(image))}) needs about {_size(need(workers))} of working memory "
        f"here (patch_size={params['patch_size']}, search_size={params['search_size']}, {aggregation}-wise, "
        f"the {engine} engine, {threads}), more than the {_size(available)} {source}. Denoise it chunk by chunk "
        "(as a Dask array, with nlref.nl_means_store, or nlref denoise --chunks for a file), or use a smaller "
        f"search_size{fewer}"
    )


def memory_available(image: Array) -> tuple[int, str]:
    """The bytes the fast method may use for ``image``, and where the figure comes from.

    On the host (NumPy, PyTorch on the CPU, array-api-strict): the memory this machine has
    available now (:func:`nlref.backend.available_memory`). On a GPU, or where the machine
    does not tell: :data:`WORKING_MEMORY_LIMIT`.
    """
    if _on_host(image):
        available = available_memory()
        if available is not None:
            return available, "available on this machine"
    return WORKING_MEMORY_LIMIT, "allowed where the free memory is not known (nlref.nlmeans.WORKING_MEMORY_LIMIT)"


def _on_host(image):
    name = str(device(image))
    return name == "cpu" or "CPU_DEVICE" in name


def _itemsize(image):
    """Bytes per sample of ``image`` (of any library; PyTorch's bfloat16, which NumPy may not know, is 2)."""
    name = dtype_name(image.dtype)
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


def _size(n):
    """``4.00 GiB``, ``12.3 MiB``, ``96.0 KiB``."""
    return (f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else
            f"{n / 2**10:.1f} KiB")


def nl_means_weights(image: Array, index: int | Sequence[int], *, sigma: float | None = None,
                     h: float | None = None, patch_size: Size | None = None, search_size: Size | None = None,
                     channel_axis: int | None = None, data_range: float | None = None) -> Array:
    """The NL-means weights of one pixel over its search window (unnormalised).

    The first picture of "attention": how much each neighbour ``q`` of the
    pixel ``p = index`` contributes to its estimate. Arguments as for
    :func:`nl_means`; ``index`` gives one coordinate per spatial axis (a tuple such
    as ``(row, col)``; a bare int for a 1-D signal).

    Returns
    -------
    weights : array, shape search_size
        ``weights[o + search_size // 2] = w(p, p + o)``; the centre is 1. In the
        image's library and on its device, in the dtype NL-means computes in:
        float64 for a float64 image, float32 for any other (integers, float16,
        PyTorch's bfloat16).
    """
    xp, channel_axis, spatial = check_image(image, channel_axis)
    index = pixel_index(index, spatial)
    params = resolve(xp, image, spatial, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                     channel_axis=channel_axis, aggregation="pixel", data_range=data_range)
    v = to_working(xp, image, channel_axis)
    return patch_weights(v, index, h=params["h"], sigma=params["sigma"],
                         patch_size=params["patch_size"], search_size=params["search_size"])
