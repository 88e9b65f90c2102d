import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nlref
import nlref.backend as B
from nlref.nlmeans import api, presets
from tests.helpers import assert_same_library

# (image shape, channel_axis, patch_size, search_size): every dimensionality
CASES = [
    pytest.param((17,), None, 3, 7, id="1d"),
    pytest.param((9, 11), None, 3, 5, id="grey"),
    pytest.param((8, 9, 3), -1, (3, 5), (5, 3), id="colour-last"),
    pytest.param((2, 7, 8), 0, 3, 3, id="colour-first"),
    pytest.param((4, 5, 6), None, 3, (3, 3, 5), id="volume"),
    pytest.param((3, 5, 6, 2), 3, (1, 3, 3), (3, 3, 3), id="video-channels"),
]


def _noisy(rng, shape, dtype):
    return (rng.random(shape) + 0.1 * rng.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
@pytest.mark.parametrize("shape,channel_axis,patch,search", CASES)
def test_fast_equals_naive_float64(xp, device, shape, channel_axis, patch, search, aggregation, rng):
    host = _noisy(rng, shape, np.float64)
    x = B.asarray(host, xp=xp, device=device)
    kw = dict(sigma=0.1, h=0.25, patch_size=patch, search_size=search, channel_axis=channel_axis,
              aggregation=aggregation)
    fast = nlref.nl_means(x, method="fast", **kw)
    naive = nlref.nl_means(x, method="naive", **kw)
    assert_same_library(fast, x)
    assert_same_library(naive, x)
    assert fast.shape == x.shape and fast.dtype == x.dtype
    f, n = B.to_numpy(fast), B.to_numpy(naive)
    np.testing.assert_allclose(f, n, rtol=1e-12, atol=1e-13)
    assert np.abs(f - host).max() > 1e-3  # it did something


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
@pytest.mark.parametrize("shape,channel_axis,patch,search", CASES)
def test_fast_equals_naive_float32(xp_cpu, shape, channel_axis, patch, search, aggregation, rng):
    x = B.asarray(_noisy(rng, shape, np.float32), xp=xp_cpu)
    kw = dict(sigma=0.1, h=0.25, patch_size=patch, search_size=search, channel_axis=channel_axis,
              aggregation=aggregation)
    fast, naive = nlref.nl_means(x, **kw), nlref.nl_means(x, method="naive", **kw)
    assert "float32" in str(fast.dtype)
    np.testing.assert_allclose(B.to_numpy(fast), B.to_numpy(naive), rtol=1e-5, atol=1e-6)


def test_threads_do_not_change_the_result(rng):
    x = _noisy(rng, (40, 50), np.float64)
    one = nlref.nl_means(x, sigma=0.1, h=0.2, patch_size=5, search_size=9, workers=1)
    three = nlref.nl_means(x, sigma=0.1, h=0.2, patch_size=5, search_size=9, workers=3)
    np.testing.assert_array_equal(one, three)  # a fixed partition of the offsets: the same bits


def test_huge_h_is_the_search_window_mean(rng):
    """With h -> infinity every weight is 1: pixel-wise NL-means is a box mean of the reflected image."""
    x = _noisy(rng, (12, 13), np.float64)
    with pytest.warns(UserWarning, match="blur the image flat"):
        out = nlref.nl_means(x, h=1e9, patch_size=3, search_size=5)
    padded = np.pad(x, 2, mode="reflect")
    box = sum(padded[i : i + 12, j : j + 13] for i in range(5) for j in range(5)) / 25
    np.testing.assert_allclose(out, box, rtol=1e-12)


def test_tiny_h_keeps_the_image(rng):
    """With h -> 0 only the centre weight (exactly 1) survives on random data."""
    x = _noisy(rng, (10, 10), np.float64)
    np.testing.assert_allclose(nlref.nl_means(x, h=1e-6, patch_size=3, search_size=5), x, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:h=:UserWarning")  # any h on any range, on purpose: no units advice
@settings(max_examples=25, deadline=None)
@given(
    value=st.floats(-50, 50, allow_nan=False),
    shape=st.sampled_from([(6, 7), (5, 5, 4), (9,)]),
    h=st.floats(0.01, 10),
    aggregation=st.sampled_from(["pixel", "patch"]),
)
def test_constant_image_stays_constant(value, shape, h, aggregation):
    x = np.full(shape, value, dtype=np.float64)
    out = nlref.nl_means(x, h=h, sigma=0.0, patch_size=3, search_size=3, aggregation=aggregation)
    np.testing.assert_allclose(out, value, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:h=:UserWarning")  # any h on any range, on purpose: no units advice
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    h=st.floats(0.01, 5),
    sigma=st.floats(0, 1),
    aggregation=st.sampled_from(["pixel", "patch"]),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_output_is_a_convex_combination(seed, h, sigma, aggregation, dtype):
    x = np.random.default_rng(seed).normal(size=(9, 8)).astype(dtype)
    out = nlref.nl_means(x, h=h, sigma=sigma, patch_size=3, search_size=5, aggregation=aggregation)
    eps = 1e-5 if dtype == np.float32 else 1e-12
    assert out.min() >= x.min() - eps and out.max() <= x.max() + eps
    assert np.all(np.isfinite(out))


def test_affine_equivariance(rng):
    x = _noisy(rng, (15, 16), np.float64)
    kw = dict(patch_size=3, search_size=7, aggregation="patch")
    base = nlref.nl_means(x, sigma=0.1, h=0.2, **kw)
    moved = nlref.nl_means(255.0 * x + 17.0, sigma=25.5, h=51.0, **kw)
    np.testing.assert_allclose(moved, 255.0 * base + 17.0, rtol=1e-11)


def test_presets_are_scale_equivariant():
    x = nlref.add_gaussian_noise(nlref.data.camera()[:64, :64], 0.08, seed=0)
    p1 = api.resolve_parameters(x, sigma=0.08)
    p255 = api.resolve_parameters(255.0 * x, sigma=0.08 * 255)
    assert p1["patch_size"] == p255["patch_size"] and p1["search_size"] == p255["search_size"]
    assert p255["h"] == pytest.approx(255 * p1["h"])
    np.testing.assert_allclose(nlref.nl_means(255.0 * x, sigma=0.08 * 255),
                               255.0 * nlref.nl_means(x, sigma=0.08), rtol=2e-5, atol=2e-4)


def test_nl_means_denoises():
    clean = nlref.data.camera()[96:224, 160:288]
    noisy = nlref.add_gaussian_noise(clean, 20 / 255, seed=5)
    before = nlref.psnr(clean, noisy)
    for aggregation in ("pixel", "patch"):
        assert nlref.psnr(clean, nlref.nl_means(noisy, sigma=20 / 255, aggregation=aggregation)) > before + 5
    assert nlref.psnr(clean, nlref.nl_means(noisy)) > before + 5  # sigma estimated


# ---- dtypes and the integer rule ----

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_dtype_is_kept(xp, device, dtype, rng):
    x = B.asarray(_noisy(rng, (10, 12), dtype), xp=xp, device=device)
    out = nlref.nl_means(x, sigma=0.1)
    assert_same_library(out, x)
    assert out.dtype == x.dtype


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_integer_images_are_denoised_in_their_own_units(xp_cpu, dtype, rng):
    info = np.iinfo(dtype)
    host = np.clip(rng.normal(info.max / 2, info.max / 10, size=(16, 17)), info.min, info.max).astype(dtype)
    x = B.asarray(host, xp=xp_cpu)
    sigma = float(info.max) / 12
    out = nlref.nl_means(x, sigma=sigma)
    assert out.dtype == x.dtype
    span = float(info.max) - min(float(info.min), 0.0)  # the integer image's default data_range
    as_float = B.to_numpy(nlref.nl_means(B.asarray(host.astype(np.float32), xp=xp_cpu), sigma=sigma, data_range=span))
    expected = np.clip(np.round(as_float), info.min, info.max).astype(dtype)
    np.testing.assert_array_equal(B.to_numpy(out), expected)


def test_uint8_saturates_instead_of_wrapping():
    host = np.full((8, 8), 255, dtype=np.uint8)
    host[::2, ::2] = 250
    with pytest.warns(UserWarning, match="blur the image flat"):
        out = nlref.nl_means(host, h=1e6, patch_size=3, search_size=3)
    assert out.dtype == np.uint8 and out.min() >= 250



@pytest.mark.parametrize("dtype", [np.int32, np.uint32])
@pytest.mark.parametrize("route", ["memory", "dask"])
def test_wide_integers_at_their_limits_saturate_instead_of_wrapping(dtype, route):
    """Their maximum is not a float32: a clip at it rounded up past the range and the cast wrapped to
    the minimum (int32 max came back as -2^31, uint32 max as 0)."""
    info = np.iinfo(dtype)
    host = np.full((6, 6), info.max, dtype=dtype)
    host[::2] = info.min
    if route == "dask":
        da = pytest.importorskip("dask.array")
        out = nlref.nl_means(da.from_array(host, chunks=3), h=1.0, patch_size=3, search_size=3).compute()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # NumPy's "invalid value encountered in cast"
            out = nlref.nl_means(host, h=1.0, patch_size=3, search_size=3)
    assert out.dtype == dtype
    top, bottom = out[1::2].astype(object), out[::2].astype(object)  # exact integers
    assert (top <= int(info.max)).all() and (top >= int(info.max) * (1 - 2**-23)).all()  # within float32 rounding
    assert (bottom == int(info.min)).all()


def _nl_means_on(route, image, **kw):
    if route == "dask":
        da = pytest.importorskip("dask.array")
        return nlref.nl_means(da.from_array(image, chunks=8), **kw).compute()
    if route == "weights":
        return nlref.nl_means_weights(image, (3,) * image.ndim, **kw)
    return nlref.nl_means(image, **kw)


@pytest.mark.parametrize("route", ["memory", "dask", "weights"])
@pytest.mark.parametrize("dtype, h, good", [(np.float32, 1e-25, 1e-18), (np.float64, 1e-160, 1e-150),
                                            (np.float32, 1e20, 1e19), (np.float64, 1e300, 1e150)])
def test_an_h_the_working_dtype_cannot_carry_is_refused(route, dtype, h, good):
    """1 / h^2 infinite in float32 gave an all-NaN result without a word (0 * inf); h^2 overflowing
    float64 raised Python's OverflowError, and underflowing to 0 a ZeroDivisionError."""
    x = np.zeros((16, 16), dtype)
    x[8, 8] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the units doubt of an h this far out
        with pytest.raises(ValueError, match=r"h=\S+ is too (small|large)"):
            _nl_means_on(route, x, h=h, patch_size=3, search_size=5)
        out = _nl_means_on(route, x, h=good, patch_size=3, search_size=5)  # just inside: finite
    assert np.isfinite(out).all()


def test_a_sigma_whose_h_underflows_is_refused():
    with pytest.raises(ValueError, match=r"h=\S+ is too small for sigma=1e-300"):
        nlref.nl_means(np.random.default_rng(0).random((16, 16)), sigma=1e-300)


@pytest.mark.parametrize("route", ["memory", "dask"])
def test_values_whose_squared_differences_overflow_are_refused(route):
    """float32 values of 1e30 came back all NaN (inf - inf in the patch sums); int64 values near its
    maximum overflow float32 the same way. float64 carries them."""
    image = (np.random.default_rng(0).random((16, 16)) * 1e30).astype(np.float32)
    kw = dict(h=1e17, patch_size=3, search_size=5, data_range=1e30)  # an h float32 carries
    with pytest.raises(ValueError, match=r"image values reach 9.97e\+29, above about 7.7e\+17"):
        _nl_means_on(route, image, **kw)
    with pytest.raises(ValueError, match="image values reach 9.22e\\+18"):
        _nl_means_on(route, np.full((16, 16), np.iinfo(np.int64).max, np.int64), **kw)
    out = _nl_means_on(route, image.astype(np.float64), **{**kw, "h": 1e30})
    assert np.isfinite(out).all() and np.abs(out).max() <= np.abs(image).max()


# ---- presets and noise estimation ----

@pytest.mark.parametrize("sigma255,patch,search,row", [(5, 3, 21, 0), (15, 3, 21, 0), (20, 5, 21, 1),
                                                       (40, 7, 35, 2), (60, 9, 35, 3), (99, 11, 35, 4)])
def test_grey_presets_follow_the_ipol_table(sigma255, patch, search, row):
    x = np.zeros((64, 64), dtype=np.float32)
    p = api.resolve_parameters(x, sigma=sigma255 / 255)
    assert p["patch_size"] == (patch, patch)
    assert p["search_size"] == (search, search)
    assert p["h"] == pytest.approx(presets.H_FACTORS[(False, "pixel")][row] * sigma255 / 255)
    assert p["preset"] is presets.IPOL_GREY[row]


def test_colour_presets_and_uint8_range():
    x = np.zeros((64, 64, 3), dtype=np.uint8)
    p = api.resolve_parameters(x, sigma=30, channel_axis=-1, aggregation="patch")
    assert p["patch_size"] == (5, 5) and p["search_size"] == (35, 35)
    assert p["h"] == pytest.approx(presets.H_FACTORS[(True, "patch")][1] * 30)


def test_a_single_channel_uses_the_grey_table():
    grey = api.resolve_parameters(np.zeros((40, 40), dtype=np.float32), sigma=20 / 255)
    one = api.resolve_parameters(np.zeros((40, 40, 1), dtype=np.float32), sigma=20 / 255, channel_axis=-1)
    rgb = api.resolve_parameters(np.zeros((40, 40, 3), dtype=np.float32), sigma=20 / 255, channel_axis=-1)
    assert one["preset"] is grey["preset"] and one["h"] == grey["h"]
    assert rgb["preset"] is presets.IPOL_COLOUR[0]


def test_video_presets_use_the_table_in_the_plane_only():
    x = np.zeros((8, 40, 40), dtype=np.float32)
    p = api.resolve_parameters(x, sigma=20 / 255)
    assert p["patch_size"] == (3, 5, 5) and p["search_size"] == (5, 21, 21)
    grey = api.resolve_parameters(np.zeros((40, 40), dtype=np.float32), sigma=20 / 255)
    assert p["h"] == pytest.approx(presets.LEADING_AXES_H_SCALE["pixel"] * grey["h"])
    small = api.resolve_parameters(np.zeros((2, 10, 12), dtype=np.float32), sigma=50 / 255)
    assert small["patch_size"] == (1, 9, 9) and small["search_size"] == (1, 9, 11)


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
def test_a_clip_without_a_search_along_time_takes_the_2d_h(aggregation):
    # the leading-axis multiplier of h is for a window with more candidates than the 2-D one; a clip of one
    # or two frames (whose window is clipped to one frame) or an explicit (1, s, s) window has none: it took
    # 0.9 x the 2-D h all the same, and a (1, H, W) clip came out unlike the same image denoised as 2-D
    frame = nlref.add_gaussian_noise(nlref.data.camera()[200:248, 200:248], 20 / 255, seed=0)
    two_d = api.resolve_parameters(frame, sigma=20 / 255, aggregation=aggregation)
    clip = np.stack([frame, frame[::-1]])
    for x, search in ((frame[None], None), (clip, None), (np.concatenate([clip] * 4), (1, 21, 21))):
        p = api.resolve_parameters(x, sigma=20 / 255, search_size=search, aggregation=aggregation)
        assert p["search_size"][0] == 1 and p["h"] == two_d["h"]
    eight = api.resolve_parameters(np.concatenate([clip] * 4), sigma=20 / 255, aggregation=aggregation)
    assert eight["h"] == pytest.approx(presets.LEADING_AXES_H_SCALE[aggregation] * two_d["h"])
    one = api.nl_means(frame[None], sigma=20 / 255, aggregation=aggregation)[0]
    np.testing.assert_allclose(one, api.nl_means(frame, sigma=20 / 255, aggregation=aggregation), atol=1e-6)


def test_explicit_arguments_win_over_presets():
    x = np.zeros((30, 30), dtype=np.float32)
    p = api.resolve_parameters(x, sigma=0.1, h=0.3, patch_size=(3, 5), search_size=9)
    assert (p["h"], p["patch_size"], p["search_size"], p["preset"]) == (0.3, (3, 5), (9, 9), None)


def test_h_alone_means_no_noise_correction():
    x = nlref.add_gaussian_noise(np.full((32, 32), 0.5, dtype=np.float32), 0.1, seed=0)
    p = api.resolve_parameters(x, h=0.05)
    assert p["sigma"] == 0.0 and p["sigma_source"] == "estimated"


def test_sigma_is_estimated_when_nothing_is_given():
    x = nlref.add_gaussian_noise(nlref.data.camera(), 20 / 255, seed=2)
    p = api.resolve_parameters(x)
    assert p["sigma_source"] == "estimated"
    assert p["sigma"] == pytest.approx(20 / 255, rel=0.1)


@pytest.mark.parametrize("shape", [(4000,), (200, 200), (30, 40, 50)])
def test_estimate_sigma_on_pure_noise(xp, device, shape):
    noise = B.normal(shape, seed=11, xp=xp, device=device) * 0.3
    assert nlref.estimate_sigma(noise) == pytest.approx(0.3, rel=0.05)


def test_estimate_sigma_colour_and_clean_images():
    noisy = nlref.add_gaussian_noise(nlref.data.astronaut(), 0.05, seed=1)
    assert nlref.estimate_sigma(noisy, channel_axis=-1) == pytest.approx(0.05, rel=0.15)
    assert nlref.estimate_sigma(np.full((20, 20), 3.0)) == 0.0
    with pytest.raises(ValueError, match="at least 3 samples"):
        nlref.estimate_sigma(np.zeros((2, 2)))


@pytest.mark.parametrize("dtype,shape,channel_axis", [("uint8", (512, 480), None), ("uint16", (3, 256, 250), 0),
                                                      ("float32", (512, 480), None), ("float16", (96, 90, 40), None)])
def test_estimate_sigma_holds_at_most_two_filtered_arrays(dtype, shape, channel_axis):
    """The in-memory noise estimate's peak: two arrays of second differences (in the filter's float), nothing of
    the image's size more. It made a float64 copy of an 8-bit image, a fresh array per step and a sorted copy:
    4.5 such arrays, more than NL-means' own offset loop needs. The same number as a sort of the copy."""
    from nlref.nlmeans import noise
    from tests.helpers import traced_peak

    rng = np.random.default_rng(3)
    x = (rng.random(shape) * (200 if dtype[0] == "u" else 1)).astype(dtype)
    work = noise.filter_dtype(x.dtype)
    v = np.moveaxis(x, channel_axis, 0) if channel_axis is not None else x[None]
    filtered = v.astype(work)
    for axis in range(1, v.ndim):
        filtered = noise.second_difference(filtered, axis)
    expected = []
    for c in range(filtered.shape[0]):  # the definition: sort everything
        flat = np.sort(np.abs(filtered[c]).reshape(-1))
        n = flat.size
        expected.append(noise.sigma_from_median((flat[(n - 1) // 2] + flat[n // 2]) / 2.0, v.ndim - 1))
    got = []
    peak = traced_peak(lambda: got.append(nlref.estimate_sigma(x, channel_axis=channel_axis)))
    assert got[0] == sum(expected) / len(expected)
    assert peak <= 2.2 * filtered.nbytes, peak / filtered.nbytes


def test_zero_noise_without_h_is_an_error():
    with pytest.raises(ValueError, match=r"cannot choose h: .* the noise level estimated from the image is 0"):
        nlref.nl_means(np.full((10, 10), 0.5))
    with pytest.raises(ValueError, match=r"cannot choose h: .* sigma=0 was given; pass h"):   # not "a constant image"
        nlref.nl_means(np.random.default_rng(0).random((10, 10)), sigma=0)


# ---- the weights of one pixel ----

def test_weights_of_one_pixel(xp_cpu, rng):
    host = _noisy(rng, (12, 14), np.float64)
    x = B.asarray(host, xp=xp_cpu)
    w = B.to_numpy(nlref.nl_means_weights(x, (5, 6), sigma=0.1, h=0.3, patch_size=3, search_size=5))
    assert w.shape == (5, 5) and w[2, 2] == 1.0
    p = np.pad(host, 3, mode="reflect")
    ref = p[3 + 5 - 1 : 3 + 5 + 2, 3 + 6 - 1 : 3 + 6 + 2]
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            q = p[3 + 5 + dy - 1 : 3 + 5 + dy + 2, 3 + 6 + dx - 1 : 3 + 6 + dx + 2]
            d2 = np.mean((ref - q) ** 2)
            assert w[dy + 2, dx + 2] == pytest.approx(np.exp(-max(d2 - 0.02, 0) / 0.09), rel=1e-12)
    with pytest.raises(ValueError, match="index must give"):
        nlref.nl_means_weights(x, (12, 0), sigma=0.1)


@pytest.mark.parametrize("dtype, expected", [("float64", "float64"), ("float32", "float32"), ("float16", "float32"),
                                             ("bfloat16", "float32"), ("uint8", "float32"), ("int16", "float32")])
def test_weights_come_in_the_working_dtype_of_the_images_library(dtype, expected, rng):
    """As documented: the weights keep the image's library (PyTorch here) and come in the dtype NL-means
    computes in, float64 for float64 images and float32 for every other, the same numbers as NumPy's."""
    torch = pytest.importorskip("torch")
    host = _noisy(rng, (10, 12), np.float64)
    scale = 200.0 if dtype.startswith(("uint", "int")) else 1.0
    image = torch.from_numpy(host * scale).to(getattr(torch, dtype))
    options = dict(sigma=0.1 * scale, patch_size=3, search_size=5)
    w = nlref.nl_means_weights(image, (4, 5), **options)
    assert type(w) is torch.Tensor and B.dtype_name(w.dtype) == expected
    if dtype != "bfloat16":  # NumPy has no bfloat16
        same = nlref.nl_means_weights(image.numpy(), (4, 5), **options)
        assert same.dtype == np.dtype(expected)
        np.testing.assert_allclose(w.numpy(), same, rtol=1e-5 if expected == "float32" else 1e-12,
                                   atol=1e-37)  # a weight below float32's normal range has fewer digits


def test_progress_bar_runs(capsys, rng):
    x = _noisy(rng, (20, 20), np.float32)
    out = nlref.nl_means(x, sigma=0.1, progress=True, aggregation="patch")
    assert out.shape == x.shape
    assert "nl_means" in capsys.readouterr().err


# ---- bad input: clear errors before any heavy work ----

@pytest.mark.parametrize(
    "image,kwargs,error,match",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]]), {}, ValueError, "NaN or Inf"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), {}, ValueError, "NaN or Inf"),
        (np.zeros((0, 5)), {}, ValueError, "empty"),
        (np.array(3.0), {}, ValueError, "1 to 4 spatial axes"),
        (np.zeros((3,) * 5), {}, ValueError, "1 to 4 spatial axes"),
        (np.zeros((5, 5)), {"channel_axis": 2}, ValueError, "channel_axis=2 is out of range"),
        (np.zeros((5, 5)), {"channel_axis": 1.0}, TypeError, "channel_axis must be an int"),
        (np.zeros((9, 9)), {"h": 1, "patch_size": 4}, ValueError, "patch_size=4: sizes are full odd widths"),
        (np.zeros((9, 9)), {"h": 1, "patch_size": 0}, ValueError, "full odd widths"),
        (np.zeros((9, 9)), {"h": 1, "search_size": -3}, ValueError, "search_size=-3"),
        (np.zeros((9, 9)), {"h": 1, "search_size": (3, 3, 3)}, ValueError, "one size per spatial axis"),
        (np.zeros((9, 9)), {"h": 1, "patch_size": 2.5}, TypeError, "patch_size must be an odd int"),
        (np.zeros((4, 9)), {"h": 1, "patch_size": 5, "search_size": 3}, ValueError, "larger than the image"),
        # a window with more offsets than 2 n - 1 per axis only adds mirrored copies of the padding, at their cost
        (np.zeros((9, 9)), {"h": 1, "patch_size": 3, "search_size": 1001}, ValueError,
         r"search_size=1001 makes 1,002,001 offsets, more than the 289 that already reach every sample of the 9x9 "
         r"image from every sample \(17x17, 2 n - 1 per axis\)"),
        (np.zeros((4, 9)), {"h": 1, "patch_size": 3, "search_size": (9, 15)}, ValueError, "135 offsets, more than the 119"),
        (np.zeros((9, 9)), {"h": 0}, ValueError, "h must be finite and > 0"),
        (np.zeros((9, 9)), {"h": -1}, ValueError, "h must be finite and > 0"),
        (np.zeros((9, 9)), {"h": float("nan")}, ValueError, "h must be finite"),
        (np.zeros((9, 9)), {"sigma": -0.1}, ValueError, "sigma must be finite and >= 0"),
        (np.zeros((9, 9)), {"sigma": "0.1"}, TypeError, "sigma must be a real number"),
        (np.zeros((9, 9)), {"h": 1, "aggregation": "mean"}, ValueError, "aggregation must be one of"),
        (np.zeros((9, 9)), {"h": 1, "method": "slow"}, ValueError, "method must be one of"),
        (np.zeros((9, 9)), {"h": 1, "workers": 0}, ValueError, "workers must be a positive int"),
        (np.zeros((9, 9), dtype=bool), {"h": 1}, TypeError, "real numbers"),
        (np.zeros((9, 9), dtype=complex), {"h": 1}, TypeError, "real numbers"),
        ([[0.0, 1.0], [1.0, 0.0]], {"h": 1}, TypeError, "image must be an array"),
    ],
)
def test_bad_input_is_a_clear_error(image, kwargs, error, match):
    with pytest.raises(error, match=match):
        nlref.nl_means(image, **kwargs)


def test_mixed_libraries_are_rejected_in_metrics():
    import array_api_strict as xs

    with pytest.raises(TypeError, match="different libraries"):
        nlref.psnr(np.zeros(3), B.asarray(np.zeros(3), xp=xs))


def test_naive_refuses_large_inputs():
    with pytest.raises(ValueError, match="method='naive' would make .* patch comparisons"):
        nlref.nl_means(np.zeros((512, 512), dtype=np.float32), h=0.1, method="naive")


def test_resolve_parameters_on_every_backend(xp, device):
    host = nlref.add_gaussian_noise(nlref.data.camera()[:64, :64], 20 / 255, seed=4)
    ref = api.resolve_parameters(host)
    got = api.resolve_parameters(B.asarray(host, xp=xp, device=device))
    assert got["patch_size"] == ref["patch_size"] and got["search_size"] == ref["search_size"]
    assert got["sigma"] == pytest.approx(ref["sigma"], rel=1e-6)


@pytest.mark.parametrize("shape,channel_axis,aggregation,workers", [
    ((300, 280), None, "pixel", 2), ((300, 280), None, "patch", 2),
    ((160, 150, 3), -1, "patch", 1), ((6, 90, 100), None, "patch", 2),
])
def test_working_memory_estimate_bounds_the_measured_peak(shape, channel_axis, aggregation, workers, rng,
                                                         monkeypatch):
    import tracemalloc

    from nlref.nlmeans.fast import ENGINE_VARIABLE, working_memory

    # the NumPy engine's buffers (the Numba engine needs less: tests/nlmeans/test_numba.py)
    monkeypatch.setenv(ENGINE_VARIABLE, "numpy")

    x = rng.random(shape).astype(np.float32)
    p = api.resolve_parameters(x, sigma=0.08, channel_axis=channel_axis)
    spatial = shape if channel_axis is None else shape[:-1]
    channels = 1 if channel_axis is None else shape[-1]
    estimate = working_memory(spatial, channels, p["patch_size"], p["search_size"], aggregation, 4, workers)
    tracemalloc.start()
    try:
        nlref.nl_means(x, sigma=0.08, channel_axis=channel_axis, aggregation=aggregation, workers=workers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= estimate
    assert peak >= 0.5 * estimate  # and it is not a wild over-estimate


@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
def test_input_is_never_modified(aggregation, rng):
    x = _noisy(rng, (20, 21, 3), np.float32)
    before = x.copy()
    x.setflags(write=False)  # any write would raise
    nlref.nl_means(x, sigma=0.1, channel_axis=-1, aggregation=aggregation)
    np.testing.assert_array_equal(x, before)


def test_non_contiguous_views_match_contiguous_copies(rng):
    base = _noisy(rng, (40, 42, 3), np.float64)
    for view, axis in [(base[::2, ::-1, 0], None), (base[:, :, 1:], -1), (base.transpose(2, 0, 1)[:, 5:30, :], 0)]:
        kw = dict(sigma=0.1, h=0.2, patch_size=3, search_size=7, channel_axis=axis)
        np.testing.assert_allclose(nlref.nl_means(view, **kw), nlref.nl_means(np.ascontiguousarray(view), **kw),
                                   rtol=1e-13)


@pytest.mark.parametrize("patch", [(3, 1, 3), (7, 1, 7), (5, 1, 1), (1, 1, 3), (3, 3, 3)])
@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
def test_numpy_engine_with_a_patch_axis_of_width_one(monkeypatch, patch, aggregation, rng):
    """The NumPy engine (the path CuPy takes: out= buffers) against the definition, with a patch one
    sample wide along a middle axis: its box sums alternate two buffers, and must never write into
    the one they read (3x1x3 once did, here and on CuPy)."""
    from nlref.nlmeans.fast import ENGINE_VARIABLE

    monkeypatch.setenv(ENGINE_VARIABLE, "numpy")
    x = _noisy(rng, (7, 9, 10), np.float64)
    kw = dict(sigma=0.1, h=0.3, patch_size=patch, search_size=(3, 3, 3), aggregation=aggregation)
    np.testing.assert_allclose(nlref.nl_means(x, workers=1, **kw), nlref.nl_means(x, method="naive", **kw),
                               rtol=1e-12, atol=1e-13)


def test_a_search_window_wider_than_a_short_axis_is_taken():
    """Only the count of offsets is bounded: 5 along a stack of 2 frames (at most 3 reach it) is a usual request."""
    image = np.random.default_rng(0).random((2, 9, 9))
    assert nlref.nl_means(image, h=1, patch_size=(1, 3, 3), search_size=5).shape == image.shape
    assert nlref.nl_means(image, h=1, patch_size=(1, 3, 3), search_size=(7, 9, 9)).shape == image.shape  # 567 <= 867
