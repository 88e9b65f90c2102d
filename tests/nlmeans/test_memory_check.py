"""The in-memory fast method measures its working memory against what the machine has available.

It checked a fixed 4 GiB (``nlref.nlmeans.WORKING_MEMORY_LIMIT``) with the NumPy engine's estimate
for every engine: a request of 5 GiB on a machine with 100 GiB free was refused, one of 3 GiB on a
machine with 1 GiB free started (and was killed for memory), and the Numba engine was charged about
twice its traced peak.
"""

from __future__ import annotations

import numpy as np
import pytest

import nlref
from nlref.nlmeans import api, fast
from nlref.nlmeans.fast import ENGINE_VARIABLE, working_memory
from nlref.nlmeans.params import working_itemsize
from tests.helpers import traced_peak

psutil = pytest.importorskip("psutil")


def _machine_with(monkeypatch, available):
    """psutil.virtual_memory as on a machine with ``available`` bytes free (the other fields as they are)."""
    real = psutil.virtual_memory
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real()._replace(available=available))


class Reached(Exception):
    pass


def _no_work(monkeypatch):
    """Record the working copy and stop at the offset loop: what ran before nl_means refused or started."""
    work = []
    real_to_working = api.to_working

    def to_working(*args, **kwargs):
        work.append("working copy")
        return real_to_working(*args, **kwargs)

    def offset_loop(*args, **kwargs):
        work.append("offset loop")
        raise Reached

    monkeypatch.setattr(api, "to_working", to_working)
    monkeypatch.setattr(api, "nl_means_fast", offset_loop)
    return work


def _need(image, engine, workers, aggregation="pixel", **kwargs):
    p = api.resolve_parameters(image, aggregation=aggregation, **kwargs)
    return working_memory(image.shape, 1, p["patch_size"], p["search_size"], aggregation,
                          8 if image.dtype == np.float64 else 4, workers, engine=engine)


@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_refused_one_byte_below_the_need_and_run_at_it(monkeypatch, engine):
    """Both sides of the boundary, with the estimate of the engine that runs, the refusal before any work."""
    if engine == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv(ENGINE_VARIABLE, engine)
    image = np.zeros((300, 280), dtype=np.float32)
    kwargs = dict(h=0.1, patch_size=5, search_size=21)
    need = _need(image, engine, 1, **kwargs)
    work = _no_work(monkeypatch)
    _machine_with(monkeypatch, need - 1)
    with pytest.raises(ValueError) as err:
        nlref.nl_means(image, workers=1, **kwargs)
    message = str(err.value)
    for fragment in ["image of shape (300, 280) (float32, 328.1 KiB)", f"needs about {need / 2**20:.1f} MiB",
                     f"the {engine} engine, 1 thread", f"more than the {(need - 1) / 2**20:.1f} MiB available on "
                     "this machine", "chunk by chunk (as a Dask array", "smaller search_size"]:
        assert fragment in message, message
    assert work == []
    _machine_with(monkeypatch, need)
    with pytest.raises(Reached):
        nlref.nl_means(image, workers=1, **kwargs)
    assert work == ["working copy", "offset loop"]


def test_a_request_above_4_gib_that_fits_the_machine_is_not_refused(monkeypatch):
    """A 40000 x 40000 float32 image (6 GiB, a broadcast view that holds none of it) on a machine with 1 TiB free:
    the fixed 4 GiB limit refused it; now only the machine's memory counts."""
    image = np.broadcast_to(np.zeros(1, dtype=np.float32), (40000, 40000))
    params = dict(patch_size=(3, 3), search_size=(5, 5))
    _machine_with(monkeypatch, 2**40)
    assert api.check_limits(image, params, workers=1) == 1
    _machine_with(monkeypatch, 2**32)  # 4 GiB free: the working copy alone is 6 GiB
    with pytest.raises(ValueError, match=r"image of shape \(40000, 40000\) \(float32, 5\.96 GiB\) needs about "
                                         r"\d+\.\d\d GiB .* more than the 4\.00 GiB available on this machine"):
        api.check_limits(image, params, workers=1)


def test_the_default_workers_are_lowered_to_fit_and_explicit_ones_refused(monkeypatch):
    """Every thread holds its own buffers; the result is the same for any count, so the default takes as many as
    fit, and only workers the caller asked for are refused (with the advice to use fewer)."""
    monkeypatch.setenv(ENGINE_VARIABLE, "numpy")
    monkeypatch.setattr(api.os, "cpu_count", lambda: 4)
    image = np.zeros((300, 280), dtype=np.float32)
    kwargs = dict(h=0.1, patch_size=5, search_size=21)
    params = api.resolve_parameters(image, **kwargs)
    two, three = _need(image, "numpy", 2, **kwargs), _need(image, "numpy", 3, **kwargs)
    assert two < three
    _machine_with(monkeypatch, three - 1)
    assert api.check_limits(image, params) == 2
    with pytest.raises(ValueError, match=r"3 threads\), more than .* smaller search_size, or fewer workers$"):
        api.check_limits(image, params, workers=3)
    _machine_with(monkeypatch, three)
    assert api.check_limits(image, params) == 3


def test_unknown_free_memory_falls_back_to_the_fixed_limit(monkeypatch):
    """Where the machine does not say (no psutil, no /proc/meminfo), WORKING_MEMORY_LIMIT still guards."""
    image = np.zeros((64, 64), dtype=np.float32)
    params = api.resolve_parameters(image, h=0.1, patch_size=5, search_size=21)
    monkeypatch.setattr(api, "available_memory", lambda: None)
    monkeypatch.setattr(api, "WORKING_MEMORY_LIMIT", 2**12)
    with pytest.raises(ValueError, match=r"more than the 4\.0 KiB allowed where the free memory is not known "
                                         r"\(nlref.nlmeans.WORKING_MEMORY_LIMIT\)"):
        api.check_limits(image, params, workers=1)
    monkeypatch.setattr(api, "WORKING_MEMORY_LIMIT", 2**40)
    assert api.check_limits(image, params, workers=1) == 1


def test_the_result_does_not_depend_on_the_memory_figure(monkeypatch):
    """The check only decides whether to run (and the default thread count): the same bits either way."""
    rng = np.random.default_rng(3)
    image = rng.random((60, 70)).astype(np.float32)
    kwargs = dict(sigma=0.08, patch_size=5, search_size=11)
    _machine_with(monkeypatch, 2**40)
    roomy = nlref.nl_means(image, **kwargs)
    _machine_with(monkeypatch, _need(image, fast.resolve_engine(np), 1, **kwargs))  # one thread's worth
    tight = nlref.nl_means(image, **kwargs)
    assert roomy.tobytes() == tight.tobytes()


@pytest.mark.parametrize("shape, channel_axis, aggregation, workers, dtype", [
    ((300, 280), None, "pixel", 2, np.float32), ((300, 280), None, "patch", 2, np.float32),
    ((160, 150, 3), -1, "pixel", 2, np.float32), ((160, 150, 3), -1, "patch", 1, np.float32),
    ((12, 96, 96), None, "pixel", 2, np.float32), ((12, 96, 96), None, "patch", 2, np.float32),
    ((200, 210), None, "pixel", 2, np.float64), ((200, 210), None, "patch", 1, np.float64),
    ((200, 210), None, "pixel", 2, np.uint8), ((200, 210), None, "patch", 2, np.uint32)])
def test_numba_estimate_bounds_the_traced_peak_closely(monkeypatch, shape, channel_axis, aggregation, workers, dtype):
    """The Numba engine's own estimate is an upper bound of the traced peak of the whole call, and not a loose one
    (measured 0.84 to 1.0 of it); the NumPy engine's estimate was 1.4 to 2.9 times that peak."""
    pytest.importorskip("numba")
    monkeypatch.setenv(ENGINE_VARIABLE, "numba")
    x = np.random.default_rng(0).random(shape)
    integer = np.dtype(dtype).kind == "u"
    x = (x * 200).astype(dtype) if integer else x.astype(dtype)
    sigma = 20 if integer else 0.08
    kwargs = dict(sigma=sigma, channel_axis=channel_axis, aggregation=aggregation, workers=workers)
    p = api.resolve_parameters(x, sigma=sigma, channel_axis=channel_axis)
    spatial = shape if channel_axis is None else shape[:-1]
    channels = 1 if channel_axis is None else shape[-1]
    itemsize = working_itemsize(dtype)  # uint32 computes in float64
    estimate = working_memory(spatial, channels, p["patch_size"], p["search_size"], aggregation, itemsize, workers,
                              engine="numba")
    nlref.nl_means(x[:12, :40], **kwargs)  # compiled or loaded outside the trace
    peak = traced_peak(lambda: nlref.nl_means(x, **kwargs))
    assert 0.8 * estimate <= peak <= estimate, peak / estimate


def test_working_memory_refuses_an_unknown_engine():
    with pytest.raises(ValueError, match="engine must be 'numpy' or 'numba'; got 'auto'"):
        working_memory((8, 8), 1, (3, 3), (5, 5), "pixel", 4, 1, engine="auto")
