"""Pooling steps done in place, branch-free, into reused buffers (NumPy and CuPy).

:mod:`nlref.nn.functional` writes each of these layers as a portable loop over the window's
offsets; where the library writes into existing arrays (``out=``) it calls the functions
here, which take the same steps in the same order (the same numbers to the bit) without a
fresh temporary per offset and without data-dependent branches (figures: ``docs/engine.md``).
"""

from __future__ import annotations

from ...backend import array_namespace, native_namespace, supports_out
from .._shapes import strided


def add_at(a, index, part):
    """``a[index] += part`` (``a`` is changed), in place on a view where the library allows."""
    xp = array_namespace(a)
    if supports_out(xp):
        view = a[index]
        native_namespace(xp).add(view, part, out=view)
    else:
        a[index] = a[index] + part
    return a


def running_max(x, xpad, offsets, out_size, stride, arg_dtype):
    """:func:`nlref.nn.functional.maxpool3d_forward`'s scan over the window offsets, in place.

    The same steps as branch-free arithmetic into preallocated buffers (no masked copies):
    offsets come in increasing order, so "arg = k where better" is
    arg = max(arg, k * better), and the new maximum is max(out, sample). Returns the
    maximum ``out`` and the winning offset ``arg`` of every window.
    """
    nat = native_namespace(array_namespace(x))
    out = nat.array(xpad[strided(offsets[0], out_size, stride)], copy=True)
    arg = nat.zeros(out.shape, dtype=arg_dtype)
    has_nan = bool(nat.any(nat.isnan(x)))  # one pass over x instead of one per offset
    better = nat.empty(out.shape, dtype=bool)
    candidate = nat.empty(out.shape, dtype=arg.dtype)
    for k, offset in enumerate(offsets[1:], start=1):
        sample = xpad[strided(offset, out_size, stride)]
        nat.greater(sample, out, out=better)
        if has_nan:
            better |= nat.isnan(sample)
        nat.multiply(better, k, out=candidate)
        nat.maximum(arg, candidate, out=arg)
        nat.maximum(out, sample, out=out)  # NaN propagates, as in PyTorch
    return out, arg


def winner_gradients(dout, arg):
    """``k -> where(arg == k, dout, 0)`` for :func:`nlref.nn.functional.maxpool3d_backward`, into
    reused buffers.

    With a finite ``dout`` the routing is a product with the 0/1 mask (branch-free); an inf
    or NaN in ``dout`` keeps ``where``, so that ``inf * 0`` puts no NaN beside the winner.
    """
    nat = native_namespace(array_namespace(dout))
    if bool(nat.all(nat.isfinite(dout))):
        won, part = nat.empty(arg.shape, dtype=bool), nat.empty(dout.shape, dtype=dout.dtype)

        def product(k):
            nat.equal(arg, k, out=won)
            return nat.multiply(dout, won, out=part)

        return product
    zero = nat.zeros((), dtype=dout.dtype)
    return lambda k: nat.where(arg == k, dout, zero)

