"""nlref's MultiHeadAttention and TransformerBlock against torch's own modules, as people configure them:
``batch_first`` both ways, key-padding and causal masks (bool and float), ``average_attn_weights``,
``bias=False``; and the options that leave no trace in a state dict's keys (number of heads,
``add_zero_attn``, ``norm_first``, activation, ``layer_norm_eps``), which load_state_dict checks when it is
given the module and which used to load silently into another function."""

from __future__ import annotations

import numpy as np
import pytest

from nlref.nn.attention import MultiHeadAttention, TransformerBlock

torch = pytest.importorskip("torch")

E, H, N, BATCH = 8, 2, 5, 3


def _x(seed=0):
    return np.random.default_rng(seed).standard_normal((BATCH, N, E))


def _seeded(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, dtype=p.dtype))
    return module


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("float_mask", [False, True], ids=["bool-mask", "float-mask"])
def test_mha_matches_torch_with_padding_and_causal_masks(batch_first, float_mask):
    """torch's key_padding_mask and attn_mask (True or -inf = masked) are nlref's mask (True = allowed);
    torch's averaged weights are the mean over nlref's heads."""
    torch.manual_seed(0)
    peer = _seeded(torch.nn.MultiheadAttention(E, H, batch_first=batch_first).double())
    ours = MultiHeadAttention(E, H, dtype="float64").load_state_dict(peer)
    x = _x()
    tx = torch.from_numpy(x) if batch_first else torch.from_numpy(x).transpose(0, 1)
    padding = torch.zeros(BATCH, N, dtype=torch.bool)
    padding[0, 3:] = True
    padding[2, 4] = True
    causal = torch.triu(torch.ones(N, N, dtype=torch.bool), 1)
    attn_mask = torch.zeros(N, N, dtype=torch.float64).masked_fill(causal, float("-inf")) if float_mask else causal
    key_padding = torch.zeros(BATCH, N, dtype=torch.float64).masked_fill(padding, float("-inf")) if float_mask \
        else padding
    out, weights = peer(tx, tx, tx, key_padding_mask=key_padding, attn_mask=attn_mask, need_weights=True,
                        average_attn_weights=True)
    out = out if batch_first else out.transpose(0, 1)
    allowed = np.broadcast_to(~padding.numpy()[:, None, :], (BATCH, N, N))
    o, a = ours.forward(x, mask=allowed, causal=True, return_attention=True)
    np.testing.assert_allclose(o, out.detach().numpy(), rtol=0, atol=1e-13)
    np.testing.assert_allclose(a.mean(axis=1), weights.detach().numpy(), rtol=0, atol=1e-13)
    _, per_head = peer(tx, tx, tx, key_padding_mask=key_padding, attn_mask=attn_mask, average_attn_weights=False)
    np.testing.assert_allclose(a, per_head.detach().numpy(), rtol=0, atol=1e-13)


def test_mha_without_bias_matches_torch():
    peer = _seeded(torch.nn.MultiheadAttention(E, H, bias=False, batch_first=True).double())
    ours = MultiHeadAttention(E, H, bias=False, dtype="float64").load_state_dict(peer.state_dict())
    tx = torch.from_numpy(_x())
    np.testing.assert_allclose(ours.forward(_x()), peer(tx, tx, tx)[0].detach().numpy(), rtol=0, atol=1e-13)


def test_mha_refuses_a_module_with_another_number_of_heads_or_add_zero_attn():
    """Neither is in the keys: 4 heads' in_proj_weight has 2 heads' shape, and add_zero_attn has no key;
    loaded, both compute another function (max abs difference 0.58 and 0.08 on this input)."""
    x = _x()
    tx = torch.from_numpy(x)
    four = _seeded(torch.nn.MultiheadAttention(E, 4, batch_first=True).double())
    silently = MultiHeadAttention(E, H, dtype="float64").load_state_dict(four.state_dict())  # keys cannot tell
    assert np.abs(silently.forward(x) - four(tx, tx, tx)[0].detach().numpy()).max() > 0.1
    with pytest.raises(ValueError, match="num_heads=4; this layer has embed_dim=8, num_heads=2"):
        MultiHeadAttention(E, H, dtype="float64").load_state_dict(four)
    zero = _seeded(torch.nn.MultiheadAttention(E, H, add_zero_attn=True, batch_first=True).double())
    with pytest.raises(ValueError, match="add_zero_attn=True"):
        MultiHeadAttention(E, H, dtype="float64").load_state_dict(zero)
    with pytest.raises(TypeError, match="must be a torch.nn.MultiheadAttention, got Linear"):
        MultiHeadAttention(E, H).load_state_dict(torch.nn.Linear(E, E))


@pytest.mark.parametrize("kwargs,match", [
    (dict(kdim=4, vdim=6), "kdim or vdim other than embed_dim"),
    (dict(add_bias_kv=True), "add_bias_kv=True"),
])
def test_mha_names_the_torch_option_behind_unexpected_keys(kwargs, match):
    state = torch.nn.MultiheadAttention(E, H, **kwargs).state_dict()
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(E, H).load_state_dict(state)
    with pytest.raises(ValueError, match="add_bias_kv=True or kdim/vdim"):
        MultiHeadAttention(E, H).load_state_dict(torch.nn.MultiheadAttention(E, H, **kwargs))


def _layer(norm_first=True, activation="gelu", **kwargs):
    layer = torch.nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, activation=activation, batch_first=True,
                                             norm_first=norm_first, **kwargs).double().eval()
    return _seeded(layer)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_pre_norm_encoder_layer_loads_from_the_module_and_matches(activation):
    layer = _layer(activation=activation)
    block = TransformerBlock(E, H, 16, activation=activation, dtype="float64").load_state_dict(layer)
    np.testing.assert_allclose(block.forward(_x()), layer(torch.from_numpy(_x())).detach().numpy(), rtol=0,
                               atol=1e-12)
    tanh = _layer(activation=torch.nn.GELU(approximate="tanh"))
    block = TransformerBlock(E, H, 16, activation="gelu_tanh", dtype="float64").load_state_dict(tanh)
    np.testing.assert_allclose(block.forward(_x()), tanh(torch.from_numpy(_x())).detach().numpy(), rtol=0,
                               atol=1e-12)


def test_post_norm_encoder_layer_is_refused():
    """norm_first=False has exactly the keys of norm_first=True; loaded into the pre-norm block it gave another
    function without a word (max abs difference above 1 here). The module, or norm_first=False, is refused."""
    post = _layer(norm_first=False)
    pre_keys = {k: tuple(v.shape) for k, v in _layer(norm_first=True).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in post.state_dict().items()} == pre_keys  # why keys alone cannot tell
    silently = TransformerBlock(E, H, 16, dtype="float64").load_state_dict(post.state_dict())
    assert np.abs(silently.forward(_x()) - post(torch.from_numpy(_x())).detach().numpy()).max() > 0.1
    for state, kwargs in ((post, {}), (post.state_dict(), {"norm_first": False})):
        block = TransformerBlock(E, H, 16, dtype="float64")
        before = {k: np.array(v) for k, v in block.params.items()}
        with pytest.raises(ValueError, match="norm_first=False: a post-norm layer"):
            block.load_state_dict(state, **kwargs)
        assert all(np.array_equal(before[k], block.params[k]) for k in before)  # unchanged
    TransformerBlock(E, H, 16).load_state_dict(_layer().state_dict(), norm_first=True)  # says what it is: fine


@pytest.mark.parametrize("make,block_kwargs,match", [
    (lambda: _layer(activation="relu"), {}, r"module.activation is .*\(relu\); this block has activation='gelu'"),
    (lambda: _layer(activation=torch.nn.SiLU()), {}, "no nlref twin"),
    (lambda: _layer(layer_norm_eps=1e-6), {}, "module.norm1.eps is 1e-06"),
    (lambda: _layer(), {"num_heads": 4}, "module.self_attn has embed_dim=8, num_heads=2"),
])
def test_encoder_layer_options_not_in_the_keys_are_checked(make, block_kwargs, match):
    block = TransformerBlock(E, block_kwargs.get("num_heads", H), 16, dtype="float64")
    with pytest.raises(ValueError, match=match):
        block.load_state_dict(make())


def test_load_state_dict_keyword_errors():
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['norm_first'\]; allowed: \[\]"):
        MultiHeadAttention(E, H).load_state_dict(MultiHeadAttention(E, H).state_dict(), norm_first=True)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['pre_norm'\]"):
        TransformerBlock(E, H, 16).load_state_dict(TransformerBlock(E, H, 16).state_dict(), pre_norm=True)
    with pytest.raises(ValueError, match="norm_first must be True or False"):
        TransformerBlock(E, H, 16).load_state_dict(TransformerBlock(E, H, 16).state_dict(), norm_first="yes")
    with pytest.raises(TypeError, match="or the torch module, got int"):
        TransformerBlock(E, H, 16).load_state_dict(3)


def test_a_state_without_biases_names_bias_false():
    state = torch.nn.MultiheadAttention(E, H, bias=False).state_dict()
    with pytest.raises(ValueError, match="as a torch module built with bias=False; build this layer with bias=False"):
        MultiHeadAttention(E, H).load_state_dict(state)
    with pytest.raises(ValueError, match="the state has biases: build this layer with bias=True"):
        MultiHeadAttention(E, H, bias=False).load_state_dict(torch.nn.MultiheadAttention(E, H).state_dict())
    layer = torch.nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True, norm_first=True, bias=False)
    with pytest.raises(ValueError, match="bias=False; nlref's TransformerBlock has biases"):
        TransformerBlock(E, H, 16).load_state_dict(layer.state_dict())
