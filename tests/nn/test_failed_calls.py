"""What a probe of the layers found: a forward that failed part-way left the last forward's cache
pointing into overwritten buffers (the next backward returned wrong gradients without a word); a
float64 gradient turned a float32 network's gradients float64; the max pool dropped the gradient of
a window holding NaN; and a few checks came too late or said too little.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import nlref
from nlref import backend as B
from nlref.nn import NonLocalBlock
from nlref.nn import functional as F
from nlref.nn.attention import MultiHeadAttention, TransformerBlock
from nlref.nn.models import VideoNet, VideoTransformer

RNG = np.random.default_rng(7)


# --------------------------------------------------------------------------- a failed forward
@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian", "dot_product", "concatenation"])
def test_a_forward_refused_part_way_leaves_no_cache_for_backward(mode):
    block = NonLocalBlock(4, mode=mode, sub_sample=False, dtype="float64", seed=0)
    block.params["bn.gamma"][:] = 1
    x, dz = RNG.standard_normal((2, 4, 3, 3)), RNG.standard_normal((2, 4, 3, 3))
    block.forward(x)
    with pytest.raises(ValueError, match="one value per channel"):
        block.forward(RNG.standard_normal((1, 4, 1, 1)))   # batch norm in training mode: refused
    with pytest.raises(RuntimeError, match="backward\\(\\) called before forward\\(\\)"):
        block.backward(dz)                                  # used to return wrong gradients
    block.forward(x)
    assert block.backward(dz).shape == x.shape


def test_a_network_forward_that_fails_leaves_no_cache():
    net = VideoNet(nonlocal_blocks=1)
    clip = RNG.standard_normal((2, 1, 8, 16, 16)).astype(np.float32)
    net.forward(clip)
    with pytest.raises(ValueError):
        net.forward(clip[:, :, :, :3, :3])    # too small for the network's pools: fails inside a layer
    with pytest.raises(RuntimeError, match="needs a forward pass"):
        net.backward(np.ones((2, 2), np.float32))


@pytest.mark.parametrize("layer, bad", [
    (lambda: MultiHeadAttention(8, 2), lambda x: x[..., :4]),
    (lambda: TransformerBlock(8, 2, 16), lambda x: x[..., :4]),
])
def test_an_attention_forward_that_fails_leaves_no_cache(layer, bad):
    m = layer()
    x = RNG.standard_normal((2, 5, 8)).astype(np.float32)
    m.forward(x)
    with pytest.raises(ValueError):
        m.forward(bad(x))
    with pytest.raises(RuntimeError, match="needs a forward pass"):
        m.backward(np.ones_like(x))


# --------------------------------------------------------------------------- the upstream gradient
def _net_cases():
    clip = RNG.standard_normal((2, 1, 8, 16, 16)).astype(np.float32)
    tokens = RNG.standard_normal((2, 5, 8)).astype(np.float32)
    return [
        ("VideoNet", lambda: VideoNet(), clip, "dlogits"),
        ("VideoNet with a block", lambda: VideoNet(nonlocal_blocks=1), clip, "dlogits"),
        ("VideoTransformer", lambda: VideoTransformer(), clip, "dlogits"),
        ("MultiHeadAttention", lambda: MultiHeadAttention(8, 2), tokens, "dout"),
        ("TransformerBlock", lambda: TransformerBlock(8, 2, 16), tokens, "dout"),
    ]


@pytest.mark.parametrize("name, make, x, arg", _net_cases(), ids=[c[0] for c in _net_cases()])
def test_a_gradient_of_another_dtype_is_refused_before_anything_changes(name, make, x, arg):
    net = make()
    out = net.forward(x)
    before = {k: np.copy(v) for k, v in net.grads.items() if v is not None} if hasattr(net, "grads") else {}
    for bad in (np.ones(out.shape), np.ones(out.shape, np.int64)):
        with pytest.raises(TypeError, match=f"{arg} must be float32 like the network|{arg} has dtype"):
            net.backward(bad)
    with pytest.raises(ValueError, match=re.escape(f"{arg} must have the")):
        net.backward(np.ones((out.shape[0] + 1,) + out.shape[1:], np.float32))
    with pytest.raises(TypeError):
        net.backward(np.ones(out.shape, np.float32).tolist())      # a list, not an array
    after = {k: v for k, v in net.grads.items() if v is not None} if hasattr(net, "grads") else {}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    dx = net.backward(np.ones(out.shape, np.float32))             # the forward's cache is still there
    assert dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in net.grads.values() if g is not None)


# --------------------------------------------------------------------------- the max pool and NaN
@pytest.mark.parametrize("shape, kernel", [((1, 1, 8), (2,)), ((2, 3, 6, 6), (2, 2)), ((2, 3, 7, 7), (2, 2)),
                                           ((2, 3, 6, 9), (3, 3)), ((2, 3, 4, 6, 6), (1, 2, 2))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("engine", ["numpy", "auto"])
def test_maxpool_routes_a_nan_window_as_pytorch_does(shape, kernel, dtype, engine, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("NLREF_NN_ENGINE", engine)
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(dtype)
    x.flat[rng.choice(x.size, x.size // 4, replace=False)] = np.nan
    x.flat[:2] = np.nan                                   # a window with two NaN: the last one wins
    out, cache = F.maxpool_forward(x, kernel)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = F.maxpool_backward(dout, cache)
    t = torch.tensor(x, requires_grad=True)
    pool = {1: torch.nn.functional.max_pool1d, 2: torch.nn.functional.max_pool2d,
            3: torch.nn.functional.max_pool3d}[len(kernel)]
    y = pool(t, kernel)
    y.backward(torch.tensor(dout))
    assert np.array_equal(out, y.detach().numpy(), equal_nan=True)
    assert np.array_equal(dx, t.grad.numpy())   # the gradient of windows holding NaN went nowhere before


# --------------------------------------------------------------------------- smaller checks
def test_layer_gradcheck_restores_the_batch_counter():
    block = NonLocalBlock(4, dtype="float64", seed=0)
    x = RNG.standard_normal((2, 4, 4, 4))
    assert nlref.layer_gradcheck(block, x, wrt=["x"], directions=2).passed
    assert block.num_batches_tracked == 0


def test_compare_block_agrees_by_atol_alone():
    # the peer's output and running statistics scaled by 1 + 1e-12: no row is exact, so with rtol = 0 every row agrees by atol
    # alone, and the verdict's max() over the rows within rtol had nothing to take (ValueError)
    pytest.importorskip("torch")
    from tests.nn.peer_modules import SlowFastNonlocal

    class Nonlocal(SlowFastNonlocal):
        def forward(self, x):
            z = super().forward(x) * (1 + 1e-12)
            if self.training:  # the running statistics too (new tensors: autograd saved the old ones)
                self.bn.running_mean = self.bn.running_mean * (1 + 1e-12)
                self.bn.running_var = self.bn.running_var * (1 + 1e-12)
            return z

    result = nlref.compare_block(Nonlocal(4, 2), RNG.standard_normal((2, 4, 2, 3, 3)), rtol=0.0, atol=1e-6,
                                 verbose=False)
    assert min(row[2] for row in result.rows) > 0
    assert result.agree and result.verdict.startswith("agree: every max rel err <= 0 or max abs err <= 1e-06")


@pytest.mark.parametrize("x, message", [
    (np.zeros((0, 4, 3, 3)), "at least one sample and one position"),
    (np.zeros((2, 4, 0, 3)), "at least one sample and one position"),
    (np.ma.masked_array(np.zeros((2, 4, 3, 3))), "x is a NumPy masked array"),
])
def test_empty_or_masked_input_is_refused_by_name(x, message):
    with pytest.raises((ValueError, TypeError), match=message):
        NonLocalBlock(4, sub_sample=False, dtype="float64").forward(x)


@pytest.mark.parametrize("dims", [2.0, "2", np.float64(3)])
def test_dims_must_be_an_int(dims):
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3"):
        NonLocalBlock(4, dims=dims)


def test_flag_error_is_still_what_the_block_raised():
    assert issubclass(B.FlagError, ValueError)
