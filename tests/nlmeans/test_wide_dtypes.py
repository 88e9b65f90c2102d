"""Integer images wider than 16 bits, and longdouble, keep their values: NL-means computes them in float64.

int32 and uint32 images were computed in float32, which holds every integer only up to 2^24: a constant
uint32 image of 16,777,217 came back as 16,777,216, and a uint32 image around 4e9 with 100 levels of
detail came back nearly flat. int64 and uint64 values from 2^53 on, which float64 cannot all hold,
are refused before any work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nlref
from nlref.nlmeans import api, params

KW = dict(h=3.0, sigma=1.0, patch_size=3, search_size=5)


def _routes(image, **kwargs):
    """The in-memory result, and the Dask one where Dask is installed (uneven chunks)."""
    out = [nlref.nl_means(image, workers=1, **kwargs)]
    try:
        import dask
        import dask.array as da
    except ImportError:
        return out
    lazy = nlref.nl_means(da.from_array(image, chunks=(5, 7)), **kwargs)
    with dask.config.set(scheduler="synchronous"):
        out.append(lazy.compute())
    return out


@pytest.mark.parametrize("dtype, value", [(np.uint32, 2**24 + 1), (np.int32, -(2**24) - 1), (np.int32, 2**31 - 1),
                                          (np.uint32, 2**32 - 1), (np.int64, 2**40 + 1), (np.uint64, 2**53 - 1),
                                          (np.longdouble, np.longdouble(1) + np.longdouble(2) ** -40)])
def test_a_constant_image_comes_back_unchanged(dtype, value):
    image = np.full((12, 15), value, dtype=dtype)
    kwargs = KW if dtype != np.longdouble else dict(KW, h=0.01, sigma=0.003)  # a float image near 1
    for out in _routes(image, **kwargs):
        assert out.dtype == image.dtype
        np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.int64])
def test_wide_integers_equal_the_float64_result_rounded(dtype):
    """Detail far above 2^24: the integer result is the float64 result rounded, in memory and chunked."""
    rng = np.random.default_rng(5)
    offset = 4_000_000_000 if dtype != np.int32 else 2_000_000_000
    image = (offset + rng.integers(0, 100, (20, 21))).astype(dtype)
    expected = np.round(nlref.nl_means(image.astype(np.float64), workers=1, **KW)).astype(dtype)
    for out in _routes(image, **KW):
        np.testing.assert_array_equal(out, expected)
    assert len(np.unique(expected)) > 20  # the detail is there to keep


@pytest.mark.parametrize("dtype, value", [(np.int64, 2**53 + 1), (np.int64, -(2**60)), (np.uint64, 2**64 - 1)])
def test_int64_values_float64_cannot_hold_are_refused(dtype, value):
    image = np.zeros((12, 15), dtype=dtype)
    image[3, 4] = value
    with pytest.raises(ValueError, match=r"image values reach \S+, at or above 2\^53 = 9,007,199,254,740,992, beyond "
                                         r"which float64 \(NL-means computes in it for u?int64 images\) does not hold "
                                         "every integer"):
        nlref.nl_means(image, **KW)
    pytest.importorskip("dask")
    import dask.array as da

    with pytest.raises(ValueError, match=r"at or above 2\^53"):
        nlref.nl_means(da.from_array(image, chunks=5), **KW)


def test_the_working_dtype_of_every_real_dtype():
    for dtype in (np.uint8, np.int8, np.uint16, np.int16, np.float16, np.float32):
        assert params.working_dtype(dtype) == np.float32, dtype
    for dtype in (np.uint32, np.int32, np.uint64, np.int64, np.float64, np.longdouble):
        assert params.working_dtype(dtype) == np.float64, dtype


def test_the_memory_check_counts_float64_for_wide_integers(monkeypatch):
    """The working copy of a uint32 image is float64: the estimate counts 8 bytes a sample, as for float64."""
    image = np.zeros((64, 64), dtype=np.uint32)
    p = api.resolve_parameters(image, **KW)
    monkeypatch.setattr(api, "available_memory", lambda: 2**40)
    monkeypatch.setattr(api, "working_memory", lambda *args, **kwargs: seen.append(args[5]) or 0)
    seen = []
    api.check_limits(image, p, workers=1)
    assert seen == [8]


def test_a_bfloat16_tensor_runs_where_numpy_does_not_know_bfloat16():
    """PyTorch's bfloat16 has no NumPy dtype unless ml_dtypes (brought by Keras or JAX) registered one: the
    working dtype and the memory check's sizes read ``np.dtype('bfloat16')`` and raised "data type 'bfloat16' not
    understood" in a process that had not imported it (the suite passed only where an earlier test had). A fresh
    process, so that nothing else registered it."""
    pytest.importorskip("torch")
    code = (
        "import sys, torch, nlref\n"
        "x = torch.linspace(0, 1, 24 * 24).reshape(24, 24).to(torch.bfloat16)\n"
        "assert 'ml_dtypes' not in sys.modules, 'ml_dtypes is loaded: the test would not test it'\n"
        "y = nlref.nl_means(x, h=0.1)\n"
        "w = nlref.nl_means_weights(x, (5, 5), h=0.1)\n"
        "print(y.dtype, w.dtype, tuple(y.shape))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["torch.bfloat16", "torch.float32", "(24,", "24)"]
