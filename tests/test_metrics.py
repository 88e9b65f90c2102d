"""PSNR and MSE: the conventions of scikit-image's ``peak_signal_noise_ratio``, and bad input refused by name."""

import math

import numpy as np
import pytest

import nlref
import nlref.backend as B

metrics = pytest.importorskip("skimage.metrics")


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "float64", "float16", "bool"])
def test_psnr_equals_skimage_on_its_default_ranges(dtype):
    rng = np.random.default_rng(0)
    if dtype == "bool":
        a, b = rng.random((16, 16)) > 0.5, rng.random((16, 16)) > 0.5
        data_range = 1.0
    elif dtype.startswith("uint"):
        top = np.iinfo(dtype).max
        a = rng.integers(0, top, (16, 16), endpoint=True).astype(dtype)
        b = np.clip(a.astype(np.int64) + rng.integers(-9, 10, (16, 16)), 0, top).astype(dtype)
        data_range = float(top)
    else:
        a = rng.random((16, 16)).astype(dtype)
        b = (a + 0.01 * rng.standard_normal((16, 16))).astype(dtype)
        data_range = 1.0
    rel = 1e-6 if dtype in ("float32", "float16") else 1e-12  # scikit-image sums a float32 pair in float32
    assert nlref.psnr(a, b) == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=data_range), rel=rel)
    if dtype.startswith("uint"):  # its default range for unsigned images: the dtype's
        assert nlref.psnr(a, b) == pytest.approx(metrics.peak_signal_noise_ratio(a, b), rel=rel)
    assert nlref.mse(a, b) == pytest.approx(metrics.mean_squared_error(a, b), rel=rel)
    assert nlref.psnr(a, a) == math.inf


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint32"])
def test_psnr_asks_for_the_range_of_other_integer_images(xp_cpu, dtype):
    # a 0..255 image stored as int64 (noise added in ints, say) was scored on a range of 1: -7.96 dB for 40.17
    rng = np.random.default_rng(1)
    a = rng.integers(0, 100, (8, 8)).astype(dtype)
    b = (a + rng.integers(-3, 4, (8, 8))).astype(dtype)
    ax, bx = B.asarray(a, xp=xp_cpu), B.asarray(b, xp=xp_cpu)
    with pytest.raises(ValueError, match=f"data_range must be given for a reference of dtype {dtype}"):
        nlref.psnr(ax, bx)
    assert nlref.psnr(ax, bx, data_range=255) == pytest.approx(
        metrics.peak_signal_noise_ratio(a, b, data_range=255), rel=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", ["reference", "estimate"])
def test_non_finite_images_are_refused(xp_cpu, bad, which):
    good = np.linspace(0, 1, 6)
    broken = good.copy()
    broken[2] = bad
    pair = {"reference": good, "estimate": good * 0.9}
    pair[which] = broken
    args = [B.asarray(pair[k], xp=xp_cpu) for k in ("reference", "estimate")]
    for f in (nlref.psnr, nlref.mse):  # NaN came back as a NaN PSNR, inf as "math domain error"
        with pytest.raises(ValueError, match=f"{which} contains NaN or Inf"):
            f(*args)


def test_empty_complex_and_masked_images_are_refused(xp_cpu):
    empty = B.asarray(np.zeros((0, 4)), xp=xp_cpu)
    for f in (nlref.psnr, nlref.mse):  # NaN with two RuntimeWarnings
        with pytest.raises(ValueError, match="empty"):
            f(empty, empty)
    z = B.asarray(np.array([1 + 1j, 0.5]), xp=xp_cpu)  # the imaginary part was dropped with a ComplexWarning
    for f in (nlref.psnr, nlref.mse):
        with pytest.raises(TypeError, match="reference must hold real numbers"):
            f(z, z)
    a = np.linspace(0, 1, 4)
    masked = np.ma.masked_array(a, [False, True, False, False])
    for f in (nlref.psnr, nlref.mse):  # the mean skipped the masked samples
        with pytest.raises(TypeError, match="estimate is a NumPy masked array"):
            f(a, masked)


def test_psnr_of_a_huge_data_range():
    a, b = np.zeros(4), np.full(4, 1e150)
    # data_range**2 overflowed: OverflowError
    assert nlref.psnr(a, b, data_range=1e160) == pytest.approx(20 * 160 - 10 * 300)
