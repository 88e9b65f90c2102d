"""The engine against the textbook, on many random configurations (seeded loops).

Each case runs a layer through the engine (``NLREF_NN_ENGINE=numpy`` or ``numba``, a reused
:class:`~nlref.nn.engine.NonLocalWorkspace` or none, the factored routes on or off, the fused
passes split between threads from one value a thread or not, inputs in random storage orders) and
through its textbook definition in float64, forward and backward, and checks that:

* the results agree: float64 to 1e-10, float32 to 2e-5 relative, or within 4 times the textbook's
  own float32 error where rounding in float32 is larger than that (a softmax over wide logits, batch
  norm over a handful of values);
* no input is written to;
* no result of one call is changed by the next call (a result that aliased a reused buffer would be);
* a second ``backward`` for one forward is refused.

The textbook float64 values scale each comparison; a gradient that is 0 but for rounding (a bias
before a training batch norm, theta's bias under a softmax) is compared on the scale of the largest
gradient of the step. Many more seeds were run while writing this file (see the pengine report);
the suite runs a few hundred cases.
"""

from __future__ import annotations

import numpy as np
import pytest

from nlref.nn import NonLocalBlock
from nlref.nn import functional as F
from nlref.nn.engine import NonLocalWorkspace
from nlref.nn.engine import conv as conv_engine
from nlref.nn.engine import nonlocal_op as engine_op
from nlref.nn.nonlocal_op import nonlocal_backward, nonlocal_forward
from tests.helpers import random_layout

pytest.importorskip("numba", reason="the fuzzer compares the NumPy engine with the Numba one")
fused = pytest.importorskip("nlref.nn.engine.fused_numba")

VAR = fused.ENGINE_VARIABLE
MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
TOL = {np.float32: 2e-5, np.float64: 1e-10}
BLOCK_TOL = {np.float32: 2e-4, np.float64: 1e-9}  # a step of five layers, batch norm among them


@pytest.fixture
def knobs(monkeypatch):
    """knobs(engine, factored, split) sets the engine, the factored modes and the thread split."""
    def set_(engine, factored=True, split=False):
        monkeypatch.setenv(VAR, engine)
        monkeypatch.setattr(engine_op, "FACTORED_MODES", ("dot_product", "concatenation") if factored else ())
        monkeypatch.setattr(fused, "MIN_VALUES_PER_THREAD", 1 if split else 2**20)
    return set_


def _close(a, b, dtype, what, *, floor=0.0, same=None, tol=TOL):
    """a (the engine's) against b (the float64 textbook's); ``same``: the textbook's in a's dtype."""
    assert a.shape == b.shape, f"{what}: shape {a.shape} against {b.shape}"
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b), initial=0)), floor, 1e-300)
    err = float(np.max(np.abs(a - b), initial=0)) / scale
    base = 0.0 if same is None else float(np.max(np.abs(np.asarray(same, np.float64) - b), initial=0)) / scale
    assert err <= max(tol[dtype], 4 * base), f"{what}: relative error {err:.3g}"


# --------------------------------------------------------------------------- the non-local operation
def _op_case(rng, workspace, knobs):
    dtype = (np.float32, np.float64)[rng.integers(2)]
    mode = MODES[rng.integers(4)]
    b, d, dg = (int(v) for v in rng.integers(1, 5, size=3))
    n, m = (int(v) for v in rng.integers(1, 30, size=2))
    theta, phi, g, dy = (rng.standard_normal(s) for s in ((b, d, n), (b, d, m), (b, dg, m), (b, dg, n)))
    w_f = rng.standard_normal(2 * d) if mode == "concatenation" else None
    kind = int(rng.integers(3))
    if kind == 1:  # small integers: ties in every sort, scores exactly at the ReLU's kink
        theta, phi, g, dy = (np.round(2 * a) for a in (theta, phi, g, dy))
        w_f = None if w_f is None else np.round(2 * w_f)
    elif kind == 2:  # wide logits
        theta, phi = 10 * theta, 10 * phi
    theta, phi, g, dy = (a.astype(dtype) for a in (theta, phi, g, dy))
    w_f = None if w_f is None else w_f.astype(dtype)
    scale = float(rng.choice([1.0, 0.5])) if mode in ("gaussian", "embedded_gaussian") else 1.0
    chunk = None if rng.random() < 0.5 else int(rng.integers(1, m + 3))
    engine, factored, split = ("numpy", "numba")[rng.integers(2)], bool(rng.random() < 0.7), bool(rng.random() < 0.5)
    info = dict(dtype=dtype.__name__, mode=mode, shape=(b, d, dg, n, m), kind=kind, chunk=chunk, engine=engine,
                factored=factored, split=split)
    knobs("numpy", factored=False)
    wide = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    y64, c64 = nonlocal_forward(wide(theta), wide(phi), wide(g), mode=mode, scale=scale, w_f=wide(w_f))
    g64 = nonlocal_backward(wide(dy), c64)
    ys, cs = nonlocal_forward(theta, phi, g, mode=mode, scale=scale, w_f=w_f)
    gs = nonlocal_backward(dy, cs)
    knobs(engine, factored, split)
    ins = [None if a is None else random_layout(rng, a) for a in (theta, phi, g, w_f, dy)]
    copies = [None if a is None else a.copy() for a in ins]
    ws = workspace if rng.random() < 0.8 else None
    y, cache = nonlocal_forward(*ins[:3], mode=mode, scale=scale, w_f=ins[3], chunk_size=chunk, workspace=ws)
    y_kept = y.copy()
    grads = nonlocal_backward(ins[4], cache)
    for a, c in zip(ins, copies):
        assert a is None or np.array_equal(a, c), f"an input was written to: {info}"
    assert np.array_equal(y, y_kept), f"backward wrote over y: {info}"
    floor = (1.0 if dtype == np.float32 else 1e-3) * max(float(np.max(np.abs(r))) for r in (y64, *g64) if r is not None)
    assert y.dtype == dtype
    _close(y, y64, dtype, f"y {info}", floor=floor, same=ys)
    for name, a, r, s in zip(("dtheta", "dphi", "dg", "dw_f"), grads, g64, gs):
        assert (a is None) == (r is None), f"{name} {info}"
        if r is not None:
            assert a.dtype == dtype, f"{name} {info}"
            _close(a, r, dtype, f"{name} {info}", floor=floor, same=s)
    return info, [y] + [a for a in grads if a is not None]


@pytest.mark.parametrize("seed", range(4))
def test_nonlocal_op_engine_equals_textbook(knobs, seed):
    """One workspace shared by 80 calls of changing shapes, dtypes, modes, routes and engines."""
    rng = np.random.default_rng(100 + seed)
    workspace = NonLocalWorkspace()
    previous = None
    for _ in range(80):
        info, results = _op_case(rng, workspace, knobs)
        if previous is not None:
            pinfo, kept, copies = previous
            for a, c in zip(kept, copies):
                assert np.array_equal(a, c), f"a result was changed by the next call: {pinfo}"
        previous = info, results, [a.copy() for a in results]


# --------------------------------------------------------------------------- the block
def _block_config(rng):
    mode = MODES[rng.integers(4)]
    dims = int(rng.integers(1, 4))
    sub = bool(rng.random() < 0.7)
    pool, kernel = "after", None
    if sub:
        pool = ("after", "before", "flattened")[rng.integers(3)]
        if rng.random() < 0.5:  # odd windows, remainders
            kernel = tuple(int(k) for k in rng.integers(1, 4, size=1 if pool == "flattened" else dims))
    return dict(mode=mode, dims=dims, sub_sample=sub, pool=pool, pool_kernel=kernel,
                W_z_bias=bool(rng.random() < 0.5), projection_bias=bool(rng.random() < 0.5),
                bn_layer=bool(rng.random() < 0.7), chunk_size=None if rng.random() < 0.6 else int(rng.integers(1, 20)),
                scale=bool(rng.random() < 0.5) if mode in ("gaussian", "embedded_gaussian") else False,
                in_channels=int(rng.integers(1, 6)), inter_channels=int(rng.integers(1, 5)))


def _block_shape(rng, block):
    spatial_kernel = block.kernel if block.sub_sample and block.pool != "flattened" else (1,) * block.dims
    while True:
        spatial = tuple(int(rng.integers(k, k + 6)) for k in spatial_kernel)
        if not block._too_small(spatial):
            return (int(rng.integers(1, 4)), block.in_channels) + spatial


def _block_calls(rng, knobs):
    cfg = _block_config(rng)
    dtype = (np.float32, np.float64)[rng.integers(2)]
    block = NonLocalBlock(dtype=dtype.__name__, **cfg)
    ref64 = NonLocalBlock(dtype="float64", **cfg)
    ref = NonLocalBlock(dtype=dtype.__name__, **cfg)
    ref64._workspace = ref._workspace = None  # the textbook's steps
    for k in block.params:  # away from the identity at initialisation (gamma = 0)
        block.params[k] = (0.5 * rng.standard_normal(block.params[k].shape)).astype(dtype)
    if rng.random() < 0.3:
        block.eval()
    previous = None
    for call in range(3):  # one block, changing shapes: its workspace reused
        shape = _block_shape(rng, block)
        x, dz = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
        attention = bool(rng.random() < 0.3)
        engine, factored, split = ("numpy", "numba")[rng.integers(2)], bool(rng.random() < 0.7), bool(rng.random() < 0.5)
        info = dict(cfg, dtype=dtype.__name__, shape=shape, call=call, training=block.training, engine=engine,
                    factored=factored, split=split, attention=attention)
        knobs("numpy", factored=False)
        outs = {}
        try:
            for name, r, cast in (("64", ref64, np.float64), ("same", ref, dtype)):
                r.params = {k: v.astype(cast) for k, v in block.params.items()}
                r.buffers = {k: v.astype(cast) for k, v in block.buffers.items()}
                r.training = block.training
                z = r.forward(x.astype(cast), return_attention=attention)
                outs[name] = (z, r.backward(dz.astype(cast)), dict(r.grads), dict(r.buffers))
        except ValueError:  # batch norm refusing one value per channel: the block must refuse too
            knobs(engine, factored, split)
            with pytest.raises(ValueError):
                block.forward(x)
            continue
        knobs(engine, factored, split)
        xl, dzl = random_layout(rng, x), random_layout(rng, dz)
        z = block.forward(xl, return_attention=attention)
        dx = block.backward(dzl)
        with pytest.raises(RuntimeError):
            block.backward(dzl)
        assert np.array_equal(xl, x) and np.array_equal(dzl, dz), f"an input was written to: {info}"
        (z64, dx64, g64, b64), (zs, dxs, gs, bs) = outs["64"], outs["same"]
        if attention:
            (z, att), (z64, att64), (zs, atts) = z, z64, zs
            _close(att, att64, dtype, f"attention {info}", floor=1e-3, same=atts, tol=BLOCK_TOL)
        floor = 1e-3 * max(float(np.abs(z64).max()), float(np.abs(dx64).max()))
        _close(z, z64, dtype, f"z {info}", floor=floor, same=zs, tol=BLOCK_TOL)
        _close(dx, dx64, dtype, f"dx {info}", floor=floor, same=dxs, tol=BLOCK_TOL)
        gscale = max([float(np.abs(dx64).max())] + [float(np.abs(v).max()) for v in g64.values()])
        for k in block.params:
            _close(block.grads[k], g64[k], dtype, f"grad {k} {info}", same=gs[k], tol=BLOCK_TOL,
                   floor=(3e-2 if dtype == np.float32 else 1e-3) * gscale)
        for k in block.buffers:
            _close(block.buffers[k], b64[k], dtype, f"{k} {info}", floor=1e-3, same=bs[k], tol=BLOCK_TOL)
        results = [z, dx] + list(block.grads.values()) + ([att] if attention else [])
        if previous is not None:
            pinfo, kept, copies = previous
            for a, c in zip(kept, copies):
                assert np.array_equal(a, c), f"a result was changed by the next call: {pinfo}"
        previous = info, results, [a.copy() for a in results]


@pytest.mark.parametrize("seed", range(4))
def test_block_engine_equals_textbook(knobs, seed):
    rng = np.random.default_rng(200 + seed)
    for _ in range(25):
        _block_calls(rng, knobs)


# --------------------------------------------------------------------------- layers of the networks
def _maxpool_case(rng, dtype):
    nd = int(rng.integers(1, 4))
    kernel = tuple(int(k) for k in rng.integers(1, 4, size=nd))
    spatial = tuple(k + int(rng.integers(0, 5)) for k in kernel)  # remainders outside every window
    shape = (int(rng.integers(1, 4)), int(rng.integers(1, 4))) + spatial
    x = rng.standard_normal(shape)
    if rng.random() < 0.3:
        x = np.round(x)  # ties
    x = random_layout(rng, x.astype(dtype))
    dout = random_layout(rng, rng.standard_normal(shape[:2] + tuple(n // k for n, k in zip(spatial, kernel))).astype(dtype))

    def step():
        out, cache = F.maxpool_forward(x, kernel)
        return out.copy(), F.maxpool_backward(dout, cache)
    return step, (x, dout), True  # the same bits


def _softmax_case(rng, dtype):
    shape = tuple(int(n) for n in rng.integers(1, 7, size=int(rng.integers(1, 4))))
    s = random_layout(rng, (3 * rng.standard_normal(shape)).astype(dtype))
    dp = random_layout(rng, rng.standard_normal(shape).astype(dtype))

    def step():
        p, cache = F.softmax_forward(s)
        return p.copy(), F.softmax_backward(dp, cache)
    return step, (s, dp), False


def _batchnorm_case(rng, dtype, monkeypatch):
    nd = int(rng.integers(0, 4))
    shape = (int(rng.integers(2, 4)), int(rng.integers(1, 5))) + tuple(int(n) for n in rng.integers(1, 5, size=nd))
    x = random_layout(rng, (rng.standard_normal(shape) + rng.standard_normal((1, shape[1]) + (1,) * nd)).astype(dtype))
    monkeypatch.setattr(fused, "BN_CHANNELS_LAST", bool(rng.random() < 0.5))
    c = shape[1]
    gamma, beta, mean = (rng.standard_normal(c).astype(dtype) for _ in range(3))
    var = (rng.random(c) + 0.5).astype(dtype)
    training = bool(rng.random() < 0.7)
    dout = random_layout(rng, rng.standard_normal(shape).astype(dtype))

    def step():
        state = {"running_mean": mean.copy(), "running_var": var.copy()}
        out, cache = F.batchnorm_forward(x, gamma, beta, state, training=training)
        return (out.copy(),) + F.batchnorm_backward(dout, cache) + (state["running_mean"], state["running_var"])
    return step, (x, dout, gamma, beta, mean, var), False


@pytest.mark.parametrize("seed", range(3))
def test_fused_layers_equal_numpy(knobs, monkeypatch, seed):
    """Max pool (the same bits), softmax and batch norm: Numba against NumPy, split or not."""
    rng = np.random.default_rng(300 + seed)
    for _ in range(60):
        dtype = (np.float32, np.float64)[rng.integers(2)]
        which = int(rng.integers(3))
        if which == 2:
            step, inputs, exact = _batchnorm_case(rng, dtype, monkeypatch)
        else:
            step, inputs, exact = (_maxpool_case, _softmax_case)[which](rng, dtype)
        copies = [a.copy() for a in inputs]
        knobs("numpy")
        ref = step()
        knobs("numba", split=bool(rng.random() < 0.5))
        ours = step()
        for a, c in zip(inputs, copies):
            assert np.array_equal(a, c), "an input was written to"
        for k, (a, r) in enumerate(zip(ours, ref)):
            if exact:
                np.testing.assert_array_equal(a, r)
            else:
                floor = float(np.abs(inputs[1]).max()) if which == 1 else \
                    1e-2 * max(float(np.abs(v).max()) for v in ref)
                _close(a, r, dtype, f"case {which} output {k}", floor=floor)


@pytest.mark.parametrize("seed", range(2))
def test_conv_engine_equals_conv3d_reference(monkeypatch, seed):
    """The convolution's engine against its loop definition, its thresholds moved so that every plan runs."""
    rng = np.random.default_rng(400 + seed)
    for _ in range(25):
        dtype = (np.float32, np.float64)[rng.integers(2)]
        b, c, o = (int(v) for v in rng.integers(1, 4, size=3))
        kernel = tuple(int(k) for k in rng.integers(1, 4, size=3))
        stride = tuple(int(s) for s in rng.integers(1, 3, size=3)) if rng.random() < 0.5 else (1, 1, 1)
        padding = tuple(int(p) for p in rng.integers(0, 2, size=3)) if rng.random() < 0.5 else (0, 0, 0)
        spatial = tuple(k + int(rng.integers(0, 5)) for k in kernel)
        x = random_layout(rng, rng.standard_normal((b, c) + spatial).astype(dtype))
        w = random_layout(rng, rng.standard_normal((o, c) + kernel).astype(dtype))
        bias = rng.standard_normal(o).astype(dtype) if rng.random() < 0.5 else None
        for name, values in (("CONV_CHUNK_BYTES", [2 << 20, 64]), ("CONV_KEEP_BYTES", [64 << 20, 0]),
                             ("CONV_PAIR_CHANNELS", [16, 0]), ("DENSE_MAX_RATIO", [1, 0, 100])):
            monkeypatch.setattr(conv_engine, name, values[rng.integers(len(values))])
        out_spatial = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(spatial, kernel, stride, padding))
        dout = random_layout(rng, rng.standard_normal((b, o) + out_spatial).astype(dtype))
        copies = [x.copy(), w.copy(), dout.copy()]
        ref, ref_cache = F.conv3d_reference(x, w, bias, stride=stride, padding=padding)
        ref_grads = F.conv3d_reference_backward(dout, ref_cache)
        out, cache = F.conv3d_forward(x, w, bias, stride=stride, padding=padding)
        kept = out.copy()
        grads = F.conv3d_backward(dout, cache)
        F.conv3d_forward(2 * x, w, bias, stride=stride, padding=padding)  # must not write over the first
        assert np.array_equal(out, kept)
        for a, c in zip((x, w, dout), copies):
            assert np.array_equal(a, c), "an input was written to"
        _close(out, ref, dtype, "out", floor=1e-2 * float(np.abs(ref).max()))
        for name, a, r in zip(("dx", "dw", "db"), grads, ref_grads):
            assert (a is None) == (r is None)
            if r is not None:
                _close(a, r, dtype, name, floor=1e-2 * float(np.abs(r).max()))


# --------------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("bad", ["dy", "theta"])
def test_concat_matrix_route_routes_like_relu_backward(knobs, engine, chunk_size, bad):
    """The concatenation's backward through the workspace routes df by the ReLU as the textbook's
    relu_backward does, a product with the 0/1 mask: an infinite df where f <= 0 gives NaN (it once
    wrote 0 there, hiding the infinity), and a NaN score routes nothing (it once routed df)."""
    knobs(engine, factored=False)
    rng = np.random.default_rng(5)
    theta, phi, g, dy = (rng.standard_normal(s) for s in ((2, 2, 3), (2, 2, 4), (2, 2, 4), (2, 2, 3)))
    w_f = rng.standard_normal(4)
    if bad == "dy":
        dy[0, 0, 1] = np.inf
    else:
        theta[0, 0, 1] = np.nan
    results = []
    for workspace in (None, NonLocalWorkspace()):
        with np.errstate(invalid="ignore"):
            y, cache = nonlocal_forward(theta, phi, g, mode="concatenation", w_f=w_f, chunk_size=chunk_size,
                                        workspace=workspace)
            results.append((y,) + nonlocal_backward(dy, cache))
    for ours, textbook in zip(*reversed(results)):
        np.testing.assert_allclose(ours, textbook, rtol=1e-12, atol=1e-14, equal_nan=True)


def _sprinkle(rng, a):
    """``a`` with one or two samples made inf, -inf or NaN."""
    a = a.copy()
    flat = a.reshape(-1)
    for _ in range(int(rng.integers(1, 3))):
        flat[rng.integers(flat.size)] = rng.choice([np.inf, -np.inf, np.nan])
    return a


def _same_non_finite(ours, ref, dtype, what):
    """The same NaN and infinite samples (infinities of one sign), the finite ones close."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, what
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref), err_msg=what)
    np.testing.assert_array_equal(np.where(np.isinf(ours), ours, 0), np.where(np.isinf(ref), ref, 0), err_msg=what)
    finite = np.isfinite(ref)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours[finite], ref[finite], err_msg=what, **tol)


@pytest.mark.parametrize("seed", range(2))
def test_non_finite_values_spread_as_in_the_textbook(knobs, monkeypatch, seed):
    """inf and NaN in an input or a gradient: the engine's NaN and infinities fall where the textbook's do
    (the non-local operation against its textbook steps; softmax, max pool, batch norm against NumPy)."""
    rng = np.random.default_rng(600 + seed)
    workspace = NonLocalWorkspace()
    for _ in range(60):
        dtype = (np.float32, np.float64)[rng.integers(2)]
        which = int(rng.integers(4))
        if which == 0:
            mode = MODES[rng.integers(4)]
            b, d, dg, n, m = (int(v) for v in rng.integers(1, 6, size=5))
            arrays = [rng.standard_normal(s).astype(dtype) for s in ((b, d, n), (b, d, m), (b, dg, m), (2 * d,), (b, dg, n))]
            targets = [0, 1, 2, 4] + ([3] if mode == "concatenation" else [])  # theta, phi, g, dy (w_f)
            k = targets[rng.integers(len(targets))]
            arrays[k] = _sprinkle(rng, arrays[k])
            w_f = arrays[3] if mode == "concatenation" else None
            chunk = None if rng.random() < 0.6 else int(rng.integers(1, m + 2))

            def step(ws=None):
                y, cache = nonlocal_forward(*arrays[:3], mode=mode, w_f=w_f, chunk_size=chunk, workspace=ws)
                y = y.copy()
                return (y,) + tuple(a for a in nonlocal_backward(arrays[4], cache) if a is not None)
            engine, factored = ("numpy", "numba")[rng.integers(2)], bool(rng.random() < 0.7)
            outcomes = []
            for setting, ws in ((("numpy", False), None), ((engine, factored), workspace)):
                knobs(*setting)
                try:
                    with np.errstate(all="ignore"):
                        outcomes.append(step(ws))
                except ValueError as error:  # an overflowed softmax: both refuse
                    outcomes.append(type(error))
            what = f"op {mode} {dtype.__name__} {engine} factored={factored} chunk={chunk}"
        else:
            if which == 1:
                shape = tuple(int(v) for v in rng.integers(1, 6, size=int(rng.integers(1, 4))))
                s, dp = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
                s, dp = (_sprinkle(rng, s), dp) if rng.random() < 0.5 else (s, _sprinkle(rng, dp))

                def step():
                    p, cache = F.softmax_forward(s)
                    return p.copy(), F.softmax_backward(dp, cache)
            elif which == 2:
                kernel = tuple(int(v) for v in rng.integers(1, 4, size=int(rng.integers(1, 4))))
                shape = (2, 2) + tuple(v + int(rng.integers(0, 3)) for v in kernel)
                x = rng.standard_normal(shape).astype(dtype)
                dout = rng.standard_normal(shape[:2] + tuple(v // k for v, k in zip(shape[2:], kernel))).astype(dtype)
                x, dout = (_sprinkle(rng, x), dout) if rng.random() < 0.6 else (x, _sprinkle(rng, dout))

                def step():
                    out, cache = F.maxpool_forward(x, kernel)
                    return out.copy(), F.maxpool_backward(dout, cache)
            else:
                shape = (2, 3) + tuple(int(v) for v in rng.integers(1, 4, size=int(rng.integers(0, 3))))
                x, dout = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
                x, dout = (_sprinkle(rng, x), dout) if rng.random() < 0.5 else (x, _sprinkle(rng, dout))
                training = bool(rng.random() < 0.6)
                monkeypatch.setattr(fused, "BN_CHANNELS_LAST", True)
                if rng.random() < 0.5 and x.ndim > 2:
                    x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
                gamma = np.linspace(0.5, 2, 3).astype(dtype)

                def step():
                    state = {"running_mean": np.zeros(3, dtype), "running_var": np.ones(3, dtype)}
                    out, cache = F.batchnorm_forward(x, gamma, gamma / 4, state, training=training)
                    return (out.copy(),) + F.batchnorm_backward(dout, cache) + (state["running_mean"], state["running_var"])
            outcomes = []
            split = bool(rng.random() < 0.5)
            for engine in ("numpy", "numba"):
                knobs(engine, split=split)
                try:
                    with np.errstate(all="ignore"):
                        outcomes.append(step())
                except ValueError as error:
                    outcomes.append(type(error))
            what = f"layer {which} {dtype.__name__} split={split}"
        ref, ours = outcomes
        if not isinstance(ref, tuple) or not isinstance(ours, tuple):
            assert ours == ref, what
            continue
        for k, (a, r) in enumerate(zip(ours, ref)):
            _same_non_finite(a, r, dtype, f"{what}, output {k}")
