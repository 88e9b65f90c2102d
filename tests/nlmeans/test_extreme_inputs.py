"""Inputs the earlier checks let through: masked arrays, and values whose second differences overflow.

A masked array with a NaN under its mask passed the NaN check (``numpy.all`` of a masked array skips
masked entries) and came back with 49 of 156 pixels NaN; a float16 image above 16376 gave a NaN noise
estimate, then a bare ``StopIteration`` (in memory) or an ``IndexError`` (on Dask); float64 values near
1e308 gave an infinite estimate, and on Dask the message blamed NaN in the image.
"""

import numpy as np
import pytest

import nlref
from nlref.nlmeans import presets
from nlref.nlmeans.store import resolve_parameters_store

da = pytest.importorskip("dask.array")

KW = dict(sigma=0.1, h=0.15, patch_size=3, search_size=5)


def _masked():
    x = np.random.default_rng(23).random((12, 13))
    x[3, 3] = np.nan
    return np.ma.masked_invalid(x)


@pytest.mark.parametrize("route", [
    lambda m: nlref.nl_means(m, **KW),
    lambda m: nlref.nl_means(da.from_array(m, chunks=6), **KW),
    lambda m: nlref.nl_means_store(m, chunks=6, **KW),
    lambda m: nlref.estimate_sigma(m),
    lambda m: nlref.estimate_sigma(da.from_array(m, chunks=6)),
    lambda m: nlref.resolve_parameters(m),
    lambda m: nlref.nl_means_weights(m, (2, 2), **KW),
], ids=["nl_means", "dask", "store", "estimate_sigma", "estimate_sigma dask", "resolve_parameters", "weights"])
@pytest.mark.parametrize("masked", [_masked, lambda: np.ma.masked_array(np.random.default_rng(0).random((12, 13)))],
                         ids=["nan under the mask", "nothing masked"])
def test_a_masked_array_is_refused(route, masked):
    with pytest.raises(TypeError, match=r"image is a NumPy masked array: .*\(image\.filled\(value\)"):
        route(masked())


def _float16_above_the_filter_range():
    noise = np.random.default_rng(0).standard_normal((16, 16))
    return (40000 + 300 * noise).astype(np.float16)     # finite float16; 2 v overflows it


def test_float16_is_filtered_in_float32_on_every_route():
    x = _float16_above_the_filter_range()
    memory = nlref.estimate_sigma(x)
    assert np.isfinite(memory)
    assert memory == nlref.estimate_sigma(x.astype(np.float32))          # float32 is the filter's float
    assert nlref.estimate_sigma(da.from_array(x, chunks=5)) == memory    # the same bits, chunk by chunk
    params = nlref.resolve_parameters(x)
    assert params["sigma"] == memory
    assert nlref.resolve_parameters(da.from_array(x, chunks=5)) == params
    out = nlref.nl_means(x)
    assert out.dtype == np.float16 and np.all(np.isfinite(out))
    assert np.array_equal(nlref.nl_means(da.from_array(x, chunks=5)).compute(), out)
    assert np.array_equal(nlref.nl_means_store(x, chunks=5).compute(), out)


@pytest.mark.parametrize("x", [np.random.default_rng(1).random((16, 16)) * 1e308,
                               (np.random.default_rng(1).random((16, 16)) * 3e38).astype(np.float32)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("route", [
    nlref.estimate_sigma,
    lambda x: nlref.estimate_sigma(da.from_array(x, chunks=8)),
    nlref.resolve_parameters,
    lambda x: nlref.resolve_parameters(da.from_array(x, chunks=8)),
    lambda x: resolve_parameters_store(x, chunks=8),
], ids=["estimate", "estimate dask", "resolve", "resolve dask", "resolve store"])
def test_an_estimate_that_overflows_is_refused_and_named(x, route):
    with pytest.raises(ValueError, match=f"the noise estimate overflows {x.dtype}: .* pass sigma"):
        route(x)


def test_a_finite_image_with_nan_is_still_called_so_on_dask():
    x = np.random.default_rng(2).random((16, 16))
    x[4, 4] = np.nan
    with pytest.raises(ValueError, match="image contains NaN or Inf"):
        nlref.estimate_sigma(da.from_array(x, chunks=8))


def test_an_image_too_small_to_estimate_says_what_to_pass():
    with pytest.raises(ValueError, match=r"at least 3 samples .* Pass sigma \(or h and both sizes\)"):
        nlref.nl_means(np.random.default_rng(3).random((2, 2)))
    assert nlref.nl_means(np.random.default_rng(3).random((2, 2)), sigma=0.1).shape == (2, 2)


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_a_preset_for_no_noise_level_is_a_value_error(bad):
    with pytest.raises(ValueError, match="sigma_255 must be a number >= 0"):
        presets.preset_for(bad, colour=False, aggregation="pixel", shape=(64, 64))


@pytest.mark.parametrize("kw, match", [
    (dict(sigma_255="20"), "sigma_255 must be a number >= 0"),   # TypeError: '>=' not supported
    (dict(sigma_255=True), "sigma_255 must be a number >= 0"),
    (dict(colour="no"), "colour must be True or False"),         # KeyError: ('no', 'pixel')
    (dict(colour=1), "colour must be True or False"),            # taken for True
    (dict(aggregation="pixels"), "aggregation must be 'pixel' or 'patch'"),   # KeyError
    (dict(shape=()), "shape must be a non-empty tuple of positive ints"),      # sizes () returned
    (dict(shape=(0, 64)), "shape must be a non-empty tuple of positive ints"),
    (dict(shape=(64.0, 64)), "shape must be a non-empty tuple of positive ints"),
])
def test_preset_for_names_a_bad_argument(kw, match):
    args = dict(sigma_255=20, colour=False, aggregation="pixel", shape=(64, 64), **{})
    args.update(kw)
    sigma = args.pop("sigma_255")
    with pytest.raises(ValueError, match=match):
        presets.preset_for(sigma, **args)


@pytest.mark.parametrize("dtype, offers", [(np.float64, False), (np.float32, True)])
def test_nl_means_offers_float64_only_to_an_image_that_is_not(dtype, offers):
    """An h that float64 cannot square told a float64 image to 'pass a float64 image'."""
    x = np.random.default_rng(3).random((12, 12)).astype(dtype)
    tiny = 1e-170 if dtype == np.float64 else 1e-25
    with pytest.raises(ValueError, match="is too small for sigma") as err:
        nlref.nl_means(x, sigma=0.0, h=tiny, patch_size=3, search_size=5)
    assert ("pass a float64 image" in str(err.value)) == offers
    with pytest.raises(ValueError, match="sums of squared differences of a patch overflow") as err:
        nlref.nl_means(x * (1e160 if dtype == np.float64 else 1e19), sigma=0.0, h=1.0, patch_size=3, search_size=5)
    assert ("pass a float64 image" in str(err.value)) == offers
