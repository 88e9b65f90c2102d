"""NL-means gives the same bits whatever the number of threads or the Dask chunking.

The fast method cuts the offsets into a fixed number of parts
(:data:`nlref.nlmeans.fast.N_PARTS`), sums each part in order and adds the
parts' sums in order; ``workers`` only decides which thread runs which part.
So ``workers=1, 2, 3, 8`` agree bit for bit, and so do the Dask and store
routes with any ``workers`` against the in-memory call with any other.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import nlref
import nlref.backend as B
from nlref.nlmeans import fast

WORKERS = (1, 2, 3, 8)

NUMBA = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="Numba is not installed (nlref[fast])")


@pytest.fixture(params=["numpy", pytest.param("numba", marks=NUMBA)])
def engine(request, monkeypatch):
    """Each engine of the fast method in turn (the rule holds for both)."""
    monkeypatch.setenv(fast.ENGINE_VARIABLE, request.param)
    return request.param

# (name, shape, kwargs): grey, colour and a volume, with enough offsets (>= N_PARTS) that every part is used
CASES = [
    ("grey", (24, 27), dict(patch_size=5, search_size=9)),
    ("colour", (17, 19, 3), dict(patch_size=3, search_size=(7, 9), channel_axis=-1)),
    ("volume", (6, 9, 10), dict(patch_size=3, search_size=(3, 5, 5))),
]


def _noisy(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    clean = 0.5 + 0.3 * np.sin(7 * sum(axes))
    return (clean + 0.1 * rng.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
@pytest.mark.parametrize("name, shape, kwargs", CASES, ids=[c[0] for c in CASES])
def test_any_number_of_workers_gives_the_same_bits(name, shape, kwargs, aggregation, dtype, engine):
    image = _noisy(shape, dtype)
    results = [nlref.nl_means(image, sigma=0.1, h=0.12, aggregation=aggregation, workers=w, **kwargs)
               for w in WORKERS]
    for w, result in zip(WORKERS[1:], results[1:]):
        np.testing.assert_array_equal(result, results[0], err_msg=f"workers={w} against workers=1")
    # and the same bits stay within the tests' tolerance of the definition
    naive = nlref.nl_means(image, sigma=0.1, h=0.12, aggregation=aggregation, method="naive", **kwargs)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(results[0], naive, **tol)


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
def test_calls_at_once_in_threads_give_the_bits_of_calls_one_by_one(aggregation, engine):
    """Several calls at once in threads of one process (Dask's threaded scheduler, a distributed worker
    with several threads), each with its own threads (workers=2): no state is shared between calls."""
    from concurrent.futures import ThreadPoolExecutor

    images = [_noisy((24, 27), np.float32, seed=k) for k in range(3)]
    kwargs = dict(sigma=0.1, h=0.1, patch_size=5, search_size=9, aggregation=aggregation)
    alone = [nlref.nl_means(image, workers=1, **kwargs) for image in images]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda k: nlref.nl_means(images[k % 3], workers=2, **kwargs), range(9)))
    for k, out in enumerate(together):
        np.testing.assert_array_equal(out, alone[k % 3])


def test_the_camera_case_of_the_issue():
    """float32 camera 128x128 with the presets: workers=2 differed from 1 in 15,417 pixels before."""
    clean = nlref.data.camera()[192:320, 192:320]
    image = nlref.add_gaussian_noise(clean, 20 / 255, seed=0).astype(np.float32)
    for aggregation in ("pixel", "patch"):
        one = nlref.nl_means(image, sigma=20 / 255, aggregation=aggregation, workers=1)
        for w in (2, 8):
            np.testing.assert_array_equal(nlref.nl_means(image, sigma=20 / 255, aggregation=aggregation, workers=w),
                                          one)


def test_numpy_buffers_and_portable_steps_give_the_same_bits(monkeypatch):
    """The out= buffers, the threads and the part scheduling on NumPy are the portable arithmetic, unchanged.

    The NumPy engine only: the Numba engine (tests/nlmeans/test_numba.py) is
    another arithmetic, equal within tolerance.
    """
    strict = pytest.importorskip("array_api_strict")
    monkeypatch.setenv(fast.ENGINE_VARIABLE, "numpy")
    for name, shape, kwargs in CASES:
        for aggregation in ("pixel", "patch"):
            image = _noisy(shape, np.float32, seed=3)
            on_numpy = nlref.nl_means(image, sigma=0.1, h=0.12, aggregation=aggregation, workers=3, **kwargs)
            portable = nlref.nl_means(B.asarray(image, xp=strict), sigma=0.1, h=0.12, aggregation=aggregation,
                                      **kwargs)
            np.testing.assert_array_equal(B.to_numpy(portable), on_numpy, err_msg=f"{name} {aggregation}")


def test_the_partition_depends_on_the_offsets_only():
    deltas = list(range(1, 221))
    parts = fast.partition_offsets(deltas)
    assert len(parts) == fast.N_PARTS
    assert [d for part in parts for d in part] == deltas  # every offset once, in order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    few = fast.partition_offsets([1, 2, 3])
    assert few == [[1], [2], [3]]


def test_the_thread_count_is_not_an_argument_of_the_partition():
    """Guard: the partition's signature takes no thread count (the order must not depend on one)."""
    import inspect

    assert list(inspect.signature(fast.partition_offsets).parameters) == ["deltas", "parts"]


# ---- the Dask and store routes: any workers, any chunking, the in-memory bits ----

DASK_CASES = [
    ("grey", (45, 52), [(20, 17), (9, 52), (45, 5)], dict(sigma=0.1, patch_size=5, search_size=11)),
    ("colour", (28, 31, 3), [(10, 9, 1), (28, 31, 3), (7, 16, 3)], dict(sigma=0.1, patch_size=3, search_size=9,
                                                                       channel_axis=-1)),
    ("volume", (10, 16, 17), [(5, 7, 11), (3, 16, 4)], dict(sigma=0.1, patch_size=3, search_size=(3, 5, 7))),
]


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
@pytest.mark.parametrize("name, shape, chunkings, kwargs", DASK_CASES, ids=[c[0] for c in DASK_CASES])
def test_dask_and_store_routes_equal_in_memory_for_any_workers(name, shape, chunkings, kwargs, aggregation, engine):
    da = pytest.importorskip("dask.array")
    dask = pytest.importorskip("dask")
    image = _noisy(shape, np.float32, seed=5)
    expected = nlref.nl_means(image, aggregation=aggregation, workers=2, **kwargs)  # the in-memory default on 2 cores
    with dask.config.set(scheduler="synchronous"):
        for chunks in chunkings:
            for workers in (None, 1, 3):
                lazy = nlref.nl_means(da.from_array(image, chunks=chunks), aggregation=aggregation,
                                      workers=workers, **kwargs)
                np.testing.assert_array_equal(lazy.compute(), expected,
                                              err_msg=f"dask chunks={chunks} workers={workers}")
        for workers in (None, 2):
            stored = nlref.nl_means_store(image, chunks=chunkings[0], aggregation=aggregation, workers=workers,
                                          **kwargs)
            np.testing.assert_array_equal(stored.compute(), expected, err_msg=f"store workers={workers}")


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
def test_batching_offsets_changes_no_bit(monkeypatch, aggregation):
    """Batches of consecutive offsets (one strided view per step) against one offset at a time (NumPy engine)."""
    monkeypatch.setenv(fast.ENGINE_VARIABLE, "numpy")
    image = _noisy((21, 23, 2), np.float32, seed=7)
    kw = dict(sigma=0.1, h=0.12, patch_size=(3, 5), search_size=(7, 9), channel_axis=-1, aggregation=aggregation)
    batched = nlref.nl_means(image, workers=2, **kw)
    assert fast._batch_rows((21 + 12) * (23 + 12)) > 1  # this image is batched by default
    monkeypatch.setattr(fast, "BATCH_ELEMENTS", 1)
    assert fast._batch_rows((21 + 12) * (23 + 12)) == 1
    np.testing.assert_array_equal(nlref.nl_means(image, workers=2, **kw), batched)
    monkeypatch.setattr(fast, "BATCH_ELEMENTS", 3 * 33 * 35)  # batches of 2 or 3: runs cut mid-row
    np.testing.assert_array_equal(nlref.nl_means(image, workers=1, **kw), batched)


def test_batches_are_runs_of_consecutive_offsets():
    assert fast._batches([1, 2, 3, 7, 8, 20], 2) == [(1, 2), (3, 1), (7, 2), (20, 1)]
    assert fast._batches([5], 4) == [(5, 1)]


def test_the_weight_floor_keeps_products_out_of_the_denormal_range():
    """A clamped weight times a small sample stays a normal number (denormals take the CPU's slow path)."""
    for itemsize, dtype, small in ((4, np.float32, 1e-15), (8, np.float64, 1e-40)):
        floor = np.exp(np.asarray(fast._EXP_FLOOR[itemsize], dtype=dtype))
        assert floor * dtype(small) > np.finfo(dtype).smallest_normal
        assert floor < np.finfo(dtype).eps ** 2  # far below anything a weight next to 1 can change


@pytest.mark.parametrize("width", [1, 3, 5, 7, 9, 11])
@pytest.mark.parametrize("rows", [None, 3])
def test_box_sums_from_pairs_equal_the_plain_sum(width, rows):
    """The box of the fast path (pair sums for widths >= 7) against sum_k src[i + k*step], NumPy and portable."""
    strict = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(width)
    step = 4
    src = rng.random((rows or 1, 90)) if rows else rng.random(90)
    n = src.shape[-1] - (width - 1) * step
    plain = sum(src[..., k * step : k * step + n] for k in range(width))
    on_numpy = fast._Steps(np, np.dtype(np.float64)).box(src, width, step, np.empty(src.size))
    np.testing.assert_allclose(on_numpy, plain, rtol=1e-14)
    portable = fast._Steps(strict, strict.float64).box(B.asarray(src, xp=strict), width, step, None)
    np.testing.assert_array_equal(B.to_numpy(portable), on_numpy)


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
@pytest.mark.parametrize("patch", [7, 9, (7, 3)])
def test_wide_patches_equal_the_definition(patch, aggregation):
    """Patches of 7 and more take the pair-sum box: still the naive method's numbers."""
    image = _noisy((22, 24), np.float64, seed=11)
    kw = dict(sigma=0.1, h=0.2, patch_size=patch, search_size=5, aggregation=aggregation)
    np.testing.assert_allclose(nlref.nl_means(image, workers=2, **kw), nlref.nl_means(image, method="naive", **kw),
                               rtol=1e-12, atol=1e-13)
