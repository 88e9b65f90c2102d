"""Shared fixtures: every public function runs on each available array library.

``xp`` is parametrised over NumPy and array-api-strict (always), PyTorch CPU
tensors (when torch is importable) and CuPy (when a CUDA device works; those
cases carry the ``gpu`` marker). ``strict-device1`` is array-api-strict again
with every array on its second device, ``array_api_strict.Device("device1")``:
there, any implicit conversion to NumPy raises and mixing devices raises, so it
is the CPU stand-in for "nothing moves to the host behind your back" on a GPU.
The ``device`` fixture is the device of the case (None: the library's default).
Tests build inputs on the host with NumPy and move them with
:func:`nlref.backend.asarray` (``xp=xp, device=device``) or ``to_xp``, and build
layers and networks with ``xp=xp, device=device``. Shared assertions and sample
builders are in ``tests/helpers.py`` (``from tests.helpers import ...``), not here.
"""

from __future__ import annotations

import importlib
import signal

import numpy as np
import pytest

import nlref.backend as B

# A shell without job control starts a background command (``pytest ... &``, a CI step sent to the background)
# with SIGINT ignored; Python then installs no KeyboardInterrupt handler, and every child process inherits the
# ignore. The tests of Ctrl-C send SIGINT to nlref in this process and in children, as a terminal would.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _cupy_usable():
    try:
        cupy = importlib.import_module("cupy")
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _backend_params():
    params = [pytest.param("numpy", id="numpy"), pytest.param("array_api_strict", id="strict"),
              pytest.param("array_api_strict:device1", id="strict-device1")]
    try:
        importlib.import_module("torch")
        params.append(pytest.param("torch", id="torch"))
    except ImportError:
        params.append(pytest.param("torch", id="torch", marks=pytest.mark.skip(reason="PyTorch not installed")))
    gpu_marks = [pytest.mark.gpu]
    if not _cupy_usable():
        gpu_marks.append(pytest.mark.skip(reason="CuPy with a CUDA device not available"))
    params.append(pytest.param("cupy", id="cupy", marks=gpu_marks))
    return params


@pytest.fixture(params=_backend_params())
def xp(request):
    """The array library module under test (numpy, array_api_strict, torch or cupy)."""
    return importlib.import_module(request.param.split(":")[0])


@pytest.fixture
def device(request):
    """The device of the backend case: ``array_api_strict.Device("device1")`` for ``strict-device1``, else None."""
    spec = getattr(request.node, "callspec", None)
    name = spec.params.get("xp", spec.params.get("xp_cpu", "")) if spec is not None else ""
    if name.endswith(":device1"):
        return importlib.import_module("array_api_strict").Device("device1")
    return None


@pytest.fixture(params=[p for p in _backend_params() if p.id in ("numpy", "strict")])
def xp_cpu(request):
    """NumPy and array-api-strict only (for tests too slow to repeat everywhere)."""
    return importlib.import_module(request.param.split(":")[0])


@pytest.fixture
def rng():
    """A NumPy generator seeded afresh for each test: a test's data never depend on which tests ran before it."""
    return np.random.default_rng(20261207)


@pytest.fixture
def to_xp(xp, device):
    """Move a NumPy array into the library (and onto the device) under test."""
    return lambda a: B.asarray(np.asarray(a), xp=xp, device=device)


@pytest.fixture(scope="module")
def torch_single_thread():
    """One torch thread for a module of tiny oracle tensors (far faster than waking a pool); restored after."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
