"""nlref.crf against a dense CRF written here from Krähenbühl & Koltun (NeurIPS 2011), not from nlref.

The definition, from the paper (Sections 2-3, Algorithm 1): the Gibbs energy is
E(x) = sum_i psi_u(x_i) + sum_{i<j} psi_p(x_i, x_j) with
psi_p(x_i, x_j) = mu(x_i, x_j) [w1 exp(-|p_i - p_j|^2 / (2 theta_a^2) - |I_i - I_j|^2 / (2 theta_b^2))
                                + w2 exp(-|p_i - p_j|^2 / (2 theta_g^2))],
the mean-field update, applied to every pixel at once from the previous marginals,
Q_i(l) = exp(-psi_u(l) - sum_l' mu(l, l') sum_{j != i} k(f_i, f_j) Q_j(l')) / Z_i,
initialised with Q_i(l) = exp(-psi_u(l)) / Z_i, and the Potts model mu(l, l') = [l != l'].
Positions are (row, column) pixel indices.
"""

import itertools
import warnings

import numpy as np
import pytest

from nlref import crf


def _definition(image, unary, mu, *, w1, w2, theta_a, theta_b, theta_g, iterations):
    """Mean-field iterations of the fully connected CRF, pixel by pixel and label by label."""
    h, w = image.shape[:2]
    colours = image.reshape(h * w, -1)
    pos = [(r, c) for r in range(h) for c in range(w)]
    n, n_labels = h * w, unary.shape[0]

    def k(i, j):
        dp = (pos[i][0] - pos[j][0]) ** 2 + (pos[i][1] - pos[j][1]) ** 2
        dI = float(np.sum((colours[i] - colours[j]) ** 2))
        return w1 * np.exp(-dp / (2 * theta_a**2) - dI / (2 * theta_b**2)) + w2 * np.exp(-dp / (2 * theta_g**2))

    kernel = np.array([[k(i, j) for j in range(n)] for i in range(n)])
    q = np.exp(-unary) / np.exp(-unary).sum(axis=0)
    for _ in range(iterations):
        new = np.empty_like(q)
        for i in range(n):
            energy = np.array([unary[lab, i] + sum(mu[lab, lp] * kernel[i, j] * q[lp, j]
                                                    for lp in range(n_labels) for j in range(n) if j != i)
                               for lab in range(n_labels)])
            e = np.exp(-(energy - energy.min()))
            new[:, i] = e / e.sum()
        q = new
    return q


def _nlref(image, unary, mu, *, w1, w2, theta_a, theta_b, theta_g, iterations):
    bil, smooth = crf.crf_features(image, theta_alpha=theta_a, theta_beta=theta_b, theta_gamma=theta_g)
    q = np.exp(-unary) / np.exp(-unary).sum(axis=0)
    for _ in range(iterations):
        q = crf.mean_field_step(q, unary, [(w1, bil), (w2, smooth)], mu)
    return q


SETTINGS = [dict(w1=1.0, w2=1.0, theta_a=2.0, theta_b=0.3, theta_g=1.0),
            dict(w1=10.0, w2=3.0, theta_a=80.0, theta_b=0.05, theta_g=3.0),
            dict(w1=0.5, w2=0.0, theta_a=0.7, theta_b=5.0, theta_g=0.5),
            dict(w1=0.0, w2=2.5, theta_a=1.0, theta_b=1.0, theta_g=4.0),
            dict(w1=-1.0, w2=2.0, theta_a=1.5, theta_b=0.5, theta_g=2.0)]
SHAPES = [(4, 5, 3), (3, 4), (1, 9, 3), (8, 1), (1, 1, 3), (2, 2, 1)]


@pytest.mark.parametrize("setting, shape, labels", [(s, shp, lab) for (s, shp), lab in
                                                    zip(itertools.product(SETTINGS, SHAPES), itertools.cycle([2, 3, 4, 5]))])
def test_iterations_equal_the_papers_definition(setting, shape, labels):
    rng = np.random.default_rng(abs(hash((shape, labels))) % 2**32)
    image = rng.uniform(0, 1, shape)
    n = shape[0] * shape[1]
    unary = 2 * rng.standard_normal((labels, n))
    for mu in (crf.potts(labels), rng.uniform(-1, 2, (labels, labels))):   # Potts and a general, asymmetric mu
        want = _definition(image, unary, mu, iterations=3, **setting)
        got = _nlref(image, unary, mu, iterations=3, **setting)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def test_potts_is_one_off_the_diagonal():
    for labels in (2, 3, 6):
        mu = crf.potts(labels)
        for a, b in itertools.product(range(labels), repeat=2):
            assert mu[a, b] == (1.0 if a != b else 0.0)


def test_the_self_pair_is_left_out():
    """Two pixels, one kernel of weight 1 on equal features: k = 1 for every pair, the self pair included.
    With j != i the message to pixel 0 is Q_1 alone; with j = i it would be Q_0 + Q_1."""
    image = np.zeros((1, 2))
    unary = np.zeros((2, 2))
    q = np.array([[0.9, 0.2], [0.1, 0.8]])
    bil, _ = crf.crf_features(image, theta_alpha=1e9, theta_beta=1.0, theta_gamma=1.0)
    got = crf.mean_field_step(q, unary, [(1.0, bil)], crf.potts(2))
    # pixel 0: energies (mu @ Q_1) = (Q_1(1), Q_1(0)) = (0.8, 0.2)
    e = np.exp(-np.array([0.8, 0.2]))
    np.testing.assert_allclose(got[:, 0], e / e.sum(), rtol=1e-12)


def test_one_label_gives_certainty():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (3, 3, 3))
    got = _nlref(image, rng.standard_normal((1, 9)), np.zeros((1, 1)), iterations=2, **SETTINGS[0])
    np.testing.assert_array_equal(got, np.ones((1, 9)))


def test_one_pixel_has_no_pairs():
    unary = np.array([[0.3], [-1.0], [2.0]])
    got = _nlref(np.full((1, 1, 3), 0.5), unary, crf.potts(3), iterations=2, **SETTINGS[1])
    e = np.exp(-unary)
    np.testing.assert_allclose(got, e / e.sum(), rtol=1e-14)


def test_huge_bandwidths_make_every_kernel_one():
    """theta -> infinity: k(f_i, f_j) -> w1 + w2, the message is (w1 + w2) sum_{j != i} Q_j."""
    rng = np.random.default_rng(2)
    image, unary = rng.uniform(0, 1, (3, 4, 3)), rng.standard_normal((3, 12))
    q = np.exp(-unary) / np.exp(-unary).sum(axis=0)
    mu = crf.potts(3)
    bil, smooth = crf.crf_features(image, theta_alpha=1e12, theta_beta=1e12, theta_gamma=1e12)
    got = crf.mean_field_step(q, unary, [(2.0, bil), (0.5, smooth)], mu)
    message = 2.5 * (q.sum(axis=1, keepdims=True) - q)
    logits = -unary - mu @ message
    np.testing.assert_allclose(got, np.exp(logits) / np.exp(logits).sum(axis=0), rtol=1e-12)


@pytest.mark.parametrize("theta", [1e-3, 1e-6, 1e-8, 1e-100, 1e-200])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tiny_bandwidths_give_the_unaries_or_are_refused(theta, dtype):
    """theta -> 0: every kernel between two pixels is 0, and a step is the softmax of -psi_u. Built from
    dot products, the logits -|f_i - f_j|^2 / 2 lose about eps |f|^2 to rounding: the self pair's weight was
    exp(+-10) instead of 1 at theta = 1e-8 (float64), a step 0.1 to 0.4 off. Either right or a clear refusal."""
    rng = np.random.default_rng(3)
    image, unary = rng.uniform(0, 1, (4, 5, 3)).astype(dtype), rng.standard_normal((3, 20)).astype(dtype)
    q = np.exp(-unary) / np.exp(-unary).sum(axis=0)
    try:
        bil, smooth = crf.crf_features(image, theta_alpha=theta, theta_beta=theta, theta_gamma=theta)
        got = crf.mean_field_step(q, unary, [(1.0, bil), (2.0, smooth)], crf.potts(3).astype(dtype))
    except ValueError as err:
        assert "features" in str(err) and ("theta" in str(err) or "float64" in str(err))
        return
    spread = max(np.max(np.sum((f - f.mean(axis=1, keepdims=True)) ** 2, axis=0)) for f in (bil, smooth))
    tol = 1e-13 + 10 * np.finfo(dtype).eps * spread               # logits off by about eps max|f|^2, weights 1 + 2
    np.testing.assert_allclose(got, np.exp(-unary) / np.exp(-unary).sum(axis=0), rtol=0, atol=tol)
    assert tol < 1e-2                                               # not a vacuous pass: a large spread is refused


def test_a_label_of_probability_zero_is_kept_out():
    """psi_u = +inf (a classifier's probability 0): that label's Q is 0, the others as the definition says."""
    rng = np.random.default_rng(4)
    image, unary = rng.uniform(0, 1, (3, 3, 3)), rng.standard_normal((3, 9))
    unary[0, 4] = np.inf
    setting = SETTINGS[0]
    want = _definition(image, unary, crf.potts(3), iterations=2, **setting)
    got = _nlref(image, unary, crf.potts(3), iterations=2, **setting)
    assert got[0, 4] == 0.0 and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("where, value, match", [
    ("unary_all", np.inf, "at least one label of every pixel"),
    ("unary", np.nan, "NaN or -inf"), ("unary", -np.inf, "NaN or -inf"),
    ("q", np.nan, "q must be finite"), ("compat", np.inf, "compat must be finite"),
    ("features", np.nan, "features must be finite")])
@pytest.mark.parametrize("step", [crf.mean_field_step, crf.mean_field_reference])
def test_undefined_distributions_are_refused(where, value, match, step):
    """+inf for every label of a pixel leaves Z_i = 0; NaN and -inf define no distribution. These gave NaN
    (with a RuntimeWarning in NumPy) instead of an error."""
    rng = np.random.default_rng(5)
    bil, smooth = crf.crf_features(rng.uniform(0, 1, (3, 3, 3)), theta_alpha=2.0, theta_beta=0.5, theta_gamma=1.0)
    unary = rng.standard_normal((3, 9))
    q = np.exp(-unary) / np.exp(-unary).sum(axis=0)
    mu = crf.potts(3)
    if where == "unary_all":
        unary[:, 4] = value
    else:
        {"unary": unary, "q": q, "compat": mu, "features": bil}[where][1, 2] = value
    with pytest.raises(ValueError, match=match):
        step(q, unary, [(1.0, bil), (1.0, smooth)], mu)


def test_no_pixels_no_messages():
    """An empty image: the step (like the loop) returns (L, 0); it warned "Mean of empty slice"."""
    q = np.zeros((2, 0))
    bil, smooth = crf.crf_features(np.zeros((0, 3, 3)), theta_alpha=1.0, theta_beta=1.0, theta_gamma=1.0)
    assert bil.shape == (5, 0) and smooth.shape == (2, 0)
    for step in (crf.mean_field_step, crf.mean_field_reference):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert step(q, q, [(1.0, bil), (1.0, smooth)], crf.potts(2)).shape == (2, 0)


def test_densecrfs_potts_is_the_same_update():
    """DenseCRF 2.x (src/labelcompatibility.cpp) applies PottsCompatibility(w) as -w Q: mu = -w [l = l'].
    It differs from the paper's w [l != l'] by w sum_l' m_i(l'), equal for all labels of a pixel."""
    rng = np.random.default_rng(6)
    image, unary = rng.uniform(0, 1, (4, 4, 3)), rng.standard_normal((4, 16))
    bil, smooth = crf.crf_features(image, theta_alpha=3.0, theta_beta=0.3, theta_gamma=1.0)
    q = np.exp(-unary) / np.exp(-unary).sum(axis=0)
    for w in (0.5, 3.0):
        paper = crf.mean_field_step(q, unary, [(1.0, bil), (0.4, smooth)], w * crf.potts(4))
        released = crf.mean_field_step(q, unary, [(1.0, bil), (0.4, smooth)], -w * np.eye(4))
        np.testing.assert_allclose(released, paper, rtol=1e-12, atol=1e-14)
        assert np.abs(paper - crf.mean_field_step(q, unary, [], w * crf.potts(4))).max() > 1e-3   # not vacuous


def test_refusals_on_every_library(xp, to_xp):
    rng = np.random.default_rng(8)
    image = to_xp(rng.uniform(0, 1, (3, 3, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="finite features in float32"):
        crf.crf_features(image, theta_alpha=1e-50, theta_beta=1.0, theta_gamma=1.0)
    bil, _ = crf.crf_features(to_xp(rng.uniform(0, 1, (3, 3, 3))), theta_alpha=1e-7, theta_beta=1.0,
                              theta_gamma=1.0)
    unary = rng.standard_normal((2, 9))
    q = to_xp(np.exp(-unary) / np.exp(-unary).sum(axis=0))
    with pytest.raises(ValueError, match="larger thetas or float64"):
        crf.mean_field_step(q, to_xp(unary), [(1.0, bil)], to_xp(crf.potts(2)))
    unary[:, 3] = np.inf
    with pytest.raises(ValueError, match="at least one label of every pixel"):
        crf.mean_field_step(q, to_xp(unary), [], to_xp(crf.potts(2)))
