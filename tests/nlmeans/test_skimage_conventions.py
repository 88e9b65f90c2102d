"""What docs/nlmeans.md says about scikit-image's ``denoise_nl_means``, checked against scikit-image itself.

Read from ``skimage/restoration/_nl_means_denoising.pyx`` (scikit-image, commit
006d7452ed43ec84e2e703b2b02d51b6bd4b8655) and tested here on the installed package:

* ``patch_distance`` is a radius (``d`` searches (2d + 1) x (2d + 1) offsets) and the fast mode
  pads with NumPy's ``"reflect"``: in the limit of a huge ``h`` (every weight 1) its output is the
  (2d + 1)^2 box mean of the reflect-padded image, which is also nlref's with ``search_size=2d + 1``.
  The slow mode instead clips the search window at the image border.
* The fast mode's patch distance is not nlref's: its integral-image box
  (``integral[r + o, c + o] + integral[r - o, c - o] - ...``, o = s // 2) sums (s - 1) x (s - 1)
  squared differences, rows and columns r - o + 1 .. r + o, and divides by s^2, after
  subtracting 2 sigma^2 from each; weights below exp(-5) (``DISTANCE_CUTOFF``) are dropped and
  ``fast_exp`` approximates exp. nlref's patch is the full s x s mean. So equal ``h`` and
  ``sigma`` do not give equal results, and the benchmark gives each its own best h.
"""

import warnings

import numpy as np
import pytest

import nlref

restoration = pytest.importorskip("skimage.restoration")


def _box_mean(image, d):
    pad = np.pad(image, d, mode="reflect")
    return np.lib.stride_tricks.sliding_window_view(pad, (2 * d + 1, 2 * d + 1)).mean(axis=(-2, -1))


@pytest.mark.parametrize("d,s", [(1, 3), (2, 5), (4, 3)])
def test_search_radius_and_border_reflection_match_skimage_fast_mode(d, s):
    image = np.random.default_rng(d).random((20, 23))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nlref warns that such an h blurs the image flat
        ours = nlref.nl_means(image, h=1e4, patch_size=s, search_size=2 * d + 1)
    fast = restoration.denoise_nl_means(image, patch_size=s, patch_distance=d, h=1e4, fast_mode=True)
    slow = restoration.denoise_nl_means(image, patch_size=s, patch_distance=d, h=1e4, fast_mode=False)
    box = _box_mean(image, d)
    np.testing.assert_allclose(fast, box, atol=1e-12)  # the fast mode at h -> infinity: the reflect box
    np.testing.assert_allclose(ours, fast, atol=1e-8)  # exp(-d^2 / h^2) is 1 - O(1e-9), not 1
    assert np.abs(slow - box).max() > 1e-2  # the slow mode clips its search window at the border
    inner = (slice(d, -d), slice(d, -d))
    np.testing.assert_allclose(slow[inner], box[inner], atol=1e-12)


def _skimage_fast_model(image, s, d, h, sigma, rows):
    """Weighted mean with the patch distance summed over ``rows`` x ``rows`` offsets around a pixel, / s^2."""
    pad_width = d + s // 2 + 1
    pad = np.pad(image, pad_width, mode="reflect")
    height, width = image.shape
    num, den = np.zeros(image.shape), np.zeros(image.shape)
    for dy in range(-d, d + 1):
        for dx in range(-d, d + 1):
            shifted = np.roll(pad, (-dy, -dx), axis=(0, 1))
            diff = (pad - shifted) ** 2 - 2 * sigma ** 2
            total = sum(diff[pad_width + a:pad_width + a + height, pad_width + b:pad_width + b + width]
                        for a in rows for b in rows)
            dist = np.maximum(total, 0) / (s * s * h * h)
            weight = np.where(dist > 5.0, 0.0, np.exp(-dist))
            num += weight * shifted[pad_width:pad_width + height, pad_width:pad_width + width]
            den += weight
    return num / den


def test_skimage_fast_mode_sums_an_s_minus_1_box_over_s_squared():
    rng = np.random.default_rng(0)
    image = np.clip(np.linspace(0, 1, 24)[None, :] + 0.1 * rng.standard_normal((20, 24)), 0, 1)
    s, d, h, sigma = 5, 3, 0.15, 0.1
    o = s // 2
    fast = restoration.denoise_nl_means(image, patch_size=s, patch_distance=d, h=h, sigma=sigma, fast_mode=True)
    ours = nlref.nl_means(image, patch_size=s, search_size=2 * d + 1, h=h, sigma=sigma)
    shrunk = _skimage_fast_model(image, s, d, h, sigma, range(-o + 1, o + 1))
    full = _skimage_fast_model(image, s, d, h, sigma, range(-o, o + 1))
    np.testing.assert_allclose(full, ours, atol=1e-12)  # the full s x s box is nlref's definition
    assert np.abs(shrunk - fast).max() < 5e-3  # fast_exp's approximation
    assert np.abs(full - fast).max() > 5 * np.abs(shrunk - fast).max()


def _sk(image, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return restoration.denoise_nl_means(image, **kwargs)


def test_inputs_scikit_image_runs_and_nlref_refuses_by_design():
    """The rows of docs/nlmeans.md's "Inputs the two treat differently": what scikit-image does with each
    (it runs them), and that nlref refuses them with an error naming the argument."""
    rng = np.random.default_rng(0)
    image = rng.random((20, 22))
    kw = dict(patch_size=3, patch_distance=2)
    nl = dict(patch_size=3, search_size=5)
    # a singleton axis: scikit-image drops it, nlref keeps the shape or refuses a patch wider than the axis
    assert _sk(image[:1], h=0.1, **kw).shape == (22,)
    assert nlref.nl_means(image[:1], h=0.1, patch_size=(1, 3), search_size=(1, 5)).shape == (1, 22)
    with pytest.raises(ValueError, match=r"patch_size=\(3, 3\) is larger than the image along spatial axis 0"):
        nlref.nl_means(image[:1], h=0.1, **nl)
    # a NaN or an inf pixel: scikit-image spreads it over its neighbourhood
    bad = image.copy()
    bad[5, 5] = np.nan
    assert np.isnan(_sk(bad, h=0.1, **kw)).sum() > 1
    with pytest.raises(ValueError, match="image contains NaN or Inf"):
        nlref.nl_means(bad, h=0.1, **nl)
    # h = 0 or negative, sigma negative or NaN: scikit-image computes something
    for args in (dict(h=0.0), dict(h=-1.0), dict(h=0.1, sigma=-1.0), dict(h=0.1, sigma=float("nan"))):
        assert np.isfinite(_sk(image, **kw, **args)).all()
        with pytest.raises(ValueError, match=r"(h|sigma) must be finite and"):
            nlref.nl_means(image, **nl, **args)
    # a patch wider than the image
    assert _sk(image[:3, :3], h=0.1, patch_size=5, patch_distance=2).shape == (3, 3)
    with pytest.raises(ValueError, match=r"patch_size=\(5, 5\) is larger than the image"):
        nlref.nl_means(image[:3, :3], h=0.1, patch_size=5, search_size=5)
    # an even or non-positive patch: scikit-image runs it
    assert _sk(image, h=0.1, patch_size=4, patch_distance=2).shape == image.shape
    with pytest.raises(ValueError, match="patch_size=4: sizes are full odd widths"):
        nlref.nl_means(image, h=0.1, patch_size=4, search_size=5)
    # a masked array: scikit-image denoises the values under the mask and returns a plain array
    masked = np.ma.masked_array(image, mask=image > 0.9)
    assert not isinstance(_sk(masked, h=0.1, **kw), np.ma.MaskedArray)
    with pytest.raises(TypeError, match="image is a NumPy masked array"):
        nlref.nl_means(masked, h=0.1, **nl)


def test_inputs_nlref_runs_and_scikit_image_refuses():
    """Big-endian arrays, 1-D signals and per-axis sizes: nlref takes them (the big-endian result equal to the
    native one), scikit-image raises."""
    rng = np.random.default_rng(1)
    image = rng.random((20, 22))
    with pytest.raises(ValueError, match="Big-endian buffer not supported"):
        _sk(image.astype(">f8"), h=0.1, patch_size=3, patch_distance=2)
    big = nlref.nl_means(image.astype(">f8"), h=0.1, patch_size=3, search_size=5)
    np.testing.assert_array_equal(big, nlref.nl_means(image, h=0.1, patch_size=3, search_size=5))
    with pytest.raises(NotImplementedError):
        _sk(image[0], h=0.1, patch_size=3, patch_distance=2)
    assert nlref.nl_means(image[0], h=0.1, patch_size=3, search_size=5).shape == (22,)
    with pytest.raises(TypeError):
        _sk(image, h=0.1, patch_size=(3, 5), patch_distance=2)
    with pytest.raises(TypeError):
        _sk(image.astype(np.longdouble), h=0.1, patch_size=3, patch_distance=2)
    assert nlref.nl_means(image.astype(np.longdouble), h=0.1, patch_size=3, search_size=5).dtype == np.longdouble
