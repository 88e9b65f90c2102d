"""The machinery of the graded implementation exercises: call the student's function, compare.

A graded exercise gives the student a function to write (its signature kept, its body a
``raise NotImplementedError`` in the student edition) and checks it the way Karpathy's
"makemore" notebooks do: for every quantity, one line

``dx (vs nlref)          exact: False | approximate: True  | maxdiff: 2.2e-16``

against nlref's own computation and, for a backward pass, against centred finite
differences of the forward pass. The check returns

* ``None`` while the exercise is not answered: the answer is ``None`` or the function still
  raises ``NotImplementedError``;
* ``False`` (with the reason printed) when the function is not callable, raises anything
  else, returns the wrong type or shape, or disagrees; it never raises itself;
* ``True`` when every line is approximately right.
"""

from __future__ import annotations

import numpy as np

from . import _report, not_answered
from ._student import RETURNED_NONE, fresh

__all__ = ["LEVELS", "attempt", "compare", "numerical_gradient", "verdict"]

#: The levels an exercise is labelled with, easiest first.
LEVELS = ("warm-up", "core", "stretch")


class Unanswered(Exception):
    """Raised inside a check when the student's function is not written yet (caught by the check)."""


class Wrong(Exception):
    """Raised inside a check when the student's answer is wrong in a way that stops the comparison."""


def attempt(name, func, *args):
    """``func`` called on copies of ``args`` (``_student.fresh``), or
    :class:`Unanswered` / :class:`Wrong` when there is no result (not callable, raises, returns None)."""
    if func is None:
        raise Unanswered
    if not callable(func):
        raise Wrong(f"expected a function, got {type(func).__name__}")
    try:
        result = func(*fresh(args))
    except NotImplementedError:
        raise Unanswered from None
    except Exception as err:  # the student's code may fail in any way; say how
        raise Wrong(f"your function raised {type(err).__name__}: {err}") from None
    if result is None:
        raise Wrong(RETURNED_NONE)
    return result


def _array(label, value, shape):
    """``(value as float64 NumPy of shape, the dtype it came in)``, or :class:`Wrong`."""
    from . import _got, _real, _shape_hint

    try:
        a, dtype = _real(value)
    except (TypeError, ValueError) as why:
        raise Wrong(f"{label}: expected an array, {_got(why)}") from None
    if a.shape != tuple(shape):
        raise Wrong(f"{label}: shape {a.shape}, expected {tuple(shape)}{_shape_hint(a.shape, tuple(shape))}")
    return a, dtype


def compare(label, got, expected, *, rtol=1e-7, atol=1e-9):
    """One makemore line for ``got`` against ``expected``; True when approximately equal.

    ``exact`` is bitwise equality; ``approximate`` is
    ``|got - expected| <= atol + rtol * |expected|`` element-wise (a float32 answer gets at least
    float32's tolerances, :data:`nlref.exercises.FLOAT32_RTOL`); ``maxdiff`` the largest
    absolute difference. A wrong shape, a non-array or a NaN raises :class:`Wrong`.
    """
    from . import _tolerances

    e = np.asarray(expected, dtype=np.float64)
    a, dtype = _array(label, got, e.shape)
    if not np.all(np.isfinite(a)):
        raise Wrong(f"{label}: your result holds NaN or infinity")
    rtol, atol, note = _tolerances(dtype, e, rtol, atol)
    exact = bool(np.array_equal(a, e))
    approx = bool(np.all(np.abs(a - e) <= atol + rtol * np.abs(e)))
    maxdiff = float(np.max(np.abs(a - e))) if a.size else 0.0
    print(f"  {label:<30s} exact: {exact!s:5} | approximate: {approx!s:5} | maxdiff: {maxdiff:.1e}"
          + (note if not approx else ""))
    return approx


def numerical_gradient(f, x, dout, eps=1e-6):
    """Centred differences of ``sum(f(x) * dout)`` with respect to every element of ``x`` (float64)."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + eps
        plus = float(np.sum(f(x) * dout))
        flat[i] = keep - eps
        minus = float(np.sum(f(x) * dout))
        flat[i] = keep
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def verdict(name, run):
    """Run ``run()`` (which returns a bool or raises Unanswered / Wrong) and report None / True / False."""
    print(f"{name}:")
    try:
        ok = bool(run())
    except Unanswered:
        not_answered(name, None, todo="write the function")
        return None
    except Wrong as why:
        return _report(name, False, str(why))
    return _report(name, ok, "some lines above are not approximately right")
