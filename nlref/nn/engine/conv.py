r"""The tuned 3-D convolution: channels-last im2col, chunked, paired, dense and flipped.

:func:`nlref.nn.functional.conv3d_forward` and :func:`~nlref.nn.functional.conv3d_backward`
call :func:`conv3d_forward` and :func:`conv3d_backward` here; what they compute is
:func:`nlref.nn.functional.conv3d_reference`, a loop over the kernel's offsets, and the
tests hold them to it. Everything in this module exists for speed; each trick's figure and
history are in ``docs/engine.md`` ("The tricks one by one").

* **im2col, channels-last** (:class:`_Columns`, :func:`_conv_cl`): every window's samples are
  copied from a strided window view of the channels-last padded input into one row of a column
  matrix ``cols`` (B T' H' W', K C), and the convolution is one product ``cols @ w`` (K C, O);
  the output is stored channels-last.
* **Column chunks** (:data:`CONV_CHUNK_BYTES`): on NumPy the columns are built a cache-sized
  part of the batch at a time.
* **Paired output columns** (:data:`CONV_PAIR_CHANNELS`, :func:`_widen`): with stride 1 and few
  channels, one row of columns serves two neighbouring outputs along W.
* **The flipped backward** (:func:`_flipped_backward`): with stride 1 the input gradient is the
  full correlation of the output gradient with the flipped kernel, computed from the output
  gradient's columns, which also give the weight gradient; its index plan is cached
  (:func:`_flip_plan`).
* **Kept columns** (:data:`CONV_KEEP_BYTES`): a strided convolution keeps its columns for the
  weight gradient.
* **Grouped taps in col2im** (:func:`_col2im_grouped`): a strided convolution's input gradient
  adds the taps along W ``stride_w`` at a time, in longer runs; the same sums in the same order.
* **The dense per-frame product** (:data:`DENSE_MAX_RATIO`, :func:`_dense_plan`): a
  1 x kh x kw convolution on tiny maps is one block-sparse matrix product per frame.
* **Spare padded buffers** (:class:`_SpareBorders`): padded inputs are reused with their zero
  borders intact.
* **Less per call**: the window view comes from the ``ndarray`` constructor, and NumPy is
  called directly where a layer is called every step.

Every path gives the same numbers on every library up to rounding; on array-API libraries
without ``out=`` (array-api-strict) the columns are stacked from one slice per offset.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from typing import Any, NamedTuple

import numpy as np

from ...backend import array_namespace, asarray, device, is_numpy, native_namespace, supports_out
from .._shapes import dtype_of, interior, strided, window_offsets
from .layout import channel_sums, channels_first, channels_last

#: The size in bytes of the column matrix built per chunk of the batch on NumPy. It stays in the CPU
#: caches between the copy that builds it and the product that reads it.
CONV_CHUNK_BYTES = 2 << 20
#: Column matrices up to this size are kept from the forward pass for the backward pass of a
#: strided convolution (which otherwise rebuilds them chunk by chunk): memory traded for one
#: copy of them.
CONV_KEEP_BYTES = 64 << 20
#: Stride-1 convolutions with at most this many input and output channels compute their
#: output columns in pairs (see the module docstring).
CONV_PAIR_CHANNELS = 16


class ConvContext(NamedTuple):
    """What :func:`conv3d_backward` needs from :func:`conv3d_forward`."""

    x_cl: Any  # the input, channels-last (B, T, H, W, C)
    kept: Any  # the kept column matrix (strided im2col), the dense product's big weight matrix, or None
    plan: Any  # the dense per-frame plan, or None for im2col
    w: Any  # (O, C, kt, kh, kw)
    stride: tuple
    padding: tuple
    pairs: int  # output columns computed per row of columns (1 or 2)


def conv3d_forward(xp, x, w, kernel, stride, padding, out_size):
    """The convolution of x by w, without bias, by the fastest path that applies.

    Parameters
    ----------
    xp : namespace
        The array-API namespace of ``x`` and ``w``.
    x : array, shape (B, C, T, H, W)
    w : array, shape (O, C, kt, kh, kw)
    kernel, stride, padding, out_size : tuples of 3 ints
        Checked by the caller (:func:`nlref.nn.functional.conv3d_forward`).

    Returns
    -------
    out : array, shape (B, O, T', H', W'), stored channels-last on NumPy and CuPy
    context : ConvContext
        What :func:`conv3d_backward` needs.
    """
    x_cl = channels_last(x)
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
    return channels_first(xp, out), ConvContext(x_cl, kept, plan, w, stride, padding, pairs)


def conv3d_backward(xp, dout, context, *, input_grad=True, bias=False):
    """Gradients of :func:`conv3d_forward`, from its context.

    Parameters
    ----------
    xp : namespace
    dout : array, shape (B, O, T', H', W')
    context : ConvContext, from :func:`conv3d_forward`
    input_grad : bool
        False skips ``dx``.
    bias : bool
        Whether to return ``db``.

    Returns
    -------
    dx : array, shape (B, C, T, H, W), stored channels-last, or None without ``input_grad``
    dw : array, shape (O, C, kt, kh, kw)
    db : array, shape (O,), or None without ``bias``
    """
    x_cl, kept, plan, w, stride, padding, pairs = context
    kernel = tuple(w.shape[2:])
    o, c = w.shape[0], w.shape[1]
    d_cl = channels_last(dout)
    out_size = tuple(d_cl.shape[1:4])
    d2 = xp.reshape(d_cl, (math.prod(d_cl.shape[:4]), o))
    db = channel_sums(d2) if bias else None
    spatial = tuple(x_cl.shape[1:4])
    if plan is not None:
        dx, dw = _conv_dense_backward(xp, x_cl, d_cl, kept, plan, input_grad=input_grad)
        return None if dx is None else channels_first(xp, dx), _weight_from_matrix(xp, dw, kernel, c, o), db
    if _flips(kernel, stride, padding):
        dx, dw = _flipped_backward(xp, x_cl, d_cl, w, padding, pairs, input_grad=input_grad)
        return None if dx is None else channels_first(xp, dx), dw, db
    if kept is not None:  # dw (K C, O)
        dw = xp.matmul(xp.matrix_transpose(kept), d2)
    else:
        dw = _weight_grad(xp, x_cl, d2, kernel, stride, padding, out_size)
    dw = _weight_from_matrix(xp, dw, kernel, c, o)
    if not input_grad:
        return None, dw, db
    dx = _col2im(xp, xp.matmul(d2, xp.matrix_transpose(_weight_matrix(xp, w))), spatial, kernel, stride,
                 padding, out_size)
    return channels_first(xp, dx), dw, db


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
    xp = array_namespace(ids)
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


def _weight_matrix(xp, w):
    """w (O, C, kt, kh, kw) -> (kt kh kw C, O), rows in the order of the column matrix."""
    return xp.reshape(xp.permute_dims(w, (2, 3, 4, 1, 0)), (-1, w.shape[0]))


def _weight_from_matrix(xp, w2, kernel, c, o):
    """Inverse of :func:`_weight_matrix`: (kt kh kw C, O) -> (O, C, kt, kh, kw)."""
    return xp.permute_dims(xp.reshape(w2, tuple(kernel) + (c, o)), (4, 3, 0, 1, 2))


def _pointwise(kernel, stride, padding):
    """A 1x1x1 kernel with stride 1 and no padding: the input is its own column matrix."""
    return kernel == (1, 1, 1) and stride == (1, 1, 1) and padding == (0, 0, 0)


class _SpareBorders(threading.local):
    """Padded NumPy buffers handed back by :func:`_pad_cl`'s callers, by (shape, dtype, padding),
    at most :attr:`limit` of them (per thread), each of at most :attr:`max_bytes` (larger ones
    are left to the allocator). Their borders are still zero, so the next padding of that
    shape only copies the interior (writing borders runs along many short rows)."""

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
    inside = interior(x_cl.shape[1:4], padding, channels_last=True)
    if not supports_out(xp):
        xpad = xp.zeros(shape, dtype=x_cl.dtype, device=device(x_cl))
        xpad[inside] = x_cl
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
    xpad[inside] = x_cl
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
        itemsize = 8 if dtype_of(x_cl) == "float64" else 4
        self.step = _chunk(xp, self.batch, self.per * self.width * itemsize)
        self.keep = keep and self.batch * self.per * self.width * itemsize <= CONV_KEEP_BYTES
        self.kept = None

    def __iter__(self):
        xp, n_all = self.xp, self.batch * self.per
        if self.pointwise or not supports_out(xp):
            if self.pointwise:  # the input is its own column matrix
                cols = xp.reshape(self.xpad, (n_all, self.width))
            else:
                pieces = [self.xpad[strided(offset, self.out_size, self.stride, channels_last=True)]
                          for offset in window_offsets(self.kernel)]
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
    # each tap: the sum over its connections
    dw = xp.matmul(xp.matrix_transpose(asarray(joined, like=d, dtype=d.dtype)), dbig)
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
    if supports_out(xp):
        return _col2im_grouped(xp, dcols, bsz, c, spatial, kernel, stride, padding, out_size)
    dcols = xp.reshape(dcols, (bsz,) + tuple(out_size) + (k, c))
    padded = tuple(n + 2 * p for n, p in zip(spatial, padding))
    dpad = xp.zeros((bsz,) + padded + (c,), dtype=dcols.dtype, device=device(dcols))
    for i, offset in enumerate(window_offsets(kernel)):
        index = strided(offset, out_size, stride, channels_last=True)
        dpad[index] = dpad[index] + dcols[..., i, :]
    if padded == tuple(spatial):
        return dpad
    return xp.asarray(dpad[interior(spatial, padding, channels_last=True)], copy=True)


def _col2im_grouped(xp, dcols, bsz, c, spatial, kernel, stride, padding, out_size):
    """:func:`_col2im` on NumPy/CuPy, with the taps along W added a group at a time.

    The padded gradient's W axis is seen as groups of ``sw`` positions, (..., W / sw, sw C):
    tap ``a = sw q + r`` of output ``j`` lands in group ``j + q``, slot ``r``, so the taps
    ``sw q .. sw q + sw - 1``, adjacent in a row of ``dcols``, are one add of runs of up to
    ``sw C`` values into group ``j + q`` (``ceil(kw / sw)`` adds per (kt, kh) instead of
    ``kw``). Every position still gets its taps in increasing order, from zero: the same sums.
    """
    nat = native_namespace(xp)
    (kt, kh, kw), (st, sh, sw), (to, ho, wo) = kernel, stride, out_size
    d7 = dcols.reshape((bsz, to, ho, wo, kt, kh, kw * c))
    padded = tuple(n + 2 * p for n, p in zip(spatial, padding))
    reach = -(-kw // sw)  # groups one output's taps span
    groups = max(-(-padded[2] // sw), wo - 1 + reach)
    dpad = nat.zeros((bsz,) + padded[:2] + (groups, sw * c), dtype=dcols.dtype)
    for i, j, q in itertools.product(range(kt), range(kh), range(reach)):
        n = min(sw, kw - sw * q)  # taps in this group
        view = dpad[:, i:i + st * (to - 1) + 1:st, j:j + sh * (ho - 1) + 1:sh, q:q + wo, :n * c]
        nat.add(view, d7[:, :, :, :, i, j, sw * q * c:(sw * q + n) * c], out=view)
    full = dpad.reshape((bsz,) + padded[:2] + (groups * sw, c))
    if padded == tuple(spatial) and groups * sw == padded[2]:
        return full
    return nat.ascontiguousarray(full[(slice(None),) + tuple(slice(p, p + n) for p, n in zip(padding, spatial))])
