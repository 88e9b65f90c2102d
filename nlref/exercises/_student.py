"""Small helpers shared by the chapter modules: calling a student's function safely."""

from __future__ import annotations

import copy

import numpy as np

from . import _report, not_answered

#: What a check says of a function that returned None: most often a missing ``return``.
RETURNED_NONE = "your function returned None (is its return statement missing?)"


def fresh(args):
    """A deep copy of the arguments a student's function gets.

    The check computes its expected value from the originals, so a function that changes its
    inputs in place can neither change what it is compared with nor be refused for it.
    """
    return copy.deepcopy(args)


def call(name, func, *args, **kwargs):
    """Call the student's ``func`` on copies of the arguments (:func:`fresh`).

    Returns ``(True, result)``; ``(False, None)`` after printing why, for a function that is not
    callable, raises or returns None (a check never raises for a wrong answer); or
    ``(None, None)`` after printing "not answered yet" for one that still raises
    ``NotImplementedError``, the student edition's placeholder body.
    """
    if not callable(func):
        _report(name, False, f"expected a function, got {type(func).__name__}")
        return False, None
    try:
        result = func(*fresh(args), **fresh(kwargs))
    except NotImplementedError:  # there is no None to replace: the body is still to write
        not_answered(name, None, todo="write the function")
        return None, None
    except Exception as err:  # the student's code may fail in any way; say how
        _report(name, False, f"your function raised {type(err).__name__}: {err}")
        return False, None
    if result is None:
        _report(name, False, RETURNED_NONE)
        return False, None
    return True, result


def entries(value, *, ordered=False):
    """The entries of a list-like ``value`` as a list, or None when it is not list-like: a str, bytes, a
    number, a 0-d array or tensor (which has ``__iter__`` and raises TypeError in it) or anything whose
    iteration raises; with ``ordered``,
    also a set or a dict, whose order says nothing."""
    if (isinstance(value, (str, bytes)) or not hasattr(value, "__iter__")
            or ordered and isinstance(value, (set, frozenset, dict))):
        return None
    try:
        items = list(value)
    except Exception:  # a 0-d array's TypeError, or a generator of the student's that fails on the way
        return None
    return [_plain(n) for n in items]


def _plain(n):
    """An entry that is a 0-d array or tensor as the Python number it holds (a torch tensor iterates into
    0-d tensors, which are no int); NumPy scalars and everything else as they are."""
    if not isinstance(n, np.generic) and getattr(n, "ndim", None) == 0 and hasattr(n, "item"):
        return n.item()
    return n


def as_names(name, answer):
    """A student's collection of parameter names as a set of str, or None (reported) when it is not one."""
    names = entries(answer)  # a list first: set() of a list of lists raises (unhashable)
    if names is None:
        _report(name, False, f"expected a list or set of parameter names, got {type(answer).__name__}")
        return None
    if not all(isinstance(n, str) for n in names):
        _report(name, False, "every entry must be a parameter name (a str)")
        return None
    return set(names)
