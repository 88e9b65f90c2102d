"""The figure standard (tests/figcheck.py) on every figure of nlref.viz, and the check itself.

The demo's figures are checked in tests/cli/test_cli.py, on the demo run that module already makes.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import nlref  # noqa: E402
from nlref.data.sprites import sprite_clips  # noqa: E402
from tests.figcheck import figure_problems  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _attention(n, m, seed=0):
    a = np.random.default_rng(seed).random((n, m))
    return a / a.sum(axis=1, keepdims=True)


def _history(accs):
    return [{"epoch": i + 1, "train_loss": 0.7 - 0.02 * i, "val_loss": 0.69 - 0.01 * i, "train_accuracy": a - 0.02,
             "val_accuracy": a} for i, a in enumerate(accs)]


def _weights(count, search):
    noisy = nlref.add_gaussian_noise(nlref.data.camera()[96:224, 160:288], 0.08, seed=0)
    positions = [(40, 40), (64, 90), (100, 30)][:count]
    maps = [nlref.nl_means_weights(noisy, p, sigma=0.08, search_size=search, patch_size=5) for p in positions]
    return nlref.viz.weights_plot(noisy, positions, maps, search_size=(search, search))


def _clip():
    return sprite_clips(2, frames=8, size=16, seed=0).video[0]


camera = nlref.data.camera()[96:224, 160:288]
# every function of nlref.viz, called as the notebooks and the demo call it (several shapes of each)
FIGURES = {
    "image_grid": lambda: nlref.viz.image_grid([camera, camera[::-1]], ["clean", "flipped"]),
    "image_grid, untitled": lambda: nlref.viz.image_grid([camera, camera, camera], size=4),
    "image_grid, titled panels, size 4": lambda: nlref.viz.image_grid(
        [camera] * 3, [f"N = {n}: std of residual {0.1 / n ** 0.5:.3f}" for n in (1, 4, 16)], size=4),
    "image_grid, signed panel with colour bar": lambda: nlref.viz.image_grid(
        [camera, camera - 0.5], ["image", "residual"], limits=[None, (-0.5, 0.5)], colorbars=[None, "residual"],
        title="an image and a residual"),
    "image_grid, two rows, colour": lambda: nlref.viz.image_grid(
        [nlref.data.astronaut()[:64, :64]] * 4, ["a", "b", "c", "d"], ncols=2),
    "averaging_plot": lambda: nlref.viz.averaging_plot([1, 2, 4, 8], [0.01, 0.005, 0.0025, 0.00125], 0.1),
    "weights_plot, 1 pixel": lambda: _weights(1, 21),
    "weights_plot, 2 pixels": lambda: _weights(2, 9),
    "weights_plot, 3 pixels, 9x9": lambda: _weights(3, 9),
    "weights_plot, 3 pixels, 31x31": lambda: _weights(3, 31),
    "attention_plot": lambda: nlref.viz.attention_plot(camera, _attention(256, 64), [(1, 1), (8, 8), (12, 3)],
                                                       query_shape=(16, 16), key_shape=(8, 8)),
    "attention_plot, signed": lambda: nlref.viz.attention_plot(camera, _attention(16, 4) - 0.3, [(1, 1)],
                                                               query_shape=(4, 4), key_shape=(2, 2)),
    "clip_grid": lambda: nlref.viz.clip_grid(_clip()),
    "clip_grid, titled": lambda: nlref.viz.clip_grid(_clip(), titles=[f"t = {t}" for t in range(8)],
                                                     title="clip 0: label 1 (same)"),
    "training_curves": lambda: nlref.viz.training_curves({"C2D": _history([0.5, 0.55, 0.6]),
                                                          "NL C2D": _history([0.5, 0.7, 0.9])}),
    "training_curves, loss only": lambda: nlref.viz.training_curves({"C2D": _history([0.5, 0.6])},
                                                                    metric="val_loss"),
    "spacetime_attention_plot": lambda: nlref.viz.spacetime_attention_plot(
        _clip(), _attention(1, 8 * 2 * 2)[0], (3, 1, 2), key_shape=(8, 2, 2), query_shape=(8, 4, 4)),
    "spacetime_attention_plot, signed": lambda: nlref.viz.spacetime_attention_plot(
        _clip(), _attention(1, 8 * 2 * 2)[0] - 0.02, (3, 1, 2), key_shape=(8, 2, 2), query_shape=(8, 4, 4),
        title="a signed row"),
}


def test_every_viz_function_is_checked():
    drawn = {name.split(",")[0] for name in FIGURES}
    assert drawn == set(nlref.viz.__all__)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_every_viz_figure_meets_the_standard(name):
    """weights_plot's constrained layout left its maps' x labels below the figure's edge, their descenders cut
    off, with 2 or 3 pixels (found by figure_problems)."""
    fig = FIGURES[name]()
    assert figure_problems(fig) == []


# --------------------------------------------------------------------------- the check itself
def _figure():
    fig, ax = plt.subplots(figsize=(4, 3), layout="constrained")
    return fig, ax


def test_a_complete_figure_passes():
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3), layout="constrained")
    left.plot([1, 2, 3], [1, 4, 9], label="a")
    left.plot([1, 2, 3], [1, 2, 3], label="b")
    left.legend()
    left.set(title="two lines", xlabel="x", ylabel="y")
    shown = right.imshow(np.arange(16.0).reshape(4, 4), cmap="magma")
    right.axis("off")
    right.set_title("a map")
    fig.colorbar(shown, ax=right, label="value")
    assert figure_problems(fig) == []


@pytest.mark.parametrize("draw, expected", [
    (lambda fig, ax: ax.plot([1, 2], [3, 4]) and ax.set(xlabel="x", ylabel="y"), ["has no title"]),
    (lambda fig, ax: ax.plot([1, 2], [3, 4]) and ax.set(title="t", ylabel="y"), ["no x label"]),
    (lambda fig, ax: ax.plot([1, 2], [3, 4]) and ax.set(title="t", xlabel="x"), ["no y label"]),
    (lambda fig, ax: ax.plot([1, 2], [3, 4], [1, 2], [4, 3]) and ax.set(title="t", xlabel="x", ylabel="y"),
     ["draws 2 lines but has no legend"]),
    (lambda fig, ax: ax.imshow(np.eye(3), cmap="viridis") and ax.axis("off") and ax.set_title("t"),
     ["maps values to colours (AxesImage, colour map 'viridis') without a colour bar"]),
    (lambda fig, ax: ax.scatter([1, 2], [1, 2], c=[0.0, 1.0]) and ax.set(title="t", xlabel="x", ylabel="y"),
     ["maps values to colours (PathCollection"]),
    (lambda fig, ax: fig.colorbar(ax.imshow(np.eye(3)), ax=ax) and ax.axis("off") and ax.set_title("t"),
     ["the colour bar axes 1 has no label"]),
    (lambda fig, ax: ax.plot([1, 2], [3, 4]) and ax.set(title="a title far wider than a figure four inches wide "
                                                              "can show", xlabel="x", ylabel="y"),
     ["crosses the figure's edge"]),
    (lambda fig, ax: fig.set_layout_engine("none") or ax.imshow(np.eye(3), cmap="gray") and ax.axis("off")
     and ax.set_title("t") and fig.suptitle("a suptitle drawn over the title", y=0.93),
     ["the suptitle ('a suptitle drawn over the title') overlaps the title of axes 0 ('t')"]),
])
def test_each_missing_part_is_found(draw, expected):
    fig, ax = _figure()
    draw(fig, ax)
    problems = figure_problems(fig)
    assert len(problems) == len(expected) and all(e in p for e, p in zip(expected, problems)), problems


def test_what_needs_no_label_or_bar():
    """A grey photograph needs no colour bar, an image with its ticks off no axis labels, a single marker no
    legend, an empty panel of a grid nothing; a shared axis is labelled once, one colour bar serves every map on
    its scale, and the figure's suptitle titles every panel."""
    fig, axes = plt.subplots(2, 2, figsize=(6, 6), sharex=True, layout="constrained")
    axes[0, 0].imshow(np.eye(4), cmap="gray")
    axes[0, 0].plot(1, 1, "o")
    axes[0, 0].axis("off")
    axes[0, 1].axis("off")                                       # empty
    first = axes[1, 0].imshow(np.eye(4), cmap="magma", vmin=0, vmax=1)
    axes[1, 1].imshow(np.eye(4) / 2, cmap="magma", vmin=0, vmax=1)
    for ax in axes[1]:
        ax.set(xlabel="column", ylabel="row")
    fig.colorbar(first, ax=list(axes[1]), label="weight")
    fig.suptitle("one title for all")
    assert figure_problems(fig) == []


def test_the_benchmarks_figures_meet_the_standard(tmp_path, monkeypatch):
    """The --plot figures of the benchmarks (docs/images/block_memory_vs_n.png, nlmeans_time_vs_size.png),
    drawn from made-up measurements of the documented shape."""
    from pathlib import Path

    from matplotlib.figure import Figure

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_block
    import bench_nlmeans

    found, save = {}, Figure.savefig

    def checked_save(fig, path, *args, **kwargs):
        found[Path(path).suffix] = figure_problems(fig)
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked_save)
    ns = [256, 1024, 4096, 16384]
    bench_block.plot_memory(ns, [0.9, 9.0, 130.0, 2050.0], [0.8, 2.5, 9.5, 37.0], tmp_path / "memory.png")
    sizes = [128, 256, 512, 1024]
    bench_nlmeans.plot_size_sweep(sizes, {"nlref": [0.02, 0.08, 0.3, 1.2], "scikit-image": [0.05, 0.2, 0.8, 3.2],
                                          "OpenCV": [0.01, 0.04, 0.15, 0.6]}, tmp_path / "time.svg")
    assert found == {".png": [], ".svg": []}


def test_check_open_figures_names_the_figure_that_fails():
    """What the notebooks' cells run at their end (conftest.py installs it in nbmake's kernels)."""
    from tests.figcheck import check_open_figures

    fig, ax = _figure()
    ax.plot([1, 2], [3, 4])
    ax.set(title="t", xlabel="x", ylabel="y")
    check_open_figures()                                    # a complete figure: nothing said
    fig, ax = _figure()
    ax.plot([1, 2], [3, 4])
    with pytest.raises(AssertionError, match=rf"figure {fig.number}: axes 0 has no title"):
        check_open_figures()


def test_the_figure_of_the_engine_page_meets_the_standard():
    """docs/engine.md draws its timings in its last code cell (executed by the book): run on made-up
    timings of its keys. The right panel's title ran past the figure's right edge."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "engine.md").read_text(encoding="utf-8")
    code = re.findall(r"```\{code-cell\} ipython3\n(.*?)```", page, re.S)[-1]
    assert "plt.subplots" in code and "timings" in code, "the page's last cell no longer draws the timings"
    names = [f"{size}: {name}" for size in ("8x8 maps", "4x4 maps")
             for name in ("the loop", "im2col, channels-first", "im2col, channels-last", "the engine")]
    timings = {name: 1.0 + i for i, name in enumerate(names + ["res2 size, 2 MiB chunks", "res2 size, one chunk"])}
    exec(code, {"plt": plt, "timings": timings, "np": np})      # its plt.show() under Agg draws nothing
    shown = [plt.figure(n) for n in plt.get_fignums()]
    assert len(shown) == 1 and figure_problems(shown[0]) == []
