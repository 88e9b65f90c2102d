"""The non-local operation: the spec, the full form, the chunked form, gradients, stability, memory."""

import tracemalloc

import numpy as np
import pytest

import nlref.backend as B
from nlref.nn import gradcheck
from nlref.nn.nonlocal_op import (
    MODES, SOFTMAX_MODES, attention_map, nonlocal_backward, nonlocal_forward, nonlocal_reference,
)
from tests.helpers import assert_same_library


def _inputs(xp, mode, *, b=2, d=3, n=7, m=5, dg=4, dtype=np.float64, seed=0, device=None):
    """theta, phi, g (and w_f with every a_i + b_j away from the ReLU kink) in ``xp``."""
    for s in range(seed, seed + 100):
        rng = np.random.default_rng(s)
        host = {"theta": rng.standard_normal((b, d, n)), "phi": rng.standard_normal((b, d, m)),
                "g": rng.standard_normal((b, dg, m))}
        if mode == "concatenation":
            w = rng.standard_normal(2 * d)
            host["w_f"] = w
            pre = (w[:d] @ host["theta"])[:, :, None] + (w[d:] @ host["phi"])[:, None, :]
            if np.abs(pre).min() < 1e-2:
                continue
        return {k: B.asarray(v.astype(dtype), xp=xp, device=device) for k, v in host.items()}
    raise AssertionError("no seed gave inputs away from the kink")


def _kw(mode, inputs, scale=None):
    if scale is None:
        scale = 0.6 if mode in SOFTMAX_MODES else 1.0
    return dict(mode=mode, scale=scale, w_f=inputs.get("w_f"))


def _args(inputs):
    return inputs["theta"], inputs["phi"], inputs["g"]


@pytest.mark.parametrize("mode", MODES)
def test_full_equals_reference(xp, device, mode):
    inp = _inputs(xp, mode, device=device)
    y, _ = nonlocal_forward(*_args(inp), **_kw(mode, inp))
    ref = nonlocal_reference(*_args(inp), **_kw(mode, inp))
    assert_same_library(y, inp["theta"])
    assert tuple(y.shape) == (2, 4, 7)
    np.testing.assert_allclose(B.to_numpy(y), B.to_numpy(ref), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_attention_is_normalised(xp_cpu, mode):
    inp = _inputs(xp_cpu, mode)
    a = B.to_numpy(attention_map(inp["theta"], inp["phi"], **_kw(mode, inp)))
    assert a.shape == (2, 7, 5)
    if mode in SOFTMAX_MODES:
        np.testing.assert_allclose(a.sum(axis=2), 1.0, rtol=1e-14)
        assert a.min() > 0
    else:  # f / M: the sum of f over keys divided by their number
        y, _ = nonlocal_forward(*_args(inp), **_kw(mode, inp))
        np.testing.assert_allclose(np.einsum("bdm,bnm->bdn", B.to_numpy(inp["g"]), a), B.to_numpy(y), rtol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(xp_cpu, mode):
    inp = _inputs(xp_cpu, mode)
    cache = {}
    kw = _kw(mode, inp)
    kw.pop("w_f")

    def forward(theta, phi, g, w_f=None):
        y, cache["c"] = nonlocal_forward(theta, phi, g, w_f=w_f, **kw)
        return y

    def backward(dy):
        dtheta, dphi, dg, dw_f = nonlocal_backward(dy, cache["c"])
        out = {"theta": dtheta, "phi": dphi, "g": dg}
        if dw_f is not None:
            out["w_f"] = dw_f
        return out

    result = gradcheck(forward, backward, inp)
    assert result.passed, str(result)
    assert set(result.errors) == set(inp)


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_chunked_equals_full(xp, device, mode, chunk, dtype, tol):
    inp = _inputs(xp, mode, n=9, m=6, dtype=dtype, device=device)
    kw = _kw(mode, inp)
    y_full, c_full = nonlocal_forward(*_args(inp), **kw)
    y_chunk, c_chunk = nonlocal_forward(*_args(inp), chunk_size=chunk, **kw)
    assert_same_library(y_chunk, inp["theta"])
    assert y_chunk.dtype == inp["theta"].dtype
    dy = B.asarray(np.random.default_rng(1).standard_normal(tuple(y_full.shape)).astype(dtype), like=y_full)
    np.testing.assert_allclose(B.to_numpy(y_chunk), B.to_numpy(y_full), rtol=tol, atol=tol)
    for full, chunked in zip(nonlocal_backward(dy, c_full), nonlocal_backward(dy, c_chunk)):
        if full is None:
            assert chunked is None
            continue
        f, c = B.to_numpy(full), B.to_numpy(chunked)
        assert np.linalg.norm(c - f) <= tol * np.linalg.norm(f)


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("mode", SOFTMAX_MODES)
def test_huge_logits_stay_finite(xp_cpu, mode, chunk):
    """Logits of order 1e6: no overflow, no NaN; the softmax becomes a hard arg-max."""
    inp = _inputs(xp_cpu, mode)
    theta = inp["theta"] * 1e3
    phi = inp["phi"] * 1e3
    y, cache = nonlocal_forward(theta, phi, inp["g"], mode=mode, chunk_size=chunk)
    grads = nonlocal_backward(B.asarray(np.ones(tuple(y.shape)), like=y), cache)
    assert np.all(np.isfinite(B.to_numpy(y)))
    assert all(np.all(np.isfinite(B.to_numpy(gr))) for gr in grads if gr is not None)
    logits = np.einsum("bdn,bdm->bnm", B.to_numpy(theta), B.to_numpy(phi))
    winner = np.take_along_axis(B.to_numpy(inp["g"])[:, :, None, :], logits.argmax(-1)[:, None, :, None], 3)[..., 0]
    np.testing.assert_allclose(B.to_numpy(y), winner, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["embedded_gaussian", "concatenation"])
def test_permutation_equivariance(xp_cpu, mode):
    """Permuting queries permutes y; permuting keys and values together changes nothing."""
    inp = _inputs(xp_cpu, mode, n=6, m=6)
    rng = np.random.default_rng(3)
    qp, kp = rng.permutation(6), rng.permutation(6)
    y, _ = nonlocal_forward(*_args(inp), **_kw(mode, inp))
    take = lambda a, p: B.asarray(B.to_numpy(a)[:, :, p], like=a)  # noqa: E731
    y2, _ = nonlocal_forward(take(inp["theta"], qp), take(inp["phi"], kp), take(inp["g"], kp), **_kw(mode, inp))
    np.testing.assert_allclose(B.to_numpy(y2), B.to_numpy(y)[:, :, qp], rtol=1e-12, atol=1e-14)


def _peak(mode, n, chunk):
    rng = np.random.default_rng(0)
    d, b = 8, 1
    m = n // 4
    theta, phi, g = (rng.standard_normal(s).astype(np.float32) for s in ((b, d, n), (b, d, m), (b, d, m)))
    w_f = rng.standard_normal(2 * d).astype(np.float32) if mode == "concatenation" else None
    tracemalloc.start()
    y, cache = nonlocal_forward(theta, phi, g, mode=mode, w_f=w_f, chunk_size=chunk)
    nonlocal_backward(np.ones_like(y), cache)
    del cache
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


@pytest.mark.parametrize("mode", ["embedded_gaussian", "concatenation"])
def test_chunked_memory_grows_linearly(mode):
    """Doubling N (and M = N/4 with it): the full form's peak grows ~4x, the chunked form's ~2x."""
    n = 2048
    full = [_peak(mode, n, None), _peak(mode, 2 * n, None)]
    chunked = [_peak(mode, n, 64), _peak(mode, 2 * n, 64)]
    assert 3.5 < full[1] / full[0] < 4.5
    assert 1.6 < chunked[1] / chunked[0] < 2.4
    attention_bytes = 4 * (2 * n) * (2 * n // 4)  # one float32 attention matrix at the larger size
    assert full[1] > 2 * attention_bytes
    assert chunked[1] < full[1] / 6


def test_errors():
    z = np.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        nonlocal_forward(z, z, z, mode="cosine")
    with pytest.raises(ValueError, match="theta must have shape"):
        nonlocal_forward(np.zeros((2, 3)), z, z, mode="dot_product")
    with pytest.raises(ValueError, match="phi .* must match theta"):
        nonlocal_forward(z, np.zeros((1, 3, 3)), z, mode="dot_product")
    with pytest.raises(ValueError, match="g .* must match phi"):
        nonlocal_forward(z, z, np.zeros((1, 2, 4)), mode="dot_product")
    with pytest.raises(ValueError, match="w_f"):
        nonlocal_forward(z, z, z, mode="concatenation")
    with pytest.raises(ValueError, match="w_f"):
        nonlocal_forward(z, z, z, mode="dot_product", w_f=np.zeros(4))
    with pytest.raises(TypeError, match="must share one dtype"):
        nonlocal_forward(z, z.astype(np.float32), z, mode="dot_product")
    with pytest.raises(ValueError, match="scale applies to the softmax modes"):
        nonlocal_forward(z, z, z, mode="dot_product", scale=0.5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            nonlocal_forward(z, z, z, mode="dot_product", chunk_size=bad)


# --------------------------------------------------------------------------- against PyTorch's SDPA
def _sdpa(theta, phi, g, dy, scale, dtype):
    """y, dtheta, dphi, dg of torch's scaled_dot_product_attention (layout (B, positions, channels))."""
    torch = pytest.importorskip("torch")
    q, k, v = (torch.tensor(a.transpose(0, 2, 1).astype(dtype), requires_grad=True) for a in (theta, phi, g))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    out.backward(torch.tensor(dy.transpose(0, 2, 1).astype(dtype)))
    return [t.detach().numpy().transpose(0, 2, 1) for t in (out, q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("logit", [1e3, 1e4, 1e5])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_chunked_matches_full_and_sdpa_at_large_logits(logit, dtype):
    """Forward and all three gradients against torch's SDPA and nlref's full form, N and M not
    multiples of the chunk size.

    The chunked form recomputes each block of A as the forward pass made it, so it must equal
    the full form (which keeps A) to rounding: 1.4e-7 relative in float32 here, where folding
    -log C into the product gave 1e-5 to 2e-2 (1e-14 to 1e-11 in float64). The truth is SDPA in
    float64 on the same dtype-rounded inputs. In float32 every implementation's error grows with
    the logits; at 1e5 (a nearly one-hot softmax, dtheta and dphi from a cancellation in
    dA - dy.y) both of nlref's forms are about 10x further from the truth than SDPA's float32
    kernel (0.08 and 0.11 against 0.009 and 0.010), so the bound is a multiple of SDPA's error."""
    rng = np.random.default_rng(3)
    b, d, n, m, dg, scale, chunk = 2, 8, 50, 37, 6, 0.5, 16
    theta, phi, g, dy = (rng.standard_normal(s) for s in ((b, d, n), (b, d, m), (b, dg, m), (b, dg, n)))
    theta *= logit / np.abs(scale * np.einsum("bdn,bdm->bnm", theta, phi)).max()
    theta, phi, g, dy = (a.astype(dtype) for a in (theta, phi, g, dy))
    truth = _sdpa(theta, phi, g, dy, scale, np.float64)
    peer = _sdpa(theta, phi, g, dy, scale, np.dtype(dtype))
    forms = {}
    for chunk_size in (None, chunk):
        y, cache = nonlocal_forward(theta, phi, g, mode="embedded_gaussian", scale=scale, chunk_size=chunk_size)
        forms[chunk_size] = [y, *nonlocal_backward(dy, cache)[:3]]

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    for k, name in enumerate(("y", "dtheta", "dphi", "dg")):
        ours = forms[chunk][k]
        assert ours.dtype == np.dtype(dtype)
        to_full, err, err_peer = rel(ours, forms[None][k]), rel(ours, truth[k]), rel(peer[k], truth[k])
        if dtype == "float64":
            assert to_full <= 1e-13 and err <= 1e-9, f"{name}: {to_full:.1e} from full, {err:.1e} from SDPA"
        else:
            assert to_full <= 1e-6, f"{name}: chunked {to_full:.2e} from the full form at logits {logit:g}"
            assert err <= 16 * err_peer + 1e-6, f"{name}: chunked {err:.2e}, SDPA {err_peer:.2e} at {logit:g}"


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_engine_workspace_gives_the_textbook_bits(mode, chunk, dtype, monkeypatch):
    """The engine's reused buffers compute what the textbook's fresh arrays do, to the bit, call after call.

    (With the NumPy passes; the fused Numba passes add in another order: tests/nn/test_fused_numba.py.
    The matrix route in every mode: the factored one sums in another order, tested below.)
    """
    from nlref.nn.engine import NonLocalWorkspace

    monkeypatch.setenv("NLREF_NN_ENGINE", "numpy")
    monkeypatch.setattr("nlref.nn.engine.nonlocal_op.FACTORED_MODES", ())

    workspace = NonLocalWorkspace()
    for seed in (0, 1, 2):  # the later calls reuse (and must overwrite) the first call's buffers
        inp = _inputs(np, mode, n=9 - seed, m=6, dtype=dtype, seed=seed)
        dy = np.random.default_rng(seed + 10).standard_normal((2, 4, 9 - seed)).astype(dtype)
        y, cache = nonlocal_forward(*_args(inp), **_kw(mode, inp), chunk_size=chunk)
        grads = nonlocal_backward(dy, cache)
        y_ws, cache_ws = nonlocal_forward(*_args(inp), **_kw(mode, inp), chunk_size=chunk, workspace=workspace)
        assert len(workspace) >= 1
        np.testing.assert_array_equal(y_ws, y)
        for got, want in zip(nonlocal_backward(dy, cache_ws), grads):
            if want is None:
                assert got is None
            else:
                np.testing.assert_array_equal(got, want)


def test_workspace_must_be_the_engines():
    inp = _inputs(np, "dot_product")
    with pytest.raises(TypeError, match="workspace must be an nlref.nn.engine.NonLocalWorkspace"):
        nonlocal_forward(*_args(inp), **_kw("dot_product", inp), workspace={})


# --------------------------------------------------------------------------- the engine's factored route
FACTORED = ("dot_product", "concatenation")


def _both_routes(inp, mode, dy, factored=True):
    """(y, grads) of the textbook's matrix route and of the engine's workspace, whose route is asserted:
    factored (no (B, N, M) buffer) or, with ``factored=False``, the matrix route."""
    from nlref.nn.engine import NonLocalWorkspace
    from nlref.nn.nonlocal_op import ChunkedCache, FullCache

    y, cache = nonlocal_forward(*_args(inp), **_kw(mode, inp))
    want = (y,) + tuple(nonlocal_backward(dy, cache))
    workspace = NonLocalWorkspace()
    y_w, cache_w = nonlocal_forward(*_args(inp), **_kw(mode, inp), workspace=workspace)
    if factored:
        assert not isinstance(cache_w, (FullCache, ChunkedCache)) and len(workspace) == 0
    else:
        assert isinstance(cache_w, FullCache)
    return want, (y_w,) + tuple(nonlocal_backward(dy, cache_w))


@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("mode", FACTORED)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_factored_route_equals_the_matrix_route(mode, dtype, engine, monkeypatch):
    """Without the (B, N, M) matrix, the same output and gradients to rounding, on both engines,
    with many keys and queries on either side of the ReLU's kink."""
    if engine == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv("NLREF_NN_ENGINE", engine)
    rng = np.random.default_rng(5)
    b, d, n, m, dg = 3, 6, 300, 75, 5
    inp = {"theta": rng.standard_normal((b, d, n)), "phi": rng.standard_normal((b, d, m)),
           "g": rng.standard_normal((b, dg, m))}
    if mode == "concatenation":
        inp["w_f"] = rng.standard_normal(2 * d)
    inp = {k: v.astype(dtype) for k, v in inp.items()}
    dy = rng.standard_normal((b, dg, n)).astype(dtype)
    want, got = _both_routes(inp, mode, dy)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    for name, w, g in zip(("y", "dtheta", "dphi", "dg", "dw_f"), want, got):
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, name
        err = np.linalg.norm(g - w) / np.linalg.norm(w)
        assert err <= tol, f"{name}: {err:.1e}"


@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_factored_concatenation_at_the_kink_and_ties(engine, monkeypatch):
    """Pairs with a_i + b_j exactly 0 count as ReLU(0) = 0, and equal keys and queries are all
    counted: small integers make every sum exact, so both routes must agree to the bit."""
    if engine == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv("NLREF_NN_ENGINE", engine)
    rng = np.random.default_rng(3)
    b, d, n, m, dg = 2, 2, 40, 30, 3
    inp = {"theta": rng.integers(-3, 4, (b, d, n)).astype(np.float64),
           "phi": rng.integers(-3, 4, (b, d, m)).astype(np.float64),
           "g": rng.integers(-4, 5, (b, dg, m)).astype(np.float64),
           "w_f": np.array([1.0, 0.0, 1.0, 0.0])}  # a_i = theta[0, i], b_j = phi[0, j]: many ties and zeros
    pre = inp["theta"][:, 0, :, None] + inp["phi"][:, 0, None, :]
    assert (pre == 0).sum() > 50 and (pre > 0).sum() > 50 and (pre < 0).sum() > 50
    dy = rng.integers(-4, 5, (b, dg, n)).astype(np.float64) * m  # / M in the backward pass stays exact
    want, got = _both_routes(inp, "concatenation", dy)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g * m, w * m)  # y and its gradients are multiples of 1 / M


@pytest.mark.parametrize("where", ["theta", "phi", "g", "dy"])
@pytest.mark.parametrize("mode", FACTORED)
def test_factored_route_spreads_non_finite_values_as_the_matrix_does(mode, where):
    """An inf or a NaN takes the matrix route, whose 0 * inf spreads it: the same NaN and inf places."""
    inp = _inputs(np, mode)
    dy = np.random.default_rng(4).standard_normal((2, 4, 7))
    for bad in (np.nan, np.inf):
        arrays = dict(inp, dy=dy.copy())
        arrays[where] = arrays[where].copy()
        arrays[where][0, 1, 2] = bad
        inp_bad = {k: v for k, v in arrays.items() if k != "dy"}
        with np.errstate(invalid="ignore", over="ignore"):  # NumPy warns of inf - inf and 0 * inf
            want, got = _both_routes(inp_bad, mode, arrays["dy"], factored=where == "dy")
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)  # y: finite inputs, the factored route when dy is bad
        for w, g in zip(want[1:], got[1:]):
            if w is not None:
                np.testing.assert_array_equal(g, w)
        assert not np.isfinite(got[1 if where == "dy" else 0]).all()


@pytest.mark.parametrize("mode", FACTORED)
def test_factored_route_passes_the_gradient_check(mode):
    """The factored backward pass against finite differences of the factored forward pass (float64)."""
    from nlref.nn.engine import NonLocalWorkspace
    from nlref.nn.nonlocal_op import FullCache

    inp = _inputs(np, mode)
    cache = {}

    def forward(theta, phi, g, w_f=None):
        y, cache["c"] = nonlocal_forward(theta, phi, g, mode=mode, w_f=w_f, workspace=NonLocalWorkspace())
        assert not isinstance(cache["c"], FullCache)
        return y

    def backward(dy):
        return dict(zip(("theta", "phi", "g", "w_f"), nonlocal_backward(dy, cache["c"])))

    result = gradcheck(forward, backward, inp)
    assert result.passed, str(result)
    assert set(result.errors) == set(inp)


@pytest.mark.parametrize("mode", FACTORED)
def test_no_keys_take_the_matrix_route(mode):
    """With M = 0 keys the textbook warns of 0 / 0; the workspace takes the same route, not a factored one."""
    from nlref.nn.engine import NonLocalWorkspace
    from nlref.nn.nonlocal_op import FullCache

    theta, phi, g = np.ones((2, 3, 4)), np.ones((2, 3, 0)), np.ones((2, 5, 0))
    w_f = np.ones(6) if mode == "concatenation" else None
    for workspace in (None, NonLocalWorkspace()):
        with pytest.warns(RuntimeWarning, match="invalid value"):
            y, cache = nonlocal_forward(theta, phi, g, mode=mode, w_f=w_f, workspace=workspace)
        assert isinstance(cache, FullCache) and y.shape == (2, 5, 4) and np.isnan(y).all()
