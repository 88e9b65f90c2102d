r"""NL-means written as plainly as possible: the specification the fast code must equal.

For a noisy image :math:`v` (any number of spatial axes, ``C`` channels), the
pixel-wise estimate at pixel :math:`p` is

.. math::

    \hat u(p) = \frac{1}{Z(p)} \sum_{q \in S(p)} w(p, q)\, v(q),
    \qquad Z(p) = \sum_{q \in S(p)} w(p, q),

    w(p, q) = \exp\!\Big(-\frac{\max(d^2(p, q) - 2\sigma^2,\ 0)}{h^2}\Big),
    \qquad d^2(p, q) = \frac{1}{C\,|P|} \sum_{c} \sum_{k \in P} \big(v_c(p+k) - v_c(q+k)\big)^2,

where :math:`S(p)` is the search window centred on :math:`p`, :math:`P` the
patch (a box of offsets centred on 0) and the image is extended by reflection
about its border samples. The patch-wise estimate first denoises whole patches,

.. math::

    \hat B(p) = \frac{1}{Z(p)} \sum_{q \in S(p)} w(p, q)\, B(q),

(:math:`B(q)` is the patch of :math:`v` around :math:`q`) and then gives every
pixel the plain average of all patch estimates :math:`\hat B(p)` that cover it,
over the patch centres :math:`p` inside the image (Buades, Coll & Morel, IPOL
2011, section 2).

Every array here is channel-first: ``v`` has shape ``(C, n_0, ..., n_{d-1})``.
"""

from __future__ import annotations

from itertools import product

from ..backend import array_namespace, reflect_pad
from .checks import check_kernel

__all__ = ["nl_means_naive", "patch_weights"]


def _window(radius):
    """All offsets of a box of half-widths ``radius`` (a tuple of ints), in C order."""
    return list(product(*(range(-r, r + 1) for r in radius)))


def _patch(padded, centre, patch_radius):
    """The patch of ``padded`` (C, ...) centred on ``centre`` (padded coordinates)."""
    return padded[(slice(None),) + tuple(slice(c - r, c + r + 1) for c, r in zip(centre, patch_radius))]


def _weight(xp, padded, p, q, patch_radius, h, sigma):
    """w(p, q) for two pixels given in padded coordinates (a 0-d array)."""
    diff = _patch(padded, p, patch_radius) - _patch(padded, q, patch_radius)
    d2 = xp.mean(diff * diff)
    return xp.exp(-xp.clip(d2 - 2.0 * sigma**2, min=0.0) / h**2)


def _shift(point, offset):
    return tuple(a + b for a, b in zip(point, offset))


def patch_weights(v, index, *, h, sigma, patch_size, search_size):
    """The weights w(p, q) of one pixel ``p = index`` over its search window.

    Parameters
    ----------
    v : array, shape (C, n_0, ..., n_{d-1})
        Channel-first image.
    index : tuple of int
        The pixel ``p`` (``d`` coordinates).
    h, sigma : float
        Filter strength and noise level (image units).
    patch_size, search_size : tuple of int
        Odd full widths, one per spatial axis.

    Returns
    -------
    w : array, shape search_size
        ``w[o + search_size // 2] = w(p, p + o)``, unnormalised.
    """
    h, sigma, patch_size, search_size, index = check_kernel(
        "patch_weights", v, h=h, sigma=sigma, patch_size=patch_size, search_size=search_size, index=index)
    xp = array_namespace(v)
    rp = tuple(s // 2 for s in patch_size)
    rs = tuple(s // 2 for s in search_size)
    pad = [(0, 0)] + [(a + b, a + b) for a, b in zip(rp, rs)]
    padded = reflect_pad(v, pad)
    p = tuple(i + a + b for i, a, b in zip(index, rp, rs))
    weights = [_weight(xp, padded, p, _shift(p, o), rp, h, sigma) for o in _window(rs)]
    return xp.reshape(xp.stack(weights), tuple(search_size))


def nl_means_naive(v, *, h, sigma, patch_size, search_size, aggregation="pixel"):
    """NL-means by its definition: loops over pixels and offsets (small inputs only).

    Parameters
    ----------
    v : array, shape (C, n_0, ..., n_{d-1})
        Channel-first noisy image, floating point.
    h : float
        Filter strength, > 0, in image units.
    sigma : float
        Noise standard deviation, >= 0 (0 turns the ``2 sigma^2`` correction off).
    patch_size, search_size : tuple of int
        Odd full widths per spatial axis.
    aggregation : {"pixel", "patch"}
        Pixel-wise or patch-wise estimate (see the module docstring).

    Returns
    -------
    u : array, shape (C, n_0, ..., n_{d-1}), same library, device and dtype as ``v``.
    """
    h, sigma, patch_size, search_size, _ = check_kernel(
        "nl_means_naive", v, h=h, sigma=sigma, patch_size=patch_size, search_size=search_size, aggregation=aggregation)
    xp = array_namespace(v)
    shape = tuple(v.shape[1:])
    rp = tuple(s // 2 for s in patch_size)
    rs = tuple(s // 2 for s in search_size)
    margin = tuple(a + b for a, b in zip(rp, rs))
    padded = reflect_pad(v, [(0, 0)] + [(m, m) for m in margin])
    offsets = _window(rs)
    pixels = list(product(*(range(n) for n in shape)))

    def to_padded(pixel):
        return _shift(pixel, margin)

    def weighted_mean(p, value_at):
        """sum_q w(p, q) value_at(q) / sum_q w(p, q) over the search window of p."""
        num, den = 0.0, 0.0
        for o in offsets:
            q = _shift(p, o)
            w = _weight(xp, padded, p, q, rp, h, sigma)
            num = num + w * value_at(q)
            den = den + w
        return num / den

    if aggregation == "pixel":
        def pixel_value(q):
            return padded[(slice(None),) + q]  # (C,)

        estimates = [weighted_mean(to_padded(pixel), pixel_value) for pixel in pixels]
        out = xp.stack(estimates, axis=1)  # (C, n_pixels)
        return xp.reshape(out, (v.shape[0],) + shape)

    # patch-wise: denoise the patch around every pixel, then average the
    # estimates that cover each pixel.
    covering = {pixel: [] for pixel in pixels}
    patch_offsets = _window(rp)
    def patch_value(q):
        return _patch(padded, q, rp)  # (C, *patch_size)

    for pixel in pixels:
        patch_estimate = weighted_mean(to_padded(pixel), patch_value)
        for k in patch_offsets:
            target = _shift(pixel, k)
            if target in covering:
                centre_k = (slice(None),) + tuple(a + r for a, r in zip(k, rp))
                covering[target].append(patch_estimate[centre_k])
    estimates = [xp.mean(xp.stack(covering[pixel], axis=1), axis=1) for pixel in pixels]
    out = xp.stack(estimates, axis=1)
    return xp.reshape(out, (v.shape[0],) + shape)
