"""Layers as forward/backward pairs, written by hand (no autograd): the textbook.

Every layer is two pure functions in the manner of CS231n::

    out, cache = layer_forward(x, ...)     # cache keeps what the backward needs
    dx, ... = layer_backward(dout, cache)  # one gradient per differentiable input

``dout`` is dL/d(out) for some scalar loss L, and each returned ``d<name>`` is
dL/d(<name>), with the shape of ``<name>``. The functions take and return
arrays of any array-API library (NumPy, CuPy, PyTorch, array-api-strict) and
never write into their inputs.

Shapes use ``B`` (batch), ``C`` (channels), ``S`` (spatial shape: ``(L,)``,
``(H, W)`` or ``(T, H, W)``) and ``N = prod(S)`` (positions). The pairwise
functions work on flattened feature maps ``(B, d, N)`` for queries and
``(B, d, M)`` for keys; they return ``(B, N, M)`` matrices whose row ``i``
holds query ``i`` against every key ``j``.

Each function reads like its equation. Where speed needed more (storage orders, column
plans, buffer reuse, chunking) it calls :mod:`nlref.nn.engine`, the one seam to the tuned
paths, which compute the same numbers: the fast convolution is held to
:func:`conv3d_reference`, a loop over the kernel's offsets. One consequence shows: on NumPy
and CuPy :func:`conv3d_forward` *stores* its output channels-last (like PyTorch's
``channels_last_3d``); the other layers accept either storage order, with the same values.
"""

from __future__ import annotations

import itertools
import math
import numbers
import operator

import numpy as np

from ..backend import array_namespace, asarray, check_flag, device, supports_out
from . import engine
from ._shapes import (check_batchnorm, check_dropout, check_float, check_grad, check_labels, check_linear,
                      check_pool_kernel, check_spatial, check_variance_overflow, conv_params, dtype_of,
                      mean_exact_if_constant, output_size, pad, pool_params, strided, window_offsets)
from .engine import exp_inplace as _exp_inplace  # noqa: F401  (nlref.nn.nonlocal_op imports it from here)

__all__ = [
    "conv1x1_forward", "conv1x1_backward",
    "batchnorm_forward", "batchnorm_backward",
    "relu_forward", "relu_backward",
    "maxpool_forward", "maxpool_backward", "pool_kernel",
    "softmax_forward", "softmax_backward",
    "dot_pairwise_forward", "dot_pairwise_backward",
    "concat_pairwise_forward", "concat_pairwise_backward",
    "conv3d_forward", "conv3d_backward", "conv3d_reference", "conv3d_reference_backward",
    "avgpool3d_forward", "avgpool3d_backward",
    "maxpool3d_forward", "maxpool3d_backward",
    "global_avgpool_forward", "global_avgpool_backward",
    "dropout_forward", "dropout_backward",
    "linear_forward", "linear_backward",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward",
]


def _namespace_xwb(x, w, b):
    """The one array library of a layer's input ``x``, weight ``w`` and optional bias ``b``."""
    return array_namespace(*((x, w) if b is None else (x, w, b)), names=["x", "w", "b"][:2 + (b is not None)])


def _flat(x):
    """(B, C, *S) -> (B, C, N), a view for contiguous arrays."""
    return array_namespace(x, names=["x"]).reshape(x, (x.shape[0], x.shape[1], math.prod(x.shape[2:])))


# --------------------------------------------------------------------------- 1x1 conv
def conv1x1_forward(x, w, b=None):
    r"""1x1 convolution: a linear map over channels at every position.

    .. math:: \mathrm{out}[b, o, n] = \sum_c w[o, c]\, x[b, c, n] + b[o]

    Parameters
    ----------
    x : array, shape (B, C_in, *S)
    w : array, shape (C_out, C_in)
    b : array, shape (C_out,), optional

    Returns
    -------
    out : array, shape (B, C_out, *S)
    cache : tuple
    """
    xp = array_namespace(x, w, names=["x", "w"])
    check_float("conv1x1_forward", xp, x=x, w=w, b=b)
    if x.ndim < 3 or w.ndim != 2 or w.shape[1] != x.shape[1] or (b is not None and tuple(b.shape) != (w.shape[0],)):
        raise ValueError(f"conv1x1_forward: needs x (B, C_in, *S), w (C_out, C_in) and b (C_out,) with matching "
                         f"channels, got x {tuple(x.shape)}, w {tuple(w.shape)}"
                         + ("" if b is None else f", b {tuple(b.shape)}"))
    out = xp.matmul(w, _flat(x))  # (C_out, C_in) @ (B, C_in, N) -> (B, C_out, N)
    if b is not None:
        out = engine.add_owned(out, xp.reshape(b, (1, b.shape[0], 1)))  # out + b, in out (fresh)
    out = xp.reshape(out, (x.shape[0], w.shape[0]) + tuple(x.shape[2:]))
    return out, (x, w, b is not None)


def conv1x1_backward(dout, cache):
    r"""Gradients of :func:`conv1x1_forward`.

    .. math::
        dx = w^\top\, d\mathrm{out}, \qquad
        dw = \sum_{b, n} d\mathrm{out}[b, :, n]\, x[b, :, n]^\top, \qquad
        db = \sum_{b, n} d\mathrm{out}[b, :, n]

    Returns
    -------
    dx : array, shape (B, C_in, *S)
    dw : array, shape (C_out, C_in)
    db : array, shape (C_out,) or None when the layer has no bias
    """
    x, w, has_bias = cache
    check_grad("conv1x1_backward", dout, (x.shape[0], w.shape[0], *x.shape[2:]), like=x)
    xp = array_namespace(dout, w, names=["dout", "w"])
    d3 = _flat(dout)
    dx = xp.reshape(xp.matmul(xp.matrix_transpose(w), d3), x.shape)
    dw = xp.sum(xp.matmul(d3, xp.matrix_transpose(_flat(x))), axis=0)  # B small products, then a sum
    db = xp.sum(d3, axis=(0, 2)) if has_bias else None
    return dx, dw, db


# --------------------------------------------------------------------------- batch norm
def batchnorm_forward(x, gamma, beta, state, *, training, momentum=0.1, eps=1e-5):
    r"""Batch normalisation over all axes but the channel axis.

    .. math:: \mathrm{out} = \gamma\,\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    Training mode uses the batch statistics (mean and biased variance over the
    ``M = B * N`` values of each channel) and updates the running statistics as
    PyTorch does: ``running = (1 - momentum) * running + momentum * batch``, with
    the *unbiased* variance ``sigma^2 * M / (M - 1)``. Eval mode uses the running
    statistics.

    Computed as ``out = (x - mu) * k + beta`` with ``k = gamma / sqrt(sigma^2 + eps)``,
    on ``x`` as a matrix whose columns each belong to one channel (``rows``, a
    :class:`nlref.nn.engine.ChannelRows`): ``rows.sums`` sums each channel's values
    (``rows.sums_of_products`` those of a product), ``rows.spread`` broadcasts a
    per-channel (C,) vector against the matrix and ``rows.scaled`` multiplies by one.

    Parameters
    ----------
    x : array, shape (B, C, *S)
    gamma, beta : arrays, shape (C,)
    state : dict
        ``{"running_mean": (C,), "running_var": (C,)}``. In training mode its two
        entries are *replaced* by new arrays (the old arrays are not written).
    training : bool
    momentum, eps : float
        PyTorch's defaults, 0.1 and 1e-5.

    Returns
    -------
    out : array, shape (B, C, *S)
    cache : tuple
    """
    xp = array_namespace(x, gamma, beta, names=["x", "gamma", "beta"])
    training = check_flag("batchnorm_forward: training", training)
    check_batchnorm(x, gamma, beta, state, momentum, eps)
    check_float("batchnorm_forward", xp, x=x, gamma=gamma, beta=beta, **{
        f"state[{k!r}]": state[k] for k in ("running_mean", "running_var")})
    if training and x.shape[0] * math.prod(x.shape[2:]) < 2:
        raise ValueError("batchnorm_forward: training needs more than one value per channel, "
                         f"got x of shape {tuple(x.shape)}")
    stats = (state[k] for k in ("running_mean", "running_var"))
    if engine.numba_applies(x, gamma, beta, *stats):  # the same equations, three fused passes
        fused = engine.batchnorm_forward_numba(x, gamma, beta, state, training=training, momentum=momentum, eps=eps)
        if fused is not None:
            check_variance_overflow("batchnorm_forward", xp, fused[1].inv_std, "a channel")
            return fused
    rows = engine.ChannelRows(x)
    x2 = rows.matrix(x)
    if training:
        m = rows.count
        mean = rows.sums(x2) / m
        centred = x2 - rows.spread(mean)
        var = rows.sums_of_products(centred, centred) / m
        exact = mean_exact_if_constant(xp, x, mean, var, m, axis=(0, *range(2, x.ndim)))
        if exact is not None:  # a channel within rounding of constant: its mean made exact, then as above
            mean = exact
            centred = x2 - rows.spread(mean)
            var = rows.sums_of_products(centred, centred) / m
        state["running_mean"] = (1 - momentum) * state["running_mean"] + momentum * mean
        state["running_var"] = (1 - momentum) * state["running_var"] + momentum * (var * (m / (m - 1)))
    else:
        mean, var = state["running_mean"], state["running_var"]
        centred = x2 - rows.spread(mean)
    inv_std = 1.0 / xp.sqrt(var + eps)
    check_variance_overflow("batchnorm_forward", xp, inv_std, "a channel")  # var = inf made x_hat = 0
    out = rows.scaled(centred, gamma * inv_std)
    out += rows.spread(beta)
    return rows.restore(out), (centred, gamma, inv_std, training, rows)


def batchnorm_backward(dout, cache):
    r"""Gradients of :func:`batchnorm_forward`.

    With :math:`\hat x = (x - \mu)/\sqrt{\sigma^2+\epsilon}` and the means taken per
    channel over the ``M`` values of the batch:

    .. math::
        d\hat x = \gamma\, d\mathrm{out}, \qquad
        dx = \frac{1}{\sqrt{\sigma^2+\epsilon}}\Big(d\hat x - \overline{d\hat x}
             - \hat x\,\overline{d\hat x\,\hat x}\Big) \ \text{(training)}, \qquad
        dx = \frac{d\hat x}{\sqrt{\sigma^2+\epsilon}} \ \text{(eval)}

    .. math:: d\gamma = \sum d\mathrm{out}\,\hat x, \qquad d\beta = \sum d\mathrm{out}

    In training mode ``dx`` is evaluated as ``k1 * dout + k2 * (x - mu) + k3`` with
    per-channel factors ``k1 = gamma / s``, ``k2 = -gamma dgamma / (M s^2)``,
    ``k3 = -gamma dbeta / (M s)`` (``s = sqrt(sigma^2 + eps)``): the same
    formula, three passes. With ``gamma == 0`` every factor is 0 and ``dx`` is an
    exact zero.

    Returns
    -------
    dx : array, shape (B, C, *S)
    dgamma, dbeta : arrays, shape (C,)
    """
    fused = isinstance(cache, engine.BatchNormCache)
    check_grad("batchnorm_backward", dout, cache.shape if fused else cache[-1].shape,
               like=cache.x if fused else cache[0])
    if fused:  # from the fused passes: the same equations, two passes
        array_namespace(dout, cache.x, names=["dout", "x"])  # one library for both
        return engine.batchnorm_backward_numba(dout, cache)
    centred, gamma, inv_std, training, rows = cache
    array_namespace(dout, centred, names=["dout", "centred"])  # one library for both
    d2 = rows.matrix(dout)
    m = rows.count
    dbeta = rows.sums(d2)
    dgamma = rows.sums_of_products(d2, centred) * inv_std
    k1 = gamma * inv_std
    dx = d2 * rows.spread(k1)
    if training:
        dx += rows.scaled(centred, -k1 * inv_std * dgamma / m)
        dx += rows.spread(-k1 * dbeta / m)
    return rows.restore(dx), dgamma, dbeta


# --------------------------------------------------------------------------- ReLU
def relu_forward(x):
    r"""Rectified linear unit, :math:`\max(x, 0)`, elementwise. Any shape; NaN stays NaN, as in PyTorch."""
    xp = array_namespace(x, names=["x"])
    return xp.maximum(x, xp.zeros((), dtype=x.dtype, device=device(x))), x


def relu_backward(dout, cache):
    r"""dx = dout * [x > 0] (the derivative at the kink x = 0 is taken as 0).

    A product with the 0/1 mask rather than ``where``: on NumPy that is a
    branch-free pass, about 15 times faster on values of random sign. (So an
    infinite ``dout`` where ``x <= 0`` gives NaN, not 0.)
    """
    x = cache
    check_grad("relu_backward", dout, x.shape, like=x)
    xp = array_namespace(dout, x, names=["dout", "x"])
    return dout * xp.astype(x > 0, dout.dtype)


# --------------------------------------------------------------------------- max pooling
def pool_kernel(dims):
    """The non-local block's subsampling kernel: 2 (1-D), (2, 2) (2-D), (1, 2, 2) (3-D)."""
    kernels = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
    if dims not in kernels:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    return kernels[dims]


def _window_samples(shape, kernel):
    """Index tuples, one per position inside a pooling window (row-major), each selecting that
    sample of every window: ``x[index]`` has the pooled shape (B, C, *(S // kernel)).

    Trailing samples that do not fill a window are never selected (``S_out = S // k``,
    as PyTorch floors).
    """
    out_s = [n // k for n, k in zip(shape[2:], kernel)]
    for offsets in itertools.product(*(range(k) for k in kernel)):
        yield (slice(None), slice(None)) + tuple(
            slice(o, o + (n - 1) * k + 1, k) for o, n, k in zip(offsets, out_s, kernel))


def maxpool_forward(x, kernel):
    r"""Max pooling with stride equal to the kernel, no padding.

    .. math:: \mathrm{out}[b, c, p] = \max_{q \in \mathrm{window}(p)} x[b, c, q]

    Computed as the elementwise maximum of ``prod(kernel)`` strided views of ``x``,
    one per position inside the window.

    Parameters
    ----------
    x : array, shape (B, C, *S)
    kernel : tuple of int, one per spatial axis (see :func:`pool_kernel`)

    Returns
    -------
    out : array, shape (B, C, *(S // kernel))
    cache : tuple
    """
    xp = array_namespace(x, names=["x"])
    check_float("maxpool_forward", xp, x=x)
    kernel = check_pool_kernel(x, kernel)
    out = engine.maxpool_numba(x, kernel) if engine.numba_applies(x) else None  # the same maxima, one pass
    if out is not None:
        return out, (x, out, kernel)
    for index in _window_samples(x.shape, kernel):
        out = xp.asarray(x[index], copy=True) if out is None else xp.maximum(out, x[index])
    return out, (x, out, kernel)


def maxpool_backward(dout, cache):
    """Route each output gradient to the input sample that was its window's maximum.

    Ties go to the first maximal sample in row-major order, as in PyTorch: the
    window positions are visited in that order and a window stops accepting once
    it has been served. A window holding NaN has NaN for its maximum and routes to
    its last NaN, as PyTorch's CPU kernel does (and :func:`maxpool3d_backward`). (As in :func:`relu_backward`, the routing is a product with
    a 0/1 mask, so an infinite ``dout`` leaves NaN at the window's other samples.)

    Returns
    -------
    dx : array, the input's shape; zero everywhere except at the maxima (and zero
        on trailing samples that fell outside every window).
    """
    x, out, kernel = cache
    check_grad("maxpool_backward", dout, out.shape, like=out)
    xp = array_namespace(dout, x, names=["dout", "x"])
    if engine.numba_applies(dout, x):  # the same routing, one pass
        dx = engine.maxpool_backward_numba(dout, x, out, kernel)
        if dx is not None:
            return dx
    dx = xp.zeros(x.shape, dtype=dout.dtype, device=device(x))
    served = None
    for index in _window_samples(x.shape, kernel):
        hit = x[index] == out
        if served is None:
            served = hit
        else:
            hit = hit & ~served
            served = served | hit
        dx[index] = dout * xp.astype(hit, dout.dtype)  # a product with the 0/1 mask: branch-free, see relu_backward
    if bool(xp.any(xp.isnan(out))):  # a NaN maximum equals nothing: the window's last NaN wins, as in PyTorch
        served = None
        for index in reversed(list(_window_samples(x.shape, kernel))):
            hit = xp.isnan(x[index])
            hit = hit if served is None else hit & ~served
            served = hit if served is None else served | hit
            dx[index] = xp.where(hit, dout, dx[index])
    return dx


# --------------------------------------------------------------------------- softmax
def softmax_forward(s, axis=-1):
    r"""Numerically stable softmax along ``axis``.

    .. math:: p_{ij} = \frac{e^{s_{ij} - m_i}}{\sum_k e^{s_{ik} - m_i}}, \qquad m_i = \max_k s_{ik}

    Subtracting the row maximum changes nothing mathematically and keeps every
    exponent <= 0, so no logit, however large, overflows.

    Returns
    -------
    p : array, the shape of ``s``
    cache : tuple
    """
    xp = array_namespace(s, names=["s"])
    check_float("softmax_forward", xp, s=s)
    if engine.numba_applies(s) and axis in (-1, s.ndim - 1):  # the same steps, one pass per row
        p = np.array(s, order="C")
        engine.softmax_rows(p, normalise=True)
        return p, (p, axis)
    p = s - xp.max(s, axis=axis, keepdims=True)
    p = _exp_inplace(xp, p)
    p /= xp.sum(p, axis=axis, keepdims=True)
    return p, (p, axis)


def softmax_backward(dp, cache):
    r"""Gradient of :func:`softmax_forward` (the softmax Jacobian applied to ``dp``).

    .. math:: ds_{ij} = p_{ij}\Big(dp_{ij} - \sum_k dp_{ik}\, p_{ik}\Big)
    """
    p, axis = cache
    check_grad("softmax_backward", dp, p.shape, name="dp", like=p)
    xp = array_namespace(dp, p, names=["dp", "p"])
    if engine.numba_applies(dp, p) and axis in (-1, p.ndim - 1):  # one pass per row
        return engine.softmax_backward_rows(dp, p)
    ds = dp * p
    ds -= p * xp.sum(ds, axis=axis, keepdims=True)
    return ds


# --------------------------------------------------------------------------- pairwise functions
def dot_pairwise_forward(theta, phi, scale=1.0):
    r"""Scaled dot products of every query with every key.

    .. math:: s_{ij} = \mathrm{scale}\cdot \theta_i^\top \phi_j

    The logits of the (embedded) Gaussian and the raw values of the dot-product
    pairwise function.

    Parameters
    ----------
    theta : array, shape (B, d, N)   queries
    phi : array, shape (B, d, M)     keys
    scale : float

    Returns
    -------
    s : array, shape (B, N, M)
    cache : tuple
    """
    xp = array_namespace(theta, phi, names=["theta", "phi"])
    check_float("dot_pairwise_forward", xp, theta=theta, phi=phi)
    s = xp.matmul(xp.matrix_transpose(theta), phi)
    if scale != 1.0:
        s *= scale
    return s, (theta, phi, scale)


def dot_pairwise_backward(ds, cache):
    r"""Gradients of :func:`dot_pairwise_forward`.

    .. math:: d\theta = \mathrm{scale}\cdot\phi\, ds^\top, \qquad d\phi = \mathrm{scale}\cdot\theta\, ds

    Returns ``dtheta`` (B, d, N) and ``dphi`` (B, d, M).
    """
    theta, phi, scale = cache
    check_grad("dot_pairwise_backward", ds, (theta.shape[0], theta.shape[2], phi.shape[2]), name="ds", like=theta)
    xp = array_namespace(ds, theta, names=["ds", "theta"])
    dtheta = xp.matmul(phi, xp.matrix_transpose(ds))
    dphi = xp.matmul(theta, ds)
    if scale != 1.0:  # on the small results, not on the (B, N, M) ds
        dtheta *= scale
        dphi *= scale
    return dtheta, dphi


def concat_pairwise_forward(theta, phi, w_f):
    r"""The concatenation pairwise function, without building the concatenation.

    .. math::
        f_{ij} = \mathrm{ReLU}\big(w_f^\top [\theta_i; \phi_j]\big)
               = \mathrm{ReLU}(a_i + b_j), \quad
        a_i = w_\theta^\top \theta_i, \quad b_j = w_\phi^\top \phi_j

    where ``w_f = [w_theta; w_phi]``. The ``(B, N, M, 2d)`` tensor of pairs is
    never formed: two projections and one broadcast add give the same numbers.

    Parameters
    ----------
    theta : array, shape (B, d, N)
    phi : array, shape (B, d, M)
    w_f : array, shape (2d,)

    Returns
    -------
    f : array, shape (B, N, M)
    cache : tuple
        Keeps ``f`` itself: the ReLU is active exactly where ``f > 0``, so the
        backward pass needs no separate pre-activation. (Scaling ``f`` in place
        by a positive number, as the non-local operation's ``1/M`` does, keeps
        that true.)
    """
    xp = array_namespace(theta, phi, w_f, names=["theta", "phi", "w_f"])
    check_float("concat_pairwise_forward", xp, theta=theta, phi=phi, w_f=w_f)
    d = theta.shape[1]
    if w_f.shape != (2 * d,):
        raise ValueError(f"w_f must have shape ({2 * d},) for {d} channels, got {tuple(w_f.shape)}")
    a = xp.matmul(w_f[:d], theta)  # (B, N)
    b = xp.matmul(w_f[d:], phi)  # (B, M)
    f, _ = relu_forward(a[:, :, None] + b[:, None, :])
    return f, (theta, phi, w_f, f)


def concat_pairwise_backward(df, cache):
    r"""Gradients of :func:`concat_pairwise_forward`.

    With :math:`dp = df \odot [f > 0]` (the ReLU's routing):
    :math:`da_i = \sum_j dp_{ij}`, :math:`db_j = \sum_i dp_{ij}`,
    :math:`d\theta = w_\theta\, da^\top`, :math:`d\phi = w_\phi\, db^\top`,
    :math:`dw_\theta = \sum_{b,i} \theta_i\, da_i`, :math:`dw_\phi = \sum_{b,j} \phi_j\, db_j`.

    Returns ``dtheta`` (B, d, N), ``dphi`` (B, d, M), ``dw_f`` (2d,).
    """
    theta, phi, w_f, f = cache
    check_grad("concat_pairwise_backward", df, f.shape, name="df", like=f)
    array_namespace(df, f, names=["df", "f"])  # one library for both
    return _concat_linear_backward(relu_backward(df, f), theta, phi, w_f)


def _concat_linear_backward(dpre, theta, phi, w_f):
    """dtheta, dphi, dw_f of :func:`concat_pairwise_forward` from ``dpre``, the gradient before the ReLU."""
    xp = array_namespace(dpre, theta, names=["dpre", "theta"])
    return _concat_sums_backward(xp.sum(dpre, axis=2), xp.sum(dpre, axis=1), theta, phi, w_f)


def _concat_sums_backward(da, db, theta, phi, w_f):
    """The same from ``da`` (B, N) and ``db`` (B, M), the row and column sums of ``dpre``."""
    xp = array_namespace(da, theta, names=["da", "theta"])
    d = theta.shape[1]
    dtheta = w_f[:d][None, :, None] * da[:, None, :]
    dphi = w_f[d:][None, :, None] * db[:, None, :]
    dw_f = xp.concat([xp.sum(xp.matmul(theta, da[:, :, None])[:, :, 0], axis=0),
                      xp.sum(xp.matmul(phi, db[:, :, None])[:, :, 0], axis=0)])
    return dtheta, dphi, dw_f


# =========================================================================== network layers
# For whole video networks: (B, C, T, H, W) activations, PyTorch's weight layouts.


# --------------------------------------------------------------------------- 3-D convolution
def conv3d_reference(x, w, b=None, *, stride=1, padding=0):
    r"""3-D convolution by its definition: a loop over the kernel's offsets. The specification.

    .. math::
        \mathrm{out}[b, o, t, h, w] = \mathrm{b}[o] + \sum_{i, j, k} \sum_c
            w[o, c, i, j, k]\; x_\mathrm{pad}[b, c,\ s_t t + i,\ s_h h + j,\ s_w w + k]

    (a cross-correlation, as in every deep-learning library; ``x_pad`` is ``x`` with
    ``padding`` zeros on both sides of each spatial axis). For one offset ``(i, j, k)``
    the inner sum is one product: the (O, C) matrix ``w[:, :, i, j, k]`` times the
    shifted, strided slice of ``x_pad`` that the offset sees in every window. So the
    convolution is ``kt kh kw`` such products, added up. Portable array-API code, slow
    and obviously right: :func:`conv3d_forward` computes the same numbers fast and is
    tested equal to this.

    Parameters
    ----------
    x : array, shape (B, C, T, H, W)
    w : array, shape (O, C, kt, kh, kw)
    b : array, shape (O,), optional
    stride, padding : int or 3-tuple of int

    Returns
    -------
    out : array, shape (B, O, T', H', W'), ``T' = floor((T + 2 p_t - kt) / s_t) + 1`` and so on
    cache : tuple, for :func:`conv3d_reference_backward`
    """
    func = "conv3d_reference"
    xp = _namespace_xwb(x, w, b)
    kernel, stride, padding, out_size = conv_params(func, xp, x, w, b, stride, padding)
    xpad = pad(xp, x, padding)
    batch, o = x.shape[0], w.shape[0]
    out = xp.zeros((batch, o, math.prod(out_size)), dtype=x.dtype, device=device(x))
    for offset in window_offsets(kernel):  # (i, j, k)
        seen = xpad[strided(offset, out_size, stride)]  # x_pad[b, c, s_t t + i, s_h h + j, s_w w + k]
        tap = w[(slice(None), slice(None)) + offset]  # w[:, :, i, j, k], (O, C)
        out = out + xp.matmul(tap, xp.reshape(seen, (batch, x.shape[1], -1)))  # sum over c
    if b is not None:
        out = out + xp.reshape(b, (1, o, 1))
    return xp.reshape(out, (batch, o) + out_size), (x, w, b is not None, stride, padding)


def conv3d_reference_backward(dout, cache):
    r"""Gradients of :func:`conv3d_reference`, offset by offset, from the same loop.

    Offset ``(i, j, k)`` added ``w[:, :, i, j, k] @ x_pad[shifted slice]`` to the output,
    so it contributes

    .. math::
        dw[o, c, i, j, k] = \sum_{b, t, h, w} d\mathrm{out}[b, o, t, h, w]\;
            x_\mathrm{pad}[b, c,\ s_t t + i,\ s_h h + j,\ s_w w + k],

    .. math::
        dx_\mathrm{pad}[b, c,\ s_t t + i,\ s_h h + j,\ s_w w + k] \mathrel{+}=
            \sum_o w[o, c, i, j, k]\; d\mathrm{out}[b, o, t, h, w],

    and :math:`db[o] = \sum_{b, t, h, w} d\mathrm{out}[b, o, t, h, w]`. Summed over the
    offsets, the second line says that ``dx`` is a *full* correlation of ``dout`` with
    the flipped kernel (for stride 1), and the first that ``dw`` is a correlation of the
    input with ``dout``; ``dx`` is ``dx_pad`` without its border.

    Returns
    -------
    dx : array, shape (B, C, T, H, W)
    dw : array, shape (O, C, kt, kh, kw)
    db : array, shape (O,), or None when the layer has no bias
    """
    x, w, has_bias, stride, padding = cache
    check_grad("conv3d_reference_backward", dout, (x.shape[0], w.shape[0], *output_size(
        "conv3d_reference_backward", x.shape[2:], w.shape[2:], stride, padding)), like=x)
    xp = array_namespace(dout, x, names=["dout", "x"])
    out_size, batch = tuple(dout.shape[2:]), x.shape[0]
    d3 = xp.reshape(dout, (batch, w.shape[0], -1))  # (B, O, T' H' W')
    xpad = pad(xp, x, padding)
    dxpad = xp.zeros(xpad.shape, dtype=dout.dtype, device=device(dout))
    dw = xp.zeros(w.shape, dtype=dout.dtype, device=device(dout))
    for offset in window_offsets(tuple(w.shape[2:])):
        shifted = strided(offset, out_size, stride)
        tap = (slice(None), slice(None)) + offset
        seen = xp.reshape(xpad[shifted], (batch, x.shape[1], -1))  # (B, C, T' H' W')
        dw[tap] = xp.sum(xp.matmul(d3, xp.matrix_transpose(seen)), axis=0)  # (O, C)
        back = xp.matmul(xp.matrix_transpose(w[tap]), d3)  # (B, C, T' H' W')
        dxpad[shifted] = dxpad[shifted] + xp.reshape(back, (batch, x.shape[1]) + out_size)
    t, h, wd = x.shape[2:]
    (pt, ph, pw) = padding
    dx = dxpad[:, :, pt:pt + t, ph:ph + h, pw:pw + wd]
    db = xp.sum(dout, axis=(0, 2, 3, 4)) if has_bias else None
    return dx, dw, db


def conv3d_forward(x, w, b=None, *, stride=1, padding=0):
    r"""3-D convolution, fast: the numbers of :func:`conv3d_reference` (up to the order of the sums).

    Computed by *im2col*: the ``K = kt kh kw`` samples under every window are copied into
    one row of a column matrix ``cols`` (B T' H' W', K C), and the whole convolution is one
    matrix product, :math:`\mathrm{out}_{(B T' H' W',\ O)} = \mathrm{cols}\ w_{(K C,\ O)}`.
    :func:`nlref.nn.engine.conv3d_forward` does that channels-last, in cache-sized chunks,
    with the other tricks of :mod:`nlref.nn.engine.conv`. On NumPy and CuPy the output is
    *stored* channels-last (a transposed view of a (B, T', H', W', O) array), which the
    next convolution reads without a copy; its values do not depend on this.

    Parameters
    ----------
    x : array, shape (B, C, T, H, W)
    w : array, shape (O, C, kt, kh, kw)
        PyTorch's layout (``torch.nn.Conv3d.weight``).
    b : array, shape (O,), optional
    stride, padding : int or 3-tuple of int
        Per axis (T, H, W); padding adds that many zeros on both sides.

    Returns
    -------
    out : array, shape (B, O, T', H', W')
        PyTorch's sizes: ``T' = floor((T + 2 p_t - kt) / s_t) + 1``, and so on.
    cache : tuple
        The engine's context (``x`` channels-last, ``w``, and for strided convolutions up
        to 64 MiB of the column matrix) and whether there is a bias.
    """
    func = "conv3d_forward"
    xp = _namespace_xwb(x, w, b)
    kernel, stride, padding, out_size = conv_params(func, xp, x, w, b, stride, padding)
    out, context = engine.conv3d_forward(xp, x, w, kernel, stride, padding, out_size)  # cols @ w
    if b is not None:
        out = out + xp.reshape(b, (1, -1, 1, 1, 1))
    return out, (context, b is not None)


def conv3d_backward(dout, cache, *, input_grad=True):
    r"""Gradients of :func:`conv3d_forward`, fast: those of :func:`conv3d_reference_backward`.

    With ``d`` the output gradient as a (B T' H' W', O) matrix, :math:`dw = \mathrm{cols}^\top d`,
    :math:`db = \sum_r d[r, :]` and :math:`dx = \mathrm{col2im}(d\, w^\top)`, col2im adding
    each offset's columns back onto the slice of the padded gradient they were copied
    from. With stride 1 the engine computes ``dx`` as the full correlation of ``dout`` with
    the flipped kernel instead (:func:`nlref.nn.engine.conv3d_backward`; notebook 06).
    ``dx`` is returned stored channels-last, like the forward's output.

    Parameters
    ----------
    dout : array, shape (B, O, T', H', W')
    cache : tuple, from :func:`conv3d_forward`
    input_grad : bool
        False skips ``dx`` (a network's first layer needs only ``dw``), returning None for it.

    Returns
    -------
    dx : array, shape (B, C, T, H, W), or None
    dw : array, shape (O, C, kt, kh, kw)
    db : array, shape (O,), or None when the layer has no bias
    """
    context, has_bias = cache
    input_grad = check_flag("conv3d_backward: input_grad", input_grad)
    x_shape, w = context.x_cl.shape, context.w
    check_grad("conv3d_backward", dout, (x_shape[0], w.shape[0], *output_size(
        "conv3d_backward", x_shape[1:4], w.shape[2:], context.stride, context.padding)), like=w)
    xp = array_namespace(dout, context.w, names=["dout", "w"])
    return engine.conv3d_backward(xp, dout, context, input_grad=input_grad, bias=has_bias)


# --------------------------------------------------------------------------- 3-D average and max pooling
def avgpool3d_forward(x, kernel, stride=None, padding=0):
    r"""3-D average pooling, PyTorch semantics (``count_include_pad=True``, floor mode).

    .. math::
        \mathrm{out}[b, c, p] = \frac{1}{k_t k_h k_w}
            \sum_{q \in \mathrm{window}(p)} x_\mathrm{pad}[b, c, q]

    The zeros of the padding count in the divisor, which is always the full
    window size. Computed as the sum of ``prod(kernel)`` strided slices of the
    padded input, one per offset inside the window.

    Parameters
    ----------
    x : array, shape (B, C, T, H, W)
    kernel : int or 3-tuple of int
    stride : int or 3-tuple of int, optional
        Defaults to ``kernel`` (non-overlapping windows).
    padding : int or 3-tuple of int
        At most half the kernel on each axis.

    Returns
    -------
    out : array, shape (B, C, T', H', W')
        ``T' = floor((T + 2 p_t - k_t) / s_t) + 1`` and so on.
    cache : tuple
    """
    func = "avgpool3d_forward"
    xp = array_namespace(x, names=["x"])
    check_float(func, xp, x=x)
    kernel, stride, padding, out_size = pool_params(func, x, kernel, stride, padding)
    xpad = pad(xp, x, padding)
    out = None
    for offset in window_offsets(kernel):
        sample = xpad[strided(offset, out_size, stride)]
        if out is None:
            out = xp.asarray(sample, copy=True)
        else:
            out += sample
    out *= 1.0 / math.prod(kernel)
    return out, (tuple(x.shape), kernel, stride, padding)


def avgpool3d_backward(dout, cache):
    r"""Gradient of :func:`avgpool3d_forward`: every input sample receives
    ``dout / prod(kernel)`` from each window that covers it (overlapping windows add up).

    Returns
    -------
    dx : array, shape (B, C, T, H, W)
    """
    x_shape, kernel, stride, padding = cache
    check_grad("avgpool3d_backward", dout, (*x_shape[:2], *output_size("avgpool3d_backward", x_shape[2:], kernel,
                                                                        stride, padding)))
    xp = array_namespace(dout, names=["dout"])
    share = dout * (1.0 / math.prod(kernel))
    return _scatter_windows(xp, lambda k: share, x_shape, kernel, stride, padding, dout)


def _scatter_windows(xp, part, x_shape, kernel, stride, padding, dout):
    """The adjoint of reading one strided slice of the padded input per window offset.

    Offset ``k`` adds ``part(k)`` (shape of ``dout``: (B, C, *out_size)) onto its strided
    slice of a zero-padded array. Returns the unpadded (B, C, T, H, W) part.
    """
    out_size = tuple(dout.shape[2:])
    padded = tuple(x_shape[:2]) + tuple(n + 2 * p for n, p in zip(x_shape[2:], padding))
    dxpad = xp.zeros(padded, dtype=dout.dtype, device=device(dout))
    for k, offset in enumerate(window_offsets(kernel)):
        engine.add_at(dxpad, strided(offset, out_size, stride), part(k))  # dxpad[slice] += part(k)
    if not any(padding):
        return dxpad
    (pt, ph, pw), (t, h, w) = padding, x_shape[2:]
    return xp.asarray(dxpad[:, :, pt:pt + t, ph:ph + h, pw:pw + w], copy=True)


def maxpool3d_forward(x, kernel, stride=None, padding=0):
    r"""3-D max pooling, PyTorch semantics (any stride, padding that acts as :math:`-\infty`, floor mode).

    .. math:: \mathrm{out}[b, c, p] = \max_{q \in \mathrm{window}(p)} x_\mathrm{pad}[b, c, q]

    Visits the ``prod(kernel)`` offsets inside the window in row-major order and
    keeps, per window, the running maximum and the offset it came from; a sample
    replaces the maximum only when it is strictly larger (or NaN), so ties keep
    the *first* maximal sample and NaN propagates, exactly as PyTorch's CPU kernel.

    Parameters
    ----------
    x : array, shape (B, C, T, H, W)
    kernel : int or 3-tuple of int
    stride : int or 3-tuple of int, optional
        Defaults to ``kernel``.
    padding : int or 3-tuple of int
        At most half the kernel on each axis.

    Returns
    -------
    out : array, shape (B, C, T', H', W')
    cache : tuple
        Keeps the winning offset of every window (int16/int32 array of ``out``'s shape).
    """
    func = "maxpool3d_forward"
    xp = array_namespace(x, names=["x"])
    check_float(func, xp, x=x)
    kernel, stride, padding, out_size = pool_params(func, x, kernel, stride, padding)
    xpad = pad(xp, x, padding, value=-math.inf)
    offsets = window_offsets(kernel)
    arg_dtype = xp.int16 if len(offsets) <= 2**15 - 1 else xp.int32
    if supports_out(xp):  # NumPy, CuPy: the same steps, branch-free, in place
        out, arg = engine.running_max(x, xpad, offsets, out_size, stride, arg_dtype)
        return out, (tuple(x.shape), kernel, stride, padding, arg)
    out = xp.asarray(xpad[strided(offsets[0], out_size, stride)], copy=True)
    arg = xp.zeros(out.shape, dtype=arg_dtype, device=device(x))
    for k, offset in enumerate(offsets[1:], start=1):
        sample = xpad[strided(offset, out_size, stride)]
        better = (sample > out) | xp.isnan(sample)
        out = xp.where(better, sample, out)
        arg = xp.where(better, xp.asarray(k, dtype=arg_dtype, device=device(x)), arg)
    return out, (tuple(x.shape), kernel, stride, padding, arg)


def maxpool3d_backward(dout, cache):
    r"""Gradient of :func:`maxpool3d_forward`: each window's ``dout`` goes to the sample
    that won it (the first maximum); a sample that wins several overlapping windows
    collects all their gradients.

    Returns
    -------
    dx : array, shape (B, C, T, H, W)
    """
    x_shape, kernel, stride, padding, arg = cache
    check_grad("maxpool3d_backward", dout, arg.shape)
    xp = array_namespace(dout, arg, names=["dout", "arg"])
    if supports_out(xp):
        won = engine.winner_gradients(dout, arg)  # the same, into reused buffers
    else:
        zero = xp.zeros((), dtype=dout.dtype, device=device(dout))

        def won(k):
            return xp.where(arg == k, dout, zero)

    return _scatter_windows(xp, won, x_shape, kernel, stride, padding, dout)


# --------------------------------------------------------------------------- global average pooling
def global_avgpool_forward(x):
    r"""Mean over every spatial axis: (B, C, \*S) -> (B, C).

    .. math:: \mathrm{out}[b, c] = \frac{1}{N} \sum_{n} x[b, c, n], \qquad N = \prod S

    The sum runs over the channels-last copy of ``x`` (a view when ``x`` is stored
    that way), so the result does not depend on how ``x`` is stored, to the bit.

    Returns
    -------
    out : array, shape (B, C)
    cache : tuple
    """
    xp = array_namespace(x, names=["x"])
    check_spatial("global_avgpool_forward", xp, x)
    x3 = xp.reshape(engine.channels_last(x), (x.shape[0], -1, x.shape[1]))
    return xp.mean(x3, axis=1), tuple(x.shape)


def global_avgpool_backward(dout, cache):
    r"""Gradient of :func:`global_avgpool_forward`: :math:`dx[b, c, n] = d\mathrm{out}[b, c] / N`.

    Returns
    -------
    dx : array, shape (B, C, \*S) (a fresh array stored channels-last, not a broadcast view)
    """
    x_shape = cache
    check_grad("global_avgpool_backward", dout, x_shape[:2])
    xp = array_namespace(dout, names=["dout"])
    n = math.prod(x_shape[2:])
    dx = xp.zeros((x_shape[0] * n, x_shape[1]), dtype=dout.dtype, device=device(dout))
    dx = xp.reshape(dx, (x_shape[0], n, x_shape[1])) + (dout / n)[:, None, :]
    return engine.channels_first(xp, xp.reshape(dx, (x_shape[0],) + tuple(x_shape[2:]) + (x_shape[1],)))


# --------------------------------------------------------------------------- dropout
def dropout_forward(x, p, *, training, seed=None):
    r"""Inverted dropout: zero each value with probability ``p``, scale the rest by ``1/(1-p)``.

    .. math:: \mathrm{out} = x \odot m / (1 - p), \qquad m_i \sim \mathrm{Bernoulli}(1 - p)

    so that :math:`E[\mathrm{out}] = x` and evaluation needs no rescaling. The
    keep-mask is drawn on the host with ``numpy.random.default_rng(seed)``
    (``keep = u >= p`` for uniform ``u``) and moved to ``x``'s library and
    device, so one seed gives the same mask on every backend.

    Parameters
    ----------
    x : array, any shape
    p : float
        Drop probability, ``0 <= p < 1``.
    training : bool
        ``False`` (evaluation) or ``p == 0``: the identity, ``out`` is ``x`` itself.
    seed : int
        Seeds the mask; required when training with ``p > 0``.

    Returns
    -------
    out : array, the shape of ``x``
    cache : array or None
        The scaled mask ``m / (1 - p)``, or None for the identity.
    """
    xp = array_namespace(x, names=["x"])
    training = check_flag("dropout_forward: training", training)
    check_dropout(xp, x, p, seed, training)
    if not training or p == 0:
        return x, None
    keep = np.random.default_rng(operator.index(seed)).random(tuple(x.shape)) >= p
    mask = keep.astype(dtype_of(x)) * np.asarray(1.0 / (1.0 - p), dtype=dtype_of(x))
    mask = asarray(mask, like=x)
    return x * mask, mask


def dropout_backward(dout, cache):
    r"""Gradient of :func:`dropout_forward`: :math:`dx = d\mathrm{out} \odot m / (1 - p)`
    (``dout`` itself for the identity)."""
    mask = cache
    if mask is None:  # the identity: any shape
        return dout
    check_grad("dropout_backward", dout, mask.shape, like=mask)
    array_namespace(dout, mask, names=["dout", "mask"])  # one library for both
    return dout * mask


# --------------------------------------------------------------------------- fully connected
def linear_forward(x, w, b=None):
    r"""Fully connected layer, :math:`\mathrm{out} = x\, w^\top + b`.

    Parameters
    ----------
    x : array, shape (B, F)
    w : array, shape (O, F)
        PyTorch's layout (``torch.nn.Linear.weight``).
    b : array, shape (O,), optional

    Returns
    -------
    out : array, shape (B, O)
    cache : tuple
    """
    func = "linear_forward"
    xp = _namespace_xwb(x, w, b)
    check_linear(func, xp, x, w, b)
    out = xp.matmul(x, xp.matrix_transpose(w))
    if b is not None:
        out = out + b
    return out, (x, w, b is not None)


def linear_backward(dout, cache):
    r"""Gradients of :func:`linear_forward`.

    .. math:: dx = d\mathrm{out}\, w, \qquad dw = d\mathrm{out}^\top x, \qquad db = \sum_b d\mathrm{out}[b, :]

    Returns
    -------
    dx : array, shape (B, F)
    dw : array, shape (O, F)
    db : array, shape (O,), or None when the layer has no bias
    """
    x, w, has_bias = cache
    check_grad("linear_backward", dout, (*x.shape[:-1], w.shape[0]), like=x)
    xp = array_namespace(dout, x, names=["dout", "x"])
    dx = xp.matmul(dout, w)
    dw = xp.matmul(xp.matrix_transpose(dout), x)
    db = xp.sum(dout, axis=0) if has_bias else None
    return dx, dw, db


# --------------------------------------------------------------------------- softmax cross-entropy
def softmax_cross_entropy_forward(logits, labels):
    r"""Mean cross-entropy of the softmax of ``logits`` against integer class labels.

    .. math::
        L = \frac{1}{B} \sum_b \Big( \log \sum_k e^{z_{bk} - m_b} - (z_{b y_b} - m_b) \Big),
        \qquad m_b = \max_k z_{bk}

    which is :math:`-\frac1B \sum_b \log \mathrm{softmax}(z_b)_{y_b}`, computed with
    the log-sum-exp shifted by the row maximum so that no logit overflows.

    Parameters
    ----------
    logits : array, shape (B, K), float32 or float64
    labels : array, shape (B,), integer dtype
        Class indices in ``[0, K)``, from the same library as ``logits``.

    Returns
    -------
    loss : array, shape ()
        A 0-d array of the logits' library, device and dtype.
    cache : tuple
        Keeps the softmax probabilities (B, K) and the one-hot labels.
    """
    func = "softmax_cross_entropy_forward"
    xp = array_namespace(logits, labels, names=["logits", "labels"])
    check_labels(func, xp, logits, labels)
    k = logits.shape[1]
    z = logits - xp.max(logits, axis=1, keepdims=True)
    e = xp.exp(z)
    total = xp.sum(e, axis=1, keepdims=True)
    classes = xp.arange(k, dtype=xp.int64, device=device(labels))
    onehot = xp.astype(xp.astype(labels, xp.int64)[:, None] == classes[None, :], logits.dtype)
    picked = xp.sum(z * onehot, axis=1)
    loss = xp.asarray(xp.mean(xp.log(total[:, 0]) - picked))
    return loss, (e / total, onehot)


def softmax_cross_entropy_backward(dloss, cache):
    r"""Gradient of :func:`softmax_cross_entropy_forward`.

    .. math:: d\mathrm{logits} = d\mathrm{loss}\cdot\frac{\mathrm{softmax}(z) - \mathrm{onehot}(y)}{B}

    Parameters
    ----------
    dloss : float or 0-d array (1.0 when the loss is the final objective)
    cache : tuple, from :func:`softmax_cross_entropy_forward`

    Returns
    -------
    dlogits : array, shape (B, K)
    """
    p, onehot = cache
    if getattr(dloss, "shape", ()) != ():
        check_grad("softmax_cross_entropy_backward", dloss, (), name="dloss")
    dlogits = (p - onehot) * (dloss / p.shape[0])
    if dlogits.dtype != p.dtype:  # a float64 dloss must not promote float32 logits
        dlogits = array_namespace(p).astype(dlogits, p.dtype)
    return dlogits


# =========================================================================== chapter 8: the transformer's parts
# LayerNorm and GELU, the two layers a transformer block adds to what the non-local block
# already has (1x1 convolutions are linear maps over the last axis once x is (B, N, E);
# :func:`linear_forward` serves them through a (B * N, E) view).
__all__ += ["layernorm_forward", "layernorm_backward", "gelu_forward", "gelu_backward", "erf"]

def layernorm_forward(x, gamma, beta, eps=1e-5):
    r"""Layer normalisation over the last axis (each token on its own).

    .. math::
        \mu = \frac1D \sum_k x_k, \quad \sigma^2 = \frac1D \sum_k (x_k - \mu)^2, \quad
        \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \quad
        \mathrm{out} = \gamma \odot \hat x + \beta

    The biased variance, as ``torch.nn.LayerNorm``. Unlike batch norm there are no
    running statistics: training and evaluation compute the same thing.

    Parameters
    ----------
    x : array, shape (..., D)
    gamma, beta : arrays, shape (D,)
    eps : float
        Added to the variance (``> 0``).

    Returns
    -------
    out : array, the shape of ``x``
    cache : tuple
        ``(x_hat, gamma, inv_std)``.
    """
    func = "layernorm_forward"
    xp = array_namespace(x, gamma, beta, names=["x", "gamma", "beta"])
    check_float(func, xp, x=x, gamma=gamma, beta=beta)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{func}: x must have shape (..., D) with D >= 1, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    for name, a in (("gamma", gamma), ("beta", beta)):
        if tuple(a.shape) != (d,):
            raise ValueError(f"{func}: {name} must have shape ({d},) (one value per feature of the last axis), "
                             f"got shape {tuple(a.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{func}: eps must be a positive finite number, got {eps!r}")
    mu = xp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = xp.mean(xc * xc, axis=-1, keepdims=True)
    exact = mean_exact_if_constant(xp, x, mu, var, d, axis=-1, keepdims=True)
    if exact is not None:  # a row within rounding of constant: its mean made exact, then as above
        mu = exact
        xc = x - mu
        var = xp.mean(xc * xc, axis=-1, keepdims=True)
    inv_std = 1.0 / xp.sqrt(var + eps)
    check_variance_overflow("layernorm_forward", xp, inv_std, "a row")  # var = inf made x_hat = 0
    x_hat = xc * inv_std
    return gamma * x_hat + beta, (x_hat, gamma, inv_std)


def layernorm_backward(dout, cache):
    r"""Gradients of :func:`layernorm_forward`.

    With :math:`g = d\mathrm{out} \odot \gamma` (the gradient reaching :math:`\hat x`),
    each token's mean and variance couple its ``D`` values:

    .. math::
        dx = \frac{1}{\sqrt{\sigma^2 + \epsilon}}\Big(g - \overline{g} - \hat x\, \overline{g \odot \hat x}\Big),
        \qquad d\gamma = \sum_{\text{tokens}} d\mathrm{out} \odot \hat x, \qquad
        d\beta = \sum_{\text{tokens}} d\mathrm{out}

    where the bars are means over the last axis: the first removes the part of ``g``
    that would move the token's mean, the second the part that would change its scale.

    Returns
    -------
    dx : array, the shape of ``x``
    dgamma, dbeta : arrays, shape (D,)
    """
    x_hat, gamma, inv_std = cache
    check_grad("layernorm_backward", dout, x_hat.shape, like=x_hat)
    xp = array_namespace(dout, x_hat, names=["dout", "x_hat"])
    axes = tuple(range(dout.ndim - 1))
    dgamma = xp.sum(dout * x_hat, axis=axes) if axes else dout * x_hat
    dbeta = xp.sum(dout, axis=axes) if axes else dout
    g = dout * gamma
    dx = inv_std * (g - xp.mean(g, axis=-1, keepdims=True) - x_hat * xp.mean(g * x_hat, axis=-1, keepdims=True))
    return dx, dgamma, dbeta


GELU_APPROXIMATIONS = ("none", "tanh")


def erf(x):
    r"""The error function :math:`\mathrm{erf}(x) = \frac{2}{\sqrt\pi}\int_0^x e^{-t^2}\,dt`, elementwise.

    The array API standard has no ``erf``; this dispatches to the library's own
    (SciPy's for NumPy, ``cupyx.scipy.special`` for CuPy, ``torch.special`` for
    PyTorch). Other libraries (array-api-strict, a CPU stand-in) go through the
    host and come back to ``x``'s library, device and dtype.
    """
    from ..backend import is_numpy

    xp = array_namespace(x, names=["x"])
    if is_numpy(xp):
        import scipy.special
        return xp.asarray(scipy.special.erf(x))
    name = type(x).__module__.split(".")[0]
    if name == "cupy":
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    if name == "torch":
        import torch
        return torch.special.erf(x)
    import scipy.special
    host = np.from_dlpack(x) if not isinstance(x, np.ndarray) else x
    return asarray(scipy.special.erf(host), like=x, dtype=x.dtype)


def gelu_forward(x, approximate="none"):
    r"""The Gaussian error linear unit, :math:`x\,\Phi(x)` (Hendrycks & Gimpel, 2016).

    .. math::
        \mathrm{gelu}(x) = \frac x2\Big(1 + \mathrm{erf}\big(x/\sqrt2\big)\Big)
        \qquad (\texttt{approximate="none"}, \text{PyTorch's default})

    .. math::
        \mathrm{gelu}_{\tanh}(x) = \frac x2\Big(1 + \tanh u\Big), \quad
        u = \sqrt{2/\pi}\,\big(x + 0.044715\,x^3\big) \qquad (\texttt{approximate="tanh"}, \text{GPT-2, BERT})

    Parameters
    ----------
    x : array, any shape, float32 or float64
    approximate : {"none", "tanh"}
        As ``torch.nn.functional.gelu``'s argument of that name.

    Returns
    -------
    out : array, the shape of ``x``
    cache : tuple
    """
    func = "gelu_forward"
    xp = array_namespace(x, names=["x"])
    check_float(func, xp, x=x)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"{func}: approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    if approximate == "tanh":
        t = xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))
        return 0.5 * x * (1.0 + t), (x, approximate, t)
    cdf = 0.5 * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))  # Phi(x), the normal CDF
    return x * cdf, (x, approximate, cdf)


def gelu_backward(dout, cache):
    r"""Gradient of :func:`gelu_forward`.

    .. math::
        \frac{d}{dx}\, x\Phi(x) = \Phi(x) + x\,\varphi(x), \qquad \varphi(x) = \frac{e^{-x^2/2}}{\sqrt{2\pi}}

    and for the tanh form :math:`\frac12(1 + t) + \frac x2 (1 - t^2)\sqrt{2/\pi}\,(1 + 3 \cdot 0.044715\, x^2)`
    with :math:`t = \tanh u`.

    Returns
    -------
    dx : array, the shape of ``x``
    """
    x, approximate, aux = cache
    check_grad("gelu_backward", dout, x.shape, like=x)
    xp = array_namespace(dout, x, names=["dout", "x"])
    if approximate == "tanh":
        t = aux
        sech2 = 1.0 - t * t  # 1 - tanh^2 u: exactly 0 once |u| > ~9 (float32) or ~19 (float64)
        # there the second term is 0 (sech^2 u falls faster than x du grows); with x itself, x du overflowed
        # to inf beyond |x| ~ 1e19 (float32) and 0 * inf made dx NaN, as PyTorch's is
        x = xp.where(sech2 == 0, xp.zeros_like(x), x)
        du = math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * x * x)
        return dout * (0.5 * (1.0 + t) + 0.5 * x * sech2 * du)
    pdf = xp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return dout * (aux + x * pdf)
