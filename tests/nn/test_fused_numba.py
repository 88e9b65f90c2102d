"""The fused Numba passes of :mod:`nlref.nn.engine.fused_numba` (softmax rows, the concatenation's
ReLU, batch norm).

They must equal the NumPy path (``NLREF_NN_ENGINE=numpy``) within the suite's tolerances, give
the same bits for one and two Numba threads, and be chosen only where they can run.
"""

from __future__ import annotations

import numpy as np
import pytest

from nlref.nn import NonLocalBlock
from nlref.nn import functional as F

numba = pytest.importorskip("numba", reason="the fused passes need numba (pip install 'nlref[fast]')")
fused = pytest.importorskip("nlref.nn.engine.fused_numba")

VAR = fused.ENGINE_VARIABLE
TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}
DTYPES = (np.float32, np.float64)


@pytest.fixture
def engine(monkeypatch):
    """engine(name) sets NLREF_NN_ENGINE for the rest of the test (and wires the channels-last
    batch norm kernels, off by default, so that they are tested too)."""
    monkeypatch.setattr(fused, "BN_CHANNELS_LAST", True)
    return lambda name: monkeypatch.setenv(VAR, name)


def test_channels_last_batchnorm_is_not_wired_by_default(monkeypatch):
    monkeypatch.setenv(VAR, "numba")
    x = _bn_input((2, 3, 4, 5), np.float32, True)
    one = np.ones(3, np.float32)
    _, cache = F.batchnorm_forward(x, one, one, {"running_mean": 0 * one, "running_var": one}, training=True)
    assert not isinstance(cache, fused.BatchNormCache)
    _, cache = F.batchnorm_forward(np.ascontiguousarray(x), one, one, {"running_mean": 0 * one, "running_var": one},
                                   training=True)
    assert isinstance(cache, fused.BatchNormCache)


def _both(engine, fn):
    """fn() under the NumPy engine and under the Numba engine."""
    engine("numpy")
    ref = fn()
    engine("numba")
    return ref, fn()


def _threads(fn, monkeypatch):
    """fn() with 1 and with 2 Numba threads (every call split, however small)."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2")
    monkeypatch.setattr(fused, "MIN_VALUES_PER_THREAD", 1)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = fn()
        numba.set_num_threads(2)
        two = fn()
    finally:
        numba.set_num_threads(before)
    return one, two


def _close(a, b, dtype, scale=None, tol=None):
    """Equal within the dtype's tolerance; the absolute one scaled by ``scale`` (default: the largest
    value of ``b``): sums that cancel lose their relative accuracy, and the two engines add in
    different orders."""
    tol = tol or TOL[dtype]
    if scale is None:
        scale = float(np.nanmax(np.abs(b))) if np.size(b) else 1.0
    np.testing.assert_allclose(a, b, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale))


# --------------------------------------------------------------------------- choosing the engine
def test_resolve_engine(monkeypatch):
    a32, a64 = np.ones(3, np.float32), np.ones(3)
    monkeypatch.delenv(VAR, raising=False)
    assert fused.resolve_engine(a32) == fused.resolve_engine(a64, a64) == "numba"
    assert fused.resolve_engine(a32, a64) == "numpy"  # mixed dtypes: the array steps decide
    assert fused.resolve_engine(np.ones(3, np.float16)) == fused.resolve_engine(np.ones(3, int)) == "numpy"
    monkeypatch.setenv(VAR, "NumPy ")
    assert fused.resolve_engine(a32) == "numpy"
    monkeypatch.setenv(VAR, "numba")
    assert fused.resolve_engine(a32) == "numba"
    monkeypatch.setenv(VAR, "fast")
    with pytest.raises(ValueError, match="NLREF_NN_ENGINE must be one of"):
        fused.resolve_engine(a32)


def test_other_libraries_take_the_array_steps(monkeypatch):
    xp = pytest.importorskip("array_api_strict")
    monkeypatch.setenv(VAR, "numba")
    s = xp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5)))
    assert fused.resolve_engine(s) == "numpy"
    p, _ = F.softmax_forward(s)
    assert type(p) is type(s)
    np.testing.assert_allclose(np.asarray(p), F.softmax_forward(np.asarray(s))[0], rtol=1e-12)


# --------------------------------------------------------------------------- softmax
def _logits(shape, dtype, seed=0, spread=5.0):
    return (np.random.default_rng(seed).standard_normal(shape) * spread).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 13), (1, 1, 1), (2, 5, 1), (1, 3, 203), (4, 33)])
def test_softmax_equals_numpy(engine, dtype, shape):
    s = _logits(shape, dtype)
    (p0, c0), (p1, c1) = _both(engine, lambda: F.softmax_forward(s))
    _close(p1, p0, dtype)
    assert p1.dtype == dtype and p1.shape == shape
    dp = _logits(shape, dtype, seed=1)
    _close(F.softmax_backward(dp, c1), _both(engine, lambda: F.softmax_backward(dp, c0))[0], dtype)
    engine("numpy")
    _close(F.softmax_backward(dp, c1), F.softmax_backward(dp, c0), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_rows_extreme_logits(dtype):
    """Large logits, -inf (masked) keys, a row of -inf, NaN: as NumPy computes them."""
    s = _logits((4, 6, 9), dtype)
    s[0] *= 1e6  # large logits: exponents far below -87 give (near) 0
    s[0, 0, 0] = np.finfo(dtype).max
    s[1, 2, [0, 4]] = -np.inf
    s[2, 3, :] = -np.inf  # NumPy: exp(-inf - -inf) = NaN
    s[3, 1, 5] = np.nan
    with np.errstate(invalid="ignore"):
        ref = np.exp(s - np.max(s, axis=2, keepdims=True))
    ours = s.copy()
    sums = fused.softmax_rows(ours)
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    assert ours[1, 2, 0] == ours[1, 2, 4] == 0
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(ours[ok], ref[ok], **TOL[dtype])
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(sums, ref.sum(axis=2), **TOL[dtype])
    assert np.all(np.isfinite(ours[:2])) and np.all(ours[:2] <= 1)


def test_softmax_float32_exp_accuracy():
    """The float32 exponential against float64's, over the range it serves ([-87, 0])."""
    x = np.linspace(-87, 0, 100_001).astype(np.float32)
    s = np.concatenate([[np.float32(0)], x])[None]  # the row's maximum is 0, so s - max = x
    fused.softmax_rows(s)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(s[0, 1:] - exact) / ulp) < 2


# --------------------------------------------------------------------------- batch norm
def _bn_input(shape, dtype, last, seed=0):
    x = (np.random.default_rng(seed).standard_normal(shape) * 3 + 1.5).astype(dtype)
    if last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        x = np.moveaxis(x, -1, 1)  # stored channels-last
    return x


def _bn(x, dout, training, seed=2):
    rng = np.random.default_rng(seed)
    c = x.shape[1]
    gamma, beta = rng.standard_normal(c).astype(x.dtype), rng.standard_normal(c).astype(x.dtype)
    state = {"running_mean": rng.standard_normal(c).astype(x.dtype),
             "running_var": rng.uniform(0.5, 2, c).astype(x.dtype)}
    out, cache = F.batchnorm_forward(x, gamma, beta, state, training=training)
    dx, dgamma, dbeta = F.batchnorm_backward(dout, cache)
    return out, dx, dgamma, dbeta, state["running_mean"], state["running_var"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("last", [False, True], ids=["BCN", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 3, 2), (3, 64, 2, 9, 11), (2, 7, 600)])
def test_batchnorm_equals_numpy(engine, dtype, last, training, shape):
    x = _bn_input(shape, dtype, last)
    dout = _bn_input(shape, dtype, last, seed=1)
    ref, ours = _both(engine, lambda: _bn(x, dout, training))
    for a, b in zip(ours, ref):
        assert a.dtype == dtype and a.shape == b.shape
        _close(a, b, dtype)
    assert ours[0].strides == ref[0].strides  # the output is stored as the input was


def test_batchnorm_takes_the_array_steps_for_other_storage(engine):
    x = _bn_input((3, 4, 10), np.float64, False)[:, :, ::2]  # neither C-contiguous nor channels-last
    dout = np.ones_like(x)
    ref, ours = _both(engine, lambda: _bn(x, dout, True))
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


def test_batchnorm_gamma_zero_gives_exact_zero_gradient(engine):
    engine("numba")
    x = _bn_input((2, 3, 5), np.float32, True)
    z = np.zeros(3, np.float32)
    out, cache = F.batchnorm_forward(x, z, z, {"running_mean": z, "running_var": z + 1}, training=True)
    dx = F.batchnorm_backward(np.ones_like(x), cache)[0]
    assert not np.any(out) and not np.any(dx)


@pytest.mark.parametrize("last", [False, True], ids=["BCN", "channels_last"])
def test_batchnorm_same_bits_for_any_threads(engine, last, monkeypatch):
    engine("numba")
    x = _bn_input((4, 16, 3, 33, 20), np.float32, last)  # several blocks of BN_ROWS positions
    dout = _bn_input(x.shape, np.float32, last, seed=1)
    one, two = _threads(lambda: _bn(x, dout, True), monkeypatch)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- max pooling
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel", [((2, 3, 4, 7, 9), (1, 2, 2)), ((2, 3, 5, 6), (2, 3)), ((3, 2, 11), (2,)),
                                           ((1, 1, 1, 2, 2), (1, 2, 2)), ((2, 2, 4, 6, 6), (2, 2, 2))])
def test_maxpool_gives_the_numpy_bits(engine, dtype, shape, kernel):
    """The same maxima and routing, to the bit: ties (to the first sample), NaN, an infinite gradient."""
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 3, size=shape).astype(dtype)  # many ties
    x.reshape(-1)[min(5, x.size - 1)] = np.nan
    dout_shape = tuple(shape[:2]) + tuple(n // k for n, k in zip(shape[2:], kernel))
    dout = rng.standard_normal(dout_shape).astype(dtype)
    dout.reshape(-1)[-1] = np.inf

    def run():
        out, cache = F.maxpool_forward(x, kernel)
        with np.errstate(invalid="ignore"):
            return out, F.maxpool_backward(dout, cache)
    (out0, dx0), (out1, dx1) = _both(engine, run)
    np.testing.assert_array_equal(out1, out0)
    np.testing.assert_array_equal(dx1, dx0)
    assert dx1.dtype == dtype and dx1.shape == shape


@pytest.mark.parametrize("shape, kernel", [((2, 6, 4, 7, 9), (1, 2, 2)), ((3, 6, 11), (2,))])
def test_maxpool_reads_a_slice_of_channels_in_place(engine, monkeypatch, shape, kernel):
    """The block pools phi's and g's rows as channels 2..5 of one stacked array: a strided view,
    which the kernels read where it lies (no copy); the same maxima and routing, to the bit,
    on 1 and 2 threads."""
    rng = np.random.default_rng(1)
    stacked = rng.integers(-3, 3, size=shape).astype(np.float32)  # many ties
    x = stacked[:, 2:]
    h = x.shape[-2] if x.ndim > 3 else 1
    assert not x.flags.c_contiguous and np.shares_memory(fused._rows4(x, h, x.shape[-1]), stacked)
    dout = rng.standard_normal(tuple(x.shape[:2]) + tuple(n // k for n, k in zip(x.shape[2:], kernel)))
    dout = dout.astype(np.float32)

    def run():
        out, cache = F.maxpool_forward(x, kernel)
        return out, F.maxpool_backward(dout, cache)
    (out0, dx0), (out1, dx1) = _both(engine, run)
    np.testing.assert_array_equal(out1, out0)
    np.testing.assert_array_equal(dx1, dx0)
    one, two = _threads(run, monkeypatch)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- the block
def _block_step(mode, sub_sample, dtype, shape, chunk_size=None):
    block = NonLocalBlock(shape[1], mode=mode, dims=len(shape) - 2, sub_sample=sub_sample, dtype=np.dtype(dtype).name,
                          seed=3, chunk_size=chunk_size)
    block.params["bn.gamma"][:] = 0.7  # away from the identity start, so every path carries a gradient
    if mode == "concatenation":
        block.params["w_f"][:] = np.linspace(-1, 1, block.params["w_f"].shape[0])
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    dz = rng.standard_normal(shape).astype(dtype)
    out = [block.forward(x), block.backward(dz)]
    return out + [block.grads[k] for k in sorted(block.grads)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian", "dot_product", "concatenation"])
@pytest.mark.parametrize("sub_sample", [True, False])
def test_block_equals_numpy(engine, dtype, mode, sub_sample):
    shape = (2, 6, 3, 5, 7)  # odd sizes; N' = 3 * 2 * 3 keys when subsampled
    ref, ours = _both(engine, lambda: _block_step(mode, sub_sample, dtype, shape))
    # Some gradients are 0 but for rounding (the biases before the batch norm, theta's bias under
    # a softmax): the absolute tolerance is scaled by the largest value of the whole step.
    scale = max(float(np.max(np.abs(b))) for b in ref)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else TOL[dtype]  # float32: sums of sums
    for a, b in zip(ours, ref):
        _close(a, b, dtype, scale=scale, tol=tol)


def test_block_one_key_batch_one(engine):
    shape = (1, 4, 1, 2, 2)  # subsampled by (1, 2, 2): a single key
    ref, ours = _both(engine, lambda: _block_step("embedded_gaussian", True, np.float64, shape))
    scale = max(float(np.max(np.abs(b))) for b in ref)
    for a, b in zip(ours, ref):
        _close(a, b, np.float64, scale=scale)


@pytest.mark.parametrize("mode", ["embedded_gaussian", "concatenation"])
def test_block_same_bits_for_any_threads(engine, mode, monkeypatch):
    engine("numba")
    one, two = _threads(lambda: _block_step(mode, True, np.float32, (4, 8, 2, 6, 10)), monkeypatch)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_different_blocks_in_threads_at_once_give_the_bits_of_one_by_one(engine, monkeypatch):
    """Two blocks (an inference server's, two models trained side by side) stepping at once in two
    threads share the pool of the fused passes, every call split (2 threads): each gets its own bits."""
    from concurrent.futures import ThreadPoolExecutor

    engine("numba")
    monkeypatch.setattr(fused, "MIN_VALUES_PER_THREAD", 1)
    monkeypatch.setattr(fused, "threads", lambda: 2)
    steps = [(mode, sub) for mode in ("embedded_gaussian", "concatenation") for sub in (True, False)]
    alone = [_block_step(mode, sub, np.float32, (4, 8, 2, 6, 10)) for mode, sub in steps]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda k: _block_step(*steps[k % 4], np.float32, (4, 8, 2, 6, 10)), range(12)))
    for k, results in enumerate(together):
        for a, b in zip(results, alone[k % 4]):
            np.testing.assert_array_equal(a, b)


def _softmax_in_child(s, queue):
    queue.put(fused.softmax_rows(s.copy(), normalise=True))


# Python 3.12+ warns of any fork() in a process with threads (DeprecationWarning: "This process (pid=...) is
# multi-threaded, use of fork() may lead to deadlocks in the child"): here the pool's threads run on purpose
@pytest.mark.filterwarnings(r"ignore:This process \(pid=\d+\) is multi-threaded, use of fork\(\):DeprecationWarning")
def test_a_forked_child_gets_its_own_thread_pool():
    """A process forked after the pool ran (Dask's and multiprocessing's fork start method)
    finds no pool threads behind the parent's pool object: its calls must start a new one,
    not wait forever for threads that do not exist there."""
    import multiprocessing
    import queue as queues

    if fused.threads() < 2:
        pytest.skip("the thread pool runs only with 2 or more Numba threads")
    s = np.random.default_rng(0).standard_normal((64, 4 * fused.MIN_VALUES_PER_THREAD // 64))
    expected = fused.softmax_rows(s.copy(), normalise=True)  # the parent's pool now exists
    assert fused._pool is not None
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_softmax_in_child, args=(s, results))
    child.start()
    try:
        got = results.get(timeout=120)
    except queues.Empty:
        pytest.fail("the forked child's softmax did not finish in 120 s (it waited on the parent's pool)")
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("failing", ["caller", "waiting", "pool"])
def test_no_run_goes_on_after_a_call_that_raised(monkeypatch, failing):
    """A call interrupted (Ctrl-C arrives in the calling thread, during its own run or while it waits for
    the pool's) or failing in one of its runs comes out only once no run writes into its arrays any more:
    they may be a block's workspace, which the next call reuses at once. The pool's runs went on writing
    after the error had come out."""
    import signal
    import threading
    import time

    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(fused, "threads", lambda: 3)
    monkeypatch.setattr(fused, "MIN_VALUES_PER_THREAD", 1)
    pool = ThreadPoolExecutor(2)  # one thread per run, whatever the machine
    monkeypatch.setattr(fused, "_pool", pool)
    out = np.zeros(3)
    slow_run = threading.Event()

    def kernel(out, start, stop):
        if start == {"caller": 0, "pool": 1}.get(failing):
            slow_run.wait(5)  # a run is under way when this one fails
            raise KeyboardInterrupt if failing == "caller" else ValueError("a run failed")
        if start == 2:
            slow_run.set()
            if failing == "waiting":  # Ctrl-C while the calling thread, its own run done, waits for this one
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.3)
        out[start:stop] = 1

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("a signal reaches the main thread only")
    with pytest.raises(ValueError if failing == "pool" else KeyboardInterrupt):
        fused._run(kernel, 3, 3, out)
    seen = out.copy()
    time.sleep(0.5)
    np.testing.assert_array_equal(out, seen)  # nothing written after the call came out
    assert seen[2] == 1  # the run under way was waited for, not dropped
    s = np.random.default_rng(0).standard_normal((4, 6))
    monkeypatch.setattr(fused, "threads", lambda: 2)
    np.testing.assert_array_equal(fused.softmax_rows(s.copy(), normalise=True),
                                  fused.softmax_rows(s.copy(), normalise=True))  # the pool still works
    pool.shutdown()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("old", [np.inf, np.nan])
def test_concat_scores_read_nothing_from_the_reused_buffer(engine, dtype, old):
    """The concatenation's scores go into a workspace buffer that keeps the last call's values (or
    np.empty's): an inf or NaN left there (a call on non-finite inputs) must not change the next call.
    The kernel once took its 0 as ``out[0, 0, 0] - out[0, 0, 0]``: NaN after such a call."""
    from nlref.nn.engine import NonLocalWorkspace
    from nlref.nn.nonlocal_op import nonlocal_forward

    engine("numba")
    rng = np.random.default_rng(4)
    theta, phi, g = (rng.standard_normal(s).astype(dtype) for s in ((2, 3, 5), (2, 3, 7), (2, 2, 7)))
    w_f = rng.standard_normal(6).astype(dtype)
    args = dict(mode="concatenation", w_f=w_f, chunk_size=4)  # chunked: the scores go through the buffer
    fresh, _ = nonlocal_forward(theta, phi, g, **args)
    out = np.full(2 * 5 * 4, old, dtype=dtype)  # as a call on non-finite inputs leaves it
    fused.concat_scores(np.zeros((2, 5), dtype), np.full((2, 4), -1, dtype), out.reshape(2, 5, 4))
    np.testing.assert_array_equal(out, 0)  # ReLU(0 - 1)
    workspace = NonLocalWorkspace()
    bad = np.full_like(theta, old)
    with np.errstate(invalid="ignore", over="ignore"):
        nonlocal_forward(bad, phi, g, workspace=workspace, **args)
    y, _ = nonlocal_forward(theta, phi, g, workspace=workspace, **args)
    np.testing.assert_array_equal(y, fresh)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first", [np.inf, -np.inf])
def test_softmax_backward_infinite_gradient_as_numpy(engine, dtype, first):
    """An infinite dp spreads as NumPy's p * (dp - sum(dp p)) spreads it: -inf (or inf) at the row's other
    samples, NaN at its own. The kernel once took the row's 0 as dp[i, 0] - dp[i, 0], NaN there: the
    whole row came out NaN when its first sample was infinite."""
    p, cache = F.softmax_forward(np.array([[0.1, 0.5, -0.2], [0.3, 0.0, 1.0]], dtype))
    dp = np.array([[first, 1.0, 2.0], [1.0, first, 2.0]], dtype)
    with np.errstate(invalid="ignore"):
        ref, ours = _both(engine, lambda: F.softmax_backward(dp, cache))
    np.testing.assert_array_equal(ours, ref)
    assert np.isnan(ref).sum() == 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("last", [False, True])
def test_batchnorm_eval_backward_does_not_read_x(engine, dtype, last):
    """In eval mode dx = dout gamma / sqrt(var + eps), x out of it (the textbook's formula): an infinite
    or NaN input sample leaves its dx finite. The fused pass once computed k1 dout + (x - mean) 0 + 0,
    NaN there."""
    x = _bn_input((2, 3, 4, 5), dtype, last)
    x[0, 1, 2, 3], x[1, 2, 0, 0] = np.inf, np.nan
    dout = np.random.default_rng(7).standard_normal(x.shape).astype(dtype)
    gamma, beta = np.linspace(0.5, 2, 3).astype(dtype), np.zeros(3, dtype)

    def step():
        state = {"running_mean": np.full(3, 0.1, dtype), "running_var": np.full(3, 2.0, dtype)}
        with np.errstate(invalid="ignore"):
            _, cache = F.batchnorm_forward(x, gamma, beta, state, training=False)
        return F.batchnorm_backward(dout, cache)[0]

    ref, ours = _both(engine, step)
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(ours, ref)
