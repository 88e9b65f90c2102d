"""Checks for the exercises of chapter 6, the convolution's backward pass (notebook 06).

Each ``exK(answer)`` computes the expected value with nlref itself and reports through
:mod:`nlref.exercises`: ``None`` while the answer is the placeholder ``None``, ``True`` when
it is right, ``False`` (with one line saying what is wrong) otherwise. A function given
as an answer is called on fresh random inputs; if it raises, that is a wrong answer too.
"""

from __future__ import annotations

import numpy as np

from . import _got, _real, _report, _shown, _shape_hint, check_close, check_true, not_answered
from . import _graded
from ._graded import attempt, compare, numerical_gradient, verdict
from ._student import call, entries
from ..nn import functional as F

__all__ = ["LEVELS", "GRADED", "EX1", "EX3", "CASES", "ex1", "ex2", "ex3", "ex4", "ex6", "ex7"]

#: Each exercise's level and time estimate in minutes (exercise 5 is a reading question without a check).
LEVELS = {"ex1": ("warm-up", 10), "ex2": ("core", 30), "ex3": ("warm-up", 10), "ex4": ("core", 20),
          "ex5": ("stretch", 30), "ex6": ("core", 30), "ex7": ("core", 45)}
#: The graded implementation exercises (the student writes a function, checked against nlref
#: and, for a backward pass, against finite differences).
GRADED = ("ex6", "ex7")

#: Exercise 1's convolution (input shape, weight shape, stride, padding).
EX1 = {"x": (2, 3, 5, 10, 9), "w": (4, 3, 3, 3, 2), "stride": (1, 2, 3), "padding": (1, 1, 2)}
#: Exercise 3's layer, res2 of the default network in a training step (input (B, C, T, H, W), O, kernel).
EX3 = {"x": (32, 16, 8, 8, 8), "out_channels": 16, "kernel": (1, 3, 3)}


def ex1(answer):
    """The output shape (B, O, T', H', W') of :data:`EX1`'s convolution, as a tuple of 5 ints."""
    x = np.zeros(EX1["x"])
    w = np.zeros(EX1["w"])
    out, _ = F.conv3d_reference(x, w, stride=EX1["stride"], padding=EX1["padding"])
    if not_answered("ch06 ex1", answer):
        return None
    counts = entries(answer, ordered=True)  # None for a str or a 0-d array (whose iteration raises)
    if counts is None or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in counts):
        # int() would truncate 5.5 to 5: the floor is the point of the exercise
        return check_true("ch06 ex1", answer, False, f"expected a tuple of 5 ints, got {_shown(answer)}")
    shape = tuple(int(n) for n in counts)
    return check_true("ch06 ex1", answer, shape == tuple(out.shape),
                      f"shape {_shown(shape)} is not the output's; recall floor((n + 2p - k) / s) + 1 per axis")


def _array(name, fn, shape, layout, *args):
    """``fn`` called on ``args`` through ``_student.call`` (copies, never raising), as a float64 NumPy
    array of ``shape``: ``(True, array, the dtype it came in)``, or ``(False or None, None, None)`` once
    reported."""
    ok, result = call(name, fn, *args)
    if not ok:
        return ok, None, None
    try:
        a, dtype = _real(result)
    except (TypeError, ValueError) as why:
        return _report(name, False, f"expected an array, {_got(why)}"), None, None
    if a.shape != tuple(shape):
        return _report(name, False, f"shape {a.shape}, expected {layout} = {tuple(shape)}"
                                    f"{_shape_hint(a.shape, tuple(shape))}"), None, None
    return True, a, dtype


def _in(dtype, values):
    """``values`` (float64) in the student's float ``dtype``, so that check_close allows a float32 answer
    float32's rounding (nothing else changes: float64 stays, any other dtype is compared as float64)."""
    return values.astype(np.float32) if dtype == np.float32 else values


def ex2(answer):
    """``dw(x, dout, kernel, stride, padding)``: the weight gradient (O, C, kt, kh, kw), checked
    against :func:`nlref.nn.functional.conv3d_reference_backward` on two random convolutions, one
    with a 3-tuple stride and padding, one with an int stride and padding (the exercise allows both)."""
    if not_answered("ch06 ex2", answer):
        return None
    rng = np.random.default_rng(72)
    got, expected = [], []
    for xs, ws, stride, padding in [((2, 3, 3, 5, 6), (4, 3, 2, 3, 2), (1, 2, 3), (1, 2, 0)),
                                    ((1, 2, 2, 4, 4), (3, 2, 1, 3, 3), 1, 1)]:
        x, w = rng.standard_normal(xs), rng.standard_normal(ws)
        out, cache = F.conv3d_reference(x, w, stride=stride, padding=padding)
        dout = rng.standard_normal(out.shape)
        ok, dw, dtype = _array("ch06 ex2", answer, ws, "(O, C, kt, kh, kw)", x, dout, tuple(ws[2:]), stride,
                               padding)
        if not ok:
            return ok
        got.append(_in(dtype, dw.reshape(-1)))
        expected.append(F.conv3d_reference_backward(dout, cache)[1].reshape(-1))
    return check_close("ch06 ex2", np.concatenate(got), np.concatenate(expected), rtol=1e-9, atol=1e-9)


def ex3(answer):
    """The number of bytes of :data:`EX3`'s float32 column matrix (B T' H' W' rows, kt kh kw C columns)."""
    b, c, t, h, w = EX3["x"]
    kt, kh, kw = EX3["kernel"]
    rows = b * t * h * w  # padding k // 2, stride 1: the maps keep their size
    return check_close("ch06 ex3", answer, rows * kt * kh * kw * c * 4, rtol=0)


def ex4(answer):
    """``flip(w)``: the kernel (C, O, kt, kh, kw) with which the stride-1 input gradient is a full
    correlation, ``dx = conv3d_reference(dout, flip(w), padding=k - 1 - p)``, checked on two cases."""
    if not_answered("ch06 ex4", answer):
        return None
    rng = np.random.default_rng(74)
    got, expected = [], []
    for xs, ws, padding in [((2, 3, 3, 5, 6), (4, 3, 2, 3, 2), (0, 1, 1)),
                            ((1, 2, 4, 4, 4), (3, 2, 3, 3, 3), (1, 1, 1))]:
        x, w = rng.standard_normal(xs), rng.standard_normal(ws)
        out, cache = F.conv3d_reference(x, w, padding=padding)
        dout = rng.standard_normal(out.shape)
        ok, flipped, dtype = _array("ch06 ex4", answer, (ws[1], ws[0]) + tuple(ws[2:]), "(C, O, kt, kh, kw)", w)
        if not ok:
            return ok
        full = tuple(k - 1 - p for k, p in zip(ws[2:], padding))
        got.append(_in(dtype, F.conv3d_reference(dout, flipped, padding=full)[0].reshape(-1)))
        expected.append(F.conv3d_reference_backward(dout, cache)[0].reshape(-1))
    return check_close("ch06 ex4", np.concatenate(got), np.concatenate(expected), rtol=1e-9, atol=1e-9)


#: The convolutions that exercises 6 and 7 are checked on, as (x shape, w shape, stride, padding). The
#: first has a different stride and a different padding on each axis, so that a function reading them
#: in another order (W, H, T, or H and W swapped) fails: (1, 2, 1) and (0, 1, 1) read backwards were the same.
CASES = [((2, 3, 3, 5, 6), (4, 3, 2, 3, 2), (1, 2, 3), (1, 2, 0)),
         ((1, 2, 4, 4, 4), (3, 2, 3, 3, 3), 1, 1)]


def _cases(seed):
    rng = np.random.default_rng(seed)
    for xs, ws, stride, padding in CASES:
        yield (rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[0]), stride, padding)


def ex6(answer):
    """``conv3d_naive(x, w, bias, stride, padding)``: the convolution one output position at a time.

    Graded (core, about 30 minutes). Compared with :func:`nlref.nn.functional.conv3d_reference`
    on :data:`CASES` (``stride`` and ``padding`` are ints or 3-tuples).
    """
    def run():
        ok = True
        for x, w, bias, stride, padding in _cases(76):
            out = attempt("ch06 ex6", answer, x, w, bias, stride, padding)
            expected, _ = F.conv3d_reference(x, w, bias, stride=stride, padding=padding)
            ok &= compare(f"out, stride {stride}", out, expected)
        return ok
    return verdict("ch06 ex6", run)


def ex7(answer):
    """``conv3d_naive_backward(dout, x, w, stride, padding)`` returning ``(dx, dw, dbias)``.

    Graded (core, about 45 minutes). Each gradient is compared with
    :func:`nlref.nn.functional.conv3d_reference_backward` and with centred finite differences of
    the forward pass (on the second, smaller case).
    """
    def run():
        ok = True
        for n, (x, w, bias, stride, padding) in enumerate(_cases(77)):
            out, cache = F.conv3d_reference(x, w, bias, stride=stride, padding=padding)
            dout = np.random.default_rng(n).standard_normal(out.shape)
            grads = attempt("ch06 ex7", answer, dout, x, w, stride, padding)
            if not isinstance(grads, (tuple, list)) or len(grads) != 3:
                raise _graded.Wrong(f"expected a tuple (dx, dw, dbias), got {type(grads).__name__}")
            expected = F.conv3d_reference_backward(dout, cache)
            for label, got, want in zip(("dx", "dw", "dbias"), grads, expected):
                ok &= compare(f"{label} (vs nlref), case {n + 1}", got, want)
            if n == 1:
                def forward(**kw):
                    args = {"x": x, "w": w, "b": bias} | kw
                    return F.conv3d_reference(args["x"], args["w"], args["b"], stride=stride,
                                              padding=padding)[0]
                for label, got, name, value in zip(("dx", "dw", "dbias"), grads, ("x", "w", "b"), (x, w, bias)):
                    numeric = numerical_gradient(lambda v: forward(**{name: v}), value, dout)
                    ok &= compare(f"{label} (vs finite differences)", got, numeric, rtol=1e-5, atol=1e-7)
        return ok
    return verdict("ch06 ex7", run)
