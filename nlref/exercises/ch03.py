"""Checks for the exercises of chapter 3, the non-local operation.

The chapter's setup: a 33x33 crop of the camera image (rows 134-166, columns
54-86) with noise ``sigma = 0.08`` (seed 0), 5x5 patches, ``h = 0.4 sigma``; and
the 32x32 feature map of section 4 with its random embeddings (seed 0).
"""

from __future__ import annotations

import numpy as np

from . import _got, _host, _report, check_close, check_true, not_answered
from ._graded import Wrong, attempt, compare, verdict
from ._student import call

__all__ = ["LEVELS", "GRADED", "ex1", "ex2", "ex3", "ex4", "ex5", "patch_vectors", "feature_map", "dot_output_ratio"]

#: Each exercise's level and time estimate in minutes (the teachers' page and the syllabus use them).
LEVELS = {"ex1": ("core", 30), "ex2": ("core", 25), "ex3": ("core", 20), "ex4": ("stretch", 40),
          "ex5": ("core", 30)}
#: The graded implementation exercises of this chapter (the others' checks take values).
GRADED = ("ex5",)

SIGMA, K = 0.08, 5
H_FILTER = 0.4 * SIGMA


def patch_vectors():
    """``(P, v)``: the (N, k^2) patch vectors of section 1 (row i = the patch of pixel i) and the noisy crop."""
    import nlref

    clean = nlref.data.camera().astype(np.float64)
    v = nlref.add_gaussian_noise(clean[134:167, 54:87], SIGMA, seed=0)
    pad = np.pad(v, K // 2, mode="reflect")
    P = np.lib.stride_tricks.sliding_window_view(pad, (K, K)).reshape(v.size, K * K)
    return P, v


def ex1(answer):
    """The missing factor of section 3, as its logarithm: one number per key j, shape (N,).

    The ``gaussian`` mode on the features ``sqrt(2) P / (k h)`` has logits
    ``2 P_i . P_j / (k h)^2``; NL-means at ``sigma = 0`` has ``-|P_i - P_j|^2 / (k h)^2``.
    Adding ``log m_j`` to every row must turn the first into the second up to a
    constant per row, that is ``log m_j = -|P_j|^2 / (k h)^2 + c``. The check accepts
    any constant ``c`` (a softmax ignores it): the spread of ``answer + |P_j|^2 / (k h)^2``
    must be below ``1e-9`` of the size of the logits (float64 rounding).
    """
    name = "ch03 ex1"
    if not_answered(name, answer):
        return None
    P, _ = patch_vectors()
    try:
        a = _host(answer)  # real numbers only: np.asarray(..., float64) read a list of str as numbers
    except (TypeError, ValueError) as why:
        return _report(name, False, f"expected an array of ({len(P)},) real numbers, {_got(why)}")
    if a.shape != (len(P),):
        return _report(name, False, f"shape {a.shape}, expected ({len(P)},): one number per key")
    if not np.all(np.isfinite(a)):
        return _report(name, False, "the answer holds NaN or infinity")
    target = -np.sum(P**2, axis=1) / (K * H_FILTER) ** 2
    spread = float(np.ptp(a - target))
    return check_true(name, answer, spread <= 1e-9 * np.abs(target).max(),
                      f"answer - (-|P_j|^2 / (k h)^2) varies by {spread:.3g} over j (it must be a constant)")


def ex2(answer, *, seed=0):
    """A student's ``euclid_attention(x)``: ``(B, d, N) -> (B, N, N)``, rows ``exp(-|x_i - x_j|^2)`` normalised.

    The check calls it on random features of shape (2, 3, 7) and compares with
    nlref's embedded Gaussian with the hand-made embedding of section 3,
    ``theta = [2 x; 1]``, ``phi = [x; -|x|^2]`` (``rtol=1e-9``, ``atol=1e-12``).
    """
    from ..nn.nonlocal_op import attention_map

    name = "ch03 ex2"
    if not_answered(name, answer):
        return None
    x = np.random.default_rng(seed).standard_normal((2, 3, 7))
    ok, mine = call(name, answer, x)
    if not ok:
        return ok
    ones = np.ones((2, 1, 7))
    expected = attention_map(np.concatenate([2 * x, ones], axis=1),
                             np.concatenate([x, -np.sum(x**2, axis=1, keepdims=True)], axis=1),
                             mode="embedded_gaussian")
    return check_close(name, mine, expected, rtol=1e-9, atol=1e-12)


def feature_map(shrink=16):
    """The feature map of section 4 built from the camera image shrunk by ``shrink``: ``(x, img)``.

    ``x`` has shape (1, 5, 512 / shrink, 512 / shrink) (intensity, d/dx, d/dy,
    ``|gradient|``, 3x3 blur, each standardised), ``img`` is the thumbnail.
    """
    import nlref

    n = 512 // shrink
    img = nlref.data.camera().astype(np.float64).reshape(n, shrink, n, shrink).mean(axis=(1, 3))
    gy, gx = np.gradient(img)
    p1 = np.pad(img, 1, mode="reflect")
    blur = sum(p1[a:a + n, b:b + n] for a in range(3) for b in range(3)) / 9
    feats = np.stack([img, gx, gy, np.hypot(gx, gy), blur])
    feats = (feats - feats.mean(axis=(1, 2), keepdims=True)) / feats.std(axis=(1, 2), keepdims=True)
    return feats[None], img


def dot_output_ratio():
    """``mean |y|`` of the dot-product operation on the 64x64 feature map over that on the 32x32 one."""
    from ..nn.functional import conv1x1_forward
    from ..nn.nonlocal_op import nonlocal_forward

    rng = np.random.default_rng(0)          # the chapter's embeddings: the same draws in the same order
    w_theta, b_theta = rng.standard_normal((4, 5)) / np.sqrt(5), rng.standard_normal(4)
    w_phi, b_phi = rng.standard_normal((4, 5)) / np.sqrt(5), rng.standard_normal(4)
    sizes = []
    for shrink in (16, 8):
        x, img = feature_map(shrink)
        n = x.shape[-1] ** 2
        theta = conv1x1_forward(x, w_theta, b_theta)[0].reshape(1, 4, n)
        phi = conv1x1_forward(x, w_phi, b_phi)[0].reshape(1, 4, n)
        y, _ = nonlocal_forward(theta, phi, img.reshape(1, 1, n), mode="dot_product")
        sizes.append(float(np.mean(np.abs(y))))
    return sizes[1] / sizes[0]


def ex3(answer):
    """``mean |y|`` on the 64x64 map divided by ``mean |y|`` on the 32x32 map (dot product, C(x) = N).

    Expected: :func:`dot_output_ratio`, with the chapter's embeddings.
    ``rtol=1e-6``: the same float64 computation in another order.
    """
    if not_answered("ch03 ex3", answer):
        return None
    return check_close("ch03 ex3", answer, dot_output_ratio(), rtol=1e-6)


def ex4(answer, *, shape=(8, 56, 56), itemsize=4):
    """The bytes of one full float32 N x N attention matrix for an 8 x 56 x 56 video feature map.

    Expected: ``4 N^2`` with ``N = 8 * 56 * 56 = 25088`` (about 2.3 GiB), exactly
    (an integer; ``rtol=1e-9``). A count of entries (without the 4 bytes) or of
    one frame fails.
    """
    if not_answered("ch03 ex4", answer):
        return None
    n = int(np.prod(shape))
    return check_close("ch03 ex4", answer, itemsize * n * n, rtol=1e-9)


def crf_problem(seed, n_labels=3, n=12):
    """``(q, unary, kernel, mu, expected)``: a random dense-CRF update for :func:`ex5`.

    The kernel is ``1.5 exp(-|a_i - a_j|^2 / 2) + 0.5 exp(-|b_i - b_j|^2 / 2)`` on random
    features (its diagonal is 2, not 0); ``mu`` is random (not Potts), and ``expected``
    is :func:`nlref.crf.mean_field_reference`.
    """
    from ..crf import mean_field_reference

    rng = np.random.default_rng(seed)
    fa, fb = rng.standard_normal((4, n)), rng.standard_normal((2, n))
    kernel = sum(w * np.exp(-np.sum((f[:, :, None] - f[:, None, :]) ** 2, axis=0) / 2)
                 for w, f in ((1.5, fa), (0.5, fb)))
    unary = rng.standard_normal((n_labels, n))
    q = rng.dirichlet(np.ones(n_labels), size=n).T
    mu = rng.uniform(0, 2, (n_labels, n_labels))
    return q, unary, kernel, mu, mean_field_reference(q, unary, [(1.5, fa), (0.5, fb)], mu)


def ex5(answer):
    """``mean_field_update(q, unary, kernel, mu)``: one mean-field update of a dense CRF, shape (L, N).

    Graded (core, about 30 minutes): ``q`` and ``unary`` (L, N), ``kernel`` the (N, N)
    matrix ``sum_m w_m k_m(f_i, f_j)`` *with* its diagonal, ``mu`` (L, L). Expected:
    ``Q_i(l) = softmax_l(-unary_i(l) - sum_l' mu(l, l') sum_{j != i} kernel_ij q_j(l'))``,
    compared with :func:`nlref.crf.mean_field_reference` on two random problems (3 labels
    and 2 labels, 12 pixels) with ``rtol=1e-7, atol=1e-9``. Keeping ``j = i``, forgetting
    ``mu`` or normalising over the pixels instead of the labels fails.
    """
    def run():
        ok = True
        for seed, labels in ((30, 3), (31, 2)):
            q, unary, kernel, mu, want = crf_problem(seed, labels)
            got = attempt("ch03 ex5", answer, q, unary, kernel, mu)
            if got is None:
                raise Wrong("your function returned None (return the new marginals)")
            ok &= compare(f"Q, {labels} labels (vs nlref)", got, want)
        return ok
    return verdict("ch03 ex5", run)
