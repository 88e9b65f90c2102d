"""The Numba engine of the NL-means offset loop (:mod:`nlref.nlmeans.fast_numba`).

It must equal the definition (``method="naive"``) and the NumPy engine within
the suite's tolerances, give the same bits for any ``workers``, any tile size
and any Dask chunking, and be chosen only where it can run.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import nlref
import nlref.backend as B
from nlref.nlmeans import fast
from tests.helpers import traced_peak

numba = pytest.importorskip("numba", reason="the Numba engine needs numba (pip install 'nlref[fast]')")
fast_numba = pytest.importorskip("nlref.nlmeans.fast_numba")

VAR = fast.ENGINE_VARIABLE

# (name, shape, kwargs): every box path of the kernel (widths 1, 3, 5, 7 and the generic 9),
# 1 to 3 spatial axes, grey and colour
CASES = [
    ("grey 5x5", (21, 23), dict(patch_size=5, search_size=9)),
    ("grey 7x7", (26, 24), dict(patch_size=7, search_size=(7, 11))),
    ("grey 9x9", (25, 25), dict(patch_size=9, search_size=5)),
    ("grey 1x1", (14, 17), dict(patch_size=1, search_size=7)),
    ("colour 3x3", (17, 19, 3), dict(patch_size=3, search_size=(7, 9), channel_axis=-1)),
    ("signal", (60,), dict(patch_size=5, search_size=15)),
    ("volume", (6, 9, 10), dict(patch_size=(1, 3, 3), search_size=(3, 5, 5))),
]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def _noisy(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    clean = 0.5 + 0.3 * np.sin(7 * sum(axes))
    return (clean + 0.1 * rng.standard_normal(shape)).astype(dtype)


def _run(monkeypatch, engine, image, **kwargs):
    monkeypatch.setenv(VAR, engine)
    return nlref.nl_means(image, sigma=0.1, h=0.12, **kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
@pytest.mark.parametrize("name, shape, kwargs", CASES, ids=[c[0] for c in CASES])
def test_numba_equals_the_definition_and_the_numpy_engine(monkeypatch, name, shape, kwargs, aggregation, dtype):
    image = _noisy(shape, dtype)
    compiled = _run(monkeypatch, "numba", image, aggregation=aggregation, workers=2, **kwargs)
    arrays = _run(monkeypatch, "numpy", image, aggregation=aggregation, workers=2, **kwargs)
    naive = nlref.nl_means(image, sigma=0.1, h=0.12, aggregation=aggregation, method="naive", **kwargs)
    assert compiled.dtype == image.dtype and compiled.shape == image.shape
    np.testing.assert_allclose(compiled, naive, **TOL[dtype])
    np.testing.assert_allclose(compiled, arrays, **TOL[dtype])
    assert not np.array_equal(image, compiled)  # it did denoise


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
def test_same_bits_for_any_workers_and_any_tile_size(monkeypatch, aggregation):
    """No value depends on where a tile starts, which thread runs it, or how its offsets are cut into calls."""
    clean = nlref.data.camera()[200:264, 180:250]
    image = nlref.add_gaussian_noise(clean, 20 / 255, seed=1).astype(np.float32)
    first = _run(monkeypatch, "numba", image, aggregation=aggregation, workers=1)
    for workers in (2, 3, 8):
        np.testing.assert_array_equal(_run(monkeypatch, "numba", image, aggregation=aggregation, workers=workers),
                                      first, err_msg=f"workers={workers}")
    monkeypatch.setattr(fast_numba, "TILE_REACHES", 0)  # tiles as small as TILE_ELEMENTS says
    for tile in (1, 500, 3001):  # one row per tile; tiles of several rows, cut anywhere
        monkeypatch.setattr(fast_numba, "TILE_ELEMENTS", tile)
        np.testing.assert_array_equal(_run(monkeypatch, "numba", image, aggregation=aggregation, workers=2), first,
                                      err_msg=f"TILE_ELEMENTS={tile}")
    monkeypatch.undo()
    for step in (1, 5000, 2**40):  # one offset per kernel call (stop checked after each); several; all at once
        monkeypatch.setattr(fast_numba, "STEP_ELEMENTS", step)
        np.testing.assert_array_equal(_run(monkeypatch, "numba", image, aggregation=aggregation, workers=2), first,
                                      err_msg=f"STEP_ELEMENTS={step}")


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
def test_dask_chunks_give_the_in_memory_bits(monkeypatch, aggregation):
    da = pytest.importorskip("dask.array")
    image = _noisy((40, 37), np.float32, seed=2)
    monkeypatch.setenv(VAR, "numba")
    whole = nlref.nl_means(image, sigma=0.1, h=0.12, patch_size=5, search_size=9, aggregation=aggregation)
    for chunks in ((40, 37), (13, 20), (25, 9)):
        lazy = nlref.nl_means(da.from_array(image, chunks=chunks), sigma=0.1, h=0.12, patch_size=5, search_size=9,
                              aggregation=aggregation, workers=2)
        np.testing.assert_array_equal(lazy.compute(scheduler="threads"), whole, err_msg=f"chunks={chunks}")


def test_constant_image_stays_constant_and_outputs_are_convex(monkeypatch):
    monkeypatch.setenv(VAR, "numba")
    flat = np.full((20, 22), 0.3, dtype=np.float32)
    for aggregation in ("pixel", "patch"):
        np.testing.assert_allclose(nlref.nl_means(flat, sigma=0.1, h=0.1, patch_size=5, search_size=9,
                                                  aggregation=aggregation), 0.3, rtol=1e-6)
    image = _noisy((30, 31), np.float32, seed=4)
    out = nlref.nl_means(image, sigma=0.1, h=0.2, patch_size=5, search_size=11, aggregation="patch")
    assert image.min() - 1e-6 <= out.min() and out.max() <= image.max() + 1e-6


def test_the_float32_exp_is_within_one_ulp():
    """The kernel's vectorised exp over every clamped exponent it can see, [-50, 0] (NumPy's: 2.35 ulp)."""
    t = np.linspace(-50.0, 0.0, 200_001, dtype=np.float32)
    out = np.empty_like(t)
    fast_numba.compile_kernels()
    fast_numba._weight32(t, np.float32(1.0), np.float32(0.0), np.float32(-50.0), out, np.empty(t.size, np.int32))
    exact = np.exp(t.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(out - exact) / ulp) <= 1.0
    assert out[-1] == 1.0  # the centre weight exp(0)


@pytest.mark.parametrize("shape, channel_axis, aggregation", [
    ((300, 280), None, "pixel"), ((300, 280), None, "patch"), ((160, 150, 3), -1, "patch"),
    ((12, 96, 96), None, "pixel"), ((12, 96, 96), None, "patch")])  # volumes: tiles grown by TILE_REACHES
def test_the_working_memory_limit_still_bounds_the_peak(monkeypatch, shape, channel_axis, aggregation):
    """The limit check uses the NumPy engine's estimate, an upper bound for the Numba engine too."""
    import tracemalloc

    from nlref.nlmeans.api import resolve_parameters

    monkeypatch.setenv(VAR, "numba")
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    p = resolve_parameters(x, sigma=0.08, channel_axis=channel_axis)
    spatial = shape if channel_axis is None else shape[:-1]
    channels = 1 if channel_axis is None else shape[-1]
    estimate = fast.working_memory(spatial, channels, p["patch_size"], p["search_size"], aggregation, 4, 2)
    nlref.nl_means(x[:12, :40], sigma=0.08, channel_axis=channel_axis, aggregation=aggregation, workers=2)  # compile
    tracemalloc.start()
    try:
        nlref.nl_means(x, sigma=0.08, channel_axis=channel_axis, aggregation=aggregation, workers=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0 < peak <= estimate


@pytest.mark.parametrize("shape, channel_axis", [((300, 280), None), ((160, 150, 3), -1)])
def test_patch_wise_holds_few_float64_copies_of_the_image(monkeypatch, shape, channel_axis):
    """Patch-wise, between its passes, the Numba engine holds Z, 1/Z, the mask, the centre term and the
    counts, float64 arrays of the padded image's size: each is dropped once read, and the box sums
    return a view instead of a third copy. The peak reached 20 float32 copies of the image (13.3 now,
    the tiles' scratch and the working copies included), grey or colour."""
    monkeypatch.setenv(VAR, "numba")
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    kwargs = dict(sigma=0.08, channel_axis=channel_axis, aggregation="patch", workers=1)
    nlref.nl_means(x[:12, :40], **kwargs)  # compiled or loaded outside the trace
    peak = traced_peak(lambda: nlref.nl_means(x, **kwargs))
    assert peak <= 14 * x.nbytes, peak / x.nbytes


def test_pixel_wise_in_memory_peak_of_a_grey_image(monkeypatch):
    """Pixel-wise, in memory: the working copy, the padded image, the flat estimate and the result, and the
    tiles' scratch: 4.5 float32 copies of a 512 x 480 image. The result was built through a zero-padded
    array per channel, sliced and stacked: one image-sized array more at the peak (5.3 copies)."""
    monkeypatch.setenv(VAR, "numba")
    x = np.random.default_rng(0).random((512, 480)).astype(np.float32)
    kwargs = dict(sigma=0.08, workers=1)
    nlref.nl_means(x[:12, :40], **kwargs)  # compiled or loaded outside the trace
    peak = traced_peak(lambda: nlref.nl_means(x, **kwargs))
    assert peak <= 4.8 * x.nbytes, peak / x.nbytes


def test_progress_counts_every_offset_once_per_pass(monkeypatch):
    monkeypatch.setenv(VAR, "numba")
    seen = []
    v = _noisy((16, 18), np.float32)[None]
    for aggregation, passes in (("pixel", 1), ("patch", 2)):
        seen.clear()
        fast.nl_means_fast(v, h=0.12, sigma=0.1, patch_size=(3, 3), search_size=(7, 7), aggregation=aggregation,
                           progress=seen.append)
        assert sum(seen) == passes * (7 * 7 // 2)


def test_auto_picks_numba_for_numpy_only(monkeypatch):
    strict = pytest.importorskip("array_api_strict")
    monkeypatch.delenv(VAR, raising=False)
    assert fast.resolve_engine(B.array_namespace(np.zeros(1))) == "numba"
    assert fast.resolve_engine(B.array_namespace(B.asarray(np.zeros(1), xp=strict))) == "numpy"
    # and array-api-strict still runs (the NumPy engine) under NLREF_NLMEANS_ENGINE=auto
    image = _noisy((12, 13), np.float32)
    out = nlref.nl_means(B.asarray(image, xp=strict), sigma=0.1, h=0.12, patch_size=3, search_size=5)
    assert B.array_namespace(out).__name__ == B.array_namespace(B.asarray(image, xp=strict)).__name__


def test_engine_errors_name_the_setting(monkeypatch):
    strict = pytest.importorskip("array_api_strict")
    image = _noisy((12, 13), np.float32)
    monkeypatch.setenv(VAR, "numbaa")
    with pytest.raises(ValueError, match=f"{VAR} must be one of .*'numbaa'"):
        nlref.nl_means(image, sigma=0.1, patch_size=3, search_size=5)
    with pytest.raises(ValueError, match="engine must be one of"):
        fast.resolve_engine(B.array_namespace(image), "fastest")
    monkeypatch.setenv(VAR, "numba")
    with pytest.raises(ValueError, match=f"{VAR}='numba' runs on NumPy arrays only"):
        nlref.nl_means(B.asarray(image, xp=strict), sigma=0.1, patch_size=3, search_size=5)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else
                        real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"needs the optional dependency Numba: pip install 'nlref\[fast\]'"):
        nlref.nl_means(image, sigma=0.1, patch_size=3, search_size=5)
    monkeypatch.setenv(VAR, "auto")  # without Numba, auto falls back to the NumPy engine
    assert fast.resolve_engine(B.array_namespace(image)) == "numpy"
