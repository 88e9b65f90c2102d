r"""Fused elementwise passes compiled with Numba (optional): softmax rows, batch norm, max pool.

NumPy makes one pass over memory per ufunc: the softmax of the non-local operation's
(B, N, M) logits is four (the row maxima, the subtraction, ``exp``, the row sums) and batch
norm's training forward six, each single-threaded. Here each is one compiled loop that does
all of a row's steps while the row is in the L1 cache, the rows split between threads (a
pool of Python threads running kernels that release the GIL, see :func:`_run`). The
equations are those of :mod:`nlref.nn.functional` and :mod:`nlref.nn.nonlocal_op`; what
differs is the order of some sums (see below), so results equal the NumPy path's to
rounding, not to the bit (the max pool's are the same bits).

**The engine variable.** ``NLREF_NN_ENGINE`` = ``auto`` (default: these kernels for NumPy
float32/float64 arrays when Numba is installed), ``numpy`` (the array steps everywhere) or
``numba`` (these kernels, an error when Numba is missing). CuPy, array-api-strict and every
other library always take the array steps. :func:`resolve_engine` reads it on every call.

**The same bits for any number of threads.** A row's softmax is computed by one thread in
a fixed order. Batch norm's per-channel sums are split into a fixed partition that depends
only on the array's shape (one partial per (batch, channel) row of a (B, C, N) array, one
per block of :data:`BN_ROWS` positions of a channels-last one), each partial summed in
float64 in a fixed order, the partials added in index order. Threads (Numba's setting,
``NUMBA_NUM_THREADS``) only decide who computes which partial;
``tests/nn/test_fused_numba.py`` checks 1 against 2 threads. Across CPUs the bits may differ, as
OpenBLAS's products do: the reductions are vectorised with the width the compiler picks for the
host (AVX2, AVX-512), which fixes the order of their sums.

The kernels are compiled on their first call (``import numba`` alone takes about 0.4 s)
and cached on disk. Figures: ``docs/engine.md``, "Fused passes compiled with Numba".
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, NamedTuple

import numpy as np

from nlref._files import numba_kernel

from .._shapes import mean_exact_if_constant

__all__ = ["ENGINES", "ENGINE_VARIABLE", "resolve_engine", "numba_applies", "softmax_rows", "softmax_backward_rows",
           "softmax_rows_grad", "concat_scores", "concat_relu_sums", "relu_sweep", "Sweep", "batchnorm_forward_numba", "BN_ROWS",
           "batchnorm_backward_numba", "BatchNormCache", "BN_CHANNELS_LAST", "maxpool_numba", "maxpool_backward_numba"]

#: The engines of the layers' elementwise passes (see the module's docstring).
ENGINES = ("auto", "numpy", "numba")
#: The environment variable that picks the engine for the whole process; default "auto".
#: (The same name serves every Numba kernel of :mod:`nlref.nn.engine`.)
ENGINE_VARIABLE = "NLREF_NN_ENGINE"
#: Whether batch norm on channels-last storage (the training network's layout) takes the fused
#: passes. Off: alone they took 0.23 to 0.46 of the NumPy passes' time on a (32, 64, 8, 28, 28)
#: activation, but the network's are 32 x 16 x 8^3 or smaller, where they won nothing, and
#: training ran 0.49 to 0.51 of PyTorch's clips/s with them against 0.52 to 0.61 without
#: (bench_train.py, docs/engine.md). The (B, C, N) layout of the non-local block takes them.
BN_CHANNELS_LAST = False
#: Channels-last batch norm sums each channel over blocks of this many positions, then adds
#: the blocks' sums in order: a partition fixed by the shape alone, so the result does not
#: depend on the number of threads.
BN_ROWS = 256


def resolve_engine(*arrays):
    """"numba" if the compiled passes apply to ``arrays`` under :data:`ENGINE_VARIABLE`, else "numpy".

    They apply to NumPy arrays of one dtype, float32 or float64. ``NLREF_NN_ENGINE=numba``
    with Numba missing raises ImportError; on other arrays it falls back to "numpy" (the
    variable picks the engine for a whole process, which may also hold CuPy arrays).
    """
    engine = os.environ.get(ENGINE_VARIABLE, "auto").strip().lower() or "auto"
    if engine not in ENGINES:
        raise ValueError(f"{ENGINE_VARIABLE} must be one of {ENGINES}; got {engine!r}")
    if engine == "numpy":
        return "numpy"
    installed = _numba_installed()
    if engine == "numba" and not installed:
        raise ImportError(f"{ENGINE_VARIABLE}='numba' needs the optional dependency Numba: "
                          "pip install 'nlref[fast]' (or use 'numpy' or 'auto')")
    if not installed:
        return "numpy"
    dtypes = {a.dtype for a in arrays if type(a) is np.ndarray}
    if len(dtypes) != 1 or len([a for a in arrays if type(a) is not np.ndarray]):
        return "numpy"
    return "numba" if dtypes.pop() in (np.float32, np.float64) else "numpy"


_installed = None


def _numba_installed():
    global _installed
    if _installed is None:
        _installed = importlib.util.find_spec("numba") is not None
    return _installed


def numba_applies(*arrays):
    """True when :func:`resolve_engine` picks "numba" for ``arrays``."""
    return resolve_engine(*arrays) == "numba"


# --------------------------------------------------------------------------- compilation
_PARALLEL = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)  # run on rows start..stop
_INLINE = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)
# A sum (or a maximum) is a chain of dependent additions unless the compiler may reorder it;
# these flags, on the reductions only, let LLVM keep 16 float32 partial sums in a vector
# register. The order is then fixed by the compiled code, the same for every row and thread.
_REDUCE = dict(_INLINE, fastmath={"reassoc", "nsz"})

_KERNELS = {}  # name -> (function, options), until compile_kernels replaces them
_compiled = threading.Lock()


def _kernel(**options):
    def mark(fn):
        _KERNELS[fn.__name__] = (fn, options)
        return fn
    return mark


def compile_kernels():
    """Hand every kernel of this module to Numba (once; each compiles on its first call)."""
    with _compiled:
        if not _KERNELS:
            return
        import numba

        names = globals()
        for name, (fn, options) in list(_KERNELS.items()):
            names[name] = numba_kernel(numba, fn, options)
        _KERNELS.clear()




# float32 exp(x) for x in [-87, 0]: x = k ln 2 + r, |r| <= ln(2)/2 (ln 2 in two parts, Cody and
# Waite, so that k * _LN2_HI is exact), exp(r) = 1 + r + r^2 P(r) with the degree-5 minimax P
# of Cephes' expf.c (S. L. Moshier, Cephes Math Library 2.2, 1992), then k added to the
# result's exponent bits. Written as plain arithmetic so that LLVM vectorises it (16 float32
# lanes); math.exp calls the C library once per value. Below -87 the result is 0 (the exact
# value is below 1.7e-38, next to a row maximum's 1).
_LOG2E = np.float32(1.4426950408889634)
_ROUND = np.float32(12582912.0)  # 1.5 * 2^23: adding and subtracting it rounds to an integer
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187e-06)
_P0, _P1, _P2, _P3, _P4, _P5 = (np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                                         4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
_ONE32 = np.float32(1.0)
_ZERO32 = np.float32(0.0)
_FLOOR32 = np.float32(-87.0)


@_kernel(**_INLINE)
def _row_max(row, n, lanes):
    """The maximum of row[:n] (finite values); ``lanes``: scratch (16,).

    Sixteen running maxima, one per vector lane, written out so that LLVM vectorises the loop
    (Numba's ``max`` reduction stays scalar even with fastmath: 1.5 against 0.43 ns per float32
    value on this machine).
    """
    for lane in range(16):
        lanes[lane] = row[0]
    n16 = n - n % 16
    for j in range(0, n16, 16):
        for lane in range(16):
            v = row[j + lane]
            lanes[lane] = v if v > lanes[lane] else lanes[lane]
    m = lanes[0]
    for lane in range(16):
        m = lanes[lane] if lanes[lane] > m else m
    for j in range(n16, n):
        v = row[j]
        m = v if v > m else m
    return m


@_kernel(**_REDUCE)
def _row_sum(row, n):
    s = 0.0  # float64, for float32 rows too
    for j in range(n):
        s += row[j]
    return s


@_kernel(**_INLINE)
def _exp_shifted32(row, n, m, kbits):
    """row[j] = exp(row[j] - m) (float32, finite row, m its maximum); ``kbits`` int32 scratch."""
    for j in range(n):
        x = row[j] - m
        keep = x >= _FLOOR32
        x = max(x, _FLOOR32)
        k = (x * _LOG2E + _ROUND) - _ROUND
        r = (x - k * _LN2_HI) - k * _LN2_LO
        p = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * (r * r)
        kbits[j] = np.int32(k) << 23 if keep else 0
        row[j] = (p + r) + _ONE32 if keep else _ZERO32
    bits = row[:n].view(np.int32)
    for j in range(n):
        bits[j] += kbits[j]


@_kernel(**_INLINE)
def _exp_shifted64(row, n, m):
    for j in range(n):
        row[j] = math.exp(row[j] - m)


@_kernel(**_INLINE)
def _exp_row_exact(row, n):
    """A row with an infinite or NaN value, as NumPy computes it: exp(s - max) (NaN if max is NaN)."""
    m = row[0]
    for j in range(n):
        v = row[j]
        if v != v or m != m:
            m = v if v != v else m
        elif v > m:
            m = v
    for j in range(n):
        row[j] = math.exp(row[j] - m)


@_kernel(**_PARALLEL)
def _softmax_rows(s, sums, single, normalise, start, stop):
    """Rows start..stop of s (R, M) <- exp(s - max over the row) in place; sums (R,) <- their sums;
    with ``normalise`` the rows are then divided by their sums (the softmax itself)."""
    n = s.shape[1]
    kbits = np.empty(n, dtype=np.int32)
    lanes = np.empty(16, dtype=s.dtype)
    for i in range(start, stop):
        row = s[i]
        if _row_sum(row, n) * 0 != 0:  # an infinite or NaN logit (or a sum that overflows)
            _exp_row_exact(row, n)
        elif single:
            _exp_shifted32(row, n, _row_max(row, n, lanes), kbits)
        else:
            _exp_shifted64(row, n, _row_max(row, n, lanes))
        sums[i] = _row_sum(row, n)
        if normalise:
            total = row[0] - row[0] + sums[i]  # in the row's dtype, as NumPy's p /= sum
            for j in range(n):
                row[j] /= total


@_kernel(**_PARALLEL)
def _softmax_backward_rows(dp, p, out, zero, start, stop):
    """out (R, M) <- p * (dp - sum_j dp p), the softmax's backward pass row by row; ``zero``: 0 in the
    rows' dtype (not dp[i, 0] - dp[i, 0], which is NaN where dp[i, 0] is infinite)."""
    rows, n = dp.shape
    for i in range(start, stop):
        c = _row_dot(dp[i], p[i], n)
        c = zero + c  # in the rows' dtype
        for j in range(n):
            out[i, j] = p[i, j] * (dp[i, j] - c)


@_kernel(**_REDUCE)
def _row_dot(a, b, n):
    s = 0.0
    for j in range(n):
        s += a[j] * b[j]
    return s


@_kernel(**_PARALLEL)
def _softmax_rows_grad(de, e, c, start, stop):
    """de (R, M) <- e * (de - c[:, None]) in place."""
    rows, n = de.shape
    for i in range(start, stop):
        ci = c[i]
        for j in range(n):
            de[i, j] = e[i, j] * (de[i, j] - ci)


@_kernel(**_PARALLEL)
def _concat_scores(a, b, out, zero, start, stop):
    """out (B, N, M) <- max(a[:, :, None] + b[:, None, :], 0); ``zero`` is 0 in out's dtype (passed in:
    ``out`` is a reused buffer, whose old values may be inf or NaN, so none of them may be read)."""
    nb, n, m = out.shape
    for r in range(start, stop):
        k, i = r // n, r % n
        ai = a[k, i]
        for j in range(m):
            out[k, i, j] = max(ai + b[k, j], zero)


@_kernel(**_PARALLEL)
def _concat_relu_sums(df, f, da, db, start, stop):
    """da (B, N) and db (B, M) <- row and column sums of df * [f > 0] (batch elements start..stop), the
    product taken as written (an infinite df where f <= 0 gives NaN, as functional.relu_backward)."""
    nb, n, m = df.shape
    for k in range(start, stop):
        col = np.zeros(m, dtype=np.float64)
        for i in range(n):
            s = 0.0
            for j in range(m):
                v = df[k, i, j] if f[k, i, j] > 0 else df[k, i, j] * 0.0  # as relu_backward's 0/1 mask: inf * 0 is NaN
                s += v
                col[j] += v
            da[k, i] = s
        for j in range(m):
            db[k, j] = col[j]


@_kernel(**_PARALLEL)
def _relu_sweep(q, k, v, u, q_order, k_order, scale, out, dots, sums, start, stop):
    """The concatenation's sums over the keys that count, query by query (batch elements start..stop).

    Key j counts for query i when k_j > -q_i. Queries are visited by increasing q_i
    (``q_order``), so the keys that count only grow; they are added in decreasing k_j
    (``k_order``) into S = sum v_j and T = sum k_j v_j (float64). Then, for query i,
    out[i] = (q_i S + T) scale, dots[i] = u[i] . S scale and sums[i] = S, each only if that
    output has room. Position-major, so that the loops over c run along contiguous rows:
    q (B, Q), k (B, P), v (B, P, c), u (B, Q, c), out (B, Q, c), sums (B, Q, c).
    """
    nc, nk, nq = v.shape[2], k.shape[1], q.shape[1]
    want_out, want_dots, want_sums = out.shape[1] > 0, dots.shape[1] > 0, sums.shape[1] > 0
    s = np.zeros(nc, dtype=np.float64)
    t = np.zeros(nc, dtype=np.float64)
    for bi in range(start, stop):
        s[:] = 0.0
        t[:] = 0.0
        p = 0
        for qi in range(nq):
            i = q_order[bi, qi]
            qv = q[bi, i]
            while p < nk:
                j = k_order[bi, p]
                kj = k[bi, j]
                if not kj > -qv:
                    break
                for c in range(nc):
                    vv = v[bi, j, c]
                    s[c] += vv
                    t[c] += kj * vv
                p += 1
            if want_out:
                for c in range(nc):
                    out[bi, i, c] = (qv * s[c] + t[c]) * scale
            if want_dots:
                acc = 0.0
                for c in range(nc):
                    acc += u[bi, i, c] * s[c]
                dots[bi, i] = acc * scale
            if want_sums:
                for c in range(nc):
                    sums[bi, i, c] = s[c]


# --------------------------------------------------------------------------- max pooling (stride = kernel)
@_kernel(**_PARALLEL)
def _maxpool_rows(x4, kh, kw, out, start, stop):
    """out[r, i, j] = the maximum of row r's x[i kh : (i + 1) kh, j kw : (j + 1) kw], visited in
    row-major order with NumPy's ``maximum`` (a NaN in the window gives NaN). Row r is
    ``x4[r // R, r % R]`` of the (B, R, H, W) ``x4``, which may be a strided view."""
    ho, wo = out.shape[1], out.shape[2]
    nr = x4.shape[1]
    for r in range(start, stop):
        x = x4[r // nr, r % nr]
        if kh == 2 and kw == 2:  # the block's default window, unrolled: 0.19 against 0.74 ms (docs/engine.md)
            for i in range(ho):
                for j in range(wo):
                    m = x[2 * i, 2 * j]
                    v = x[2 * i, 2 * j + 1]
                    if v > m or v != v:
                        m = v
                    v = x[2 * i + 1, 2 * j]
                    if v > m or v != v:
                        m = v
                    v = x[2 * i + 1, 2 * j + 1]
                    if v > m or v != v:
                        m = v
                    out[r, i, j] = m
            continue
        for i in range(ho):
            for j in range(wo):
                m = x[i * kh, j * kw]
                for a in range(kh):
                    for b in range(kw):
                        v = x[i * kh + a, j * kw + b]
                        if v > m or v != v:  # a NaN maximum stays: nothing is greater than it
                            m = v
                out[r, i, j] = m


@_kernel(**_PARALLEL)
def _maxpool_rows_backward(dout, x4, out, kh, kw, dx, start, stop):
    """dx = dout routed to the first sample of each window equal to its maximum, as
    ``functional.maxpool_backward``: dout * 1 there, dout * 0 at the window's other samples,
    0 on samples outside every window. The winner is found first, then the window written
    once (no zeroing pass over dx, no running flag: 0.83 against 1.5 ms on one thread for
    (2048, 14, 14) float32). A window holding NaN routes to its last NaN, as PyTorch's CPU
    kernel does (``v != v`` is NaN's test; no fastmath here). ``x4`` as in :func:`_maxpool_rows`."""
    h, w = x4.shape[2], x4.shape[3]
    ho, wo = out.shape[1], out.shape[2]
    nr = x4.shape[1]
    size = kh * kw
    for r in range(start, stop):
        x = x4[r // nr, r % nr]
        if ho * kh < h or wo * kw < w:  # samples outside every window
            for i in range(h):
                for j in range(w):
                    dx[r, i, j] = 0
        if kh == 2 and kw == 2:  # unrolled, as in _maxpool_rows
            for i in range(ho):
                for j in range(wo):
                    m = out[r, i, j]
                    d = dout[r, i, j]
                    z = d * 0  # 0, or NaN where d is not finite, as d * 0 in the general loop
                    # the first sample equal to the maximum, by bitwise logic: short-circuit
                    # tests branch on random data (0.99 against 0.31 ms at (2048, 14, 14))
                    v0, v1, v2, v3 = x[2 * i, 2 * j], x[2 * i, 2 * j + 1], x[2 * i + 1, 2 * j], x[2 * i + 1, 2 * j + 1]
                    # a window holding NaN has a NaN maximum, equal to nothing: its last NaN wins instead
                    n3 = v3 != v3
                    n2 = (v2 != v2) & ~n3
                    n1 = (v1 != v1) & ~(n2 | n3)
                    n0 = (v0 != v0) & ~(n1 | n2 | n3)
                    w0 = (v0 == m) | n0
                    w1 = ((v1 == m) & ~w0) | n1
                    w2 = ((v2 == m) & ~(w0 | w1)) | n2
                    w3 = ((v3 == m) & ~(w0 | w1 | w2)) | n3
                    dx[r, 2 * i, 2 * j] = d if w0 else z
                    dx[r, 2 * i, 2 * j + 1] = d if w1 else z
                    dx[r, 2 * i + 1, 2 * j] = d if w2 else z
                    dx[r, 2 * i + 1, 2 * j + 1] = d if w3 else z
            continue
        for i in range(ho):
            for j in range(wo):
                m = out[r, i, j]
                d = dout[r, i, j]
                first, last_nan = size, -1
                for a in range(kh):
                    for b in range(kw):
                        v = x[i * kh + a, j * kw + b]
                        if v == m:
                            first = min(first, a * kw + b)
                        if v != v:  # then the maximum is NaN, equal to nothing: the last NaN wins
                            last_nan = a * kw + b
                if last_nan >= 0:
                    first = last_nan
                for a in range(kh):
                    for b in range(kw):
                        dx[r, i * kh + a, j * kw + b] = d * (1 if a * kw + b == first else 0)


# --------------------------------------------------------------------------- batch norm kernels
@_kernel(**_PARALLEL)
def _mid_sums(x, shift, power, out, start, stop):
    """out[b, c] = sum_j (x[b, c, j] - shift[c]) ** power (1 or 2) per (batch, channel) row, float64."""
    nb, nc, n = x.shape
    for r in range(start, stop):
        b, c = r // nc, r % nc
        if power == 1:
            out[b, c] = _row_sum_shifted(x[b, c], n, shift[c])
        else:
            out[b, c] = _row_sum_sq(x[b, c], n, shift[c])


@_kernel(**_REDUCE)
def _row_sum_shifted(row, n, shift):
    s = 0.0
    for j in range(n):
        s += row[j] - shift
    return s


@_kernel(**_REDUCE)
def _row_sum_sq(row, n, shift):
    s = 0.0
    for j in range(n):
        d = row[j] - shift
        s += d * d
    return s


@_kernel(**_REDUCE)
def _row_sum_prod(row, other, n, shift):
    s = 0.0
    for j in range(n):
        s += row[j] * (other[j] - shift)
    return s


@_kernel(**_PARALLEL)
def _mid_grad_sums(dout, x, mean, sum_d, sum_dx, start, stop):
    nb, nc, n = x.shape
    for r in range(start, stop):
        b, c = r // nc, r % nc
        sum_d[b, c] = _row_sum(dout[b, c], n)
        sum_dx[b, c] = _row_sum_prod(dout[b, c], x[b, c], n, mean[c])


@_kernel(**_PARALLEL)
def _mid_affine(x, mean, k, beta, out, start, stop):
    """out = (x - mean) * k + beta, per channel (the middle axis)."""
    nb, nc, n = x.shape
    for r in range(start, stop):
        b, c = r // nc, r % nc
        mc, kc, bc = mean[c], k[c], beta[c]
        for j in range(n):
            out[b, c, j] = (x[b, c, j] - mc) * kc + bc


@_kernel(**_PARALLEL)
def _mid_grad(dout, x, mean, k1, k2, k3, out, start, stop):
    """out = dout k1 + (x - mean) k2 + k3, per channel, in the NumPy path's order."""
    nb, nc, n = x.shape
    for r in range(start, stop):
        b, c = r // nc, r % nc
        mc, a1, a2, a3 = mean[c], k1[c], k2[c], k3[c]
        for j in range(n):
            out[b, c, j] = (dout[b, c, j] * a1 + (x[b, c, j] - mc) * a2) + a3


@_kernel(**_PARALLEL)
def _last_sums(x, mean, power, block, out, start, stop):
    """out[blk, c] = sum over the block's rows of (x[p, c] - mean[c]) ** power (1 or 2), float64."""
    rows, nc = x.shape
    for blk in range(start, stop):
        acc = np.zeros(nc, dtype=np.float64)
        for p in range(blk * block, min(rows, (blk + 1) * block)):
            if power == 1:
                for c in range(nc):
                    acc[c] += x[p, c] - mean[c]
            else:
                for c in range(nc):
                    d = x[p, c] - mean[c]
                    acc[c] += d * d
        out[blk] = acc


@_kernel(**_PARALLEL)
def _last_grad_sums(dout, x, mean, block, sum_d, sum_dx, start, stop):
    rows, nc = x.shape
    for blk in range(start, stop):
        acc_d = np.zeros(nc, dtype=np.float64)
        acc_dx = np.zeros(nc, dtype=np.float64)
        for p in range(blk * block, min(rows, (blk + 1) * block)):
            for c in range(nc):
                acc_d[c] += dout[p, c]
                acc_dx[c] += dout[p, c] * (x[p, c] - mean[c])
        sum_d[blk] = acc_d
        sum_dx[blk] = acc_dx


@_kernel(**_PARALLEL)
def _last_affine(x, mean, k, beta, out, start, stop):
    rows, nc = x.shape
    for p in range(start, stop):
        for c in range(nc):
            out[p, c] = (x[p, c] - mean[c]) * k[c] + beta[c]


@_kernel(**_PARALLEL)
def _last_grad(dout, x, mean, k1, k2, k3, out, start, stop):
    rows, nc = x.shape
    for p in range(start, stop):
        for c in range(nc):
            out[p, c] = (dout[p, c] * k1[c] + (x[p, c] - mean[c]) * k2[c]) + k3[c]


# --------------------------------------------------------------------------- the seam's functions
#: A call is split between threads only when every thread gets at least this many values:
#: handing a task to a thread costs some tens of microseconds, and after the block's products
#: OpenBLAS's worker keeps spinning on the other core (docs/engine.md). No effect on the result.
MIN_VALUES_PER_THREAD = 2**20
_pool = None
_pool_lock = threading.Lock()


def _forget_pool():
    """In a forked child: the parent's pool threads do not exist there, so start a new pool."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def threads():
    """How many threads the kernels use: Numba's setting (``NUMBA_NUM_THREADS``, ``numba.set_num_threads``)."""
    import numba

    return numba.get_num_threads()


def _run(kernel, items, values, *args):
    """kernel(*args, start, stop) over ``items`` independent items (``values`` values in all).

    The items are split into contiguous runs, one per thread, run in a pool of Python threads
    (the kernels release the GIL). Threads wait asleep between calls: Numba's own ``prange``
    pool (the OpenMP layer here) spins after each call, and it and OpenBLAS's spinning threads
    took turns on the 2 cores: a block's step ran 2 to 6 times slower (docs/engine.md).
    """
    global _pool
    parts = max(1, min(threads(), items, values // MIN_VALUES_PER_THREAD))
    if parts == 1:
        kernel(*args, 0, items)
        return
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="nlref-fused")
    bounds = [items * k // parts for k in range(parts + 1)]
    futures = []
    try:
        for k in range(1, parts):
            futures.append(_pool.submit(kernel, *args, bounds[k], bounds[k + 1]))
        kernel(*args, bounds[0], bounds[1])  # the calling thread takes the first run
        wait(futures)  # all of them, before an error of one comes out
    except BaseException:
        # The runs write into the caller's arrays (a block's workspace, reused by its next call): none
        # may go on after this call is over, also when it raises (Ctrl-C arrives in this thread, most
        # often while it waits). Those not yet started are dropped; the others take one pass over their rows.
        for future in futures:
            future.cancel()
        wait(futures)
        raise
    for future in futures:
        future.result()


def softmax_rows(s, *, normalise=False):
    """s (..., M), C-contiguous NumPy float array, becomes exp(s - max over the last axis) in place.

    Returns the row sums (...), in ``s``'s dtype (summed in float64). With ``normalise``
    the rows are divided by their sums: ``s`` becomes its softmax. A row holding an
    infinite or NaN logit is computed as NumPy would (``math.exp`` of ``s - max``).
    """
    compile_kernels()
    rows = s.reshape(-1, s.shape[-1])
    sums = np.zeros(rows.shape[0], dtype=np.float64)
    if rows.size:
        _run(_softmax_rows, rows.shape[0], rows.size, rows, sums, s.dtype == np.float32, normalise)
    return sums.astype(s.dtype).reshape(s.shape[:-1])


def softmax_backward_rows(dp, p):
    """p * (dp - sum(dp * p, last axis)) as a new array (NumPy float arrays of one shape and dtype)."""
    compile_kernels()
    m = p.shape[-1]
    out = np.empty(p.shape, dtype=p.dtype)
    if out.size:
        out2 = out.reshape(-1, m)
        _run(_softmax_backward_rows, out2.shape[0], out2.size, np.ascontiguousarray(dp).reshape(-1, m),
             np.ascontiguousarray(p).reshape(-1, m), out2, out.dtype.type(0))
    return out


def softmax_rows_grad(de, e, c):
    """de (..., M) <- e * (de - c[..., None]) in place (C-contiguous NumPy arrays); returns de."""
    compile_kernels()
    m = de.shape[-1]
    de2 = de.reshape(-1, m)
    _run(_softmax_rows_grad, de2.shape[0], de2.size, de2, np.ascontiguousarray(e).reshape(-1, m),
         np.ascontiguousarray(c, dtype=de.dtype).reshape(-1))
    return de


def concat_scores(a, b, out):
    """out (B, N, M) <- ReLU(a[:, :, None] + b[:, None, :]); returns out."""
    compile_kernels()
    if out.size:
        _run(_concat_scores, out.shape[0] * out.shape[1], out.size, np.ascontiguousarray(a), np.ascontiguousarray(b),
             out, out.dtype.type(0))
    return out


def concat_relu_sums(df, f):
    """Row sums (B, N) and column sums (B, M) of ``df * [f > 0]`` (summed in float64, one batch
    element per thread), in ``df``'s dtype."""
    compile_kernels()
    nb, n, m = df.shape
    da = np.empty((nb, n), dtype=np.float64)
    db = np.empty((nb, m), dtype=np.float64)
    _run(_concat_relu_sums, nb, df.size, np.ascontiguousarray(df), np.ascontiguousarray(f), da, db)
    return da.astype(df.dtype), db.astype(df.dtype)


class Sweep(NamedTuple):
    """What :func:`relu_sweep` returns; an output not asked for is None."""

    out: Any  # (B, c, Q), v's dtype, C-contiguous: (q_i S + T) scale
    dots: Any  # (B, Q), v's dtype: u_i . S scale
    sums: Any  # (B, Q, c) float64: S
    q_order: Any  # (B, Q): queries by increasing q
    k_order: Any  # (B, P): keys by decreasing k


def relu_sweep(q, k, v, scale, *, u=None, want_out=True, keep_sums=False, orders=None):
    """:func:`_relu_sweep` on NumPy arrays, as a :class:`Sweep`.

    The factored concatenation of :mod:`nlref.nn.engine.nonlocal_op` calls it once forward
    (queries a, keys b, values g; S kept) and once backward (queries b, keys a, values dy,
    u = g), the backward reusing the forward's orders reversed. ``orders``: (q_order,
    k_order) when known. Each batch element is one sequential sweep, O((Q + P) c), so a call
    runs on one thread.
    """
    compile_kernels()
    nb, nc, nq = q.shape[0], v.shape[1], q.shape[1]
    if orders is None:
        orders = np.argsort(q, axis=1), np.argsort(-k, axis=1)
    q_order, k_order = (np.ascontiguousarray(o) for o in orders)
    rows = lambda a: np.ascontiguousarray(np.swapaxes(a, 1, 2))  # noqa: E731  (B, c, P) -> (B, P, c)
    out = np.empty((nb, nq if want_out else 0, nc), dtype=v.dtype)
    want_dots = u is not None
    dots = np.empty((nb, nq if want_dots else 0), dtype=np.float64)
    sums = np.empty((nb, nq if keep_sums else 0, nc), dtype=np.float64)
    u = rows(u) if want_dots else np.empty((nb, 0, nc), dtype=v.dtype)
    _relu_sweep(np.ascontiguousarray(q), np.ascontiguousarray(k), rows(v), u, q_order, k_order,
                float(scale), out, dots, sums, 0, nb)
    return Sweep(rows(out) if want_out else None, dots.astype(v.dtype) if want_dots else None,
                 sums if keep_sums else None, q_order, k_order)


def _pool_rows(shape, kernel):
    """(R, H, W, kh, kw): a (B, C, *S) array pooled by ``kernel`` as R rows of (H, W) windows
    (kernel 1 on every spatial axis but the last two; 1-D: H = 1), or None."""
    spatial = tuple(shape[2:])
    kernel = tuple(kernel)
    if len(kernel) != len(spatial) or not spatial:
        return None
    if len(spatial) == 1:
        return math.prod(shape[:2]), 1, spatial[0], 1, kernel[0]
    if any(k != 1 for k in kernel[:-2]):
        return None
    return math.prod(shape[:-2]), spatial[-2], spatial[-1], kernel[-2], kernel[-1]


def _rows4(x, h, w):
    """x (B, C, *S) as (B, R, H, W): a view where NumPy can make one (a slice of channels of a
    contiguous array, as the block's phi and g rows), so the pool reads it without a copy."""
    return x.reshape(x.shape[0], -1, h, w)


def maxpool_numba(x, kernel):
    """:func:`nlref.nn.functional.maxpool_forward`'s maximum in one pass (the same numbers, to the bit),
    or None where the kernel pools along more than the last two axes."""
    rows = _pool_rows(x.shape, kernel)
    if rows is None:
        return None
    compile_kernels()
    r, h, w, kh, kw = rows
    out_shape = tuple(x.shape[:2]) + tuple(n // k for n, k in zip(x.shape[2:], kernel))
    out = np.empty(out_shape, dtype=x.dtype)
    if out.size:
        _run(_maxpool_rows, r, x.size, _rows4(x, h, w), kh, kw, out.reshape(r, h // kh, w // kw))
    return out


def maxpool_backward_numba(dout, x, out, kernel):
    """:func:`nlref.nn.functional.maxpool_backward` in one pass (the same numbers, to the bit), or None."""
    rows = _pool_rows(x.shape, kernel)
    if rows is None or dout.shape != out.shape or dout.dtype != x.dtype:
        return None
    compile_kernels()
    r, h, w, kh, kw = rows
    dx = np.zeros(x.shape, dtype=dout.dtype) if not out.size else np.empty(x.shape, dtype=dout.dtype)
    if out.size:  # the kernel writes every sample of dx
        _run(_maxpool_rows_backward, r, x.size, np.ascontiguousarray(dout).reshape(r, h // kh, w // kw),
             _rows4(x, h, w), np.ascontiguousarray(out).reshape(r, h // kh, w // kw),
             kh, kw, dx.reshape(r, h, w))
    return dx


class BatchNormCache(NamedTuple):
    """What :func:`batchnorm_backward_numba` needs: the input (not its centred copy) and the mean."""

    x: Any  # the input as the kernels' matrix: (B, C, N), or (P, C) for channels-last storage
    mean: Any  # (C,) the mean that was subtracted (batch or running)
    gamma: Any
    inv_std: Any
    training: bool
    shape: tuple  # the (B, C, ...) shape
    last: bool  # channels-last storage


def _layout(x):
    """(matrix, last) for x (B, C, ...): its (P, C) storage if stored channels-last, else (B, C, N); None if neither."""
    from .layout import stored_channels_last

    if stored_channels_last(x):
        perm = (0,) + tuple(range(2, x.ndim)) + (1,)
        return x.transpose(perm).reshape(-1, x.shape[1]), True
    if x.flags.c_contiguous:
        return x.reshape(x.shape[0], x.shape[1], -1), False
    return None


def _restore(out, shape, last):
    if last:
        a = out.reshape((shape[0],) + tuple(shape[2:]) + (shape[1],))
        return a.transpose((0, a.ndim - 1) + tuple(range(1, a.ndim - 1)))
    return out.reshape(shape)


def _channel_sums(x, shift, last, power):
    """Per-channel sums (C,) of (x - shift) ** power over the fixed partition (float64)."""
    if last:
        blocks = -(-x.shape[0] // BN_ROWS)
        parts = np.empty((blocks, x.shape[1]), dtype=np.float64)
        _run(_last_sums, blocks, x.size, x, shift, power, BN_ROWS, parts)
    else:
        parts = np.empty(x.shape[:2], dtype=np.float64)
        _run(_mid_sums, parts.size, x.size, x, shift, power, parts)
    return _add_in_order(parts)


def _add_in_order(parts):
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


def batchnorm_forward_numba(x, gamma, beta, state, *, training, momentum, eps):
    """:func:`nlref.nn.functional.batchnorm_forward` in three (training) or one (eval) compiled passes.

    Returns (out, cache) or None when ``x``'s storage is neither C-contiguous nor channels-last
    (or channels-last while :data:`~nlref.nn.engine.fused_numba.BN_CHANNELS_LAST` is off).
    Training: the mean (one pass), the variance as the mean of squared deviations from it (one
    pass), then ``(x - mean) k + beta`` (one pass); the cache keeps ``x`` and the mean.
    """
    laid = _layout(x)
    if laid is None or (laid[1] and not BN_CHANNELS_LAST):
        return None
    compile_kernels()
    x2, last = laid
    dtype = x.dtype.type
    if training:
        m = x.shape[0] * math.prod(x.shape[2:])
        zero = np.zeros(x.shape[1], dtype=x.dtype)
        mean = (_channel_sums(x2, zero, last, 1) / m).astype(x.dtype)
        var = (_channel_sums(x2, mean, last, 2) / m).astype(x.dtype)
        exact = mean_exact_if_constant(np, x, mean, var, m, axis=(0, *range(2, x.ndim))) \
            if x.dtype == np.float64 else None  # float32 channels are summed in float64: a constant one exactly
        if exact is not None:  # a constant channel's mean is its value
            mean = exact
            var = (_channel_sums(x2, mean, last, 2) / m).astype(x.dtype)
        state["running_mean"] = (1 - momentum) * state["running_mean"] + momentum * mean
        state["running_var"] = (1 - momentum) * state["running_var"] + momentum * (var * (m / (m - 1)))
    else:
        mean, var = state["running_mean"], state["running_var"]
    inv_std = dtype(1.0) / np.sqrt(var + eps)
    k = gamma * inv_std
    out = np.empty_like(x2)
    rows = x2.shape[0] if last else x2.shape[0] * x2.shape[1]
    _run(_last_affine if last else _mid_affine, rows, x2.size, x2, mean, k, beta, out)
    return _restore(out, x.shape, last), BatchNormCache(x2, mean, gamma, inv_std, training, tuple(x.shape), last)


def batchnorm_backward_numba(dout, cache):
    """:func:`nlref.nn.functional.batchnorm_backward` for a :class:`BatchNormCache`: two compiled passes."""
    x2, mean, gamma, inv_std, training, shape, last = cache
    if tuple(dout.shape) != shape:
        raise ValueError(f"dout must have the shape of the forward's output, {shape}; got {tuple(dout.shape)}")
    compile_kernels()
    if last:
        perm = (0,) + tuple(range(2, dout.ndim)) + (1,)
        d2 = np.ascontiguousarray(dout.transpose(perm)).reshape(x2.shape)
        blocks = -(-x2.shape[0] // BN_ROWS)
        parts_d = np.empty((blocks, x2.shape[1]), dtype=np.float64)
        parts_dx = np.empty_like(parts_d)
        _run(_last_grad_sums, blocks, x2.size, d2, x2, mean, BN_ROWS, parts_d, parts_dx)
    else:
        d2 = np.ascontiguousarray(dout).reshape(x2.shape)
        parts_d = np.empty(x2.shape[:2], dtype=np.float64)
        parts_dx = np.empty_like(parts_d)
        _run(_mid_grad_sums, parts_d.size, x2.size, d2, x2, mean, parts_d, parts_dx)
    m = x2.size // x2.shape[-1 if last else 1]
    dbeta = _add_in_order(parts_d).astype(x2.dtype)
    dgamma = _add_in_order(parts_dx).astype(x2.dtype) * inv_std
    k1 = gamma * inv_std
    if not training:  # dx = dout k1, as the textbook: k2 = k3 = 0 in the pass below would take (x - mean) 0,
        return _restore(d2 * (k1 if last else k1[:, None]), shape, last), dgamma, dbeta  # NaN where x is inf
    k2 = -k1 * inv_std * dgamma / m
    k3 = -k1 * dbeta / m
    out = np.empty_like(x2)
    rows = x2.shape[0] if last else x2.shape[0] * x2.shape[1]
    _run(_last_grad if last else _mid_grad, rows, x2.size, d2, x2, mean, k1, k2, k3, out)
    return _restore(out, shape, last), dgamma, dbeta
