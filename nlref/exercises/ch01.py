"""Checks for the exercises of chapter 1, averaging noisy copies.

Each ``exK(answer, ...)`` recomputes the expected value with nlref on the
chapter's own setup (the keyword arguments default to it) and compares.
"""

from __future__ import annotations

import math

import numpy as np

from . import _report, _shown, check_close, check_true, not_answered

__all__ = ["LEVELS", "GRADED", "ex1", "ex2", "ex3", "ex4", "ex5", "correlated_variance", "median_loss_db", "noisy_oracle", "noisy_oracle_psnr"]

#: Each exercise's level and time estimate in minutes (the teachers' page and the syllabus use them).
LEVELS = {"ex1": ("warm-up", 10), "ex2": ("core", 25), "ex3": ("core", 15), "ex4": ("warm-up", 10), "ex5": ("core", 25)}
#: The graded implementation exercises of this chapter (none, its checks take values).
GRADED = ()

COUNTS = (1, 2, 4, 8, 16, 32, 64)


def _crop():
    import nlref

    return nlref.data.camera()[128:384, 128:384]


def ex1(answer, *, sigma=0.1, seed=2):
    """The factor by which every point of the 1/N curve moves when sigma doubles.

    Expected: ``averaging_curve(crop, 2 sigma) / averaging_curve(crop, sigma)`` with
    the chapter's crop, counts and seed (the same draws, scaled), which is 4 at every
    N up to float32 rounding; ``rtol=1e-4`` allows that rounding and nothing else
    (a factor 2, the change of the standard deviation, is off by 100 %).
    """
    import nlref

    if not_answered("ch01 ex1", answer):
        return None
    crop = _crop()
    ratio = np.array(nlref.averaging_curve(crop, 2 * sigma, COUNTS, seed=seed)) / np.array(
        nlref.averaging_curve(crop, sigma, COUNTS, seed=seed))
    return check_close("ch01 ex1", answer, float(np.median(ratio)), rtol=1e-4)


def correlated_variance(a, b, n, *, seed=5):
    """Residual variance of the mean of ``n`` copies ``crop + a * common + b * fresh_k`` (the exercise's setup).

    ``common`` is one standard-normal image shared by all copies (seed ``seed``),
    ``fresh_k`` are drawn anew for each copy (seed ``seed + 1``).
    """
    import nlref

    crop = _crop()
    common = nlref.add_gaussian_noise(np.zeros_like(crop), 1.0, seed=seed)
    copies = nlref.noisy_copies(crop + a * common, b, n, seed=seed + 1)
    return float(np.mean((nlref.average(copies) - crop) ** 2))


def ex2(answer, *, a=0.05, b=0.1):
    """The floor of the residual variance of correlated copies as N grows.

    Expected: the variance measured with ``N = 256`` correlated copies of the
    256x256 crop. The floor is ``a**2`` times the variance of one common noise
    image; the measurement adds ``b**2 / 256`` (1.6 % of ``a**2`` here) and a
    sampling error of about 0.6 % (``sqrt(2 / 65536)`` relative), so ``rtol=0.05``.
    Answers that forget the square (``a``) or keep the fresh part (``a**2 + b**2``)
    are off by a factor of at least 5.
    """
    if not_answered("ch01 ex2", answer):
        return None
    return check_close("ch01 ex2", answer, correlated_variance(a, b, 256), rtol=0.05)


def median_loss_db(n=63, *, sigma=0.1, seed=3):
    """``10 log10`` of the median's residual variance over ``sigma**2 / n`` on the chapter's crop."""
    import nlref

    crop = _crop()
    copies = nlref.noisy_copies(crop, sigma, n, seed=seed)
    var = float(np.mean((np.median(np.asarray(copies, dtype=np.float64), axis=0) - crop) ** 2))
    return 10 * math.log10(var / (sigma**2 / n))


def ex3(answer, *, n=63, sigma=0.1, seed=3):
    """The measured loss, in dB, of the median of 63 copies against the sigma^2/N law.

    Expected: :func:`median_loss_db` on the chapter's crop (the same draws as the
    exercise). It is a measurement, so ``atol=0.01`` dB: enough for float32 against
    float64 arithmetic, far below the 0.04 dB between it and the large-N limit
    ``10 log10(pi/2)``.
    """
    if not_answered("ch01 ex3", answer):
        return None
    return check_close("ch01 ex3", answer, median_loss_db(n, sigma=sigma, seed=seed), rtol=0, atol=0.01)


def ex4(answer, *, sigma=0.1, target_db=40.0):
    """The number of copies that brings a sigma = 0.1 image to 40 dB.

    Passes when ``answer`` is an integer within 5 % of the N at which the law
    ``PSNR(1) + 10 log10 N`` reaches the target, and when the PSNR that
    ``nlref.averaging_curve`` measures for that many copies is within 0.2 dB of
    40 (one measurement of a 128x128 crop scatters by about 0.05 dB).
    """
    import nlref

    if not_answered("ch01 ex4", answer):
        return None
    if isinstance(answer, bool) or not isinstance(answer, (int, np.integer)) or answer < 1:
        return _report("ch01 ex4", False, f"expected a positive int (a number of copies), got {_shown(answer)}")
    law = 10 ** (target_db / 10) * sigma**2
    if not 0.95 * law <= answer <= 1.05 * law:  # before measuring: 10**6 copies of the crop would need 122 GiB
        # (compared, not subtracted: int - float overflows for an int beyond 1e308)
        shown = f"{answer}" if answer < 10**15 else "over 10**15"  # str() refuses ints of 4300 digits and more
        return _report("ch01 ex4", False, f"{shown} copies: the law PSNR(1) + 10 log10 N does not reach "
                                          f"{target_db:g} dB there (within 5 %)")
    measured = 10 * math.log10(1 / nlref.averaging_curve(_crop()[:128, :128], sigma, [int(answer)], seed=4)[0])
    return check_true("ch01 ex4", answer, abs(measured - target_db) <= 0.2, f"{answer} copies measure {measured:.2f} dB")


def noisy_oracle(*, sigma=0.1, seed=0):
    """The 'oracle' that groups the pixels by their rounded *noisy* level (the exercise's recipe):
    each pixel replaced by the mean of the noisy pixels of its group, float64.

    The levels are rounded from the chapter's float32 noisy image, as the recipe does: rounded
    from float64 copies, some pixels near a half level would fall into the next group.
    """
    import nlref

    noisy = np.asarray(nlref.add_gaussian_noise(nlref.data.camera(), sigma, seed=seed))
    _, group = np.unique(np.round(noisy * 255), return_inverse=True)
    group = group.ravel()
    mean = np.bincount(group, weights=noisy.ravel()) / np.bincount(group)
    return mean[group].reshape(noisy.shape)


def noisy_oracle_psnr(*, sigma=0.1, seed=0):
    """PSNR of :func:`noisy_oracle` against the clean image."""
    import nlref

    return nlref.psnr(nlref.data.camera(), noisy_oracle(sigma=sigma, seed=seed))


def ex5(answer, *, sigma=0.1, seed=0):
    """The noisy-value 'oracle''s estimate: an image shaped like the chapter's noisy image.

    Expected: :func:`noisy_oracle`, from the chapter's noisy image. ``rtol=1e-5``,
    ``atol=1e-7`` cover group means summed in float32. The noisy image itself differs from it
    by up to half a grey level (1/510) and fails, so only an oracle built passes (a PSNR
    would not tell: the oracle scores what the noisy image scores, to 0.01 dB, which is the
    lesson). When it passes, the check prints both PSNRs.
    """
    import nlref

    if not_answered("ch01 ex5", answer):
        return None
    expected = noisy_oracle(sigma=sigma, seed=seed)
    ok = check_close("ch01 ex5", answer, expected, rtol=1e-5, atol=1e-7)
    if ok:
        clean = nlref.data.camera()
        noisy = nlref.add_gaussian_noise(clean, sigma, seed=seed)
        print(f"  its PSNR {nlref.psnr(clean, expected):.2f} dB; the noisy image's {nlref.psnr(clean, noisy):.2f} dB")
    return ok
