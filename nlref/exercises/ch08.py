"""Checks for the exercises of chapter 8, from the non-local block to the transformer.

Checks of code call the student's function on their own random float64 inputs and compare
with nlref's layers (:func:`nlref.nn.functional.layernorm_backward`,
:class:`nlref.nn.MultiHeadAttention`, :func:`nlref.nn.attention.sinusoidal_encoding`).
A function that still raises ``NotImplementedError`` (the student edition's placeholder)
counts as not answered: the check prints one line and returns None, like a ``None`` answer.
"""

from __future__ import annotations

import numpy as np

from . import _report, check_close, not_answered
from ._student import call

__all__ = ["LEVELS", "GRADED", "ex1", "ex2", "ex3", "ex4"]

#: Each exercise's level and time estimate in minutes (the teachers' page and the syllabus use them).
LEVELS = {"ex1": ("core", 20), "ex2": ("stretch", 45), "ex3": ("warm-up", 5), "ex4": ("warm-up", 10)}
#: The graded implementation exercises (the student writes a backward pass, checked against nlref's).
GRADED = ("ex1", "ex2")


def _parts(name, result, count):
    """The student's tuple of ``count`` arrays, or None (reported) when it is not one."""
    if not isinstance(result, (tuple, list)) or len(result) != count:
        _report(name, False, f"expected a tuple of {count} arrays, got {type(result).__name__}"
                + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
        return None
    return result


def ex1(answer, *, seed=0):
    """A student's ``layernorm_backward(dout, cache) -> (dx, dgamma, dbeta)``.

    ``cache`` is what :func:`nlref.nn.functional.layernorm_forward` returns:
    ``(x_hat, gamma, inv_std)``, with ``x_hat`` (..., D) and ``inv_std`` (..., 1). The
    check runs nlref's forward on random (2, 3, 5) inputs (gamma and beta random too), then on
    (7, 4) inputs (so that a function which sums over axes (0, 1) instead of every axis but the
    last fails), and compares each gradient with nlref's ``layernorm_backward``, ``rtol=1e-8``,
    ``atol=1e-10``.
    """
    from ..nn.functional import layernorm_backward, layernorm_forward

    name = "ch08 ex1"
    if not_answered(name, answer):
        return None
    rng = np.random.default_rng(seed)
    for shape in ((2, 3, 5), (7, 4)):
        x, gamma, beta, dout = (rng.standard_normal(s) for s in (shape, shape[-1:], shape[-1:], shape))
        _, cache = layernorm_forward(x, gamma, beta)
        state, mine = call(name, answer, dout, cache)
        if state is not True:
            return state
        mine = _parts(name, mine, 3)
        if mine is None:
            return False
        expected = layernorm_backward(dout, cache)
        for label, ours, theirs in zip(("dx", "dgamma", "dbeta"), mine, expected):
            if not check_close(f"{name} ({label}, x of shape {shape})", ours, theirs, rtol=1e-8, atol=1e-10):
                return False
    return _report(name, True)


def ex2(answer, *, seed=0, num_heads=2):
    """A student's ``mha_backward(x, params, num_heads, dout) -> dict of gradients``.

    ``x`` (B, N, E), ``params`` as the ``params`` of :class:`nlref.nn.attention.MultiHeadAttention`
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``), ``dout``
    (B, N, E). The answer is a dict with the keys ``"x"`` and every parameter name, each
    the gradient of ``sum(out * dout)``. Compared with ``MultiHeadAttention.backward`` on
    random (2, 4, 6) inputs (non-zero biases) with ``num_heads`` heads and then with 3 (or 1
    when ``num_heads`` is 3), so that a function which ignores ``num_heads`` fails,
    ``rtol=1e-8``, ``atol=1e-10``.
    """
    from ..nn.attention import MultiHeadAttention

    name = "ch08 ex2"
    if not_answered(name, answer):
        return None
    rng = np.random.default_rng(seed)
    for heads in (num_heads, 1 if num_heads == 3 else 3):
        mha = MultiHeadAttention(6, heads, dtype="float64", seed=seed)
        mha.params["in_proj_bias"] = 0.3 * rng.standard_normal(18)
        mha.params["out_proj.bias"] = 0.3 * rng.standard_normal(6)
        x, dout = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 4, 6))
        state, mine = call(name, answer, x, mha.params, heads, dout)
        if state is not True:
            return state
        mha.forward(x)
        expected = {"x": mha.backward(dout), **mha.grads}
        if not isinstance(mine, dict) or set(mine) != set(expected):
            got = sorted(mine, key=repr) if isinstance(mine, dict) else type(mine).__name__
            return _report(name, False, f"expected a dict with the keys {sorted(expected)}, got {got}")
        for key, value in expected.items():
            if not check_close(f"{name} ({key}, {heads} heads)", mine[key], value, rtol=1e-8, atol=1e-10):
                return False
    return _report(name, True)


def ex3(answer):
    """The number of parameters of ``MultiHeadAttention(64, 8)`` (with biases).

    Expected: counted from nlref's layer, ``4 E^2 + 4 E = 16640`` for E = 64, whatever the
    number of heads (exact).
    """
    from ..nn.attention import MultiHeadAttention

    name = "ch08 ex3"
    if not_answered(name, answer):
        return None
    expected = sum(int(np.prod(v.shape)) for v in MultiHeadAttention(64, 8).params.values())
    return check_close(name, answer, expected, rtol=0.0)


def ex4(answer):
    """A student's ``sinusoidal(length, dim)``: the (length, dim) table of Vaswani et al. (2017).

    ``PE[p, 2i] = sin(p / 10000 ** (2i / dim))``, ``PE[p, 2i + 1] = cos(...)``. Compared with
    :func:`nlref.nn.attention.sinusoidal_encoding` for (length, dim) = (12, 8) and (5, 2),
    ``rtol=1e-10``, ``atol=1e-12``.
    """
    from ..nn.attention import sinusoidal_encoding

    name = "ch08 ex4"
    if not_answered(name, answer):
        return None
    for length, dim in ((12, 8), (5, 2)):
        state, mine = call(name, answer, length, dim)
        if state is not True:
            return state
        ok = check_close(f"{name} (length {length}, dim {dim})", mine, sinusoidal_encoding(length, dim),
                         rtol=1e-10, atol=1e-12)
        if not ok:
            return False
    return _report(name, True)
