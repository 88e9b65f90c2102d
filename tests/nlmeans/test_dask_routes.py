"""The chunked routes on what real users give them: memory maps read by chunks, every dtype, every shape.

Both routes (``nl_means`` on a Dask array through ``map_overlap``, and
``nl_means_store`` on an array in a store) must give the in-memory estimate
and result, bit for bit, for every dtype and shape the in-memory call takes.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import nlref  # noqa: E402
from nlref.nlmeans import median, store  # noqa: E402
from tests.helpers import traced_peak  # noqa: E402


def _noisy(shape, seed=0, sigma=0.1):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    clean = 0.5 + 0.3 * np.sin(3 * sum((i + 1) * g for i, g in enumerate(grids)))
    return clean + sigma * rng.standard_normal(shape)


def _as(image, dtype):
    """``image`` (values about 0..1) in ``dtype``: integers use their range (uint8 0..255, int16 -1000..1000)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return image.astype(dtype)
    scale = {"uint8": 255, "uint16": 60000, "int16": 2000}[dtype.name]
    offset = -1000 if dtype.name == "int16" else 0
    return np.clip(np.round(image * scale + offset), np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)


@pytest.fixture
def synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


# ---- a memory map is read chunk by chunk, never whole ----


def test_memmap_is_never_read_whole(tmp_path, synchronous):
    """Planning a run on a 32 MiB memory map (one pass over it) and computing one chunk trace a few chunks' memory.

    Dask's ``from_array`` copies an array-like it is given; a memmap that
    travelled as itself would be read whole (32 MiB traced). The tasks get an
    opener and read only their chunk and halo.
    """
    shape, chunks = (32, 512, 512), (8, 64, 64)
    mapped = np.memmap(tmp_path / "volume.raw", dtype=np.float32, mode="w+", shape=shape)
    for z in range(shape[0]):
        mapped[z] = _noisy(shape[1:], seed=z)
    mapped.flush()
    source = np.memmap(tmp_path / "volume.raw", dtype=np.float32, mode="r", shape=shape)
    nbytes = source.nbytes

    def run(source):
        lazy = nlref.nl_means_store(source, chunks=chunks, sigma=0.1, h=0.07, patch_size=3, search_size=5)
        run.block = lazy.blocks[1, 2, 3].compute()

    run(source[:16, :256, :256].copy())  # the first run's imports and caches are not what is measured
    peak = traced_peak(lambda: run(source))
    assert peak < nbytes / 8, f"{peak / 2**20:.1f} MiB traced for a {nbytes / 2**20:.0f} MiB memory map"
    z, y, x = 8, 128, 192
    window = np.asarray(source[z - 4:z + 12, y - 4:y + 68, x - 4:x + 68])  # the chunk and a halo of 4 > 2
    inner = nlref.nl_means(window, sigma=0.1, h=0.07, patch_size=3, search_size=5, workers=1)
    np.testing.assert_array_equal(run.block, inner[4:-4, 4:-4, 4:-4])


@pytest.mark.parametrize("layout", ["one strip", "zlib strips", "big-endian", "tiles"])
def test_tiff_is_read_by_chunks_not_by_page(tmp_path, synchronous, layout):
    """A TIFF whose page is one uncompressed strip (what ``tifffile.imwrite`` writes) is memory-mapped.

    Through tifffile's Zarr view the strip is one chunk, so every task decoded the whole page: over 4 MiB
    traced for the task of one 64 x 64 chunk of a 1024 x 1024 float32 image (and 72 s instead of 8 s for
    ``nlref denoise`` on a 4096 x 4096 uint16 one). The other layouts (compressed, tiled, another
    byte order) are read through the Zarr view as before; every one gives the in-memory result.
    """
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("zarr")
    image = _noisy((1024, 1024)).astype(np.float32)
    options = {"one strip": {}, "zlib strips": dict(compression="zlib"), "big-endian": dict(byteorder=">"),
               "tiles": dict(tile=(128, 128))}[layout]
    tifffile.imwrite(tmp_path / "a.tif", image, **options)
    tifffile.imwrite(tmp_path / "small.tif", image[:256, :512], **options)
    kwargs = dict(sigma=0.1, h=0.07, patch_size=3, search_size=5)

    def run(lazy):
        run.block = lazy.blocks[3, 5].compute()

    run(nlref.nl_means_store(store.Opener.tiff(tmp_path / "small.tif"), chunks=64, **kwargs))  # the first run's
    lazy = nlref.nl_means_store(store.Opener.tiff(tmp_path / "a.tif"), chunks=64, **kwargs)    # imports, caches
    peak = traced_peak(lambda: run(lazy))  # one task: the chunk's read and its denoising
    if layout == "one strip":
        assert peak < image.nbytes / 8, f"{peak / 2**20:.1f} MiB traced for a {image.nbytes / 2**20:.0f} MiB page"
    window = image[192 - 4:256 + 4, 320 - 4:384 + 4]  # the chunk and a halo of 4 > 2
    inner = nlref.nl_means(window, workers=1, **kwargs)
    np.testing.assert_array_equal(run.block, inner[4:-4, 4:-4])
    store.close_opened()


def test_opener_travels_not_the_data(tmp_path):
    """What a task carries: a memory map, an h5py dataset and a zarr array become small openers with absolute paths."""
    import pickle

    image = _noisy((10, 12))
    np.save(tmp_path / "a.npy", image)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    opener = store.as_source(mapped)
    assert opener.kind == "memmap" and opener.offset > 0 and opener.path == str(tmp_path / "a.npy")
    assert len(pickle.dumps(opener)) < 1000
    np.testing.assert_array_equal(store.read_block(opener, (slice(2, 5), slice(0, 12))), image[2:5])
    with pytest.raises(TypeError, match="view of a numpy.memmap"):
        store.as_source(mapped[2:])
    assert store.as_source(mapped[2:].copy()) is not None  # a copy in memory: no file, placed in the graph
    with pytest.raises(ValueError, match="kind"):
        store.Opener("npy", "a.npy", (1,), "f4")
    missing = store.Opener("memmap", tmp_path / "gone.raw", (4,), "f4")
    with pytest.raises(FileNotFoundError, match="every worker"):
        store.read_block(missing, (slice(0, 2),))
    zarr = pytest.importorskip("zarr")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        zarr.create_array("rel.zarr", shape=image.shape, chunks=(5, 6), dtype=image.dtype)[...] = image
        opener = store.as_source(zarr.open_array("rel.zarr", mode="r"))  # a relative path, made absolute
    assert opener.kind == "zarr" and opener.path == str(tmp_path / "rel.zarr") and opener.chunks == (5, 6)
    np.testing.assert_array_equal(store.read_block(opener, (slice(0, 10), slice(3, 9))), image[:, 3:9])


def test_copy_on_write_memmap_is_refused(tmp_path, synchronous):
    """A memory map in mode "c" keeps what was written to it in this process; the tasks read the file. A changed
    map gave the file's result, not the in-memory call's on the same array, without a word: it is refused, and
    the modes whose changes reach the file are read as before."""
    image = _noisy((20, 18)).astype(np.float32)
    np.save(tmp_path / "a.npy", image)
    kwargs = dict(sigma=0.1, patch_size=3, search_size=5)
    changed = np.load(tmp_path / "a.npy", mmap_mode="c")
    changed[5:10] = 0.9
    with pytest.raises(TypeError, match=r"source is a copy-on-write numpy\.memmap \(mode 'c'\).*mmap_mode='r'"):
        nlref.nl_means_store(changed, chunks=8, **kwargs)
    expected = nlref.nl_means(np.array(changed), workers=1, **kwargs)
    np.testing.assert_array_equal(nlref.nl_means_store(np.array(changed), chunks=8, **kwargs).compute(), expected)
    del changed
    shared = np.load(tmp_path / "a.npy", mmap_mode="r+")
    shared[5:10] = 0.9  # a shared map: the file holds it
    np.testing.assert_array_equal(nlref.nl_means_store(shared, chunks=8, **kwargs).compute(), expected)


def test_hdf5_dataset_source(tmp_path):
    h5py = pytest.importorskip("h5py")
    image = _noisy((14, 30, 26), seed=2).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("g/v", data=image, chunks=(7, 15, 13))
    kwargs = dict(patch_size=3, search_size=5)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        lazy = nlref.nl_means_store(f["g/v"], **kwargs)  # its own chunks
        assert lazy.chunksize == (7, 15, 13)
        result = lazy.compute()
    np.testing.assert_array_equal(result, nlref.nl_means(image, workers=1, **kwargs))


def test_hdf5_view_that_converts_on_read(tmp_path, synchronous):
    """``dataset.astype("f4")`` is an h5py object with shape, dtype and slicing, but not a dataset: the store
    route asked it for ``.file`` and failed with an AttributeError. It is read as an array-like (in the graph)."""
    h5py = pytest.importorskip("h5py")
    image = _noisy((20, 26)).astype(np.float16)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("v", data=image, chunks=(10, 13))
    kwargs = dict(patch_size=3, search_size=5)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        view = f["v"].astype("f4")
        result = nlref.nl_means_store(view, chunks=8, **kwargs).compute()
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, nlref.nl_means(image.astype(np.float32), workers=1, **kwargs))


def test_hdf5_file_held_in_memory_is_refused_naming_why(tmp_path):
    """A dataset of an in-memory HDF5 file (driver "core", no backing store) was refused as "does not exist on this
    machine (every worker of a cluster must see it at this path)", which sent the user looking for a path."""
    h5py = pytest.importorskip("h5py")
    for backing_store in (False, True):  # with one, the file is written only when closed, and locked until then
        with h5py.File(tmp_path / f"{backing_store}.h5", "w", driver="core", backing_store=backing_store) as f:
            dataset = f.create_dataset("v", data=_noisy((20, 26)))
            with pytest.raises(TypeError, match=r"held in memory \(driver 'core'\).*numpy.array\(source\)"):
                nlref.nl_means_store(dataset, chunks=8, patch_size=3, search_size=5)


# ---- every dtype: the same estimate and the same result on both routes ----


DTYPES = ["float16", "float32", "float64", "uint8", "uint16", "int16"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_same_estimate_and_result_on_both_routes(dtype, synchronous):
    image = _as(_noisy((9, 26, 30), seed=11), dtype)
    expected_sigma = nlref.estimate_sigma(image)
    assert nlref.estimate_sigma(da.from_array(image, chunks=(4, 10, 12))) == expected_sigma
    assert store.resolve_parameters_store(image, chunks=(4, 10, 12))["sigma"] == expected_sigma
    expected = nlref.nl_means(image, workers=1, search_size=5)
    assert expected.dtype == image.dtype
    for result in (nlref.nl_means(da.from_array(image, chunks=(4, 10, 12)), search_size=5).compute(),
                   nlref.nl_means_store(image, chunks=(4, 10, 12), search_size=5).compute()):
        assert result.dtype == image.dtype
        np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("gather", [2**22, 7])
def test_exact_median_of_few_distinct_values(dtype, gather, monkeypatch, synchronous):
    """|second differences| a few steps of the dtype apart: histogram bins narrower than the dtype's spacing.

    An alternating signal ``+-(1 + k eps)`` has second differences of about
    4 that differ in their last bits only; 4096 bins over that range cannot
    be told apart in the dtype (float16 and float32: "Too many bins for data
    range"), nor in float64 for float64 data, where narrowing rounds (a small
    gather limit) must still converge to the exact median.
    """
    monkeypatch.setattr(median, "GATHER_LIMIT", gather)
    eps = np.finfo(dtype).eps
    rng = np.random.default_rng(1)
    k = rng.integers(0, 4, size=(3, 400))
    signal = ((-1.0) ** np.arange(400) * (1 + k * eps)).astype(dtype)
    values = np.unique(np.abs(np.diff(signal.astype(np.float64), 2, axis=1)))
    assert 1 < values.size < 20 and (values.max() - values.min()) / values.max() < 1e-2  # few, close values
    image = signal.reshape(3, 20, 20)
    for layout, axis in ((image, None), (np.moveaxis(image, 0, -1), -1)):
        expected = nlref.estimate_sigma(layout, channel_axis=axis)
        assert nlref.estimate_sigma(da.from_array(layout, chunks=7), channel_axis=axis) == expected
        assert store.resolve_parameters_store(layout, chunks=7, channel_axis=axis)["sigma"] == expected


def test_bin_edges_always_strictly_narrow():
    """Where even float64 cannot hold the bins, the last bin holds the range's top value alone."""
    lo = 4.0
    hi = np.nextafter(np.nextafter(lo, 5.0), 5.0)
    edges, uniform = median.bin_edges(lo, hi, np.float64)
    assert not uniform and edges[-1] == edges[-2] == hi and np.all(edges[:-2] < edges[1:-1])
    edges, uniform = median.bin_edges(np.float16(4.0), np.float16(4.0078), np.float16)
    assert uniform and edges.dtype == np.float64 and edges.size == median.HISTOGRAM_BINS + 1


def test_histogram_and_gather_are_array_agnostic():
    """The blocks of the exact median's passes on array-api-strict give NumPy's counts and samples."""
    xp = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(2)
    block = rng.standard_normal((6, 7))
    for edges, uniform in (median.bin_edges(-1.0, 1.5, np.float64), median.bin_edges(4.0, np.nextafter(4.0, 5), "f8")):
        np.testing.assert_array_equal(median.histogram_block(xp.asarray(block), edges, uniform),
                                      median.histogram_block(block, edges, uniform))
    for last in (False, True):
        got = median.in_bin_samples(xp.asarray(block), np.float64, -0.5, 0.25, last)
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, median.in_bin_samples(block, np.float64, -0.5, 0.25, last))


# ---- every shape: also axes shorter than the halo ----


SHAPES = [
    ((10, 40, 40), None, dict(patch_size=(7, 3, 3), search_size=(21, 3, 3)), (4, 16, 16)),  # halo 13 > 10
    ((50,), None, dict(patch_size=5, search_size=31), (9,)),  # a 1-D signal, halo 17
    ((6, 50), None, dict(patch_size=3, search_size=(11, 9)), (2, 12)),
    ((3, 4, 10, 11), None, dict(patch_size=3, search_size=(3, 5, 5, 5)), (2, 2, 4, 4)),  # 4 spatial axes
    ((2, 30, 24), None, dict(sigma=0.1, patch_size=(1, 3, 3), search_size=(3, 5, 5)), (1, 8, 8)),
    ((20, 18, 3), -1, dict(patch_size=5, search_size=21), (6, 7, 3)),  # colour, channels last
    ((3, 20, 18), 0, dict(patch_size=3, search_size=9), (3, 5, 4)),  # colour, channels first
]


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
@pytest.mark.parametrize("shape,axis,kwargs,chunks", SHAPES, ids=[str(s[0]) for s in SHAPES])
def test_every_shape_on_both_routes(shape, axis, kwargs, chunks, aggregation, synchronous):
    image = _noisy(shape, seed=len(shape)).astype(np.float32)
    args = dict(kwargs, channel_axis=axis, aggregation=aggregation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the layout doubt of a (2, 30, 24) volume
        expected = nlref.nl_means(image, workers=1, **args)
        lazy = nlref.nl_means(da.from_array(image, chunks=chunks), **args)
        assert lazy.chunks == da.from_array(image, chunks=chunks).chunks
        np.testing.assert_array_equal(lazy.compute(), expected)
        channel = None if axis is None else axis % len(shape)
        spatial_chunks = tuple(c for a, c in enumerate(chunks) if a != channel)
        np.testing.assert_array_equal(nlref.nl_means_store(image, chunks=spatial_chunks, **args).compute(), expected)


# ---- the units check speaks of what the user gave ----


@pytest.mark.parametrize("route", ["dask", "store", "memory"])
def test_no_units_warning_on_an_estimated_sigma(route, synchronous):
    """A float image in 0..255 with noise of 0.1 grey levels: the estimate is small, and the user gave no sigma."""
    image = 255 * _noisy((8, 30, 30), seed=4, sigma=0.0) + 0.1 * np.random.default_rng(0).standard_normal((8, 30, 30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if route == "dask":
            params = nlref.resolve_parameters(da.from_array(image, chunks=10))
        elif route == "store":
            params = store.resolve_parameters_store(image, chunks=10)
        else:
            params = nlref.resolve_parameters(image)
    assert params["sigma_source"] == "estimated" and params["sigma"] < 0.5
    with pytest.warns(UserWarning, match="less than half a unit"):  # given, the same number is doubted
        if route == "dask":
            nlref.resolve_parameters(da.from_array(image, chunks=10), sigma=params["sigma"])
        elif route == "store":
            store.resolve_parameters_store(image, chunks=10, sigma=params["sigma"])
        else:
            nlref.resolve_parameters(image, sigma=params["sigma"])


# ---- what the arguments, the shape and the dtype decide is refused before any pass over the data ----


def _lazy_routes(image):
    """Each chunked entry point, as a function of its keyword arguments."""
    return {"map_overlap": lambda **kw: nlref.nl_means(da.from_array(image, chunks=8), **kw),
            "resolve": lambda **kw: nlref.resolve_parameters(da.from_array(image, chunks=8), **kw),
            "store": lambda **kw: store.nl_means_store(image, chunks=8, **kw)}


@pytest.mark.parametrize("route", ["map_overlap", "resolve", "store"])
@pytest.mark.parametrize("kwargs, message", [
    (dict(patch_size=41), "is larger than the image along spatial axis 0"),
    (dict(patch_size=(3, 41), search_size=5, sigma=0.1), "is larger than the image along spatial axis 1"),
    (dict(h=1e300), "h=1e+300 is too large"),
    (dict(h=1e-30, sigma=0.1, patch_size=3), "h=1e-30 is too small for sigma=0.1"),
])
def test_shape_and_dtype_errors_come_before_any_pass(route, kwargs, message, synchronous):
    """A patch wider than the image, or an h float32 cannot carry, needs no read of the data: the Dask and store
    routes made one to three full passes (the noise estimate's) before refusing them."""
    from dask.callbacks import Callback

    image = _noisy((20, 30)).astype(np.float32)
    with pytest.raises(ValueError, match=re.escape(message)), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # h=1e300 is also far outside the image's range (a warning first)
        nlref.nl_means(image, **kwargs)  # the in-memory call refuses the same
    passes = []

    class Passes(Callback):
        def _start(self, dsk):
            passes.append(len(dsk))

    with Passes(), pytest.raises(ValueError, match=re.escape(message)):
        _lazy_routes(image)[route](**kwargs)
    assert passes == []


@pytest.mark.parametrize("route", ["map_overlap", "store"])
def test_chunks_too_large_for_memory_are_refused_before_any_pass(route, monkeypatch, synchronous):
    """With both sizes given, the memory one chunk needs is known before the data is read: it was checked after
    the finiteness pass and the noise estimate (three full reads of a volume whose chunks could not run)."""
    from dask.callbacks import Callback

    from nlref.nlmeans import params

    monkeypatch.setattr(params, "WORKING_MEMORY_LIMIT", 10_000)
    image = _noisy((20, 30)).astype(np.float32)
    passes = []

    class Passes(Callback):
        def _start(self, dsk):
            passes.append(len(dsk))

    with Passes(), pytest.raises(ValueError, match="working memory"):
        _lazy_routes(image)[route](patch_size=3, search_size=5)
    assert passes == []


@pytest.mark.parametrize("call", [
    lambda a: nlref.nl_means(da.from_array(a, chunks=20), sigma=0.1, patch_size=3, search_size=5),
    lambda a: nlref.resolve_parameters(da.from_array(a, chunks=20), sigma=0.1),
    lambda a: nlref.nl_means_store(a, chunks=20, sigma=0.1, patch_size=3, search_size=5),
    lambda a: store.resolve_parameters_store(a, chunks=20, sigma=0.1),
], ids=["nl_means", "resolve_parameters", "nl_means_store", "resolve_parameters_store"])
def test_chunked_routes_warn_of_a_missing_channel_axis_once_at_the_callers_line(call):
    """In memory, (H, W, 3) without channel_axis warns that it is denoised as a volume of 3 slices; on Dask and
    in a store it was denoised so without a word."""
    image = np.random.default_rng(0).random((40, 40, 3)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(image)
    doubts = [w for w in caught if "no channel_axis" in str(w.message)]
    assert len(doubts) == 1 and doubts[0].filename == __file__, [(w.filename, str(w.message)) for w in caught]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nlref.nl_means(da.from_array(image, chunks=20), sigma=0.1, patch_size=3, search_size=5, channel_axis=-1)


# ---- unusual but legal chunkings ----


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
@pytest.mark.parametrize("chunks, kwargs", [
    (((0, 20, 0, 45, 0), (30,)), dict(sigma=0.1, patch_size=5, search_size=9)),
    (((20, 45, 0), (10, 0, 20)), dict()),  # the noise estimated: its passes too
    (((0, 65), (30,)), dict(sigma=0.1, patch_size=1, search_size=(1, 3))),  # no halo along axis 0
], ids=["given", "estimated", "no-halo"])
def test_chunks_of_size_zero(chunks, kwargs, aggregation, synchronous):
    """Dask allows chunks of size 0 (``da.concatenate`` with an empty piece); its ``max`` of an array whose first
    chunk along axis 0 is one raised "all the input array dimensions ... must match exactly", so every chunked
    entry point failed in its first pass. The result keeps the input's chunks, zeros included."""
    image = _noisy((65, 30)).astype(np.float32)
    lazy_input = da.from_array(image, chunks=chunks)
    assert nlref.estimate_sigma(lazy_input) == nlref.estimate_sigma(image)
    assert nlref.resolve_parameters(lazy_input, **kwargs) == nlref.resolve_parameters(image, **kwargs)
    lazy = nlref.nl_means(lazy_input, aggregation=aggregation, **kwargs)
    assert lazy.chunks == lazy_input.chunks
    np.testing.assert_array_equal(lazy.compute(), nlref.nl_means(image, aggregation=aggregation, workers=1, **kwargs))


@pytest.mark.parametrize("call", [
    lambda a: store.nl_means_store(a, chunks=8, sigma=0.1, patch_size=3, search_size=5),
    lambda a: store.resolve_parameters_store(a, chunks=8),
    lambda a: store.denoise_store(a, dict(h=0.1, sigma=0.1, patch_size=(3, 3), search_size=(5, 5)), chunks=8),
], ids=["nl_means_store", "resolve_parameters_store", "denoise_store"])
def test_store_route_refuses_a_dask_array(call, synchronous):
    """A Dask array has shape, dtype and slicing, so the store route took it as an array to place in the graph:
    every task then depended on the whole array, computed in one task (on one worker) for every pass, the memory
    the route exists to avoid. It is refused, before any pass, pointing to nl_means (map_overlap)."""
    from dask.callbacks import Callback

    lazy = da.from_array(_noisy((20, 30)).astype(np.float32), chunks=10)
    passes = []

    class Passes(Callback):
        def _start(self, dsk):
            passes.append(len(dsk))

    with Passes(), pytest.raises(TypeError, match=r"source is a lazy Array .*nlref\.nl_means\(source"):
        call(lazy)
    assert passes == []


@pytest.mark.parametrize("kind", ["zarr", "memmap"])
def test_a_big_endian_store_is_denoised_as_in_memory(tmp_path, kind):
    """A big-endian array in a store gives the in-memory result of the same values. Zarr 3 hands a '>f4' array back
    as native float32 when a worker reopens it, and every chunk was refused: "holds (23, 19) float32, not the
    (23, 19) >f4 it held when the run was planned"."""
    zarr = pytest.importorskip("zarr")
    x = _noisy((23, 19)).astype(">f4")
    if kind == "zarr":
        source = zarr.create_array(str(tmp_path / "big.zarr"), shape=x.shape, chunks=(6, 5), dtype=x.dtype)
        source[...] = x
    else:
        np.save(tmp_path / "big.npy", x)
        source = np.load(tmp_path / "big.npy", mmap_mode="r")
    kw = dict(h=0.2, sigma=0.1, patch_size=3, search_size=5)
    expected = nlref.nl_means(x, workers=1, **kw)
    with dask.config.set(scheduler="synchronous"):
        got = nlref.nl_means_store(source, chunks=(7, 8), **kw).compute()
    assert got.dtype.newbyteorder("=") == np.float32
    np.testing.assert_array_equal(got, expected)
