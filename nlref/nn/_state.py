"""One check for every state-dict entry a block or a network loads (``load_state_dict``), and for the
host arrays :func:`nlref.compare_block` is given."""

from __future__ import annotations

import numbers

import numpy as np

from .. import backend as B


def real_host(name, value, dtype, shape=None):
    """A host copy of ``value`` in ``dtype``, checked; else a TypeError or ValueError naming ``name``.

    ``value``: a NumPy array, a Python number or sequence, or any library's array. It must hold
    real numbers (integers or floats; not bool, complex, strings or objects), have ``shape``
    when one is given, and be finite *in* ``dtype``: 1e300 is finite in float64 but infinite
    in float32.
    """
    try:
        if isinstance(value, (np.ndarray, np.generic, numbers.Number, list, tuple)):
            host = np.array(value)
        else:
            host = np.array(B.to_numpy(value))
    except Exception as err:  # a string, an object without the array protocols, ragged lists
        raise TypeError(f"{name} must be an array of real numbers; got {type(value).__name__}") from err
    if host.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers (integers or floats); got dtype {host.dtype}")
    if shape is not None and tuple(host.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(host.shape)}, expected {tuple(shape)}")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = host.astype(dtype)
    if not np.all(np.isfinite(cast)):
        raise ValueError(f"{name} holds non-finite values (NaN or infinite values in {np.dtype(dtype).name})")
    return cast


def state_entry(name, value, shape, dtype):
    """One state-dict entry as :func:`real_host` checks it, of ``shape``; a running variance must also not
    be negative (batch norm would take the square root of it). Nothing is changed here: the caller
    assigns only after every entry passed."""
    cast = real_host(name, value, dtype, shape)
    if name.rstrip("'\"]").endswith("running_var") and np.any(cast < 0):
        raise ValueError(f"{name} holds negative values; a running variance is >= 0")
    return cast


def whole_count(name, value):
    """A count (BN's ``num_batches_tracked``, an optimiser's steps): a whole number >= 0 (a 0-d array or a
    number), as int; else an error naming it."""
    try:
        host = np.asarray(value if isinstance(value, (np.ndarray, np.generic, numbers.Number)) else B.to_numpy(value))
    except Exception as err:
        raise TypeError(f"{name} must be a whole number >= 0; got {type(value).__name__}") from err
    if host.shape not in ((), (1,)) or host.dtype.kind not in "iuf" or not np.isfinite(host).all():
        raise ValueError(f"{name} must be a whole number >= 0 (one value); got {value!r}")
    count = host.reshape(()).item()
    if count < 0 or count != int(count):
        raise ValueError(f"{name} must be a whole number >= 0; got {count!r}")
    return int(count)
