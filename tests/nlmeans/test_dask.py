"""NL-means on Dask arrays (nlref.nlmeans.chunked): exact, chunk-local, bounded.

The reference is the in-memory call on the same data. Whatever the number of
threads per chunk and in memory, every output sample is computed by the same
operations in the same order, so the comparison is bitwise.
"""

from __future__ import annotations

import importlib
import importlib.util
import tracemalloc

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import nlref  # noqa: E402
from nlref.nlmeans import chunked, median  # noqa: E402
from nlref.nlmeans.fast import halo, working_memory  # noqa: E402
from tests.helpers import traced_peak  # noqa: E402


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def _noisy(shape, seed=0, dtype=np.float32, sigma=0.1):
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    clean = 0.5 + 0.3 * np.sin(6 * sum(axes))
    return (clean + sigma * rng.standard_normal(shape)).astype(dtype)


# (name, shape, chunks, kwargs): grey, colour, volumes and videos with per-axis sizes, uneven chunks,
# chunks smaller than the halo and chunks across the channel axis
CASES = [
    ("grey", (45, 52), (20, 17), dict(sigma=0.1, patch_size=5, search_size=9)),
    ("grey-presets", (40, 37), (13, 20), dict()),
    ("grey-small-chunks", (30, 33), (3, 4), dict(sigma=0.1, patch_size=3, search_size=7)),
    ("colour-channel-chunks", (28, 31, 3), (10, 9, 1), dict(sigma=0.1, patch_size=3, search_size=7,
                                                           channel_axis=-1)),
    ("colour-first", (3, 26, 24), (2, 8, 24), dict(sigma=0.1, patch_size=3, search_size=5, channel_axis=0)),
    ("volume", (12, 20, 22), (5, 7, 11), dict(sigma=0.1, patch_size=(3, 3, 5), search_size=(3, 5, 7))),
    ("video-colour", (6, 14, 15, 2), (2, 6, 5, 2), dict(sigma=0.1, patch_size=(1, 3, 3), search_size=(3, 5, 5),
                                                        channel_axis=-1)),
    ("signal", (200,), (37,), dict(sigma=0.1, patch_size=5, search_size=11)),
]


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
@pytest.mark.parametrize("name, shape, chunks, kwargs", CASES, ids=[c[0] for c in CASES])
def test_chunked_equals_in_memory_bitwise(name, shape, chunks, kwargs, aggregation):
    image = _noisy(shape)
    expected = nlref.nl_means(image, aggregation=aggregation, workers=1, **kwargs)
    lazy = nlref.nl_means(da.from_array(image, chunks=chunks), aggregation=aggregation, **kwargs)
    assert isinstance(lazy, da.Array)
    assert lazy.chunks == da.from_array(image, chunks=chunks).chunks
    assert lazy.dtype == image.dtype
    result = lazy.compute()
    assert type(result) is np.ndarray
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("dtype", [np.float64, np.uint8, np.int16])
@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
def test_dtypes_and_integer_scaling(dtype, aggregation):
    image = _noisy((33, 35), seed=2, dtype=np.float64)
    if dtype != np.float64:
        image = np.clip(np.round(image * 200), 0, 255).astype(dtype)
    expected = nlref.nl_means(image, aggregation=aggregation, workers=1)
    result = nlref.nl_means(da.from_array(image, chunks=(11, 16)), aggregation=aggregation).compute()
    assert result.dtype == dtype
    np.testing.assert_array_equal(result, expected)


def test_threads_per_chunk_match_in_memory_threads():
    image = _noisy((40, 41), seed=3)
    kwargs = dict(sigma=0.1, patch_size=3, search_size=9, aggregation="patch", workers=2)
    expected = nlref.nl_means(image, **kwargs)
    result = nlref.nl_means(da.from_array(image, chunks=(15, 20)), **kwargs).compute()
    np.testing.assert_array_equal(result, expected)
    # the offsets' partition never depends on the thread count: the same bits with one thread
    one_thread = nlref.nl_means(image, **{**kwargs, "workers": 1})
    np.testing.assert_array_equal(result, one_thread)


def test_parameters_resolved_once_for_the_whole_array():
    image = _noisy((48, 50), seed=4, sigma=0.08)
    x = da.from_array(image, chunks=(12, 12))
    whole = nlref.resolve_parameters(image)
    assert nlref.resolve_parameters(x) == whole
    assert nlref.estimate_sigma(x) == nlref.estimate_sigma(image)
    # per-chunk estimates (what a per-chunk call would use) are not the whole-array one
    per_chunk = {nlref.estimate_sigma(image[i:i + 12, j:j + 12]) for i in range(0, 48, 12) for j in range(0, 50, 12)}
    assert whole["sigma"] not in per_chunk and len(per_chunk) > 1
    # h given, sigma estimated only to choose the sizes: sigma is then 0, as in memory
    assert nlref.resolve_parameters(x, h=0.05) == nlref.resolve_parameters(image, h=0.05)


@pytest.mark.parametrize("kind", ["uint8", "float32", "colour-float64"])
def test_exact_median_selection_through_narrowing(monkeypatch, kind):
    """Small histograms and gather limits force every branch of the selection (split, narrow, gather)."""
    monkeypatch.setattr(median, "HISTOGRAM_BINS", 4)
    monkeypatch.setattr(median, "GATHER_LIMIT", 7)
    rng = np.random.default_rng(5)
    if kind == "uint8":
        image, axis = rng.integers(0, 6, size=(31, 29)).astype(np.uint8), None  # many repeated values
    elif kind == "float32":
        image, axis = rng.standard_normal((30, 33)).astype(np.float32), None
    else:
        image, axis = rng.standard_normal((17, 19, 3)), -1
    x = da.from_array(image, chunks=(7, 8) + ((2,) if axis else ()))
    assert nlref.estimate_sigma(x, channel_axis=axis) == nlref.estimate_sigma(image, channel_axis=axis)


def test_chunks_for_halo():
    assert chunked.chunks_for_halo((3, 3, 3, 3, 2), 5) == (6, 8)
    assert chunked.chunks_for_halo((10, 10, 4), 5) == (10, 14)
    assert chunked.chunks_for_halo((2, 2), 5) == (4,)
    assert chunked.chunks_for_halo((7, 9), 5) == (7, 9)
    assert sum(chunked.chunks_for_halo((1,) * 23, 4)) == 23


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
def test_graph_grows_with_chunks_not_offsets(aggregation):
    """Tasks per chunk are bounded by a constant: independent of the search window and of the chunk count."""
    image = _noisy((16, 48, 48))
    ratios = []
    for chunks, search in (((8, 16, 16), 3), ((8, 16, 16), 7), ((4, 12, 12), 3), ((4, 8, 8), 3)):
        x = da.from_array(image, chunks=chunks)
        out = nlref.nl_means(x, sigma=0.1, patch_size=3, search_size=search, aggregation=aggregation)
        ratios.append(len(out.__dask_graph__()) / x.npartitions)
    # per chunk: reading it, at most 3**d halo pieces, joining them, one NL-means task
    assert max(ratios) <= 3**3 + 3, ratios
    assert ratios[0] == ratios[1], ratios  # a larger search window (more offsets) adds no task


def test_peak_memory_is_a_multiple_of_chunk_plus_halo():
    """tracemalloc around every task of a synchronous store: what one task adds to the memory at its peak.

    The NL-means task of a chunk holds its block (chunk + halo) and the offset
    loop's buffers: about 9 blocks, below nlref.nlmeans.fast.working_memory's
    estimate of 12 (pixel-wise, one channel, one thread). Between tasks the
    scheduler holds only views and the block being assembled (its own graph
    bookkeeping, a few kB per task, is not array data).
    """
    from dask.callbacks import Callback

    image = _noisy((32, 256, 256))  # 8 MiB, 64 chunks
    kwargs = dict(sigma=0.1, patch_size=3, search_size=5, aggregation="pixel")
    chunks = (8, 64, 64)
    # Numba's kernels compiled or loaded outside the trace: run alone, the first task traced them (124 blocks)
    nlref.nl_means(image[:4, :16, :16], workers=1, **kwargs)
    out = nlref.nl_means(da.from_array(image, chunks=chunks), **kwargs)
    target = np.empty_like(image)
    added = []

    class PerTask(Callback):
        def _pretask(self, key, dsk, state):
            tracemalloc.reset_peak()
            self.start = tracemalloc.get_traced_memory()[0]

        def _posttask(self, key, result, dsk, state, id):
            added.append(tracemalloc.get_traced_memory()[1] - self.start)

    tracemalloc.start()
    try:
        with PerTask():
            da.store(out, target, scheduler="synchronous")
    finally:
        tracemalloc.stop()
    m = halo((3, 3, 3), (5, 5, 5))
    block = np.prod([c + 2 * w for c, w in zip(chunks, m)]) * image.itemsize  # chunk + halo, float32
    loop = working_memory(chunks, 1, (3, 3, 3), (5, 5, 5), "pixel", 4, 1)
    assert loop == 12 * block
    assert block < max(added) <= loop, (max(added) / block)
    np.testing.assert_array_equal(target, nlref.nl_means(image, workers=1, **kwargs))


def test_errors():
    x = da.from_array(_noisy((20, 20)), chunks=10)
    with pytest.raises(ValueError, match="method"):
        nlref.nl_means(x, sigma=0.1, method="naive")
    with pytest.raises(ValueError, match="channel_axis"):
        nlref.nl_means(x, sigma=0.1, channel_axis=2)
    with pytest.raises(ValueError, match="workers"):
        nlref.nl_means(x, sigma=0.1, workers=0)
    bad = _noisy((20, 20))
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nlref.nl_means(da.from_array(bad, chunks=10), sigma=0.1)
    with pytest.raises(TypeError, match="dtype"):
        nlref.nl_means(da.zeros((8, 8), chunks=4, dtype=bool), sigma=0.1)


def _cupy():
    try:
        cupy = importlib.import_module("cupy")
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


@pytest.mark.gpu
@pytest.mark.skipif(_cupy() is None, reason="CuPy with a CUDA device not available")
@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
def test_cupy_chunks(aggregation):
    cupy = _cupy()
    image = _noisy((10, 40, 44, 3), seed=7)
    kwargs = dict(sigma=0.1, patch_size=(3, 3, 3), search_size=(3, 7, 7), channel_axis=-1, aggregation=aggregation)
    x = da.from_array(cupy.asarray(image), chunks=(5, 16, 16, 1), asarray=False)
    out = nlref.nl_means(x, **kwargs)
    assert isinstance(out._meta, cupy.ndarray)
    result = out.compute()
    assert isinstance(result, cupy.ndarray)
    cupy.testing.assert_array_equal(result, nlref.nl_means(cupy.asarray(image), **kwargs))
    np.testing.assert_allclose(cupy.asnumpy(result), nlref.nl_means(image, workers=1, **kwargs), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(_cupy() is None, reason="CuPy with a CUDA device not available")
def test_cupy_chunks_with_estimated_sigma():
    """The exact median's passes on CuPy blocks: no numpy.asarray of a device block, the in-memory estimate."""
    cupy = _cupy()
    image = _noisy((10, 40, 44), seed=9)
    x = da.from_array(cupy.asarray(image), chunks=(5, 16, 16), asarray=False)
    assert nlref.estimate_sigma(x) == nlref.estimate_sigma(cupy.asarray(image))
    assert nlref.estimate_sigma(x) == pytest.approx(nlref.estimate_sigma(image), rel=1e-6)
    out = nlref.nl_means(x, patch_size=3, search_size=5)
    assert isinstance(out._meta, cupy.ndarray)
    cupy.testing.assert_array_equal(out.compute(), nlref.nl_means(cupy.asarray(image), patch_size=3, search_size=5))


# ---- arrays in a store: nl_means_store, one independent task per chunk ----


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
@pytest.mark.parametrize("name, shape, chunks, kwargs", CASES, ids=[c[0] for c in CASES])
def test_store_equals_in_memory_bitwise(name, shape, chunks, kwargs, aggregation):
    image = _noisy(shape)
    expected = nlref.nl_means(image, aggregation=aggregation, workers=1, **kwargs)
    lazy = chunked.nl_means_store(image, chunks=chunks, aggregation=aggregation, **kwargs)
    assert isinstance(lazy, da.Array) and lazy.dtype == image.dtype and lazy.shape == image.shape
    channel = kwargs.get("channel_axis")
    if channel is not None:  # the channel axis is never split
        assert lazy.chunks[channel] == (shape[channel],)
    np.testing.assert_array_equal(lazy.compute(), expected)
    params = chunked.resolve_parameters_store(image, chunks=chunks, aggregation=aggregation, **kwargs)
    assert params == nlref.resolve_parameters(image, aggregation=aggregation, **kwargs)


@pytest.mark.parametrize("dtype", [np.float64, np.uint8, np.int16])
def test_store_dtypes_zarr_and_memmap(tmp_path, dtype):
    """A Zarr array and a memory-mapped file as sources; integer images rounded and clipped as in memory."""
    image = _noisy((10, 26, 30), seed=4, dtype=np.float64)
    if dtype != np.float64:
        image = np.clip(np.round(100 + 80 * image), np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
    expected = nlref.nl_means(image, patch_size=3, search_size=(3, 5, 5), workers=1)
    mapped = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=dtype, shape=image.shape)
    mapped[...] = image
    mapped.flush()
    sources = [np.load(tmp_path / "v.npy", mmap_mode="r")]
    zarr = importlib.util.find_spec("zarr") and importlib.import_module("zarr")
    if zarr:
        stored = zarr.create_array(str(tmp_path / "v.zarr"), shape=image.shape, chunks=(4, 9, 11), dtype=dtype)
        stored[...] = image
        sources.append(zarr.open_array(str(tmp_path / "v.zarr"), mode="r"))
    for source in sources:
        chunks = (3, 8, 16) if isinstance(source, np.ndarray) else None  # None: the store's own chunks
        out = chunked.nl_means_store(source, chunks=chunks, patch_size=3, search_size=(3, 5, 5))
        assert out.dtype == dtype
        np.testing.assert_array_equal(out.compute(), expected)


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
def test_store_graph_is_one_independent_task_per_chunk(aggregation, tmp_path):
    """A file: one task per chunk, none depending on another; an in-memory array: one more node, the array."""
    from dask.core import get_dependencies

    image = _noisy((16, 48, 48))
    mapped = np.memmap(tmp_path / "image.raw", dtype=image.dtype, mode="w+", shape=image.shape)
    mapped[...] = image
    mapped.flush()
    for source, file in ((image, False), (mapped, True)):
        for chunks, search in (((8, 16, 16), 3), ((8, 16, 16), 7), ((2, 5, 5), 3)):
            out = chunked.nl_means_store(source, chunks=chunks, sigma=0.1, patch_size=3, search_size=search,
                                         aggregation=aggregation)
            graph = dict(out.__dask_graph__())
            chunk_keys = {k for k in graph if isinstance(k, tuple) and k[0] == out.name}
            assert len(chunk_keys) == out.npartitions
            others = set(graph) - chunk_keys  # a file: none; an array in memory: it, placed in the graph once
            assert len(others) == (0 if file else 2), others
            for key in chunk_keys:  # no task reads another task's result: chunks never wait for neighbours
                deps = set(get_dependencies(graph, key))
                assert not (chunk_keys & deps) and len(deps) == (0 if file else 1), graph[key]


def test_store_memory_of_a_worker_is_one_task():
    """One worker thread (synchronous scheduler) denoising a whole array into a target holds one task at a time.

    The peak above the source and the target is that of one task, about 11
    (chunk + halo) blocks and below working_memory's 13, whatever the number
    of chunks (32 here). Through ``map_overlap`` the same run holds the
    neighbour chunks waiting for each other: more than the store route.
    """
    image = _noisy((32, 256, 256))  # 8 MiB, 32 chunks
    kwargs = dict(sigma=0.1, h=0.07, patch_size=3, search_size=5)
    chunks = (16, 64, 64)  # Dask's own bookkeeping, a few KiB per task, stays well below one block
    target = np.empty_like(image)
    m = halo((3, 3, 3), (5, 5, 5))
    block = np.prod([c + 2 * w for c, w in zip(chunks, m)]) * image.itemsize  # chunk + halo, float32
    loop = working_memory(chunks, 1, (3, 3, 3), (5, 5, 5), "pixel", 4, 1)
    nlref.nl_means(image[:4, :16, :16], workers=1, **kwargs)  # Numba's kernels compiled or loaded outside the trace
    store_route = chunked.nl_means_store(image, chunks=chunks, **kwargs)
    peak_store = traced_peak(lambda: da.store(store_route, target, scheduler="synchronous"))
    np.testing.assert_array_equal(target, nlref.nl_means(image, workers=1, **kwargs))
    assert block < peak_store <= loop, peak_store / block
    dask_route = nlref.nl_means(da.from_array(image, chunks=chunks), **kwargs)
    peak_dask = traced_peak(lambda: da.store(dask_route, target, scheduler="synchronous"))
    assert peak_dask > peak_store, (peak_dask / block, peak_store / block)


def test_store_task_patch_wise_holds_at_most_16_blocks():
    """Patch-wise, one task of the store route holds at most 16 (chunk + halo) float32 blocks (14.5 with the
    Numba engine, 15.2 with the NumPy one): docs/dask.md says about 14. The Numba engine kept Z, 1/Z and the
    mask (float64) and three box buffers at once, and the task its unpadded block beside the padded one:
    19.9 blocks."""
    image = _noisy((32, 256, 256))
    kwargs = dict(sigma=0.1, h=0.07, patch_size=3, search_size=5, aggregation="patch")
    chunks = (16, 64, 64)
    target = np.empty_like(image)
    block = np.prod([c + 2 * w for c, w in zip(chunks, halo((3, 3, 3), (5, 5, 5), "patch"))]) * image.itemsize
    nlref.nl_means(image[:4, :16, :16], workers=1, **kwargs)  # Numba's kernels compiled or loaded outside the trace
    lazy = chunked.nl_means_store(image, chunks=chunks, **kwargs)
    peak = traced_peak(lambda: da.store(lazy, target, scheduler="synchronous"))
    assert peak <= 16 * block, peak / block
    np.testing.assert_array_equal(target, nlref.nl_means(image, workers=1, **kwargs))


def test_store_array_given_to_the_in_memory_functions_points_to_nl_means_store(tmp_path):
    """nl_means(zarr_array) would have to read the whole store: the error says what to call instead."""
    zarr = pytest.importorskip("zarr")
    stored = zarr.create_array(str(tmp_path / "v.zarr"), shape=(8, 8), chunks=(4, 4), dtype="f4")
    for call in (lambda: nlref.nl_means(stored, sigma=0.1), lambda: nlref.estimate_sigma(stored),
                 lambda: nlref.resolve_parameters(stored), lambda: nlref.nl_means_weights(stored, (2, 2), sigma=0.1)):
        with pytest.raises(TypeError, match=r"image is a zarr Array, an array in a store: .*nl_means_store"):
            call()


@pytest.mark.parametrize("given", [dict(sigma=0.1, h=0.07, patch_size=3, search_size=5),
                                   dict(sigma=0.1, patch_size=3, search_size=5), dict(h=0.07, patch_size=3,
                                                                                     search_size=5)])
@pytest.mark.parametrize("route", ["dask", "store"])
def test_given_parameters_cost_one_pass(given, route):
    """Given sigma (or h and the sizes), the parameters take one read of the data, for a float image too.

    The finiteness check, the default data range (the largest magnitude) and
    the units check all come from that one pass; the units check once read the
    data again for sigma and for h.
    """
    from dask.callbacks import Callback

    image = _noisy((12, 30, 30))
    passes = []

    class Passes(Callback):
        def _start(self, dsk):
            passes.append(len(dsk))

    with Passes():
        if route == "dask":
            out = nlref.nl_means(da.from_array(image, chunks=10), **given)
        else:
            out = chunked.nl_means_store(image, chunks=10, **given)
    assert len(passes) == 1, passes
    np.testing.assert_array_equal(out.compute(), nlref.nl_means(image, workers=1, **given))


@pytest.mark.parametrize("route", ["dask", "store"])
def test_the_units_check_of_given_parameters_still_speaks(route):
    """The one pass of given parameters still feeds the units check: sigma=20 on an image in 0..1 is doubted."""
    image = _noisy((12, 30, 30))
    with pytest.warns(UserWarning, match="larger than the whole value range"):
        if route == "dask":
            nlref.nl_means(da.from_array(image, chunks=10), sigma=20.0, patch_size=3, search_size=5)
        else:
            chunked.nl_means_store(image, chunks=10, sigma=20.0, patch_size=3, search_size=5)


def test_store_refuses_an_in_memory_array_of_another_library(xp, device):
    """A PyTorch or array-api-strict array given to nl_means_store failed deep inside NumPy ("Cannot interpret
    'torch.float64' as a data type"); a CuPy one would have been copied to the host chunk by chunk. It is
    refused by name, pointing to nlref.nl_means, before any pass. A NumPy array is still a source."""
    image = _noisy((12, 12))
    source = nlref.backend.asarray(image, xp=xp, device=device)
    if isinstance(source, np.ndarray):
        out = chunked.nl_means_store(source, chunks=6, sigma=0.1, patch_size=3, search_size=5)
        np.testing.assert_array_equal(out.compute(), nlref.nl_means(image, sigma=0.1, patch_size=3, search_size=5))
        return
    with pytest.raises(TypeError, match=r"source is an in-memory .* not an array in a store: denoise it with "
                                        r"nlref\.nl_means\(source"):
        chunked.nl_means_store(source, chunks=6, sigma=0.1, patch_size=3, search_size=5)


def test_store_errors(tmp_path):
    image = _noisy((20, 20))
    with pytest.raises(TypeError, match="source must be an array in a store"):
        chunked.nl_means_store([[1.0, 2.0]], chunks=4, sigma=0.1)
    with pytest.raises(ValueError, match="chunks must be given"):
        chunked.nl_means_store(image, sigma=0.1)
    for bad in ((5, 5, 5), 0, (4, -1), (2.5, 4), True):
        with pytest.raises(ValueError, match="chunks"):
            chunked.nl_means_store(image, chunks=bad, sigma=0.1)
    with pytest.raises(ValueError, match="channel_axis"):
        chunked.nl_means_store(image, chunks=5, sigma=0.1, channel_axis=2)
    with pytest.raises(ValueError, match="workers"):
        chunked.nl_means_store(image, chunks=5, sigma=0.1, workers=0)
    with pytest.raises(TypeError, match="dtype"):
        chunked.nl_means_store(np.zeros((8, 8), bool), chunks=4, sigma=0.1)
    bad = image.copy()
    bad[3, 4] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        chunked.nl_means_store(bad, chunks=5, sigma=0.1)
    with pytest.raises(ValueError, match="working memory"):
        chunked.nl_means_store(np.zeros((4000, 4000), np.float32), chunks=4000, sigma=0.1, patch_size=7,
                               search_size=21, workers=64)
