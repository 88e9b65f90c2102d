"""Layers as forward/backward pairs, written by hand (no autograd).

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

Shapes are always channels-first, but on NumPy and CuPy :func:`conv3d_forward`
*stores* its output channels-last (a transposed view of a (B, T, H, W, C) array,
as PyTorch's ``channels_last_3d`` memory format does), because that is the order
its next call reads fastest. Batch norm, ReLU and the pooling layers accept either
storage order and give the same values; batch norm keeps the order it is given.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import operator
import threading

import numpy as np

from ..backend import array_namespace, asarray, device, dtype_name, is_numpy, native_namespace, supports_out

__all__ = [
    "conv1x1_forward", "conv1x1_backward",
    "batchnorm_forward", "batchnorm_backward",
    "relu_forward", "relu_backward",
    "maxpool_forward", "maxpool_backward", "pool_kernel",
    "softmax_forward", "softmax_backward",
    "dot_pairwise_forward", "dot_pairwise_backward",
    "concat_pairwise_forward", "concat_pairwise_backward",
    "conv3d_forward", "conv3d_backward",
    "avgpool3d_forward", "avgpool3d_backward",
    "maxpool3d_forward", "maxpool3d_backward",
    "global_avgpool_forward", "global_avgpool_backward",
    "dropout_forward", "dropout_backward",
    "linear_forward", "linear_backward",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward",
]


def _flat(x):
    """(B, C, *S) -> (B, C, N), a view for contiguous arrays."""
    return _xp(x).reshape(x, (x.shape[0], x.shape[1], math.prod(x.shape[2:])))


def _xp(*arrays):
    return array_namespace(*arrays)


def _exp_inplace(xp, a):
    """exp(a), overwriting ``a`` where the library allows it (``a`` must be a fresh temporary)."""
    if supports_out(xp):
        return native_namespace(xp).exp(a, out=a)
    return xp.exp(a)


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
    xp = _xp(x, w)
    out = xp.matmul(w, _flat(x))  # (C_out, C_in) @ (B, C_in, N) -> (B, C_out, N)
    if b is not None:
        out = out + xp.reshape(b, (1, b.shape[0], 1))
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
    xp = _xp(dout, w)
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

    Computed as ``out = (x - mu) * k + beta`` with the per-channel factor
    ``k = gamma / sqrt(sigma^2 + eps)``: two passes over ``x`` after the statistics.
    An ``x`` stored channels-last (as :func:`conv3d_forward` returns it) is worked
    on as its (M, C) matrix (a few positions to a row, see :func:`_row_fold`), its
    sums taken as products with a vector of ones, and ``out`` is stored
    channels-last too; otherwise as (B, C, N).

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
    xp = _xp(x, gamma, beta)
    layout = _row_fold(x)
    x2 = _channel_matrix(x, layout)
    if training:
        m = _count(x2, layout)
        if m < 2:
            raise ValueError("batchnorm_forward: training needs more than one value per channel, "
                             f"got x of shape {tuple(x.shape)}")
        mean = _sums(x2, layout) / m
        centred = x2 - _along(mean, layout)
        scratch = centred * centred
        var = _sums(scratch, layout) / m
        state["running_mean"] = (1 - momentum) * state["running_mean"] + momentum * mean
        state["running_var"] = (1 - momentum) * state["running_var"] + momentum * (var * (m / (m - 1)))
    else:
        mean, var = state["running_mean"], state["running_var"]
        centred = x2 - _along(mean, layout)
        scratch = None
    inv_std = 1.0 / xp.sqrt(var + eps)
    out = _times(centred, _along(gamma * inv_std, layout), scratch)  # the squares are not needed any more
    out += _along(beta, layout)
    return _unflatten(out, x.shape, layout), (centred, gamma, inv_std, training, layout)


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
    centred, gamma, inv_std, training, layout = cache
    _xp(dout, centred)  # one library for both
    d2 = _channel_matrix(dout, layout)
    m = _count(d2, layout)
    dbeta = _sums(d2, layout)
    scratch = d2 * centred
    dgamma = _sums(scratch, layout) * inv_std
    k1 = gamma * inv_std
    dx = d2 * _along(k1, layout)
    if training:
        dx += _times(centred, _along(-k1 * inv_std * dgamma / m, layout), scratch)
        dx += _along(-k1 * dbeta / m, layout)
    return _unflatten(dx, dout.shape, layout), dgamma, dbeta


def _times(a, b, scratch):
    """a * b, written into ``scratch`` (a fresh temporary of the result's shape) where the library allows."""
    xp = _xp(a)
    if scratch is not None and supports_out(xp):
        return native_namespace(xp).multiply(a, b, out=scratch)
    return a * b


def _stored_channels_last(x):
    """True when ``x`` (B, C, *S) is stored channels-last (a NumPy/CuPy view of a (B, *S, C) array)."""
    xp = _xp(x)
    if not supports_out(xp) or x.ndim < 3 or x.flags.c_contiguous:
        return False
    return xp.permute_dims(x, (0,) + tuple(range(2, x.ndim)) + (1,)).flags.c_contiguous


def _row_fold(x):
    """How :func:`_channel_matrix` lays ``x`` out: 0 for (B, C, N); for an ``x`` stored
    channels-last, ``r`` >= 1 positions per row of an (M / r, r C) matrix.

    Folding ``r`` positions into a row makes every broadcast of a per-channel value a
    long inner loop (``r C``, up to 1024 values, instead of ``C``): on NumPy that halves
    the time of the batch norm's elementwise passes for 16 channels.
    """
    if not _stored_channels_last(x):
        return 0
    c = x.shape[1]
    positions = math.prod(x.shape) // c if c else 0
    return next(r for r in range(max(1, 1024 // max(c, 1)), 0, -1) if positions % r == 0)


def _channel_matrix(x, layout):
    """x (B, C, *S) as an (M / r, r C) matrix for ``layout = r`` >= 1, else as (B, C, N) (see
    :func:`_row_fold`); views where the storage allows."""
    xp = _xp(x)
    if layout:
        return xp.reshape(_channels_last(x), (-1, layout * x.shape[1]))
    return _flat(x)


def _count(a, layout):
    """Values per channel in :func:`_channel_matrix`'s matrix."""
    return a.shape[0] * layout if layout else a.shape[0] * a.shape[2]


def _along(v, layout):
    """Per-channel (C,) values broadcast against :func:`_channel_matrix`'s matrix."""
    if not layout:
        return v[:, None]
    if supports_out(_xp(v)):  # NumPy/CuPy: the same values as ``tile``, without its Python overhead
        return v[None].repeat(layout, axis=0).reshape(-1)
    return _xp(v).tile(v, (layout,))


def _sums(a, layout):
    """Per-channel sums of :func:`_channel_matrix`'s matrix."""
    xp = _xp(a)
    if layout:
        sums = _channel_sums(a)
        if type(sums) is np.ndarray:  # NumPy without the wrappers: the same sum
            return sums.reshape(layout, -1).sum(axis=0)
        return xp.sum(xp.reshape(sums, (layout, -1)), axis=0)
    return xp.sum(a, axis=(0, 2))


def _unflatten(a, shape, layout):
    """Inverse of :func:`_channel_matrix`: back to (B, C, *S), stored as the input was."""
    xp = _xp(a)
    if layout:
        return _channels_first(xp, xp.reshape(a, (shape[0],) + tuple(shape[2:]) + (shape[1],)))
    return xp.reshape(a, shape)


# --------------------------------------------------------------------------- ReLU
def relu_forward(x):
    r"""Rectified linear unit, :math:`\max(x, 0)`, elementwise. Any shape; NaN stays NaN, as in PyTorch."""
    xp = _xp(x)
    return xp.maximum(x, xp.zeros((), dtype=x.dtype, device=device(x))), x


def relu_backward(dout, cache):
    r"""dx = dout * [x > 0] (the derivative at the kink x = 0 is taken as 0).

    A product with the 0/1 mask rather than ``where``: on NumPy that is a
    branch-free pass, about 15 times faster on values of random sign. (So an
    infinite ``dout`` where ``x <= 0`` gives NaN, not 0.)
    """
    x = cache
    xp = _xp(dout, x)
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
    xp = _xp(x)
    kernel = tuple(int(k) for k in kernel)
    if len(kernel) != x.ndim - 2 or min(kernel) < 1:
        raise ValueError(f"kernel must hold one positive size per spatial axis of x (shape {tuple(x.shape)}), "
                         f"got {kernel}")
    if any(n < k for n, k in zip(x.shape[2:], kernel)):
        raise ValueError(f"maxpool_forward: spatial shape {tuple(x.shape[2:])} is smaller than the kernel {kernel}")
    out = None
    for index in _window_samples(x.shape, kernel):
        out = xp.asarray(x[index], copy=True) if out is None else xp.maximum(out, x[index])
    return out, (x, out, kernel)


def maxpool_backward(dout, cache):
    """Route each output gradient to the input sample that was its window's maximum.

    Ties go to the first maximal sample in row-major order, as in PyTorch: the
    window positions are visited in that order and a window stops accepting once
    it has been served. (As in :func:`relu_backward`, the routing is a product with
    a 0/1 mask, so an infinite ``dout`` leaves NaN at the window's other samples.)

    Returns
    -------
    dx : array, the input's shape; zero everywhere except at the maxima (and zero
        on trailing samples that fell outside every window).
    """
    x, out, kernel = cache
    xp = _xp(dout, x)
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
    xp = _xp(s)
    p = s - xp.max(s, axis=axis, keepdims=True)
    p = _exp_inplace(xp, p)
    p /= xp.sum(p, axis=axis, keepdims=True)
    return p, (p, axis)


def softmax_backward(dp, cache):
    r"""Gradient of :func:`softmax_forward` (the softmax Jacobian applied to ``dp``).

    .. math:: ds_{ij} = p_{ij}\Big(dp_{ij} - \sum_k dp_{ik}\, p_{ik}\Big)
    """
    p, axis = cache
    xp = _xp(dp, p)
    ds = dp * p
    ds -= p * xp.sum(ds, axis=axis, keepdims=True)
    return ds


# --------------------------------------------------------------------------- pairwise functions
def dot_pairwise_forward(theta, phi, scale=1.0, *, out=None):
    r"""Scaled dot products of every query with every key.

    .. math:: s_{ij} = \mathrm{scale}\cdot \theta_i^\top \phi_j

    The logits of the (embedded) Gaussian and the raw values of the dot-product
    pairwise function.

    Parameters
    ----------
    theta : array, shape (B, d, N)   queries
    phi : array, shape (B, d, M)     keys
    scale : float
    out : array, shape (B, N, M), optional
        NumPy or CuPy only: write the result here instead of a fresh array.

    Returns
    -------
    s : array, shape (B, N, M)
    cache : tuple
    """
    xp = _xp(theta, phi)
    if out is None:
        s = xp.matmul(xp.matrix_transpose(theta), phi)
    else:
        s = native_namespace(xp).matmul(xp.matrix_transpose(theta), phi, out=out)
    if scale != 1.0:
        s *= scale
    return s, (theta, phi, scale)


def dot_pairwise_backward(ds, cache):
    r"""Gradients of :func:`dot_pairwise_forward`.

    .. math:: d\theta = \mathrm{scale}\cdot\phi\, ds^\top, \qquad d\phi = \mathrm{scale}\cdot\theta\, ds

    Returns ``dtheta`` (B, d, N) and ``dphi`` (B, d, M).
    """
    theta, phi, scale = cache
    xp = _xp(ds, theta)
    dtheta = xp.matmul(phi, xp.matrix_transpose(ds))
    dphi = xp.matmul(theta, ds)
    if scale != 1.0:  # on the small results, not on the (B, N, M) ds
        dtheta *= scale
        dphi *= scale
    return dtheta, dphi


def concat_pairwise_forward(theta, phi, w_f, *, out=None):
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
    out : array, shape (B, N, M), optional
        NumPy or CuPy only: write the result here instead of a fresh array.

    Returns
    -------
    f : array, shape (B, N, M)
    cache : tuple
        Keeps ``f`` itself: the ReLU is active exactly where ``f > 0``, so the
        backward pass needs no separate pre-activation. (Scaling ``f`` in place
        by a positive number, as the non-local operation's ``1/M`` does, keeps
        that true.)
    """
    xp = _xp(theta, phi, w_f)
    d = theta.shape[1]
    if w_f.shape != (2 * d,):
        raise ValueError(f"w_f must have shape ({2 * d},) for {d} channels, got {tuple(w_f.shape)}")
    a = xp.matmul(w_f[:d], theta)  # (B, N)
    b = xp.matmul(w_f[d:], phi)  # (B, M)
    if out is None:
        f, _ = relu_forward(a[:, :, None] + b[:, None, :])
    else:
        nat = native_namespace(xp)
        f = nat.add(a[:, :, None], b[:, None, :], out=out)
        nat.maximum(f, 0, out=f)
    return f, (theta, phi, w_f, f)


def concat_pairwise_backward(df, cache, *, overwrite_df=False):
    r"""Gradients of :func:`concat_pairwise_forward`.

    With :math:`dp = df \odot [f > 0]` (the ReLU's routing):
    :math:`da_i = \sum_j dp_{ij}`, :math:`db_j = \sum_i dp_{ij}`,
    :math:`d\theta = w_\theta\, da^\top`, :math:`d\phi = w_\phi\, db^\top`,
    :math:`dw_\theta = \sum_{b,i} \theta_i\, da_i`, :math:`dw_\phi = \sum_{b,j} \phi_j\, db_j`.

    ``overwrite_df=True`` (NumPy/CuPy) lets the function mask ``df`` in place
    instead of allocating another (B, N, M) array.

    Returns ``dtheta`` (B, d, N), ``dphi`` (B, d, M), ``dw_f`` (2d,).
    """
    theta, phi, w_f, f = cache
    xp = _xp(df, theta)
    d = theta.shape[1]
    if overwrite_df and supports_out(xp):
        dpre = df
        dpre[f <= 0] = 0
    else:
        dpre = relu_backward(df, f)
    da = xp.sum(dpre, axis=2)  # (B, N)
    db = xp.sum(dpre, axis=1)  # (B, M)
    dtheta = w_f[:d][None, :, None] * da[:, None, :]
    dphi = w_f[d:][None, :, None] * db[:, None, :]
    dw_f = xp.concat([xp.sum(xp.matmul(theta, da[:, :, None])[:, :, 0], axis=0),
                      xp.sum(xp.matmul(phi, db[:, :, None])[:, :, 0], axis=0)])
    return dtheta, dphi, dw_f


# =========================================================================== network layers
# The layers below build whole video networks: 3-D convolution, average and max
# pooling with any stride and padding, global average pooling, dropout, the
# fully connected layer and the softmax cross-entropy loss. They take 5-D
# activations (B, C, T, H, W) and PyTorch's weight layouts, so that a trained
# PyTorch model's ``state_dict`` maps onto them one to one.


def _dtype_name(a):
    return dtype_name(a.dtype)


def _check_float(func, xp, **arrays):
    """Every array in ``arrays`` real floating and all of one dtype (TypeError otherwise)."""
    dtypes = {}
    for name, a in arrays.items():
        if a is None:
            continue
        if _dtype_name(a) not in ("float32", "float64") and not xp.isdtype(a.dtype, "real floating"):
            raise TypeError(f"{func}: {name} must be a float32 or float64 array, got dtype {_dtype_name(a)}")
        dtypes[name] = _dtype_name(a)
    if len(set(dtypes.values())) > 1:
        described = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"{func}: arrays must share one dtype ({described}); convert them first")


def _triple(value, name, func, *, minimum):
    """An int or a 3-sequence of ints, each >= ``minimum`` -> a tuple of 3 Python ints."""
    items = (value,) * 3 if not isinstance(value, (tuple, list)) else tuple(value)
    ok = len(items) == 3 and all(
        not isinstance(v, bool) and hasattr(v, "__index__") and operator.index(v) >= minimum for v in items)
    if not ok:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{func}: {name} must be a {kind} int or a 3-tuple of {kind} ints, got {value!r}")
    return tuple(operator.index(v) for v in items)


def _check_5d(func, x, name="x"):
    if x.ndim != 5:
        raise ValueError(f"{func}: {name} must have shape (B, C, T, H, W) (5 axes), got shape {tuple(x.shape)}")


def _out_size(func, spatial, kernel, stride, padding):
    """PyTorch's output size, ``floor((n + 2p - k) / s) + 1`` per axis; ValueError if it is < 1."""
    size = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(spatial, kernel, stride, padding))
    if min(size) < 1:
        padded = tuple(n + 2 * p for n, p in zip(spatial, padding))
        raise ValueError(f"{func}: the padded input's spatial shape {padded} is smaller than the kernel {kernel}")
    return size


def _window_offsets(kernel):
    """The ``prod(kernel)`` offsets inside a window, in row-major order."""
    return list(itertools.product(*(range(k) for k in kernel)))


def _strided(offset, out_size, stride, *, channels_last=False):
    """Index selecting, for one offset inside the window, that sample of every window:
    ``xpad[_strided(...)]`` has shape (B, C, *out_size), or (B, *out_size, C) ``channels_last``."""
    return _full_index(tuple(slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, out_size, stride)),
                       channels_last)


def _interior(spatial, padding, *, channels_last=False):
    """Index of the unpadded input inside the padded array."""
    return _full_index(tuple(slice(p, p + n) for n, p in zip(spatial, padding)), channels_last)


def _full_index(spatial_index, channels_last):
    """Slices of the spatial axes -> an index of the whole array: after (B, C), or between B and C."""
    if channels_last:
        return (slice(None),) + spatial_index + (slice(None),)
    return (slice(None), slice(None)) + spatial_index


def _pad(xp, x, padding, value=0.0):
    """x (B, C, T, H, W) padded by ``padding`` on both sides of each spatial axis with ``value``."""
    if not any(padding):
        return x
    shape = tuple(x.shape[:2]) + tuple(n + 2 * p for n, p in zip(x.shape[2:], padding))
    xpad = xp.full(shape, value, dtype=x.dtype, device=device(x))
    xpad[_interior(x.shape[2:], padding)] = x
    return xpad


# --------------------------------------------------------------------------- 3-D convolution
#: Bytes of column matrix built per chunk of the batch on NumPy: small enough to stay in
#: the CPU caches between the copy that builds it and the matrix product that reads it.
CONV_CHUNK_BYTES = 2 << 20
#: Column matrices up to this size are kept from the forward pass for the backward pass of a
#: strided convolution (which otherwise rebuilds them chunk by chunk): memory traded for one
#: copy of them.
CONV_KEEP_BYTES = 64 << 20
#: Stride-1 convolutions with at most this many input and output channels compute their
#: output columns in pairs (see :func:`conv3d_forward`). On the 2-core test machine, 3 x 3
#: kernels, forward + backward: 1.07 to 1.16 times faster with 16 channels (4 x 4 to 32 x 32
#: maps), 0.97 to 1.02 with 32.
CONV_PAIR_CHANNELS = 16


def conv3d_forward(x, w, b=None, *, stride=1, padding=0):
    r"""3-D convolution (cross-correlation, as in every deep-learning library), zero padding.

    .. math::
        \mathrm{out}[b, o, t, h, w] = \mathrm{b}[o] + \sum_{c, i, j, k}
            w[o, c, i, j, k]\; x_\mathrm{pad}[b, c,\ s_t t + i,\ s_h h + j,\ s_w w + k]

    Computed *channels-last* by *im2col*. The input is read as ``x_cl`` of shape
    (B, T, H, W, C); the ``K = kt * kh * kw`` samples under every window are copied
    into one row of a column matrix ``cols`` of shape (B T' H' W', K C) (row ``r``,
    column ``k C + c`` holds offset ``k`` of channel ``c`` of window ``r``), and the
    whole convolution becomes one matrix product

    .. math:: \mathrm{out}_{(B T' H' W',\ O)} = \mathrm{cols}\ w_{(K C,\ O)} .

    Channels-last is what makes this fast for the small, many-channel feature maps of
    a network: every copied run is ``kw * C`` contiguous values, and the product has
    ``B T' H' W'`` rows however small each map is. On NumPy and CuPy the columns are
    copied from a strided *window view* of the padded input (no Python loop over
    offsets), and on NumPy the batch is processed :data:`CONV_CHUNK_BYTES` of columns
    at a time, so the copy and the product that reads it stay in the cache.

    With stride 1 and few channels (at most :data:`CONV_PAIR_CHANNELS`, ``kw > 1``,
    even ``W`` and ``W'``) a row of columns serves two neighbouring outputs along W:
    it holds the ``kt x kh x (kw + 1)`` window they share, and the weight matrix becomes
    the (``kt kh (kw + 1) C``, ``2 O``) matrix whose column block ``q`` is ``w`` shifted
    by ``q`` taps along W (zeros elsewhere). That copies ``(kw + 1) / (2 kw)`` of the
    columns for ``(kw + 1) / kw`` of the multiply-adds, in a product twice as wide,
    which is what a narrow product (16 output columns) is short of; the
    (B T' H' W'/2, 2 O) result *is* the (B, T', H', W', O) output, without a copy.

    The output is returned as a (B, O, T', H', W') array *stored* channels-last (on
    NumPy and CuPy: a transposed view of a contiguous (B, T', H', W', O) array, like
    PyTorch's ``channels_last_3d`` memory format). Its values do not depend on this;
    the next convolution reads it without a copy, and elementwise layers keep it.
    An input stored the usual way costs one transposing copy.

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
        Keeps ``x`` (channels-last) and ``w``. With a stride other than 1 (or
        ``padding > kernel - 1``) also, up to :data:`CONV_KEEP_BYTES`, the column
        matrix (``K`` times the size of ``x``); larger ones are rebuilt chunk by
        chunk in the backward pass. With stride 1 the backward pass needs no
        columns of ``x`` (see :func:`conv3d_backward`).
    """
    func = "conv3d_forward"
    xp = array_namespace(*((x, w) if b is None else (x, w, b)), names=["x", "w", "b"][:2 + (b is not None)])
    _check_5d(func, x)
    _check_float(func, xp, x=x, w=w, b=b)
    if w.ndim != 5 or w.shape[1] != x.shape[1]:
        raise ValueError(f"{func}: w must have shape (O, C, kt, kh, kw) with C = x.shape[1] = {x.shape[1]}, "
                         f"got shape {tuple(w.shape)}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{func}: b must have shape ({w.shape[0]},) (one bias per output channel), "
                         f"got shape {tuple(b.shape)}")
    stride = _triple(stride, "stride", func, minimum=1)
    padding = _triple(padding, "padding", func, minimum=0)
    kernel = tuple(int(k) for k in w.shape[2:])
    if min(kernel) < 1:
        raise ValueError(f"{func}: w has an empty kernel {kernel}")
    out_size = _out_size(func, tuple(x.shape[2:]), kernel, stride, padding)
    x_cl = _channels_last(x)
    plan = _dense_plan(xp, tuple(x.shape[2:]), kernel, stride, padding)
    pairs = 1
    if plan is not None:
        out, kept = _conv_dense(xp, x_cl, w, plan)
    else:
        keep = not _flips(kernel, stride, padding)  # else the backward needs only the output gradient's columns
        pairs = _pairs(kernel, stride, padding, tuple(x.shape[2:]), out_size, w.shape[1], w.shape[0])
        out, kept = _conv_cl(xp, x_cl, _widen(xp, _weight_matrix(xp, w), kernel, pairs), _wide(kernel, pairs),
                             stride[:2] + (stride[2] * pairs,), padding, out_size[:2] + (out_size[2] // pairs,),
                             keep=keep)
        out = xp.reshape(out, (x.shape[0],) + out_size + (w.shape[0],))
    if b is not None:
        out = _add_bias(xp, out, b)
    return _channels_first(xp, out), (x_cl, kept, plan, w, b is not None, stride, padding, pairs)


def conv3d_backward(dout, cache, *, input_grad=True):
    r"""Gradients of :func:`conv3d_forward`.

    With ``d`` the output gradient as a channels-last (B T' H' W', O) matrix and
    ``cols`` the forward's column matrix (B T' H' W', K C):

    .. math::
        dw_{(K C,\ O)} = \mathrm{cols}^\top d, \qquad
        db = \textstyle\sum_r d[r, :], \qquad
        dx = \mathrm{col2im}\big(d\, w_{(K C,\ O)}^\top\big)

    *col2im* is the adjoint of the im2col copy: every offset inside the window adds
    its columns of ``d w^T`` back onto the strided slice of the zero-padded gradient
    it was copied from (samples shared by overlapping windows collect one term per
    window), and the padding is cut off. With stride 1 (and ``padding <= kernel - 1``)
    the same sum is the *full* correlation of ``dout`` with the flipped kernel,

    .. math:: dx = \mathrm{conv3d}\big(d\mathrm{out},\ \tilde w,\ \mathrm{padding} = k - 1 - p\big),
              \qquad \tilde w[c, o, i, j, k] = w[o, c, k_t - 1 - i, k_h - 1 - j, k_w - 1 - k],

    which is how it is computed then (the forward's fast copy instead of scattered adds):
    with ``D`` the column matrix of ``dout`` zero-padded by ``k - 1 - p`` (one row per
    *input* position, (B T H W, K O)), :math:`dx = D\, \tilde w_{(K O,\ C)}`. The same
    ``D`` gives the weight gradient, :math:`d\tilde w_{(K O,\ C)} = D^\top x_{(B T H W,\ C)}`
    (column block ``k`` of ``D`` is tap ``K - 1 - k`` of the forward's window, seen from
    the input side), so both products read each chunk of ``D`` while it is in the cache,
    and the forward pass keeps no columns of ``x``. Where the forward paired its output
    columns, ``D`` pairs the input columns the same way: ``x`` is read as a
    (B T H W/2, 2 C) matrix, and the paired weight gradient is folded back by summing
    each tap over its two copies.
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
    x_cl, kept, plan, w, has_bias, stride, padding, pairs = cache
    xp = array_namespace(dout, w, names=["dout", "w"])
    kernel = tuple(w.shape[2:])
    o, c = w.shape[0], w.shape[1]
    d_cl = _channels_last(dout)
    out_size = tuple(d_cl.shape[1:4])
    d2 = xp.reshape(d_cl, (math.prod(d_cl.shape[:4]), o))
    db = _channel_sums(d2) if has_bias else None
    spatial = tuple(x_cl.shape[1:4])
    if plan is not None:
        dx, dw = _conv_dense_backward(xp, x_cl, d_cl, kept, plan, input_grad=input_grad)
        return None if dx is None else _channels_first(xp, dx), _weight_from_matrix(xp, dw, kernel, c, o), db
    if _flips(kernel, stride, padding):
        dx, dw = _flipped_backward(xp, x_cl, d_cl, w, padding, pairs, input_grad=input_grad)
        return None if dx is None else _channels_first(xp, dx), dw, db
    if kept is not None:  # dw (K C, O)
        dw = xp.matmul(xp.matrix_transpose(kept), d2)
    else:
        dw = _weight_grad(xp, x_cl, d2, kernel, stride, padding, out_size)
    dw = _weight_from_matrix(xp, dw, kernel, c, o)
    if not input_grad:
        return None, dw, db
    dx = _col2im(xp, xp.matmul(d2, xp.matrix_transpose(_weight_matrix(xp, w))), spatial, kernel, stride,
                 padding, out_size)
    return _channels_first(xp, dx), dw, db


def _flips(kernel, stride, padding):
    """Stride 1 and ``padding <= kernel - 1``: the input gradient is a convolution of the output
    gradient with the flipped kernel (see :func:`conv3d_backward`)."""
    return stride == (1, 1, 1) and all(p <= k - 1 for p, k in zip(padding, kernel))


def _pairs(kernel, stride, padding, spatial, out_size, c, o):
    """2 where a stride-1 convolution computes its output columns in pairs (see :func:`conv3d_forward`), else 1."""
    few = max(c, o) <= CONV_PAIR_CHANNELS
    even = spatial[2] % 2 == 0 and out_size[2] % 2 == 0
    return 2 if few and even and kernel[2] > 1 and _flips(kernel, stride, padding) else 1


def _wide(kernel, pairs):
    """The window of ``pairs`` neighbouring outputs along W."""
    return tuple(kernel[:2]) + (kernel[2] + pairs - 1,)


@functools.lru_cache(maxsize=16)
def _shifts(kw, pairs):
    """0/1 matrix ((kw + pairs - 1) pairs, kw): row (m, q), column k is 1 where m = q + k."""
    shifts = np.zeros((kw + pairs - 1, pairs, kw))
    for q, k in itertools.product(range(pairs), range(kw)):
        shifts[q + k, q, k] = 1.0
    return shifts.reshape(-1, kw)


def _widen(xp, w2, kernel, pairs):
    """Weight matrix (kt kh kw C, O) -> (kt kh (kw + pairs - 1) C, pairs O) for paired output columns:
    column block q is the kernel shifted q taps along W, zeros elsewhere (a product with 0/1 shifts)."""
    if pairs == 1:
        return w2
    (kt, kh, kw), o = kernel, w2.shape[1]
    c, m = w2.shape[0] // math.prod(kernel), kw + pairs - 1
    taps = xp.reshape(w2, (kt * kh, kw, c * o))
    wide = xp.matmul(asarray(_shifts(kw, pairs), like=w2, dtype=w2.dtype), taps)  # (kt kh, m pairs, C O)
    wide = xp.permute_dims(xp.reshape(wide, (kt * kh, m, pairs, c, o)), (0, 1, 3, 2, 4))
    return xp.reshape(wide, (kt * kh * m * c, pairs * o))


@functools.lru_cache(maxsize=64)
def _flip_plan(o, c, kernel, pairs):
    """Index arrays for :func:`_flipped_backward`: ``gather`` (kt kh (kw + pairs - 1) O, pairs C),
    where its weight matrix (the flipped kernel, widened for ``pairs`` by :func:`_widen`) takes
    each entry from w's flat values (``w.size`` for a zero), and ``fold`` (pairs, w.size), where
    each entry of w's gradient finds its ``pairs`` terms in that matrix's flat gradient.

    Found by running the transforms on the numbers 1, 2, ... in w's place; a gather then gives
    their values in a few calls instead of a dozen, the same numbers to the bit.
    """
    size = o * c * math.prod(kernel)
    ids = np.arange(1.0, size + 1.0).reshape((o, c) + tuple(kernel))
    xp = _xp(ids)
    wide = _widen(xp, _weight_matrix(xp, xp.permute_dims(xp.flip(ids, axis=(2, 3, 4)), (1, 0, 2, 3, 4))),
                  kernel, pairs)
    gather = np.rint(wide).astype(np.int64) - 1
    gather[gather < 0] = size
    order = np.argsort(gather, axis=None, kind="stable")  # positions grouped by the entry of w they hold
    counts = np.bincount(gather.reshape(-1), minlength=size + 1)
    if not np.all(counts[:size] == pairs):
        raise AssertionError(f"_flip_plan: every tap should appear {pairs} times")
    return gather, order[:size * pairs].reshape(size, pairs).T


def _take(xp, flat, index):
    """A 1-D array's values at the host integer array ``index``, in its shape."""
    if type(flat) is np.ndarray:
        return flat[index]
    return xp.reshape(xp.take(flat, asarray(index.reshape(-1), like=flat)), index.shape)


def _take_flat(xp, a, index):
    """``a``'s flat values, with a zero after them, at the host integer array ``index`` (its shape)."""
    if type(a) is np.ndarray:
        flat = np.empty(a.size + 1, dtype=a.dtype)
        flat[:-1] = a.reshape(-1)
        flat[-1] = 0
    else:
        flat = xp.concat([xp.reshape(a, (-1,)), xp.zeros(1, dtype=a.dtype, device=device(a))])
    return _take(xp, flat, index)


def _flipped_backward(xp, x_cl, d_cl, w, padding, pairs, *, input_grad=True):
    """dx_cl = D w_flip and dw (from dw_flip = D^T x), D the column matrix of the output gradient
    zero-padded by ``kernel - 1 - padding`` (with ``pairs`` input columns per row); both products
    chunk by chunk of D. ``input_grad=False`` skips dx (None)."""
    o, c, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    full = tuple(k - 1 - p for k, p in zip(kernel, padding))
    gather, fold = _flip_plan(o, c, kernel, pairs)
    w_flip = _take_flat(xp, w, gather)  # the flipped kernel's (K O, C) matrix, widened for pairs
    x2 = xp.reshape(x_cl, (-1, pairs * c))
    spatial = tuple(x_cl.shape[1:4])
    columns = _Columns(xp, d_cl, _wide(kernel, pairs), (1, 1, pairs), full, spatial[:2] + (spatial[2] // pairs,))
    dx, dw_flip = None, None
    for rows, cols in columns:
        if input_grad and rows.stop - rows.start == x2.shape[0]:
            dx = xp.matmul(cols, w_flip)
        elif input_grad:
            if dx is None:
                dx = native_namespace(xp).empty(x2.shape, dtype=x2.dtype)
            native_namespace(xp).matmul(cols, w_flip, out=dx[rows])
        part = xp.matmul(xp.matrix_transpose(cols), x2[rows, ...])  # in chunk order
        dw_flip = part if dw_flip is None else dw_flip + part
    dw_flip = xp.reshape(dw_flip, (-1,))
    dw = None
    for terms in fold:  # each tap's copies, summed in the order of the matrix's rows
        part = _take(xp, dw_flip, terms)
        dw = part if dw is None else dw + part
    dx = None if dx is None else xp.reshape(dx, x_cl.shape)
    return dx, xp.reshape(dw, (o, c) + kernel)


def _channels_last(x):
    """x (B, C, *S) -> (B, *S, C) contiguous: a view when x is stored channels-last, a copy otherwise."""
    axes = (0,) + tuple(range(2, x.ndim)) + (1,)
    if type(x) is np.ndarray:  # the common case, without the wrappers' overhead
        return np.ascontiguousarray(x.transpose(axes))
    xp = _xp(x)
    view = xp.permute_dims(x, axes)
    return native_namespace(xp).ascontiguousarray(view) if supports_out(xp) else view


def _channels_first(xp, a):
    """(B, *S, C) -> the (B, C, *S) view of it."""
    perm = (0, a.ndim - 1) + tuple(range(1, a.ndim - 1))
    return a.transpose(perm) if type(a) is np.ndarray else xp.permute_dims(a, perm)


def _channel_sums(a):
    """Per-channel sums of a channels-last matrix ``a`` (M, C) -> (C,).

    On NumPy and CuPy a matrix-vector product with ones: summing down the rows of a
    C-wide matrix is a slow reduction there (for C = 16, about 15 times slower).
    """
    xp = _xp(a)
    if not supports_out(xp):
        return xp.sum(a, axis=0)
    if isinstance(a, np.ndarray):  # the same product, without the wrappers' overhead
        return np.matmul(np.ones(a.shape[0], dtype=a.dtype), a)
    return xp.matmul(xp.ones(a.shape[0], dtype=a.dtype, device=device(a)), a)


def _weight_matrix(xp, w):
    """w (O, C, kt, kh, kw) -> (kt kh kw C, O), rows in the order of the column matrix."""
    return xp.reshape(xp.permute_dims(w, (2, 3, 4, 1, 0)), (-1, w.shape[0]))


def _weight_from_matrix(xp, w2, kernel, c, o):
    """Inverse of :func:`_weight_matrix`: (kt kh kw C, O) -> (O, C, kt, kh, kw)."""
    return xp.permute_dims(xp.reshape(w2, tuple(kernel) + (c, o)), (4, 3, 0, 1, 2))


def _add_bias(xp, out, b):
    """out (..., O) + b, in place where the library allows (``out`` is a fresh product)."""
    if supports_out(xp):
        out += b
        return out
    return out + b


def _pointwise(kernel, stride, padding):
    """A 1x1x1 kernel with stride 1 and no padding: the input is its own column matrix."""
    return kernel == (1, 1, 1) and stride == (1, 1, 1) and padding == (0, 0, 0)


class _SpareBorders(threading.local):
    """Padded NumPy buffers handed back by :func:`_pad_cl`'s callers, by (shape, dtype, padding),
    at most :attr:`limit` of them (per thread), each of at most :attr:`max_bytes` (larger ones
    are left to the allocator). Their borders are still zero, so the next
    padding of that shape only copies the interior: writing the zero borders runs along
    thousands of short rows (one per position of H and T), which took about as long as
    copying the interior."""

    limit = 16
    max_bytes = 16 << 20

    def __init__(self):
        self.free = {}

    def take(self, key):
        return self.free.pop(key, None)

    def give_back(self, key, xpad):
        self.free.pop(key, None)
        if xpad.nbytes > self.max_bytes:
            return
        while self.free and len(self.free) >= self.limit:
            self.free.pop(next(iter(self.free)))  # the oldest
        if self.limit > 0:
            self.free[key] = xpad


_SPARE = _SpareBorders()


def _pad_cl(xp, x_cl, padding):
    """x_cl (B, T, H, W, C) with ``padding`` zeros on both sides of T, H and W.

    On NumPy the result may be a spare buffer; a caller done with it may hand it back
    with :func:`_give_back_padded` (and must not write its border).
    """
    if not any(padding):
        return x_cl
    shape = (x_cl.shape[0],) + tuple(n + 2 * p for n, p in zip(x_cl.shape[1:4], padding)) + (x_cl.shape[4],)
    interior = _interior(x_cl.shape[1:4], padding, channels_last=True)
    if not supports_out(xp):
        xpad = xp.zeros(shape, dtype=x_cl.dtype, device=device(x_cl))
        xpad[interior] = x_cl
        return xpad
    xpad = _SPARE.take((shape, x_cl.dtype, padding)) if type(x_cl) is np.ndarray else None
    if xpad is None:
        xpad = native_namespace(xp).empty(shape, dtype=x_cl.dtype)  # zeros written on the border only
        for axis, p in enumerate(padding, start=1):
            if p:
                edge = [slice(None)] * 5
                for part in (slice(0, p), slice(shape[axis] - p, shape[axis])):
                    edge[axis] = part
                    xpad[tuple(edge)] = 0
    xpad[interior] = x_cl
    return xpad


def _give_back_padded(xpad, padding):
    """Hand a buffer from :func:`_pad_cl` back for reuse (NumPy; anything else is left alone)."""
    if any(padding) and type(xpad) is np.ndarray:
        _SPARE.give_back((tuple(xpad.shape), xpad.dtype, padding), xpad)


def _window_view(nat, xpad, kernel, stride, out_size):
    """The (B, T', H', W', kt, kh, kw, C) view of every window of ``xpad``, without a copy."""
    st = xpad.strides
    shape = (xpad.shape[0],) + tuple(out_size) + tuple(kernel) + (xpad.shape[4],)
    strides = (st[0],) + tuple(a * s for a, s in zip(st[1:4], stride)) + tuple(st[1:4]) + (st[4],)
    if nat is np and xpad.flags.c_contiguous:  # the same view, without as_strided's slow Python
        return np.ndarray(shape, xpad.dtype, buffer=xpad, strides=strides)
    return nat.lib.stride_tricks.as_strided(xpad, shape, strides)


def _chunk(xp, batch, per_sample):
    """Samples per chunk: the whole batch except on NumPy (see :data:`CONV_CHUNK_BYTES`)."""
    return max(1, min(batch, CONV_CHUNK_BYTES // per_sample)) if is_numpy(xp) else batch


class _Columns:
    """The column matrix of x_cl for one (kernel, stride, padding), chunk by chunk of the batch.

    ``for rows, cols in _Columns(...)`` yields the slice of output rows and their
    (rows, K C) columns; on NumPy/CuPy one buffer is refilled from a window view,
    elsewhere the columns are stacked from one slice per offset. With ``keep``
    (and a matrix of at most :data:`CONV_KEEP_BYTES`) the chunks are written into
    one whole matrix, left in :attr:`kept` once the iteration is over.
    """

    def __init__(self, xp, x_cl, kernel, stride, padding, out_size, *, keep=False):
        self.xp, self.kernel, self.stride, self.padding, self.out_size = xp, kernel, stride, padding, out_size
        self.batch, self.per = x_cl.shape[0], math.prod(out_size)
        self.width = math.prod(kernel) * x_cl.shape[4]
        self.pointwise = _pointwise(kernel, stride, padding)
        self.xpad = x_cl if self.pointwise else _pad_cl(xp, x_cl, padding)
        itemsize = 8 if _dtype_name(x_cl) == "float64" else 4
        self.step = _chunk(xp, self.batch, self.per * self.width * itemsize)
        self.keep = keep and self.batch * self.per * self.width * itemsize <= CONV_KEEP_BYTES
        self.kept = None

    def __iter__(self):
        xp, n_all = self.xp, self.batch * self.per
        if self.pointwise or not supports_out(xp):
            if self.pointwise:  # the input is its own column matrix
                cols = xp.reshape(self.xpad, (n_all, self.width))
            else:
                pieces = [self.xpad[_strided(offset, self.out_size, self.stride, channels_last=True)]
                          for offset in _window_offsets(self.kernel)]
                cols = xp.reshape(xp.stack(pieces, axis=4), (n_all, self.width))
            yield slice(0, n_all), cols
            self.kept = cols if self.keep else None
            return
        nat = native_namespace(xp)
        windows = _window_view(nat, self.xpad, self.kernel, self.stride, self.out_size)
        buffer = nat.empty((n_all if self.keep else self.step * self.per, self.width), dtype=self.xpad.dtype)
        for b0 in range(0, self.batch, self.step):
            part = windows[b0:b0 + self.step]
            rows = slice(b0 * self.per, b0 * self.per + part.shape[0] * self.per)
            cols = buffer[rows] if self.keep else buffer[:part.shape[0] * self.per]
            nat.copyto(cols.reshape(part.shape), part)
            yield rows, cols
        self.kept = buffer if self.keep else None
        _give_back_padded(self.xpad, self.padding)  # its columns are all copied
        self.xpad = None


def _conv_cl(xp, x_cl, w2, kernel, stride, padding, out_size, *, keep=False):
    """out (B, *out_size, O) = im2col(x_cl) @ w2, chunk by chunk, and the kept column matrix (or None)."""
    shape = (x_cl.shape[0],) + tuple(out_size) + (w2.shape[1],)
    columns = _Columns(xp, x_cl, kernel, stride, padding, out_size, keep=keep)
    if columns.step == columns.batch:
        (_, cols), = columns
        return xp.reshape(xp.matmul(cols, w2), shape), columns.kept
    nat = native_namespace(xp)
    out = nat.empty((columns.batch * columns.per, w2.shape[1]), dtype=x_cl.dtype)
    for rows, cols in columns:
        nat.matmul(cols, w2, out=out[rows])
    return out.reshape(shape), columns.kept


#: A frame-by-frame convolution (kernel 1 x kh x kw) on maps of at most this many times
#: ``kh * kw`` positions is done as one dense matrix product (see :func:`_dense_plan`):
#: 1, where that takes no more multiply-adds than im2col.
DENSE_MAX_RATIO = 1


@functools.lru_cache(maxsize=64)
def _connections(frame, kernel, stride, padding):
    """0/1 matrix (H W * H' W', kh kw): row (input position, output position), column the tap joining them."""
    (h, w), (kh, kw), (sh, sw), (ph, pw) = frame, kernel, stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    joined = np.zeros((h * w, ho * wo, kh * kw))
    for i, j, a, b in itertools.product(range(ho), range(wo), range(kh), range(kw)):
        hi, wi = i * sh + a - ph, j * sw + b - pw
        if 0 <= hi < h and 0 <= wi < w:
            joined[hi * w + wi, i * wo + j, a * kw + b] = 1.0
    return joined.reshape(h * w * ho * wo, kh * kw), (ho, wo)


def _dense_plan(xp, spatial, kernel, stride, padding):
    r"""The connection matrix and output frame size where the dense form pays, else None.

    A 1 x kh x kw convolution is the same linear map on every frame: with the frame
    of one sample flattened channels-last to a row of ``H W C`` values, the output
    frame is that row times a block-sparse matrix ``Wbig`` of shape (H W C, H' W' O),
    whose block (input position, output position) is the (C, O) slice of ``w`` at
    the tap that joins them (zero where none does). That is one product over all
    ``B T`` frames with no column copy at all, for ``H W / (kh kw)`` times the
    multiply-adds of im2col; it is chosen when that factor is at most
    :data:`DENSE_MAX_RATIO` (on the 2-core test machine, with 32 to 64 channels:
    3 x faster than im2col at 2 x 2, level at 4 x 4, 2 x slower at 8 x 8).
    ``Wbig`` is itself a small product, of the 0/1 connection matrix with ``w``.
    """
    if kernel[0] != 1 or stride[0] != 1 or padding[0] != 0:
        return None
    if spatial[1] * spatial[2] > DENSE_MAX_RATIO * kernel[1] * kernel[2]:
        return None
    return _connections(tuple(spatial[1:]), tuple(kernel[1:]), tuple(stride[1:]), tuple(padding[1:]))


def _conv_dense(xp, x_cl, w, plan):
    """out (B, T, H', W', O) = frames of x_cl @ Wbig; returns it and Wbig (H W C, H' W' O)."""
    joined, (ho, wo) = plan
    o, c, size_in = w.shape[0], w.shape[1], x_cl.shape[2] * x_cl.shape[3]
    taps = xp.reshape(xp.permute_dims(w[:, :, 0, ...], (2, 3, 1, 0)), (-1, c * o))  # (kh kw, C O)
    big = xp.matmul(asarray(joined, like=w, dtype=w.dtype), taps)  # (H W, H' W', C, O) flattened
    big = xp.permute_dims(xp.reshape(big, (size_in, ho * wo, c, o)), (0, 2, 1, 3))
    big = xp.reshape(big, (size_in * c, ho * wo * o))
    frames = xp.reshape(x_cl, (x_cl.shape[0] * x_cl.shape[1], -1))
    return xp.reshape(xp.matmul(frames, big), tuple(x_cl.shape[:2]) + (ho, wo, o)), big


def _conv_dense_backward(xp, x_cl, d_cl, big, plan, *, input_grad):
    """dx_cl = frames of d @ Wbig^T; dw (kh kw C, O) = connections^T @ dWbig, dWbig = frames^T d."""
    joined, _ = plan
    c, o, size_in = x_cl.shape[4], d_cl.shape[4], x_cl.shape[2] * x_cl.shape[3]
    d = xp.reshape(d_cl, (d_cl.shape[0] * d_cl.shape[1], -1))
    frames = xp.reshape(x_cl, (x_cl.shape[0] * x_cl.shape[1], -1))
    dx = xp.reshape(xp.matmul(d, xp.matrix_transpose(big)), x_cl.shape) if input_grad else None
    dbig = xp.reshape(xp.matmul(xp.matrix_transpose(frames), d), (size_in, c, -1, o))
    dbig = xp.reshape(xp.permute_dims(dbig, (0, 2, 1, 3)), (joined.shape[0], c * o))
    dw = xp.matmul(xp.matrix_transpose(asarray(joined, like=d, dtype=d.dtype)), dbig)  # each tap: the sum over its connections
    return dx, xp.reshape(dw, (-1, o))


def _weight_grad(xp, x_cl, d2, kernel, stride, padding, out_size):
    """dw (K C, O) = im2col(x_cl)^T @ d2, summed chunk by chunk (the forward kept only x_cl)."""
    dw = None
    for rows, cols in _Columns(xp, x_cl, kernel, stride, padding, out_size):
        part = xp.matmul(xp.matrix_transpose(cols), d2[rows, ...])
        dw = part if dw is None else dw + part
    return dw


def _col2im(xp, dcols, spatial, kernel, stride, padding, out_size):
    """Adjoint of the im2col copy: dcols (B T' H' W', K C) -> dx (B, T, H, W, C), overlaps summed."""
    bsz = dcols.shape[0] // math.prod(out_size)
    k = math.prod(kernel)
    c = dcols.shape[1] // k
    dcols = xp.reshape(dcols, (bsz,) + tuple(out_size) + (k, c))
    padded = tuple(n + 2 * p for n, p in zip(spatial, padding))
    dpad = xp.zeros((bsz,) + padded + (c,), dtype=dcols.dtype, device=device(dcols))
    for i, offset in enumerate(_window_offsets(kernel)):
        index = _strided(offset, out_size, stride, channels_last=True)
        if supports_out(xp):
            view = dpad[index]
            native_namespace(xp).add(view, dcols[..., i, :], out=view)
        else:
            dpad[index] = dpad[index] + dcols[..., i, :]
    if padded == tuple(spatial):
        return dpad
    return xp.asarray(dpad[_interior(spatial, padding, channels_last=True)], copy=True)


# --------------------------------------------------------------------------- 3-D average and max pooling
def _pool_params(func, x, kernel, stride, padding):
    """Validated (kernel, stride, padding, out_size) for a (B, C, T, H, W) pool, PyTorch's rules."""
    _check_5d(func, x)
    kernel = _triple(kernel, "kernel", func, minimum=1)
    stride = kernel if stride is None else _triple(stride, "stride", func, minimum=1)
    padding = _triple(padding, "padding", func, minimum=0)
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError(f"{func}: padding {padding} must be at most half the kernel {kernel} on every axis "
                         "(PyTorch's rule: every window must overlap the input)")
    return kernel, stride, padding, _out_size(func, tuple(x.shape[2:]), kernel, stride, padding)


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
    _check_float(func, xp, x=x)
    kernel, stride, padding, out_size = _pool_params(func, x, kernel, stride, padding)
    xpad = _pad(xp, x, padding)
    out = None
    for offset in _window_offsets(kernel):
        sample = xpad[_strided(offset, out_size, stride)]
        if out is None:
            out = xp.asarray(sample, copy=True)
        elif supports_out(xp):
            out += sample
        else:
            out = out + sample
    out = _scale(xp, out, 1.0 / math.prod(kernel))
    return out, (tuple(x.shape), kernel, stride, padding)


def avgpool3d_backward(dout, cache):
    r"""Gradient of :func:`avgpool3d_forward`: every input sample receives
    ``dout / prod(kernel)`` from each window that covers it (overlapping windows add up).

    Returns
    -------
    dx : array, shape (B, C, T, H, W)
    """
    x_shape, kernel, stride, padding = cache
    xp = array_namespace(dout, names=["dout"])
    share = dout * (1.0 / math.prod(kernel))
    if supports_out(xp):
        nat = native_namespace(xp)
        return _scatter_windows(xp, lambda k, view: nat.add(view, share, out=view), x_shape, kernel, stride,
                                padding, dout)
    return _scatter_windows(xp, lambda k: share, x_shape, kernel, stride, padding, dout)


def _scale(xp, a, factor):
    """a * factor, in place where the library allows (``a`` must be a fresh array)."""
    if supports_out(xp):
        a *= factor
        return a
    return a * factor


def _scatter_windows(xp, part, x_shape, kernel, stride, padding, dout):
    """The adjoint of reading one strided slice of the padded input per window offset.

    Offset ``k`` contributes ``part(k)`` (shape of ``dout``: (B, C, *out_size)) to its strided
    slice of a zero padded array; on NumPy/CuPy ``part(k, view)`` adds it into ``view`` itself.
    Returns the unpadded (B, C, T, H, W) part.
    """
    out_size = tuple(dout.shape[2:])
    padded = tuple(x_shape[:2]) + tuple(n + 2 * p for n, p in zip(x_shape[2:], padding))
    dxpad = xp.zeros(padded, dtype=dout.dtype, device=device(dout))
    for k, offset in enumerate(_window_offsets(kernel)):
        index = _strided(offset, out_size, stride)
        if supports_out(xp):
            part(k, dxpad[index])
        else:
            dxpad[index] = dxpad[index] + part(k)
    if not any(padding):
        return dxpad
    return xp.asarray(dxpad[_interior(x_shape[2:], padding)], copy=True)


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
    _check_float(func, xp, x=x)
    kernel, stride, padding, out_size = _pool_params(func, x, kernel, stride, padding)
    xpad = _pad(xp, x, padding, value=-math.inf)
    offsets = _window_offsets(kernel)
    arg_dtype = xp.int16 if len(offsets) <= 2**15 - 1 else xp.int32
    out = xp.asarray(xpad[_strided(offsets[0], out_size, stride)], copy=True)
    arg = xp.zeros(out.shape, dtype=arg_dtype, device=device(x))
    if supports_out(xp):
        # The same steps as branch-free arithmetic into preallocated buffers (masked copies
        # are ~40x slower): offsets come in increasing order, so "arg = k where better" is
        # arg = max(arg, k * better), and the new maximum is max(out, sample).
        nat = native_namespace(xp)
        has_nan = bool(nat.any(nat.isnan(x)))  # one pass over x instead of one per offset
        better = nat.empty(out.shape, dtype=bool)
        candidate = nat.empty(out.shape, dtype=arg.dtype)
        for k, offset in enumerate(offsets[1:], start=1):
            sample = xpad[_strided(offset, out_size, stride)]
            nat.greater(sample, out, out=better)
            if has_nan:
                better |= nat.isnan(sample)
            nat.multiply(better, k, out=candidate)
            nat.maximum(arg, candidate, out=arg)
            nat.maximum(out, sample, out=out)  # NaN propagates, as in PyTorch
    else:
        for k, offset in enumerate(offsets[1:], start=1):
            sample = xpad[_strided(offset, out_size, stride)]
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
    xp = array_namespace(dout, arg, names=["dout", "arg"])
    nat = native_namespace(xp) if supports_out(xp) else None
    if nat is not None and bool(nat.all(nat.isfinite(dout))):  # dout * (arg == k) into reused buffers
        won, part = nat.empty(arg.shape, dtype=bool), nat.empty(dout.shape, dtype=dout.dtype)

        def add_winners(k, view):
            nat.equal(arg, k, out=won)
            nat.multiply(dout, won, out=part)
            nat.add(view, part, out=view)

        return _scatter_windows(xp, add_winners, x_shape, kernel, stride, padding, dout)
    zero = xp.zeros((), dtype=dout.dtype, device=device(dout))
    if nat is not None:  # an inf or NaN in dout: where(), so that inf * 0 puts no NaN beside the winner

        def add_where(k, view):
            nat.add(view, nat.where(arg == k, dout, zero), out=view)

        return _scatter_windows(xp, add_where, x_shape, kernel, stride, padding, dout)
    return _scatter_windows(xp, lambda k: xp.where(arg == k, dout, zero), x_shape, kernel, stride, padding, dout)


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
    if x.ndim < 3:
        raise ValueError(f"global_avgpool_forward: x must have shape (B, C, *S) with at least one spatial axis, "
                         f"got shape {tuple(x.shape)}")
    _check_float("global_avgpool_forward", xp, x=x)
    x3 = xp.reshape(_channels_last(x), (x.shape[0], -1, x.shape[1]))
    return xp.mean(x3, axis=1), tuple(x.shape)


def global_avgpool_backward(dout, cache):
    r"""Gradient of :func:`global_avgpool_forward`: :math:`dx[b, c, n] = d\mathrm{out}[b, c] / N`.

    Returns
    -------
    dx : array, shape (B, C, \*S) (a fresh array stored channels-last, not a broadcast view)
    """
    x_shape = cache
    xp = array_namespace(dout, names=["dout"])
    n = math.prod(x_shape[2:])
    dx = xp.zeros((x_shape[0] * n, x_shape[1]), dtype=dout.dtype, device=device(dout))
    dx = xp.reshape(dx, (x_shape[0], n, x_shape[1])) + (dout / n)[:, None, :]
    return _unflatten(dx, x_shape, 1)


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
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"dropout_forward: p must be a probability in [0, 1), got {p!r}")
    _check_float("dropout_forward", xp, x=x)
    if not training or p == 0:
        return x, None
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"dropout_forward: seed must be an int when training with p > 0, got {seed!r}")
    keep = np.random.default_rng(operator.index(seed)).random(tuple(x.shape)) >= p
    mask = keep.astype(_dtype_name(x)) * np.asarray(1.0 / (1.0 - p), dtype=_dtype_name(x))
    mask = asarray(mask, like=x)
    return x * mask, mask


def dropout_backward(dout, cache):
    r"""Gradient of :func:`dropout_forward`: :math:`dx = d\mathrm{out} \odot m / (1 - p)`
    (``dout`` itself for the identity)."""
    mask = cache
    if mask is None:
        return dout
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
    xp = array_namespace(*((x, w) if b is None else (x, w, b)), names=["x", "w", "b"][:2 + (b is not None)])
    _check_float(func, xp, x=x, w=w, b=b)
    if x.ndim != 2:
        raise ValueError(f"{func}: x must have shape (B, F), got shape {tuple(x.shape)}")
    if w.ndim != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"{func}: w must have shape (O, F) with F = x.shape[1] = {x.shape[1]}, "
                         f"got shape {tuple(w.shape)}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{func}: b must have shape ({w.shape[0]},), got shape {tuple(b.shape)}")
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
    _check_float(func, xp, logits=logits)
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"{func}: logits must have shape (B, K) with B, K >= 1, got shape {tuple(logits.shape)}")
    bsz, k = logits.shape
    if tuple(labels.shape) != (bsz,):
        raise ValueError(f"{func}: labels must have shape ({bsz},) (one class index per row of logits), "
                         f"got shape {tuple(labels.shape)}")
    if not xp.isdtype(labels.dtype, "integral"):
        raise ValueError(f"{func}: labels must be integer class indices, got dtype {_dtype_name(labels)}")
    low, high = int(xp.min(labels)), int(xp.max(labels))
    if low < 0 or high >= k:
        bad = low if low < 0 else high
        raise ValueError(f"{func}: labels must lie in [0, {k}) for {k} classes, got {bad}")
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

    Returns
    -------
    dlogits : array, shape (B, K)
    """
    p, onehot = cache
    dlogits = (p - onehot) * (dloss / p.shape[0])
    if dlogits.dtype != p.dtype:  # a float64 dloss must not promote float32 logits
        dlogits = array_namespace(p).astype(dlogits, p.dtype)
    return dlogits
