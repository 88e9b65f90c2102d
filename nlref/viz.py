"""Matplotlib helpers for the course: image grids, the 1/N curve, weight maps, attention maps.

Each takes arrays of any library (they are copied to the host for drawing)
and returns the matplotlib Figure, so notebooks show it and scripts save it.
"""

from __future__ import annotations

import numpy as np

from .backend import to_numpy

__all__ = ["image_grid", "averaging_plot", "weights_plot", "attention_plot"]


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _display(a):
    a = np.asarray(to_numpy(a), dtype=np.float64)
    return np.clip(a, 0.0, 1.0) if a.min() >= -0.5 and a.max() <= 1.5 else a


def image_grid(images, titles=None, *, ncols=None, size=3.0, cmap="gray"):
    """Show images side by side (grey 2-D or colour H x W x 3), values clipped to [0, 1]."""
    plt = _plt()
    images = list(images)
    ncols = ncols or len(images)
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.ravel()[i]
        ax.imshow(_display(img), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    return fig


def averaging_plot(counts, variances, sigma):
    """Measured noise variance of the average of N copies against the sigma^2/N law (log-log)."""
    plt = _plt()
    counts = np.asarray(counts, dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.loglog(counts, variances, "o", label="measured")
    ax.loglog(counts, sigma**2 / counts, "-", label=r"$\sigma^2 / N$")
    ax.set_xlabel("number of copies N")
    ax.set_ylabel("variance of the residual")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def weights_plot(image, positions, weight_maps, *, search_size):
    """The image with query pixels marked, and each pixel's weights over its search window."""
    plt = _plt()
    image = _display(image)
    n = len(positions)
    fig, axes = plt.subplots(1, n + 1, figsize=(3.2 * (n + 1), 3.2))
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("query pixels", fontsize=9)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    half = [s // 2 for s in search_size]
    for i, ((r, c), w) in enumerate(zip(positions, weight_maps)):
        colour = colours[i % len(colours)]
        axes[0].plot(c, r, "o", color=colour, ms=6)
        axes[0].add_patch(plt.Rectangle((c - half[1], r - half[0]), search_size[1], search_size[0],
                                        fill=False, ec=colour, lw=1))
        axes[i + 1].imshow(to_numpy(w), cmap="magma", interpolation="nearest")
        axes[i + 1].set_title(f"weights of pixel ({r}, {c})", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def attention_plot(image, attention, queries, *, query_shape, key_shape, titles=None):
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
    """
    plt = _plt()
    a = np.asarray(to_numpy(attention), dtype=np.float64)
    qh, qw = query_shape
    if a.shape != (qh * qw, int(np.prod(key_shape))):
        raise ValueError(f"attention must have shape ({qh * qw}, {int(np.prod(key_shape))}) for query_shape "
                         f"{tuple(query_shape)} and key_shape {tuple(key_shape)}, got {a.shape}")
    image = _display(image)
    h, w = image.shape[:2]
    n = len(queries)
    fig, axes = plt.subplots(1, n + 1, figsize=(3.0 * (n + 1), 3.0))
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("queries", fontsize=9)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (r, c) in enumerate(queries):
        y, x = (r + 0.5) * h / qh - 0.5, (c + 0.5) * w / qw - 0.5
        colour = colours[i % len(colours)]
        axes[0].plot(x, y, "o", color=colour, ms=6)
        axes[i + 1].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[i + 1].imshow(a[r * qw + c].reshape(key_shape), cmap="magma", alpha=0.75,
                           extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
        axes[i + 1].plot(x, y, "o", color=colour, ms=5, mec="white")
        axes[i + 1].set_title(titles[i] if titles else f"query ({r}, {c})", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig
