"""Matplotlib helpers for the course: image grids, the 1/N curve, weight maps, attention maps, clips, curves.

Each takes arrays of any library (they are copied to the host for drawing)
and returns the matplotlib Figure, so notebooks show it and scripts save it.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings

import numpy as np

from .backend import to_numpy

__all__ = ["image_grid", "averaging_plot", "weights_plot", "attention_plot", "clip_grid", "training_curves",
           "spacetime_attention_plot"]


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _colorbar(fig, mappable, ax, label):
    """A colour bar for ``mappable`` beside ``ax`` (or a list of axes), labelled with what the colour means."""
    bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def _frame_norm():
    """Grey levels of sprite clips on a square-root scale: a dim sprite (0.3) shows at 55 % grey, not 30 %."""
    from matplotlib.colors import PowerNorm

    return PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)


def _display(a):
    a = np.asarray(to_numpy(a), dtype=np.float64)
    return np.clip(a, 0.0, 1.0) if a.min() >= -0.5 and a.max() <= 1.5 else a


def image_grid(images, titles=None, *, ncols=None, size=3.0, cmap="gray", limits=None, colorbars=None, title=None):
    """Show images side by side (grey 2-D or colour H x W x 3).

    Parameters
    ----------
    images : list of arrays, (H, W) or (H, W, 3)
        Shown with values clipped to [0, 1] (0 black, 1 white), unless ``limits`` says otherwise.
    titles : list of str, optional
    ncols : int, optional
        Images per row (default: all in one row).
    size : float
        Width and height of one panel in inches.
    cmap : str
        Colour map of the grey images.
    limits : list of (vmin, vmax) or None, optional
        Per image: draw the values unclipped on this range (for a signed image such as
        a method noise), or None for the [0, 1] default.
    colorbars : list of str or None, optional
        Per image: the label of a colour bar to draw beside it, or None for none.
    title : str, optional
        A title over the whole grid (default, when no ``titles`` are given either: the
        number of images, so that no figure goes untitled; ``""`` for none).

    Returns
    -------
    matplotlib.figure.Figure
        One axis per image (plus one per colour bar).
    """
    plt = _plt()
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"images must be a non-empty list of images, e.g. [noisy, denoised], got "
                         f"{type(images).__name__ if not isinstance(images, (list, tuple)) else images!r}")
    images = [_picture(f"images[{i}]", img) for i, img in enumerate(images)]
    titles, limits, colorbars = (_per_item(name, per, len(images), "image") for name, per in
                                 (("titles", titles), ("limits", limits), ("colorbars", colorbars)))
    for i, lim in enumerate(limits or []):
        if lim is not None and not (isinstance(lim, (list, tuple)) and len(lim) == 2 and all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in lim)
                and lim[0] < lim[1]):
            raise ValueError(f"limits[{i}] must be None or (vmin, vmax) with vmin < vmax, got {lim!r}")
    if ncols is not None and (isinstance(ncols, bool) or not isinstance(ncols, numbers.Integral) or ncols < 1):
        raise ValueError(f"ncols must be a positive int (images per row) or None, got {ncols!r}")
    size = _positive("size", size)
    if title is None and titles is None:
        title = f"{len(images)} image{'s' * (len(images) != 1)}, one per panel"
    ncols = min(int(ncols or len(images)), len(images))
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols + 0.6 * bool(colorbars), size * nrows + 0.3 * bool(title)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.ravel()[i]
        lim = limits[i] if limits is not None else None
        if lim is None:
            peak = float(np.max(np.abs(img), initial=0.0, where=np.isfinite(img)))
            if peak > 4:
                warnings.warn(f"images[{i}] holds values up to {peak:g}, drawn on the [0, 1] grey "
                              "scale (all white above 1): divide a 0..255 image by 255, or give its limits, e.g. "
                              "limits=[(0, 255)]", UserWarning, stacklevel=2)
            shown = ax.imshow(_display(img), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        else:
            shown = ax.imshow(img, cmap=cmap, vmin=lim[0], vmax=lim[1],
                              interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
        if colorbars is not None and colorbars[i]:
            _colorbar(fig, shown, ax, colorbars[i])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def averaging_plot(counts, variances, sigma):
    """Measured noise variance of the average of N copies against the sigma^2/N law (log-log)."""
    plt = _plt()
    try:
        counts = np.asarray(counts, dtype=float)
        variances = np.asarray(to_numpy(variances) if hasattr(variances, "shape") else variances, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"counts and variances must be sequences of numbers, got {counts!r} and "
                         f"{variances!r}") from None
    if counts.ndim != 1 or counts.shape != variances.shape or counts.size == 0:
        raise ValueError(f"counts and variances must be two non-empty 1-D sequences of one length, got shapes "
                         f"{counts.shape} and {variances.shape}")
    if not np.all(np.isfinite(counts) & (counts >= 1)):
        raise ValueError(f"counts must be numbers of copies >= 1, got {counts.tolist()}")
    if not np.all(np.isfinite(variances) & (variances > 0)):
        raise ValueError(f"variances must be finite and > 0 (a log scale), got {variances.tolist()}")
    sigma = _positive("sigma", sigma)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.loglog(counts, variances, "o", label="measured")
    ax.loglog(counts, sigma**2 / counts, "-", label=r"$\sigma^2 / N$")
    ax.set_xlabel("number of copies N")
    ax.set_ylabel("variance of the residual")
    ax.set_title("averaging N noisy copies: the variance falls as 1/N", fontsize=10)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def weights_plot(image, positions, weight_maps, *, search_size, title=None):
    """The image with query pixels and their search windows, then each pixel's weights over its window.

    Parameters
    ----------
    image : array, (H, W)
        The (noisy) image the weights were computed on.
    positions : list of (row, col)
        The query pixels.
    weight_maps : list of arrays, each of shape ``search_size``
        ``nl_means_weights`` of each pixel: ``w(p, q)`` for ``q`` in the search window of ``p``.
    search_size : (rows, cols)
    title : str, optional
        A title over the figure (default: says what the squares and the maps are).

    Returns
    -------
    matplotlib.figure.Figure
        The image, one map per pixel on one shared [0, 1] scale, and the colour bar of the weights.
        Each map's title gives the share of its weights equal to 1 (patches closer than
        the noise level: ``d^2 <= 2 sigma^2``).
    """
    plt = _plt()
    image = _display(_picture("image", image))
    search_size = _positive_ints("search_size", search_size, 2, "(rows, cols)")
    if search_size[0] % 2 == 0 or search_size[1] % 2 == 0:
        raise ValueError(f"search_size must be odd (a window centred on the pixel), got {search_size}")
    positions = _points("positions", positions, image.shape[:2])
    weight_maps = [np.asarray(to_numpy(w), dtype=np.float64) for w in weight_maps]
    if len(weight_maps) != len(positions) or any(w.shape != search_size for w in weight_maps):
        raise ValueError(f"weight_maps must hold one array of shape search_size = {search_size} per position "
                         f"({len(positions)}), got shapes {[w.shape for w in weight_maps]}")
    if not all(np.all((w >= 0) & (w <= 1)) for w in weight_maps):  # NaN fails too
        raise ValueError("weight_maps must hold NL-means weights, in [0, 1] (nl_means_weights' output); got "
                         "values outside it or NaN")
    n = len(positions)
    # "compressed" and 4 inches tall: with square maps sharing one colour bar, the constrained layout in
    # 3.7 inches left the maps' x labels partly below the figure's edge (their descenders cut off)
    fig, axes = plt.subplots(1, n + 1, figsize=(3.2 * (n + 1) + 0.8, 4.0), layout="compressed")
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("query pixels (dots) and\ntheir search windows (squares)", fontsize=9)
    axes[0].axis("off")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    half = [s // 2 for s in search_size]
    extent = (-half[1] - 0.5, half[1] + 0.5, half[0] + 0.5, -half[0] - 0.5)
    for i, ((r, c), w) in enumerate(zip(positions, weight_maps)):
        colour = colours[i % len(colours)]
        axes[0].plot(c, r, "o", color=colour, ms=6)
        axes[0].add_patch(plt.Rectangle((c - half[1] - 0.5, r - half[0] - 0.5), search_size[1], search_size[0],
                                        fill=False, ec=colour, lw=1.5))
        shown = axes[i + 1].imshow(w, cmap="magma", vmin=0, vmax=1, interpolation="nearest", extent=extent)
        axes[i + 1].plot(0, 0, "o", ms=5, mfc="none", mec=colour, mew=1.5)
        axes[i + 1].set_title(f"weights of pixel ({r}, {c})\n{np.mean(w >= 1):.0%} of them equal 1", fontsize=9,
                              color=colour)
        axes[i + 1].set_xlabel("column offset q - p", fontsize=8)
        axes[i + 1].set_ylabel("row offset q - p", fontsize=8)
        axes[i + 1].tick_params(labelsize=7)
    _colorbar(fig, shown, list(axes[1:]), "weight w(p, q)")
    fig.suptitle(title or f"NL-means weights over each pixel's {search_size[0]}x{search_size[1]} search window",
                 fontsize=10)
    return fig


class _WeightScale:
    """One colour scale for attention maps: magma from 0 to the largest weight, or, where a weight is
    negative (the dot product, the concatenation), a diverging map centred on 0 (on magma's 0..max the
    negative weights were left clear). Keys under 2 % of the largest magnitude are left clear, so
    that the image shows through."""

    def __init__(self, maps):
        self.signed = any(float(m.min()) < 0 for m in maps)
        self.vmax = max(float(np.abs(m).max()) for m in maps) or 1.0
        self.cmap, self.vmin = ("RdBu_r", -self.vmax) if self.signed else ("magma", 0.0)

    def masked(self, m):
        return np.ma.masked_where(np.abs(m) < 0.02 * self.vmax, m)


def attention_plot(image, attention, queries, *, query_shape, key_shape, titles=None, title=None):
    """Where each query position attends: the image with the queries marked, then one map per query.

    Parameters
    ----------
    image : array, (H, W) or (H, W, 3)
        Shown underneath; query and key grids are stretched over its extent.
    attention : array, shape (N, M)
        One batch element of a non-local block's attention (``return_attention=True``),
        ``N = prod(query_shape)`` queries by ``M = prod(key_shape)`` keys.
    queries : list of (row, col)
        Query positions on the ``query_shape`` grid.
    query_shape, key_shape : (rows, cols)
        The 2-D grids of the queries and of the (possibly subsampled) keys.
    titles : list of str, optional
        One per query (default ``"query (row, col)"``).
    title : str, optional
        A title over the figure (default: says what the maps are).

    Returns
    -------
    matplotlib.figure.Figure
        The image with the queries, one map per query on one colour scale, and its colour bar.
    """
    plt = _plt()
    a = np.asarray(to_numpy(attention), dtype=np.float64)
    qh, qw = query_shape = _positive_ints("query_shape", query_shape, 2, "(rows, cols)")
    key_shape = _positive_ints("key_shape", key_shape, 2, "(rows, cols)")
    queries = _points("queries", queries, query_shape)
    if titles is not None and (isinstance(titles, str) or len(titles) != len(queries)):
        raise ValueError(f"titles must hold one title per query ({len(queries)}), got "
                         f"{repr(titles) if isinstance(titles, str) else len(titles)}")
    if a.shape != (qh * qw, int(np.prod(key_shape))):
        raise ValueError(f"attention must have shape ({qh * qw}, {int(np.prod(key_shape))}) for query_shape "
                         f"{tuple(query_shape)} and key_shape {tuple(key_shape)}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("attention holds non-finite values")
    image = _display(image)
    h, w = image.shape[:2]
    n = len(queries)
    rows = [a[r * qw + c].reshape(key_shape) for r, c in queries]
    scale = _WeightScale(rows)                               # one scale for all queries
    fig, axes = plt.subplots(1, n + 1, figsize=(3.0 * (n + 1) + 0.8, 3.4), layout="constrained")
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("queries", fontsize=9)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((r, c), m) in enumerate(zip(queries, rows)):
        y, x = (r + 0.5) * h / qh - 0.5, (c + 0.5) * w / qw - 0.5
        colour = colours[i % len(colours)]
        axes[0].plot(x, y, "o", color=colour, ms=6)
        axes[i + 1].imshow(image, cmap="gray", vmin=0, vmax=1)
        shown = axes[i + 1].imshow(scale.masked(m), cmap=scale.cmap, vmin=scale.vmin, vmax=scale.vmax, alpha=0.8,
                                   extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
        axes[i + 1].plot(x, y, "o", color=colour, ms=5, mec="white")
        axes[i + 1].set_title(titles[i] if titles else f"query ({r}, {c})", fontsize=9)
    for ax in axes:
        ax.axis("off")
    _colorbar(fig, shown, list(axes[1:]), "attention weight (one scale" + (", 0 at the centre)" if scale.signed else ")"))
    fig.suptitle(title or "where each query attends: its attention weights over the keys", fontsize=10)
    return fig


# --------------------------------------------------------------------------- video clips and training
def _frames(video, name="video"):
    """A clip as host frames (T, H, W) or (T, H, W, 3), from (C, T, H, W) with C in {1, 3} or (T, H, W)."""
    v = np.asarray(to_numpy(video), dtype=np.float64)
    if v.ndim == 3:
        return v
    if v.ndim == 4 and v.shape[0] in (1, 3):
        return v[0] if v.shape[0] == 1 else np.moveaxis(v, 0, -1)
    raise ValueError(f"{name} must have shape (C, T, H, W) with C = 1 or 3, or (T, H, W), got {v.shape}")


def clip_grid(video, *, titles=None, title=None, size=1.6):
    """Show one clip as a row of frames.

    Parameters
    ----------
    video : array, shape (C, T, H, W) with C = 1 or 3, or (T, H, W)
        One clip (for example ``clips.video[i]`` of :func:`nlref.data.sprites.sprite_clips`).
    titles : list of T str, optional
        One title per frame (default ``"t = 0"``, ``"t = 1"``, ...).
    title : str, optional
        A title for the whole row (the label, say; default: the clip's frame count and size).
    size : float
        Width and height of one frame in inches.

    Returns
    -------
    matplotlib.figure.Figure
        With one axis per frame, then the colour bar of the brightness. Frames are
        drawn on a square-root grey scale from 0 to 1, so that a dim sprite stays visible.
    """
    plt = _plt()
    frames = _frames(video)
    t = frames.shape[0]
    if frames.size == 0:
        raise ValueError(f"video must hold at least one frame of at least one pixel, got frames of shape "
                         f"{frames.shape}")
    if titles is not None and (isinstance(titles, str) or len(titles) != t):
        raise ValueError(f"titles must hold one title per frame ({t}), got "
                         f"{repr(titles) if isinstance(titles, str) else len(titles)}")
    size = _positive("size", size)
    if title is None:
        title = f"a clip of {t} frame{'s' * (t != 1)} of {frames.shape[1]}x{frames.shape[2]} pixels, one per panel"
    fig, axes = plt.subplots(1, t, figsize=(size * t + 0.7, size * 1.1 + (0.3 if title else 0)), squeeze=False,
                             layout="constrained")
    for i, ax in enumerate(axes[0]):
        shown = ax.imshow(_display(frames[i]), cmap="gray", norm=_frame_norm(), interpolation="nearest")
        ax.set_title(titles[i] if titles is not None else f"t = {i}", fontsize=8)
        ax.axis("off")
    _colorbar(fig, shown, list(axes[0]), "brightness (square-root scale)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def training_curves(histories, *, metric="val_accuracy", title=None):
    """Loss and ``metric`` per epoch for several runs: train dashed, validation solid, one colour per run.

    Parameters
    ----------
    histories : dict of label -> list of dict
        Each value is ``train(...)["history"]``: one row per epoch with ``epoch``,
        ``train_loss``, ``val_loss``, ``train_accuracy``, ``val_accuracy``, ...
    metric : str
        The key of the second panel. When it starts with ``val_`` and the rows
        also hold the ``train_`` counterpart, that is drawn too (dashed). A
        chance line at 0.5 is drawn for accuracies (balanced two-class task).
    title : str, optional
        The figure's title (default: the runs' labels and "per epoch").

    Returns
    -------
    matplotlib.figure.Figure
        Two axes: the losses and ``metric`` (one axis when ``metric`` is itself a loss).
    """
    plt = _plt()
    if not isinstance(histories, dict) or not histories:
        raise ValueError(f"histories must be a non-empty dict of label -> list of per-epoch dicts, got {histories!r}")
    if not isinstance(metric, str):
        raise ValueError(f"metric must be a str (a key of the history rows, e.g. 'val_accuracy'), got {metric!r}")
    quantity = metric[len("val_"):] if metric.startswith("val_") else metric
    for label, rows in histories.items():
        if not isinstance(label, str):
            raise ValueError(f"histories must be keyed by str labels (the runs' names), got {label!r}")
        if not isinstance(rows, (list, tuple)) or not rows or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"histories[{label!r}] must be a non-empty list of per-epoch dicts")
        if metric not in rows[0]:
            raise ValueError(f"metric {metric!r} is not in the history of {label!r}; it holds {sorted(rows[0])}")
        drawn = [k for k in ("epoch", "train_loss", "val_loss", f"train_{quantity}", metric) if k in rows[0]]
        if "train_loss" not in drawn and "val_loss" not in drawn:
            raise ValueError(f"the history of {label!r} holds no train_loss or val_loss to draw; it holds "
                             f"{sorted(rows[0])}")
        for n, row in enumerate(rows):          # what the first row draws, every row must hold, as numbers
            for k in drawn:
                if k not in row:
                    raise ValueError(f"histories[{label!r}][{n}] lacks {k!r}, which its first row holds")
                if isinstance(row[k], (bool, str)) or not isinstance(row[k], numbers.Real):
                    raise ValueError(f"histories[{label!r}][{n}] must hold numbers; {k!r} is {row[k]!r}")
    panels = [("loss", ("train_loss", "val_loss"))]
    if quantity != "loss":
        panels.append((metric, (f"train_{quantity}", metric) if metric.startswith("val_") else (metric,)))
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.7), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, keys) in zip(axes[0], panels):
        for i, (label, rows) in enumerate(histories.items()):
            epochs = [row.get("epoch", n + 1) for n, row in enumerate(rows)]
            for key in keys:
                if key not in rows[0]:
                    continue
                part = "train" if key.startswith("train_") else "val"
                ax.plot(epochs, [row[key] for row in rows], "--" if part == "train" else "o-",
                        color=colours[i % len(colours)], label=f"{label} ({part})", ms=4)
        if "accuracy" in name:
            ax.axhline(0.5, color="grey", lw=1, ls=":", label="chance")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))     # epochs are whole numbers
        ax.set_ylabel(name.replace("val_", "").replace("_", " "))
        ax.set_title(f"{name.replace('val_', '').replace('_', ' ')} per epoch", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "training curves: " + ", ".join(histories) + " (train dashed, validation solid)", fontsize=10)
    fig.tight_layout()
    return fig


def spacetime_attention_plot(clip, attention_row, query, *, key_shape, query_shape=None, title=None, size=1.6):
    """Where one query position attends across the frames of a clip (as in Fig. 1 and 3 of Wang et al.).

    The top row shows the frames with the query marked on its own frame; under
    each frame, that frame's slice of the attention row, reshaped to
    ``key_shape = (T', H', W')`` and stretched over the frame (drawn over
    it), on one colour scale for all frames. Each lower title gives the
    attention mass on that frame (the sum of its weights: the row sums to 1 over all frames).

    Parameters
    ----------
    clip : array, shape (C, T, H, W) with C = 1 or 3, or (T, H, W)
    attention_row : array, shape (T' * H' * W',)
        One query's row of a block's attention, ``attention[b, i]`` of
        ``forward(x, return_attention=True)``, keys ordered (t, y, x) row-major.
    query : (t, y, x)
        The query position: on the grid ``query_shape`` when given (for example
        the res3 grid (T, H/4, W/4)), else in the clip's frames and pixels.
    key_shape : (T', H', W')
        The key grid (subsampled by (1, 2, 2) in the usual block); ``T`` must be a
        multiple of ``T'`` (frame ``t`` shows key frame ``t * T' // T``).
    query_shape : (Tq, Hq, Wq), optional
    title : str, optional
        A title over the figure (default: names the query).
    size : float
        Width and height of one frame's panel in inches.

    Returns
    -------
    matplotlib.figure.Figure
        With ``2 T`` axes (the frames, then the attention slices) and two colour bars:
        the frames' brightness (square-root scale) and the attention weight (one scale
        for all frames; keys under 2 % of the largest weight are drawn clear).
    """
    plt = _plt()
    frames = _frames(clip, "clip")
    t_len, h, w = frames.shape[:3]
    key_shape = _positive_ints("key_shape", key_shape, 3, "(T, H, W)")
    a = np.asarray(to_numpy(attention_row), dtype=np.float64)
    if a.shape != (int(np.prod(key_shape)),):
        raise ValueError(f"attention_row must have shape ({int(np.prod(key_shape))},) for key_shape {key_shape}, "
                         f"got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("attention_row holds non-finite values")
    if t_len % key_shape[0]:
        raise ValueError(f"the clip's {t_len} frames must be a multiple of key_shape[0] = {key_shape[0]}")
    grid = (t_len, h, w) if query_shape is None else _positive_ints("query_shape", query_shape, 3, "(T, H, W)")
    if grid[0] != t_len:
        raise ValueError(f"query_shape[0] must equal the clip's number of frames {t_len}, got {grid[0]}")
    try:
        point = tuple(_index(q) for q in query)
    except TypeError:
        point = None
    if point is None or len(point) != 3 or not all(0 <= q < n for q, n in zip(point, grid)):
        raise ValueError(f"query must be (t, y, x) inside {grid}, three ints, got {query!r}")
    qt, qy, qx = point
    py, px = (qy + 0.5) * h / grid[1] - 0.5, (qx + 0.5) * w / grid[2] - 0.5   # the query's centre in pixels
    maps = a.reshape(key_shape)
    scale = _WeightScale([maps])                               # one scale for all frames
    fig, axes = plt.subplots(2, t_len, figsize=(size * t_len + 0.9, 2 * size * 1.15 + (0.3 if title else 0)),
                             squeeze=False, layout="constrained")
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    for t in range(t_len):
        frame = _display(frames[t])
        key_t = t * key_shape[0] // t_len
        top, bottom = axes[0, t], axes[1, t]
        bright = top.imshow(frame, cmap="gray", norm=_frame_norm(), interpolation="nearest")
        top.set_title(f"t = {t}" + (" (query)" if t == qt else ""), fontsize=8)
        if t == qt:
            top.plot(px, py, "o", ms=7, mfc="none", mec="tab:red", mew=2)
        bottom.imshow(frame, cmap="gray", norm=_frame_norm(), interpolation="nearest")
        shown = bottom.imshow(scale.masked(maps[key_t]), cmap=scale.cmap, vmin=scale.vmin, vmax=scale.vmax,
                              alpha=0.8, extent=extent, interpolation="nearest")
        mass = float(maps[key_t].sum()) * key_shape[0] / t_len
        bottom.set_title(f"mass {mass:.2f}", fontsize=8)
        for ax in (top, bottom):
            ax.axis("off")
    _colorbar(fig, bright, list(axes[0]), "brightness (sqrt scale)")
    # signed: a shorter label, as the longer one ran past the bar, off the figure's bottom edge
    _colorbar(fig, shown, list(axes[1]), "attention (0 at the centre)" if scale.signed else "attention weight")
    fig.suptitle(title or f"where query (t, y, x) = {(qt, qy, qx)} attends across the frames", fontsize=10)
    return fig


def _per_item(name, value, count, what):
    """``value`` (None, or a list or tuple of ``count`` entries; a str is not a list of titles) as a list or None."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of one entry per {what} ({count}), got {value!r}")
    if len(value) != count:
        raise ValueError(f"{name} must hold one entry per {what} ({count}), got {len(value)}")
    return list(value)


def _positive(name, value):
    """``value`` as a finite float > 0; else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _picture(name, image):
    """A host image (H, W) or (H, W, 3), non-empty, as float64; else a ValueError naming ``name`` and its shape."""
    a = np.asarray(to_numpy(image), dtype=np.float64)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) or a.size == 0:
        raise ValueError(f"{name} must be a non-empty grey (H, W) or colour (H, W, 3) image, got shape {a.shape}"
                         + (" (channels first? move them last: numpy.moveaxis(image, 0, -1))"
                            if a.ndim == 3 and a.shape[0] == 3 else ""))
    return a


def _index(v):
    """``operator.index(v)``, refusing a bool (``True`` is not the index 1 here) with the same TypeError."""
    if isinstance(v, (bool, np.bool_)):
        raise TypeError("a bool is not an index")
    return operator.index(v)


def _positive_ints(name, value, count, what):
    """``value`` as a tuple of ``count`` positive ints; else a ValueError naming ``name``."""
    try:
        shape = tuple(_index(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be {count} positive integers {what}, got {value!r}") from None
    if len(shape) != count or min(shape) < 1:
        raise ValueError(f"{name} must be {count} positive integers {what}, got {value!r}")
    return shape


def _points(name, points, grid):
    """``points`` as a non-empty list of (row, col) int pairs inside ``grid`` (rows, cols): no index wraps."""
    try:
        pairs = [tuple(_index(v) for v in point) for point in points]
    except TypeError:
        pairs = None
    if not pairs or any(len(p) != 2 or not (0 <= p[0] < grid[0] and 0 <= p[1] < grid[1]) for p in pairs):
        raise ValueError(f"{name} must be a non-empty list of (row, col) integer pairs with 0 <= row < {grid[0]} "
                         f"and 0 <= col < {grid[1]}, got {points!r}")
    return pairs

