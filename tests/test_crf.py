"""nlref.crf: the dense CRF's mean-field update through the non-local operation equals the loop over pixels."""

import numpy as np
import pytest

from nlref import backend as B
from nlref import crf
from tests.helpers import assert_same_library


def _problem(seed=0, shape=(6, 7), labels=3):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 1, shape + (3,))
    bil, smooth = crf.crf_features(image, theta_alpha=3.0, theta_beta=0.2, theta_gamma=1.5)
    n = shape[0] * shape[1]
    unary = rng.standard_normal((labels, n))
    q = rng.dirichlet(np.ones(labels), size=n).T
    return image, q, unary, [(2.0, bil), (0.7, smooth)], rng.uniform(0, 2, (labels, labels))


def _kernel_matrix(f):
    """exp(-|f_i - f_j|^2 / 2) for every pair, written without the non-local operation."""
    return np.exp(-np.sum((f[:, :, None] - f[:, None, :]) ** 2, axis=0) / 2)


def test_features_are_positions_and_colours_over_the_thetas():
    image = np.arange(2 * 3 * 3, dtype=np.float64).reshape(2, 3, 3)
    bil, smooth = crf.crf_features(image, theta_alpha=2.0, theta_beta=4.0, theta_gamma=0.5)
    i = 1 * 3 + 2                                                  # pixel (row 1, column 2)
    np.testing.assert_array_equal(bil[:, i], [0.5, 1.0, *(image[1, 2] / 4)])
    np.testing.assert_array_equal(smooth[:, i], [2.0, 4.0])
    gray, _ = crf.crf_features(image[..., 0], theta_alpha=1.0, theta_beta=1.0, theta_gamma=1.0)
    assert gray.shape == (3, 6)


def test_gaussian_message_is_the_kernel_sum_without_the_self_term():
    _, q, _, kernels, _ = _problem(1)
    for _, f in kernels:
        k = _kernel_matrix(f)
        np.fill_diagonal(k, 0.0)
        np.testing.assert_allclose(crf.gaussian_message(f, q), q @ k.T, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_step_equals_the_loop(seed):
    _, q, unary, kernels, mu = _problem(seed)
    got = crf.mean_field_step(q, unary, kernels, mu)
    np.testing.assert_allclose(got, crf.mean_field_reference(q, unary, kernels, mu), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.sum(axis=0), 1.0, rtol=0, atol=1e-12)   # a distribution over labels per pixel


def test_reference_matches_the_papers_formula_at_one_pixel():
    """Q_i(l) = exp(-psi_u(l) - sum_l' mu(l, l') sum_m w_m sum_{j != i} k_m(f_i, f_j) Q_j(l')) / Z_i."""
    _, q, unary, kernels, mu = _problem(3, shape=(3, 4), labels=2)
    i = 5
    logits = []
    for lab in range(2):
        s = 0.0
        for lp in range(2):
            for w, f in kernels:
                for j in range(q.shape[1]):
                    if j != i:
                        s += mu[lab, lp] * w * np.exp(-np.sum((f[:, i] - f[:, j]) ** 2) / 2) * q[lp, j]
        logits.append(-unary[lab, i] - s)
    expected = np.exp(logits) / np.sum(np.exp(logits))
    np.testing.assert_allclose(crf.mean_field_reference(q, unary, kernels, mu)[:, i], expected, rtol=1e-12)


def test_zero_weights_give_the_softmax_of_the_unaries():
    _, q, unary, kernels, mu = _problem(4)
    e = np.exp(-unary)
    got = crf.mean_field_step(q, unary, [(0.0, f) for _, f in kernels], mu)
    np.testing.assert_allclose(got, e / e.sum(axis=0), rtol=1e-13)
    np.testing.assert_allclose(crf.mean_field_step(q, unary, [], mu), e / e.sum(axis=0), rtol=1e-13)


def test_potts_smooths_a_noisy_two_region_labelling():
    """Iterated with a Potts model, the update fixes most of the pixels a noisy unary got wrong."""
    rng = np.random.default_rng(5)
    truth = np.zeros((12, 12), dtype=int)
    truth[:, 6:] = 1
    image = truth[..., None] * np.ones(3) + 0.05 * rng.standard_normal((12, 12, 3))
    unary = -(np.eye(2)[truth].reshape(-1, 2).T + rng.standard_normal((2, 144)))   # a noisy classifier's logits
    kernels = list(zip((3.0, 1.0), crf.crf_features(image, theta_alpha=4.0, theta_beta=0.3, theta_gamma=1.0)))
    q = np.exp(-unary) / np.exp(-unary).sum(axis=0)
    before = np.mean(q.argmax(axis=0) != truth.ravel())
    for _ in range(5):
        q = crf.mean_field_step(q, unary, kernels, crf.potts(2))
    after = np.mean(q.argmax(axis=0) != truth.ravel())
    assert before > 0.15 and after < before / 4


def test_backends(xp, to_xp):
    image, q, unary, kernels, mu = _problem(6, shape=(4, 5), labels=2)
    ref = crf.mean_field_reference(q, unary, kernels, mu)
    feats = crf.crf_features(to_xp(image), theta_alpha=3.0, theta_beta=0.2, theta_gamma=1.5)
    for a, (_, f) in zip(feats, kernels):
        np.testing.assert_allclose(B.to_numpy(a), f, rtol=1e-15)
    got = crf.mean_field_step(to_xp(q), to_xp(unary), [(w, a) for (w, _), a in zip(kernels, feats)], to_xp(mu))
    assert_same_library(got, to_xp(q))
    np.testing.assert_allclose(B.to_numpy(got), ref, rtol=1e-10, atol=1e-12)
    assert_same_library(crf.potts(3, like=to_xp(q)), to_xp(q))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_loop_stays_in_the_callers_library(xp, to_xp, dtype):
    """mean_field_reference converted its inputs with numpy.asarray: a PyTorch or array-api-strict problem
    came back as NumPy, and one on another device (array-api-strict's device1, CuPy) failed inside NumPy.
    It now runs in the caller's library and device, in float64 as it did, and equals the NumPy loop."""
    _, q, unary, kernels, mu = _problem(7, shape=(3, 4), labels=3)
    q, unary, mu = (a.astype(dtype) for a in (q, unary, mu))
    kernels = [(w, f.astype(dtype)) for w, f in kernels]
    expected = crf.mean_field_reference(q, unary, kernels, mu)
    got = crf.mean_field_reference(to_xp(q), to_xp(unary), [(w, to_xp(f)) for w, f in kernels], to_xp(mu))
    assert_same_library(got, to_xp(q))
    assert B.dtype_name(got.dtype) == "float64"
    np.testing.assert_allclose(B.to_numpy(got), expected, rtol=1e-12, atol=1e-15)


def test_potts_names_like():
    """potts(3, like=[...]) said "argument 0 must be an array"."""
    with pytest.raises(TypeError, match=r"like must be an array .* got list"):
        crf.potts(3, like=[0.0, 1.0])


def test_the_loop_refuses_mixed_libraries_by_name():
    import array_api_strict as xs

    _, q, unary, kernels, mu = _problem(8, shape=(3, 4), labels=2)
    with pytest.raises(TypeError, match=r"different libraries .*q: array-api-strict, unary: array-api-strict, "
                                        r"compat: numpy"):
        crf.mean_field_reference(B.asarray(q, xp=xs), B.asarray(unary, xp=xs), kernels, mu)


@pytest.mark.parametrize("call, match", [
    (lambda: crf.crf_features(np.zeros((4, 4)), theta_alpha=0.0, theta_beta=1.0, theta_gamma=1.0), "theta_alpha"),
    (lambda: crf.crf_features(np.zeros((4, 4)), theta_alpha=1.0, theta_beta=np.nan, theta_gamma=1.0), "theta_beta"),
    (lambda: crf.crf_features(np.zeros(4), theta_alpha=1.0, theta_beta=1.0, theta_gamma=1.0), "image"),
    (lambda: crf.potts(1), "n_labels"),
    (lambda: crf.gaussian_message(np.zeros((2, 5)), np.zeros((3, 4))), "same N"),
    (lambda: crf.mean_field_step(np.zeros((2, 5)), np.zeros((2, 4)), [], np.zeros((2, 2))), "unary"),
    (lambda: crf.mean_field_step(np.zeros((2, 5)), np.zeros((2, 5)), [], np.zeros((3, 3))), "compat"),
    (lambda: crf.mean_field_step(np.zeros((2, 5)), np.zeros((2, 5)), [(1.0, np.zeros((2, 4)))],
                                 np.zeros((2, 2))), "features"),
    (lambda: crf.mean_field_step(np.zeros((2, 5)), np.zeros((2, 5)), [("1", np.zeros((2, 5)))],
                                 np.zeros((2, 2))), "weight"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_integer_input_raises_type_error():
    with pytest.raises(TypeError, match="features"):
        crf.gaussian_message(np.zeros((2, 5), dtype=int), np.zeros((2, 5)))
    with pytest.raises(TypeError, match="share one dtype"):
        crf.gaussian_message(np.zeros((2, 5), dtype=np.float32), np.zeros((2, 5)))
    q = np.full((2, 5), 0.5)
    with pytest.raises(TypeError, match="share one dtype"):
        crf.mean_field_step(q, q, [(1.0, np.zeros((2, 5), dtype=np.float32))], crf.potts(2))
    with pytest.raises(TypeError, match="kernels must be a sequence"):
        crf.mean_field_step(q, q, 3, crf.potts(2))
    with pytest.raises(ValueError, match=r"\(weight, features\) pair"):
        crf.mean_field_step(q, q, [(1.0,)], crf.potts(2))


def test_numpy_scalars_are_numbers_and_keep_the_dtype():
    """np.float32 / np.int64 thetas, weights and label counts were refused ("must be a positive finite number,
    got np.float32(2.0)"); np.float64 ones (a float subclass) were taken and made float32 features and marginals
    float64."""
    image, q, unary, _, _ = _problem(7, shape=(3, 4), labels=2)
    image, q, unary = (a.astype(np.float32) for a in (image, q, unary))
    for theta in (np.float32(3.0), np.int64(3), np.float64(3.0)):
        bil, smooth = crf.crf_features(image, theta_alpha=theta, theta_beta=theta, theta_gamma=theta)
        assert bil.dtype == smooth.dtype == np.float32
        np.testing.assert_array_equal(bil, crf.crf_features(image, theta_alpha=3.0, theta_beta=3.0,
                                                            theta_gamma=3.0)[0])
    mu = crf.potts(np.int64(2)).astype(np.float32)
    expected = crf.mean_field_step(q, unary, [(2.0, bil)], mu)
    for weight in (np.float32(2.0), np.int64(2), np.float64(2.0)):
        got = crf.mean_field_step(q, unary, [(weight, bil)], mu)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


def test_lists_are_named_not_an_attribute_error():
    q = np.full((2, 3), 0.5)
    with pytest.raises(TypeError, match="image must be an array"):
        crf.crf_features([[0.0, 1.0]], theta_alpha=1.0, theta_beta=1.0, theta_gamma=1.0)
    with pytest.raises(TypeError, match="q must be an array"):
        crf.mean_field_step(q.tolist(), q, [], crf.potts(2))
    with pytest.raises(TypeError, match="features must be an array"):
        crf.gaussian_message([[0.0, 1.0, 2.0]], q)


def test_float32_at_the_papers_settings_is_close_to_the_loop():
    """theta 80 / 13 / 3 on 0..255 colours make |f|^2 about 10^3; the logits' terms cancelled, and a float32
    step was 1.9e-4 off the float64 loop. Centred features (the same distances): 3.7e-5."""
    rng = np.random.default_rng(0)
    image = np.kron(rng.random((3, 3, 3)), np.ones((10, 10, 1))) * 255 + rng.normal(0, 20, (30, 30, 3))
    unary = rng.standard_normal((3, 900))
    q = np.exp(-unary) / np.exp(-unary).sum(axis=0)
    mu = crf.potts(3)

    def step(dtype, fn):
        bil, smooth = crf.crf_features(image.astype(dtype), theta_alpha=80.0, theta_beta=13.0, theta_gamma=3.0)
        return fn(q.astype(dtype), unary.astype(dtype), [(10.0, bil), (3.0, smooth)], mu.astype(dtype))

    loop = step(np.float64, crf.mean_field_reference)
    np.testing.assert_allclose(step(np.float64, crf.mean_field_step), loop, rtol=0, atol=1e-12)
    got = step(np.float32, crf.mean_field_step)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, loop, rtol=0, atol=6e-5)
