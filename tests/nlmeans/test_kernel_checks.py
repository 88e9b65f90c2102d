"""The channel-first kernels (``naive.nl_means_naive``, ``naive.patch_weights``, ``fast.nl_means_fast``) are
public and documented; they check their arguments as ``nl_means`` does. Before, ``h=0`` gave NaN, an even
patch width was silently made odd, ``aggregation="pixels"`` ran patch-wise, an index outside the image gave
NaN weights, a negative one the weights of another pixel, and an integer image was computed in its integers.
The index is checked as ``nl_means_weights`` checks it (in range, no wrapping)."""

import numpy as np
import pytest

from nlref.nlmeans import fast, naive

V = np.random.default_rng(0).random((2, 6, 7))
GOOD = dict(h=0.3, sigma=0.1, patch_size=(3, 3), search_size=(5, 5))
KERNELS = [naive.nl_means_naive, fast.nl_means_fast]


@pytest.mark.parametrize("kernel", KERNELS, ids=["naive", "fast"])
@pytest.mark.parametrize("change,error,match", [
    (dict(h=0), ValueError, "h must be finite and > 0"),
    (dict(h=float("inf")), ValueError, "h must be finite and > 0"),
    (dict(sigma=-0.1), ValueError, "sigma must be finite and >= 0"),
    (dict(sigma="0.1"), TypeError, "sigma must be a real number"),
    (dict(patch_size=(2, 3)), ValueError, "patch_size=.*sizes are full odd widths"),
    (dict(search_size=(5,)), ValueError, "search_size=.*one size per spatial axis"),
    (dict(aggregation="pixels"), ValueError, r"aggregation must be one of \('pixel', 'patch'\)"),
], ids=["h0", "hinf", "sigma-negative", "sigma-str", "patch-even", "search-length", "aggregation"])
def test_bad_arguments_are_named(kernel, change, error, match):
    with pytest.raises(error, match=match):
        kernel(V, **{**GOOD, **change})


@pytest.mark.parametrize("kernel", KERNELS, ids=["naive", "fast"])
@pytest.mark.parametrize("v,error,match", [
    (V.astype(np.int64), TypeError, "v must be a float32 or float64 array"),
    (V[0, 0], ValueError, r"v must be channel-first"),
    (V[:, :0], ValueError, r"v must be channel-first"),
    (np.ma.masked_array(V), TypeError, "masked"),
], ids=["int", "1-d", "empty", "masked"])
def test_bad_images_are_named(kernel, v, error, match):
    with pytest.raises(error, match=match):
        kernel(v, **GOOD)


@pytest.mark.parametrize("index,error,match", [
    ((6, 0), ValueError, r"index must give one in-range coordinate per spatial axis of shape \(6, 7\)"),
    ((0, 7), ValueError, "in-range coordinate"),
    ((-1, -2), ValueError, "in-range coordinate"),  # no index wraps, as in nl_means_weights
    ((0,), ValueError, "in-range coordinate"),
    (3, ValueError, "got the single int 3"),
    ((1.0, 2), TypeError, r"index must be \(row, col\)"),
    ((True, 1), TypeError, r"index must be \(row, col\)"),
    ("ab", TypeError, r"index must be \(row, col\)"),
])
def test_patch_weights_refuses_an_index_outside_the_image(index, error, match):
    """An index outside the image gave NaN weights, a negative one the weights of another pixel; the check
    is nl_means_weights' own (checks.pixel_index)."""
    with pytest.raises(error, match=match):
        naive.patch_weights(V, index, **GOOD)


def test_right_arguments_give_what_they_gave():
    """An int size means that width on every axis; the kernels still agree with each other."""
    np.testing.assert_array_equal(naive.nl_means_naive(V, **{**GOOD, "patch_size": 3, "search_size": 5}),
                                  naive.nl_means_naive(V, **GOOD))
    np.testing.assert_allclose(fast.nl_means_fast(V, **GOOD), naive.nl_means_naive(V, **GOOD), rtol=1e-12)
