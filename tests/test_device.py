"""Arrays on a device other than the CPU (array-api-strict's "device1", the CPU stand-in for a GPU).

array-api-strict refuses to convert an array on "device1" to NumPy implicitly and
refuses to combine arrays of two devices, as CuPy does for GPU arrays: a layer or
network built with ``device=`` must keep everything there, and an input on another
device must be a clear error, not a silent copy.
"""

from __future__ import annotations

import numpy as np
import pytest

import nlref
import nlref.backend as B
from nlref.nn import NonLocalBlock
from nlref.nn.attention import TransformerBlock
from nlref.nn.models import ImageResNet, VideoNet, VideoTransformer
from nlref.train import TrainConfig, build_model

xs = pytest.importorskip("array_api_strict")
DEVICE1 = xs.Device("device1")


def _on(host, device=DEVICE1, dtype="float64"):
    return B.asarray(np.asarray(host, dtype=dtype), xp=xs, device=device)


def test_device1_refuses_implicit_conversion():
    """The premise of these tests: a stray numpy.asarray on device1 fails loudly."""
    x = _on(np.zeros(3))
    with pytest.raises(RuntimeError, match="device"):
        np.asarray(x)
    np.testing.assert_array_equal(B.to_numpy(x), np.zeros(3))  # the explicit move works


@pytest.mark.parametrize("mode", ["embedded_gaussian", "concatenation"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_block_on_device1_forward_backward(mode, chunk_size):
    block = NonLocalBlock(4, mode=mode, dims=2, dtype="float64", seed=1, chunk_size=chunk_size, xp=xs,
                          device=DEVICE1)
    ref = NonLocalBlock(4, mode=mode, dims=2, dtype="float64", seed=1, chunk_size=chunk_size)
    rng = np.random.default_rng(0)
    for b in (block, ref):
        b.params["bn.gamma"] = B.asarray(np.ones(4), like=b.params["bn.gamma"])  # gamma = 1: z depends on y
    assert all(v.device == DEVICE1 for v in [*block.params.values(), *block.buffers.values()])
    host_x, host_dz = rng.standard_normal((2, 4, 6, 6)), rng.standard_normal((2, 4, 6, 6))
    z = block.forward(_on(host_x))
    dx = block.backward(_on(host_dz))
    assert z.device == DEVICE1 and dx.device == DEVICE1
    assert all(g.device == DEVICE1 for g in block.grads.values())
    assert all(v.device == DEVICE1 for v in block.buffers.values())  # running statistics updated in place there
    np.testing.assert_allclose(B.to_numpy(z), ref.forward(host_x), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(B.to_numpy(dx), ref.backward(host_dz), rtol=1e-12, atol=1e-13)
    other = NonLocalBlock(4, mode=mode, dims=2, dtype="float64", seed=7, xp=xs, device=DEVICE1)
    other.load_state_dict(block.state_dict())
    assert all(v.device == DEVICE1 for v in other.params.values())


@pytest.mark.parametrize("make, shape", [
    (lambda **kw: VideoNet(nonlocal_blocks=1, widths=(4, 6, 8), dropout=0.5, dtype="float64", **kw), (2, 1, 4, 16, 16)),
    (lambda **kw: VideoNet("i3d", nonlocal_blocks=1, extent="time", widths=(4, 6, 8), dtype="float64", **kw),
     (2, 1, 4, 16, 16)),
    (lambda **kw: ImageResNet(nonlocal_blocks=1, width=4, dtype="float64", **kw), (2, 1, 12, 12)),
    (lambda **kw: VideoTransformer(frames=4, size=8, embed_dim=8, depth=1, num_heads=2, mlp_dim=8, pool="cls",
                                   dtype="float64", **kw), (2, 1, 4, 8, 8)),
], ids=["c2d", "i3d-time", "image-resnet", "transformer"])
def test_networks_on_device1_forward_backward(make, shape):
    net, ref = make(xp=xs, device=DEVICE1), make(seed=5)
    assert all(v.device == DEVICE1 for v in net.params.values())
    ref.load_state_dict(net.state_dict())  # host copies out, and back in on the other side
    net.load_state_dict(ref.state_dict())
    assert all(v.device == DEVICE1 for v in [*net.params.values(), *net.buffers.values()])
    host = np.random.default_rng(3).standard_normal(shape)
    logits = net.forward(_on(host), dropout_seed=4)
    assert logits.device == DEVICE1
    dx = net.backward(B.asarray(np.ones((2, 2)), like=logits))
    assert dx.device == DEVICE1
    assert all(g.device == DEVICE1 for g in net.grads.values())
    np.testing.assert_allclose(B.to_numpy(logits), ref.forward(host, dropout_seed=4), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(B.to_numpy(dx), ref.backward(np.ones((2, 2))), rtol=1e-10, atol=1e-12)


def test_build_model_and_data_take_a_device():
    config = TrainConfig(widths=(4, 6, 8), n_train=4, n_val=2, size=16)
    net = build_model(config, xp=xs, device=DEVICE1)
    assert all(v.device == DEVICE1 for v in net.params.values())
    clips = nlref.data.sprite_clips(3, size=16, xp=xs, device=DEVICE1)
    assert clips.video.device == DEVICE1 and clips.labels.device == DEVICE1
    logits = net.forward(clips.video)
    assert logits.device == DEVICE1


def test_mixed_devices_are_a_clear_error():
    block = NonLocalBlock(4, dims=2, dtype="float64", xp=xs, device=DEVICE1)
    x_cpu = _on(np.zeros((1, 4, 4, 4)), device=None)
    with pytest.raises(ValueError, match=r"x is on device .*CPU_DEVICE.* parameters are on .*device1.*device="):
        block.forward(x_cpu)
    block.forward(_on(np.zeros((1, 4, 4, 4))))
    with pytest.raises(ValueError, match=r"dz is on device"):
        block.backward(x_cpu)
    net = VideoNet(widths=(4, 6, 8), dtype="float64", xp=xs)  # the default device
    with pytest.raises(ValueError, match=r"x is on device .*device1.* network's parameters"):
        net.forward(_on(np.zeros((1, 1, 4, 16, 16))))
    layer = TransformerBlock(4, 2, 8, dtype="float64", xp=xs, device=DEVICE1)
    with pytest.raises(ValueError, match=r"x is on device .*CPU_DEVICE.* layer's parameters"):
        layer.forward(_on(np.zeros((1, 3, 4)), device=None))
    with pytest.raises(ValueError, match=r"different devices .*x on .*device1.*w on .*CPU_DEVICE"):
        B.array_namespace(_on(np.zeros(2)), _on(np.zeros(2), device=None), names=["x", "w"])
    from nlref.nn import functional as F
    with pytest.raises(ValueError, match="different devices"):
        F.conv1x1_forward(_on(np.zeros((1, 2, 3))), _on(np.zeros((2, 2)), device=None))


def test_asarray_device_argument():
    x = B.asarray(np.arange(3.0), xp=xs, device=DEVICE1)
    assert x.device == DEVICE1
    assert B.asarray(np.arange(3.0), like=x).device == DEVICE1
    with pytest.raises(TypeError, match="device= only with xp="):
        B.asarray(np.arange(3.0), like=x, device=DEVICE1)
    assert B.normal((2,), seed=0, xp=xs, device=DEVICE1).device == DEVICE1
    assert B.reflect_pad(x, [(2, 2)]).device == DEVICE1


def test_training_runs_on_device1(tmp_path):
    from tests.helpers import TINY
    from nlref.train import train

    config = TrainConfig(**{**TINY, "epochs": 1})
    result = train(config, xp=xs, device=DEVICE1, progress=False, log=None)
    assert all(v.device == DEVICE1 for v in result["model"].params.values())
    reference = train(config, progress=False, log=None)  # the same run on NumPy
    assert result["history"][-1]["train_loss"] == pytest.approx(reference["history"][-1]["train_loss"], rel=1e-6)
