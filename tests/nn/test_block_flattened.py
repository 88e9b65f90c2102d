"""NonLocalBlock's options for the Keras port: pool="flattened" (max-pooling the row-major
position sequence) and projection_bias=False; gradient checks, the pool against PyTorch's
max_pool1d, the chunked form, the Keras layout's shapes and refusals."""

import itertools

import numpy as np
import pytest

import nlref.backend as B
from nlref.nn import NonLocalBlock, layer_gradcheck
from nlref.nn import layouts
from nlref.nn.nonlocal_op import MODES
from tests.helpers import assert_same_library, random_block

# odd position counts, so that a window straddles a row's end and the last positions fall outside every window
SHAPES = {1: (2, 4, 7), 2: (2, 4, 3, 5), 3: (2, 4, 2, 3, 3)}
KERAS = dict(projection_bias=False, W_z_bias=False, bn_layer=False)


def _flattened_keys_ok(block, x):
    """No flattened pooling window of phi(x) or g(x) within 1e-4 of a tie (finite differences cross no kink)."""
    host = B.to_numpy(x)
    flat = host.reshape(host.shape[0], host.shape[1], -1)
    k = block.kernel[0]
    for name in ("phi", "g"):
        if name == "phi" and block.mode == "gaussian":
            h = flat
        else:
            h = np.einsum("dc,bcn->bdn", B.to_numpy(block.params[f"{name}.weight"]), flat)
            if f"{name}.bias" in block.params:
                h = h + B.to_numpy(block.params[f"{name}.bias"])[None, :, None]
        n = (h.shape[-1] // k) * k
        w = np.sort(h[..., :n].reshape(h.shape[0], h.shape[1], -1, k), axis=-1)
        if np.min(w[..., -1] - w[..., -2]) < 1e-4:
            return False
    return True


def _random_block(xp, dims, **config):
    return random_block(xp, SHAPES[dims], _flattened_keys_ok, **config)


CASES = [(dims, mode, k, bias) for dims, mode, k, bias in
         itertools.product((1, 2, 3), MODES, (2, 3), (True, False))
         if not (mode == "concatenation" and dims == 3 and k == 3)]  # (only to keep the suite short)


@pytest.mark.parametrize("dims,mode,k,bias", CASES)
def test_flattened_pool_gradcheck(xp_cpu, dims, mode, k, bias):
    """Forward and hand-written backward agree with finite differences (every parameter and x)."""
    block, x = _random_block(xp_cpu, dims, mode=mode, pool="flattened", pool_kernel=k, projection_bias=bias,
                             bn_layer=bias, W_z_bias=bias)
    method = "centred" if B.is_numpy(block.xp) else "random"
    result = layer_gradcheck(block, x, method=method, directions=3)
    assert result.passed, str(result)
    assert set(result.errors) == {"x"} | set(block.params)
    assert ("theta.bias" in block.params) == (bias and mode != "gaussian")
    assert ("g.bias" in block.params) == bias


def test_flattened_pool_output_library_and_attention_shape(xp_cpu):
    block, x = _random_block(xp_cpu, 2, pool="flattened", pool_kernel=2, **KERAS)
    z, attention = block.forward(x, return_attention=True)
    assert_same_library(z, x)
    assert tuple(attention.shape) == (2, 15, 7)  # N = 3 * 5 = 15 queries, N' = 15 // 2 = 7 keys
    np.testing.assert_allclose(B.to_numpy(attention).sum(axis=-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("dims,k,stride", [(1, 2, None), (2, 3, None), (3, 2, None), (2, 3, 2)])
def test_flattened_pool_matches_torch_max_pool1d(dims, k, stride):
    """pool='flattened' is max_pool1d over the row-major position sequence, forward and backward."""
    torch = pytest.importorskip("torch")
    block = NonLocalBlock(4, dims=dims, pool="flattened", pool_kernel=k, pool_stride=stride, dtype="float64")
    x = np.random.default_rng(1).standard_normal((2, 4) + (5,) * dims)
    out, cache = block._pool(x)
    tx = torch.tensor(x, requires_grad=True)
    tout = torch.nn.functional.max_pool1d(tx.reshape(2, 4, -1), k, stride or k)
    np.testing.assert_array_equal(out, tout.detach().numpy())
    dout = np.random.default_rng(2).standard_normal(out.shape)
    tout.backward(torch.from_numpy(dout))
    np.testing.assert_allclose(block._unpool(dout, cache), tx.grad.numpy(), rtol=1e-14, atol=1e-15)


def test_flattened_pool_differs_from_the_spatial_window():
    """On a 2-D input the flattened pool pairs positions along the row (and across a row's end), not 2x2 windows."""
    x = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 3, 4, 5)
    flat = NonLocalBlock(3, dims=2, pool="flattened", pool_kernel=4, dtype="float64")._pool(x)[0]
    window = NonLocalBlock(3, dims=2, pool_kernel=2, dtype="float64")._pool(x)[0]
    assert flat.shape == (2, 3, 5) and window.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(flat[0, 0], [3, 7, 11, 15, 19])  # windows of 4 consecutive row-major positions


@pytest.mark.parametrize("mode", MODES)
def test_flattened_chunked_equals_full(xp_cpu, mode):
    full, x = _random_block(xp_cpu, 3, mode=mode, pool="flattened", pool_kernel=3, **KERAS)
    chunked = NonLocalBlock(4, mode=mode, dims=3, dtype="float64", chunk_size=2, pool="flattened", pool_kernel=3,
                            xp=xp_cpu, **KERAS)
    chunked.params = dict(full.params)
    dz = B.asarray(np.random.default_rng(4).standard_normal(SHAPES[3]), like=x, dtype=x.dtype)
    np.testing.assert_allclose(B.to_numpy(chunked.forward(x)), B.to_numpy(full.forward(x)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(B.to_numpy(chunked.backward(dz)), B.to_numpy(full.backward(dz)),
                               rtol=1e-11, atol=1e-11)
    for key in full.grads:
        np.testing.assert_allclose(B.to_numpy(chunked.grads[key]), B.to_numpy(full.grads[key]),
                                   rtol=1e-10, atol=1e-10)


def test_fresh_block_without_bn_is_identity_but_keras_weights_are_not():
    """bn_layer=False starts W_z at 0 (identity); a Keras-initialised W_z does not."""
    block = NonLocalBlock(4, dims=2, pool="flattened", dtype="float64", **KERAS)
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 4))
    np.testing.assert_array_equal(block.forward(x), x)
    state = block.state_dict(layout="keras")
    state["W_z"] = np.random.default_rng(1).standard_normal(state["W_z"].shape)
    assert np.abs(block.load_state_dict(state, layout="keras").forward(x) - x).max() > 1e-3


# --------------------------------------------------------------------------- the Keras layout
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_keras_layout_shapes_transpose_and_round_trip(dims):
    block, _ = _random_block(np, dims, pool="flattened", **KERAS)
    state = block.state_dict(layout="keras")
    assert sorted(state) == ["W_z", "g", "phi", "theta"]
    assert state["theta"].shape == (1,) * dims + (4, 2) and state["W_z"].shape == (1,) * dims + (2, 4)
    np.testing.assert_array_equal(state["theta"].reshape(4, 2), block.params["theta.weight"].T)
    other = NonLocalBlock(4, dims=dims, pool="flattened", dtype="float64", seed=9, **KERAS)
    other.load_state_dict(state)  # detected
    assert other.loaded_layout == "keras"
    for key in block.params:
        np.testing.assert_array_equal(other.params[key], block.params[key])
    gaussian = NonLocalBlock(4, dims=dims, mode="gaussian", sub_sample=False, **KERAS)
    assert sorted(gaussian.state_dict(layout="keras")) == ["W_z", "g"]


@pytest.mark.parametrize("options,match", [
    (dict(), "bn_layer=True"),
    (dict(bn_layer=False), "W_z_bias=True, projection_bias=True"),
    (dict(bn_layer=False, W_z_bias=False), "projection_bias=True"),
    (dict(KERAS, mode="concatenation", sub_sample=False), "concatenate"),
    (dict(KERAS, scale=True), "scale=True"),
    (dict(KERAS), "pool='after'"),
    (dict(KERAS, pool="flattened", mode="dot_product"), "only in its embedded mode"),
    (dict(KERAS, pool="flattened", pool_stride=1), "pool_stride"),
])
def test_keras_layout_refuses_what_the_port_cannot_express(options, match):
    block = NonLocalBlock(4, dims=2, **options)
    with pytest.raises(ValueError, match=match):
        block.state_dict(layout="keras")
    good = NonLocalBlock(4, dims=2, pool="flattened", **KERAS).state_dict(layout="keras")
    with pytest.raises(ValueError, match="keras"):
        block.load_state_dict(good, layout="keras")


def test_other_layouts_refuse_projection_bias_false_and_the_flattened_pool():
    no_bias = NonLocalBlock(4, dims=3, projection_bias=False)
    flattened = NonLocalBlock(4, dims=2, pool="flattened")
    for layout in layouts.PEER_LAYOUTS:
        assert any("projection_bias=False" in p for p in layouts.problems(no_bias, layout)), layout
        assert layouts.problems(flattened, layout), layout
    with pytest.raises(ValueError, match="projection_bias=False"):
        no_bias.state_dict(layout="alexhex7")


def test_keras_layout_load_errors():
    block = NonLocalBlock(4, dims=2, pool="flattened", **KERAS)
    state = block.state_dict(layout="keras")
    with pytest.raises(ValueError, match=r"state\['g'\] has shape"):
        block.load_state_dict(dict(state, g=state["g"].reshape(1, 4, 2)), layout="keras")
    with pytest.raises(ValueError, match="missing keys \\['W_z'\\]"):
        block.load_state_dict({k: v for k, v in state.items() if k != "W_z"}, layout="keras")


@pytest.mark.parametrize("kwargs,match", [
    (dict(pool="flattened", pool_kernel=(2, 2)), "pool_kernel must be an int or a tuple of 1"),
    (dict(pool="flattened", pool_kernel=0), "pool_kernel must be an int >= 1"),
    (dict(pool="flattened", pool_stride=(1, 1)), "pool_stride must be an int or a tuple of 1"),
    (dict(pool="sideways"), "'after', 'before' or 'flattened'"),
    (dict(projection_bias=None), "projection_bias must be True or False"),
])
def test_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NonLocalBlock(4, dims=2, **kwargs)


def test_too_few_positions_for_the_flattened_pool():
    block = NonLocalBlock(4, dims=2, pool="flattened", pool_kernel=5)
    with pytest.raises(ValueError, match="4 positions, fewer than pool_kernel=5"):
        block.forward(np.zeros((1, 4, 2, 2), dtype=np.float32))
