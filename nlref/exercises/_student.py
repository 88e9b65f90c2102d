"""Small helpers shared by the chapter modules: calling a student's function safely."""

from __future__ import annotations

from . import _report


def call(name, func, *args, **kwargs):
    """Call the student's ``func``; return ``(True, result)`` or ``(False, None)`` after printing why.

    A check never raises for a wrong answer: a function that is not callable or that
    raises is reported as one line and the check returns False.
    """
    if not callable(func):
        _report(name, False, f"expected a function, got {type(func).__name__}")
        return False, None
    try:
        return True, func(*args, **kwargs)
    except Exception as err:  # the student's code may fail in any way; say how
        _report(name, False, f"your function raised {type(err).__name__}: {err}")
        return False, None


def as_names(name, answer):
    """A student's collection of parameter names as a set of str, or None (reported) when it is not one."""
    if isinstance(answer, str) or not hasattr(answer, "__iter__"):
        _report(name, False, f"expected a list or set of parameter names, got {type(answer).__name__}")
        return None
    names = set(answer)
    if not all(isinstance(n, str) for n in names):
        _report(name, False, "every entry must be a parameter name (a str)")
        return None
    return names
