"""Inputs users naturally pass to the public API get the natural result or a clear message
(never a raw ``'int' object is not iterable`` or ``'list' object has no attribute 'dtype'``)."""

from __future__ import annotations

import numpy as np
import pytest

import nlref
import nlref.backend as B
from tests.helpers import assert_same_library


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(4).random((16, 16)).astype(np.float32)


@pytest.mark.parametrize("container", [list, tuple])
def test_average_of_a_list_of_copies(xp_cpu, image, container):
    a, b = B.asarray(image, xp=xp_cpu), B.asarray(image[::-1, :] * 0.5, xp=xp_cpu)
    got = nlref.average(container([a, b]))
    assert_same_library(got, a)
    np.testing.assert_allclose(B.to_numpy(got), (image + image[::-1, :] * 0.5) / 2, rtol=1e-6)
    # the same as averaging the stack, along any axis
    stacked = B.asarray(np.stack([image, image[::-1, :] * 0.5], axis=-1), xp=xp_cpu)
    np.testing.assert_array_equal(B.to_numpy(nlref.average(container([a, b]), axis=-1)),
                                  B.to_numpy(nlref.average(stacked, axis=-1)))


def test_average_of_integer_copies_is_float(xp_cpu):
    a = B.asarray(np.array([[0, 2], [4, 6]], dtype=np.uint8), xp=xp_cpu)
    b = B.asarray(np.array([[1, 2], [4, 7]], dtype=np.uint8), xp=xp_cpu)
    got = nlref.average([a, b])
    assert B.dtype_name(got.dtype) == "float32"
    np.testing.assert_array_equal(B.to_numpy(got), [[0.5, 2], [4, 6.5]])


@pytest.mark.parametrize("copies, error, match", [
    ([], ValueError, "empty list"),
    ([np.zeros((2, 2)), np.zeros((3, 2))], ValueError, r"one shape.*\(2, 2\).*\(3, 2\)"),
    ([np.zeros(2, np.float32), np.zeros(2)], TypeError, "one dtype"),
    ([[1.0, 2.0], [3.0, 4.0]], TypeError, r"copies\[0\] must be an array"),
])
def test_average_bad_lists(copies, error, match):
    with pytest.raises(error, match=match):
        nlref.average(copies)


def test_average_bad_axis(image):
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        nlref.average(image, axis=3)
    with pytest.raises(TypeError, match="axis must be an int"):
        nlref.average(image, axis=None)


def test_nl_means_weights_index_forms(image):
    as_tuple = nlref.nl_means_weights(image, (5, 6), sigma=0.1)
    np.testing.assert_array_equal(nlref.nl_means_weights(image, [5, 6], sigma=0.1), as_tuple)
    np.testing.assert_array_equal(nlref.nl_means_weights(image, (np.int64(5), 6), sigma=0.1), as_tuple)
    signal = image[0, :]
    np.testing.assert_array_equal(nlref.nl_means_weights(signal, 7, sigma=0.1),
                                  nlref.nl_means_weights(signal, (7,), sigma=0.1))


@pytest.mark.parametrize("index, error, match", [
    (5, ValueError, r"one coordinate per spatial axis of shape \(16, 16\), e.g. \(row, col\); got the single int 5"),
    ((5.5, 2), TypeError, r"index must be \(row, col\)"),
    ("5, 5", TypeError, r"index must be \(row, col\)"),
    ((5, 16), ValueError, "in-range coordinate"),
    ((1, 2, 3), ValueError, "one in-range coordinate per spatial axis"),
])
def test_nl_means_weights_bad_index(image, index, error, match):
    with pytest.raises(error, match=match):
        nlref.nl_means_weights(image, index, sigma=0.1)


def test_averaging_curve_counts(image):
    assert len(nlref.averaging_curve(image, 0.1, (1, 2), seed=0)) == 2
    assert nlref.averaging_curve(image, 0.1, range(1, 3), seed=0) == nlref.averaging_curve(image, 0.1, [1, 2], seed=0)
    with pytest.raises(TypeError, match=r"counts must be a sequence of positive ints .*got 4"):
        nlref.averaging_curve(image, 0.1, 4)
    with pytest.raises(ValueError, match=r"counts must be positive ints; got \[1.5\]"):
        nlref.averaging_curve(image, 0.1, [1.5])


def test_psnr_data_range_is_checked(image):
    assert nlref.psnr(image, image * 0.9, data_range=1) == nlref.psnr(image, image * 0.9)
    for bad in ([1], 0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="data_range must be a positive number"):
            nlref.psnr(image, image * 0.9, data_range=bad)


def test_gradchecks_name_a_list_input():
    with pytest.raises(TypeError, match=r"x must be an array .* got list"):
        nlref.gradcheck(lambda x: x * 2, lambda d: {"x": 2 * d}, {"x": [1.0, 2.0]})
    block = nlref.NonLocalBlock(2, dims=1, dtype="float64")
    with pytest.raises(TypeError, match=r"x must be an array .* got list"):
        nlref.layer_gradcheck(block, np.zeros((1, 2, 4)).tolist())
