"""Elementwise steps written into arrays the caller owns (NumPy and CuPy), the same values otherwise.

Each function takes an array that is a fresh temporary no one else holds and, where the library
writes into existing arrays (``out=``), writes the result into it: one activation-sized
allocation fewer per call. On other array-API libraries it computes the same thing the
ordinary way.
"""

from __future__ import annotations

from ...backend import array_namespace, device, native_namespace, supports_out


def add_owned(a, b):
    """a + b, written into ``a`` (a fresh array no one else holds) where the library allows."""
    xp = array_namespace(a, b)
    if supports_out(xp):
        return native_namespace(xp).add(a, b, out=a)
    return a + b


def relu_owned(a):
    """max(a, 0), written into ``a`` (a fresh array no one else holds) where the library allows.

    The network applies ReLU this way to its own batch-norm outputs.
    """
    xp = array_namespace(a)
    if supports_out(xp):
        return native_namespace(xp).maximum(a, 0, out=a)
    return xp.maximum(a, xp.zeros((), dtype=a.dtype, device=device(a)))  # as functional.relu_forward


def multiply(a, b, *, into=None):
    """a * b, written into ``into`` (a fresh temporary of the result's shape, no longer needed)
    where the library allows."""
    if into is not None and supports_out(array_namespace(a)):
        return native_namespace(array_namespace(a)).multiply(a, b, out=into)
    return a * b


def exp_inplace(xp, a):
    """exp(a), overwriting ``a`` where the library allows it (``a`` must be a fresh temporary)."""
    if supports_out(xp):
        return native_namespace(xp).exp(a, out=a)
    return xp.exp(a)
