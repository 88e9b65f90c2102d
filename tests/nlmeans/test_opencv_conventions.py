"""What docs/nlmeans.md says about OpenCV's ``fastNlMeansDenoising*``, checked against OpenCV itself.

Read from OpenCV's ``modules/photo/src`` (opencv/opencv: ``fast_nlmeans_denoising_invoker.hpp`` at
commit 38cbe9873a8076116ec450f204ad93ef05293352, ``fast_nlmeans_denoising_invoker_commons.hpp`` at
6b6cfa893d43bc24fb15b690b9400aad71ddf298, ``fast_nlmeans_multi_denoising_invoker.hpp`` at
581923fa57108751f54a60f6204754d17d63b599, ``denoising.cpp`` at f99be6bda6064f20658149babaf95e68c6536266;
the templated 3.x/4.x form with ``DistSquared``/``DistAbs``, per-channel ``h`` and 16-bit input from the
forks hwdh/opencv 22bbe27592fd9cee87e7bcb28c3efd7a8efe92b7 (commons) and propel-gtm/opencv
3963286d00f0e337219d301f4348d6e7edcfaa91 (``denoising.cpp``)) and tested here on the installed cv2:

* The image is extended by ``copyMakeBorder(..., BORDER_DEFAULT)``, which is reflect-101 (NumPy's
  ``"reflect"``, nlref's border). ``templateWindowSize`` and ``searchWindowSize`` are full widths; an
  even width ``n`` becomes ``2 (n // 2) + 1`` (8 searches like 9), while the ``Multi`` variants raise.
* For a pixel ``p`` and a candidate ``q``, ``D`` is the integer sum over the ``t x t`` template and the
  channels of the squared differences. OpenCV replaces ``D / t^2`` by ``(D >> k) 2^k / t^2`` with
  ``2^k >= t^2`` the next power of two (a mean rounded down to steps of ``2^k / t^2``, 64/49 grey
  levels^2 at 7x7), and looks its weight up in a table:
  ``w = round(M exp(-mean / (h^2 C)))`` for ``C`` channels, set to 0 when below ``0.001 M``, with the
  fixed-point one ``M = INT_MAX // (s^2 255)`` for 8-bit input (``INT_MAX`` for 16-bit; ``Multi``
  divides by the temporal width too, a fact of the source that these outputs do not reveal). The centre
  (``D = 0``) gets ``M``, that is weight 1. The result is ``(sum w v + W // 2) // W`` in integers.
* So the weight is nlref's ``exp(-d^2 / h^2)`` with the same ``h`` and ``sigma=0``: both average the
  squared differences over the patch and the channels. What nlref cannot do is the cut-off: weights below
  0.001 are dropped, and that is nearly all the difference between the two.
* ``fastNlMeansDenoisingColored`` converts with ``COLOR_LBGR2Lab`` (the input is taken as *linear* BGR, no
  sRGB gamma), denoises the 8-bit L channel with ``h`` and the two-channel ``ab`` image with ``hColor``
  (their distance is the mean over a and b), and converts back with ``COLOR_Lab2LBGR``; a fourth
  (alpha) channel comes back as 255.
* ``fastNlMeansDenoisingMulti`` compares 2-D templates in the frames ``index +- temporalWindowSize // 2``
  (which must exist) and averages over all their search windows: nlref's video search with patch
  ``(1, t, t)`` and search window ``(T, s, s)``.
* ``normType=NORM_L1`` (the only norm for 16-bit input) sums absolute differences and weighs by
  ``exp(-mean^2 / (h^2 C))``: a Gaussian in the mean absolute difference, which nlref does not offer.
"""

import warnings

import numpy as np
import pytest

import nlref
from nlref.data import camera

cv2 = pytest.importorskip("cv2")

INT_MAX = 2 ** 31 - 1
INT64_MAX = 2 ** 63 - 1


def _smooth_noisy(shape, seed, sigma=15.0, dtype=np.uint8):
    """A smooth random image plus Gaussian noise, rounded and clipped to ``dtype``."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    rough = rng.random(shape)
    for axis in (0, 1):  # a few box passes make it smooth
        for _ in range(3):
            rough = (np.roll(rough, 1, axis) + rough + np.roll(rough, -1, axis)) / 3
    rough = (rough - rough.min()) / np.ptp(rough)
    noisy = top * (0.15 + 0.7 * rough) + sigma * top / 255 * rng.standard_normal(shape)
    return np.clip(np.rint(noisy), 0, top).astype(dtype)


def _box_sum(e, t):
    """Sums of ``e`` (2-D) over every ``t x t`` box that fits (integral image, exact for integers)."""
    c = np.zeros((e.shape[0] + 1, e.shape[1] + 1), dtype=e.dtype)
    c[1:, 1:] = e.cumsum(0).cumsum(1)
    return c[t:, t:] - c[:-t, t:] - c[t:, :-t] + c[:-t, :-t]


def _opencv_model(frames, index, h, t, s, *, temporal=1, norm="l2", integer=True, cutoff=True,
                  border="reflect", template_is_radius=False, distance="mean", channel_mean=True):
    """OpenCV's fastNlMeansDenoising(Multi) written from the facts above, one keyword per convention.

    ``frames``: a list of ``(H, W)`` or ``(H, W, C)`` integer images; the one at ``index`` is denoised
    from the ``temporal`` frames around it. The defaults are OpenCV's conventions; each keyword swaps one
    for a wrong alternative. ``integer=False`` gives the float weights and estimate without the
    distance steps, the fixed point and the rounding (keeping the cut-off when ``cutoff``).
    """
    shape = frames[0].shape
    frames = [f if f.ndim == 3 else f[..., None] for f in frames]
    dtype = frames[0].dtype
    top = np.iinfo(dtype).max
    channels = frames[0].shape[-1]
    th = t if template_is_radius else t // 2
    sh = s // 2
    t = 2 * th + 1
    s = 2 * sh + 1
    b = th + sh
    pads = [np.pad(f.astype(np.int64), ((b, b), (b, b), (0, 0)), mode=border) for f in frames]
    height, width = frames[0].shape[:2]
    big = INT64_MAX if dtype == np.uint16 else INT_MAX  # the accumulator type: int64 for 16-bit
    fixed_one = min(big // (temporal * s * s * top), INT_MAX)
    shift = 0
    while (1 << shift) < t * t:
        shift += 1
    hh = h * h * (channels if channel_mean else 1)
    centre = pads[index][sh:sh + height + 2 * th, sh:sh + width + 2 * th]
    num = np.zeros((height, width, channels), np.int64 if integer else np.float64)
    den = np.zeros((height, width, 1), np.int64 if integer else np.float64)
    for f in range(index - temporal // 2, index + temporal // 2 + 1):
        for dy in range(-sh, sh + 1):
            for dx in range(-sh, sh + 1):
                other = pads[f][sh + dy:sh + dy + height + 2 * th, sh + dx:sh + dx + width + 2 * th]
                diff = centre - other
                e = (diff * diff if norm == "l2" else np.abs(diff)).sum(-1)
                total = _box_sum(e, t)
                if distance == "sum":
                    mean = total.astype(np.float64)
                elif integer:
                    mean = (total >> shift) * ((1 << shift) / (t * t))
                else:
                    mean = total / (t * t)
                w = np.exp(-(mean if norm == "l2" else mean * mean) / hh)
                if integer:
                    w = np.rint(fixed_one * w).astype(np.int64)
                    if cutoff:
                        w[w < 0.001 * fixed_one] = 0
                elif cutoff:
                    w[w < 0.001] = 0
                num += w[..., None] * pads[f][b + dy:b + dy + height, b + dx:b + dx + width]
                den += w[..., None]
    out = (num + den // 2) // den if integer else num / den
    return out.reshape(shape)


def _opencv_model_2d(image, h, t, s, **kwargs):
    return _opencv_model([image], 0, h, t, s, **kwargs)


# --- windows and border --------------------------------------------------------------------------


@pytest.mark.parametrize("search,width", [(3, 3), (5, 5), (4, 5), (8, 9)])
def test_search_window_is_a_full_width_and_the_border_reflect_101(search, width):
    """At a huge h every weight is the fixed-point one: the output is the rounded box mean of the
    reflect-101 image over ``width x width`` (an even ``search`` means the next odd width)."""
    image = _smooth_noisy((17, 21), seed=search, sigma=40.0)
    opencv = cv2.fastNlMeansDenoising(image, None, 1e6, 3, search)
    r = width // 2
    box = _box_sum(np.pad(image.astype(np.int64), r, mode="reflect"), width)
    n = width * width
    assert np.array_equal(opencv, (box + n // 2) // n)
    # the test can tell: a radius, or the other reflection (edge repeated), gives other numbers
    radius = _box_sum(np.pad(image.astype(np.int64), search, mode="reflect"), 2 * search + 1)
    assert not np.array_equal(opencv, (radius + (2 * search + 1) ** 2 // 2) // (2 * search + 1) ** 2)
    symmetric = _box_sum(np.pad(image.astype(np.int64), r, mode="symmetric"), width)
    assert not np.array_equal(opencv, (symmetric + n // 2) // n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nlref warns that such an h blurs the image flat
        ours = nlref.nl_means(image, h=1e6, sigma=0, patch_size=3, search_size=width)
    assert np.array_equal(ours, opencv)  # nlref's search_size is OpenCV's searchWindowSize


def test_even_template_means_the_next_odd_width_and_multi_refuses_even_sizes():
    image = _smooth_noisy((20, 22), seed=3)
    assert np.array_equal(cv2.fastNlMeansDenoising(image, None, 12, 6, 9),
                          cv2.fastNlMeansDenoising(image, None, 12, 7, 9))
    assert not np.array_equal(cv2.fastNlMeansDenoising(image, None, 12, 5, 9),
                              cv2.fastNlMeansDenoising(image, None, 12, 7, 9))
    frames = [image] * 3
    for temporal, template, search in [(3, 6, 9), (3, 5, 8), (2, 5, 9)]:
        with pytest.raises(cv2.error, match="odd"):
            cv2.fastNlMeansDenoisingMulti(frames, 1, temporal, None, 12, template, search)


def test_defaults_are_h_3_template_7_search_21():
    rng = np.random.default_rng(4)
    image = np.rint(120 + 3 * rng.standard_normal((30, 34))).astype(np.uint8)  # noise near h = 3: h matters
    default = cv2.fastNlMeansDenoising(image)
    assert np.array_equal(default, cv2.fastNlMeansDenoising(image, None, 3, 7, 21))
    for other in [(4, 7, 21), (3, 5, 21), (3, 7, 19)]:
        assert not np.array_equal(default, cv2.fastNlMeansDenoising(image, None, *other))
    bgr = np.rint(np.array([60, 120, 180]) + 10 * rng.standard_normal((30, 34, 3))).astype(np.uint8)
    assert np.array_equal(cv2.fastNlMeansDenoisingColored(bgr),
                          cv2.fastNlMeansDenoisingColored(bgr, None, 3, 3, 7, 21))
    for other in [(4, 3), (3, 4)]:
        assert not np.array_equal(cv2.fastNlMeansDenoisingColored(bgr),
                                  cv2.fastNlMeansDenoisingColored(bgr, None, *other, 7, 21))


# --- the weight function ---------------------------------------------------------------------------

SINGLE_CASES = [  # (shape, h, template, search)
    ((24, 28), 10.0, 7, 21),
    ((24, 28), 20.0, 3, 5),
    ((24, 28), 5.0, 5, 7),
    ((24, 28), 12.0, 6, 8),  # even widths
    ((20, 23, 2), 15.0, 5, 9),
    ((20, 23, 3), 12.0, 5, 9),
    ((20, 23, 4), 25.0, 3, 7),
]


@pytest.mark.parametrize("shape,h,t,s", SINGLE_CASES)
def test_model_reproduces_opencv_bit_for_bit(shape, h, t, s):
    """Reflect-101, full widths, the mean of squared differences over the template and the channels in
    steps of 2^k / t^2, exp(-mean / h^2), the 0.001 cut-off, fixed-point weights, integer rounding."""
    image = _smooth_noisy(shape, seed=sum(shape) + t)
    opencv = cv2.fastNlMeansDenoising(image, None, h, t, s)
    assert np.array_equal(_opencv_model_2d(image, h, t, s), opencv)


WRONG = {  # one convention swapped for a plausible wrong one
    "template a radius": dict(template_is_radius=True),
    "distance a sum, not a mean": dict(distance="sum"),
    "edge sample repeated (symmetric border)": dict(border="symmetric"),
    "no 0.001 cut-off": dict(cutoff=False),
    "channels summed, not averaged": dict(channel_mean=False),
}


@pytest.mark.parametrize("wrong", sorted(WRONG))
def test_model_with_one_wrong_convention_does_not_reproduce_opencv(wrong):
    """The bit-for-bit test can fail: each wrong convention changes the output on these inputs."""
    image = _smooth_noisy((24, 28, 3), seed=11)
    opencv = cv2.fastNlMeansDenoising(image, None, 15.0, 5, 9)
    assert np.array_equal(_opencv_model_2d(image, 15.0, 5, 9), opencv)
    assert not np.array_equal(_opencv_model_2d(image, 15.0, 5, 9, **WRONG[wrong]), opencv)


def test_per_channel_h_gives_each_channel_its_own_weights_from_the_joint_distance():
    image = _smooth_noisy((20, 23, 3), seed=5)
    hs = [6.0, 12.0, 30.0]
    per_channel = cv2.fastNlMeansDenoising(image, h=np.array(hs, np.float32), templateWindowSize=5,
                                           searchWindowSize=9)
    for c, h in enumerate(hs):
        assert np.array_equal(per_channel[..., c], cv2.fastNlMeansDenoising(image, None, h, 5, 9)[..., c])


# --- the h mapping and the agreement with nlref ----------------------------------------------------


@pytest.mark.parametrize("shape,h,t,s,channel_axis", [
    ((24, 28), 10.0, 7, 11, None),
    ((24, 28), 25.0, 3, 9, None),
    ((20, 23, 3), 12.0, 5, 9, -1),
])
def test_without_its_integer_steps_and_cut_off_opencv_is_nlref_with_the_same_h(shape, h, t, s, channel_axis):
    """h_nlref = h_OpenCV, sigma = 0, patch_size = templateWindowSize, search_size = searchWindowSize."""
    image = _smooth_noisy(shape, seed=7)
    exact = _opencv_model_2d(image, h, t, s, integer=False, cutoff=False)
    ours = nlref.nl_means(image.astype(np.float64), h=h, sigma=0, patch_size=t, search_size=s,
                          channel_axis=channel_axis)
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-9)
    # the mapping is the identity: another h is another weight function
    other = nlref.nl_means(image.astype(np.float64), h=h * 1.2, sigma=0, patch_size=t, search_size=s,
                           channel_axis=channel_axis)
    assert np.abs(other - exact).max() > 0.1


def _camera_crop_noisy(sigma=20.0, seed=0):
    """camera's 128x128 crop at rows 200.., columns 180.. (the man), in grey levels, plus noise, as uint8."""
    clean = np.rint(camera()[200:328, 180:308].astype(np.float64) * 255)
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(clean + sigma * rng.standard_normal(clean.shape)), 0, 255).astype(np.uint8)


def test_nlref_with_the_same_h_agrees_with_opencv_up_to_its_cut_off():
    """Measured on a 128x128 crop of camera with noise 20, h = 18, 7x7 / 21x21 (docs/nlmeans.md, section 7).

    nlref differs from OpenCV by up to 5 grey levels (93.5 % of the pixels equal); OpenCV's cut-off, put
    into nlref's float weights, brings every pixel within 1 grey level (99.6 % equal): the rest is
    OpenCV's integer arithmetic (distance steps, fixed-point weights, rounding).
    """
    noisy = _camera_crop_noisy()
    h, t, s = 18.0, 7, 21
    opencv = cv2.fastNlMeansDenoising(noisy, None, h, t, s).astype(int)
    ours = nlref.nl_means(noisy, h=h, sigma=0, patch_size=t, search_size=s).astype(int)
    diff = np.abs(ours - opencv)
    assert diff.max() <= 5
    assert (diff == 0).mean() >= 0.93
    with_cut_off = np.floor(_opencv_model_2d(noisy, h, t, s, integer=False, cutoff=True) + 0.5)
    assert np.abs(with_cut_off - opencv).max() <= 1
    assert (with_cut_off == opencv).mean() >= 0.99


# --- colour, video, L1 -----------------------------------------------------------------------------


def test_colored_denoises_linear_bgr_cielab_l_with_h_and_ab_with_hcolor():
    bgr = _smooth_noisy((20, 24, 3), seed=9, sigma=12.0)
    h, h_color, t, s = 10.0, 15.0, 5, 9
    opencv = cv2.fastNlMeansDenoisingColored(bgr, None, h, h_color, t, s)

    def by_hand(to_lab, from_lab, h_l, h_ab):
        lab = cv2.cvtColor(bgr, to_lab)
        lightness = cv2.fastNlMeansDenoising(np.ascontiguousarray(lab[..., 0]), None, h_l, t, s)
        ab = cv2.fastNlMeansDenoising(np.ascontiguousarray(lab[..., 1:]), None, h_ab, t, s)
        return cv2.cvtColor(np.dstack([lightness, ab]), from_lab)

    assert np.array_equal(opencv, by_hand(cv2.COLOR_LBGR2Lab, cv2.COLOR_Lab2LBGR, h, h_color))
    assert not np.array_equal(opencv, by_hand(cv2.COLOR_BGR2Lab, cv2.COLOR_Lab2BGR, h, h_color))  # not sRGB
    assert not np.array_equal(opencv, by_hand(cv2.COLOR_LBGR2Lab, cv2.COLOR_Lab2LBGR, h_color, h))
    # the ab image's distance is the mean over a and b (two channels, h^2 * 2 in the weight)
    lab = cv2.cvtColor(bgr, cv2.COLOR_LBGR2Lab)
    ab = np.ascontiguousarray(lab[..., 1:])
    assert np.array_equal(cv2.fastNlMeansDenoising(ab, None, h_color, t, s),
                          _opencv_model_2d(ab, h_color, t, s))
    bgra = np.dstack([bgr, np.full(bgr.shape[:2], 77, np.uint8)])
    with_alpha = cv2.fastNlMeansDenoisingColored(bgra, None, h, h_color, t, s)
    assert np.array_equal(with_alpha[..., :3], opencv) and (with_alpha[..., 3] == 255).all()
    # 8-bit Lab is lossy: at h = hColor = 0 (only identical patches count) the colours still move
    assert np.abs(cv2.fastNlMeansDenoisingColored(bgr, None, 0, 0, t, s).astype(int) - bgr).max() > 0
    # linear: mid-grey 128 is L = 194 of 255 (L* = 76), where sRGB's conversion gives 137 (L* = 54)
    grey = np.full((1, 1, 3), 128, np.uint8)
    assert cv2.cvtColor(grey, cv2.COLOR_LBGR2Lab)[0, 0, 0] == 194
    assert cv2.cvtColor(grey, cv2.COLOR_BGR2Lab)[0, 0, 0] == 137


def test_multi_compares_2d_templates_over_the_temporal_window():
    frames = [_smooth_noisy((18, 21), seed=20 + k) for k in range(5)]
    h, t, s, temporal, index = 14.0, 5, 7, 3, 2
    opencv = cv2.fastNlMeansDenoisingMulti(frames, index, temporal, None, h, t, s)
    assert np.array_equal(opencv, _opencv_model(frames, index, h, t, s, temporal=temporal))
    assert not np.array_equal(opencv, _opencv_model(frames, index, h, t, s, temporal=5))
    # nlref: the clip as a video, patch (1, t, t), search window (temporal, s, s)
    exact = _opencv_model(frames, index, h, t, s, temporal=temporal, integer=False, cutoff=False)
    video = np.stack(frames).astype(np.float64)
    ours = nlref.nl_means(video, h=h, sigma=0, patch_size=(1, t, t), search_size=(temporal, s, s))
    np.testing.assert_allclose(ours[index], exact, rtol=0, atol=1e-9)
    # the window must lie inside the sequence (no temporal border), and temporalWindowSize 1 is one frame
    with pytest.raises(cv2.error, match="imgToDenoiseIndex"):
        cv2.fastNlMeansDenoisingMulti(frames, 0, 3, None, h, t, s)
    assert np.array_equal(cv2.fastNlMeansDenoisingMulti(frames, index, 1, None, h, t, s),
                          cv2.fastNlMeansDenoising(frames[index], None, h, t, s))


@pytest.mark.parametrize("dtype,h", [(np.uint16, 3000.0), (np.uint16, 800.0), (np.uint8, 12.0)])
def test_l1_norm_weighs_by_a_gaussian_in_the_mean_absolute_difference(dtype, h):
    image = _smooth_noisy((20, 23), seed=13, dtype=dtype)
    opencv = cv2.fastNlMeansDenoising(image, h=[h], templateWindowSize=5, searchWindowSize=9,
                                      normType=cv2.NORM_L1)
    assert np.array_equal(opencv, _opencv_model_2d(image, h, 5, 9, norm="l1"))


def test_only_8_bit_with_l2_and_8_or_16_bit_with_l1():
    image16 = _smooth_noisy((20, 23), seed=13, dtype=np.uint16)
    with pytest.raises(cv2.error, match="Only CV_8U is supported for NORM_L2"):
        cv2.fastNlMeansDenoising(image16, h=[3000.0], templateWindowSize=5, searchWindowSize=9)
    with pytest.raises(cv2.error, match="Only CV_8U is supported"):
        cv2.fastNlMeansDenoising(image16.astype(np.float32), None, 10.0, 5, 9)


def main():
    """The agreement quoted in docs/nlmeans.md section 7: camera 512x512, noise 20, 7x7 / 21x21.

    Run from the repository root: ``python tests/nlmeans/test_opencv_conventions.py`` (about 10 s).
    """
    clean = np.rint(camera().astype(np.float64) * 255)
    rng = np.random.default_rng(0)
    noisy = np.clip(np.rint(clean + 20 * rng.standard_normal(clean.shape)), 0, 255).astype(np.uint8)
    print(f"OpenCV {cv2.__version__}, camera 512x512, noise 20 grey levels, template 7, search 21")
    for h in (10, 18, 30):
        opencv = cv2.fastNlMeansDenoising(noisy, None, h, 7, 21).astype(int)
        ours = nlref.nl_means(noisy, h=h, sigma=0, patch_size=7, search_size=21).astype(int)
        with_cut_off = np.floor(_opencv_model_2d(noisy, h, 7, 21, integer=False, cutoff=True) + 0.5)
        for name, result in (("nlref (h, sigma=0)", ours), ("nlref's float weights + OpenCV's cut-off", with_cut_off)):
            diff = np.abs(result - opencv)
            print(f"h = {h}: {name}: max |diff| {diff.max():.0f}, equal {100 * (diff == 0).mean():.1f} %, "
                  f"within 1 {100 * (diff <= 1).mean():.2f} %")


if __name__ == "__main__":
    main()
