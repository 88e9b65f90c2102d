r"""One mean-field update of a dense CRF as a non-local operation.

Krähenbühl and Koltun (*Efficient Inference in Fully Connected CRFs with Gaussian
Edge Potentials*, NeurIPS 2011) label every pixel ``i`` of an image with one of
``L`` labels. The energy has a unary term :math:`\psi_u(x_i)` per pixel and a
pairwise term for *every* pair of pixels,
:math:`\mu(x_i, x_j) \sum_m w^{(m)} k^{(m)}(f_i, f_j)`, with Gaussian kernels on
feature vectors: the appearance (bilateral) kernel on positions ``p`` and colours
``I`` and the smoothness kernel on positions,

.. math::

    k(f_i, f_j) = w^{(1)} \exp\Big(-\frac{|p_i - p_j|^2}{2\theta_\alpha^2}
                                  - \frac{|I_i - I_j|^2}{2\theta_\beta^2}\Big)
                + w^{(2)} \exp\Big(-\frac{|p_i - p_j|^2}{2\theta_\gamma^2}\Big).

Their mean-field update (Algorithm 1) is

.. math::

    Q_i(l) = \frac{1}{Z_i} \exp\Big(-\psi_u(x_i = l)
             - \sum_{l'} \mu(l, l') \sum_m w^{(m)} \sum_{j \ne i} k^{(m)}(f_i, f_j)\, Q_j(l')\Big).

Scale the features, ``f = [p / theta_alpha; I / theta_beta]`` and ``f = p / theta_gamma``,
and each kernel becomes :math:`\exp(-|f_i - f_j|^2 / 2)`: the message
:math:`\sum_{j \ne i} \exp(-|f_i - f_j|^2/2) Q_j` is the non-local operation
:math:`\sum_j f(x_i, x_j) g(x_j)` with a Gaussian pairwise function, ``g`` the current
marginals, ``C(x) = 1`` and the self term left out. :func:`gaussian_message` computes it
with :func:`nlref.nn.nonlocal_op.nonlocal_forward`; :func:`mean_field_reference` is the
loop over pixels it is checked against.

Arrays: features ``(d, N)``, marginals and unaries ``(L, N)`` (``N`` pixels, row-major),
the compatibility ``mu`` ``(L, L)``. NumPy, array-api-strict, CuPy, PyTorch; the loop
:func:`mean_field_reference` too, in float64.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .backend import array_namespace, device, dtype_name

__all__ = ["crf_features", "potts", "gaussian_message", "mean_field_step", "mean_field_reference"]


_SPREAD_BUDGET = 1e-3   # eps * max |f|^2 above which gaussian_message refuses the features


def _float(name, a):
    array_namespace(a, names=[name])  # an array (a list has no dtype), named
    if dtype_name(a.dtype) not in ("float32", "float64"):
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {dtype_name(a.dtype)}")


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def crf_features(image, *, theta_alpha, theta_beta, theta_gamma):
    """``(bilateral, smoothness)`` feature vectors of an ``(H, W)`` or ``(H, W, C)`` float image.

    ``bilateral`` is ``[row / theta_alpha; col / theta_alpha; I / theta_beta]``, shape
    ``(2 + C, H W)``; ``smoothness`` is ``[row / theta_gamma; col / theta_gamma]``, shape
    ``(2, H W)``; pixels in row-major order. With these, both kernels are
    ``exp(-|f_i - f_j|^2 / 2)``.
    """
    for name, v in (("theta_alpha", theta_alpha), ("theta_beta", theta_beta), ("theta_gamma", theta_gamma)):
        _positive(name, v)
    # Python floats: a NumPy float64 theta made a float32 image's features float64
    theta_alpha, theta_beta, theta_gamma = float(theta_alpha), float(theta_beta), float(theta_gamma)
    _float("image", image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must have shape (H, W) or (H, W, C), got {tuple(image.shape)}")
    xp = array_namespace(image)
    h, w = image.shape[:2]
    colours = xp.reshape(image, (h * w, 1 if image.ndim == 2 else image.shape[2])).T
    idx = xp.arange(h * w, dtype=image.dtype, device=device(image))
    rows = xp.floor(idx / w)
    pos = xp.stack([rows, idx - rows * w])                       # (2, N): row, column
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):   # a float32 theta of 1e-50 is 0
        bilateral, smoothness = xp.concat([pos / theta_alpha, colours / theta_beta]), pos / theta_gamma
    if not (bool(xp.all(xp.isfinite(bilateral))) and bool(xp.all(xp.isfinite(smoothness)))):
        raise ValueError(f"image and thetas must give finite features in {dtype_name(image.dtype)}, got "
                         f"theta_alpha={theta_alpha!r}, theta_beta={theta_beta!r}, theta_gamma={theta_gamma!r} "
                         "and an image with values up to "
                         f"{float(xp.max(xp.abs(image))) if math.prod(image.shape) else 0.0!r}")
    return bilateral, smoothness


def potts(n_labels, *, like=None):
    """The Potts compatibility ``mu(l, l') = [l != l']``, shape ``(L, L)``, float64 (or ``like``'s)."""
    if isinstance(n_labels, bool) or not isinstance(n_labels, numbers.Integral) or n_labels < 2:
        raise ValueError(f"n_labels must be an int >= 2, got {n_labels!r}")
    n_labels = int(n_labels)
    if like is None:
        return np.ones((n_labels, n_labels)) - np.eye(n_labels)
    xp, on = array_namespace(like, names=["like"]), device(like)
    return xp.ones((n_labels, n_labels), dtype=like.dtype, device=on) - xp.eye(n_labels, dtype=like.dtype, device=on)


def gaussian_message(features, q):
    r"""``m_i = sum_{j != i} exp(-|f_i - f_j|^2 / 2) q_j``, shape ``(L, N)``, by nlref's non-local operation.

    The embedded Gaussian with ``theta_i = [f_i; -|f_i|^2/2; 1]`` and
    ``phi_j = [f_j; 1; -|f_j|^2/2]`` has logits ``theta_i^T phi_j = -|f_i - f_j|^2 / 2``:
    the pairwise function is the Gaussian kernel, but divided by ``C_i = sum_j f_ij``.
    One extra key with ``phi = 0`` (logit 0, weight 1 for every query) and value
    ``[0; 1]`` (the marginals get a zero there, an extra channel is 1 only there)
    makes that channel's output ``1 / (C_i + 1)`` and the others
    ``sum_j f_ij q_j / (C_i + 1)``: their ratio is the unnormalised sum (``C(x) = 1``).
    The self term ``f_ii q_i = q_i`` is then subtracted (``j != i``).

    Each logit is off by about ``eps * max_i |f_i|^2`` (features centred): features with
    ``eps * max_i |f_i|^2 > 1e-3`` (thetas too small for the positions or colours, or
    non-finite features) raise a ValueError.
    """
    from .nn.nonlocal_op import nonlocal_forward

    _float("features", features)
    _float("q", q)
    if features.ndim != 2 or q.ndim != 2 or features.shape[1] != q.shape[1]:
        raise ValueError(f"features must be (d, N) and q (L, N) with the same N, got {tuple(features.shape)} "
                         f"and {tuple(q.shape)}")
    if features.dtype != q.dtype:
        raise TypeError(f"features and q must share one dtype, got {dtype_name(features.dtype)} and "
                        f"{dtype_name(q.dtype)}")
    xp = array_namespace(features, q)
    n_labels, n = q.shape
    on = device(q)
    if n == 0:                                                   # no pixels, no messages (and no mean to centre by)
        return xp.zeros_like(q)
    # |f_i - f_j| is the same for centred features, and the logits' three terms then cancel less: with the
    # DenseCRF example's thetas (80, 13, 3) on 0..255 colours |f|^2 is about 10^3, and a float32 step was 1.9e-4 off (3.7e-5 centred)
    with np.errstate(over="ignore", invalid="ignore"):             # inf and NaN are refused just below
        features = features - xp.mean(features, axis=1, keepdims=True)
        half = xp.sum(features**2, axis=0, keepdims=True) / 2   # (1, N)
    # the logits' terms are up to R = max |f_i|^2 (centred), so each logit is off by about eps R: the self pair's
    # weight exp(0) came out exp(+-10) at theta = 1e-8 (float64), a step 0.1 off. Refuse where eps R > 1e-3
    # (kernel weights off by more than about 0.1%); at DenseCRF's example thetas (80, 13, 3) a float32 R is about 330
    spread = 2 * float(xp.max(half))
    eps = float(np.finfo(np.float32 if dtype_name(q.dtype) == "float32" else np.float64).eps)
    if not eps * spread <= _SPREAD_BUDGET:
        raise ValueError(f"features must be finite with max |f_i - mean f|^2 <= {_SPREAD_BUDGET / eps:.3g} in "
                         f"{dtype_name(q.dtype)} (the Gaussian kernel from dot products loses about eps |f|^2 to "
                         f"rounding), got {spread:.3g}: use larger thetas or float64")
    ones = xp.ones((1, n), dtype=q.dtype, device=on)
    theta = xp.concat([features, -half, ones])[None, ...]             # (1, d + 2, N)
    phi = xp.concat([xp.concat([features, ones, -half]),
                     xp.zeros((features.shape[0] + 2, 1), dtype=q.dtype, device=on)],
                    axis=1)[None, ...]                           # (1, d + 2, N + 1): the extra key is 0
    extra = xp.concat([xp.zeros((1, n), dtype=q.dtype, device=on), xp.ones((1, 1), dtype=q.dtype, device=on)],
                      axis=1)
    g = xp.concat([xp.concat([q, xp.zeros((n_labels, 1), dtype=q.dtype, device=on)], axis=1), extra])[None, ...]
    y, _ = nonlocal_forward(theta, phi, g, mode="embedded_gaussian")
    return y[0, :n_labels, :] / y[0, n_labels:, :] - q


def _check_step(q, unary, kernels, compat):
    """The checked kernels (weights as floats) and the inputs' namespace, or an error naming the input."""
    for name, a in (("q", q), ("unary", unary), ("compat", compat)):
        _float(name, a)
    if q.ndim != 2 or unary.shape != q.shape:
        raise ValueError(f"q and unary must have one shape (L, N), got {tuple(q.shape)} and {tuple(unary.shape)}")
    if compat.shape != (q.shape[0], q.shape[0]):
        raise ValueError(f"compat must have shape (L, L) = {(q.shape[0],) * 2}, got {tuple(compat.shape)}")
    try:
        kernels = [tuple(k) for k in kernels]
    except TypeError:
        raise TypeError(f"kernels must be a sequence of (weight, features) pairs, got {type(kernels).__name__}") from None
    for k in kernels:
        if len(k) != 2:
            raise ValueError(f"each kernel must be a (weight, features) pair, got {len(k)} items")
        w, f = k
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"each kernel weight must be a finite number, got {w!r}")
        if getattr(f, "ndim", None) != 2 or f.shape[1] != q.shape[1]:
            raise ValueError(f"each kernel's features must have shape (d, N={q.shape[1]}), "
                             f"got {tuple(getattr(f, 'shape', ()))}")
    dtypes = {dtype_name(a.dtype) for a in [q, unary, compat] + [f for _, f in kernels]}
    if len(dtypes) > 1:
        raise TypeError(f"q, unary, compat and the kernels' features must share one dtype, got {sorted(dtypes)}")
    # Q_i(l) = exp(-psi_u - ...) / Z_i: psi_u = +inf is a label of probability 0, but NaN, -inf, or +inf for every
    # label of a pixel (Z_i = 0) define no distribution; a NaN q or mu would spread to every pixel it reaches
    xp = array_namespace(q, unary, compat, *(f for _, f in kernels),
                         names=["q", "unary", "compat", *(f"kernels[{m}] features" for m in range(len(kernels)))])
    for name, a in [("q", q), ("compat", compat)] + [("each kernel's features", f) for _, f in kernels]:
        if not bool(xp.all(xp.isfinite(a))):
            raise ValueError(f"{name} must be finite (no NaN or inf)")
    if bool(xp.any(xp.isnan(unary))) or bool(xp.any(unary == -math.inf)):
        raise ValueError("unary must hold numbers or +inf (a label of probability 0), got NaN or -inf")
    if not bool(xp.all(xp.any(xp.isfinite(unary), axis=0))):
        raise ValueError("unary must be finite for at least one label of every pixel (+inf for all labels leaves "
                         "Z_i = 0)")
    return [(float(w), f) for w, f in kernels], xp  # a NumPy float64 weight would make float32 marginals float64


def _softmax_labels(xp, logits):
    e = xp.exp(logits - xp.max(logits, axis=0, keepdims=True))
    return e / xp.sum(e, axis=0, keepdims=True)


def mean_field_step(q, unary, kernels, compat):
    """One mean-field update ``Q -> softmax_l(-unary - compat @ sum_m w_m message_m(Q))``.

    ``q`` and ``unary`` are ``(L, N)`` (``unary`` is the energy ``psi_u``, e.g.
    ``-log`` of a classifier's probabilities), ``kernels`` a sequence of
    ``(weight, features)`` with features ``(d, N)`` already divided by their thetas
    (:func:`crf_features`), ``compat`` the ``(L, L)`` label compatibility ``mu``
    (:func:`potts`). The messages are :func:`gaussian_message`; the softmax runs over
    the labels of each pixel.
    """
    kernels, xp = _check_step(q, unary, kernels, compat)
    total = xp.zeros_like(q)
    for w, f in kernels:
        total = total + w * gaussian_message(f, q)
    return _softmax_labels(xp, -unary - compat @ total)


def mean_field_reference(q, unary, kernels, compat):
    """The same update pixel by pixel, as Algorithm 1 of Krähenbühl and Koltun reads (slow).

    It computes in float64, whatever the inputs' float dtype (a reference for float32
    steps too), and returns float64 marginals ``(L, N)`` in the library and on the device
    of ``q``; every array must come from that library.
    """
    kernels, xp = _check_step(q, unary, kernels, compat)
    q, unary, compat = (xp.astype(a, xp.float64) for a in (q, unary, compat))
    feats = [(w, xp.astype(f, xp.float64)) for w, f in kernels]
    out = xp.empty_like(q)
    for i in range(q.shape[1]):
        message = xp.zeros(q.shape[0], dtype=xp.float64, device=device(q))  # sum_m w_m sum_{j != i} k_m(f_i, f_j) Q_j
        for w, f in feats:
            k = xp.exp(-xp.sum((f - f[:, i:i + 1]) ** 2, axis=0) / 2)
            k[i] = 0.0                                            # j != i
            message = message + w * (q @ k)
        logits = -unary[:, i] - compat @ message
        e = xp.exp(logits - xp.max(logits))
        out[:, i] = e / xp.sum(e)
    return out
