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
