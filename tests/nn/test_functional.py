"""Forward/backward pairs of nlref.nn.functional: gradient checks, PyTorch as oracle, errors."""

import math

import numpy as np
import pytest

import nlref.backend as B
from nlref.nn import functional as F
from nlref.nn import gradcheck
from tests.helpers import assert_gradcheck, assert_same_library, distinct_samples


def _x(rng, shape, xp, *, away_from=None, margin=1e-2, device=None):
    """float64 normal samples in ``xp``; with ``away_from``, no sample within ``margin`` of it."""
    host = rng.standard_normal(shape)
    if away_from is not None:
        close = np.abs(host - away_from) < margin
        host[close] += np.sign(host[close] - away_from + 1e-300) * 2 * margin
    return B.asarray(host, xp=xp, device=device)


# --------------------------------------------------------------------------- gradient checks
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 2, 3), (2, 3, 2, 2, 3)], ids=["1d", "2d", "3d"])
def test_conv1x1_gradcheck(xp_cpu, shape, bias, rng):
    inputs = {"x": _x(rng, shape, xp_cpu), "w": _x(rng, (4, 3), xp_cpu)}
    if bias:
        inputs["b"] = _x(rng, (4,), xp_cpu)
    cache = {}

    def forward(**kw):
        out, cache["c"] = F.conv1x1_forward(**kw)
        return out

    def backward(dout):
        dx, dw, db = F.conv1x1_backward(dout, cache["c"])
        assert (db is None) == (not bias)
        return {"x": dx, "w": dw, "b": db} if bias else {"x": dx, "w": dw}

    assert_gradcheck(forward, backward, inputs)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 2, 4), (2, 3, 2, 3), (2, 2, 2, 2, 3)], ids=["1d", "2d", "3d"])
def test_batchnorm_gradcheck(xp_cpu, shape, training, rng):
    c = shape[1]
    state0 = {"running_mean": _x(rng, (c,), xp_cpu), "running_var": B.asarray(rng.uniform(0.5, 2, c), xp=xp_cpu)}
    inputs = {"x": _x(rng, shape, xp_cpu), "gamma": _x(rng, (c,), xp_cpu), "beta": _x(rng, (c,), xp_cpu)}
    cache = {}

    def forward(x, gamma, beta):
        out, cache["c"] = F.batchnorm_forward(x, gamma, beta, dict(state0), training=training)
        return out

    def backward(dout):
        dx, dgamma, dbeta = F.batchnorm_backward(dout, cache["c"])
        return {"x": dx, "gamma": dgamma, "beta": dbeta}

    assert_gradcheck(forward, backward, inputs)


def test_relu_gradcheck(xp_cpu, rng):
    cache = {}

    def forward(x):
        out, cache["c"] = F.relu_forward(x)
        return out

    assert_gradcheck(forward, lambda d: {"x": F.relu_backward(d, cache["c"])}, {"x": _x(rng, (3, 4, 5), xp_cpu, away_from=0.0)})


@pytest.mark.parametrize("shape,kernel", [((2, 3, 9), (2,)), ((2, 2, 5, 6), (2, 2)), ((1, 2, 3, 5, 4), (1, 2, 2)),
                                          ((1, 2, 4, 4), (3, 1))], ids=["1d-odd", "2d-odd", "3d", "2d-3x1"])
def test_maxpool_gradcheck(xp_cpu, shape, kernel, rng):
    cache = {}

    def forward(x):
        out, cache["c"] = F.maxpool_forward(x, kernel)
        return out

    assert_gradcheck(forward, lambda d: {"x": F.maxpool_backward(d, cache["c"])}, {"x": distinct_samples(shape, xp_cpu, rng)})


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_gradcheck(xp_cpu, axis, rng):
    cache = {}

    def forward(s):
        out, cache["c"] = F.softmax_forward(s, axis=axis)
        return out

    assert_gradcheck(forward, lambda d: {"s": F.softmax_backward(d, cache["c"])}, {"s": _x(rng, (2, 3, 4), xp_cpu)})


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_dot_pairwise_gradcheck(xp_cpu, scale, rng):
    cache = {}

    def forward(theta, phi):
        out, cache["c"] = F.dot_pairwise_forward(theta, phi, scale)
        return out

    def backward(d):
        dtheta, dphi = F.dot_pairwise_backward(d, cache["c"])
        return {"theta": dtheta, "phi": dphi}

    assert_gradcheck(forward, backward, {"theta": _x(rng, (2, 3, 5), xp_cpu), "phi": _x(rng, (2, 3, 4), xp_cpu)})


def _concat_inputs(xp, d=3, n=5, m=4):
    """theta, phi, w_f with every a_i + b_j at least 1e-2 away from the ReLU kink."""
    for seed in range(100):
        rng = np.random.default_rng(seed)
        theta, phi, w = rng.standard_normal((2, d, n)), rng.standard_normal((2, d, m)), rng.standard_normal(2 * d)
        pre = np.einsum("c,bcn->bn", w[:d], theta)[:, :, None] + np.einsum("c,bcm->bm", w[d:], phi)[:, None, :]
        if np.abs(pre).min() > 1e-2 and (pre > 0).any() and (pre < 0).any():
            return {k: B.asarray(v, xp=xp) for k, v in (("theta", theta), ("phi", phi), ("w_f", w))}
    raise AssertionError("no seed gave inputs away from the kink")


def test_concat_pairwise_gradcheck(xp_cpu):
    cache = {}

    def forward(theta, phi, w_f):
        out, cache["c"] = F.concat_pairwise_forward(theta, phi, w_f)
        return out

    def backward(d):
        dtheta, dphi, dw_f = F.concat_pairwise_backward(d, cache["c"])
        return {"theta": dtheta, "phi": dphi, "w_f": dw_f}

    assert_gradcheck(forward, backward, _concat_inputs(xp_cpu))


def test_random_direction_gradcheck_agrees(xp_cpu, rng):
    cache = {}

    def forward(theta, phi):
        out, cache["c"] = F.dot_pairwise_forward(theta, phi, 0.3)
        return out

    def backward(d):
        dtheta, dphi = F.dot_pairwise_backward(d, cache["c"])
        return {"theta": dtheta, "phi": dphi}

    inputs = {"theta": _x(rng, (2, 8, 40), xp_cpu), "phi": _x(rng, (2, 8, 30), xp_cpu)}
    result = assert_gradcheck(forward, backward, inputs, method="random", directions=4)
    assert set(result.errors) == {"theta", "phi"} and result.method == "random"


def test_gradcheck_catches_a_wrong_backward(xp_cpu, rng):
    """The checker itself can fail: a backward that is off by 1% must be caught."""
    cache = {}

    def forward(s):
        out, cache["c"] = F.softmax_forward(s)
        return out

    def wrong(d):
        return {"s": 1.01 * F.softmax_backward(d, cache["c"])}

    # centred differences see the 1% whole; a random direction sees it scaled by how large its projection is
    # against the typical one (at most 1), so there the error is only held far above the tolerance (1e-6)
    for method, low in (("centred", 5e-3), ("random", 1e-3)):
        result = gradcheck(forward, wrong, {"s": _x(rng, (2, 5), xp_cpu)}, method=method)
        assert not result.passed and low < result.max_error < 2e-2
        assert "too large" in str(result)


def test_gradcheck_reports_structural_zeros(xp_cpu, rng):
    """A bias followed by training-mode batch norm has an exactly zero gradient."""
    cache = {}

    def forward(x, b):
        y, cache["conv"] = F.conv1x1_forward(x, w, b)
        out, cache["bn"] = F.batchnorm_forward(y, gamma, beta, dict(state), training=True)
        return out

    def backward(d):
        dy, _, _ = F.batchnorm_backward(d, cache["bn"])
        dx, _, db = F.conv1x1_backward(dy, cache["conv"])
        return {"x": dx, "b": db}

    w, gamma, beta = _x(rng, (3, 3), xp_cpu), _x(rng, (3,), xp_cpu), _x(rng, (3,), xp_cpu)
    state = {"running_mean": _x(rng, (3,), xp_cpu), "running_var": _x(rng, (3,), xp_cpu)}
    result = assert_gradcheck(forward, backward, {"x": _x(rng, (2, 3, 6), xp_cpu), "b": _x(rng, (3,), xp_cpu)})
    assert result.zero == ["b"] and "x" not in result.zero


def test_gradcheck_errors():
    x = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda x: x, lambda d: {"x": d}, {"x": x})
    with pytest.raises(ValueError, match="method"):
        gradcheck(lambda x: x, lambda d: {"x": d}, {"x": x.astype(np.float64)}, method="forward")
    with pytest.raises(ValueError, match="wrt"):
        gradcheck(lambda x: x, lambda d: {"x": d}, {"x": x.astype(np.float64)}, wrt=["y"])



def _wrong_square():
    """x -> x^2 with a wrong backward (3 x for 2 x): any check that looks at the gradient fails it."""
    seen = {}

    def forward(x):
        seen["x"] = x
        return x * x

    return forward, lambda d: {"x": 3 * seen["x"] * d}


@pytest.mark.parametrize("options, error, message", [
    (dict(method="random", directions=0), ValueError, "directions must be an int >= 1, got 0"),
    (dict(method="random", directions=-1), ValueError, "directions must be an int >= 1"),
    (dict(directions=True), ValueError, "directions must be an int >= 1"),
    (dict(wrt=[]), ValueError, "wrt is empty"),
    (dict(wrt="x"), TypeError, "wrt must be a list of input names, not a string"),
    (dict(rtol=math.inf), ValueError, "rtol must be a finite number >= 0"),
    (dict(rtol=-1.0), ValueError, "rtol must be a finite number >= 0"),
    (dict(atol=math.nan), ValueError, "atol must be a finite number >= 0"),
    (dict(eps=0), ValueError, "eps must be a finite number > 0"),
    (dict(seed=-1), ValueError, "seed must be an int >= 0"),
])
def test_gradcheck_refuses_settings_under_which_nothing_is_checked(options, error, message):
    """Each of these used to report a wrong backward as passed (or divide by zero)."""
    forward, backward = _wrong_square()
    x = np.linspace(1.0, 2.0, 6)
    assert not gradcheck(forward, backward, {"x": x}).passed  # the wrong backward is caught by default
    with pytest.raises(error, match=message):
        gradcheck(forward, backward, {"x": x}, **options)


@pytest.mark.parametrize("method", ["centred", "random"])
@pytest.mark.parametrize("factor", [1.5, 0.0])
def test_gradcheck_does_not_pass_a_gradient_too_small_for_its_step(method, factor):
    """At inputs of 1e8 the differences of x^2 with eps = 1e-6 sink below the rounding floor: a backward 1.5 times
    too large, or one that returns zeros, passed as a "zero gradient". A step 1000 times larger lifts the real
    gradient above its floor and the backward is compared; the result says to pass a larger eps."""
    seen = {}

    def forward(x):
        seen["x"] = x
        return x * x

    x = np.linspace(1.0, 2.0, 6) * 1e8
    result = gradcheck(forward, lambda d: {"x": factor * 2 * seen["x"] * d}, {"x": x}, method=method)
    assert not result.passed and result.max_error > 0.3 and result.coarse == ["x"] and not result.zero
    assert "pass a larger eps" in str(result)
    right = gradcheck(forward, lambda d: {"x": 2 * seen["x"] * d}, {"x": x}, method=method, eps=1.0)
    assert right.passed and not right.coarse and not right.zero   # a step fit for the scale checks it


def test_gradcheck_refuses_a_backward_with_nothing_to_check():
    forward, _ = _wrong_square()
    x = np.linspace(1.0, 2.0, 6)
    with pytest.raises(ValueError, match=r"input 'x' has shape \(0, 3\): no element to check"):   # passed, checking nothing
        gradcheck(forward, lambda d: {"x": 2 * d}, {"x": np.zeros((0, 3))})
    with pytest.raises(ValueError, match="no gradient to check"):
        gradcheck(forward, lambda d: {"x": None}, {"x": x})
    with pytest.raises(TypeError, match=r"backward\(dout\) must return a dict .* got ndarray"):
        gradcheck(forward, lambda d: 2 * d, {"x": x})
    with pytest.raises(TypeError, match=r"forward\(\*\*inputs\)"):
        gradcheck(lambda x: float(np.sum(x)), lambda d: {"x": d}, {"x": x})


# --------------------------------------------------------------------------- every library
def test_functional_keeps_library(xp, device, rng):
    x = _x(rng, (2, 4, 3, 4), xp, device=device)
    out, _ = F.conv1x1_forward(x, _x(rng, (2, 4), xp, device=device), _x(rng, (2,), xp, device=device))
    assert_same_library(out, x)
    out, cache = F.maxpool_forward(x, (2, 2))
    assert_same_library(F.maxpool_backward(out, cache), x)
    state = {"running_mean": _x(rng, (4,), xp, device=device), "running_var": _x(rng, (4,), xp, device=device)}
    out, cache = F.batchnorm_forward(x, _x(rng, (4,), xp, device=device), _x(rng, (4,), xp, device=device), state,
                                     training=True)
    assert_same_library(F.batchnorm_backward(out, cache)[0], x)
    assert_same_library(state["running_var"], x)
    p, cache = F.softmax_forward(x)
    assert_same_library(F.softmax_backward(p, cache), x)


# --------------------------------------------------------------------------- PyTorch oracle
try:
    import torch

    TF = torch.nn.functional
except ImportError:  # the oracle is optional
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch (the optional oracle) is not installed")


def _t(a):
    return torch.tensor(B.to_numpy(a), dtype=torch.float64, requires_grad=True)


def _close(ours, theirs, tol=1e-12):
    np.testing.assert_allclose(B.to_numpy(ours), theirs.detach().numpy(), rtol=tol, atol=tol)


@needs_torch
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv1x1_and_maxpool_match_torch(xp_cpu, dims, rng):
    shape = {1: (2, 3, 7), 2: (2, 3, 5, 7), 3: (2, 3, 3, 5, 5)}[dims]
    x, w, b = distinct_samples(shape, xp_cpu, rng), _x(rng, (4, 3), xp_cpu), _x(rng, (4,), xp_cpu)
    kernel = F.pool_kernel(dims)
    y, c1 = F.conv1x1_forward(x, w, b)
    out, c2 = F.maxpool_forward(y, kernel)
    dout = _x(rng, tuple(out.shape), xp_cpu)
    dy = F.maxpool_backward(dout, c2)
    dx, dw, db = F.conv1x1_backward(dy, c1)

    tx, tw, tb = _t(x), _t(w), _t(b)
    conv = getattr(TF, f"conv{dims}d")
    pool = getattr(TF, f"max_pool{dims}d")
    tout = pool(conv(tx, tw.reshape(4, 3, *(1,) * dims), tb), kernel)
    (tout * torch.tensor(B.to_numpy(dout))).sum().backward()
    assert tuple(out.shape) == tuple(tout.shape)  # odd sizes floored as PyTorch does
    _close(out, tout)
    for ours, theirs in ((dx, tx), (dw, tw), (db, tb)):
        _close(ours, theirs.grad)


@needs_torch
def test_maxpool_ties_route_to_first_like_torch(xp_cpu):
    x = B.asarray(np.ones((1, 1, 4, 4)), xp=xp_cpu)
    out, cache = F.maxpool_forward(x, (2, 2))
    dx = F.maxpool_backward(B.asarray(np.ones((1, 1, 2, 2)), xp=xp_cpu), cache)
    tx = _t(x)
    TF.max_pool2d(tx, 2).sum().backward()
    _close(dx, tx.grad, 0)
    assert float(B.to_numpy(dx).sum()) == 4.0


@needs_torch
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_matches_torch_including_running_stats(xp_cpu, training, rng):
    x, gamma, beta = _x(rng, (4, 3, 2, 5), xp_cpu), _x(rng, (3,), xp_cpu), _x(rng, (3,), xp_cpu)
    rm, rv = _x(rng, (3,), xp_cpu), B.asarray(rng.uniform(0.5, 2, 3), xp=xp_cpu)
    state = {"running_mean": rm, "running_var": rv}
    out, cache = F.batchnorm_forward(x, gamma, beta, state, training=training)
    dout = _x(rng, tuple(out.shape), xp_cpu)
    dx, dgamma, dbeta = F.batchnorm_backward(dout, cache)

    trm, trv = torch.tensor(B.to_numpy(rm)), torch.tensor(B.to_numpy(rv))
    tx, tg, tb = _t(x), _t(gamma), _t(beta)
    tout = TF.batch_norm(tx, trm, trv, tg, tb, training=training, momentum=0.1, eps=1e-5)
    (tout * torch.tensor(B.to_numpy(dout))).sum().backward()
    _close(out, tout)
    _close(state["running_mean"], trm)
    _close(state["running_var"], trv)
    for ours, theirs in ((dx, tx), (dgamma, tg), (dbeta, tb)):
        _close(ours, theirs.grad)
    if not training:  # eval mode must leave the running statistics alone
        assert state["running_mean"] is rm and state["running_var"] is rv


@needs_torch
def test_softmax_matches_torch_with_huge_logits(xp_cpu, rng):
    s = B.asarray(rng.standard_normal((2, 3, 6)) * 1e4, xp=xp_cpu)
    p, cache = F.softmax_forward(s)
    dp = _x(rng, tuple(p.shape), xp_cpu)
    ds = F.softmax_backward(dp, cache)
    assert np.all(np.isfinite(B.to_numpy(p))) and np.all(np.isfinite(B.to_numpy(ds)))
    ts = _t(s)
    tp = torch.softmax(ts, -1)
    (tp * torch.tensor(B.to_numpy(dp))).sum().backward()
    _close(p, tp)
    _close(ds, ts.grad)


@needs_torch
def test_concat_pairwise_matches_explicit_concatenation(xp_cpu, rng):
    """ReLU(w_f^T [theta_i; phi_j]) built the expensive way, with the (B, N, M, 2d) tensor, in torch."""
    inp = _concat_inputs(xp_cpu)
    f, cache = F.concat_pairwise_forward(inp["theta"], inp["phi"], inp["w_f"])
    df = _x(rng, tuple(f.shape), xp_cpu)
    grads = F.concat_pairwise_backward(df, cache)
    th, ph, w = (_t(inp[k]) for k in ("theta", "phi", "w_f"))
    n, m = th.shape[2], ph.shape[2]
    pairs = torch.cat([th[:, :, :, None].expand(-1, -1, n, m), ph[:, :, None, :].expand(-1, -1, n, m)], dim=1)
    tf = torch.relu(torch.einsum("c,bcnm->bnm", w, pairs))
    (tf * torch.tensor(B.to_numpy(df))).sum().backward()
    _close(f, tf)
    for ours, theirs in zip(grads, (th, ph, w)):
        _close(ours, theirs.grad)


# --------------------------------------------------------------------------- errors
def test_functional_errors():
    x = np.zeros((1, 2, 3, 3))
    with pytest.raises(ValueError, match="kernel must hold one positive size per spatial axis"):
        F.maxpool_forward(x, (2,))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        F.maxpool_forward(np.zeros((1, 2, 1, 3)), (2, 2))
    with pytest.raises(ValueError, match="more than one value per channel"):
        F.batchnorm_forward(np.zeros((1, 2, 1)), np.ones(2), np.zeros(2),
                            {"running_mean": np.zeros(2), "running_var": np.ones(2)}, training=True)
    with pytest.raises(ValueError, match=r"w_f must have shape \(4,\)"):
        F.concat_pairwise_forward(np.zeros((1, 2, 3)), np.zeros((1, 2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3"):
        F.pool_kernel(4)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batchnorm_reused_products_leave_results_alone(training, channels_last):
    """Batch norm writes into its own spent products (engine.ChannelRows): neither the returned
    output nor a second backward through the same cache may see that."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 3, 5, 5))
    if channels_last:  # the layout the networks use, with positions folded into rows
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    state = {"running_mean": rng.standard_normal(4), "running_var": rng.random(4) + 0.5}
    out, cache = F.batchnorm_forward(x, gamma, beta, dict(state), training=training)
    kept = out.copy()
    dout = rng.standard_normal(x.shape)
    first = F.batchnorm_backward(dout, cache)
    np.testing.assert_array_equal(out, kept)
    second = F.batchnorm_backward(dout, cache)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    mean = x.mean(axis=(0, 2, 3, 4)) if training else state["running_mean"]
    var = x.var(axis=(0, 2, 3, 4)) if training else state["running_var"]
    shape = (1, 4, 1, 1, 1)
    want = gamma.reshape(shape) * (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5) + beta.reshape(shape)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


def _layers():
    """(name, forward -> (out, cache), backward) for every backward of nlref.nn.functional."""
    rng = np.random.default_rng(0)
    r = rng.standard_normal
    x5, x4 = r((2, 3, 4, 5, 6)), r((2, 3, 4, 6))
    state = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    x32 = np.moveaxis(np.ascontiguousarray(np.moveaxis(x5.astype(np.float32), 1, -1)), -1, 1)  # channels-last
    state32 = {k: v.astype(np.float32) for k, v in state.items()}
    g32 = np.ones(3, np.float32)
    return [
        ("conv1x1", lambda: F.conv1x1_forward(x4, r((5, 3)), r(5)), F.conv1x1_backward),
        # with Numba the first takes the fused passes (engine.BatchNormCache), the second the NumPy steps (a tuple)
        ("batchnorm", lambda: F.batchnorm_forward(x4, r(3), r(3), dict(state), training=True), F.batchnorm_backward),
        ("batchnorm channels-last", lambda: F.batchnorm_forward(x32, g32, 0 * g32, dict(state32), training=True),
         F.batchnorm_backward),
        ("relu", lambda: F.relu_forward(x4), F.relu_backward),
        ("maxpool", lambda: F.maxpool_forward(x4, (2, 2)), F.maxpool_backward),
        ("softmax", lambda: F.softmax_forward(r((2, 4, 5))), F.softmax_backward),
        ("dot pairwise", lambda: F.dot_pairwise_forward(r((2, 3, 4)), r((2, 3, 5))), F.dot_pairwise_backward),
        ("concat pairwise", lambda: F.concat_pairwise_forward(r((2, 3, 4)), r((2, 3, 5)), r(6)),
         F.concat_pairwise_backward),
        ("conv3d reference", lambda: F.conv3d_reference(x5, r((2, 3, 3, 3, 3)), stride=(1, 2, 2), padding=1),
         F.conv3d_reference_backward),
        ("conv3d", lambda: F.conv3d_forward(x5, r((2, 3, 3, 3, 3)), r(2), stride=(1, 2, 2), padding=1),
         F.conv3d_backward),
        ("avgpool3d", lambda: F.avgpool3d_forward(x5, (1, 2, 2)), F.avgpool3d_backward),
        ("maxpool3d", lambda: F.maxpool3d_forward(x5, 3, stride=2, padding=1), F.maxpool3d_backward),
        ("global avgpool", lambda: F.global_avgpool_forward(x5), F.global_avgpool_backward),
        ("dropout", lambda: F.dropout_forward(x4, 0.5, training=True, seed=1), F.dropout_backward),
        ("linear", lambda: F.linear_forward(r((4, 3)), r((2, 3)), r(2)), F.linear_backward),
        ("layernorm", lambda: F.layernorm_forward(r((2, 4, 5)), r(5), r(5)), F.layernorm_backward),
        ("gelu", lambda: F.gelu_forward(x4), F.gelu_backward),
    ]


@pytest.mark.parametrize("name, forward, backward", _layers(), ids=[c[0] for c in _layers()])
def test_backward_refuses_a_gradient_of_another_shape(name, forward, backward):
    """relu_backward and dropout_backward broadcast a (1, ...) dout to a gradient of the right shape and the wrong
    value; others failed inside a matmul or reshape with NumPy's words. Every backward now names dout and both
    shapes."""
    out, cache = forward()
    good = np.ones(out.shape, dtype=out.dtype)
    backward(good, cache)  # the forward's own shape is taken
    shape = tuple(out.shape)
    for bad in ((1,) + shape[1:], shape + (1,), shape[:-1] + (shape[-1] + 1,), shape[::-1]):
        if bad == shape:
            continue
        with pytest.raises(ValueError, match=rf"must have the forward output's shape \({shape[0]}, .*got \({bad[0]}, "):
            backward(np.ones(bad, dtype=out.dtype), cache)
    with pytest.raises(TypeError, match="must be an array of the forward output's shape"):
        backward(good.tolist(), cache)


def test_the_identity_backwards_take_any_gradient_and_the_loss_a_scalar():
    """Dropout in eval mode is the identity (no mask to compare with); the loss's gradient is a scalar."""
    x = np.ones((2, 3))
    out, cache = F.dropout_forward(x, 0.5, training=False)
    assert F.dropout_backward(np.ones((5,)), cache).shape == (5,)
    loss, cache = F.softmax_cross_entropy_forward(np.zeros((4, 3)), np.array([0, 1, 2, 0]))
    np.testing.assert_allclose(F.softmax_cross_entropy_backward(np.float64(2.0), cache),
                               2 * F.softmax_cross_entropy_backward(1.0, cache))
    with pytest.raises(ValueError, match=r"dloss must have the forward output's shape \(\), got \(4,\)"):
        F.softmax_cross_entropy_backward(np.ones(4), cache)


@pytest.mark.parametrize("change, error, message", [
    (dict(state={}), TypeError, r"state must be a dict holding 'running_mean' and 'running_var', got \[\]"),
    (dict(state=None), TypeError, "state must be a dict .* got NoneType"),
    (dict(state={"running_mean": np.zeros(2), "running_var": np.ones(3)}), ValueError,
     r"state\['running_mean'\] must have shape \(3,\) \(one per channel of x\), got \(2,\)"),
    (dict(gamma=np.ones(4)), ValueError, r"gamma must have shape \(3,\) .* got \(4,\)"),
    (dict(beta=np.zeros((1, 3))), ValueError, r"beta must have shape \(3,\) .* got \(1, 3\)"),
    (dict(x=np.ones(3)), ValueError, r"x must have shape \(B, C, ...\)"),
    (dict(momentum=-0.1), ValueError, "momentum must be a finite number >= 0, got -0.1"),
    (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\], got 1.5"),
    (dict(momentum=None), ValueError, "momentum must be a finite number"),
    (dict(eps=0.0), ValueError, "eps must be a finite number > 0, got 0.0"),
    (dict(eps=float("nan")), ValueError, "eps must be a finite number > 0, got nan"),
])
def test_batchnorm_forward_checks_its_state_and_settings(change, error, message):
    """A state without its keys raised KeyError; momentum 1.5 or eps 0 ran (eps 0 on a constant channel: NaN);
    a gamma of another length broadcast or failed in NumPy's words. Nothing in state changes when refused."""
    args = dict(x=np.ones((2, 3, 4)), gamma=np.ones(3), beta=np.zeros(3),
                state={"running_mean": np.zeros(3), "running_var": np.ones(3)}, momentum=0.1, eps=1e-5)
    args.update(change)
    state = args.pop("state")
    before = dict(state) if isinstance(state, dict) else None
    with pytest.raises(error, match="batchnorm_forward: " + message):
        F.batchnorm_forward(args.pop("x"), args.pop("gamma"), args.pop("beta"), state, training=True, **args)
    if before is not None:  # training replaces the running statistics: a refusal must come before that
        assert state.keys() == before.keys() and all(state[k] is before[k] for k in before)


def _relu_pair(factor=1.0, at_zero=0.0):
    """ReLU and a backward giving ``factor`` times its derivative, and ``at_zero`` times dout where x == 0."""
    cache = {}

    def forward(x):
        out, cache["c"] = F.relu_forward(x)
        cache["x"] = x
        return out

    def backward(d):
        x = cache["x"]
        return {"x": factor * F.relu_backward(d, cache["c"]) + at_zero * d * (x == 0)}

    return forward, backward


_AT_ZEROS = np.array([-1.0, 0.0, 0.5, 0.0, 2.0, -0.3])  # two ReLU inputs exactly at the kink


@pytest.mark.parametrize("method", ["centred", "random"])
def test_gradcheck_says_when_it_fails_at_a_kink(method):
    """At a ReLU input of 0 the centred difference is the mean of the one-sided slopes (dout / 2), and a right
    backward, which returns one of them, failed with nothing said of why. By default the verdict stays (as in
    PyTorch), and the result says which failing elements or directions are at a kink."""
    forward, backward = _relu_pair()
    result = gradcheck(forward, backward, {"x": _AT_ZEROS}, method=method)
    assert not result.passed and result.verdict == "FAILED"
    failing = 2 if method == "centred" else 3  # the two zeros; every random direction crosses them
    assert result.kinks == {"x": failing} and result.failing == {"x": failing} and not result.near_kinks
    assert f"{failing} of {failing} {'elements' if method == 'centred' else 'directions'} failing at a kink" in str(result)
    assert "kinks='skip'" in str(result)
    away = gradcheck(forward, backward, {"x": _AT_ZEROS + 0.05}, method=method)  # no kink within eps: as before
    assert away.passed and not away.kinks and "kink" not in str(away)


def test_gradcheck_skips_elements_at_a_kink_and_still_catches_a_wrong_backward():
    forward, right = _relu_pair()
    result = gradcheck(forward, right, {"x": _AT_ZEROS}, kinks="skip")
    assert result.passed and result.kinks == {"x": 2} and result.max_error < 1e-8
    assert "2 elements at a kink not compared" in str(result)
    # wrong by 1.5 away from the kink: the four other elements still fail, the two at the kink are set aside
    wrong = gradcheck(*_relu_pair(factor=1.5), {"x": _AT_ZEROS}, kinks="skip")
    assert not wrong.passed and wrong.max_error > 0.3 and wrong.kinks == {"x": 2} and wrong.failing == {"x": 4}
    # a value at the kink outside both one-sided slopes (0 and dout) is not a subgradient: compared, and it fails
    outside = gradcheck(*_relu_pair(at_zero=2.0), {"x": _AT_ZEROS}, kinks="skip")
    assert not outside.passed and not outside.kinks and outside.max_error > 0.1
    # one of the slopes, 1 x dout, is as right as 0
    assert gradcheck(*_relu_pair(at_zero=1.0), {"x": _AT_ZEROS}, kinks="skip").passed


def test_gradcheck_at_max_pool_ties():
    """Chapter 4's three-way tie: the backward routes the gradient to the first maximum (1, 0, 0), the centred
    differences see 1/2 each."""
    x = np.array([[1., 5., 2., 0.], [3., 4., 8., 1.], [0., 2., 6., 6.], [7., 1., 6., 3.]])[None, None]
    cache = {}

    def forward(x):
        out, cache["c"] = F.maxpool_forward(x, (2, 2))
        return out

    def backward(d):
        return {"x": F.maxpool_backward(d, cache["c"])}

    report = gradcheck(forward, backward, {"x": x})
    assert not report.passed and report.kinks == {"x": 3}
    skip = gradcheck(forward, backward, {"x": x}, kinks="skip")
    assert skip.passed and skip.kinks == {"x": 3}


def test_gradcheck_is_inconclusive_with_nothing_but_kinks():
    forward, backward = _relu_pair()
    for method in ("centred", "random"):
        result = gradcheck(forward, backward, {"x": np.zeros(4)}, method=method, kinks="skip")
        assert not result.passed and result.verdict == "INCONCLUSIVE" and result.inconclusive == ["x"]
        assert "INCONCLUSIVE" in str(result) and "check at another point" in str(result)
    # with a failure elsewhere the verdict is FAILED
    seen = {}

    def forward2(x, y):
        seen["y"] = y
        return forward(x) + y * y

    def backward2(d):
        return {**backward(d), "y": 3 * seen["y"] * d}

    both = gradcheck(forward2, backward2, {"x": np.zeros(4), "y": np.linspace(1, 2, 4)}, kinks="skip")
    assert both.verdict == "FAILED" and both.inconclusive == ["x"]


def test_gradcheck_kink_within_eps_and_smooth_functions_with_a_large_step():
    """A kink off the point but within eps vanishes at a smaller step; a smooth function measured with too large
    a step has a gap between its one-sided differences that shrinks with the step, and is no kink."""
    forward, backward = _relu_pair()
    x = np.array([2e-7, -1.5e-7, 1.0])  # kinks 2e-7 and 1.5e-7 away, within eps = 1e-6
    report = gradcheck(forward, backward, {"x": x})
    assert not report.passed and report.near_kinks == {"x": 2} and not report.kinks
    assert "pass a smaller eps" in str(report)
    assert gradcheck(forward, backward, {"x": x}, kinks="skip").passed
    seen = {}

    def wave(x):
        seen["x"] = x
        return np.sin(5 * x)

    for rule in ("report", "skip"):
        smooth = gradcheck(wave, lambda d: {"x": 5 * np.cos(5 * seen["x"]) * d}, {"x": np.linspace(0.1, 1, 5)},
                           eps=1e-2, kinks=rule)
        assert not smooth.passed and smooth.max_error > 1e-4 and not smooth.kinks and not smooth.near_kinks


def test_gradcheck_refuses_an_unknown_kinks_rule():
    forward, backward = _relu_pair()
    with pytest.raises(ValueError, match="kinks must be 'report' or 'skip', got 'ignore'"):
        gradcheck(forward, backward, {"x": _AT_ZEROS}, kinks="ignore")
