"""Finite inputs whose intermediate numbers overflow: said so, not answered with NaN or zeros.

Softmax scores ``q . k`` (``theta . phi``) beyond float32's 3.4e38 from finite q and k of about
1e20 made every attention row NaN without a word (PyTorch's ``scaled_dot_product_attention`` does
the same); a variance ``(x - mean)^2`` beyond it made layer norm and batch norm return ``beta``
(``x_hat = 0``) without a word, where PyTorch's layer norm gives NaN and its batch norm the same
zeros. The definition, in float64, is finite and scale-free in every case; the layers now refuse
and say why, and stay as they were where nothing overflows (and where the input itself is NaN).
"""

import numpy as np
import pytest
import torch

from nlref import backend as B
from nlref.nn import functional as F
from nlref.nn import nonlocal_op
from nlref.nn.attention import attention_forward
from nlref.nn.engine import NonLocalWorkspace
from nlref.nn.gradcheck import gradcheck

RNG = np.random.default_rng(7)
Q, K, V = (RNG.standard_normal((2, 4, 8)) for _ in range(3))


def test_attention_scores_that_overflow_float32_are_refused_where_torch_gives_nan():
    q, k, v = (a.astype(np.float32) for a in (Q * 1e20, K * 1e20, V))
    peer = torch.nn.functional.scaled_dot_product_attention(*map(torch.tensor, (q, k, v)))
    assert torch.isnan(peer).all()  # the peer's answer: NaN, silently
    match = r"attention_forward: the softmax scores of the finite q and k overflow float32 \(a score beyond 3.4e\+38"
    with np.errstate(over="ignore"), pytest.raises(ValueError, match=match + r".*scale q and k down, or compute in float64"):
        attention_forward(q, k, v)
    # the same numbers in float64 are finite, and agree with the peer there
    out, _ = attention_forward(Q * 1e20, K * 1e20, V)
    want = torch.nn.functional.scaled_dot_product_attention(*map(torch.tensor, (Q * 1e20, K * 1e20, V)))
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-12, atol=1e-12)


def test_attention_at_large_but_representable_scores_and_nan_inputs_are_unchanged():
    q, k, v = (a.astype(np.float32) for a in (Q * 1e15, K * 1e15, V))  # scores ~1e30: finite
    out, _ = attention_forward(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(*map(torch.tensor, (q, k, v)))
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-6, atol=1e-6)
    bad = Q.copy()
    bad[0, 1, 2] = np.nan  # NaN in, NaN out, as in PyTorch: not an overflow
    with np.errstate(invalid="ignore"):
        out, _ = attention_forward(bad, K, V)
    assert np.isnan(out[0, 1]).all() and np.isfinite(out[1]).all()


@pytest.mark.parametrize("mode", nonlocal_op.SOFTMAX_MODES)
def test_the_attention_map_and_the_definition_refuse_overflowed_scores_too(mode):
    theta, phi = (np.float32(1e20) * a.transpose(0, 2, 1).astype(np.float32) for a in (Q, K))
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="attention_map: the softmax scores of the finite"):
        nonlocal_op.attention_map(theta, phi, mode=mode)
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="nonlocal_reference: the softmax scores of the "):
        nonlocal_op.nonlocal_reference(theta, phi, V.transpose(0, 2, 1).astype(np.float32), mode=mode)
    a = nonlocal_op.attention_map(theta / np.float32(1e5), phi, mode=mode)  # scores ~1e35: finite, rows sum to 1
    np.testing.assert_allclose(a.sum(axis=2), 1, rtol=1e-6)


@pytest.mark.parametrize("route", ["full", "chunked", "workspace"])
@pytest.mark.parametrize("mode", nonlocal_op.SOFTMAX_MODES)
def test_nonlocal_scores_that_overflow_are_refused(mode, route):
    theta, phi = (np.float32(1e20) * a.transpose(0, 2, 1).astype(np.float32) for a in (Q, K))
    g = V.transpose(0, 2, 1).astype(np.float32)
    kw = {"full": {}, "chunked": {"chunk_size": 3}, "workspace": {"workspace": NonLocalWorkspace()}}[route]
    with np.errstate(all="ignore"), pytest.raises(ValueError, match=r"nonlocal_forward: the softmax scores of the "
                                                                    r"finite theta and phi overflow float32"):
        nonlocal_op.nonlocal_forward(theta, phi, g, mode=mode, **kw)
    # float64: finite, and the chunked form equals the full one
    y, _ = nonlocal_op.nonlocal_forward(1e20 * Q.transpose(0, 2, 1), 1e20 * K.transpose(0, 2, 1), V.transpose(0, 2, 1),
                                        mode=mode, **kw)
    ref = nonlocal_op.nonlocal_reference(1e20 * Q.transpose(0, 2, 1), 1e20 * K.transpose(0, 2, 1),
                                         V.transpose(0, 2, 1), mode=mode)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def _normalised(x, axes):
    """The definition in float64: (x - mean) / sqrt(var + 1e-5)."""
    x = x.astype(np.float64)
    return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + 1e-5)


def test_layernorm_variance_that_overflows_is_refused():
    x = (RNG.standard_normal((3, 8)) * 1e20).astype(np.float32)
    ones, zeros = np.ones(8, np.float32), np.zeros(8, np.float32)
    peer = torch.nn.functional.layer_norm(torch.tensor(x), (8,))
    assert torch.isnan(peer).all()  # the peer's answer
    with np.errstate(over="ignore"), pytest.raises(
            ValueError, match=r"layernorm_forward: the variance of a row of x overflows float32 .*x_hat would be 0"):
        F.layernorm_forward(x, ones, zeros)
    x = (RNG.standard_normal((3, 8)) * 1e18).astype(np.float32)  # var ~1e36: finite, and right
    out, _ = F.layernorm_forward(x, ones, zeros)
    np.testing.assert_allclose(out, _normalised(x, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lib", ["numpy", "array_api_strict"])  # the fused passes and the textbook
def test_batchnorm_variance_that_overflows_is_refused(lib):
    xp = pytest.importorskip(lib)
    host = (RNG.standard_normal((4, 3, 5)) * 1e20).astype(np.float32)
    peer = torch.nn.functional.batch_norm(torch.tensor(host), torch.zeros(3), torch.ones(3), training=True)
    assert not peer.any() and np.abs(_normalised(host, (0, 2))).max() > 0.5  # the peer's zeros are not the definition
    x, gamma, beta = (B.asarray(a, xp=xp) for a in (host, np.ones(3, np.float32), np.zeros(3, np.float32)))
    state = {"running_mean": B.asarray(np.zeros(3, np.float32), xp=xp),
             "running_var": B.asarray(np.ones(3, np.float32), xp=xp)}
    with np.errstate(over="ignore"), pytest.raises(
            ValueError, match=r"batchnorm_forward: the variance of a channel of x overflows float32"):
        F.batchnorm_forward(x, gamma, beta, state, training=True)
    host = host * np.float32(1e-2)  # var ~1e36: finite, and right
    out, _ = F.batchnorm_forward(B.asarray(host, xp=xp), gamma, beta, dict(state), training=True)
    np.testing.assert_allclose(np.asarray(out), _normalised(host, (0, 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [1e-5, 1e-30])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lib", ["numpy", "array_api_strict"])
def test_a_constant_row_or_channel_is_normalised_to_beta_exactly(lib, dtype, eps):
    """sum(x) / M of twelve float32 copies of 10000.3 rounds by half an ulp; x_hat of that rounding came
    out 0.3 (eps 1e-5) or 1.0 (eps 1e-30) instead of 0. The gradient is the definition's,
    gamma / sqrt(eps) * (dout - mean(dout)), and a second channel that is not constant is unchanged."""
    xp = pytest.importorskip(lib)
    host = np.full((4, 2, 3), 10000.3, dtype)
    host[:, 1] = RNG.standard_normal((4, 3))
    dout = RNG.standard_normal(host.shape).astype(dtype)
    gamma, beta = np.array([1.5, 0.5], dtype), np.array([0.25, -1.0], dtype)
    a = lambda v: B.asarray(v, xp=xp)  # noqa: E731
    state = {"running_mean": a(np.zeros(2, dtype)), "running_var": a(np.ones(2, dtype))}
    out, cache = F.batchnorm_forward(a(host), a(gamma), a(beta), state, training=True, eps=eps)
    dx = np.asarray(F.batchnorm_backward(a(dout), cache)[0])
    out = np.asarray(out)
    assert np.array_equal(out[:, 0], np.full((4, 3), beta[0]))
    d0 = dout[:, 0].astype(np.float64)
    np.testing.assert_allclose(dx[:, 0], gamma[0] / np.sqrt(eps) * (d0 - d0.mean()), rtol=1e-5)
    np.testing.assert_allclose(out[:, 1], gamma[1] * _normalised(host, (0, 2))[:, 1] + beta[1], rtol=1e-5, atol=1e-5)
    # layer norm: the same rows, as PyTorch computes them (exactly beta)
    rows = np.stack([np.full(12, 10000.3, dtype), RNG.standard_normal(12).astype(dtype)])
    g12, b12 = np.full(12, 1.5, dtype), np.full(12, 0.25, dtype)
    out, cache = F.layernorm_forward(a(rows), a(g12), a(b12), eps=eps)
    peer = torch.nn.functional.layer_norm(torch.tensor(rows), (12,), torch.tensor(g12), torch.tensor(b12), eps)
    assert np.array_equal(np.asarray(out)[0], peer.numpy()[0]) and np.all(np.asarray(out)[0] == np.float32(0.25))
    np.testing.assert_allclose(np.asarray(out)[1], peer.numpy()[1], rtol=1e-5, atol=1e-5)


def _layernorm_check(x, **options):
    cache = {}

    def forward(x):
        out, cache["c"] = F.layernorm_forward(x, np.ones(x.shape[-1]), np.zeros(x.shape[-1]))
        return out

    return gradcheck(forward, lambda dout: {"x": F.layernorm_backward(dout, cache["c"])[0]}, {"x": x}, **options)


@pytest.mark.parametrize("method", ["centred", "random"])
def test_gradcheck_refuses_a_step_that_rounds_away(method):
    """At 1e12 float64 values are 1.2e-4 apart: x +- 1e-6 is x, no step is taken, and a right
    backward was reported FAILED (relative error 0.09). The check now says so; a step the
    values can carry checks the same layer and passes."""
    x = RNG.standard_normal((3, 6)) * 1e8 + 1e12
    with pytest.raises(ValueError, match=r"eps=1e-06 is below the spacing of the float64 values of input 'x' "
                                         r"\(x reaches 1e\+12, where neighbouring floats are 0.000122 apart\)"):
        _layernorm_check(x, method=method)
    assert _layernorm_check(x, method="centred", eps=1e3).passed
    with np.errstate(invalid="ignore"):  # an inf is not a rounded-away step: checked as before
        _layernorm_check(np.array([[0.5, np.inf, 1.0]]), method=method)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_tanh_gradient_at_huge_inputs_is_its_limit(dtype):
    """d/dx of x (1 + tanh u) / 2 tends to 1 (x -> +inf) and 0 (x -> -inf); beyond |x| ~ 1e19 in float32
    (1e154 in float64) x du overflowed and sech^2 u = 0 times it gave NaN, as PyTorch's does."""
    big = 1e30 if dtype == np.float32 else 1e200
    x = np.array([-big, -1e4, -3.0, -0.5, 0.0, 0.5, 3.0, 1e4, big], dtype)
    with np.errstate(over="ignore"):  # the forward's x^3 overflows to inf; tanh(inf) = 1
        out, cache = F.gelu_forward(x, approximate="tanh")
    dout = np.linspace(0.5, 2.0, x.size).astype(dtype)
    with np.errstate(all="raise"):
        dx = F.gelu_backward(dout, cache)
    assert dx[0] == 0 and dx[-1] == dout[-1]
    tx = torch.tensor(x[1:-1], requires_grad=True)  # where the peer is finite, it agrees
    torch.nn.functional.gelu(tx, approximate="tanh").backward(torch.tensor(dout[1:-1]))
    # (float32: the two sum terms of size 1 that cancel to 0.01 at x = -3, each rounded: 3e-7 apart)
    np.testing.assert_allclose(dx[1:-1], tx.grad.numpy(), rtol=1e-6, atol=1e-6 if dtype == np.float32 else 1e-15)
