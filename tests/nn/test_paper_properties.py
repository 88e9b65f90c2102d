"""Statements of Wang et al. (CVPR 2018) that the docs quote, as properties against definitions written here.

- Eq. (1) with the four pairwise functions and normalisers of Section 3.2 (Gaussian e^{x_i^T x_j},
  embedded Gaussian e^{theta_i^T phi_j}, both over C = sum_j f; dot product theta_i^T phi_j and
  concatenation ReLU(w_f^T [theta_i; phi_j]) over C = the number of positions, of x-hat when the keys
  are subsampled, Section 3.3);
- the block of Eq. (6) and Fig. 2: z = BN(W_z y) + x, phi and g max-pooled 2x2 after their 1x1 convolutions;
- without subsampling the operation is equivariant to permuting the positions;
- with BN gamma = 0 (Section 4.1, "initialize ... zero") a block, at every insertion point of a network,
  is the identity.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nlref.nn import NonLocalBlock
from nlref.nn.models import ImageResNet, NonLocal, VideoNet
from nlref.nn.nonlocal_op import MODES, nonlocal_forward

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _eq1(theta, phi, g, mode, w_f=None):
    """y_i = (1 / C) sum_j f(x_i, x_j) g(x_j), one query and one key at a time."""
    b, _, n = theta.shape
    m = phi.shape[2]
    y = np.zeros((b, g.shape[1], n))
    for k in range(b):
        for i in range(n):
            if mode in ("gaussian", "embedded_gaussian"):
                f = np.array([np.exp(theta[k, :, i] @ phi[k, :, j]) for j in range(m)])
                c = f.sum()
            elif mode == "dot_product":
                f = np.array([theta[k, :, i] @ phi[k, :, j] for j in range(m)])
                c = m
            else:
                f = np.array([max(0.0, w_f @ np.concatenate([theta[k, :, i], phi[k, :, j]])) for j in range(m)])
                c = m
            y[k, :, i] = sum(f[j] * g[k, :, j] for j in range(m)) / c
    return y


def _op_inputs(seed, mode, b, d, n, m, dg):
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((b, d, n)) / 2
    phi = theta[:, :, :m].copy() if mode == "gaussian" and m <= n else rng.standard_normal((b, d, m)) / 2
    g = rng.standard_normal((b, dg, m))
    w_f = rng.standard_normal(2 * d) if mode == "concatenation" else None
    return theta, phi, g, w_f


@SETTINGS
@given(mode=st.sampled_from(MODES), b=st.integers(1, 2), d=st.integers(1, 4), n=st.integers(1, 9),
       m=st.integers(1, 9), dg=st.integers(1, 3), chunk=st.sampled_from([None, 1, 2, 4]), seed=st.integers(0, 99))
def test_the_operation_is_eq1_with_the_tables_f_and_c(mode, b, d, n, m, dg, chunk, seed):
    theta, phi, g, w_f = _op_inputs(seed, mode, b, d, n, m, dg)
    y, _ = nonlocal_forward(theta, phi, g, mode=mode, w_f=w_f, chunk_size=chunk)
    np.testing.assert_allclose(y, _eq1(theta, phi, g, mode, w_f), rtol=1e-11, atol=1e-13)


@SETTINGS
@given(mode=st.sampled_from(MODES), n=st.integers(1, 10), d=st.integers(1, 4), chunk=st.sampled_from([None, 3]),
       seed=st.integers(0, 999))
def test_the_operation_is_permutation_equivariant_in_every_mode(mode, n, d, chunk, seed):
    """Without subsampling, keys = queries: permuting the positions permutes y, in all four modes."""
    theta, phi, g, w_f = _op_inputs(seed, mode, 1, d, n, n, 2)
    if mode == "gaussian":
        phi = theta
    perm = np.random.default_rng(seed + 1).permutation(n)
    y, _ = nonlocal_forward(theta, phi, g, mode=mode, w_f=w_f, chunk_size=chunk)
    yp, _ = nonlocal_forward(theta[:, :, perm], phi[:, :, perm], g[:, :, perm], mode=mode, w_f=w_f,
                             chunk_size=chunk)
    np.testing.assert_allclose(yp, y[:, :, perm], rtol=1e-12, atol=1e-13)


def _randomise(block, rng):
    for v in block.params.values():
        v[...] = rng.standard_normal(v.shape) / 2
    for name in ("bn.running_mean", "bn.running_var"):
        if name in block.buffers:
            block.buffers[name][...] = rng.uniform(0.5, 1.5, block.buffers[name].shape)


def _pool2(a):
    """2x2 max-pooling with stride 2 of (B, C, H, W), the last odd row/column dropped."""
    b, c, h, w = a.shape
    a = a[:, :, :h // 2 * 2, :w // 2 * 2]
    return a.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def _fig2(block, x, mode, sub_sample):
    p = block.params
    conv = lambda name, a: np.einsum("oc,bchw->bohw", p[name + ".weight"], a) + p[name + ".bias"][:, None, None]  # noqa: E731
    theta, phi = (x, x) if mode == "gaussian" else (conv("theta", x), conv("phi", x))
    g = conv("g", x)
    if sub_sample:
        phi, g = _pool2(phi), _pool2(g)
    flat = lambda a: a.reshape(a.shape[0], a.shape[1], -1)  # noqa: E731
    y = _eq1(flat(theta), flat(phi), flat(g), mode, p.get("w_f")).reshape(x.shape[0], -1, *x.shape[2:])
    wy = np.einsum("oc,bchw->bohw", p["W_z.weight"], y) + p["W_z.bias"][:, None, None]
    mean, var = block.buffers["bn.running_mean"], block.buffers["bn.running_var"]
    bn = (wy - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) * p["bn.gamma"][:, None, None] \
        + p["bn.beta"][:, None, None]
    return bn + x


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample, shape", [(False, (3, 4)), (True, (4, 6)), (True, (5, 7))])
def test_the_block_is_fig2(mode, sub_sample, shape):
    rng = np.random.default_rng(7)
    block = NonLocalBlock(4, mode=mode, dims=2, sub_sample=sub_sample, dtype="float64", seed=1)
    _randomise(block, rng)
    block.eval()
    x = rng.standard_normal((2, 4) + shape)
    np.testing.assert_allclose(block.forward(x), _fig2(block, x, mode, sub_sample), rtol=1e-11, atol=1e-12)


@SETTINGS
@given(mode=st.sampled_from(MODES), h=st.integers(1, 4), w=st.integers(1, 5), training=st.booleans(),
       seed=st.integers(0, 999))
def test_the_block_without_subsampling_is_permutation_equivariant(mode, h, w, training, seed):
    """Batch norm's statistics are sums over positions, so they too are blind to the order (train and eval)."""
    rng = np.random.default_rng(seed)
    block = NonLocalBlock(3, mode=mode, dims=2, sub_sample=False, dtype="float64", seed=seed)
    _randomise(block, rng)
    block.train() if training else block.eval()
    x = rng.standard_normal((2, 3, h, w))
    perm = rng.permutation(h * w)
    z = block.forward(x).reshape(2, 3, -1)
    zp = block.forward(x.reshape(2, 3, -1)[:, :, perm].reshape(x.shape)).reshape(2, 3, -1)
    np.testing.assert_allclose(zp, z[:, :, perm], rtol=1e-11, atol=1e-12)


@SETTINGS
@given(mode=st.sampled_from(MODES), dims=st.integers(1, 3), pool=st.sampled_from(["after", "before", "flattened"]),
       sub_sample=st.booleans(), bn_layer=st.booleans(), seed=st.integers(0, 999))
def test_a_new_block_is_the_identity(mode, dims, pool, sub_sample, bn_layer, seed):
    rng = np.random.default_rng(seed)
    shape = (2, 4) + (4, 5, 6)[:dims]
    x = rng.standard_normal(shape) * 3
    if not sub_sample:
        pool = "after"
    block = NonLocalBlock(4, mode=mode, dims=dims, sub_sample=sub_sample, bn_layer=bn_layer, pool=pool,
                          dtype="float64", seed=seed)
    for training in (True, False):
        block.train() if training else block.eval()
        np.testing.assert_array_equal(block.forward(x), x)


def _spy(net):
    seen = []
    for name, layer in net.layers:
        if isinstance(layer, NonLocal):
            def forward(h, _f=layer.forward, _name=name, **kw):
                out = _f(h, **kw)
                seen.append((_name, h, out))
                return out
            layer.forward = forward
    return seen


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("sub_sample", [True, False])
def test_every_insertion_point_of_the_image_network_starts_as_the_identity(mode, count, sub_sample):
    net = ImageResNet(nonlocal_blocks=count, blocks=3, width=4, mode=mode, dtype="float64", seed=2,
                      nonlocal_options=dict(sub_sample=sub_sample))
    base = ImageResNet(nonlocal_blocks=0, blocks=3, width=4, dtype="float64", seed=5)
    base.load_state_dict({k: v for k, v in net.state_dict().items() if ".nl" not in k})
    seen = _spy(net)
    x = np.random.default_rng(3).standard_normal((2, 1, 7, 6))
    for training in (True, False):
        net.train() if training else net.eval()
        base.train() if training else base.eval()
        seen.clear()
        np.testing.assert_array_equal(net.forward(x), base.forward(x))
        assert sorted(name for name, _, _ in seen) == sorted(f"res2.nl{j}" for j in range(3 - count, 3))
        for name, inp, out in seen:
            np.testing.assert_array_equal(out, inp, err_msg=name)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_every_insertion_point_of_the_video_network_starts_as_the_identity(count):
    tiny = dict(in_channels=1, num_classes=2, widths=(4, 4, 4), blocks=(1, 2, 2), dtype="float64", dropout=0.0)
    net = VideoNet(**tiny, nonlocal_blocks=count, seed=2)
    base = VideoNet(**tiny, nonlocal_blocks=0, seed=5)
    base.load_state_dict({k: v for k, v in net.state_dict().items() if ".nl" not in k})
    seen = _spy(net)
    x = np.random.default_rng(4).standard_normal((2, 1, 4, 16, 16))
    for training in (True, False):
        net.train() if training else net.eval()
        base.train() if training else base.eval()
        seen.clear()
        np.testing.assert_array_equal(net.forward(x), base.forward(x))
        assert len(seen) == count
        for name, inp, out in seen:
            np.testing.assert_array_equal(out, inp, err_msg=name)
