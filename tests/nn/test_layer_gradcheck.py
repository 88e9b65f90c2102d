"""layer_gradcheck checks what it names, or refuses: every kind of layer, right and wrong gradients.

For each kind of layer (a leaf with a ``params`` dict, the non-local wrapper of the
network, a composite ``ConvBN`` / ``ResidualBlock``, the whole ``VideoNet`` whose
``params`` is a fresh dict on every access, the ``NonLocalBlock``), the true backward
passes, and a backward with one gradient made wrong (scaled, or all zeros) fails on that
gradient. The running statistics are as they were afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest

from nlref.nn import NonLocalBlock, VideoNet, layer_gradcheck
from nlref.nn import models as M


def _make(host):
    return np.asarray(host, dtype=np.float64)


def _x(*shape, seed=11):
    # not seed 0: gradcheck draws its dout from seed 0, and a dout equal to x is a degenerate
    # direction for batch norm (its x-gradient is then nearly zero)
    return np.random.default_rng(seed).standard_normal(shape)


def _layers():
    """name -> (layer factory, input, expected parameter names, gradcheck options)."""
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    return {
        "conv3d": (lambda: M.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1), rng=rng(), make=_make),
                   _x(2, 2, 2, 4, 4), {"weight"}, {}),
        "batchnorm": (lambda: M.BatchNorm(3, make=_make), _x(2, 3, 2, 3, 3), {"gamma", "beta"}, {}),
        "convbn": (lambda: M.ConvBN(2, 3, (1, 3, 3), rng=rng(), make=_make), _x(2, 2, 2, 4, 4),
                   {"conv.weight", "bn.gamma", "bn.beta"}, {}),
        "residual": (lambda: M.ResidualBlock(2, 3, kernel1=(3, 3, 3), stride=2, rng=rng(), make=_make),
                     _x(2, 2, 2, 4, 4),
                     {f"{u}.{p}" for u in ("conv1", "conv2", "shortcut")
                      for p in ("conv.weight", "bn.gamma", "bn.beta")},
                     {"method": "random", "directions": 3}),
        "nonlocal": (lambda: M.NonLocal(4, extent="space", options={"dtype": "float64", "mode": "embedded_gaussian"},
                                        seed=0, make_xp=np), _x(2, 4, 2, 4, 4), None,
                     {"method": "random", "directions": 3}),
        "block": (lambda: NonLocalBlock(4, dims=1, dtype="float64", seed=1), _x(2, 4, 6), None, {}),
    }


def _videonet():
    net = VideoNet("c2d", nonlocal_blocks=1, widths=(2, 3, 4), blocks=(1, 1, 1), dtype="float64", seed=0)
    # the non-local block starts as the identity (gamma = 0), where its weights have no gradient
    net.set_param("res3.nl0.bn.gamma", np.ones_like(net.params["res3.nl0.bn.gamma"]))
    return net


def _state(layer):
    """Every parameter and buffer of ``layer`` and its descendants, as host copies."""
    if hasattr(layer, "state_dict"):
        return layer.state_dict()
    out = {}
    stack = [("", layer)]
    while stack:
        prefix, node = stack.pop()
        for k, v in {**node.params, **node.buffers}.items():
            out[prefix + k] = np.array(v)
        stack.extend((f"{prefix}{name}.", child) for name, child in node.children())
    return out


def _set_bn_gamma_nonzero(layer):
    """A non-local block starts with gamma = 0, which zeroes most gradients: give it gamma = 1."""
    block = getattr(layer, "block", layer)
    if isinstance(block, NonLocalBlock):
        block.params["bn.gamma"] = np.ones_like(block.params["bn.gamma"])


@pytest.mark.parametrize("kind", list(_layers()))
def test_right_gradients_pass_and_state_is_restored(kind):
    make, x, names, options = _layers()[kind]
    layer = make()
    _set_bn_gamma_nonzero(layer)
    before = _state(layer)
    result = layer_gradcheck(layer, x, **options)
    assert result.passed, str(result)
    expected = set(layer.params) if names is None else names
    assert set(result.errors) == {"x"} | expected        # every parameter was looked at, children included
    after = _state(layer)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def _owner(layer, dotted):
    """(params/grads owner, key) of a dotted parameter name of a composite layer."""
    *path, key = dotted.split(".")
    node = layer
    for part in path:
        node = dict(node.children())[part]
    return node, key


def _wrong_cases():
    cases = []
    for kind, (make, x, names, options) in _layers().items():
        targets = sorted(names) if names is not None else ["theta.weight", "bn.gamma", "W_z.weight"]
        for target in ["x", *targets]:
            for how in ("scaled", "zero"):
                cases.append(pytest.param(kind, target, how, id=f"{kind}-{target}-{how}"))
    return cases


@pytest.mark.parametrize("kind, target, how", _wrong_cases())
def test_a_wrong_gradient_fails(kind, target, how):
    make, x, _, options = _layers()[kind]
    layer = make()
    _set_bn_gamma_nonzero(layer)
    true_backward = layer.backward

    def wrong_backward(dout, **kw):
        dx = true_backward(dout, **kw)
        if target == "x":
            return dx * 1.5 if how == "scaled" else dx * 0
        grads = layer.grads if kind in ("nonlocal", "block") else _owner(layer, target)[0].grads
        key = target if kind in ("nonlocal", "block") else _owner(layer, target)[1]
        grads[key] = grads[key] * (1.5 if how == "scaled" else 0)
        return dx

    layer.backward = wrong_backward
    result = layer_gradcheck(layer, x, **options)
    assert not result.passed
    assert result.errors[target] > result.rtol, str(result)


def test_videonet_is_checked_through_set_param_and_restored():
    net = _videonet()
    x = _x(2, 1, 4, 16, 16, seed=3)
    before = net.state_dict()
    result = layer_gradcheck(net, x, method="random", directions=2, rtol=1e-5)  # a deep float64 net
    assert result.passed, str(result)
    assert set(result.errors) == {"x", *net.params}
    assert not result.zero or set(result.zero) <= {k for k in net.params if k.endswith("bias")}
    after = net.state_dict()
    for key in before:                                  # running statistics too (train mode updated them)
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


@pytest.mark.parametrize("key", ["stem.conv.weight", "res3.0.conv2.bn.gamma", "fc.bias", "res4.0.conv1.conv.weight"])
def test_videonet_wrong_gradient_fails(key):
    net = _videonet()
    true_backward = net.backward

    def wrong_backward(dout, **kw):
        dx = true_backward(dout, **kw)
        leaf, leaf_key = net._owner(key)
        leaf.grads[leaf_key] = leaf.grads[leaf_key] * 1.5
        return dx

    net.backward = wrong_backward
    result = layer_gradcheck(net, _x(2, 1, 4, 16, 16, seed=3), wrt=[key, "x"], method="random",
                              directions=2, rtol=1e-5)
    assert not result.passed and result.errors[key] > result.rtol, str(result)
    assert result.errors["x"] <= result.rtol


class _FreshParams:
    """A layer whose params is a new dict each time and which has no set_param: cannot be perturbed."""

    def __init__(self):
        self._w = np.ones(3)
        self.grads = {}

    @property
    def params(self):
        return {"w": self._w}

    def forward(self, x):
        return x * self._w

    def backward(self, dout):
        self.grads = {"w": dout}
        return dout * self._w


def test_unreachable_parameters_are_refused():
    with pytest.raises(TypeError, match="cannot perturb _FreshParams's parameters"):
        layer_gradcheck(_FreshParams(), _x(3))


def test_a_parameter_without_a_gradient_is_an_error():
    layer = M.BatchNorm(3, make=_make)
    true_backward = layer.backward

    def forgetful(dout):
        dx = true_backward(dout)
        del layer.grads["beta"]
        return dx

    layer.backward = forgetful
    with pytest.raises(ValueError, match="no gradient for parameter 'beta'"):
        layer_gradcheck(layer, _x(2, 3, 2, 3, 3))


def test_what_is_not_a_layer_and_a_string_wrt_are_refused():
    with pytest.raises(TypeError, match="object has no forward, backward, params, grads"):
        layer_gradcheck(object(), _x(3))
    with pytest.raises(TypeError, match=r"wrt must be a list of names, not a string: wrt=\['x'\]"):
        layer_gradcheck(M.BatchNorm(3, make=_make), _x(3), wrt="x")


class _WrongThetaBackward(NonLocalBlock):
    """A non-local block whose backward doubles theta's weight gradient."""

    def backward(self, dz):
        dx = super().backward(dz)
        self.grads["theta.weight"] = 2 * self.grads["theta.weight"]
        return dx


def test_a_new_blocks_zero_gradients_are_not_reported_as_covered_by_passed():
    """A new block (BN gamma = 0) zeroes every gradient upstream of BN: the doubled theta gradient is 0 = 2 x 0,
    and the check passes. It used to print a bare "passed"; the headline now says that 8 of 11 gradients were
    checked only as zero and names them. At random parameters the same backward fails."""
    x = _x(2, 4, 6)
    new = layer_gradcheck(_WrongThetaBackward(4, dims=1, dtype="float64", seed=0), x)
    inner = ["theta.weight", "theta.bias", "phi.weight", "phi.bias", "g.weight", "g.bias", "W_z.weight", "W_z.bias"]
    assert new.passed and new.zero == inner
    head = str(new).splitlines()[0]
    assert head.startswith("gradcheck (centred, eps=1e-06, rtol=1e-06): passed, but 8 of 11 gradients are zero "
                           "here and were checked only as zero: theta.weight, theta.bias, ")
    assert "BN gamma = 0" in head
    block = _WrongThetaBackward(4, dims=1, dtype="float64", seed=0)
    rng = np.random.default_rng(3)
    for name, value in block.params.items():
        block.params[name] = rng.standard_normal(value.shape)
    wrong = layer_gradcheck(block, x)
    assert not wrong.passed and wrong.errors["theta.weight"] > 0.3
    assert wrong.zero == ["phi.bias", "g.bias", "W_z.bias"]  # zero for any values: a softmax, and BN after them
    assert str(wrong).splitlines()[0].startswith("gradcheck (centred, eps=1e-06, rtol=1e-06): FAILED; 3 of 11 "
                                                 "gradients are zero here")
