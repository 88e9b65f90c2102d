"""Argument checks and window indexing shared by :mod:`nlref.nn.functional` and :mod:`nlref.nn.engine`.

Nothing here computes a layer: it checks what a layer is given (raising ``TypeError`` /
``ValueError`` that name the argument, the value and what is allowed, before any heavy
work) and builds the slices that pick one offset of every window out of a padded array. One
numerical rule is here too, because both normalisations' textbook passes and the fused ones
apply it: ``mean_exact_if_constant``.
"""

from __future__ import annotations

import itertools
import math
import numbers
import operator

from ..backend import device, dtype_name


def check_number(name, value, *, low, strict=False):
    """A finite real ``value`` >= ``low`` (> ``low`` with ``strict``); else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < low or (strict and value == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")


def check_int(name, value, *, low):
    """An int ``value`` >= ``low`` (not a bool); else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def dtype_of(a):
    """The standard name of ``a``'s dtype (``"float32"`` for every library's float32)."""
    return dtype_name(a.dtype)


def check_float(func, xp, **arrays):
    """Every array in ``arrays`` real floating and all of one dtype (TypeError otherwise)."""
    dtypes = {}
    for name, a in arrays.items():
        if a is None:
            continue
        if dtype_of(a) not in ("float32", "float64") and not xp.isdtype(a.dtype, "real floating"):
            raise TypeError(f"{func}: {name} must be a float32 or float64 array, got dtype {dtype_of(a)}")
        dtypes[name] = dtype_of(a)
    if len(set(dtypes.values())) > 1:
        described = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"{func}: arrays must share one dtype ({described}); convert them first")


_LARGEST = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38, "float64": 1.7976931348623157e308}


def _largest(a):
    """The largest finite value of ``a``'s dtype, for the messages below."""
    return _LARGEST.get(dtype_of(a), math.inf)


def check_scores_overflow(func, xp, rows, **inputs):
    """ValueError where a per-row statistic of softmax scores (their maximum, or the sum of
    ``exp(s - max)``) is not finite although every array in ``inputs`` is: the products
    ``theta . phi`` (``q . k``) overflowed the dtype, and each such row would be NaN without a
    word. Non-finite inputs are left to spread as they do in PyTorch (NaN in, NaN out).
    """
    if bool(xp.all(xp.isfinite(rows))) or not all(bool(xp.all(xp.isfinite(a))) for a in inputs.values()):
        return
    names = " and ".join(inputs)
    raise ValueError(f"{func}: the softmax scores of the finite {names} overflow {dtype_of(rows)} (a score beyond "
                     f"{_largest(rows):.3g} in magnitude), so a row of the attention would be NaN; scale {names} "
                     f"down, or compute in float64")


def mean_exact_if_constant(xp, x, mean, var, count, axis, keepdims=False):
    r"""``mean`` with a constant row's mean made its value, exactly; None where no row can be constant.

    :math:`\sum x / M` rounds: for twelve float32 copies of 10000.3 it is off by half a unit in
    the last place, and :math:`(x - \mu)/\sqrt{\sigma^2 + \epsilon}` of the rounding came out
    0.3 with ``eps=1e-5`` and 1.0 with ``eps=1e-30``, where the definition (and PyTorch's layer
    norm) gives exactly 0. A sum of ``count`` values is off by at most ``count`` units of
    rounding, so only a row whose variance is within that of 0, :math:`\sigma^2 \le (2 M u
    \mu)^2`, can be constant: only then are its maximum and minimum read (two more passes
    over ``x``, which would otherwise cost every call). Rows that are not constant keep
    ``mean`` unchanged.
    """
    u = float(xp.finfo(mean.dtype).eps)
    if not bool(xp.any(var <= (2.0 * count * u * mean) ** 2)):
        return None
    top = xp.max(x, axis=axis, keepdims=keepdims)
    return xp.where(top == xp.min(x, axis=axis, keepdims=keepdims), top, mean)


def check_variance_overflow(func, xp, inv_std, of):
    """ValueError where ``inv_std = 1 / sqrt(var + eps)`` is exactly 0: the variance overflowed the
    dtype (``(x - mean)^2`` beyond its largest value, from finite ``x``), and ``x_hat`` would be 0
    without a word. (An inf or NaN in ``x`` makes the variance NaN, not infinite, and spreads as NaN.)
    """
    if bool(xp.any(inv_std == 0)):
        raise ValueError(f"{func}: the variance of {of} of x overflows {dtype_of(inv_std)} ((x - mean)^2 beyond "
                         f"{_largest(inv_std):.3g}), so x_hat would be 0 instead of x's normalised values; scale x "
                         f"down (the normalised values do not depend on x's scale), or compute in float64")


def triple(value, name, func, *, minimum):
    """An int or a 3-sequence of ints, each >= ``minimum`` -> a tuple of 3 Python ints."""
    items = (value,) * 3 if not isinstance(value, (tuple, list)) else tuple(value)
    ok = len(items) == 3 and all(
        not isinstance(v, bool) and hasattr(v, "__index__") and operator.index(v) >= minimum for v in items)
    if not ok:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{func}: {name} must be a {kind} int or a 3-tuple of {kind} ints, got {value!r}")
    return tuple(operator.index(v) for v in items)


def check_grad(func, grad, shape, name="dout", *, like=None):
    """Error unless the upstream gradient ``grad`` is an array of ``shape``, the forward's output shape,
    and (given ``like``, an array the forward kept) of ``like``'s dtype.

    No broadcasting: a (1, ...) gradient against a (B, ...) output would give a
    gradient of the right shape and the wrong value. No mixing of dtypes: a float64
    gradient would make a float32 layer's gradients float64, and a float32 one would
    round a float64 layer's.
    """
    got = getattr(grad, "shape", None)
    if got is None:
        raise TypeError(f"{func}: {name} must be an array of the forward output's shape {tuple(shape)}, "
                        f"got {type(grad).__name__}")
    if tuple(got) != tuple(shape):
        raise ValueError(f"{func}: {name} must have the forward output's shape {tuple(shape)}, got {tuple(got)}")
    if like is not None and dtype_of(grad) != dtype_of(like):
        raise TypeError(f"{func}: {name} must have the forward's dtype, {dtype_of(like)}; got {dtype_of(grad)} "
                        "(it would change the dtype of the gradients); convert it first")


def check_batchnorm(x, gamma, beta, state, momentum, eps):
    """batchnorm_forward's arguments: x with a channel axis, gamma, beta and the running statistics of
    shape (C,) in the ``state`` dict, ``momentum`` in [0, 1] and ``eps`` > 0."""
    func = "batchnorm_forward"
    if x.ndim < 2:
        raise ValueError(f"{func}: x must have shape (B, C, ...) (at least 2 axes), got shape {tuple(x.shape)}")
    channels = (x.shape[1],)
    if not isinstance(state, dict) or not {"running_mean", "running_var"} <= state.keys():
        raise TypeError(f"{func}: state must be a dict holding 'running_mean' and 'running_var', got "
                        f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    for name, a in (("gamma", gamma), ("beta", beta), ("state['running_mean']", state["running_mean"]),
                    ("state['running_var']", state["running_var"])):
        if tuple(getattr(a, "shape", ())) != channels:
            raise ValueError(f"{func}: {name} must have shape {channels} (one per channel of x), "
                             f"got {tuple(getattr(a, 'shape', ()))}")
    check_number(f"{func}: momentum", momentum, low=0)
    if momentum > 1:
        raise ValueError(f"{func}: momentum must be in [0, 1], got {momentum!r}")
    check_number(f"{func}: eps", eps, low=0, strict=True)


def check_5d(func, x, name="x"):
    """ValueError unless ``x`` has the five axes (B, C, T, H, W)."""
    if x.ndim != 5:
        raise ValueError(f"{func}: {name} must have shape (B, C, T, H, W) (5 axes), got shape {tuple(x.shape)}")


def output_size(func, spatial, kernel, stride, padding):
    """PyTorch's output size, ``floor((n + 2p - k) / s) + 1`` per axis; ValueError if it is < 1."""
    size = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(spatial, kernel, stride, padding))
    if min(size) < 1:
        padded = tuple(n + 2 * p for n, p in zip(spatial, padding))
        raise ValueError(f"{func}: the padded input's spatial shape {padded} is smaller than the kernel {kernel}")
    return size


def conv_params(func, xp, x, w, b, stride, padding):
    """Validated (kernel, stride, padding, out_size) of a 3-D convolution of ``x`` by ``w`` (+ ``b``)."""
    check_5d(func, x)
    check_float(func, xp, x=x, w=w, b=b)
    if w.ndim != 5 or w.shape[1] != x.shape[1]:
        raise ValueError(f"{func}: w must have shape (O, C, kt, kh, kw) with C = x.shape[1] = {x.shape[1]}, "
                         f"got shape {tuple(w.shape)}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{func}: b must have shape ({w.shape[0]},) (one bias per output channel), "
                         f"got shape {tuple(b.shape)}")
    stride = triple(stride, "stride", func, minimum=1)
    padding = triple(padding, "padding", func, minimum=0)
    kernel = tuple(int(k) for k in w.shape[2:])
    if min(kernel) < 1:
        raise ValueError(f"{func}: w has an empty kernel {kernel}")
    return kernel, stride, padding, output_size(func, tuple(x.shape[2:]), kernel, stride, padding)


def check_linear(func, xp, x, w, b):
    """x (B, F), w (O, F), b (O,) or None, all of one float dtype (ValueError / TypeError otherwise)."""
    check_float(func, xp, x=x, w=w, b=b)
    if x.ndim != 2:
        raise ValueError(f"{func}: x must have shape (B, F), got shape {tuple(x.shape)}")
    if w.ndim != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"{func}: w must have shape (O, F) with F = x.shape[1] = {x.shape[1]}, "
                         f"got shape {tuple(w.shape)}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{func}: b must have shape ({w.shape[0]},), got shape {tuple(b.shape)}")


def check_labels(func, xp, logits, labels):
    """Float logits (B, K) and integer labels (B,) in [0, K) (ValueError / TypeError otherwise)."""
    check_float(func, xp, logits=logits)
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"{func}: logits must have shape (B, K) with B, K >= 1, got shape {tuple(logits.shape)}")
    bsz, k = logits.shape
    if tuple(labels.shape) != (bsz,):
        raise ValueError(f"{func}: labels must have shape ({bsz},) (one class index per row of logits), "
                         f"got shape {tuple(labels.shape)}")
    if not xp.isdtype(labels.dtype, "integral"):
        raise ValueError(f"{func}: labels must be integer class indices, got dtype {dtype_of(labels)}")
    low, high = int(xp.min(labels)), int(xp.max(labels))
    if low < 0 or high >= k:
        bad = low if low < 0 else high
        raise ValueError(f"{func}: labels must lie in [0, {k}) for {k} classes, got {bad}")


def check_pool_kernel(x, kernel):
    """The non-local block's pooling kernel, one positive size per spatial axis of x and no larger
    than it, as a tuple of ints (ValueError otherwise)."""
    kernel = tuple(int(k) for k in kernel)
    if len(kernel) != x.ndim - 2 or min(kernel) < 1:
        raise ValueError(f"kernel must hold one positive size per spatial axis of x (shape {tuple(x.shape)}), "
                         f"got {kernel}")
    if any(n < k for n, k in zip(x.shape[2:], kernel)):
        raise ValueError(f"maxpool_forward: spatial shape {tuple(x.shape[2:])} is smaller than the kernel {kernel}")
    return kernel


def check_spatial(func, xp, x):
    """A float ``x`` of shape (B, C, *S) with at least one spatial axis (ValueError / TypeError otherwise)."""
    if x.ndim < 3:
        raise ValueError(f"{func}: x must have shape (B, C, *S) with at least one spatial axis, "
                         f"got shape {tuple(x.shape)}")
    check_float(func, xp, x=x)


def check_dropout(xp, x, p, seed, training):
    """A probability ``p`` in [0, 1), a float ``x``, and an int ``seed`` when training with p > 0."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"dropout_forward: p must be a probability in [0, 1), got {p!r}")
    check_float("dropout_forward", xp, x=x)
    if training and p != 0 and (isinstance(seed, bool) or not hasattr(seed, "__index__")):
        raise TypeError(f"dropout_forward: seed must be an int when training with p > 0, got {seed!r}")
    if training and p != 0 and seed.__index__() < 0:
        raise ValueError(f"dropout_forward: seed must be an int >= 0, got {seed!r}")


def pool_params(func, x, kernel, stride, padding):
    """Validated (kernel, stride, padding, out_size) for a (B, C, T, H, W) pool, PyTorch's rules."""
    check_5d(func, x)
    kernel = triple(kernel, "kernel", func, minimum=1)
    stride = kernel if stride is None else triple(stride, "stride", func, minimum=1)
    padding = triple(padding, "padding", func, minimum=0)
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError(f"{func}: padding {padding} must be at most half the kernel {kernel} on every axis "
                         "(PyTorch's rule: every window must overlap the input)")
    return kernel, stride, padding, output_size(func, tuple(x.shape[2:]), kernel, stride, padding)


def window_offsets(kernel):
    """The ``prod(kernel)`` offsets inside a window, in row-major order."""
    return list(itertools.product(*(range(k) for k in kernel)))


def strided(offset, out_size, stride, *, channels_last=False):
    """Index selecting, for one offset inside the window, that sample of every window:
    ``xpad[strided(...)]`` has shape (B, C, *out_size), or (B, *out_size, C) ``channels_last``."""
    return _full_index(tuple(slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, out_size, stride)),
                       channels_last)


def interior(spatial, padding, *, channels_last=False):
    """Index of the unpadded input inside the padded array."""
    return _full_index(tuple(slice(p, p + n) for n, p in zip(spatial, padding)), channels_last)


def _full_index(spatial_index, channels_last):
    """Slices of the spatial axes -> an index of the whole array: after (B, C), or between B and C."""
    if channels_last:
        return (slice(None),) + spatial_index + (slice(None),)
    return (slice(None), slice(None)) + spatial_index


def pad(xp, x, padding, value=0.0):
    """x (B, C, T, H, W) padded by ``padding`` on both sides of each spatial axis with ``value``."""
    if not any(padding):
        return x
    shape = tuple(x.shape[:2]) + tuple(n + 2 * p for n, p in zip(x.shape[2:], padding))
    xpad = xp.full(shape, value, dtype=x.dtype, device=device(x))
    xpad[interior(x.shape[2:], padding)] = x
    return xpad
