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

import numpy as np

from .fused_numba import concat_relu_sums, concat_scores, numba_applies, softmax_rows, softmax_rows_grad


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
            df[f <= 0] = 0  # the ReLU's routing, in place
            return _concat_linear_backward(df, theta, phi, w_f)
        return dot_pairwise_backward(df, cache) + (None,)
