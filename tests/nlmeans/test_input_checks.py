"""Issue 18, the Python API: units mix-ups, a missing or misplaced channel_axis, and dtypes that are not
real numbers get nlref's own message, naming the likely cause and the way out."""

import re
import warnings

import numpy as np
import pytest

import nlref
import nlref.backend as B


@pytest.fixture(scope="module")
def camera_noisy():
    clean = nlref.data.camera()[100:164, 200:264]
    return clean, nlref.add_gaussian_noise(clean, 20 / 255, seed=0)


def _no_warning(f):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return f()


def test_sigma_in_grey_levels_on_a_0_1_image_warns(xp_cpu, camera_noisy):
    clean, noisy = camera_noisy
    x = B.asarray(noisy, xp=xp_cpu)
    with pytest.warns(UserWarning, match=r"sigma=20 is larger than the whole value range of the image \(float values within \[-4, 4\], read as 0\.\.1\).* pass sigma=0\.07843"):
        flat = nlref.nl_means(x, sigma=20)
    # the warning is right: the result is worse than the noisy input
    assert nlref.psnr(clean, B.to_numpy(flat)) < nlref.psnr(clean, noisy)
    good = _no_warning(lambda: nlref.nl_means(x, sigma=20 / 255, search_size=7))
    assert nlref.psnr(clean, B.to_numpy(good)) > nlref.psnr(clean, noisy) + 3


def test_h_in_grey_levels_and_resolve_parameters_warn_too(camera_noisy):
    _, noisy = camera_noisy
    with pytest.warns(UserWarning, match=r"h=10 is larger than the whole value range"):
        nlref.nl_means(noisy, h=10, search_size=5)
    with pytest.warns(UserWarning, match="sigma=20 is larger"):
        nlref.resolve_parameters(noisy, sigma=20)
    with pytest.warns(UserWarning, match="sigma=20 is larger"):
        nlref.nl_means_weights(noisy, (10, 10), sigma=20, search_size=5)


def test_sigma_in_0_1_units_on_an_8_bit_image_warns(camera_noisy):
    clean, noisy = camera_noisy
    u8 = np.clip(np.round(noisy * 255), 0, 255).astype(np.uint8)
    with pytest.warns(UserWarning, match=r"sigma=0\.07843 is less than half a unit .*uint8, 0\.\.255.* pass sigma=20"):
        same = nlref.nl_means(u8, sigma=20 / 255, search_size=7)
    assert np.abs(same.astype(int) - u8).max() <= 1          # the warning is right: nothing was denoised
    _no_warning(lambda: nlref.nl_means(u8, sigma=20, search_size=7))


def test_the_warning_points_at_the_callers_line(camera_noisy):
    _, noisy = camera_noisy
    with pytest.warns(UserWarning) as record:
        nlref.nl_means(noisy, sigma=20, search_size=3)
    assert record[0].filename == __file__


def test_estimated_and_plausible_parameters_do_not_warn(camera_noisy):
    _, noisy = camera_noisy
    _no_warning(lambda: nlref.nl_means(noisy, search_size=5))
    _no_warning(lambda: nlref.nl_means(noisy, sigma=0.5, search_size=5))     # heavy noise is allowed
    _no_warning(lambda: nlref.nl_means(noisy * 255, sigma=20, search_size=5))  # float image in grey levels
    _no_warning(lambda: nlref.nl_means(noisy[:8, :8] * 0.01, sigma=0.05, search_size=3))  # a flat crop
    with pytest.warns(UserWarning, match=r"sigma=2 is larger than the whole value range of the image \(data_range=1\)"):
        nlref.nl_means(noisy * 255, sigma=2, data_range=1, search_size=3)


@pytest.mark.parametrize("channels", [3, 4])
def test_colour_array_without_channel_axis_warns(channels):
    rgb = nlref.data.astronaut()[:32, :32]
    image = np.concatenate([rgb, np.ones((32, 32, 1), np.float32)], axis=-1) if channels == 4 else rgb
    with pytest.warns(UserWarning, match=rf"shape \(32, 32, {channels}\) and no channel_axis.*pass channel_axis=-1"):
        nlref.nl_means(image, sigma=0.05, search_size=3)
    _no_warning(lambda: nlref.nl_means(image, sigma=0.05, search_size=3, channel_axis=-1))
    # a volume with its short axis first is what the warning advises for volumes
    _no_warning(lambda: nlref.nl_means(np.moveaxis(image, -1, 0), sigma=0.05, search_size=3))


def test_colour_video_without_channel_axis_warns():
    clip = np.random.default_rng(0).random((5, 20, 20, 3)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"shape \(5, 20, 20, 3\) and no channel_axis"):
        nlref.nl_means(clip, sigma=0.1, patch_size=1, search_size=3)


def test_channel_axis_on_a_long_axis_warns():
    grey = nlref.data.camera()[:40, :48]
    with pytest.warns(UserWarning, match=r"channel_axis=-1 on a 2-D array of shape \(40, 48\) makes it 48 channels"):
        nlref.nl_means(grey, sigma=0.05, search_size=3, channel_axis=-1)
    first = np.moveaxis(nlref.data.astronaut()[:24, :24], -1, 0)          # (3, 24, 24), channels first
    with pytest.warns(UserWarning, match=r"channel_axis=-1 gives 24 channels .* did you mean channel_axis=0"):
        nlref.nl_means(first, sigma=0.05, search_size=3, channel_axis=-1)
    _no_warning(lambda: nlref.nl_means(first, sigma=0.05, search_size=3, channel_axis=0))
    signal = np.random.default_rng(1).random((200, 3))                      # a 1-D signal with 3 channels
    _no_warning(lambda: nlref.nl_means(signal, sigma=0.1, search_size=5, channel_axis=-1))


@pytest.mark.parametrize("dtype, advice", [(object, "object arrays often come from lists"),
                                           (complex, "real and imaginary parts"),
                                           (bool, r"image\.astype\(float\)"),
                                           ("U1", r"numpy\.asarray\(image, dtype=float\)"),
                                           ("datetime64[s]", r"convert it first, e\.g\. numpy\.asarray")])
def test_non_real_dtypes_get_nlrefs_own_error(dtype, advice):
    image = np.zeros((8, 8), dtype=dtype)
    for call in (lambda: nlref.nl_means(image, sigma=0.1), lambda: nlref.estimate_sigma(image),
                 lambda: nlref.resolve_parameters(image, sigma=0.1)):
        with pytest.raises(TypeError, match=rf"image must hold real numbers .* got dtype {re.escape(str(np.dtype(dtype)))}.*{advice}"):
            call()


def test_non_real_dtypes_on_array_api_strict():
    import array_api_strict as xs

    for dtype in (xs.bool, xs.complex64):
        with pytest.raises(TypeError, match="image must hold real numbers"):
            nlref.nl_means(xs.zeros((8, 8), dtype=dtype), sigma=0.1)


def test_noise_in_the_wrong_units_warns():
    camera = nlref.data.camera()[:32, :32]
    with pytest.warns(UserWarning, match=r"sigma=20 on an image whose values lie within \[-4, 4\]") as record:
        nlref.add_gaussian_noise(camera, 20, seed=0)
    assert record[0].filename == __file__
    u8 = (camera * 255).astype(np.uint8)
    with pytest.warns(UserWarning, match=r"less than half a unit; .* is sigma=20, not 20/255") as record:
        nlref.noisy_copies(u8, 20 / 255, 2, seed=0)
    assert record[0].filename == __file__
    _no_warning(lambda: nlref.add_gaussian_noise(camera, 20 / 255, seed=0))
    _no_warning(lambda: nlref.noisy_copies(u8, 20, 2, seed=0))


def test_psnr_of_images_in_different_units_warns():
    camera = nlref.data.camera()[:32, :32]
    u8 = (camera * 255).round().astype(np.uint8)
    with pytest.warns(UserWarning, match=r"different units \(0\.\.255 and 0\.\.1\)"):
        nlref.psnr(u8, camera)
    with pytest.warns(UserWarning, match="different units"):
        nlref.psnr(camera, u8.astype(np.float32))
    assert _no_warning(lambda: nlref.psnr(u8, u8)) == np.inf
    _no_warning(lambda: nlref.psnr(camera, camera * 0.9))
    _no_warning(lambda: nlref.psnr(camera, camera * 255, data_range=255))   # an explicit range: the caller knows


@pytest.mark.parametrize("route", ["memory", "dask"])
@pytest.mark.parametrize("channel_axis, error, message", [
    (5, ValueError, "channel_axis=5 is out of range"), (1.0, TypeError, "channel_axis must be an int or None"),
    ("x", TypeError, "channel_axis must be an int or None"), (True, TypeError, "channel_axis must be an int or None"),
])
def test_estimate_sigma_checks_channel_axis_as_nl_means_does(route, channel_axis, error, message):
    """The in-memory estimate took True as 1 and let NumPy raise AxisError or 'float is not iterable'."""
    image = np.random.default_rng(0).random((16, 16))
    if route == "dask":
        image = pytest.importorskip("dask.array").from_array(image, chunks=8)
    with pytest.raises(error, match=message):
        nlref.estimate_sigma(image, channel_axis=channel_axis)


@pytest.mark.parametrize("route", ["memory", "dask"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_estimate_sigma_refuses_nan_and_inf_like_nl_means(route, value):
    """It returned nan or inf (in memory) and raised an IndexError from the histogram median (Dask)."""
    image = np.random.default_rng(0).random((16, 16))
    image[3, 3] = value
    if route == "dask":
        image = pytest.importorskip("dask.array").from_array(image, chunks=8)
    with pytest.raises(ValueError, match="image contains NaN or Inf values"):
        nlref.estimate_sigma(image)


def test_estimate_sigma_refuses_an_empty_image():
    for shape, axis in (((0, 9), None), ((4, 4, 0), -1)):
        with pytest.raises(ValueError, match=r"image is empty \(shape"):
            nlref.estimate_sigma(np.zeros(shape), channel_axis=axis)


@pytest.mark.parametrize("route", ["memory", "dask"])
def test_progress_must_be_a_bool(route):
    """progress="no" was taken as True (a bar was shown); NumPy's bool is taken as Python's."""
    import dask.array as da

    image = np.random.default_rng(0).random((12, 12)).astype(np.float32)
    source = image if route == "memory" else da.from_array(image, chunks=6)
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match=f"progress must be True or False, got {bad!r}"):
            nlref.nl_means(source, sigma=0.1, search_size=5, patch_size=3, progress=bad)
    out = nlref.nl_means(source, sigma=0.1, search_size=5, patch_size=3, progress=np.False_)
    np.testing.assert_array_equal(np.asarray(out), nlref.nl_means(image, sigma=0.1, search_size=5, patch_size=3))
