"""Checks for the exercises of chapter 2, non-local means.

The chapter's setup: the camera image with Gaussian noise of ``sigma = 0.08``
(seed 0), ``h = 0.4 sigma``, 5x5 patches. Each check recomputes its expected
value with ``nlref.nl_means`` on that setup.
"""

from __future__ import annotations

import numpy as np

from . import _report, check_close, not_answered
from ._student import call
from ._graded import attempt, compare, verdict

__all__ = ["LEVELS", "GRADED", "ex1", "ex2", "ex3", "ex4", "ex5", "uncorrected_sweep", "flat_gain", "video_psnrs", "ex6"]

#: Each exercise's level and time estimate in minutes (the teachers' page and the syllabus use them).
LEVELS = {'ex1': ('core', 20), 'ex2': ('core', 40), 'ex3': ('core', 20), 'ex4': ('warm-up', 15), 'ex5': ('stretch', 30), 'ex6': ('warm-up', 20)}
#: The graded implementation exercises (the student writes a function, checked against nlref
#: and, for a backward pass, against finite differences).
GRADED = ('ex6',)

SIGMA = 0.08
FACTORS = (0.5, 1.0, 1.5, 2.0, 3.0)
ZONE = (slice(180, 308), slice(200, 328))     # the 128x128 crop of section 7
SKY = (slice(0, 120), slice(240, 360))        # a crop of flat sky around the flat pixel (50, 300)
INNER = (slice(30, 90), slice(30, 90))        # the part of SKY measured (clear of its border)


def _noisy(sigma=SIGMA, seed=0):
    import nlref

    clean = nlref.data.camera()
    return clean, nlref.add_gaussian_noise(clean, sigma, seed=seed)


def uncorrected_sweep(factors=FACTORS, *, sigma=SIGMA):
    """PSNR of ``nl_means(crop, sigma=0, h=f * sigma, patch_size=5, search_size=21)`` for each ``f``."""
    import nlref

    clean, noisy = _noisy(sigma)
    return np.array([nlref.psnr(clean[ZONE], nlref.nl_means(noisy[ZONE], sigma=0, h=f * sigma, patch_size=5,
                                                             search_size=21)) for f in factors])


def ex1(answer):
    """The PSNRs (dB) of the h sweep without the 2 sigma^2 correction, one per factor of ``FACTORS``.

    Expected: :func:`uncorrected_sweep`. ``atol=0.01`` dB: the same computation
    in another order differs by far less, a neighbouring h by more than 1 dB.
    """
    if not_answered("ch02 ex1", answer):
        return None
    return check_close("ch02 ex1", answer, uncorrected_sweep(), rtol=0, atol=0.01)


def ex2(answer, *, sigma=SIGMA, h=0.4 * SIGMA, patch=3, search=5):
    """A student's ``patchwise(v, sigma=, h=, patch=, search=)``, patch-wise NL-means of a 2-D image.

    The check calls it on a 12x15 float64 crop of the noisy camera image with these settings,
    then on an 11x9 crop with others (half the ``sigma``, three times the ``h``, patches and
    search window 2 wider), so that a function which reads the notebook's globals, or mixes up
    rows and columns, fails. Each result is compared with ``nl_means(..., aggregation="patch")``
    (equal to the naive specification to about 1e-12 in float64), with ``rtol=1e-9``.
    """
    import nlref

    name = "ch02 ex2"
    if not_answered(name, answer):
        return None
    _, noisy = _noisy()
    cases = [((slice(140, 152), slice(60, 75)), dict(sigma=sigma, h=h, patch=patch, search=search)),
             ((slice(300, 311), slice(200, 209)), dict(sigma=sigma / 2, h=3 * h, patch=patch + 2, search=search + 2))]
    for crop, settings in cases:
        v = np.asarray(noisy[crop], dtype=np.float64)
        ok, mine = call(name, answer, v, **settings)
        if not ok:
            return ok
        expected = nlref.nl_means(v, sigma=settings["sigma"], h=settings["h"], patch_size=settings["patch"],
                                  search_size=settings["search"], aggregation="patch")
        if not check_close(f"{name} ({v.shape[0]}x{v.shape[1]}, {settings})", mine, expected, rtol=1e-9):
            return False
    return _report(name, True)


def flat_gain(*, sigma=SIGMA):
    """``sigma^2 / Var(u_hat - u)`` over the flat sky: the variance reduction NL-means achieves there.

    ``u_hat`` is NL-means of the sky crop with the parameters of section 2
    (``h = 0.4 sigma``, 5x5 patches, 35x35 search window).
    """
    import nlref

    clean, noisy = _noisy(sigma)
    u_hat = nlref.nl_means(noisy[SKY], sigma=sigma, h=0.4 * sigma, patch_size=5, search_size=35)
    return float(sigma**2 / np.var(np.asarray(u_hat - clean[SKY], dtype=np.float64)[INNER]))


def ex3(answer):
    """The measured variance reduction on the flat sky (a number, about 60).

    Expected: :func:`flat_gain`. ``rtol=1e-3`` covers float32 against float64
    variances; N_eff of the flat pixel (about 760) is ten times larger.
    """
    if not_answered("ch02 ex3", answer):
        return None
    return check_close("ch02 ex3", answer, flat_gain(), rtol=1e-3)


def ex4(answer, *, small=11, large=35):
    """How many times more distance maps a 35x35 search window costs than an 11x11 one.

    Expected: the fast method computes one distance map per pair of offsets
    ``+o, -o`` (section 4), ``(s^2 - 1) / 2`` of them, so the ratio is
    ``(35^2 - 1) / (11^2 - 1) = 10.2``. ``rtol=0.01`` also accepts the plain count
    of offsets, ``35^2 / 11^2 = 10.12``; the ratio of widths (3.2) fails.
    """
    if not_answered("ch02 ex4", answer):
        return None
    return check_close("ch02 ex4", answer, (large**2 - 1) / (small**2 - 1), rtol=0.01)


def video_psnrs(*, sigma=SIGMA, seed=4):
    """``(PSNR of space-time NL-means, PSNR of frame-by-frame NL-means)`` on ``nlref.data.video()``."""
    import nlref

    clean = nlref.data.video()
    noisy = nlref.add_gaussian_noise(clean, sigma, seed=seed)
    together = nlref.nl_means(noisy, sigma=sigma)
    frames = np.stack([np.asarray(nlref.nl_means(frame, sigma=sigma)) for frame in noisy])
    return np.array([nlref.psnr(clean, together), nlref.psnr(clean, frames)])


def ex5(answer):
    """``(PSNR in one space-time call, PSNR frame by frame)`` for the noisy video (seed 4).

    Expected: :func:`video_psnrs`. ``atol=0.01`` dB; the two numbers differ by
    about 1 dB, so swapping them fails.
    """
    if not_answered("ch02 ex5", answer):
        return None
    return check_close("ch02 ex5", answer, video_psnrs(), rtol=0, atol=0.01)



def ex6(answer):
    """``pixel_weights(v, p, sigma, h, patch, search)``: the pixel-wise NL-means weights of pixel ``p``.

    Graded (warm-up, about 20 minutes). ``v`` is a 2-D float64 image, ``p`` a (row, col) pair,
    ``patch`` and ``search`` odd widths; the result is the (search, search) array
    ``w(p, p + o) = exp(-max(d^2 - 2 sigma^2, 0) / h^2)`` with the image mirrored at its border
    (NumPy's ``"reflect"``). Compared with :func:`nlref.nl_means_weights` at three pixels of a
    small noisy crop, one in a corner, and once with ``sigma = 0``.
    """
    import nlref

    clean, noisy = _noisy()
    v = np.asarray(noisy[140:172, 60:92], dtype=np.float64)
    cases = [((15, 9), SIGMA, 0.4 * SIGMA, 5, 11), ((0, 0), SIGMA, 0.4 * SIGMA, 3, 7),
             ((31, 20), 0.0, 0.1, 5, 9)]

    def run():
        ok = True
        for p, sigma, h, patch, search in cases:
            got = attempt("ch02 ex6", answer, v, p, sigma, h, patch, search)
            want = nlref.nl_means_weights(v, p, sigma=sigma, h=h, patch_size=patch, search_size=search)
            ok &= compare(f"weights of pixel {p}", got, want, rtol=1e-9, atol=1e-12)
        return ok
    return verdict("ch02 ex6", run)
