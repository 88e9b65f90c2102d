"""Array namespaces, moves between host and device, reflect padding, random numbers.

nlref writes every algorithm once, against the Python array API standard, and
runs it on whatever library the caller's arrays come from: NumPy on the CPU,
CuPy on a CUDA GPU, PyTorch tensors, or ``array_api_strict`` (the CPU stand-in
the tests use to prove that nothing non-portable slipped in).

The standard has a few gaps that this module fills, each with one small helper:

* :func:`reflect_pad` -- the standard has no ``pad``; reflection is an index
  map, so it is one :func:`take` per axis.
* :func:`normal` -- the standard has no random numbers; nlref draws them on the
  host with NumPy's PCG64 and moves them to the caller's device, so the same
  seed gives the same numbers on every backend.
* :func:`to_numpy` / :func:`asarray` -- explicit moves to and from the host
  (nlref never moves an array silently).

A PyTorch tensor with ``requires_grad=True`` is refused wherever nlref computes
with it (:func:`array_namespace` raises a TypeError naming the argument): nlref's
gradients are written by hand, and such a tensor would silently build an autograd
graph through every step. Pass ``x.detach()``. The plotting helpers of
``nlref.viz``, which only copy their arrays to the host to draw them, accept it.
"""

from __future__ import annotations

import importlib
import numbers
import types

import numpy as np
import array_api_compat
import array_api_compat.numpy as _compat_numpy

__all__ = [
    "array_namespace",
    "rng",
    "check_flag",
    "check_not_masked",
    "FlagError",
    "require_real",
    "check_same_device",
    "check_on_device",
    "compat_namespace",
    "library",
    "KeepsNamespace",
    "asarray",
    "device",
    "dtype_name",
    "is_numpy",
    "is_cupy",
    "supports_out",
    "native_namespace",
    "to_numpy",
    "reflect_pad",
    "normal",
    "retain_freed_memory",
    "available_memory",
]


def _library(x) -> str:
    """Short name of the library an array comes from (for error messages)."""
    module = type(x).__module__.split(".")[0]
    return {"array_api_strict": "array-api-strict"}.get(module, module)


def array_namespace(*arrays, names=None):
    """The array-API namespace shared by ``arrays``.

    Parameters
    ----------
    *arrays : arrays
        Arrays from one library (NumPy, CuPy, PyTorch, array-api-strict, ...).
    names : sequence of str, optional
        The argument names of ``arrays``, used in error messages.

    Returns
    -------
    xp : module
        The array-API compatible namespace (``array_api_compat`` wraps NumPy,
        CuPy and PyTorch; ``array_api_strict`` is its own namespace).

    Raises
    ------
    TypeError
        If an argument is not an array (a list, a Python scalar, ``None``; a
        NumPy scalar such as ``numpy.float64(1.0)`` counts as a 0-d array), is a
        NumPy masked array (:func:`check_not_masked`), if the arrays come from
        different libraries, or if an argument is a PyTorch
        tensor with ``requires_grad=True`` (nlref's gradients are written by
        hand; a tensor that records an autograd graph is refused, not detached
        behind the caller's back: pass ``x.detach()``).
    """
    if arrays and all(type(x) is np.ndarray for x in arrays):  # the common case, without the checks below
        return _compat_numpy
    names = list(names) if names is not None else [f"argument {i}" for i in range(len(arrays))]
    for name, x in zip(names, arrays):
        check_not_masked(x, name)  # a MaskedArray passes for an array, and its mask would be mixed in or dropped
        # A NumPy scalar (what NumPy's own reductions return) is a 0-d array like any other; numpy.float64
        # also subclasses Python's float, and was refused while numpy.float32 was taken.
        python_scalar = isinstance(x, (bool, int, float, complex)) and not isinstance(x, np.generic)
        if not array_api_compat.is_array_api_obj(x) or python_scalar:
            raise TypeError(
                f"{name} must be an array (NumPy, CuPy, PyTorch or any array-API library); "
                f"got {type(x).__name__}. Convert it first, e.g. numpy.asarray({name})."
            )
    for name, x in zip(names, arrays):
        if getattr(x, "requires_grad", False) is True:
            raise TypeError(
                f"{name} is a PyTorch tensor with requires_grad=True; nlref computes its gradients by hand and "
                f"records no autograd graph, so it takes data, not graph nodes: pass {name}.detach()"
            )
    libraries = {_library(x) for x in arrays}
    if len(libraries) > 1:
        described = ", ".join(f"{n}: {_library(x)}" for n, x in zip(names, arrays))
        raise TypeError(
            f"arrays from different libraries cannot be mixed in one call ({described}); "
            "move them to one library first (nlref.backend.asarray(x, like=y))."
        )
    if len(arrays) > 1:
        check_same_device(*arrays, names=names)
    return array_api_compat.array_namespace(*arrays)


def check_same_device(*arrays, names=None):
    """Raise a ValueError naming the arguments when ``arrays`` live on different devices.

    nlref never moves an array between devices behind the caller's back (two GPUs,
    or a GPU and the host): the caller moves one of them, e.g. with
    ``nlref.backend.asarray(x, like=y)``.
    """
    names = list(names) if names is not None else [f"argument {i}" for i in range(len(arrays))]
    devices = [device(x) for x in arrays]
    if any(d != devices[0] for d in devices[1:]):
        described = ", ".join(f"{n} on {d}" for n, d in zip(names, devices))
        raise ValueError(f"arrays on different devices cannot be mixed in one call ({described}); "
                         "move them to one device first (nlref.backend.asarray(x, like=y)).")


def check_on_device(a, param, *, name, owner):
    """Raise a ValueError when ``a`` (argument ``name``) is not on the device of ``param``, one
    of ``owner``'s parameters ("block", "layer", "network"). NumPy has one device: no check."""
    if type(a) is np.ndarray:
        return
    mine = device(param)
    if device(a) != mine:
        raise ValueError(f"{name} is on device {device(a)} but the {owner}'s parameters are on {mine}; move "
                         f"{name} (nlref.backend.asarray({name}, like=...)) or build the {owner} with device=")


def require_real(x, name="x", *, bools=False):
    """The namespace of ``x``, after checking that ``x`` holds real numbers (integers or floats; with
    ``bools``, booleans too, as 0 and 1).

    Raises
    ------
    TypeError
        If ``x`` is not an array, or its dtype is bool (without ``bools``), complex, object,
        string or another non-numeric type; the message names ``name``, the dtype and a way out.
    """
    xp = array_namespace(x, names=[name])
    try:
        real = bool(xp.isdtype(x.dtype, ("integral", "real floating", *(("bool",) if bools else ()))))
    except Exception:  # dtypes outside the standard (object, str, datetime) are not even classified
        real = False
    if not real:
        kind = str(x.dtype)
        hint = {"bool": f"convert it first, e.g. {name}.astype(float)",
                "complex": "pass the real and imaginary parts (or the magnitude) separately",
                "object": "object arrays often come from lists of unequal length or mixed types; "
                          f"make a numeric array, e.g. numpy.asarray({name}, dtype=float)"}
        advice = next((text for key, text in hint.items() if key in kind),
                      f"convert it first, e.g. numpy.asarray({name}, dtype=float)")
        raise TypeError(f"{name} must hold real numbers (an integer or floating-point dtype); got dtype {kind}: "
                        f"{advice}")
    return xp


def device(x):
    """The device ``x`` lives on (``array_api_compat.device``)."""
    return array_api_compat.device(x)


def is_numpy(xp) -> bool:
    """True if ``xp`` is the (wrapped) NumPy namespace."""
    return array_api_compat.is_numpy_namespace(xp)


def is_cupy(xp) -> bool:
    """True if ``xp`` is the (wrapped) CuPy namespace."""
    return array_api_compat.is_cupy_namespace(xp)


def supports_out(xp) -> bool:
    """True if ``xp``'s ufuncs accept ``out=`` and views can be written in place.

    NumPy and CuPy do; fast paths use this to reuse preallocated buffers. Every
    other library gets the same arithmetic with fresh arrays.
    """
    return is_numpy(xp) or is_cupy(xp)


def native_namespace(xp):
    """The plain NumPy or CuPy module behind a wrapped namespace (for ``out=`` calls).

    Only meaningful where :func:`supports_out` is true; raises otherwise.
    """
    if is_numpy(xp):
        return np
    if is_cupy(xp):
        return importlib.import_module("cupy")
    raise TypeError(f"native_namespace: {getattr(xp, '__name__', xp)!r} has no out= ufuncs")


def to_numpy(x) -> np.ndarray:
    """Copy ``x`` to the host as a NumPy array (an explicit device-to-host move)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get") and _library(x) == "cupy":
        return x.get()
    if _library(x) == "torch":
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; float32 holds each of its values exactly
            x = x.float()
        return x.detach().cpu().numpy()
    return np.from_dlpack(x)


def asarray(a, *, like=None, xp=None, dtype=None, device=None):
    """Move ``a`` into the library (and onto the device) of ``like``.

    This is the explicit move nlref's errors point to when arrays of two
    libraries or devices meet (``asarray(x, like=y)``).

    Parameters
    ----------
    a : array_like
        Host data (a NumPy array, a list, a scalar), or an array of any library
        and device: one bound for NumPy is copied to the host first (a CuPy
        array, one on array-api-strict's second device); PyTorch's bfloat16,
        which only PyTorch has, arrives in another library as float32 (which
        holds each of its values). A NumPy masked array and a PyTorch tensor
        with ``requires_grad=True`` are refused, as everywhere in nlref.
    like : array, optional
        An array whose library and device the result should share.
    xp : namespace or module, optional
        The target library when no ``like`` array is at hand (``numpy``,
        ``cupy``, ``array_api_strict`` ...). Exactly one of ``like`` and ``xp``.
    dtype : dtype, optional
        Target dtype in the target namespace.
    device : device, optional
        With ``xp=``: the device to place the result on (a ``cupy.cuda.Device``, a
        ``torch.device``, ``array_api_strict.Device("device1")``); None: the
        library's default device. Not with ``like=`` (``like``'s device is used).
    """
    if (like is None) == (xp is None):
        raise TypeError("asarray needs exactly one of like= (an array) or xp= (a namespace)")
    if like is not None:
        if device is not None:
            raise TypeError("asarray takes device= only with xp= (with like=, the result goes to like's device)")
        namespace = array_namespace(like, names=["like"])
    else:
        namespace = compat_namespace(xp)
    a = _movable(a, namespace)
    if like is not None:
        return namespace.asarray(a, dtype=dtype, device=_device(like))
    if device is None:
        return namespace.asarray(a, dtype=dtype)
    return namespace.asarray(a, dtype=dtype, device=device)


def _movable(a, namespace):
    """``a`` as ``namespace.asarray`` can take it: an array of another library bound for the host, or a
    bfloat16 tensor bound for a library without bfloat16, copied to the host first (CuPy and other
    devices refuse an implicit copy); masked arrays and tensors that require grad refused by name."""
    check_not_masked(a, "a")
    if isinstance(a, (np.ndarray, np.generic, bool, int, float, complex)) or not array_api_compat.is_array_api_obj(a):
        return a  # host data
    array_namespace(a, names=["a"])
    source = _library(a)
    if is_numpy(namespace) and source != "numpy":
        return to_numpy(a)
    if source == "torch" and str(a.dtype) == "torch.bfloat16" and not array_api_compat.is_torch_namespace(namespace):
        return to_numpy(a)
    return a


_device = device  # asarray's argument of the same name hides the function there


def compat_namespace(xp):
    """The array-API namespace for a library module: ``numpy`` -> ``array_api_compat.numpy``.

    Namespaces that already follow the standard (``array_api_strict``, or a
    wrapped one) are returned unchanged.
    """
    name = getattr(xp, "__name__", "")
    if name in ("numpy", "cupy", "torch"):
        return importlib.import_module(f"array_api_compat.{name}")
    return xp


def library(xp):
    """The array-API namespace of the library module ``xp`` (NumPy for None), as :func:`compat_namespace` gives it.

    Anything that is not an array library (a string such as ``"numpy"``, the ``math`` module) is a
    TypeError naming ``xp``, before a model or a run is built on it.
    """
    ns = compat_namespace(np if xp is None else xp)
    if not all(hasattr(ns, f) for f in ("asarray", "matmul", "float32")):
        raise TypeError(f"xp must be an array library module (numpy, cupy, array_api_strict, torch), got {xp!r}")
    return ns


class _NamespaceByName:
    """What a pickled or copied :class:`KeepsNamespace` holds in place of a module: its name."""

    def __init__(self, name):
        self.name = name


class KeepsNamespace:
    """A base class for objects that keep their array namespace (a module) in an attribute (``self.xp``).

    ``pickle`` and ``copy.deepcopy`` cannot copy a module ("cannot pickle 'module' object"),
    so a layer or a network that keeps ``xp`` could be neither saved with pickle, nor sent to
    a process (``multiprocessing``, Dask's ``processes`` scheduler), nor copied (an EMA copy
    of a network). Here every module-valued attribute travels as its name and is imported
    again, the same module, on the other side; everything else is copied as usual.
    """

    def __getstate__(self):
        state = dict(self.__dict__)
        for key, value in state.items():
            if isinstance(value, types.ModuleType):
                state[key] = _NamespaceByName(value.__name__)
        return state

    def __setstate__(self, state):
        self.__dict__.update({key: importlib.import_module(value.name) if isinstance(value, _NamespaceByName)
                              else value for key, value in state.items()})


def _reflect_indices(n: int, before: int, after: int) -> np.ndarray:
    """Indices into an axis of length ``n`` for reflect padding (edge not repeated).

    Position ``i`` of the padded axis (``-before <= i < n + after`` in the
    original coordinates) reads sample ``m`` where ``m = i mod 2(n-1)`` folded
    back into ``[0, n)``: the mirror image about the first and last sample,
    repeated as often as needed, exactly as ``numpy.pad(mode="reflect")``.
    """
    i = np.arange(-before, n + after)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    m = np.mod(i, period)
    return np.where(m < n, m, period - m)


def reflect_pad(x, widths):
    """Pad ``x`` by reflection about its edge samples, like ``numpy.pad(mode="reflect")``.

    Parameters
    ----------
    x : array, shape (n_0, ..., n_{d-1})
    widths : sequence of (int, int)
        ``(before, after)`` for every axis of ``x``; widths may exceed the axis
        length (the reflection repeats).

    Returns
    -------
    padded : array, shape (n_0 + before_0 + after_0, ...)
        Same library, device and dtype as ``x``.
    """
    xp = array_namespace(x, names=["x"])
    if len(widths) != x.ndim:
        raise ValueError(f"widths must give (before, after) for each of the {x.ndim} axes of x; got {len(widths)}")
    for axis, (before, after) in enumerate(widths):
        if before < 0 or after < 0:
            raise ValueError(f"widths must be non-negative; got {widths[axis]} for axis {axis}")
        if before == 0 and after == 0:
            continue
        idx = xp.asarray(_reflect_indices(x.shape[axis], before, after), device=device(x))
        x = xp.take(x, idx, axis=axis)
    return x


def check_not_masked(a, name="image"):
    """Refuse a NumPy masked array (in memory, or as a Dask array's chunks), naming ``name``.

    nlref has no masked samples: it would read the values under the mask, NaN included (a
    finiteness check skips masked entries), mix the masks into its results, or drop them.
    """
    if isinstance(a, np.ma.MaskedArray) or isinstance(getattr(a, "_meta", None), np.ma.MaskedArray):
        raise TypeError(f"{name} is a NumPy masked array: nlref would read the values under the mask and drop "
                        f"the mask. Fill the masked samples first ({name}.filled(value), or by interpolation) "
                        "and pass the plain array")


class FlagError(TypeError, ValueError):
    """A flag that is not True or False.

    A TypeError, because the value's type is wrong, and a ValueError, what the constructors' flag
    checks raised before they shared :func:`check_flag` (the way NumPy's ``AxisError`` is both a
    ValueError and an IndexError).
    """


def check_flag(name, value):
    """``value`` as a bool: Python's or NumPy's; anything else, even a truthy ``"no"`` or ``1``, is a
    :class:`FlagError` naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise FlagError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def rng(seed, name="seed"):
    """``numpy.random.default_rng(seed)`` for a seed nlref accepts: None, an int >= 0 or a Generator (returned as is).

    Anything else is a TypeError or ValueError naming ``name``, not NumPy's "SeedSequence expects
    int or sequence of ints" or "expected non-negative integer".
    """
    if seed is None or isinstance(seed, np.random.Generator):
        return seed if seed is not None else np.random.default_rng()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 0, a numpy.random.Generator or None; got {seed!r}")
    if seed < 0:
        raise ValueError(f"{name} must be an int >= 0 (or a Generator, or None); got {seed}")
    return np.random.default_rng(int(seed))


def normal(shape, *, seed=None, like=None, xp=None, dtype=None, device=None):
    """Standard normal samples, drawn on the host with NumPy's PCG64 and moved.

    The same ``seed`` gives bit-identical numbers on every backend, which makes
    results comparable across NumPy, CuPy and PyTorch. ``seed`` may be an int,
    ``None`` (fresh entropy) or a ``numpy.random.Generator``. ``device`` (with
    ``xp=``) places the samples as :func:`asarray` does.
    """
    generator = rng(seed)
    name = None if dtype is None else dtype_name(dtype)
    if name == "bfloat16":  # NumPy has no bfloat16: float32 on the host, rounded to bfloat16 on the way in
        target = array_namespace(like, names=["like"]) if like is not None else compat_namespace(xp)
        if isinstance(dtype, str):
            dtype = getattr(target, "bfloat16", None)
            if dtype is None:
                raise TypeError(f"dtype='bfloat16' is not a dtype of {getattr(target, '__name__', target)}")
        samples = generator.standard_normal(tuple(shape), dtype=np.float64).astype(np.float32)
        return asarray(samples, like=like, xp=xp, device=device, dtype=dtype)
    host_dtype = np.float64 if dtype is None else np.dtype(name)
    samples = generator.standard_normal(tuple(shape), dtype=np.float64).astype(host_dtype)
    return asarray(samples, like=like, xp=xp, device=device)


def dtype_name(dtype) -> str:
    """The standard name of a dtype of any library: ``'float32'`` for NumPy's, CuPy's,
    PyTorch's and array-api-strict's float32 alike (and for the string); ``'bfloat16'``
    for PyTorch's bfloat16 (not ``'float16'``, another format)."""
    if isinstance(dtype, str):
        return dtype
    # Remembered: a layer asks this on every call, and ``str`` of a NumPy dtype is slow
    # Python. The key leads with the dtype's type, so that a lookup never compares dtypes
    # of two libraries (array-api-strict warns when its float32 is compared with NumPy's).
    key = (type(dtype), dtype)
    try:
        return _DTYPE_NAMES[key]
    except (KeyError, TypeError):  # new, or not hashable
        name = _find_dtype_name(dtype)
    try:
        _DTYPE_NAMES[key] = name
    except TypeError:
        pass
    return name


_DTYPE_NAMES = {}


def _find_dtype_name(dtype):
    text = str(dtype)
    # bfloat16 before float16, the end of its name ("torch.bfloat16" is not a float16)
    for name in ("bfloat16", "float16", "float32", "float64", "uint8", "uint16", "uint32", "uint64",
                 "int8", "int16", "int32", "int64", "bool", "complex64", "complex128"):
        if text.endswith(name):
            return name
    return np.dtype(dtype).name


def available_memory():
    """Bytes of host memory the machine can give now (psutil's ``available``, else /proc/meminfo's
    ``MemAvailable``); None where neither tells. The in-memory :func:`nlref.nl_means` and the chunked
    ``nlref denoise`` measure their working memory against it."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def retain_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees the same few dozen arrays of up to a few
    MiB every time. By default glibc serves blocks above a (dynamic) threshold
    with fresh ``mmap`` pages and unmaps them on ``free``, so each step pays a
    page fault on every 4 KiB of them again; on the 2-core test machine that was
    about half of a NumPy training step, and it varied by 2x from run to run.
    This sets ``M_MMAP_THRESHOLD`` to glibc's maximum (32 MiB: smaller blocks come
    from the heap and are reused) and ``M_TRIM_THRESHOLD`` to 1 GiB (the heap is
    not shrunk below that). It is the same remedy as running with
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set, or with another
    allocator preloaded, as is commonly advised for CPU training.

    Process-wide and not undone; ``nlref train`` and ``benchmarks/bench_train.py``
    call it. Returns True when applied, False where the C library is not glibc
    (macOS, Windows, musl), where nothing changes.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # present in glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
