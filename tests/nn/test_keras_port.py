"""nlref's block against the titu1994 Keras port's computation, built from real Keras 3 layers.

The port is ``non_local_block`` in ``titu1994/keras-non-local-nets`` ``non_local.py`` at
commit ea0108aadb3d3ccca8b44932896a37119ae6a8f1 (read through the search tools; nothing is
copied). :func:`_keras_port` rebuilds its computation from that file's facts, with the same
Keras layers it uses:

- theta, phi, g and the output projection are ``Conv{1,2,3}D(..., 1, padding="same",
  use_bias=False)``; there is no batch norm; the input is channels-last;
- each branch is ``Reshape((-1, channels))``: the positions flattened in row-major order;
- ``mode="embedded"``: ``Dot(axes=2)`` of theta and phi, ``Activation("softmax")``; with
  ``compression > 1``, ``MaxPool1D(compression)`` on the flattened phi and g (nowhere else);
- ``mode="dot"``: the same ``Dot`` divided by the number of keys (``1 / size[-1]``), no softmax;
- ``mode="gaussian"``: ``Dot`` of the raw input with itself, then softmax (no theta, no phi);
- ``Dot(axes=[2, 1])`` of the weights and g, ``Reshape`` back, the output conv, ``Add`` with
  the input; ``"concatenate"`` raises NotImplementedError.

Keras runs on its PyTorch backend (``KERAS_BACKEND=torch``; no TensorFlow). Keras 3.15.1's
``ops.matmul`` on that backend returns float32 for two float64 tensors
(``dtypes.result_type(torch.float64, torch.float64) == "float32"``), so the ``Dot`` layers
compute in float32 even with ``floatx="float64"``; the comparisons therefore hold to float32's
precision, while every other layer runs in float64.
"""

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - another backend was chosen before this module
    pytest.skip(f"these tests run Keras on its torch backend, not {keras.backend.backend()}",
                allow_module_level=True)

from nlref.nn import NonLocalBlock  # noqa: E402

# Keras's torch backend converts its tensors with np.array(x) (keras/src/backend/torch/core.py), which NumPy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
KERAS_OPTIONS = dict(projection_bias=False, W_z_bias=False, bn_layer=False)
SPATIAL = {1: (9,), 2: (5, 7), 3: (3, 4, 5)}  # odd position counts: a window of the flattened pool straddles rows
MODES = {"embedded": "embedded_gaussian", "dot": "dot_product", "gaussian": "gaussian"}


@pytest.fixture(autouse=True)
def _float64_keras():
    old = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(old)


def _conv(rank, channels):
    layer = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[rank]
    return layer(channels, (1,) * rank, padding="same", use_bias=False, kernel_initializer="he_normal")


def _keras_port(shape, mode, compression, inter):
    """The port's graph from its file's facts: (model, {role: the conv layer that plays it})."""
    *spatial, channels = shape
    rank = len(spatial)
    ip = keras.Input(shape=tuple(shape))
    layers = {}
    if mode == "gaussian":
        x1 = keras.layers.Reshape((-1, channels))(ip)
        x2 = keras.layers.Reshape((-1, channels))(ip)
        f = keras.layers.Activation("softmax")(keras.layers.Dot(axes=2)([x1, x2]))
    else:
        layers["theta"], layers["phi"] = _conv(rank, inter), _conv(rank, inter)
        theta = keras.layers.Reshape((-1, inter))(layers["theta"](ip))
        phi = keras.layers.Reshape((-1, inter))(layers["phi"](ip))
        if mode == "dot":
            f = keras.layers.Dot(axes=2)([theta, phi])
            keys = f.shape[-1]
            f = keras.layers.Rescaling(1.0 / float(keys))(f)  # the port's Lambda(lambda z: (1. / size[-1]) * z)
        else:
            if compression > 1:
                phi = keras.layers.MaxPool1D(compression)(phi)
            f = keras.layers.Activation("softmax")(keras.layers.Dot(axes=2)([theta, phi]))
    layers["g"] = _conv(rank, inter)
    g = keras.layers.Reshape((-1, inter))(layers["g"](ip))
    if compression > 1 and mode == "embedded":
        g = keras.layers.MaxPool1D(compression)(g)
    y = keras.layers.Dot(axes=[2, 1])([f, g])
    y = keras.layers.Reshape(tuple(spatial) + (inter,))(y)
    layers["W_z"] = _conv(rank, channels)
    z = keras.layers.Add()([ip, layers["W_z"](y)])
    return keras.Model(ip, z), layers


def _nlref_for(rank, channels, mode, compression, inter):
    pooled = mode == "embedded" and compression > 1
    extra = dict(pool="flattened", pool_kernel=compression) if pooled else dict(sub_sample=False)
    return NonLocalBlock(channels, dims=rank, mode=MODES[mode], inter_channels=inter, dtype="float64",
                         **KERAS_OPTIONS, **extra)


def _kernels(layers):
    return {role: keras.ops.convert_to_numpy(layer.kernel) for role, layer in layers.items()}


def _channels_first(x):
    return np.moveaxis(x, -1, 1)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("mode,compression", [("embedded", 2), ("embedded", 3), ("embedded", 1), ("dot", 2),
                                              ("gaussian", 2)])
def test_nlref_reproduces_the_keras_port(rank, mode, compression):
    """Kernels copied by role; the outputs agree to float32 precision (the Keras Dot's, see the module doc)."""
    channels, inter = 6, 3
    shape = SPATIAL[rank] + (channels,)
    keras.utils.set_random_seed(rank)
    model, layers = _keras_port(shape, mode, compression, inter)
    x = np.random.default_rng(rank).standard_normal((2,) + shape)
    expected = keras.ops.convert_to_numpy(model(x))
    block = _nlref_for(rank, channels, mode, compression, inter)
    block.load_state_dict(_kernels(layers), layout="keras")
    assert block.loaded_layout == "keras"
    z = block.forward(_channels_first(x))
    assert np.abs(expected - x).max() > 0.1  # the port's block is not the identity (he_normal W_z, no BN)
    np.testing.assert_allclose(_channels_first(expected), z, rtol=1e-5, atol=1e-5)
    if mode == "embedded" and compression > 1:  # the compression matters, so the test can tell
        plain = NonLocalBlock(channels, dims=rank, inter_channels=inter, dtype="float64", sub_sample=False,
                              **KERAS_OPTIONS).load_state_dict(_kernels(layers), layout="keras")
        assert np.abs(plain.forward(_channels_first(x)) - z).max() > 1e-3


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_exported_kernels_load_into_the_keras_layers(rank):
    """state_dict(layout='keras') gives arrays Keras's set_weights takes; the port's output is then nlref's."""
    channels, inter = 4, 2
    shape = SPATIAL[rank] + (channels,)
    block = NonLocalBlock(channels, dims=rank, inter_channels=inter, dtype="float64", pool="flattened",
                          pool_kernel=2, seed=5, **KERAS_OPTIONS)
    rng = np.random.default_rng(0)
    for key, value in block.params.items():
        block.params[key] = rng.standard_normal(value.shape)
    model, layers = _keras_port(shape, "embedded", 2, inter)
    for role, kernel in block.state_dict(layout="keras").items():
        assert kernel.shape == tuple(layers[role].kernel.shape)
        layers[role].set_weights([kernel])
    x = rng.standard_normal((2,) + shape)
    np.testing.assert_allclose(_channels_first(keras.ops.convert_to_numpy(model(x))),
                               block.forward(_channels_first(x)), rtol=1e-5, atol=1e-5)


def test_the_paper_defaults_differ_from_the_port():
    """A block with the paper's pooling (2x2 windows) is not the port, so the comparison can fail."""
    shape = (4, 6, 4)
    keras.utils.set_random_seed(0)
    model, layers = _keras_port(shape, "embedded", 4, 2)
    x = np.random.default_rng(0).standard_normal((1,) + shape)
    expected = _channels_first(keras.ops.convert_to_numpy(model(x)))
    port = NonLocalBlock(4, dims=2, dtype="float64", pool="flattened", pool_kernel=4, **KERAS_OPTIONS)
    port.load_state_dict(_kernels(layers), layout="keras")
    np.testing.assert_allclose(port.forward(_channels_first(x)), expected, rtol=1e-5, atol=1e-5)
    spatial = NonLocalBlock(4, dims=2, dtype="float64", pool_kernel=(2, 2), **KERAS_OPTIONS)  # also 6 keys
    spatial.params = dict(port.params)
    assert np.abs(spatial.forward(_channels_first(x)) - expected).max() > 1e-3


def _keras_port_channels_first(channels, spatial, inter):
    """The port's embedded mode (no compression) run with image_data_format "channels_first": its convolutions
    are channels-first, but each branch is still flattened with Reshape((-1, inter)) and the output reshaped
    back with Reshape((inter, *spatial)) (non_local.py's channel_dim == 1 branch)."""
    rank = len(spatial)
    ip = keras.Input(shape=(channels,) + tuple(spatial))
    layer = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[rank]
    layers = {role: layer(inter if role != "W_z" else channels, (1,) * rank, padding="same", use_bias=False,
                          kernel_initializer="he_normal", data_format="channels_first")
              for role in ("theta", "phi", "g", "W_z")}
    theta = keras.layers.Reshape((-1, inter))(layers["theta"](ip))
    phi = keras.layers.Reshape((-1, inter))(layers["phi"](ip))
    f = keras.layers.Activation("softmax")(keras.layers.Dot(axes=2)([theta, phi]))
    g = keras.layers.Reshape((-1, inter))(layers["g"](ip))
    y = keras.layers.Reshape((inter,) + tuple(spatial))(keras.layers.Dot(axes=[2, 1])([f, g]))
    return keras.Model(ip, keras.layers.Add()([ip, layers["W_z"](y)])), layers


@pytest.mark.parametrize("rank", [2, 3])
def test_a_channels_first_port_has_the_same_kernels_but_another_function(rank):
    """What docs/nonlocal_block.md says of the layout and channels-first Keras: the kernels have the shapes of
    the channels-last port's (so nothing in them can tell), the port computes nlref's block only where its
    Reshape reads memory the same way (intermediate_dim 1), and another function otherwise."""
    channels, spatial = 6, SPATIAL[rank]
    x = np.random.default_rng(rank).standard_normal((2, channels) + spatial)
    for inter in (1, 3):
        keras.utils.set_random_seed(rank)
        model, layers = _keras_port_channels_first(channels, spatial, inter)
        _, last = _keras_port(spatial + (channels,), "embedded", 1, inter)
        kernels = _kernels(layers)
        assert {r: k.shape for r, k in kernels.items()} == {r: k.shape for r, k in _kernels(last).items()}
        block = _nlref_for(rank, channels, "embedded", 1, inter).load_state_dict(kernels, layout="keras")
        port, ours = keras.ops.convert_to_numpy(model(x)), block.forward(x)
        assert np.abs(ours - x).max() > 1  # the branch is not small
        if inter == 1:
            np.testing.assert_allclose(port, ours, rtol=1e-5, atol=1e-5)
        else:
            assert np.abs(port - ours).max() > 1
