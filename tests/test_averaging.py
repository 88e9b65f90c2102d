import math

import numpy as np
import pytest

import nlref
import nlref.backend as B
from tests.helpers import assert_same_library


def test_noise_is_seeded_and_has_the_requested_sigma(to_xp):
    clean = to_xp(np.full((200, 200), 0.5, dtype=np.float32))
    a = nlref.add_gaussian_noise(clean, 0.1, seed=3)
    b = nlref.add_gaussian_noise(clean, 0.1, seed=3)
    assert_same_library(a, clean)
    na, nb = B.to_numpy(a), B.to_numpy(b)
    np.testing.assert_array_equal(na, nb)
    assert na.dtype == np.float32
    assert abs(na.std() - 0.1) < 0.003
    assert abs(na.mean() - 0.5) < 0.003


def test_average_of_n_copies_has_variance_sigma2_over_n(to_xp):
    clean = to_xp(nlref.data.camera()[:128, :128])
    sigma = 0.1
    counts = [1, 2, 4, 8, 16, 32]
    variances = nlref.averaging_curve(clean, sigma, counts, seed=1)
    for n, v in zip(counts, variances):
        # 16384 samples: the relative standard error of a variance is sqrt(2/16384) ~ 1.1 %
        assert v == pytest.approx(sigma**2 / n, rel=0.05)
    slope = np.polyfit(np.log(counts), np.log(variances), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.03)


def test_psnr_gains_3db_per_doubling():
    clean = nlref.data.camera()[:128, :128]
    copies = nlref.noisy_copies(clean, 0.1, 8, seed=0)
    p1 = nlref.psnr(clean, nlref.average(copies[:1]))
    p2 = nlref.psnr(clean, nlref.average(copies[:2]))
    p8 = nlref.psnr(clean, nlref.average(copies))
    assert p2 - p1 == pytest.approx(10 * math.log10(2), abs=0.3)
    assert p8 - p1 == pytest.approx(10 * math.log10(8), abs=0.3)


def test_psnr_and_mse_definitions(to_xp):
    a = to_xp(np.zeros((4, 4)))
    b = to_xp(np.full((4, 4), 0.1))
    assert nlref.mse(a, b) == pytest.approx(0.01)
    assert nlref.psnr(a, b) == pytest.approx(20.0)
    assert nlref.psnr(a, a) == math.inf
    with pytest.raises(ValueError, match="one shape"):
        nlref.mse(a, to_xp(np.zeros((4, 3))))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_sigma(bad):
    with pytest.raises(ValueError, match="sigma must be a finite real number >= 0"):
        nlref.add_gaussian_noise(np.zeros(3), bad)
    with pytest.raises(ValueError, match="sigma must be a finite real number >= 0"):
        nlref.noisy_copies(np.zeros(3), bad, 2)


def test_numpy_scalar_sigma_and_first_copy():
    clean = np.zeros((5, 6), dtype=np.float32)
    a = nlref.add_gaussian_noise(clean, np.float32(0.1), seed=4)
    np.testing.assert_array_equal(a, nlref.noisy_copies(clean, 0.1, 3, seed=4)[0])


def test_bad_counts():
    with pytest.raises(ValueError, match="n must be a positive int"):
        nlref.noisy_copies(np.zeros(3), 0.1, 0)
    with pytest.raises(ValueError, match="counts must be positive"):
        nlref.averaging_curve(np.zeros(3), 0.1, [0, 2])


def test_psnr_default_range_follows_the_dtype(xp_cpu):
    a = B.asarray(np.zeros((4, 4), dtype=np.uint8), xp=xp_cpu)
    b = B.asarray(np.full((4, 4), 51, dtype=np.uint8), xp=xp_cpu)
    assert nlref.psnr(a, b) == pytest.approx(20 * math.log10(255 / 51))
    assert nlref.psnr(a, b, data_range=510.0) == pytest.approx(20 * math.log10(510 / 51))


def test_residual_variance_of_integer_images_does_not_wrap(xp_cpu):
    # uint8 estimates wrapped: 0 against 20 gave 144 (236^2 mod 256), not 400; a float clean image was
    # cast to the estimate's ints (0.5 -> 0) and 1 against 0.5 gave 1.0, not 0.25
    u8 = B.asarray(np.array([0, 20], dtype=np.uint8), xp=xp_cpu)
    assert nlref.averaging.residual_variance(u8[:1], u8[1:]) == 400.0
    one = B.asarray(np.array([1], dtype=np.uint8), xp=xp_cpu)
    assert nlref.averaging.residual_variance(one, B.asarray(np.array([0.5]), xp=xp_cpu)) == 0.25
    # float16 squares overflowed above 256: 300 against 0 gave inf (array-api-strict has no float16)
    f16 = np.array([300.0, 0.0], dtype=np.float16)
    assert nlref.averaging.residual_variance(f16[:1], f16[1:]) == 90000.0
    # float32 and float64 estimates: their own dtype, as before (the same bits)
    est = np.array([0.25, 0.5], dtype=np.float32)
    d = est - np.array([0.0, 0.125], dtype=np.float32)
    got = nlref.averaging.residual_variance(B.asarray(est, xp=xp_cpu), B.asarray(np.array([0.0, 0.125]), xp=xp_cpu))
    assert got == float(np.mean(d * d))


def test_residual_variance_refuses_what_it_cannot_measure(xp_cpu):
    a = B.asarray(np.zeros((4, 4)), xp=xp_cpu)
    with pytest.raises(ValueError, match=r"one shape; got \(1, 4\) and \(4, 4\)"):  # was broadcast: a wrong number
        nlref.averaging.residual_variance(a[:1, ...], a)
    with pytest.raises(ValueError, match="empty"):  # was NaN
        nlref.averaging.residual_variance(a[:0, ...], a[:0, ...])
    with pytest.raises(TypeError, match="estimate must hold real numbers"):  # 1j against 0 gave -1.0
        nlref.averaging.residual_variance(B.asarray(np.array([1j]), xp=xp_cpu), B.asarray(np.array([0j]), xp=xp_cpu))
    with pytest.raises(ValueError, match="clean contains NaN"):
        nlref.averaging.residual_variance(a[0, ...], B.asarray(np.array([0, np.nan, 0, 0]), xp=xp_cpu))


def test_noise_and_average_refuse_complex_masked_and_non_finite_images():
    z = np.array([0.5 + 0.5j, 0.25])
    with pytest.raises(TypeError, match="image must hold real numbers"):  # the imaginary part was dropped
        nlref.add_gaussian_noise(z, 0.1, seed=0)
    with pytest.raises(TypeError, match="copies must hold real numbers"):
        nlref.average(z[None, :])
    with pytest.raises(TypeError, match=r"copies\[1\] must hold real numbers"):
        nlref.average([z.real, z])
    masked = np.ma.masked_array([0.5, 100.0], [False, True])
    with pytest.raises(TypeError, match="image is a NumPy masked array"):  # came back masked
        nlref.noisy_copies(masked, 0.1, 2, seed=0)
    with pytest.raises(TypeError, match="copies is a NumPy masked array"):  # the mean skipped the masked value
        nlref.average(masked[:, None])
    with pytest.raises(ValueError, match="image contains NaN or Inf"):
        nlref.add_gaussian_noise(np.array([np.nan, 0.5]), 0.1, seed=0)
    with pytest.raises(ValueError, match="no copy along axis 1"):  # NaN with two RuntimeWarnings
        nlref.average(np.zeros((4, 0)), axis=1)
    with pytest.raises(ValueError, match="too large for float32 noise"):  # inf with an overflow warning
        nlref.add_gaussian_noise(np.full(3, 100.0, dtype=np.float32), 1e38, seed=0)
    assert nlref.average(np.array([[True], [False]]))[0] == 0.5  # bools are numbers here, as integers are


def test_a_numpy_int_count_of_copies():
    clean = np.zeros((3, 4), dtype=np.float32)
    np.testing.assert_array_equal(nlref.noisy_copies(clean, 0.1, np.int64(2), seed=1),
                                  nlref.noisy_copies(clean, 0.1, 2, seed=1))  # was "n must be a positive int"
