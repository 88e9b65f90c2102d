"""The small 2-D residual network (ImageResNet): gradients, receptive field, input checks."""

import numpy as np
import pytest

import nlref.backend as B
from nlref.nn import layer_gradcheck
from nlref.nn.models import ImageResNet


def _perturbed(net, seed=1):
    """Batch-norm scales away from their start (the non-local block's output BN starts at 0)."""
    rng = np.random.default_rng(seed)
    for key, value in net.params.items():
        if key.endswith(("gamma", "beta")):
            net.set_param(key, value + B.asarray(rng.uniform(0.3, 0.8, value.shape), like=value))
    return net


@pytest.mark.parametrize("nonlocal_blocks", [0, 1])
def test_gradients_match_finite_differences(nonlocal_blocks):
    net = _perturbed(ImageResNet(nonlocal_blocks=nonlocal_blocks, width=3, blocks=1, dropout=0.3, dtype="float64",
                                 seed=2))
    x = np.random.default_rng(0).standard_normal((2, 1, 6, 6))
    result = layer_gradcheck(net, x, rtol=1e-5)   # a float64 net with batch norm on a batch of 2
    assert result.passed, str(result)
    assert set(result.errors) == {"x", *net.params}
    # exactly zero only where the maths says so: a bias under a softmax over keys (phi) or before batch norm
    assert set(result.zero) <= {"res2.nl0.phi.bias", "res2.nl0.g.bias", "res2.nl0.W_z.bias"}
    if nonlocal_blocks:
        assert {"res2.nl0.theta.weight", "res2.nl0.phi.weight", "res2.nl0.g.weight"}.isdisjoint(result.zero)


def _features(net, x):
    """The last feature map (before pooling), as (H, W) summed over channels."""
    h = x[:, :, None]
    for _, layer in net.layers[:-1]:
        h = layer.forward(h)
    return h[0, :, 0]


@pytest.mark.parametrize("blocks", [1, 2])
def test_local_receptive_field_is_what_a_pixel_reaches(blocks):
    net = _perturbed(ImageResNet(width=4, blocks=blocks, dtype="float64", seed=3)).eval()
    assert net.local_receptive_field == 3 + 4 * blocks
    size, centre = 25, 12
    x = np.random.default_rng(1).standard_normal((1, 1, size, size))
    bumped = x.copy()
    bumped[0, 0, centre, centre] += 5.0
    changed = np.any(_features(net, bumped) != _features(net, x), axis=0)   # (H, W) units that see the pixel
    rows, cols = np.nonzero(changed)
    # a unit sees the pixel iff the pixel lies in its field: the units reached span the field's side
    assert rows.max() - rows.min() + 1 == net.local_receptive_field
    assert cols.max() - cols.min() + 1 == net.local_receptive_field


def test_a_nonlocal_block_reaches_the_whole_image():
    net = _perturbed(ImageResNet(nonlocal_blocks=1, width=4, blocks=1, dtype="float64", seed=3)).eval()
    assert net.local_receptive_field == 7          # the local path; the block itself sees everything
    x = np.random.default_rng(1).standard_normal((1, 1, 16, 16))
    bumped = x.copy()
    bumped[0, 0, 1, 1] += 5.0
    changed = np.any(_features(net, bumped) != _features(net, x), axis=0)
    assert changed[-1, -1]


def test_attention_and_shapes():
    net = ImageResNet(nonlocal_blocks=2, width=4, blocks=2, seed=0).eval()
    logits, attention = net.forward(np.zeros((3, 1, 8, 8), np.float32), return_attention=True)
    assert logits.shape == (3, 2)
    assert set(attention) == {"res2.nl0", "res2.nl1"}
    assert attention["res2.nl1"].shape == (3, 64, 16)   # keys max-pooled 2x2
    np.testing.assert_allclose(attention["res2.nl1"].sum(-1), 1, rtol=1e-5)


def test_state_dict_round_trip():
    a, b = ImageResNet(nonlocal_blocks=1, seed=0), ImageResNet(nonlocal_blocks=1, seed=1)
    b.load_state_dict(a.state_dict())
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(a.eval().forward(x), b.eval().forward(x))


@pytest.mark.parametrize("kwargs, match", [
    ({"width": 0}, "width"), ({"blocks": 1.5}, "blocks"), ({"nonlocal_blocks": 2, "blocks": 1}, "nonlocal_blocks"),
    ({"mode": "cosine"}, "mode"), ({"dropout": 1.0}, "dropout"), ({"dtype": "float16"}, "dtype"),
    ({"nonlocal_options": {"heads": 2}}, "nonlocal_options"), ({"in_channels": True}, "in_channels"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageResNet(**kwargs)


def test_bad_input_is_named():
    net = ImageResNet(in_channels=3)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net.forward(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net.forward(np.zeros((2, 3, 1, 8, 8), np.float32))
    with pytest.raises(TypeError, match="float32"):
        net.forward(np.zeros((2, 3, 8, 8)))
    for shape in ((0, 3, 8, 8), (2, 3, 0, 8), (2, 3, 8, 0)):  # an empty batch: "cannot reshape array of size 0"
        with pytest.raises(ValueError, match=r"^x must hold at least one image .* got shape \({}\)$".format(
                ", ".join(map(str, shape)))):
            net.eval().forward(np.zeros(shape, np.float32))


def test_same_logits_and_gradients_on_every_cpu_library(xp_cpu):
    """The network runs on NumPy and on array-api-strict, with the same weights (from the seed)."""
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8))
    ref = _perturbed(ImageResNet(nonlocal_blocks=1, width=3, dropout=0.5, dtype="float64", seed=5))
    net = _perturbed(ImageResNet(nonlocal_blocks=1, width=3, dropout=0.5, dtype="float64", seed=5, xp=xp_cpu))
    want = ref.forward(x, dropout_seed=7)
    got = net.forward(B.asarray(x, xp=xp_cpu), dropout_seed=7)
    np.testing.assert_allclose(B.to_numpy(got), want, rtol=1e-12, atol=1e-12)
    dlogits = np.random.default_rng(1).standard_normal(want.shape)
    dx_ref, dx = ref.backward(dlogits), net.backward(B.asarray(dlogits, xp=xp_cpu))
    assert dx.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(B.to_numpy(dx), dx_ref, rtol=1e-10, atol=1e-12)
    for key, value in ref.grads.items():
        np.testing.assert_allclose(B.to_numpy(net.grads[key]), value, rtol=1e-10, atol=1e-12, err_msg=key)


def test_an_image_too_small_for_the_block_is_refused_in_its_own_terms():
    net = ImageResNet(nonlocal_blocks=1, width=4, blocks=1, dtype="float64", seed=3)
    with pytest.raises(ValueError, match=r"x of 1x5 pixels is too small for this network \(its smallest square input is "
                                         r"2x2 pixels\): its non-local block 'res2\.nl0' would get 1x5 positions"):
        net.forward(np.zeros((2, 1, 1, 5)))
    assert net.forward(np.zeros((2, 1, 2, 2))).shape == (2, 2)
