r"""The non-local operation, Eq. (1) of Wang et al. (CVPR 2018), forward and backward.

.. math:: y_i = \frac{1}{\mathcal C(x)} \sum_j f(x_i, x_j)\, g(x_j)

Query ``i`` runs over the ``N`` positions of ``theta`` and key ``j`` over the
``M`` positions of ``phi`` and ``g`` (``M = N``, or fewer when the keys are
subsampled). The four pairwise functions of the paper, with their normalisers:

================== ================================== ===============================
mode               f(x_i, x_j)                        C(x)
================== ================================== ===============================
gaussian           exp(x_i^T x_j)  (raw input)        sum_j f  -> a softmax over j
embedded_gaussian  exp(theta_i^T phi_j)               sum_j f  -> a softmax over j
dot_product        theta_i^T phi_j                    M (the number of keys)
concatenation      ReLU(w_f^T [theta_i; phi_j])       M
================== ================================== ===============================

For ``gaussian`` the caller passes the input itself as ``theta`` and ``phi``.
The softmax modes accept ``scale`` (``1/sqrt(d)`` in the official Caffe2 code
and mmcv, 1 in the paper) multiplying the logits.

Arrays are flattened feature maps: ``theta`` (B, d, N), ``phi`` (B, d, M),
``g`` (B, d_g, M); the output ``y`` is (B, d_g, N); the attention matrix
``A = f / C`` is (B, N, M) and ``y = g A^T``.

Two implementations of the same function:

* the **full** form builds the (B, N, M) matrix of weights and keeps it for the
  backward pass: the textbook form, and the fastest while it fits in memory
  (it keeps ``f`` unnormalised and divides the small arrays by ``C``);
* the **chunked** form (``chunk_size=c``) walks over blocks of ``c`` keys with an
  online softmax (running maximum and running sum, rescaling the partial output
  when the maximum grows) and recomputes each block of ``A`` in the backward
  pass. It never holds more than ``B * N * c`` attention values, so its memory
  grows linearly in ``N`` for a fixed ``c``; outputs and gradients equal the
  full form's to rounding.

With a ``workspace`` (NumPy, as a block runs), the engine computes the full form of the
dot product and the concatenation without the matrix: their sums over keys can be taken
once, before the queries meet them (:mod:`nlref.nn.engine.nonlocal_op`, "factored
forms"); the same function, summed in another order.

:func:`nonlocal_reference` is the specification: a loop over queries that
reads like Eq. (1). The tests hold both forms to it. The softmax, dot-product
and ReLU pieces are the pairs of :mod:`nlref.nn.functional`; notebook 04
derives every step of the backward pass.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

from ..backend import array_namespace, device, dtype_name, is_numpy
from ._shapes import check_grad, check_scores_overflow
from .engine import NonLocalWorkspace
from .functional import (
    _exp_inplace,
    concat_pairwise_backward,
    concat_pairwise_forward,
    dot_pairwise_backward,
    dot_pairwise_forward,
    softmax_forward,
)

__all__ = ["MODES", "SOFTMAX_MODES", "nonlocal_forward", "nonlocal_backward", "attention_map",
           "nonlocal_reference", "check_mode", "cached_attention"]

MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
SOFTMAX_MODES = ("gaussian", "embedded_gaussian")


def check_mode(mode):
    """Raise a ValueError naming the allowed modes unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")


def _check(theta, phi, g, mode, scale, w_f, chunk_size):
    check_mode(mode)
    named = [(k, a) for k, a in (("theta", theta), ("phi", phi), ("g", g), ("w_f", w_f)) if a is not None]
    array_namespace(*(a for _, a in named), names=[k for k, _ in named])  # arrays of one library, named in errors
    for name, a in (("theta", theta), ("phi", phi), ("g", g)):
        if a is not None and a.ndim != 3:
            raise ValueError(f"{name} must have shape (B, channels, positions), got {tuple(a.shape)}")
    dtypes = {k: dtype_name(a.dtype) for k, a in named}
    for k, a in named:  # integers would fail deep inside (softmax's in-place exp, the 1/M division)
        if dtypes[k] not in ("float32", "float64") and not array_namespace(a).isdtype(a.dtype, "real floating"):
            raise TypeError(f"{k} must be a float32 or float64 array, got dtype {dtypes[k]}; convert it first")
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"theta, phi, g (and w_f) must share one dtype, got {dtypes}")
    if phi.shape[:2] != theta.shape[:2]:
        raise ValueError(f"phi {tuple(phi.shape)} must match theta {tuple(theta.shape)} in batch and channels")
    if g is not None and (g.shape[0] != phi.shape[0] or g.shape[2] != phi.shape[2]):
        raise ValueError(f"g {tuple(g.shape)} must match phi {tuple(phi.shape)} in batch and positions")
    if (mode == "concatenation") != (w_f is not None):
        raise ValueError("w_f (shape (2d,)) is required by mode='concatenation' and only by it")
    if scale != 1.0 and mode not in SOFTMAX_MODES:
        raise ValueError(f"scale applies to the softmax modes {SOFTMAX_MODES}; mode={mode!r} needs scale=1")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


class _Steps:
    """The steps on (B, N, M) arrays, as written: each makes a fresh array (or writes over its input).

    (A :class:`~nlref.nn.engine.NonLocalWorkspace` takes their place in a block: the same
    numbers, written into buffers it keeps between calls.)
    """

    @staticmethod
    def factored(mode, theta, phi, g, w_f):
        """False: the textbook builds the matrix in every mode (the engine's workspace may not)."""
        return False

    @staticmethod
    def scores(theta, phi, mode, scale, w_f):
        """f (or its logits, for the softmax modes) for all queries against the keys in ``phi``."""
        if mode == "concatenation":
            return concat_pairwise_forward(theta, phi, w_f)
        return dot_pairwise_forward(theta, phi, scale)

    @staticmethod
    def exp_rows(f):
        """e = exp(f - max_j f) (written over ``f`` where the library allows) and its row sums C_i, (B, N)."""
        xp = array_namespace(f)
        f -= xp.max(f, axis=2, keepdims=True)
        e = _exp_inplace(xp, f)
        return e, xp.sum(e, axis=2)

    @staticmethod
    def softmax_grad(de, e, c):
        """ds_ij = e_ij (de_ij - c_i), written over ``de``; c (B, N)."""
        de -= c[:, :, None]
        de *= e
        return de

    @staticmethod
    def product(a, b):
        """a @ b, the (B, N, M) gradient of the scores."""
        return array_namespace(a, b).matmul(a, b)

    @staticmethod
    def pairwise_backward(df, cache, mode):
        """(dtheta, dphi, dw_f); dw_f is None except for the concatenation."""
        if mode == "concatenation":
            return concat_pairwise_backward(df, cache)
        return dot_pairwise_backward(df, cache) + (None,)


def attention_map(theta, phi, *, mode, scale=1.0, w_f=None):
    """The normalised pairwise matrix ``A = f / C``, shape (B, N, M); rows sum to 1 for the softmax modes."""
    _check(theta, phi, None, mode, scale, w_f, None)
    f, _ = _Steps.scores(theta, phi, mode, scale, w_f)
    if mode in SOFTMAX_MODES:
        check_scores_overflow("attention_map", array_namespace(f), array_namespace(f).max(f, axis=2), theta=theta, phi=phi)
        return softmax_forward(f)[0]
    f /= phi.shape[2]
    return f


class FullCache(NamedTuple):
    """What the full form's backward pass needs (:func:`nonlocal_forward` without ``chunk_size``)."""

    mode: str
    f_cache: tuple  # the pairwise function's cache
    g: Any  # (B, d_g, M) values
    e: Any  # (B, N, M) unnormalised weights: A = e / C
    norm: Any  # C: (B, 1, N) row sums for the softmax modes, else the int M
    y: Any  # (B, d_g, N) output
    steps: Any  # where the (B, N, M) steps write: _Steps or a NonLocalWorkspace


class ChunkedCache(NamedTuple):
    """What the chunked form's backward pass needs: the inputs, to recompute each block of ``A``."""

    mode: str
    scale: float
    w_f: Any
    chunk_size: int
    theta: Any  # (B, d, N)
    phi: Any  # (B, d, M)
    g: Any  # (B, d_g, M)
    y: Any  # (B, d_g, N)
    rows: tuple | None  # (m_i, l_i), each (B, N), for the softmax modes: A_ij = exp(s_ij - m_i) / l_i
    steps: Any  # as FullCache.steps


def cached_attention(cache):
    """A new array holding the attention matrix of a full-form forward pass, or None for the chunked form."""
    if not isinstance(cache, FullCache):
        return None
    e, norm = cache.e, cache.norm
    return e / (norm if isinstance(norm, int) else array_namespace(e).matrix_transpose(norm))


def nonlocal_forward(theta, phi, g, *, mode, scale=1.0, w_f=None, chunk_size=None, workspace=None):
    r"""y = g A^T with A = f / C: the non-local operation for every query at once.

    Parameters
    ----------
    theta : array, shape (B, d, N)
        Queries (the input itself for ``mode="gaussian"``).
    phi : array, shape (B, d, M)
        Keys (the input, or the subsampled input, for ``mode="gaussian"``).
    g : array, shape (B, d_g, M)
        Values.
    mode : {"gaussian", "embedded_gaussian", "dot_product", "concatenation"}
    scale : float
        Multiplies the logits of the softmax modes; must be 1 for the others.
    w_f : array, shape (2d,), only for ``mode="concatenation"``
    chunk_size : int, optional
        Process keys in blocks of this many (the memory-efficient form).
    workspace : nlref.nn.engine.NonLocalWorkspace, optional
        NumPy only (ignored otherwise): the engine's buffers, reused across calls, for
        the (B, N, M) (or (B, N, chunk)) intermediates. The cache then points
        into the workspace, so it is valid until the next call that shares it.

    Returns
    -------
    y : array, shape (B, d_g, N)
    cache : FullCache or ChunkedCache, for :func:`nonlocal_backward`
    """
    _check(theta, phi, g, mode, scale, w_f, chunk_size)
    if workspace is not None and not isinstance(workspace, NonLocalWorkspace):
        raise TypeError(f"workspace must be an nlref.nn.engine.NonLocalWorkspace or None, got {type(workspace).__name__}")
    steps = workspace if workspace is not None and is_numpy(array_namespace(theta)) else _Steps
    if chunk_size is None and steps.factored(mode, theta, phi, g, w_f):  # the engine's route without the matrix
        return steps.forward_factored(theta, phi, g, mode, w_f)
    if chunk_size is None:
        return _forward_full(theta, phi, g, mode, scale, w_f, steps)
    return _forward_chunked(theta, phi, g, mode, scale, w_f, chunk_size, steps)


def nonlocal_backward(dy, cache):
    r"""Gradients of :func:`nonlocal_forward`.

    .. math::
        dg = dy\,A, \qquad dA = dy^\top g, \qquad
        df_{ij} = A_{ij}\,(dA_{ij} - dy_i^\top y_i) \ \text{(softmax)}, \qquad
        df = dA / M \ \text{(dot, concatenation)}

    then back through the pairwise function to ``theta``, ``phi`` (and ``w_f``).
    The softmax row sum :math:`\sum_j dA_{ij} A_{ij}` equals :math:`dy_i^\top y_i`
    (substitute :math:`dA_{ij} = dy_i^\top g_j` and :math:`y_i = \sum_j A_{ij} g_j`),
    which costs ``O(N d_g)`` instead of ``O(N M)`` and lets the chunked form
    compute it before visiting any block.

    Returns
    -------
    dtheta : array, shape (B, d, N)
    dphi : array, shape (B, d, M)
    dg : array, shape (B, d_g, M)
    dw_f : array, shape (2d,), or None unless ``mode="concatenation"``
    """
    # every form keeps g (B, d_g, M), and y (B, d_g, N) or theta (B, d, N): dy is checked against them
    positions = cache.y.shape[2] if hasattr(cache, "y") else cache.theta.shape[2]
    array_namespace(dy, cache.g, names=["dy", "g"])
    check_grad("nonlocal_backward", dy, (*cache.g.shape[:2], positions), name="dy", like=cache.g)
    if isinstance(cache, FullCache):
        return _backward_full(dy, cache)
    if isinstance(cache, ChunkedCache):
        return _backward_chunked(dy, cache)
    return cache.backward(dy)  # the engine's factored route


# --------------------------------------------------------------------------- full form
#
# Both forms keep the *unnormalised* weights e (B, N, M) -- e = exp(s - max_j s) for
# the softmax modes, e = f otherwise -- and apply C to the small arrays instead:
# A = e / C, so y = (g e^T) / C and, with dy' = dy / C, dg = dy' e and
# dA / C = dy'^T g. This spares two passes over the (B, N, M) matrix.

def _forward_full(theta, phi, g, mode, scale, w_f, steps):
    xp = array_namespace(theta, phi, g)
    f, f_cache = steps.scores(theta, phi, mode, scale, w_f)
    if mode in SOFTMAX_MODES:
        e, norm = steps.exp_rows(f)  # e = exp(f - max_j f), C_i = sum_j e_ij
        check_scores_overflow("nonlocal_forward", xp, norm, theta=theta, phi=phi)  # C_i NaN: an overflowed f
        norm = norm[:, None, :]  # C_i, shaped (B, 1, N) to scale y's columns
    else:
        e = f
        norm = phi.shape[2]
    y = xp.matmul(g, xp.matrix_transpose(e)) / norm  # (B, d_g, M) @ (B, M, N)
    return y, FullCache(mode, f_cache, g, e, norm, y, steps)


def _backward_full(dy, cache):
    mode, f_cache, g, e, norm, y, steps = cache
    xp = array_namespace(dy, g)
    dy_c = dy / norm  # dy_i / C_i
    dg = xp.matmul(dy_c, e)  # (B, d_g, N) @ (B, N, M) = dy A
    de = steps.product(xp.matrix_transpose(dy_c), g)  # dA / C
    if mode in SOFTMAX_MODES:  # ds = A (dA - dy_i . y_i) = e (dA / C - dy_i . y_i / C)
        de = steps.softmax_grad(de, e, xp.sum(dy_c * y, axis=1))
    dtheta, dphi, dw_f = steps.pairwise_backward(de, f_cache, mode)
    return dtheta, dphi, dg, dw_f


# --------------------------------------------------------------------------- chunked form
def _blocks(m, chunk_size):
    return [slice(j, min(j + chunk_size, m)) for j in range(0, m, chunk_size)]


def _keys(a, block):
    return a[:, :, block]


def _forward_chunked(theta, phi, g, mode, scale, w_f, chunk_size, steps):
    xp = array_namespace(theta, phi, g)
    b, _, n = theta.shape
    m = phi.shape[2]
    dev = device(theta)
    acc = xp.zeros((b, g.shape[1], n), dtype=theta.dtype, device=dev)
    if mode in SOFTMAX_MODES:
        run_max = xp.full((b, n), -math.inf, dtype=theta.dtype, device=dev)
        run_sum = xp.zeros((b, n), dtype=theta.dtype, device=dev)
    for block in _blocks(m, chunk_size):
        f, _ = steps.scores(theta, _keys(phi, block), mode, scale, w_f)  # (B, N, c)
        if mode in SOFTMAX_MODES:
            new_max = xp.maximum(run_max, xp.max(f, axis=2))
            f -= new_max[:, :, None]
            p = _exp_inplace(xp, f)
            rescale = xp.exp(run_max - new_max)  # how much the old terms shrink
            run_sum *= rescale
            run_sum += xp.sum(p, axis=2)
            acc *= rescale[:, None, :]
            acc += xp.matmul(_keys(g, block), xp.matrix_transpose(p))
            run_max = new_max
        else:
            acc += xp.matmul(_keys(g, block), xp.matrix_transpose(f))
    if mode in SOFTMAX_MODES:
        check_scores_overflow("nonlocal_forward", xp, run_sum, theta=theta, phi=phi)  # l_i NaN: an overflowed f
        y = acc / run_sum[:, None, :]
        rows = (run_max, run_sum)  # m_i and l_i: A_ij = exp(s_ij - m_i) / l_i
    else:
        y = acc / m
        rows = None
    return y, ChunkedCache(mode, scale, w_f, chunk_size, theta, phi, g, y, rows, steps)


def _with_row(a, row):
    """(B, k, n) with ``row`` (B, n) appended as channel k: (B, k + 1, n)."""
    xp = array_namespace(a, row)
    return xp.concat([a, row[:, None, :]], axis=1)


def _backward_chunked(dy, cache):
    mode, scale, w_f, chunk_size, theta, phi, g, y, rows, steps = cache
    b, _, n = theta.shape
    xp = array_namespace(dy, theta)
    m = phi.shape[2]
    softmax = mode in SOFTMAX_MODES
    if softmax:
        # Each block of A is recomputed as the forward made it, exp(s_ij - m_i) / l_i (why not
        # otherwise: docs/engine.md); 1 / l_i goes on the small dy, and dA_ij - dy_i . y_i rides
        # along in one product as an extra channel: [dy_i / l_i; -dy_i . y_i / l_i] . [g_j; 1].
        run_max, run_sum = rows
        dy_c = dy / run_sum[:, None, :]
        dy_aug = _with_row(dy_c, -xp.sum(dy_c * y, axis=1))
        ones = xp.ones((b, 1, min(chunk_size, m)), dtype=theta.dtype, device=device(theta))
    else:
        dy_c = dy_aug = dy / m  # A = f / M: fold the constant into the small array
    dtheta = xp.zeros(theta.shape, dtype=theta.dtype, device=device(theta))
    dw_f = None
    dphi_blocks, dg_blocks = [], []
    for block in _blocks(m, chunk_size):
        c = block.stop - block.start
        values = _keys(g, block)
        if softmax:
            values = xp.concat([values, ones[:, :, :c]], axis=1)
        f, f_cache = steps.scores(theta, _keys(phi, block), mode, scale, w_f)  # recomputed
        if softmax:
            f -= run_max[:, :, None]
            f = _exp_inplace(xp, f)  # l_i A_ij for this block
        dg_blocks.append(xp.matmul(dy_c, f))  # dy A
        da = steps.product(xp.matrix_transpose(dy_aug), values)  # dA (- dy_i . y_i), over l_i
        if softmax:
            da *= f  # A_ij (dA_ij - dy_i . y_i)
        dtheta_b, dphi_b, dw_f_b = steps.pairwise_backward(da, f_cache, mode)
        dtheta += dtheta_b
        dphi_blocks.append(dphi_b)
        if dw_f_b is not None:
            dw_f = dw_f_b if dw_f is None else dw_f + dw_f_b
    return dtheta, xp.concat(dphi_blocks, axis=2), xp.concat(dg_blocks, axis=2), dw_f


# --------------------------------------------------------------------------- specification
def nonlocal_reference(theta, phi, g, *, mode, scale=1.0, w_f=None):
    r"""Eq. (1) query by query: the slow, obviously correct definition.

    For each query position ``i``: evaluate ``f(x_i, x_j)`` against every key,
    divide by ``C(x)``, and average the values ``g(x_j)`` with those weights.
    """
    _check(theta, phi, g, mode, scale, w_f, None)
    xp = array_namespace(theta, phi, g)
    d, m = theta.shape[1], phi.shape[2]
    columns = []
    for i in range(theta.shape[2]):
        q = theta[:, :, i:i + 1]  # (B, d, 1)
        if mode == "concatenation":
            pre = xp.sum(w_f[:d][None, :, None] * q, axis=1) + xp.sum(w_f[d:][None, :, None] * phi, axis=1)
            f = xp.where(pre > 0, pre, xp.zeros_like(pre))  # (B, M)
        else:
            f = scale * xp.sum(q * phi, axis=1)  # (B, M)
        if mode in SOFTMAX_MODES:
            f = xp.exp(f - xp.max(f, axis=1, keepdims=True))  # exp(s_ij) up to a factor that C cancels
            c = xp.sum(f, axis=1, keepdims=True)
            check_scores_overflow("nonlocal_reference", xp, c, theta=theta, phi=phi)  # C NaN: an overflowed f
        else:
            c = m
        columns.append(xp.sum((f / c)[:, None, :] * g, axis=2))  # (B, d_g)
    return xp.stack(columns, axis=2)
