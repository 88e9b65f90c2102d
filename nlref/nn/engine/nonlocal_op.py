"""The non-local operation's (B, N, M) steps written into reused buffers (NumPy).

:mod:`nlref.nn.nonlocal_op` writes the operation as its equations, with three steps on
(B, N, M) arrays: the pairwise scores, the product that gives their gradient, and the
pairwise function's backward pass. It takes them from a *steps* object: its own (fresh
arrays every call), or a :class:`NonLocalWorkspace` from here, which a
:class:`~nlref.nn.NonLocalBlock` keeps between calls. The workspace computes the same numbers
into one buffer per intermediate, reused from call to call, because fresh arrays that size
map new pages, which the kernel zeroes (see ``docs/engine.md``, "The non-local operation's
scratch buffers"). A cache made with a workspace points into it, so it is valid until the
next call that shares the workspace.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .fused_numba import Sweep, concat_relu_sums, concat_scores, numba_applies, relu_sweep, softmax_rows, softmax_rows_grad


class NonLocalWorkspace:
    """Scratch buffers for the non-local operation's (B, N, M) (or (B, N, chunk)) steps, NumPy only.

    One buffer per step, grown as needed and handed out as views; ``len()`` counts them and
    :meth:`clear` drops them (the next call rebuilds them).
    """

    def __init__(self):
        self._buffers = {}

    def __len__(self):
        return len(self._buffers)

    def clear(self):
        """Drop every buffer."""
        self._buffers.clear()

    def __getstate__(self):
        """A copy (``copy.deepcopy``, ``pickle``) starts empty: the buffers are scratch, rebuilt by its first
        call, so a pickled block does not carry them (a (B, N, N') float32 buffer can be 150 MiB) and a copy
        never writes into the original's."""
        return {"_buffers": {}}

    @staticmethod
    def factored(mode, theta, phi, g, w_f):
        """Whether the full form of ``mode`` on these arrays takes :func:`forward_factored`.

        Only for :data:`FACTORED_MODES`, at least one key, and finite arrays: the matrix
        route's 0 * inf and 0 * NaN spread a non-finite value to every output, which the
        factored sums would not (and with no key it warns of 0 / 0, as the textbook does).
        """
        return mode in FACTORED_MODES and phi.shape[2] > 0 and _finite(theta, phi, g, w_f)

    @staticmethod
    def forward_factored(theta, phi, g, mode, w_f):
        """The full form's y and a cache whose ``backward(dy)`` gives the gradients; see :func:`forward_factored`."""
        return forward_factored(theta, phi, g, mode, w_f)

    def _array(self, name, shape, dtype):
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self._buffers[name] = np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)

    def scores(self, theta, phi, mode, scale, w_f):
        """The pairwise scores of ``nonlocal_op._Steps.scores``, into the "scores" buffer."""
        out = self._array("scores", (theta.shape[0], theta.shape[2], phi.shape[2]), theta.dtype)
        if mode == "concatenation":  # ReLU(a_i + b_j), as functional.concat_pairwise_forward
            d = theta.shape[1]
            a, b = np.matmul(w_f[:d], theta), np.matmul(w_f[d:], phi)
            if numba_applies(out):  # add and ReLU in one pass, rows in parallel
                f = concat_scores(a, b, out)
            else:
                f = np.add(a[:, :, None], b[:, None, :], out=out)
                np.maximum(f, 0, out=f)
            return f, (theta, phi, w_f, f)
        s = np.matmul(np.swapaxes(theta, 1, 2), phi, out=out)  # as functional.dot_pairwise_forward
        if scale != 1.0:
            s *= scale
        return s, (theta, phi, scale)

    def product(self, a, b):
        """a @ b (B, N, M), the scores' gradient, into the "dscores" buffer."""
        return np.matmul(a, b, out=self._array("dscores", (a.shape[0], a.shape[1], b.shape[2]), a.dtype))

    @staticmethod
    def exp_rows(f):
        """``nonlocal_op._Steps.exp_rows``: e = exp(f - max_j f) written over ``f``, and its row sums.

        With the Numba engine one pass per row (maximum, exp, sum while the row is in cache),
        rows in parallel, instead of four passes over (B, N, M)."""
        if numba_applies(f) and f.flags.c_contiguous:
            return f, softmax_rows(f)
        from ..nonlocal_op import _Steps

        return _Steps.exp_rows(f)

    @staticmethod
    def softmax_grad(de, e, c):
        """``nonlocal_op._Steps.softmax_grad``: e (de - c_i) written over ``de``; one pass with Numba."""
        if numba_applies(de, e, c) and de.flags.c_contiguous:
            return softmax_rows_grad(de, e, c)
        from ..nonlocal_op import _Steps

        return _Steps.softmax_grad(de, e, c)

    @staticmethod
    def pairwise_backward(df, cache, mode):
        """``nonlocal_op._Steps.pairwise_backward``; ``df`` (a buffer) is overwritten."""
        from ..functional import _concat_linear_backward, _concat_sums_backward, dot_pairwise_backward

        if mode == "concatenation":
            theta, phi, w_f, f = cache
            if numba_applies(df, f):  # the ReLU's routing and both sums in one pass, nothing written
                return _concat_sums_backward(*concat_relu_sums(df, f), theta, phi, w_f)
            # the ReLU's routing in place, as a product with the 0/1 mask like functional.relu_backward (an
            # infinite df where f <= 0 gives NaN there, and a NaN f routes nothing), not df[f <= 0] = 0
            np.multiply(df, f > 0, out=df)
            return _concat_linear_backward(df, theta, phi, w_f)
        return dot_pairwise_backward(df, cache) + (None,)


# --------------------------------------------------------------------------- factored forms
#: The modes whose full form the engine computes without the (B, N, M) matrix, because
#: their sums over keys can be taken before the queries meet them (docs/engine.md, "The
#: factored dot product and concatenation"). An empty tuple restores the matrix route (the
#: benchmarks compare the two).
FACTORED_MODES = ("dot_product", "concatenation")


class FactoredCache(NamedTuple):
    """What a factored forward pass keeps; :meth:`backward` gives (dtheta, dphi, dg, dw_f)."""

    mode: str
    theta: Any  # (B, d, N)
    phi: Any  # (B, d, M)
    g: Any  # (B, d_g, M)
    w_f: Any  # (2d,) or None
    kept: tuple  # dot product: (K,); concatenation: (a, b, the forward Sweep or, without Numba, G_k)

    def backward(self, dy):
        if not _finite(dy):  # as the matrix route would spread it (see NonLocalWorkspace.factored)
            from ..nonlocal_op import _Steps, _backward_full, _forward_full

            _, cache = _forward_full(self.theta, self.phi, self.g, self.mode, 1.0, self.w_f, _Steps)
            return _backward_full(dy, cache)
        if self.mode == "dot_product":
            return _dot_backward(dy, self)
        return _concat_backward(dy, self)


def _finite(*arrays):
    """True when no array holds an inf or a NaN (a sum per array; one that overflows says False)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return all(a is None or np.isfinite(np.sum(a)) for a in arrays)


def forward_factored(theta, phi, g, mode, w_f):
    """y of ``nonlocal_op.nonlocal_forward``'s full form for a mode of :data:`FACTORED_MODES`, and its cache."""
    if mode == "dot_product":
        return _dot_forward(theta, phi, g)
    return _concat_forward(theta, phi, g, w_f)


# Dot product: y = g A^T with A = theta^T phi / M, so y = (g phi^T) theta / M = K theta / M. K is
# (d_g, d): the products cost O((N + M) d d_g) instead of O(N M d).
def _dot_forward(theta, phi, g):
    m = phi.shape[2]
    k = np.matmul(g, np.swapaxes(phi, 1, 2))  # (B, d_g, d)
    y = np.matmul(k, theta)
    y /= m
    return y, FactoredCache("dot_product", theta, phi, g, None, (k,))


def _dot_backward(dy, cache):
    _, theta, phi, g, _, (k,) = cache
    dy_c = dy / phi.shape[2]
    dk = np.matmul(dy_c, np.swapaxes(theta, 1, 2))  # (B, d_g, d)
    dtheta = np.matmul(np.swapaxes(k, 1, 2), dy_c)
    dg = np.matmul(dk, phi)
    dphi = np.matmul(np.swapaxes(dk, 1, 2), g)
    return dtheta, dphi, dg, None


# Concatenation: f_ij = ReLU(a_i + b_j) with a = w_f[:d] theta and b = w_f[d:] phi, scalars per
# position. Key j counts for query i when b_j > -a_i, so with the keys sorted by b the keys that
# count for query i are a suffix, found by a binary search, and
#     y_i = sum_{j counts} (a_i + b_j) g_j / M = (a_i G + H) / M,
# G and H the suffix sums of g_j and b_j g_j. The backward pass does the same over queries
# sorted by a. The suffix sums and the two-term combinations are taken in float64: a_i G and H
# may nearly cancel when a_i + b_j is small against a_i. Cost O((N + M)(d_g + log M)). With
# Numba the sums are running sums in one sweep (fused_numba.relu_sweep); without it, suffix
# sums after a sort, below. These small arrays are held position-major, (B, P, channels), so
# that every sum and gather runs along contiguous rows.
def _rows(values):
    """(B, c, P) -> float64 (B, P, c)."""
    return np.swapaxes(values, 1, 2).astype(np.float64, order="C")


def _gather(rows, index):
    """rows (B, P, c) at index (B, Q): (B, Q, c)."""
    b, p, c = rows.shape
    flat = (index + np.arange(b)[:, None] * p).ravel()
    return rows.reshape(b * p, c)[flat].reshape(b, index.shape[1], c)


def _sorted_sums(key, rows):
    """Positions sorted by ``key`` (B, P): the sorted keys, and suffix sums (B, P + 1, c) of ``rows``
    and of key * rows; row k of a sum holds the sum over sorted positions k, k + 1, ...; row P is 0."""
    order = np.argsort(key, axis=1)
    key_sorted = np.take_along_axis(key, order, axis=1)
    vs = _gather(rows, order)
    sums = []
    for v in (vs, vs * key_sorted[:, :, None]):
        out = np.zeros((v.shape[0], v.shape[1] + 1, v.shape[2]))
        np.cumsum(v[:, ::-1], axis=1, out=out[:, -2::-1])
        sums.append(out)
    return key_sorted, sums[0], sums[1]


def _counted_from(sorted_keys, queries):
    """Per batch, the first index at which ``sorted_keys`` (B, P) exceeds -queries (B, Q): (B, Q)."""
    return np.stack([np.searchsorted(s, -q, side="right") for s, q in zip(sorted_keys, queries)])


def _concat_forward(theta, phi, g, w_f):
    d, m = theta.shape[1], phi.shape[2]
    a, b = np.matmul(w_f[:d], theta), np.matmul(w_f[d:], phi)  # (B, N), (B, M): as the matrix route's
    if numba_applies(a, b, g):  # one sweep per batch element (fused_numba.relu_sweep)
        sweep = relu_sweep(a, b, g, 1.0 / m, keep_sums=True)
        return sweep.out, FactoredCache("concatenation", theta, phi, g, w_f, (a, b, sweep))
    b_sorted, g_sums, bg_sums = _sorted_sums(b, _rows(g))
    k = _counted_from(b_sorted, a)
    g_k = _gather(g_sums, k)  # (B, N, d_g): the sum of the g_j that count for query i
    y = g_k * a[:, :, None]
    y += _gather(bg_sums, k)
    y /= m
    y = np.swapaxes(y, 1, 2).astype(theta.dtype, order="C")
    return y, FactoredCache("concatenation", theta, phi, g, w_f, (a, b, g_k))


def _concat_backward(dy, cache):
    from ..functional import _concat_sums_backward

    _, theta, phi, g, w_f, (a, b, kept) = cache
    dt, m = theta.dtype, phi.shape[2]
    if isinstance(kept, Sweep):  # the forward pass swept with Numba
        # dy_i . (the sum of the g_j that count for query i, kept by the forward sweep)
        da = (np.einsum("bci,bic->bi", dy, kept.sums) / m).astype(dt)
        # one sweep by keys over the queries that count them (a_i > -b_j): the forward's orders reversed
        back = relu_sweep(b, a, dy, 1.0 / m, u=g, orders=(kept.k_order[:, ::-1], kept.q_order[:, ::-1]))
        dg, db = back.out, back.dots
    else:
        dy_c = _rows(dy)  # (B, N, d_g)
        dy_c /= m
        da = np.sum(dy_c * kept, axis=2).astype(dt)  # dy_i . (the sum of the g_j that count for query i)
        a_sorted, dy_sums, ady_sums = _sorted_sums(a, dy_c)
        k = _counted_from(a_sorted, b)  # the queries that count key j: a_i > -b_j
        dy_k = _gather(dy_sums, k)  # (B, M, d_g): the sum of those dy_i / M
        db = np.sum(dy_k * _rows(g), axis=2).astype(dt)
        dg = dy_k * b[:, :, None]
        dg += _gather(ady_sums, k)
        dg = np.swapaxes(dg, 1, 2).astype(dt, order="C")
    dtheta, dphi, dw_f = _concat_sums_backward(da, db, theta, phi, w_f)
    return dtheta, dphi, dg, dw_f
