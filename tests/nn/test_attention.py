"""Chapter 8's layers: LayerNorm, GELU, multi-head attention, the pre-norm transformer block and
the positional encodings; every gradient against finite differences and against PyTorch's own
modules (weights loaded from their state dicts), on NumPy and array-api-strict."""

from __future__ import annotations

import numpy as np
import pytest

import nlref.backend as B
from nlref.nn import MultiHeadAttention, NonLocalBlock, PositionalEncoding, TransformerBlock, gradcheck
from nlref.nn import functional as F
from nlref.nn import layer_gradcheck
from nlref.nn.attention import (attention_backward, attention_forward, merge_heads, sinusoidal_encoding,
                                 spacetime_sinusoidal_encoding, split_heads)

torch = pytest.importorskip("torch")


def _x(shape, xp, seed=0, dtype="float64", device=None):
    return B.asarray(np.random.default_rng(seed).standard_normal(shape), xp=xp,
                     dtype=getattr(B.compat_namespace(xp), dtype), device=device)


def _np(a):
    return np.asarray(B.to_numpy(a))


def _torch_grads(module):
    return {k: p.grad.numpy() for k, p in module.named_parameters()}


def _perturbed(module, seed=0):
    """A PyTorch module in float64 with every parameter moved off its initial value (zero biases,
    unit LayerNorm gains would hide a missing term)."""
    torch.manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


# --------------------------------------------------------------------------- LayerNorm, GELU
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 6)])
def test_layernorm_gradcheck(xp_cpu, shape):
    inputs = {"x": _x(shape, xp_cpu), "gamma": _x(shape[-1:], xp_cpu, 1), "beta": _x(shape[-1:], xp_cpu, 2)}
    cache = {}

    def forward(**kw):
        out, cache["c"] = F.layernorm_forward(**kw)
        return out

    def backward(dout):
        dx, dg, db = F.layernorm_backward(dout, cache["c"])
        return {"x": dx, "gamma": dg, "beta": db}

    result = gradcheck(forward, backward, inputs)
    assert result.passed, str(result)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_gradcheck(xp_cpu, approximate):
    cache = {}

    def forward(x):
        out, cache["c"] = F.gelu_forward(x, approximate)
        return out

    result = gradcheck(forward, lambda d: {"x": F.gelu_backward(d, cache["c"])}, {"x": _x((4, 6), xp_cpu)})
    assert result.passed, str(result)


def test_layernorm_and_gelu_match_torch(xp_cpu):
    rng = np.random.default_rng(3)
    x, g, b, d = rng.standard_normal((2, 4, 6)), rng.standard_normal(6), rng.standard_normal(6), \
        rng.standard_normal((2, 4, 6))
    to = lambda a: B.asarray(a, xp=xp_cpu)  # noqa: E731
    out, cache = F.layernorm_forward(to(x), to(g), to(b), eps=1e-3)
    dx, dg, db = F.layernorm_backward(to(d), cache)
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
    ot = torch.nn.functional.layer_norm(xt, (6,), gt, bt, eps=1e-3)
    ot.backward(torch.tensor(d))
    for ours, theirs in ((out, ot.detach()), (dx, xt.grad), (dg, gt.grad), (db, bt.grad)):
        np.testing.assert_allclose(_np(ours), theirs.numpy(), rtol=1e-12, atol=1e-12)
    for approximate in ("none", "tanh"):
        out, cache = F.gelu_forward(to(x), approximate)
        dx = F.gelu_backward(to(d), cache)
        xt = torch.tensor(x, requires_grad=True)
        ot = torch.nn.functional.gelu(xt, approximate=approximate)
        ot.backward(torch.tensor(d))
        np.testing.assert_allclose(_np(out), ot.detach().numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(_np(dx), xt.grad.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_new_functions_keep_library_and_dtype(xp, device, dtype):
    x = _x((2, 3, 4), xp, dtype=dtype, device=device)
    g, b = _x((4,), xp, 1, dtype, device), _x((4,), xp, 2, dtype, device)
    out, cache = F.layernorm_forward(x, g, b)
    for a in (out, *F.layernorm_backward(out, cache)):
        assert B.array_namespace(a) is B.array_namespace(x) and B.dtype_name(a.dtype) == dtype
    for approximate in ("none", "tanh"):
        out, cache = F.gelu_forward(x, approximate)
        for a in (out, F.gelu_backward(out, cache), F.erf(x)):
            assert B.array_namespace(a) is B.array_namespace(x) and B.dtype_name(a.dtype) == dtype


def test_float32_layers_agree_with_float64():
    x = np.random.default_rng(0).standard_normal((3, 5, 8))
    tb64 = TransformerBlock(8, 2, 16, dtype="float64", seed=1)
    tb32 = TransformerBlock(8, 2, 16, dtype="float32", seed=1)
    o64, o32 = tb64.forward(x), tb32.forward(x.astype(np.float32))
    np.testing.assert_allclose(o32, o64, rtol=1e-4, atol=1e-5)
    d64, d32 = tb64.backward(x), tb32.backward(x.astype(np.float32))
    np.testing.assert_allclose(d32, d64, rtol=1e-4, atol=1e-4)


def test_layernorm_gelu_errors():
    x, g = np.zeros((2, 3)), np.ones(3)
    with pytest.raises(ValueError, match="gamma must have shape"):
        F.layernorm_forward(x, np.ones(4), g)
    with pytest.raises(ValueError, match="eps must be a positive"):
        F.layernorm_forward(x, g, g, eps=0)
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        F.layernorm_forward(np.zeros((2, 3), dtype=np.int64), g, g)
    with pytest.raises(TypeError, match="share one dtype"):
        F.layernorm_forward(x.astype(np.float32), g, g)
    with pytest.raises(ValueError, match="approximate must be one of"):
        F.gelu_forward(x, "sigmoid")
    with pytest.raises(ValueError, match="dout must have"):
        F.gelu_backward(np.zeros((3, 3)), F.gelu_forward(x)[1])


# --------------------------------------------------------------------------- the attention core
def test_attention_core_gradcheck(xp_cpu):
    cache = {}
    bias = B.asarray(np.where(np.tril(np.ones((4, 5))) > 0, 0.0, -np.inf), xp=xp_cpu)

    def forward(q, k, v):
        out, cache["c"] = attention_forward(q, k, v, bias=bias)
        return out

    def backward(d):
        dq, dk, dv = attention_backward(d, cache["c"])
        return {"q": dq, "k": dk, "v": dv}

    result = gradcheck(forward, backward, {"q": _x((2, 4, 3), xp_cpu), "k": _x((2, 5, 3), xp_cpu, 1),
                                           "v": _x((2, 5, 2), xp_cpu, 2)})
    assert result.passed, str(result)
    assert np.all(_np(cache["c"][3])[:, np.tril(np.ones((4, 5))) == 0] == 0)  # masked keys: exactly no weight



def test_attention_core_refuses_what_it_would_get_wrong():
    """attention_backward took a (1, N, d_v) dout for a batch of 2 and silently used it for every clip; the forward
    took ints, mixed dtypes, a NaN scale and a fully masked row (NaN out)."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2))
    _, cache = attention_forward(q, k, v)
    with pytest.raises(ValueError, match=r"attention_backward: dout must have the forward output's shape \(2, 3, 2\)"):
        attention_backward(np.ones((1, 3, 2)), cache)
    with pytest.raises(TypeError, match="attention_backward: arrays must share one dtype"):
        attention_backward(np.ones((2, 3, 2), dtype=np.float32), cache)
    forward_cases = [
        (dict(q=q.astype(int)), TypeError, "q must be a float32 or float64 array"),
        (dict(k=k.astype(np.float32)), TypeError, "must share one dtype"),
        (dict(k=k[..., :3]), ValueError, "k must have q's d"),
        (dict(v=v[:, :4]), ValueError, "M >= 1 keys"),
        (dict(k=k[:1]), ValueError, "the same leading axes"),  # broadcast leading axes: dk of the wrong shape
        (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
        (dict(scale="0.5"), ValueError, "scale must be a finite number"),
        (dict(bias=np.zeros((4, 5))), ValueError, r"bias must broadcast to the logits' shape \(2, 3, 5\)"),
        (dict(bias=np.full((3, 5), -np.inf)), ValueError, "masks every key of a query"),
    ]
    for change, error, match in forward_cases:
        args = {"q": q, "k": k, "v": v, **change}
        with pytest.raises(error, match=match):
            attention_forward(args["q"], args["k"], args["v"], scale=args.get("scale"), bias=args.get("bias"))
    with pytest.raises(ValueError, match="E a multiple of num_heads = 4"):
        split_heads(np.zeros((1, 2, 6)), 4)
    with pytest.raises(ValueError, match=r"merge_heads: x must have shape \(B, h, N, d\)"):
        merge_heads(np.zeros((1, 2, 6)))

# --------------------------------------------------------------------------- multi-head attention
def _mha_case(bias=True):
    theirs = _perturbed(torch.nn.MultiheadAttention(6, 3, batch_first=True, bias=bias))
    ours = MultiHeadAttention(6, 3, bias=bias, dtype="float64").load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_mha_gradcheck(xp_cpu, bias):
    mha = MultiHeadAttention(6, 3, bias=bias, dtype="float64", seed=2, xp=xp_cpu)
    if bias:
        mha.params["in_proj_bias"] = _x((18,), xp_cpu, 5)
        mha.params["out_proj.bias"] = _x((6,), xp_cpu, 6)
    result = layer_gradcheck(mha, _x((2, 4, 6), xp_cpu))
    assert result.passed, str(result)
    assert set(result.errors) == {"x", *mha.params}


@pytest.mark.parametrize("masking", ["none", "causal", "mask", "batch-mask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_mha_matches_torch(xp_cpu, masking, bias):
    ours, theirs = _mha_case(bias)
    ours = MultiHeadAttention(6, 3, bias=bias, dtype="float64", xp=xp_cpu).load_state_dict(theirs.state_dict())
    rng = np.random.default_rng(4)
    x, d = rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 5, 6))
    allowed = rng.random((2, 5, 5)) < 0.6
    allowed[:, np.arange(5), np.arange(5)] = True
    kwargs, torch_mask = {}, None
    if masking == "causal":
        kwargs["causal"] = True
        torch_mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    elif masking == "mask":
        kwargs["mask"] = allowed[0]
        torch_mask = torch.tensor(~allowed[0])       # PyTorch's MultiheadAttention: True = may not attend
    elif masking == "batch-mask":
        kwargs["mask"] = allowed
        torch_mask = torch.tensor(~allowed).repeat_interleave(3, dim=0)  # (B h, N, N), heads fastest
    xt = torch.tensor(x, requires_grad=True)
    ot, wt = theirs(xt, xt, xt, attn_mask=torch_mask, average_attn_weights=False)
    ot.backward(torch.tensor(d))
    out, attention = ours.forward(B.asarray(x, xp=xp_cpu), return_attention=True, **kwargs)
    dx = ours.backward(B.asarray(d, xp=xp_cpu))
    np.testing.assert_allclose(_np(out), ot.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(attention), wt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(dx), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    grads = _torch_grads(theirs)
    assert set(grads) == set(ours.grads)
    for key, value in ours.grads.items():
        np.testing.assert_allclose(_np(value), grads[key], rtol=1e-10, atol=1e-12, err_msg=key)


def test_mha_state_dict_round_trip():
    ours, theirs = _mha_case()
    state = ours.state_dict(layout="torch")
    assert set(state) == set(theirs.state_dict())
    fresh = torch.nn.MultiheadAttention(6, 3, batch_first=True).double()
    fresh.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    np.testing.assert_allclose(fresh(x, x, x)[0].detach().numpy(), ours.forward(x.numpy()), rtol=1e-12, atol=1e-13)


def test_mha_is_permutation_equivariant():
    """Without positions, attention cannot know order: permuting the tokens permutes the output."""
    mha = MultiHeadAttention(6, 2, dtype="float64", seed=3)
    x = np.random.default_rng(0).standard_normal((2, 7, 6))
    perm = np.random.default_rng(1).permutation(7)
    np.testing.assert_allclose(mha.forward(x[:, perm]), mha.forward(x)[:, perm], rtol=1e-12, atol=1e-13)


def test_mha_errors():
    with pytest.raises(ValueError, match="must divide embed_dim"):
        MultiHeadAttention(6, 4)
    with pytest.raises(ValueError, match="embed_dim must be a positive integer"):
        MultiHeadAttention(0, 1)
    mha = MultiHeadAttention(6, 2, dtype="float64")
    x = np.zeros((2, 3, 6))
    with pytest.raises(ValueError, match=r"shape \(B, N, E\) with E = embed_dim = 6"):
        mha.forward(np.zeros((2, 3, 5)))
    with pytest.raises(TypeError, match="dtype float32"):
        mha.forward(x.astype(np.float32))
    with pytest.raises(TypeError, match="boolean"):
        mha.forward(x, mask=np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 3\) or \(2, 3, 3\)"):
        mha.forward(x, mask=np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="no key to attend"):
        mha.forward(x, mask=np.zeros((3, 3), dtype=bool))
    with pytest.raises(TypeError, match="mask must be a boolean array .*, got str"):  # was an AttributeError
        mha.forward(x, mask="causal")
    with pytest.raises(RuntimeError, match="needs a forward pass"):
        MultiHeadAttention(6, 2).backward(np.zeros((2, 3, 6), dtype=np.float32))
    with pytest.raises(ValueError, match="missing"):
        mha.load_state_dict({"in_proj_weight": np.zeros((18, 6))})
    state = mha.state_dict()
    state["out_proj.weight"] = np.zeros((6, 5))
    with pytest.raises(ValueError, match=r"'out_proj.weight' has shape \(6, 5\)"):
        mha.load_state_dict(state)
    state["out_proj.weight"] = np.full((6, 6), np.nan)
    with pytest.raises(ValueError, match="non-finite"):
        mha.load_state_dict(state)
    with pytest.raises(ValueError, match="layout must be 'torch'"):
        mha.state_dict(layout="timm")
    import array_api_strict as strict
    with pytest.raises(TypeError, match="build the layer with xp="):
        mha.forward(strict.asarray(x))


# --------------------------------------------------------------------------- the transformer block
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_block_gradcheck(xp_cpu, activation):
    block = TransformerBlock(6, 2, 10, activation=activation, dtype="float64", seed=4, xp=xp_cpu)
    for key in block.params:  # off the initial values (zero biases, unit gains would hide a term)
        block.params[key] = block.params[key] + 0.2 * _x(tuple(block.params[key].shape), xp_cpu, len(key))
    result = layer_gradcheck(block, _x((2, 4, 6), xp_cpu))
    assert result.passed, str(result)
    assert set(result.errors) == {"x", *block.params}


@pytest.mark.parametrize("causal", [False, True])
def test_block_matches_torch_encoder_layer(xp_cpu, causal):
    theirs = _perturbed(torch.nn.TransformerEncoderLayer(6, 3, 10, dropout=0.0, activation="gelu", batch_first=True,
                                                         norm_first=True), seed=1)
    ours = TransformerBlock(6, 3, 10, dtype="float64", xp=xp_cpu).load_state_dict(theirs.state_dict())
    assert set(ours.params) == set(theirs.state_dict())
    rng = np.random.default_rng(5)
    x, d = rng.standard_normal((3, 5, 6)), rng.standard_normal((3, 5, 6))
    xt = torch.tensor(x, requires_grad=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64) if causal else None
    ot = theirs(xt, src_mask=mask, is_causal=causal)
    ot.backward(torch.tensor(d))
    out = ours.forward(B.asarray(x, xp=xp_cpu), causal=causal)
    dx = ours.backward(B.asarray(d, xp=xp_cpu))
    np.testing.assert_allclose(_np(out), ot.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(dx), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    grads = _torch_grads(theirs)
    for key, value in ours.grads.items():
        np.testing.assert_allclose(_np(value), grads[key], rtol=1e-10, atol=1e-12, err_msg=key)
    exported = ours.state_dict(layout="torch")
    fresh = torch.nn.TransformerEncoderLayer(6, 3, 10, dropout=0.0, activation="gelu", batch_first=True,
                                             norm_first=True).double()
    fresh.load_state_dict({k: torch.tensor(v) for k, v in exported.items()})
    np.testing.assert_allclose(fresh(torch.tensor(x), src_mask=mask, is_causal=causal).detach().numpy(),
                               ot.detach().numpy(), rtol=1e-12, atol=1e-13)


def test_block_errors():
    with pytest.raises(ValueError, match="activation must be one of"):
        TransformerBlock(6, 2, 8, activation="swish")
    with pytest.raises(ValueError, match="mlp_dim must be a positive integer"):
        TransformerBlock(6, 2, 0)
    with pytest.raises(ValueError, match="eps must be a positive"):
        TransformerBlock(6, 2, 8, eps=-1.0)
    block = TransformerBlock(6, 2, 8, dtype="float64")
    block.forward(np.zeros((1, 2, 6)))
    with pytest.raises(ValueError, match="dout must have the output's shape"):
        block.backward(np.zeros((1, 3, 6)))


# --------------------------------------------------------------------------- positional encodings
@pytest.mark.parametrize("shape", [5, (2, 2, 3)])
@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
def test_positional_encoding_gradcheck(xp_cpu, shape, kind):
    pos = PositionalEncoding(shape, 6, kind=kind, dtype="float64", seed=1, xp=xp_cpu)
    n = 5 if shape == 5 else 12
    result = layer_gradcheck(pos, _x((2, n, 6), xp_cpu))
    assert result.passed, str(result)
    assert set(result.errors) == {"x", *pos.params}
    expected = ({"weight"} if shape == 5 else {"time", "space"}) if kind == "learned" else set()
    assert set(pos.params) == expected


def test_sinusoidal_tables():
    table = sinusoidal_encoding(50, 8)
    np.testing.assert_allclose(table[:, 0], np.sin(np.arange(50)))
    np.testing.assert_allclose(table[:, 7], np.cos(np.arange(50) / 10000 ** (6 / 8)))
    # a shift by k is one fixed rotation per frequency pair: PE[p + k] = R_k PE[p] for every p
    k, w = 3, 10000 ** (-2 / 8)
    rot = np.array([[np.cos(k * w), -np.sin(k * w)], [np.sin(k * w), np.cos(k * w)]])
    np.testing.assert_allclose(table[k:, 2:4], table[:-k, 2:4] @ rot, atol=1e-12)
    st = spacetime_sinusoidal_encoding(2, 3, 4, 12).reshape(2, 3, 4, 12)
    np.testing.assert_allclose(st[1, 2, 3, :4], sinusoidal_encoding(2, 4)[1])
    np.testing.assert_allclose(st[1, 2, 3, 4:8], sinusoidal_encoding(3, 4)[2])
    np.testing.assert_allclose(st[1, 2, 3, 8:], sinusoidal_encoding(4, 4)[3])
    assert len({tuple(r) for r in st.reshape(24, 12)}) == 24  # every token gets its own code
    with pytest.raises(ValueError, match="dim must be even"):
        sinusoidal_encoding(4, 5)
    with pytest.raises(ValueError, match="at least 6"):
        spacetime_sinusoidal_encoding(2, 2, 2, 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        PositionalEncoding(4, 6, kind="rotary")
    with pytest.raises(ValueError, match="has 4 tokens"):
        PositionalEncoding(5, 6, dtype="float64").forward(np.zeros((1, 4, 6)))


def test_positions_break_permutation_equivariance():
    """The encoding adds row p of the sinusoidal table to the token in slot p: permuted tokens get other positions,
    so attention over them is no longer the permutation of its output (it is again if positions move with them)."""
    mha = MultiHeadAttention(6, 2, dtype="float64", seed=3)
    pos = PositionalEncoding(7, 6, kind="sinusoidal", dtype="float64")
    x = np.random.default_rng(0).standard_normal((1, 7, 6))
    perm = np.roll(np.arange(7), 1)
    table = sinusoidal_encoding(7, 6)
    np.testing.assert_allclose(pos.forward(x[:, perm]), x[:, perm] + table, rtol=0, atol=1e-15)
    permuted = mha.forward(pos.forward(x))[:, perm]
    np.testing.assert_allclose(mha.forward(x[:, perm] + table[perm]), permuted, rtol=1e-12, atol=1e-14)
    moved = np.abs(table[perm] - table).max(axis=1)                      # every slot's position changes
    assert moved.min() > 0.1
    assert np.abs(mha.forward(pos.forward(x[:, perm])) - permuted).max() > 1e-3


# --------------------------------------------------------------------------- the bridge
def test_nonlocal_block_is_one_head_attention_plus_residual(xp_cpu):
    """Embedded Gaussian, no subsampling, scale 1/sqrt(d), no BN: z = x + MHA_1(x) with W_z as out_proj."""
    c = 6
    block = NonLocalBlock(c, inter_channels=c, dims=1, sub_sample=False, bn_layer=False, scale=True,
                          dtype="float64", seed=3, xp=xp_cpu)
    block.params["W_z.weight"] = _x((c, c), xp_cpu, 7)  # bn_layer=False starts W_z at zero: make it count
    block.params["W_z.bias"] = _x((c,), xp_cpu, 8)
    p = {k: _np(v) for k, v in block.params.items()}
    mha = MultiHeadAttention(c, 1, dtype="float64", xp=xp_cpu).load_state_dict({
        "in_proj_weight": np.concatenate([p["theta.weight"], p["phi.weight"], p["g.weight"]]),
        "in_proj_bias": np.concatenate([p["theta.bias"], p["phi.bias"], p["g.bias"]]),
        "out_proj.weight": p["W_z.weight"], "out_proj.bias": p["W_z.bias"]})
    x = _x((2, c, 9), xp_cpu)                  # (B, C, N): the block's layout
    xp = B.array_namespace(x)
    tokens = xp.permute_dims(x, (0, 2, 1))     # (B, N, C): attention's layout
    z, attention_nl = block.forward(x, return_attention=True)
    out, attention = mha.forward(tokens, return_attention=True)
    np.testing.assert_allclose(_np(z), np.transpose(_np(out + tokens), (0, 2, 1)), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(_np(attention_nl), _np(attention)[:, 0], rtol=1e-12, atol=1e-14)
    d = _x((2, c, 9), xp_cpu, 9)
    dx_nl = block.backward(d)
    dtokens = xp.permute_dims(d, (0, 2, 1))
    dx = mha.backward(dtokens) + dtokens
    np.testing.assert_allclose(_np(dx_nl), np.transpose(_np(dx), (0, 2, 1)), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(_np(block.grads["W_z.weight"]), _np(mha.grads["out_proj.weight"]), rtol=1e-11)
    np.testing.assert_allclose(_np(block.grads["theta.weight"]), _np(mha.grads["in_proj_weight"])[:c], rtol=1e-10,
                               atol=1e-12)
