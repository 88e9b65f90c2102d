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
"""

from __future__ import annotations

import itertools
import math

from ..backend import array_namespace, device, native_namespace, supports_out

__all__ = [
    "conv1x1_forward", "conv1x1_backward",
    "batchnorm_forward", "batchnorm_backward",
    "relu_forward", "relu_backward",
    "maxpool_forward", "maxpool_backward", "pool_kernel",
    "softmax_forward", "softmax_backward",
    "dot_pairwise_forward", "dot_pairwise_backward",
    "concat_pairwise_forward", "concat_pairwise_backward",
]


def _flat(x):
    """(B, C, *S) -> (B, C, N), a view for contiguous arrays."""
    return _xp(x).reshape(x, (x.shape[0], x.shape[1], math.prod(x.shape[2:])))


def _xp(*arrays):
    return array_namespace(*arrays)


def _per_channel(v, ndim):
    """(C,) -> (1, C, 1, ..., 1): broadcasts against a (B, C, *S) array of ``ndim`` axes."""
    return _xp(v).reshape(v, (1, v.shape[0]) + (1,) * (ndim - 2))


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
    x3 = _flat(x)
    if training:
        m = x3.shape[0] * x3.shape[2]
        if m < 2:
            raise ValueError("batchnorm_forward: training needs more than one value per channel, "
                             f"got x of shape {tuple(x.shape)}")
        mean = xp.mean(x3, axis=(0, 2))
        centred = x3 - mean[:, None]
        var = xp.sum(centred * centred, axis=(0, 2)) / m
        state["running_mean"] = (1 - momentum) * state["running_mean"] + momentum * mean
        state["running_var"] = (1 - momentum) * state["running_var"] + momentum * (var * (m / (m - 1)))
    else:
        mean, var = state["running_mean"], state["running_var"]
        centred = x3 - mean[:, None]
    inv_std = 1.0 / xp.sqrt(var + eps)
    out = centred * (gamma * inv_std)[:, None]
    out += beta[:, None]
    return xp.reshape(out, x.shape), (centred, gamma, inv_std, training)


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
    centred, gamma, inv_std, training = cache
    xp = _xp(dout, centred)
    d3 = _flat(dout)
    m = d3.shape[0] * d3.shape[2]
    dbeta = xp.sum(d3, axis=(0, 2))
    dgamma = xp.sum(d3 * centred, axis=(0, 2)) * inv_std
    k1 = gamma * inv_std
    dx = d3 * k1[:, None]
    if training:
        dx += centred * (-k1 * inv_std * dgamma / m)[:, None]
        dx += (-k1 * dbeta / m)[:, None]
    return xp.reshape(dx, dout.shape), dgamma, dbeta


# --------------------------------------------------------------------------- ReLU
def relu_forward(x):
    r"""Rectified linear unit, :math:`\max(x, 0)`, elementwise. Any shape."""
    xp = _xp(x)
    return xp.where(x > 0, x, xp.zeros((), dtype=x.dtype, device=device(x))), x


def relu_backward(dout, cache):
    r"""dx = dout where x > 0, else 0 (the derivative at the kink x = 0 is taken as 0)."""
    x = cache
    xp = _xp(dout, x)
    return xp.where(x > 0, dout, xp.zeros((), dtype=dout.dtype, device=device(dout)))


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
    it has been served.

    Returns
    -------
    dx : array, the input's shape; zero everywhere except at the maxima (and zero
        on trailing samples that fell outside every window).
    """
    x, out, kernel = cache
    xp = _xp(dout, x)
    dx = xp.zeros(x.shape, dtype=dout.dtype, device=device(x))
    zero = xp.zeros((), dtype=dout.dtype, device=device(x))
    served = None
    for index in _window_samples(x.shape, kernel):
        hit = x[index] == out
        if served is None:
            served = hit
        else:
            hit = hit & ~served
            served = served | hit
        dx[index] = xp.where(hit, dout, zero)
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
