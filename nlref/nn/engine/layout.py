"""Storage orders and per-channel passes: channels-last activations and batch norm's row fold.

A network's activations are kept *stored* channels-last (a (B, C, T, H, W) array that is
a transposed view of a contiguous (B, T, H, W, C) one, like PyTorch's
``channels_last_3d``), because that is the order the convolution's column copy reads
fastest (see :mod:`nlref.nn.engine.conv`). Elementwise layers work in the order they are
given, since mixing orders in one operation is slow.
"""

from __future__ import annotations

import math

import numpy as np

from ...backend import array_namespace, device, native_namespace, supports_out
from .elementwise import multiply


def stored_channels_last(x):
    """True when ``x`` (B, C, ...) is stored channels-last (a NumPy/CuPy view of a (B, ..., C) array)."""
    xp = array_namespace(x)
    if not supports_out(xp) or x.ndim < 3 or x.flags.c_contiguous:
        return False
    return xp.permute_dims(x, (0,) + tuple(range(2, x.ndim)) + (1,)).flags.c_contiguous


def channels_last(x):
    """x (B, C, ...) -> (B, ..., C) contiguous: a view when x is stored channels-last, a copy otherwise."""
    axes = (0,) + tuple(range(2, x.ndim)) + (1,)
    if type(x) is np.ndarray:  # the common case, without the wrappers' overhead (see "Less per call")
        return np.ascontiguousarray(x.transpose(axes))
    xp = array_namespace(x)
    view = xp.permute_dims(x, axes)
    return native_namespace(xp).ascontiguousarray(view) if supports_out(xp) else view


def channels_first(xp, a):
    """(B, ..., C) -> the (B, C, ...) view of it."""
    perm = (0, a.ndim - 1) + tuple(range(1, a.ndim - 1))
    return a.transpose(perm) if type(a) is np.ndarray else xp.permute_dims(a, perm)


def channel_sums(a):
    """Per-channel sums of a channels-last matrix ``a`` (M, C) -> (C,).

    On NumPy and CuPy a matrix-vector product with ones: summing down the rows of a
    narrow matrix is a slow reduction there.
    """
    xp = array_namespace(a)
    if not supports_out(xp):
        return xp.sum(a, axis=0)
    if isinstance(a, np.ndarray):  # the same product, without the wrappers' overhead
        return np.matmul(np.ones(a.shape[0], dtype=a.dtype), a)
    return xp.matmul(xp.ones(a.shape[0], dtype=a.dtype, device=device(a)), a)


def row_fold(x):
    """How :class:`ChannelRows` lays ``x`` out: 0 for (B, C, N); for an ``x`` stored
    channels-last, ``r`` >= 1 positions per row of an (M / r, r C) matrix.

    Folding ``r`` positions into a row makes every broadcast of a per-channel value a
    long inner loop (``r C``, up to 1024 values, instead of ``C``).
    """
    if not stored_channels_last(x):
        return 0
    c = x.shape[1]
    positions = math.prod(x.shape) // c if c else 0
    return next(r for r in range(max(1, 1024 // max(c, 1)), 0, -1) if positions % r == 0)


class ChannelRows:
    """The values of a (B, C, ...) array as a matrix in which every column belongs to one channel.

    For an array stored the usual way that is the (B, C, N) view (the channel axis in the
    middle); for one stored channels-last, the (M / r, r C) view of its storage, ``r``
    positions to a row (:func:`row_fold`), so that no copy is made either way and per-channel
    broadcasts run along long rows. :meth:`sums` and :meth:`spread` go between per-channel
    (C,) vectors and that matrix, :meth:`restore` goes back to (B, C, ...), stored as given.
    :meth:`sums_of_products` keeps its product as a spare buffer (NumPy, CuPy) that the next
    :meth:`scaled` writes into: one activation-sized allocation fewer.

    Parameters
    ----------
    x : array, shape (B, C, ...)
        The array whose shape and storage order fix the layout.
    """

    def __init__(self, x):
        self.shape = tuple(x.shape)
        self.fold = row_fold(x)
        self.count = self.shape[0] * math.prod(self.shape[2:])  # M = B N values per channel
        self._spare = None

    def matrix(self, a):
        """``a`` (of the layout's shape) as the matrix; a view where the storage allows."""
        xp = array_namespace(a)
        if self.fold:
            return xp.reshape(channels_last(a), (-1, self.fold * self.shape[1]))
        return xp.reshape(a, (a.shape[0], a.shape[1], math.prod(a.shape[2:])))

    def sums(self, a):
        """Per-channel sums (C,) of the matrix ``a``."""
        xp = array_namespace(a)
        if self.fold:
            sums = channel_sums(a)
            if type(sums) is np.ndarray:  # NumPy without the wrappers: the same sum
                return sums.reshape(self.fold, -1).sum(axis=0)
            return xp.sum(xp.reshape(sums, (self.fold, -1)), axis=0)
        return xp.sum(a, axis=(0, 2))

    def sums_of_products(self, a, b):
        """Per-channel sums (C,) of ``a * b`` (matrices); the product is kept for :meth:`scaled`."""
        products = a * b
        self._spare = products if supports_out(array_namespace(products)) else None
        return self.sums(products)

    def scaled(self, a, v):
        """``a * spread(v)``, written into the spare product of :meth:`sums_of_products` if one is left."""
        spare, self._spare = self._spare, None
        return multiply(a, self.spread(v), into=spare)

    def spread(self, v):
        """Per-channel values (C,) broadcast against the matrix."""
        if not self.fold:
            return v[:, None]
        if supports_out(array_namespace(v)):  # NumPy/CuPy: the same values as ``tile``, fewer calls
            return v[None].repeat(self.fold, axis=0).reshape(-1)
        return array_namespace(v).tile(v, (self.fold,))

    def restore(self, a):
        """The matrix ``a`` back as (B, C, ...), stored as the layout's array was."""
        xp = array_namespace(a)
        shape = self.shape
        if self.fold:
            return channels_first(xp, xp.reshape(a, (shape[0],) + tuple(shape[2:]) + (shape[1],)))
        return xp.reshape(a, shape)
