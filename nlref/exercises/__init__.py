"""Checks for the course's exercises: the student runs them, the solutions must pass them.

Every exercise of a chapter that asks for code or a number has a check here, in the
module of its chapter (``nlref.exercises.ch01`` for chapter 1, and so on), named after
the exercise (``ch01.ex4(answer)`` checks exercise 4). A check

* prints one line and returns ``None`` while the answer is still the placeholder
  ``None`` (so that a student's notebook runs top to bottom before it is done);
* prints ``correct`` and returns ``True`` when the answer agrees with nlref's own
  computation of it, in the manner of CS231n's relative-error checks;
* prints what is wrong (the relative error, the shape, the type) and returns
  ``False`` otherwise. It never raises for a wrong answer.

A function given as an answer is called on copies of its inputs, so one that works in place
is neither refused for it nor able to change what it is compared with; one that returns None
(a missing ``return``) is a wrong answer, said so. A str or a bool is not taken for a number.

The worked solutions in the notebooks end with ``assert chNN.exK(answer)``: the test
suite executes them, so a solution that stops being true fails the build.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rel_error", "check_close", "check_true", "not_answered"]


def _host(x) -> np.ndarray:
    """``x`` as a float64 NumPy array: real numbers, lists of them and arrays of any library.

    Anything else is a TypeError or a ValueError: a str or a bool is not taken for a number
    (``"16640"`` used to pass as 16640), and a dict or a tuple of an array and a cache is refused
    rather than failing inside NumPy.
    """
    from ..backend import to_numpy

    if not isinstance(x, (np.ndarray, np.generic, list, tuple)) and hasattr(x, "__dlpack__"):
        x = to_numpy(x)
    a = np.asarray(x)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"expected real numbers, got an array of {a.dtype}")
    return a.astype(np.float64)


def rel_error(a, b) -> float:
    r"""Largest element-wise relative error, :math:`\max |a - b| / \max(|a| + |b|, 10^{-300})`.

    ``a`` and ``b`` are numbers or arrays of any array library (moved to NumPy, float64).
    """
    a, b = _host(a), _host(b)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), 1e-300)))


def not_answered(name: str, answer, *, todo: str = "replace None by your answer") -> bool:
    """True (and one line printed, saying what is ``todo``) while ``answer`` is still the placeholder ``None``."""
    if answer is None:
        print(f"{name}: not answered yet ({todo} and run the cell again)")
        return True
    return False


def _report(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{name}: correct" if ok else f"{name}: not yet: {detail}")
    return ok


def check_close(name: str, answer, expected, *, rtol: float = 1e-6, atol: float = 0.0):
    """Check a number or array against the expected one.

    Passes when ``|answer - expected| <= atol + rtol * |expected|`` element-wise
    (shapes must be equal). Returns ``None`` for an unanswered exercise, else a bool.
    """
    if not_answered(name, answer):
        return None
    try:
        a = _host(answer)
    except (TypeError, ValueError):
        return _report(name, False, f"expected a number or an array, got {type(answer).__name__}")
    e = _host(expected)
    if a.shape != e.shape:
        return _report(name, False, f"shape {a.shape}, expected {e.shape}")
    if not np.all(np.isfinite(a)):
        return _report(name, False, "the answer holds NaN or infinity")
    ok = bool(np.all(np.abs(a - e) <= atol + rtol * np.abs(e)))
    allowed = f"rtol {rtol:g}" + (f", atol {atol:g}" if atol else "")
    return _report(name, ok, f"relative error {rel_error(a, e):.2e}, largest difference "
                             f"{float(np.max(np.abs(a - e))):.2e} (allowed {allowed})")


def check_true(name: str, answer, condition: bool, detail: str):
    """Report a check whose condition the chapter module computed; ``detail`` says what failed."""
    if not_answered(name, answer):
        return None
    return _report(name, bool(condition), detail)
