import numpy as np
import pytest

import nlref
import nlref.backend as B
from nlref.data.sprites import sprite_clips


def test_figures_accept_any_array_library(xp_cpu):
    img = B.asarray(nlref.data.camera()[:32, :32], xp=xp_cpu)
    fig = nlref.viz.image_grid([img, img], ["a", "b"])
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "b"
    fig = nlref.viz.averaging_plot([1, 2, 4], [0.01, 0.005, 0.0025], 0.1)
    line = fig.axes[0].lines[1]
    np.testing.assert_allclose(line.get_ydata(), [0.01, 0.005, 0.0025])  # the sigma^2 / N law
    w = nlref.nl_means_weights(img, (10, 12), sigma=0.05, search_size=9, patch_size=3)
    fig = nlref.viz.weights_plot(img, [(10, 12)], [w], search_size=(9, 9))
    assert len(fig.axes) == 3                                  # the image, the weights, their colour bar
    import matplotlib.pyplot as plt

    plt.close("all")


def test_attention_plot(xp_cpu):
    import matplotlib.pyplot as plt
    import pytest

    img = B.asarray(nlref.data.camera()[:32, :32], xp=xp_cpu)
    a = np.zeros((16, 4))
    a[5, 2] = 1.0  # query (1, 1) on the 4x4 grid attends to key (1, 0) of the 2x2 grid
    fig = nlref.viz.attention_plot(img, B.asarray(a, xp=xp_cpu), [(1, 1)], query_shape=(4, 4), key_shape=(2, 2))
    shown = fig.axes[1].images[1].get_array()
    np.testing.assert_array_equal(np.ma.filled(shown, 0), [[0, 0], [1, 0]])
    np.testing.assert_array_equal(np.ma.getmaskarray(shown), [[1, 1], [0, 1]])   # weights near 0 left clear
    assert len(fig.axes) == 3 and fig.axes[2].get_ylabel().startswith("attention weight")   # its colour bar
    with pytest.raises(ValueError, match=r"attention must have shape \(16, 4\)"):
        nlref.viz.attention_plot(img, a[:, :3], [(0, 0)], query_shape=(4, 4), key_shape=(2, 2))
    plt.close("all")


def _agg():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def test_clip_grid(xp_cpu):
    import pytest

    plt = _agg()
    clips = sprite_clips(2, frames=6, size=16, xp=xp_cpu)
    fig = nlref.viz.clip_grid(clips.video[0, ...], title="label 1")
    assert len(fig.axes) == 7 and fig.axes[2].get_title() == "t = 2"    # 6 frames and the brightness bar
    assert fig.axes[6].get_ylabel().startswith("brightness")
    np.testing.assert_allclose(np.asarray(fig.axes[4].images[0].get_array()),
                               np.clip(B.to_numpy(clips.video)[0, 0, 4], 0, 1), atol=1e-6)
    rgb = sprite_clips(1, frames=6, size=16, channels=3).video[0]
    fig = nlref.viz.clip_grid(rgb)
    assert fig.axes[0].images[0].get_array().shape == (16, 16, 3)
    assert fig.get_suptitle() == "a clip of 6 frames of 16x16 pixels, one per panel"   # was none
    fig = nlref.viz.clip_grid(np.zeros((3, 8, 8)), titles=["a", "b", "c"])  # (T, H, W)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"video must have shape \(C, T, H, W\) with C = 1 or 3.*\(2, 3, 8, 8\)"):
        nlref.viz.clip_grid(B.asarray(np.zeros((2, 3, 8, 8)), xp=xp_cpu))
    with pytest.raises(ValueError, match=r"one title per frame \(3\), got 2"):
        nlref.viz.clip_grid(B.asarray(np.zeros((3, 8, 8)), xp=xp_cpu), titles=["a", "b"])
    plt.close("all")


def _history(accs):
    return [{"epoch": i + 1, "train_loss": 0.7 - 0.01 * i, "val_loss": 0.69, "train_accuracy": a - 0.01,
             "val_accuracy": a} for i, a in enumerate(accs)]


def test_training_curves():
    import pytest

    plt = _agg()
    fig = nlref.viz.training_curves({"C2D": _history([0.5, 0.52, 0.55]), "NL C2D": _history([0.5, 0.6, 0.7])})
    loss, acc = fig.axes
    assert "C2D, NL C2D" in fig._suptitle.get_text() and acc.get_title() == "accuracy per epoch"
    fig.canvas.draw()
    ticks = [t for t in loss.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)     # whole epochs only, never 1.5
    assert len(fig.axes) == 2
    assert len(loss.lines) == 4                               # train and val loss of two runs
    assert len(acc.lines) == 5                                # train and val accuracy of two runs + chance
    val_nl = next(line for line in acc.lines if line.get_label() == "NL C2D (val)")
    np.testing.assert_allclose(val_nl.get_ydata(), [0.5, 0.6, 0.7])
    np.testing.assert_allclose(val_nl.get_xdata(), [1, 2, 3])
    chance = next(line for line in acc.lines if line.get_label() == "chance")
    np.testing.assert_allclose(chance.get_ydata(), [0.5, 0.5])
    assert len(nlref.viz.training_curves({"a": _history([0.5])}, metric="val_loss").axes) == 1
    with pytest.raises(ValueError, match=r"metric 'val_top5' is not in the history of 'a'"):
        nlref.viz.training_curves({"a": _history([0.5])}, metric="val_top5")
    with pytest.raises(ValueError, match="histories must be a non-empty dict"):
        nlref.viz.training_curves({})
    with pytest.raises(ValueError, match=r"histories\['a'\] must be a non-empty list"):
        nlref.viz.training_curves({"a": []})
    plt.close("all")


def test_spacetime_attention_plot(xp_cpu):
    import pytest

    plt = _agg()
    clip = B.asarray(np.random.default_rng(0).random((1, 4, 16, 16)), xp=xp_cpu)
    key_shape = (4, 2, 2)
    row = np.zeros(16)
    row[2 * 4 + 1 * 2 + 0] = 0.75                             # frame 2, key cell (1, 0)
    row[3 * 4 + 0 * 2 + 1] = 0.25                             # frame 3, key cell (0, 1)
    fig = nlref.viz.spacetime_attention_plot(clip, B.asarray(row, xp=xp_cpu), (0, 3, 3), key_shape=key_shape,
                                             query_shape=(4, 4, 4), title="where it looks")
    assert len(fig.axes) == 10                                # 4 frames over 4 attention maps, 2 colour bars
    assert [ax.get_ylabel() for ax in fig.axes[8:]] == ["brightness (sqrt scale)", "attention weight"]
    shown = fig.axes[4 + 2].images[1]                         # the lower row, frame 2: the attention slice
    np.testing.assert_array_equal(np.ma.filled(shown.get_array(), 0), [[0, 0], [0.75, 0]])
    assert shown.get_clim() == fig.axes[4 + 3].images[1].get_clim() == (0, 0.75)   # one scale for all frames
    assert fig.axes[4 + 2].images[1].get_extent() == [-0.5, 15.5, 15.5, -0.5]   # stretched over the frame
    assert [ax.get_title() for ax in fig.axes[4:8]] == ["mass 0.00", "mass 0.00", "mass 0.75", "mass 0.25"]
    marker = fig.axes[0].lines[0]                             # the query, on its own frame only
    np.testing.assert_allclose([marker.get_xdata()[0], marker.get_ydata()[0]], [13.5, 13.5])
    assert not fig.axes[1].lines and "query" in fig.axes[0].get_title()
    # query in pixels; keys pooled in time too: frames 0, 1 share key frame 0
    fig = nlref.viz.spacetime_attention_plot(clip[0, ...], np.full(8, 1 / 8), (1, 5, 6), key_shape=(2, 2, 2))
    assert [ax.get_title() for ax in fig.axes[4:8]] == ["mass 0.25"] * 4
    np.testing.assert_allclose(fig.axes[1].lines[0].get_xydata(), [[6, 5]])
    bad = [((row[:15],), {}, r"attention_row must have shape \(16,\) for key_shape \(4, 2, 2\), got \(15,\)"),
           ((row,), {"key_shape": (4, 2)}, r"key_shape must be 3 positive integers"),
           ((row,), {"query_shape": (4, 4, 4), "query": (0, 4, 0)}, r"query must be \(t, y, x\) inside \(4, 4, 4\)"),
           ((row,), {"query_shape": (2, 4, 4)}, "query_shape\\[0\\] must equal the clip's number of frames 4"),
           ((np.full(16, np.nan),), {}, "non-finite"),
           ((np.ones(12),), {"key_shape": (3, 2, 2)}, r"4 frames must be a multiple of key_shape\[0\] = 3")]
    for args, kw, message in bad:
        kw = {"key_shape": key_shape, "query": (0, 0, 0), **kw}
        with pytest.raises(ValueError, match=message):
            nlref.viz.spacetime_attention_plot(clip, *args, kw.pop("query"), **kw)
    flat = B.asarray(np.zeros((16, 16)), xp=xp_cpu)
    with pytest.raises(ValueError, match=r"clip must have shape \(C, T, H, W\)"):
        nlref.viz.spacetime_attention_plot(flat, row, (0, 0, 0), key_shape=key_shape)
    plt.close("all")


def test_image_grid_signed_panel_with_colour_bar():
    import pytest

    plt = _agg()
    img = np.linspace(-0.2, 0.2, 16).reshape(4, 4)
    fig = nlref.viz.image_grid([img + 0.5, img], ["image", "residual"], limits=[None, (-0.3, 0.3)],
                               colorbars=[None, "residual"], title="t")
    assert len(fig.axes) == 3 and fig.axes[2].get_ylabel() == "residual"
    np.testing.assert_allclose(np.asarray(fig.axes[1].images[0].get_array()), img)   # not clipped to [0, 1]
    assert fig.axes[1].images[0].get_clim() == (-0.3, 0.3)
    with pytest.raises(ValueError, match=r"limits must hold one entry per image \(2\), got 1"):
        nlref.viz.image_grid([img, img], limits=[None])
    plt.close("all")


def test_weights_plot_shares_one_scale_and_marks_search_windows():
    plt = _agg()
    img = nlref.data.camera()[:40, :40]
    maps = [nlref.nl_means_weights(img, p, sigma=0.05, search_size=9, patch_size=3) for p in [(10, 12), (30, 30)]]
    fig = nlref.viz.weights_plot(img, [(10, 12), (30, 30)], maps, search_size=(9, 9))
    assert [ax.images[0].get_clim() for ax in fig.axes[1:3]] == [(0, 1), (0, 1)]
    assert fig.axes[3].get_ylabel() == "weight w(p, q)"
    assert "search windows" in fig.axes[0].get_title() and len(fig.axes[0].patches) == 2
    assert fig.axes[1].images[0].get_extent() == [-4.5, 4.5, 4.5, -4.5]            # offsets q - p, centred on 0
    plt.close("all")


def test_weights_and_attention_plots_refuse_what_they_cannot_draw():
    """A negative query index wrapped around to the other side of the grid, a query outside it raised an
    IndexError (or drew another row's attention), and weight maps of another shape were drawn stretched."""
    import pytest

    plt = _agg()
    img = nlref.data.camera()[:32, :32]
    a = np.full((16, 4), 0.25)
    for queries in ([(-1, 0)], [(0, 4)], [(4, 0)], [], [(1,)], [(0.5, 1)], [(1, 1, 1)]):
        with pytest.raises(ValueError, match=r"queries must be a non-empty list of \(row, col\) integer pairs with "
                                             r"0 <= row < 4 and 0 <= col < 4"):
            nlref.viz.attention_plot(img, a, queries, query_shape=(4, 4), key_shape=(2, 2))
    with pytest.raises(ValueError, match=r"key_shape must be 2 positive integers \(rows, cols\), got \(0, 4\)"):
        nlref.viz.attention_plot(img, a, [(0, 0)], query_shape=(4, 4), key_shape=(0, 4))
    with pytest.raises(ValueError, match=r"titles must hold one title per query \(1\), got 2"):
        nlref.viz.attention_plot(img, a, [(0, 0)], query_shape=(4, 4), key_shape=(2, 2), titles=["a", "b"])
    with pytest.raises(ValueError, match="attention holds non-finite values"):
        nlref.viz.attention_plot(img, np.full((16, 4), np.nan), [(0, 0)], query_shape=(4, 4), key_shape=(2, 2))
    w = nlref.nl_means_weights(img, (10, 12), sigma=0.05, search_size=9, patch_size=3)
    for positions in ([(-1, 3)], [(32, 0)], []):
        with pytest.raises(ValueError, match=r"positions must be a non-empty list .* 0 <= row < 32 and 0 <= col < 32"):
            nlref.viz.weights_plot(img, positions, [w] * len(positions), search_size=(9, 9))
    with pytest.raises(ValueError, match=r"weight_maps must hold one array of shape search_size = \(9, 9\) per "
                                         r"position \(1\), got shapes \[\(9, 9\), \(9, 9\)\]"):
        nlref.viz.weights_plot(img, [(10, 12)], [w, w], search_size=(9, 9))
    with pytest.raises(ValueError, match=r"weight_maps must hold .* got shapes \[\(9, 9\)\]"):
        nlref.viz.weights_plot(img, [(10, 12)], [w], search_size=(7, 7))
    with pytest.raises(ValueError, match=r"search_size must be 2 positive integers"):
        nlref.viz.weights_plot(img, [(10, 12)], [w], search_size=9)
    fig = nlref.viz.weights_plot(img, [(np.int64(10), 12)], [w], search_size=(9, 9))  # NumPy integers are taken
    assert len(fig.axes) == 3
    plt.close("all")


def test_every_figure_has_a_title():
    """attention_plot had no figure title at all, spacetime_attention_plot none unless asked."""
    plt = _agg()
    img = nlref.data.camera()[:32, :32]
    fig = nlref.viz.attention_plot(img, np.full((16, 4), 0.25), [(0, 0)], query_shape=(4, 4), key_shape=(2, 2))
    assert "attends" in fig.get_suptitle()
    fig = nlref.viz.attention_plot(img, np.full((16, 4), 0.25), [(0, 0)], query_shape=(4, 4), key_shape=(2, 2),
                                   title="mine")
    assert fig.get_suptitle() == "mine"
    clip = np.random.default_rng(0).random((1, 4, 8, 8))
    fig = nlref.viz.spacetime_attention_plot(clip, np.full(16, 1 / 16), (1, 2, 3), key_shape=(4, 2, 2))
    assert fig.get_suptitle() == "where query (t, y, x) = (1, 2, 3) attends across the frames"
    plt.close("all")


@pytest.mark.parametrize("call, match", [
    # each of these raised matplotlib's or NumPy's error (or drew a wrong figure without a word)
    (lambda img: nlref.viz.image_grid([]), "images must be a non-empty list"),           # ZeroDivisionError
    (lambda img: nlref.viz.image_grid(img), "images must be a non-empty list"),          # "Invalid shape (32,)"
    (lambda img: nlref.viz.image_grid([np.ones(5)]), r"images\[0\] must be a non-empty grey"),
    (lambda img: nlref.viz.image_grid([np.ones((3, 8, 8))]), "channels first"),          # "Invalid shape"
    (lambda img: nlref.viz.image_grid([np.ones((0, 4))]), r"images\[0\] must be a non-empty"),
    (lambda img: nlref.viz.image_grid([img, img], titles="ab"), "titles must be a list"),  # one letter per image
    (lambda img: nlref.viz.image_grid([img], ncols=-1), "ncols must be a positive int"),
    (lambda img: nlref.viz.image_grid([img], ncols=1.5), "ncols must be a positive int"),
    (lambda img: nlref.viz.image_grid([img], limits=[(1, 0)]), r"limits\[0\] must be None or \(vmin, vmax\)"),
    (lambda img: nlref.viz.image_grid([img], limits=[(1,)]), r"limits\[0\] must be None"),   # IndexError
    (lambda img: nlref.viz.image_grid([img], size=-1), "size must be a finite number > 0"),
    (lambda img: nlref.viz.averaging_plot([1, 2, 4], [0.01, 0.005], 0.1), "one length"),
    (lambda img: nlref.viz.averaging_plot([0, 2], [0.01, 0.005], 0.1), "counts must be numbers of copies >= 1"),
    (lambda img: nlref.viz.averaging_plot([1, 2], [-0.01, 0.005], 0.1), "variances must be finite and > 0"),
    (lambda img: nlref.viz.averaging_plot([1, 2], [np.nan, 0.005], 0.1), "variances must be finite and > 0"),
    (lambda img: nlref.viz.averaging_plot([], [], 0.1), "non-empty"),                   # an empty plot
    (lambda img: nlref.viz.averaging_plot([1, 2], [0.01, 0.005], "0.1"), "sigma must be a finite number > 0"),
    (lambda img: nlref.viz.averaging_plot([1, 2], [0.01, 0.005], -0.1), "sigma must be a finite number > 0"),
    (lambda img: nlref.viz.weights_plot(img, [(3, 3)], [np.full((5, 5), np.nan)], search_size=(5, 5)),
     r"weight_maps must hold NL-means weights, in \[0, 1\]"),
    (lambda img: nlref.viz.weights_plot(img, [(3, 3)], [np.full((5, 5), 3.0)], search_size=(5, 5)),
     r"in \[0, 1\]"),                                                                    # "100% of them equal 1"
    (lambda img: nlref.viz.weights_plot(img, [(3, 3)], [np.ones((4, 4))], search_size=(4, 4)),
     "search_size must be odd"),                                                         # drawn off-centre
    (lambda img: nlref.viz.weights_plot(img[0], [(3, 3)], [np.ones((5, 5))], search_size=(5, 5)),
     "image must be a non-empty grey"),                                                  # IndexError
    (lambda img: nlref.viz.clip_grid(np.zeros((0, 8, 8))), "at least one frame"),
    (lambda img: nlref.viz.attention_plot(img, np.full((16, 4), 0.25), [(True, 0)], query_shape=(4, 4),
                                          key_shape=(2, 2)), "queries must be a non-empty list"),   # read as 1
    (lambda img: nlref.viz.clip_grid(np.zeros((2, 8, 8)), titles="ab"), "titles must hold one title per frame"),
    (lambda img: nlref.viz.spacetime_attention_plot(np.zeros((4, 8, 8)), np.full(16, 1 / 16), (0.5, 1, 1),
                                                    key_shape=(4, 2, 2)), r"query must be \(t, y, x\)"),  # read as 0
    (lambda img: nlref.viz.spacetime_attention_plot(np.zeros((4, 8, 8)), np.full(16, 1 / 16), (True, 1, 1),
                                                    key_shape=(4, 2, 2)), r"query must be \(t, y, x\)"),
    (lambda img: nlref.viz.spacetime_attention_plot(np.zeros((4, 8, 8)), np.full(16, 1 / 16), 3,
                                                    key_shape=(4, 2, 2)), r"query must be \(t, y, x\)"),
    (lambda img: nlref.viz.training_curves({"a": [{"train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5},
                                                  {"train_loss": 1.0}]}), r"histories\['a'\]\[1\] lacks 'val_loss'"),  # KeyError
    (lambda img: nlref.viz.training_curves({1: [{"train_loss": 1.0, "val_accuracy": 0.5}]}), "str labels"),
    (lambda img: nlref.viz.training_curves({"a": [{"train_loss": "x", "val_accuracy": 0.5}]}), "must hold numbers"),
    (lambda img: nlref.viz.training_curves({"a": [{"val_accuracy": 0.5}]}), "no train_loss or val_loss"),
])
def test_figures_refuse_bad_arguments_by_name(call, match):
    _agg()
    with pytest.raises(ValueError, match=match):
        call(nlref.data.camera()[:32, :32])


def test_image_grid_warns_when_a_0_255_image_would_be_drawn_white():
    plt = _agg()
    u8 = (nlref.data.camera()[:16, :16] * 255).astype(np.uint8)
    with pytest.warns(UserWarning, match=r"images\[0\] holds values up to 2\d\d, drawn on the \[0, 1\] grey scale"):
        nlref.viz.image_grid([u8])
    nlref.viz.image_grid([u8], limits=[(0, 255)])   # the caller said how: no warning
    plt.close("all")


def test_negative_weights_are_drawn_on_a_scale_centred_on_zero():
    """The dot product and the concatenation give negative weights; on magma's 0..max scale they were
    left clear (masked as "under 2 %"), so a key weighted -1 looked like one weighted 0."""
    import matplotlib.pyplot as plt

    img = nlref.data.camera()[:32, :32]
    a = np.zeros((16, 4))
    a[5, 2], a[5, 3] = -1.0, 0.5
    fig = nlref.viz.attention_plot(img, a, [(1, 1)], query_shape=(4, 4), key_shape=(2, 2))
    shown = fig.axes[1].images[1]
    assert shown.norm.vmin == -1.0 and shown.norm.vmax == 1.0
    np.testing.assert_array_equal(np.ma.getmaskarray(shown.get_array()), [[1, 1], [0, 0]])
    assert "0 at the centre" in fig.axes[2].get_ylabel()
    clip = np.random.default_rng(0).random((1, 4, 8, 8))
    row = np.zeros(2 * 2 * 2)
    row[1] = -0.25
    fig = nlref.viz.spacetime_attention_plot(clip, row, (0, 3, 3), key_shape=(2, 2, 2))
    norms = {(im.norm.vmin, im.norm.vmax) for ax in fig.axes for im in ax.images if im.get_cmap().name == "RdBu_r"}
    assert norms == {(-0.25, 0.25)}
    plt.close("all")


def test_image_grid_is_never_untitled():
    import matplotlib.pyplot as plt

    img = nlref.data.camera()[:16, :16]
    assert nlref.viz.image_grid([img, img])._suptitle.get_text() == "2 images, one per panel"
    assert nlref.viz.image_grid([img], title="")._suptitle is None                # asked for none
    assert nlref.viz.image_grid([img], ["clean"])._suptitle is None              # its panel is titled
    assert nlref.viz.image_grid([img], title="mine")._suptitle.get_text() == "mine"
    plt.close("all")
