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
An answer may be a list, a NumPy array or a tensor of another library; one in float32 is compared
with float32's tolerance (:data:`FLOAT32_RTOL`) where the check's own is tighter, except a whole-number
answer (a count), which stays exact.

The worked solutions in the notebooks end with ``assert chNN.exK(answer)``: the test
suite executes them, so a solution that stops being true fails the build.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rel_error", "check_close", "check_true", "not_answered", "FLOAT32_RTOL"]


def _real(x):
    """``(x as a float64 NumPy array, the dtype it came in)``: real numbers, lists of them and arrays of
    any library (a torch tensor that requires grad included).

    Anything else is a TypeError or a ValueError saying what it is: a str or a bool is not taken for a
    number (``"16640"`` used to pass as 16640), and a dict, a ragged list or a tuple of an array and a
    cache is refused rather than failing inside NumPy.
    """
    from ..backend import to_numpy

    def host(v):  # a tensor moved to NumPy, in a list too (np.asarray raised on one that requires grad)
        if isinstance(v, (list, tuple)):
            return [host(e) for e in v]
        return to_numpy(v) if not isinstance(v, (np.ndarray, np.generic)) and hasattr(v, "__dlpack__") else v

    given = x
    x = host(x)
    try:
        a = np.asarray(x)
    except Exception:  # a ragged list, or an element whose __array__ raises
        raise ValueError(f"expected real numbers, got a {type(given).__name__} that is not a regular array"
                         ) from None
    if a.dtype.kind not in "iuf":
        if a.dtype == object and all(type(v) is int for v in a.flat):
            what = "whole numbers too large for float64"
        elif isinstance(x, np.ndarray):
            what = f"an array of {a.dtype}"
        elif a.ndim == 0:
            what = type(given).__name__                    # a str, a bool, a complex, a dict ...
        else:
            first = next(iter(a.flat), None)
            what = f"a {type(given).__name__} of {type(getattr(first, 'item', lambda: first)()).__name__}"
        raise TypeError(f"expected real numbers, got {what}")
    return a.astype(np.float64), a.dtype


def _got(why) -> str:
    """The "got ..." part of :func:`_real`'s error, for a check's own "expected ..." line."""
    return str(why).removeprefix("expected real numbers, ")


def _shown(x, limit: int = 80) -> str:
    """``repr(x)`` for a message, cut to ``limit`` characters (a list of 10**5 counts printed them all), or
    ``a <type>`` when the repr raises (an int of 5000 digits does, and so may a student's object)."""
    try:
        text = repr(x)
    except Exception:
        return f"a {type(x).__name__}"
    return text if len(text) <= limit else text[:limit - 5] + " ..." + text[-1:]


def _shape_hint(got, want) -> str:
    """A few words on how shape ``got`` may have come about when ``want`` was asked for ("" if no guess)."""
    if len(got) == len(want) > 1 and sorted(got) == sorted(want):
        return " (axes swapped?)"
    if tuple(n for n in got if n != 1) == tuple(n for n in want if n != 1):
        return " (an axis of length 1 too many or too few)"
    return ""


def _host(x) -> np.ndarray:
    """``x`` as a float64 NumPy array (:func:`_real` without the dtype)."""
    return _real(x)[0]


#: float32 rounds to 6e-8 relative, and a computation done in it, in the checks' cases, stays within 1e-6 of
#: the largest value, so an answer in float32 is compared with at least this relative tolerance, and this
#: fraction of the largest expected value as its absolute one (whole-number answers, counts, stay exact).
#: Not 1e-5: a float32 batch norm that forgets its eps = 1e-5 would pass (its error is 4e-6 of the largest).
FLOAT32_RTOL = 1e-6


def _tolerances(dtype, expected, rtol, atol):
    """``(rtol, atol, note)`` for an answer of ``dtype`` against ``expected`` (float64): a float32 answer
    gets :data:`FLOAT32_RTOL` where the check's own tolerances are tighter; ``note`` (added to the message
    of a wrong answer) says that a float16 or an integer array has lost what the comparison needs, else "".
    """
    if dtype == np.float32 and rtol > 0 and not np.all(expected == np.round(expected)):
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
        return max(rtol, FLOAT32_RTOL), max(atol, FLOAT32_RTOL * scale), ""
    if dtype == np.float16:
        return rtol, atol, "; your answer is float16 (3 digits): compute in float32 or float64"
    if dtype.kind in "iu" and not np.all(expected == np.round(expected)):
        return rtol, atol, f"; your answer holds integers ({dtype}): were the values rounded or truncated?"
    return rtol, atol, ""


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
        a, dtype = _real(answer)
    except (TypeError, ValueError) as why:
        return _report(name, False, f"expected a number or an array, {_got(why)}")
    e = _host(expected)
    if a.shape != e.shape:
        return _report(name, False, f"shape {a.shape}, expected {e.shape}{_shape_hint(a.shape, e.shape)}")
    if not np.all(np.isfinite(a)):
        return _report(name, False, "the answer holds NaN or infinity")
    rtol, atol, note = _tolerances(dtype, e, rtol, atol)
    ok = bool(np.all(np.abs(a - e) <= atol + rtol * np.abs(e)))
    allowed = f"rtol {rtol:g}" + (f", atol {atol:g}" if atol else "")
    return _report(name, ok, f"relative error {rel_error(a, e):.2e}, largest difference "
                             f"{float(np.max(np.abs(a - e))):.2e} (allowed {allowed}){note}")


def check_true(name: str, answer, condition: bool, detail: str):
    """Report a check whose condition the chapter module computed; ``detail`` says what failed."""
    if not_answered(name, answer):
        return None
    return _report(name, bool(condition), detail)
