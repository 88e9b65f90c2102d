"""The network layers of nlref.nn.functional: conv3d, 3-D average/max pooling, global average
pooling, dropout, linear, softmax cross-entropy. Gradient checks, PyTorch as oracle, errors."""

import math

import numpy as np
import pytest

import nlref.backend as B
from nlref.nn import _shapes
from nlref.nn import functional as F
from nlref.nn.engine import conv as EC
from nlref.nn.engine import layout as EL
from tests.helpers import assert_gradcheck, assert_same_library, distinct_samples

try:
    import torch

    TF = torch.nn.functional
except ImportError:  # the oracle is optional
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch (the optional oracle) is not installed")


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _x(rng, shape, xp, dtype="float64", device=None):
    return B.asarray(rng.standard_normal(shape).astype(dtype), xp=xp, device=device)


# array-api-strict runs the portable code path about ten times slower than NumPy: there the
# centred differences (2 forward calls per input element) check a representative case of each
# code path, and random directions (6 calls per input) check the others. NumPy runs every
# case with centred differences, and the PyTorch oracle below pins both libraries to 1e-10.
STRICT_CENTRED = {"1x3x3-pad011", "1x3x3-s122-pad011", "3x2x3-s211-pad1", "2x3x3-s1-pad011"}


def _method(xp, case, bias=True):
    return "centred" if xp is np or (case in STRICT_CENTRED and bias) else "random"


def _labels(values, xp, device=None):
    return B.asarray(np.asarray(values, dtype=np.int64), xp=xp, device=device)


# conv3d cases: (x shape, w shape, stride, padding), covering both ways to dx (flipped kernel, col2im)
CONV_CASES = {
    "1x3x3-pad011": ((2, 2, 2, 3, 3), (2, 2, 1, 3, 3), 1, (0, 1, 1)),
    "3x3x3-s2-pad1": ((1, 2, 3, 3, 4), (2, 2, 3, 3, 3), 2, 1),
    "3x1x1": ((2, 2, 4, 2, 3), (3, 2, 3, 1, 1), 1, 0),
    "1x1x1": ((2, 3, 2, 2, 3), (2, 3, 1, 1, 1), 1, 0),
    "1x3x3-s122-pad011": ((1, 2, 2, 5, 4), (2, 2, 1, 3, 3), (1, 2, 2), (0, 1, 1)),
    "1x1x1-s122": ((1, 2, 2, 5, 4), (3, 2, 1, 1, 1), (1, 2, 2), 0),
    "2x3x2-s312-pad101": ((1, 2, 4, 3, 5), (2, 2, 2, 3, 2), (3, 1, 2), (1, 0, 1)),
    "3x2x3-s211-pad1": ((1, 2, 4, 3, 3), (2, 2, 3, 2, 3), (2, 1, 1), 1),  # whole rows, dx by col2im
    "1x1x1-pad011": ((1, 2, 2, 2, 3), (2, 2, 1, 1, 1), 1, (0, 1, 1)),  # padding > kernel - 1
    # stride 1, kw > 1, even W and W': output columns can be computed in pairs
    "1x3x3-pad011-evenW": ((2, 2, 2, 3, 4), (3, 2, 1, 3, 3), 1, (0, 1, 1)),
    "3x3x3-pad1-evenW": ((1, 2, 3, 3, 4), (2, 2, 3, 3, 3), 1, 1),
    "2x2x3-evenW": ((1, 3, 3, 3, 6), (2, 3, 2, 2, 3), 1, 0),
}

# pool cases: (x shape, kernel, stride, padding): non-overlapping, overlapping, padded, odd sizes
POOL_CASES = {
    "2x2x2": ((1, 2, 4, 4, 5), 2, None, 0),
    "1x2x2": ((2, 1, 2, 5, 4), (1, 2, 2), None, 0),
    "3x3x3-s2-pad1": ((1, 1, 3, 4, 3), 3, 2, 1),
    "2x3x3-s1-pad011": ((1, 1, 3, 3, 4), (2, 3, 3), 1, (0, 1, 1)),
    "3x2x3-s212-pad101": ((1, 1, 5, 3, 5), (3, 2, 3), (2, 1, 2), (1, 0, 1)),
}


def _dense_applies(case):
    """Whether the case can take the dense per-frame path (kernel 1 x kh x kw, no temporal stride/padding)."""
    _, ws, stride, padding = CONV_CASES[case]
    stride, padding = (_shapes.triple(v, "", "", minimum=0) for v in (stride, padding))
    return ws[2] == 1 and stride[0] == 1 and padding[0] == 0


def _pairs_apply(case):
    """Whether the case can compute its output columns in pairs (stride 1, kw > 1, even W and W')."""
    xs, ws, stride, padding = CONV_CASES[case]
    stride, padding = (_shapes.triple(v, "", "", minimum=0) for v in (stride, padding))
    w_out = xs[4] + 2 * padding[2] - ws[4] + 1
    return EC._flips(tuple(ws[2:]), stride, padding) and ws[4] > 1 and xs[4] % 2 == 0 and w_out % 2 == 0


# every case by plain im2col, by the dense per-frame product and by paired im2col where those apply
CONV_PATHS = ([(case, "im2col") for case in CONV_CASES]
              + [(case, "dense") for case in CONV_CASES if _dense_applies(case)]
              + [(case, "paired") for case in CONV_CASES if _pairs_apply(case)])


@pytest.fixture
def conv_path(monkeypatch, request):
    """Force one of the three ways conv3d computes: im2col, the dense product, or im2col with paired
    output columns (the last two where they apply)."""
    monkeypatch.setattr(EC, "DENSE_MAX_RATIO", math.inf if request.param == "dense" else 0)
    monkeypatch.setattr(EC, "CONV_PAIR_CHANNELS", math.inf if request.param == "paired" else 0)
    return request.param


def _conv_inputs(rng, xp, case, bias):
    xs, ws, _, _ = CONV_CASES[case]
    inputs = {"x": _x(rng, xs, xp), "w": _x(rng, ws, xp)}
    if bias:
        inputs["b"] = _x(rng, (ws[0],), xp)
    return inputs


# --------------------------------------------------------------------------- gradient checks
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case,conv_path", CONV_PATHS, indirect=["conv_path"])
def test_conv3d_gradcheck(xp_cpu, case, conv_path, bias, rng):
    _, _, stride, padding = CONV_CASES[case]
    cache = {}

    def forward(**kw):
        out, cache["c"] = F.conv3d_forward(**kw, stride=stride, padding=padding)
        return out

    def backward(dout):
        dx, dw, db = F.conv3d_backward(dout, cache["c"])
        assert (db is None) == (not bias)
        return {"x": dx, "w": dw, "b": db}

    assert_gradcheck(forward, backward, _conv_inputs(rng, xp_cpu, case, bias), method=_method(xp_cpu, case, bias))


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("case", list(POOL_CASES))
def test_pool3d_gradcheck(xp_cpu, case, pool, rng):
    shape, kernel, stride, padding = POOL_CASES[case]
    fwd, bwd = {"avg": (F.avgpool3d_forward, F.avgpool3d_backward),
                "max": (F.maxpool3d_forward, F.maxpool3d_backward)}[pool]
    cache = {}

    def forward(x):
        out, cache["c"] = fwd(x, kernel, stride, padding)
        return out

    assert_gradcheck(forward, lambda d: {"x": bwd(d, cache["c"])}, {"x": distinct_samples(shape, xp_cpu, rng)}, method=_method(xp_cpu, case))


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 3, 2, 3), (2, 2, 2, 3, 2)], ids=["1d", "2d", "3d"])
def test_global_avgpool_gradcheck(xp_cpu, shape, rng):
    cache = {}

    def forward(x):
        out, cache["c"] = F.global_avgpool_forward(x)
        return out

    assert_gradcheck(forward, lambda d: {"x": F.global_avgpool_backward(d, cache["c"])}, {"x": _x(rng, shape, xp_cpu)})


def test_dropout_gradcheck(xp_cpu, rng):
    cache = {}

    def forward(x):
        out, cache["c"] = F.dropout_forward(x, 0.4, training=True, seed=5)
        return out

    assert_gradcheck(forward, lambda d: {"x": F.dropout_backward(d, cache["c"])}, {"x": _x(rng, (3, 2, 5), xp_cpu)})


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_gradcheck(xp_cpu, bias, rng):
    inputs = {"x": _x(rng, (3, 5), xp_cpu), "w": _x(rng, (4, 5), xp_cpu)}
    if bias:
        inputs["b"] = _x(rng, (4,), xp_cpu)
    cache = {}

    def forward(**kw):
        out, cache["c"] = F.linear_forward(**kw)
        return out

    def backward(dout):
        dx, dw, db = F.linear_backward(dout, cache["c"])
        return {"x": dx, "w": dw, "b": db}

    assert_gradcheck(forward, backward, inputs)


def test_softmax_cross_entropy_gradcheck(xp_cpu, rng):
    labels = _labels([0, 3, 3, 1], xp_cpu)
    cache = {}

    def forward(logits):
        loss, cache["c"] = F.softmax_cross_entropy_forward(logits, labels)
        return loss

    assert_gradcheck(forward, lambda d: {"logits": F.softmax_cross_entropy_backward(d, cache["c"])},
           {"logits": _x(rng, (4, 5), xp_cpu)})


@pytest.mark.parametrize("setting", [dict(CONV_CHUNK_BYTES=1), dict(CONV_KEEP_BYTES=0),
                                     dict(CONV_CHUNK_BYTES=1, CONV_KEEP_BYTES=0)],
                         ids=["chunks-kept", "whole-rebuilt", "chunks-rebuilt"])
@pytest.mark.parametrize("case", ["1x3x3-pad011", "3x3x3-s2-pad1", "3x2x3-s211-pad1", "1x3x3-s122-pad011",
                                  "3x3x3-pad1-evenW"])
def test_conv3d_chunks_agree(monkeypatch, case, setting, rng):
    """NumPy builds the columns a few samples at a time and keeps them for the backward pass, or rebuilds
    them there; one sample per chunk, or rebuilt columns, give the same numbers as the whole batch at once."""
    monkeypatch.setattr(EC, "DENSE_MAX_RATIO", 0)
    inputs = _conv_inputs(rng, np, case, True)
    inputs["x"] = np.concatenate([inputs["x"]] * 3)
    _, _, stride, padding = CONV_CASES[case]
    out, cache = F.conv3d_forward(**inputs, stride=stride, padding=padding)
    dout = rng.standard_normal(out.shape)
    grads = F.conv3d_backward(dout, cache)
    for name, value in setting.items():
        monkeypatch.setattr(EC, name, value)
    out1, cache1 = F.conv3d_forward(**inputs, stride=stride, padding=padding)
    np.testing.assert_allclose(out1, out, rtol=1e-12, atol=1e-12)
    for g1, g in zip(F.conv3d_backward(dout, cache1), grads):
        np.testing.assert_allclose(g1, g, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- every library, both float dtypes
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layers_keep_library_and_dtype(xp, device, dtype, rng):
    x = _x(rng, (2, 3, 2, 4, 4), xp, dtype, device)

    def same(a):
        assert_same_library(a, x)
        assert B.dtype_name(a.dtype) == dtype

    for stride, padding in ((1, (0, 1, 1)), ((1, 2, 2), 0), (1, 0)):
        w = _x(rng, (2, 3, 1, 3, 3) if padding else (2, 3, 1, 1, 1), xp, dtype, device)
        out, cache = F.conv3d_forward(x, w, _x(rng, (2,), xp, dtype, device), stride=stride, padding=padding)
        same(out)
        for g in F.conv3d_backward(out, cache):
            same(g)
    for fwd, bwd in ((F.avgpool3d_forward, F.avgpool3d_backward), (F.maxpool3d_forward, F.maxpool3d_backward)):
        out, cache = fwd(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
        same(out)
        same(bwd(out, cache))
    out, cache = F.global_avgpool_forward(x)
    same(out)
    same(F.global_avgpool_backward(out, cache))
    out, cache = F.dropout_forward(x, 0.5, training=True, seed=0)
    same(out)
    same(F.dropout_backward(out, cache))
    feats = _x(rng, (4, 6), xp, dtype, device)
    logits, cache_fc = F.linear_forward(feats, _x(rng, (3, 6), xp, dtype, device), _x(rng, (3,), xp, dtype, device))
    same(logits)
    loss, cache_ce = F.softmax_cross_entropy_forward(logits, _labels([0, 2, 1, 2], xp, device))
    same(loss)
    assert tuple(loss.shape) == ()
    dlogits = F.softmax_cross_entropy_backward(1.0, cache_ce)
    same(dlogits)
    same(F.softmax_cross_entropy_backward(B.asarray(np.asarray(2.0), xp=xp, device=device), cache_ce))  # 0-d
    for g in F.linear_backward(dlogits, cache_fc):
        same(g)


def test_float32_agrees_with_float64(rng):
    """The same layers in float32 and float64: equal to float32 rounding."""
    x64, w64 = rng.standard_normal((2, 3, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3, 3))
    results = {}
    for dtype in ("float32", "float64"):
        x, w = x64.astype(dtype), w64.astype(dtype)
        y, c1 = F.conv3d_forward(x, w, stride=(1, 2, 2), padding=1)
        z, c2 = F.maxpool3d_forward(y, (1, 2, 2), 1)
        v, c3 = F.avgpool3d_forward(z, 2, padding=1)
        dx, dw, _ = F.conv3d_backward(F.maxpool3d_backward(F.avgpool3d_backward(np.ones_like(v), c3), c2), c1)
        assert v.dtype == dx.dtype == dw.dtype == np.dtype(dtype)
        results[dtype] = (v, dx, dw)
    for a32, a64 in zip(results["float32"], results["float64"]):
        np.testing.assert_allclose(a32, a64, rtol=1e-4, atol=1e-4 * np.abs(a64).max())


def test_inputs_are_not_written(rng):
    x, w, b = rng.standard_normal((2, 3, 2, 5, 5)), rng.standard_normal((4, 3, 1, 3, 3)), rng.standard_normal(4)
    saved = [a.copy() for a in (x, w, b)]
    out, cache = F.conv3d_forward(x, w, b, stride=(1, 2, 2), padding=(0, 1, 1))
    dout = np.ones_like(out)
    F.conv3d_backward(dout, cache)
    for fwd, bwd in ((F.avgpool3d_forward, F.avgpool3d_backward), (F.maxpool3d_forward, F.maxpool3d_backward)):
        out, cache = fwd(x, 3, 2, 1)
        d = np.ones_like(out)
        bwd(d, cache)
        assert np.all(d == 1)
    out, cache = F.global_avgpool_forward(x)
    F.global_avgpool_backward(np.ones_like(out), cache)
    out, cache = F.dropout_forward(x, 0.3, training=True, seed=1)
    F.dropout_backward(np.ones_like(out), cache)
    logits, labels = rng.standard_normal((3, 4)), np.array([0, 1, 3])
    saved_ce = (logits.copy(), labels.copy())
    loss, cache = F.softmax_cross_entropy_forward(logits, labels)
    F.softmax_cross_entropy_backward(1.0, cache)
    for a, s in zip((x, w, b, dout, logits, labels), saved + [np.ones_like(dout)] + list(saved_ce)):
        np.testing.assert_array_equal(a, s)


def _stored_channels_last(x):
    """The same values as x (B, C, *S), stored as a transposed view of a (B, *S, C) array."""
    order = (0,) + tuple(range(2, x.ndim)) + (1,)
    return np.ascontiguousarray(x.transpose(order)).transpose(np.argsort(order))


def test_storage_order_does_not_change_values(rng):
    """conv3d, batch norm, ReLU and global pooling give the same numbers for an input stored channels-last
    (as every conv3d output is) and one stored the usual way; conv3d and pooling to the bit. Outputs of
    conv3d and of batch norm on a channels-last input are stored channels-last; no input is written."""
    x = rng.standard_normal((2, 3, 2, 5, 5))
    x_cl = _stored_channels_last(x)
    assert x_cl.strides != x.strides and not x_cl.flags.c_contiguous
    w = rng.standard_normal((4, 3, 1, 3, 3))
    outs = {}
    for name, a in (("nc", x), ("cl", x_cl)):
        out, cache = F.conv3d_forward(a, w, stride=1, padding=(0, 1, 1))
        assert EL.stored_channels_last(out)
        dout = rng.standard_normal(out.shape) if name == "nc" else _stored_channels_last(outs["nc"][1])
        dx, dw, _ = F.conv3d_backward(dout, cache)
        state = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
        bn, bn_cache = F.batchnorm_forward(a, np.full(3, 1.5), np.full(3, 0.2), state, training=True)
        assert EL.stored_channels_last(bn) == (name == "cl")
        bn_dx, dgamma, dbeta = F.batchnorm_backward(_stored_channels_last(dout[:, :3]) if name == "cl"
                                                    else np.ascontiguousarray(dout[:, :3]), bn_cache)
        pooled, pool_cache = F.global_avgpool_forward(a)
        relu, relu_cache = F.relu_forward(a)
        relu_dx = F.relu_backward(a, relu_cache)
        outs[name] = (out, dout, dx, dw, bn, bn_dx, dgamma, dbeta, state["running_var"], pooled,
                      F.global_avgpool_backward(pooled, pool_cache), relu, relu_dx)
    np.testing.assert_array_equal(x_cl, x)
    for i, (nc, cl) in enumerate(zip(outs["nc"], outs["cl"])):
        if i in (4, 5, 6, 7, 8):  # batch norm: per-channel sums in another order
            np.testing.assert_allclose(cl, nc, rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_array_equal(cl, nc)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 5), (1, 4, 1, 1, 1031), (3, 70, 2, 3, 1)],
                         ids=["folded", "prime-positions", "many-channels"])
def test_batchnorm_channels_last_rows_fold(shape, rng):
    """Batch norm on a channels-last input folds r positions into a row (r = 1 when the count of
    positions is prime or the channels are many) and matches the channels-first computation."""
    x = rng.standard_normal(shape) * 3 + 1
    x_cl = _stored_channels_last(x)
    c = shape[1]
    fold = EL.row_fold(x_cl)
    assert fold >= 1 and (math.prod(shape) // c) % fold == 0 and fold * c <= max(1024, c)
    assert EL.row_fold(x) == 0
    gamma, beta, dout = rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(shape)
    results = []
    for a, d in ((x, dout), (x_cl, _stored_channels_last(dout))):
        state = {"running_mean": np.zeros(c), "running_var": np.ones(c)}
        out, cache = F.batchnorm_forward(a, gamma, beta, state, training=True)
        results.append((out, *F.batchnorm_backward(d, cache), state["running_mean"], state["running_var"]))
    for cl, nc in zip(results[1], results[0]):
        np.testing.assert_allclose(cl, nc, rtol=1e-11, atol=1e-12)


@needs_torch
def test_relu_nan_and_kink_like_torch():
    x = np.array([np.nan, -1.0, -0.0, 0.0, 2.0, np.inf, -np.inf])
    out, cache = F.relu_forward(x)
    np.testing.assert_array_equal(out, torch.relu(torch.tensor(x)).numpy())
    np.testing.assert_array_equal(F.relu_backward(np.ones_like(x), cache), [0, 0, 0, 0, 1, 1, 0])


# --------------------------------------------------------------------------- dropout
def test_dropout_same_mask_on_every_library(xp, device):
    x = np.ones((4, 5, 6))
    out, _ = F.dropout_forward(B.asarray(x, xp=xp, device=device), 0.3, training=True, seed=42)
    ref, _ = F.dropout_forward(x, 0.3, training=True, seed=42)
    np.testing.assert_array_equal(B.to_numpy(out), ref)
    other, _ = F.dropout_forward(x, 0.3, training=True, seed=43)
    assert not np.array_equal(other, ref)


def test_dropout_scaling_and_eval_identity():
    p = 0.25
    x = np.ones((200, 500))
    out, mask = F.dropout_forward(x, p, training=True, seed=0)
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1 / (1 - p))
    assert abs(kept.mean() - (1 - p)) < 5e-3  # 100000 Bernoulli draws: sd ~1.4e-3
    assert abs(out.mean() - 1) < 7e-3  # inverted dropout keeps the mean
    np.testing.assert_array_equal(F.dropout_backward(np.full_like(x, 2.0), mask), 2 * out)
    for kwargs in ({"training": False, "seed": 0}, {"training": False}, {"training": True, "seed": None}):
        q = p if not kwargs["training"] else 0.0
        same, cache = F.dropout_forward(x, q, **kwargs)
        assert same is x and cache is None
        dout = np.full_like(x, 3.0)
        assert F.dropout_backward(dout, cache) is dout


# --------------------------------------------------------------------------- PyTorch oracle

def _t(a):
    return torch.tensor(B.to_numpy(a), dtype=torch.float64, requires_grad=True)


def _close(ours, theirs, tol=1e-10):
    np.testing.assert_allclose(B.to_numpy(ours), theirs.detach().numpy(), rtol=tol, atol=tol)


def _against_torch(rng, ours_out, torch_out, xp):
    """Backpropagate a random dout through torch; returns dout (in xp) after comparing the outputs."""
    assert tuple(ours_out.shape) == tuple(torch_out.shape)
    _close(ours_out, torch_out)
    dout = rng.standard_normal(tuple(torch_out.shape))
    (torch_out * torch.tensor(dout)).sum().backward()
    return B.asarray(dout, xp=xp)


@needs_torch
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case,conv_path", CONV_PATHS, indirect=["conv_path"])
def test_conv3d_matches_torch(xp_cpu, case, conv_path, bias, rng):
    _, _, stride, padding = CONV_CASES[case]
    inp = _conv_inputs(rng, xp_cpu, case, bias)
    out, cache = F.conv3d_forward(**inp, stride=stride, padding=padding)
    t = {k: _t(v) for k, v in inp.items()}
    tout = TF.conv3d(t["x"], t["w"], t.get("b"), stride=stride, padding=padding)
    dout = _against_torch(rng, out, tout, xp_cpu)
    dx, dw, db = F.conv3d_backward(dout, cache)
    _close(dx, t["x"].grad)
    _close(dw, t["w"].grad)
    if bias:
        _close(db, t["b"].grad)


@needs_torch
@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("case", list(POOL_CASES))
def test_pool3d_matches_torch(xp_cpu, case, pool, rng):
    shape, kernel, stride, padding = POOL_CASES[case]
    x = distinct_samples(shape, xp_cpu, rng)
    fwd, bwd = {"avg": (F.avgpool3d_forward, F.avgpool3d_backward),
                "max": (F.maxpool3d_forward, F.maxpool3d_backward)}[pool]
    out, cache = fwd(x, kernel, stride, padding)
    tx = _t(x)
    tpool = {"avg": TF.avg_pool3d, "max": TF.max_pool3d}[pool]
    dout = _against_torch(rng, out, tpool(tx, kernel, stride, padding), xp_cpu)
    _close(bwd(dout, cache), tx.grad)


@needs_torch
@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 1, 1), ((1, 3, 3), (1, 2, 2), (0, 1, 1))],
                         ids=["2x2x2", "3x3x3-s1-pad1", "1x3x3-s122-pad011"])
def test_maxpool3d_ties_route_like_torch(xp_cpu, kernel, stride, padding, rng):
    """Plateaus of equal values: every window's gradient goes to its first maximum (row-major),
    overlapping windows that share a winner add up, exactly as in PyTorch."""
    host = np.round(rng.uniform(-1, 1, (2, 2, 3, 5, 6)))  # values in {-1, 0, 1}: ties everywhere
    x = B.asarray(host, xp=xp_cpu)
    out, cache = F.maxpool3d_forward(x, kernel, stride, padding)
    tx = _t(x)
    dout = _against_torch(rng, out, TF.max_pool3d(tx, kernel, stride, padding), xp_cpu)
    dx = B.to_numpy(F.maxpool3d_backward(dout, cache))
    np.testing.assert_array_equal(dx != 0, tx.grad.numpy() != 0)  # the same winners
    _close(dx, tx.grad, 1e-12)  # overlapping windows may add in another order


@needs_torch
def test_maxpool3d_nan_and_inf_like_torch(xp_cpu, rng):
    """A NaN input wins its windows (the last NaN in window order, as PyTorch's kernel);
    an infinite dout reaches the winner only, with exact zeros beside it."""
    host = rng.standard_normal((1, 2, 3, 6, 5))
    host[0, 0, 1, 2, 2] = host[0, 1, 0, 0, 0] = host[0, 1, 0, 0, 1] = np.nan
    x = B.asarray(host, xp=xp_cpu)
    out, cache = F.maxpool3d_forward(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
    tx = _t(x)
    tout = TF.max_pool3d(tx, (1, 3, 3), (1, 2, 2), (0, 1, 1))
    np.testing.assert_array_equal(B.to_numpy(out), tout.detach().numpy())  # NaN where PyTorch has NaN
    dout = rng.standard_normal(tuple(out.shape))
    dout[0, 0, 2, 1, 1] = np.inf
    tout.backward(torch.tensor(dout))
    dx = B.to_numpy(F.maxpool3d_backward(B.asarray(dout, xp=xp_cpu), cache))
    np.testing.assert_array_equal(np.isinf(dx), np.isinf(tx.grad.numpy()))
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-12, atol=1e-12)  # exact zeros beside the inf


@needs_torch
@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 3, 4, 5), (2, 3, 2, 4, 3)], ids=["1d", "2d", "3d"])
def test_global_avgpool_matches_torch(xp_cpu, shape, rng):
    x = _x(rng, shape, xp_cpu)
    out, cache = F.global_avgpool_forward(x)
    tx = _t(x)
    adaptive = {3: TF.adaptive_avg_pool1d, 4: TF.adaptive_avg_pool2d, 5: TF.adaptive_avg_pool3d}[len(shape)]
    tout = adaptive(tx, 1).reshape(shape[:2])
    _close(out, tx.mean(dim=tuple(range(2, len(shape)))))
    dout = _against_torch(rng, out, tout, xp_cpu)
    _close(F.global_avgpool_backward(dout, cache), tx.grad)


@needs_torch
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_matches_torch(xp_cpu, bias, rng):
    x, w, b = _x(rng, (5, 7), xp_cpu), _x(rng, (3, 7), xp_cpu), (_x(rng, (3,), xp_cpu) if bias else None)
    out, cache = F.linear_forward(x, w, b)
    tx, tw, tb = _t(x), _t(w), (_t(b) if bias else None)
    dout = _against_torch(rng, out, TF.linear(tx, tw, tb), xp_cpu)
    dx, dw, db = F.linear_backward(dout, cache)
    _close(dx, tx.grad)
    _close(dw, tw.grad)
    if bias:
        _close(db, tb.grad)
    else:
        assert db is None


@needs_torch
@pytest.mark.parametrize("scale", [1.0, 1e4], ids=["plain", "huge-logits"])
def test_softmax_cross_entropy_matches_torch(xp_cpu, scale, rng):
    host_labels = np.array([0, 4, 2, 2, 1, 4])
    logits = B.asarray(rng.standard_normal((6, 5)) * scale, xp=xp_cpu)
    loss, cache = F.softmax_cross_entropy_forward(logits, _labels(host_labels, xp_cpu))
    dlogits = F.softmax_cross_entropy_backward(B.asarray(np.asarray(0.7), xp=xp_cpu), cache)
    assert np.isfinite(B.to_numpy(loss)) and np.all(np.isfinite(B.to_numpy(dlogits)))
    tl = _t(logits)
    tloss = TF.cross_entropy(tl, torch.tensor(host_labels))
    (0.7 * tloss).backward()
    _close(loss, tloss, 1e-10 * scale)
    _close(dlogits, tl.grad)


# --------------------------------------------------------------------------- errors
def test_conv3d_errors():
    x, w = np.zeros((1, 2, 3, 4, 4)), np.zeros((3, 2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, T, H, W\) \(5 axes\), got shape \(2, 3, 4, 4\)"):
        F.conv3d_forward(x[0], w)
    with pytest.raises(ValueError, match=r"w must have shape \(O, C, kt, kh, kw\) with C = x.shape\[1\] = 2"):
        F.conv3d_forward(x, np.zeros((3, 4, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"b must have shape \(3,\)"):
        F.conv3d_forward(x, w, np.zeros(2))
    with pytest.raises(ValueError, match=r"stride must be a positive int or a 3-tuple of positive ints, got \(1, 2\)"):
        F.conv3d_forward(x, w, stride=(1, 2))
    with pytest.raises(ValueError, match="stride must be a positive int.*got 0"):
        F.conv3d_forward(x, w, stride=0)
    with pytest.raises(ValueError, match="padding must be a non-negative int.*got -1"):
        F.conv3d_forward(x, w, padding=-1)
    with pytest.raises(ValueError, match="padding must be a non-negative int.*got 1.5"):
        F.conv3d_forward(x, w, padding=1.5)
    with pytest.raises(ValueError, match=r"spatial shape \(3, 2, 2\) is smaller than the kernel \(1, 3, 3\)"):
        F.conv3d_forward(np.zeros((1, 2, 3, 2, 2)), w)
    with pytest.raises(TypeError, match="arrays must share one dtype .*x: float64, w: float32"):
        F.conv3d_forward(x, w.astype(np.float32))
    with pytest.raises(TypeError, match="x must be a float32 or float64 array, got dtype int64"):
        F.conv3d_forward(x.astype(np.int64), w)
    with pytest.raises(TypeError, match="w must be an array"):
        F.conv3d_forward(x, [[1.0]])


def test_pool_errors():
    x = np.zeros((1, 2, 3, 4, 4))
    for fwd in (F.avgpool3d_forward, F.maxpool3d_forward):
        name = fwd.__name__
        with pytest.raises(ValueError, match=rf"{name}: x must have shape \(B, C, T, H, W\)"):
            fwd(np.zeros((1, 2, 4, 4)), 2)
        with pytest.raises(ValueError, match=rf"{name}: kernel must be a positive int.*got \(2, 2\)"):
            fwd(x, (2, 2))
        with pytest.raises(ValueError, match=r"padding \(0, 2, 2\) must be at most half the kernel \(1, 3, 3\)"):
            fwd(x, (1, 3, 3), 1, (0, 2, 2))
        with pytest.raises(ValueError, match=r"spatial shape \(3, 4, 4\) is smaller than the kernel \(4, 2, 2\)"):
            fwd(x, (4, 2, 2))
        with pytest.raises(TypeError, match="x must be a float32 or float64 array"):
            fwd(x.astype(np.int32), 2)
    with pytest.raises(ValueError, match=r"at least one spatial axis, got shape \(2, 3\)"):
        F.global_avgpool_forward(np.zeros((2, 3)))


def test_dropout_linear_cross_entropy_errors():
    x = np.ones((2, 3))
    for p in (1.0, -0.1, 1.5, "0.5", None):
        with pytest.raises(ValueError, match=rf"p must be a probability in \[0, 1\), got {p!r}"):
            F.dropout_forward(x, p, training=True, seed=0)
    with pytest.raises(TypeError, match="seed must be an int when training with p > 0, got None"):
        F.dropout_forward(x, 0.5, training=True)
    with pytest.raises(TypeError, match="seed must be an int.*got 0.5"):
        F.dropout_forward(x, 0.5, training=True, seed=0.5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, F\), got shape \(2, 3, 1\)"):
        F.linear_forward(np.ones((2, 3, 1)), np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"w must have shape \(O, F\) with F = x.shape\[1\] = 3, got shape \(4, 2\)"):
        F.linear_forward(x, np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"b must have shape \(4,\), got shape \(3,\)"):
        F.linear_forward(x, np.ones((4, 3)), np.ones(3))
    logits = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\) for 4 classes, got 4"):
        F.softmax_cross_entropy_forward(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\) for 4 classes, got -1"):
        F.softmax_cross_entropy_forward(logits, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\) .* got shape \(3, 1\)"):
        F.softmax_cross_entropy_forward(logits, np.zeros((3, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="labels must be integer class indices, got dtype float64"):
        F.softmax_cross_entropy_forward(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"logits must have shape \(B, K\)"):
        F.softmax_cross_entropy_forward(np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="different libraries"):
        import array_api_strict as strict
        F.softmax_cross_entropy_forward(B.asarray(logits, xp=strict), np.array([0, 1, 2]))


def test_conv3d_dense_path_where_it_pays(monkeypatch):
    """Frames of at most DENSE_MAX_RATIO * kh * kw positions take the dense product, larger ones im2col;
    both give the same numbers (values, dx, dw) on a case with several channels, stride 2 and padding."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 5, 1, 3, 3))
    for size, stride, dense in [(2, 1, True), (3, 1, True), (3, 2, True), (4, 1, False), (8, 2, False)]:
        x = rng.standard_normal((3, 5, 2, size, size))
        out, cache = F.conv3d_forward(x, w, stride=(1, stride, stride), padding=(0, 1, 1))
        assert (cache[0][2] is not None) == dense  # the engine context: (x_cl, kept, plan, ...), (size, stride)
        dout = rng.standard_normal(out.shape)
        grads = F.conv3d_backward(dout, cache)
        monkeypatch.setattr(EC, "DENSE_MAX_RATIO", 0 if dense else math.inf)
        out2, cache2 = F.conv3d_forward(x, w, stride=(1, stride, stride), padding=(0, 1, 1))
        assert (cache2[0][2] is None) == dense
        np.testing.assert_allclose(out2, out, rtol=1e-12, atol=1e-12)
        for g2, g in zip(F.conv3d_backward(dout, cache2)[:2], grads[:2]):
            np.testing.assert_allclose(g2, g, rtol=1e-12, atol=1e-12)
        monkeypatch.undo()


@pytest.mark.parametrize("case,conv_path", [("1x3x3-pad011", "im2col"), ("1x3x3-pad011", "dense"),
                                            ("1x3x3-s122-pad011", "im2col"), ("1x1x1", "im2col"),
                                            ("1x3x3-pad011-evenW", "paired")],
                         indirect=["conv_path"])
def test_conv3d_backward_without_input_grad(case, conv_path, rng):
    """input_grad=False skips dx and leaves dw and db as they were, to the bit (the same products,
    summed in the same order)."""
    inputs = _conv_inputs(rng, np, case, True)
    _, _, stride, padding = CONV_CASES[case]
    out, cache = F.conv3d_forward(**inputs, stride=stride, padding=padding)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = F.conv3d_backward(dout, cache)
    none, dw2, db2 = F.conv3d_backward(dout, cache, input_grad=False)
    assert none is None and dx is not None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


def test_conv3d_pairs_where_it_pays(monkeypatch):
    """Stride-1 convolutions with at most CONV_PAIR_CHANNELS channels, kw > 1 and even W and W' pair
    their output columns, the others do not; where pairing is possible at all, paired and plain give
    the same numbers (values, dx, dw)."""
    rng = np.random.default_rng(6)
    monkeypatch.setattr(EC, "DENSE_MAX_RATIO", 0)
    wide = EC.CONV_PAIR_CHANNELS + 1
    cases = [  # (x shape, w shape, stride, padding, paired by default, paired with any channel count)
        ((3, 5, 2, 4, 6), (6, 5, 1, 3, 3), 1, (0, 1, 1), True, True),
        ((2, 4, 3, 4, 4), (3, 4, 3, 3, 3), 1, 1, True, True),
        ((2, 4, 2, 3, 6), (3, 4, 2, 2, 3), 1, 0, True, True),  # W' = 4
        ((1, wide, 1, 2, 4), (2, wide, 1, 3, 3), 1, (0, 1, 1), False, True),  # many input channels
        ((1, 2, 1, 2, 4), (wide, 2, 1, 3, 3), 1, (0, 1, 1), False, True),  # many output channels
        ((2, 4, 2, 4, 5), (3, 4, 1, 3, 3), 1, (0, 1, 1), False, False),  # odd W
        ((2, 4, 2, 4, 6), (3, 4, 1, 3, 2), 1, (0, 0, 1), False, False),  # odd W' = 7
        ((2, 4, 3, 4, 6), (3, 4, 3, 1, 1), 1, 0, False, False),  # kw = 1: no window to share
        ((2, 4, 2, 4, 8), (3, 4, 1, 3, 3), (1, 2, 2), (0, 1, 1), False, False),  # strided
    ]
    default = EC.CONV_PAIR_CHANNELS
    for xs, ws, stride, padding, paired, possible in cases:
        x, w = rng.standard_normal(xs), rng.standard_normal(ws)
        dout = None
        runs = {}
        for channels in (default, 0, math.inf):  # as shipped, never paired, paired wherever possible
            monkeypatch.setattr(EC, "CONV_PAIR_CHANNELS", channels)
            out, cache = F.conv3d_forward(x, w, stride=stride, padding=padding)
            dout = rng.standard_normal(out.shape) if dout is None else dout
            runs[channels] = (cache[0][-1], out) + F.conv3d_backward(dout, cache)[:2]
        assert runs[default][0] == (2 if paired else 1), (xs, ws)
        assert runs[0][0] == 1 and runs[math.inf][0] == (2 if possible else 1), (xs, ws)
        for channels in (default, math.inf):
            for a, b in zip(runs[channels][1:], runs[0][1:]):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv3d_keeps_columns_only_for_strided_backward(monkeypatch, case, rng):
    """The forward keeps x's column matrix only where the backward will use it: not with stride 1 and
    padding <= kernel - 1, whose dx and dw both come from the output gradient's column matrix."""
    monkeypatch.setattr(EC, "DENSE_MAX_RATIO", 0)
    _, ws, stride, padding = CONV_CASES[case]
    stride, padding = (_shapes.triple(v, "", "", minimum=0) for v in (stride, padding))
    flips = stride == (1, 1, 1) and all(p <= k - 1 for p, k in zip(padding, ws[2:]))
    _, cache = F.conv3d_forward(**_conv_inputs(rng, np, case, False), stride=stride, padding=padding)
    assert (cache[0][1] is None) == flips


def test_conv3d_spare_padded_buffers(monkeypatch):
    """NumPy reuses the zero-bordered buffer a padded convolution copied its input into: another input
    of the same shape, a different padding of the same padded shape, and convolutions running in two
    threads at once all give exactly what freshly zeroed buffers give."""
    rng = np.random.default_rng(8)
    monkeypatch.setattr(EC, "DENSE_MAX_RATIO", 0)
    calls = [  # the second pads its 2 x 2 maps by 2, to the 6 x 6 the first pads its 4 x 4 maps to
        (rng.standard_normal((2, 3, 2, 4, 4)), rng.standard_normal((4, 3, 1, 3, 3)), 1, (0, 1, 1)),
        (rng.standard_normal((2, 3, 2, 2, 2)), rng.standard_normal((4, 3, 1, 5, 5)), 1, (0, 2, 2)),
        (rng.standard_normal((2, 3, 2, 4, 4)), rng.standard_normal((4, 3, 1, 3, 3)), (1, 2, 2), (0, 1, 1)),
        (rng.standard_normal((2, 3, 2, 4, 4)) * 3, rng.standard_normal((4, 3, 1, 3, 3)), 1, (0, 1, 1)),
    ]

    def run(x, w, stride, padding):
        out, cache = F.conv3d_forward(x, w, stride=stride, padding=padding)
        return (out,) + F.conv3d_backward(np.cos(out), cache)[:2]

    EC._SPARE.free.clear()
    monkeypatch.setattr(EC._SpareBorders, "max_bytes", 0)  # nothing kept: every buffer freshly zeroed
    fresh = [run(*call) for call in calls]
    assert not EC._SPARE.free
    monkeypatch.setattr(EC._SpareBorders, "max_bytes", 16 << 20)
    monkeypatch.setattr(EC._SpareBorders, "limit", 0)  # nor with no room
    for call, expected in zip(calls, fresh):
        for a, b in zip(run(*call), expected):
            np.testing.assert_array_equal(a, b)
    assert not EC._SPARE.free
    monkeypatch.setattr(EC._SpareBorders, "limit", 16)
    for _ in range(2):
        for call, expected in zip(calls, fresh):
            for a, b in zip(run(*call), expected):
                np.testing.assert_array_equal(a, b)
    assert EC._SPARE.free  # buffers were kept, and their borders are still zero
    assert all(xpad.nbytes <= EC._SpareBorders.max_bytes for xpad in EC._SPARE.free.values())
    for (shape, _, padding), xpad in EC._SPARE.free.items():
        border = xpad.copy()
        border[_shapes.interior(tuple(n - 2 * p for n, p in zip(shape[1:4], padding)), padding, channels_last=True)] = 0
        assert not border.any()

    import threading

    results, errors = {}, []

    def worker(k):
        try:
            results[k] = [run(*calls[(k + i) % len(calls)]) for i in range(20)]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, runs in results.items():
        for i, got in enumerate(runs):
            for a, b in zip(got, fresh[(k + i) % len(calls)]):
                np.testing.assert_array_equal(a, b)
