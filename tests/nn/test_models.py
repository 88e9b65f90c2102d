"""VideoNet: an independent PyTorch twin as oracle (logits, dL/dx, every gradient, BN statistics),
gradient checks of the whole network, identity at init, non-local placement and parameter counts,
state dicts, bad input, and libraries."""

import importlib
import itertools
import re

import numpy as np
import pytest

import nlref.backend as B
from nlref.nn import functional as F
from nlref.nn import gradcheck
from nlref.nn.models import EXTENTS, FLAVOURS, NonLocal, VideoNet, nonlocal_slots
from nlref.nn.nonlocal_op import MODES
from tests.helpers import assert_same_library

try:
    import torch

    from tests.nn.torch_oracle import TorchVideoNet, load_videonet_params, videonet_buffers, videonet_grads
except ImportError:  # the oracle is optional
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch (the optional oracle) is not installed")

# tiny: res2 at 6x6, res3 at 3x3, res4 at 2x2 (odd sizes go through the strided convs and the pools)
TINY = dict(widths=(4, 6, 8), blocks=(1, 2, 2), dtype="float64", dropout=0.0)
X_SHAPE = (3, 1, 4, 12, 12)
# the oracle's clip is not square: res2 at 5x7, res3 at 3x4, res4 at 2x2, so an H/W mix-up in a reshape (the
# non-local extents fold (B, C, T, H, W) into frames or into pixels' time lines and back) cannot pass unseen
ORACLE_SHAPE = (3, 1, 4, 10, 14)


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _net(xp=np, seed=1, device=None, **config):
    return VideoNet(**{**TINY, **config}, seed=seed, xp=xp, device=device)


def _x(xp=np, seed=3, shape=X_SHAPE, dtype="float64", device=None):
    return B.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype), xp=xp, device=device)


def _randomise(net, seed=2):
    """Every BN affine parameter and running statistic, and every non-local parameter, random (gamma != 0)."""
    rng = np.random.default_rng(seed)
    state = net.state_dict()
    for key, value in state.items():
        if key.endswith("gamma"):
            state[key] = rng.uniform(0.5, 1.5, value.shape) * rng.choice([-1.0, 1.0], value.shape)
        elif key.endswith(("beta", "running_mean")):
            state[key] = 0.2 * rng.standard_normal(value.shape)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, value.shape)
        elif ".nl" in key:  # theta, phi, g, W_z (zero without BN), w_f
            state[key] = 0.5 * rng.standard_normal(value.shape)
    return net.load_state_dict(state)


def _relative_errors(ours, theirs):
    """||ours - theirs|| / ||theirs|| per key; a gradient that is zero in exact arithmetic (phi's and g's
    bias under a softmax, W_z's bias before BN) is rounding noise on both sides (~1e-13), so it is
    measured against 1% of the largest gradient instead."""
    floor = 1e-2 * max(np.linalg.norm(v) for v in theirs.values())
    return {k: float(np.linalg.norm(B.to_numpy(ours[k]) - v) / max(np.linalg.norm(v), floor))
            for k, v in theirs.items()}


def _rel(a, b):
    a, b = B.to_numpy(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- PyTorch oracle
def _oracle_configs():
    """Every flavour x block count, every stage, every mode x extent, sub_sample x bn_layer x extent, extras."""
    out = [dict(flavour=f, nonlocal_blocks=n) for f in FLAVOURS for n in (0, 1, 2, 4)]
    out += [dict(nonlocal_blocks=1, stage=s) for s in ("res2", "res4")]
    out += [dict(flavour="i3d", nonlocal_blocks=2, mode=m, extent=e) for m in MODES for e in EXTENTS]
    out += [dict(flavour="i3d_3x1x1", nonlocal_blocks=1, extent=e, nonlocal_options=dict(sub_sample=s, bn_layer=b))
            for e, s, b in itertools.product(EXTENTS, (True, False), (True, False))]
    out += [dict(nonlocal_blocks=2, mode="embedded_gaussian", extent="space",
                 nonlocal_options=dict(pool="before", scale=True, inter_channels=3)),
            dict(nonlocal_blocks=4, mode="concatenation", nonlocal_options=dict(chunk_size=5)),
            dict(flavour="i3d", nonlocal_blocks=2, mode="dot_product", dropout=0.5),
            dict(flavour="c2d", nonlocal_blocks=1, dropout=0.3, in_channels=3, num_classes=5)]
    return out


def _config_id(config):
    return "-".join(f"{k}={v}" for k, v in config.items() if k != "nonlocal_options") + "".join(
        f"-{k}={v}" for k, v in config.get("nonlocal_options", {}).items())


ORACLE = _oracle_configs()
# array-api-strict runs about ten times slower than NumPy: a representative subset there
STRICT = [0, 7, 11, 13, 15, 19, 20, 24, 29, 31, len(ORACLE) - 4, len(ORACLE) - 3, len(ORACLE) - 2]
ORACLE_CASES = ([pytest.param("numpy", c, id=f"numpy-{_config_id(c)}") for c in ORACLE]
                + [pytest.param("array_api_strict", ORACLE[i], id=f"strict-{_config_id(ORACLE[i])}") for i in STRICT])


def compare_with_torch(net, x, dlogits, *, dropout_seed=11):
    """Run nlref and its torch twin in train then eval mode; the largest relative error of each quantity."""
    twin = load_videonet_params(TorchVideoNet(net), net)
    c_last = net.config["widths"][-1]
    mask = F.dropout_forward(np.zeros((x.shape[0], c_last)), net.dropout, training=True, seed=dropout_seed)[1]
    worst = {}
    for training in (True, False):
        net.train() if training else net.eval()
        twin.train(training)
        logits = net.forward(x, dropout_seed=dropout_seed)
        dx = net.backward(B.asarray(dlogits, like=x))
        tx = torch.tensor(B.to_numpy(x), requires_grad=True)
        twin.zero_grad()
        t_logits = twin(tx, dropout_mask=mask)
        (t_logits * torch.from_numpy(dlogits)).sum().backward()
        assert_same_library(logits, x)
        theirs = videonet_grads(twin)
        assert set(theirs) == set(net.params)
        errors = {"logits": _rel(logits, t_logits.detach().numpy()), "dx": _rel(dx, tx.grad.numpy()),
                  "grads": max(_relative_errors(net.grads, theirs).values()),
                  "buffers": max(_relative_errors(net.buffers, videonet_buffers(twin)).values())}
        for k, v in errors.items():
            worst[k] = max(worst.get(k, 0.0), v)
    return worst


@needs_torch
@pytest.mark.parametrize("library,config", ORACLE_CASES)
def test_matches_torch_oracle(library, config):
    xp = importlib.import_module(library)
    net = _randomise(_net(xp, **config))
    c_in = net.config["in_channels"]
    x = _x(xp, shape=(ORACLE_SHAPE[0], c_in) + ORACLE_SHAPE[2:])
    dlogits = np.random.default_rng(4).standard_normal((ORACLE_SHAPE[0], net.config["num_classes"]))
    worst = compare_with_torch(net, x, dlogits)
    assert max(worst.values()) < 1e-10, worst


@needs_torch
def test_oracle_sees_a_wrong_placement():
    """The twin checks its layer names against the nlref network's (a placement bug cannot hide)."""
    net = _net(nonlocal_blocks=1)
    net.slots = [("res4", 1)]
    with pytest.raises(ValueError, match="differ from the nlref network's"):
        TorchVideoNet(net)


@needs_torch
def test_float32_twin_agrees():
    """The twin also runs in float32 (the training benchmark uses it): same logits to float32 rounding."""
    net = _randomise(VideoNet(**{**TINY, "dtype": "float32"}, nonlocal_blocks=2, seed=5))
    twin = load_videonet_params(TorchVideoNet(net), net)
    x = _x(dtype="float32")
    for training in (True, False):
        net.train() if training else net.eval()
        twin.train(training)
        assert twin.fc.weight.dtype == torch.float32
        assert _rel(net.forward(x), twin(torch.from_numpy(x)).detach().numpy()) < 1e-4


# --------------------------------------------------------------------------- gradient checks
GRADCHECK_KEYS = ["stem.conv.weight", "stem.bn.gamma", "res2.0.conv1.conv.weight", "res3.0.shortcut.conv.weight",
                  "res3.0.shortcut.bn.beta", "res4.1.conv2.bn.gamma", "fc.weight", "fc.bias"]


class _KinkWatch:
    """Which side of every kink each forward pass lands on: the sign of every ReLU input, the winner
    of every max-pool window. A finite difference is only a derivative where the segment
    ``p +- eps v`` crosses no kink (a deep net has ~10^4 ReLUs, and batch norm on tiny batches
    magnifies a step of 1e-6 in the stem to ~1e-4 further on)."""

    def __init__(self, monkeypatch):
        self.current, self.passes = [], []
        relu, pool = F.relu_forward, F.maxpool_forward

        def relu_watched(x):
            self.current.append(B.to_numpy(x) > 0)
            return relu(x)

        def pool_watched(x, kernel):
            out, cache = pool(x, kernel)
            host, best = B.to_numpy(x), B.to_numpy(out)
            self.current.append(np.stack([host[i] == best for i in F._window_samples(host.shape, kernel)]))
            return out, cache

        monkeypatch.setattr(F, "relu_forward", relu_watched)
        monkeypatch.setattr(F, "maxpool_forward", pool_watched)

    def mark(self):
        self.passes.append(self.current)
        self.current = []

    def crossed(self):
        base = self.passes[0]
        return any(not all(np.array_equal(a, b) for a, b in zip(base, other)) for other in self.passes[1:])


def _network_gradcheck(monkeypatch, net, keys, *, xp=np, dropout_seed=5, directions=2, eps=1e-6):
    """Random-direction check of dL/dx and dL/d(keys), L = sum(logits * dlogits), at the first
    input (of a few seeds) whose finite differences cross no kink."""
    watch = _KinkWatch(monkeypatch)

    def forward(x, **params):
        for k, v in params.items():
            net.set_param(k, v)
        out = net.forward(x, dropout_seed=dropout_seed)
        watch.mark()
        return out

    def backward(dlogits):
        dx = net.backward(dlogits)
        grads = net.grads
        return {"x": dx, **{k: grads[k] for k in keys}}

    for seed in range(10):
        watch.passes.clear()
        inputs = {"x": _x(xp, seed=seed), **{k: net.params[k] for k in keys}}
        result = gradcheck(forward, backward, inputs, method="random", directions=directions, eps=eps, seed=1)
        if not watch.crossed():
            return result
    raise AssertionError("every input tried had a kink within eps")


@pytest.mark.parametrize("config,training", [
    (dict(flavour="i3d", nonlocal_blocks=2, dropout=0.5), True),
    (dict(flavour="c2d", nonlocal_blocks=1, mode="gaussian", extent="space", stage="res4"), False),
    (dict(flavour="i3d_3x1x1", nonlocal_blocks=1, mode="dot_product", extent="time",
          nonlocal_options=dict(bn_layer=False)), True),
], ids=["i3d-nl2-embedded-dropout-train", "c2d-nl1-gaussian-space-res4-eval", "i3d3x1x1-time-dot-nobn-train"])
def test_network_gradcheck(monkeypatch, config, training):
    net = _randomise(_net(**config))
    net.train() if training else net.eval()
    nonlocal_keys = [k for k in net.params if ".nl" in k]
    result = _network_gradcheck(monkeypatch, net, GRADCHECK_KEYS + nonlocal_keys)
    assert result.passed, str(result)
    assert "x" in result.errors and "x" not in result.zero
    assert set(nonlocal_keys) - set(result.zero)  # the blocks' gradients are not all zero


def test_network_gradcheck_on_strict(monkeypatch):
    import array_api_strict as xs

    net = _randomise(_net(xs, flavour="i3d", nonlocal_blocks=1, dropout=0.5))
    keys = ["stem.conv.weight", "res3.nl1.theta.weight", "res3.nl1.bn.gamma", "fc.weight"]
    result = _network_gradcheck(monkeypatch, net, keys, xp=xs, directions=1)
    assert result.passed, str(result)


def test_the_time_extent_takes_a_pool_placement_it_does_not_use():
    """The time extent never subsamples (its block gets sub_sample=False), so a network's pool="before" for
    its other blocks is dropped there, not refused by the block as a placement of nothing."""
    net = VideoNet(**TINY, nonlocal_blocks=1, extent="time", nonlocal_options=dict(pool="before"), seed=2)
    (block,) = [layer.block for _, layer in net.layers if isinstance(layer, NonLocal)]
    assert not block.sub_sample and block.pool == "after"
    space = VideoNet(**TINY, nonlocal_blocks=1, extent="space", nonlocal_options=dict(pool="before"), seed=2)
    assert [layer.block.pool for _, layer in space.layers if isinstance(layer, NonLocal)] == ["before"]


# --------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("mode,extent,bn_layer", [
    ("embedded_gaussian", "spacetime", True), ("gaussian", "space", True), ("dot_product", "time", True),
    ("concatenation", "spacetime", False), ("embedded_gaussian", "space", False)])
def test_nonlocal_layers_are_the_identity_at_init(mode, extent, bn_layer):
    net = VideoNet(**{**TINY, "dropout": 0.5}, nonlocal_blocks=4, mode=mode, extent=extent,
                   nonlocal_options=dict(bn_layer=bn_layer), seed=4)
    seen = []
    for name, layer in net.layers:
        if isinstance(layer, NonLocal):
            def forward(h, _f=layer.forward, _name=name, **kw):
                out = _f(h, **kw)
                seen.append(("forward", _name, h, out))
                return out

            def backward(d, _b=layer.backward, _name=name):
                dh = _b(d)
                seen.append(("backward", _name, d, dh))
                return dh
            layer.forward, layer.backward = forward, backward
    x = _x()
    for training in (True, False):
        net.train() if training else net.eval()
        seen.clear()
        net.forward(x, dropout_seed=1)
        net.backward(np.random.default_rng(0).standard_normal((X_SHAPE[0], 2)))
        assert len(seen) == 8
        for kind, name, inp, out in seen:
            assert out.shape == inp.shape
            np.testing.assert_array_equal(out, inp, err_msg=f"{kind} of {name}")

    # and a baseline with the same weights outside the blocks gives bit-identical logits and gradients
    base = VideoNet(**{**TINY, "dropout": 0.5}, nonlocal_blocks=0, seed=9)
    base.load_state_dict({k: v for k, v in net.state_dict().items() if ".nl" not in k})
    dlogits = np.random.default_rng(1).standard_normal((X_SHAPE[0], 2))
    for training in (True, False):
        net.train() if training else net.eval()
        base.train() if training else base.eval()
        np.testing.assert_array_equal(net.forward(x, dropout_seed=2), base.forward(x, dropout_seed=2))
        np.testing.assert_array_equal(net.backward(dlogits), base.backward(dlogits))
        grads = net.grads
        for k, v in base.grads.items():
            np.testing.assert_array_equal(grads[k], v, err_msg=k)


# --------------------------------------------------------------------------- placement and size
def test_nonlocal_slots():
    assert nonlocal_slots(0) == []
    assert nonlocal_slots(1) == [("res3", 1)]  # before the last block of res3
    assert nonlocal_slots(1, stage="res2") == [("res2", 0)]
    assert nonlocal_slots(1, stage="res4", blocks=(1, 3, 3)) == [("res4", 2)]
    assert nonlocal_slots(2) == [("res3", 1), ("res4", 1)]
    assert nonlocal_slots(4) == [("res3", 1), ("res4", 1), ("res3", 0), ("res4", 0)]
    assert nonlocal_slots(2, blocks=(1, 1, 1)) == [("res3", 0), ("res4", 0)]
    with pytest.raises(ValueError, match=r"nonlocal count must be at most 4 for blocks=\(1, 2, 2\), got 5"):
        nonlocal_slots(5)
    with pytest.raises(ValueError, match=r"at most 2 for blocks=\(1, 1, 1\), got 3"):
        nonlocal_slots(3, blocks=(1, 1, 1))
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="nonlocal count must be an integer >= 0"):
            nonlocal_slots(bad)
    with pytest.raises(ValueError, match="stage must be one of"):
        nonlocal_slots(1, stage="res5")


@pytest.mark.parametrize("count,names", [
    (0, ["stem", "res2.0", "res3.0", "res3.1", "res4.0", "res4.1", "fc"]),
    (1, ["stem", "res2.0", "res3.0", "res3.nl1", "res3.1", "res4.0", "res4.1", "fc"]),
    (2, ["stem", "res2.0", "res3.0", "res3.nl1", "res3.1", "res4.0", "res4.nl1", "res4.1", "fc"]),
    (4, ["stem", "res2.0", "res3.nl0", "res3.0", "res3.nl1", "res3.1", "res4.nl0", "res4.0", "res4.nl1", "res4.1",
         "fc"]),
])
def test_layer_names(count, names):
    net = _net(nonlocal_blocks=count)
    assert [name for name, _ in net.layers] == names
    assert net.slots == nonlocal_slots(count)
    # a block before res{3,4}.0 sees the previous stage's width, one before res{3,4}.1 the stage's own
    widths = {"res3.nl0": 4, "res3.nl1": 6, "res4.nl0": 6, "res4.nl1": 8}
    for name, layer in net.layers:
        if isinstance(layer, NonLocal):
            assert layer.block.in_channels == widths[name]
            assert net.params[f"{name}.theta.weight"].shape == (widths[name] // 2, widths[name])


def _baseline_count(flavour, widths, blocks, in_channels=1, num_classes=2):
    """Parameters of the architecture in the models docstring, counted independently."""
    k1 = {"c2d": 9, "i3d": 27, "i3d_3x1x1": 3}[flavour]
    n = in_channels * widths[0] * 9 + 2 * widths[0]  # stem conv 1x3x3 (no bias) + BN
    c = widths[0]
    for s, (w, count) in enumerate(zip(widths, blocks)):
        for j in range(count):
            k = k1 if j % 2 == 0 else 9
            n += c * w * k + 2 * w + w * w * 9 + 2 * w  # conv1 + BN, conv2 1x3x3 + BN
            if (j == 0 and s > 0) or c != w:
                n += c * w + 2 * w  # 1x1x1 shortcut + BN
            c = w
    return n + c * num_classes + num_classes


def _nonlocal_count(c, mode, bn_layer=True):
    d = max(c // 2, 1)
    convs = 1 if mode == "gaussian" else 3  # g (and theta, phi): d x C + d
    n = convs * (c * d + d) + (d * c + c)  # + W_z
    return n + (2 * d if mode == "concatenation" else 0) + (2 * c if bn_layer else 0)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("mode", MODES)
def test_parameter_counts(flavour, mode):
    base = VideoNet(flavour, widths=(16, 32, 64), blocks=(1, 2, 2))
    assert base.num_params() == _baseline_count(flavour, (16, 32, 64), (1, 2, 2))
    one = VideoNet(flavour, nonlocal_blocks=1, mode=mode, widths=(16, 32, 64), blocks=(1, 2, 2))
    assert one.num_params() - base.num_params() == _nonlocal_count(32, mode)
    four = VideoNet(flavour, nonlocal_blocks=4, mode=mode, widths=(16, 32, 64), blocks=(1, 2, 2),
                    nonlocal_options=dict(bn_layer=False))
    added = sum(_nonlocal_count(c, mode, bn_layer=False) for c in (16, 32, 32, 64))
    assert four.num_params() - base.num_params() == added
    assert set(base.params) < set(one.params) and len(one.buffers) == len(base.buffers) + 2


def test_parameter_counts_documented_example():
    """The default-width C2D baseline and one embedded-Gaussian block in res3 (C = 32, d = 16):
    4 C d (theta, phi, g, W_z) + 3 d + C (biases) + 2 C (BN) = 2192."""
    assert VideoNet("c2d").num_params() == 169_778
    assert VideoNet("i3d").num_params() == 220_466
    assert VideoNet("c2d", nonlocal_blocks=1).num_params() - 169_778 == 2192


def test_no_decay_and_names():
    net = _net(nonlocal_blocks=1)
    decayed = sorted(k for k in net.params if not net.no_decay(k))
    assert all(k.endswith("weight") for k in decayed) and "res3.nl1.W_z.weight" in decayed
    assert net.no_decay("res3.nl1.bn.gamma") and net.no_decay("fc.bias") and net.no_decay("stem.bn.beta")
    assert net.no_decay("res3.nl1.theta.bias") and not net.no_decay("res3.1.conv1.conv.weight")
    assert set(net.buffers) == {k.replace("gamma", "running_mean") for k in net.params if k.endswith("gamma")} | {
        k.replace("gamma", "running_var") for k in net.params if k.endswith("gamma")}


# --------------------------------------------------------------------------- state
def test_state_dict_round_trip_is_bit_exact(xp_cpu):
    net = _randomise(_net(xp_cpu, flavour="i3d", nonlocal_blocks=2, mode="concatenation", dropout=0.5))
    x = _x(xp_cpu)
    net.forward(x, dropout_seed=3)  # running statistics move
    state = net.state_dict()
    assert set(state) == set(net.params) | set(net.buffers)
    assert all(type(v) is np.ndarray for v in state.values())
    other = _net(xp_cpu, seed=77, flavour="i3d", nonlocal_blocks=2, mode="concatenation", dropout=0.5)
    assert other.load_state_dict(state) is other
    for training in (True, False):
        net.train() if training else net.eval()
        other.train() if training else other.eval()
        a, b = net.forward(x, dropout_seed=4), other.forward(x, dropout_seed=4)
        assert_same_library(b, x)
        np.testing.assert_array_equal(B.to_numpy(a), B.to_numpy(b))
    key = "res3.nl1.g.weight"
    state[key][0, 0] += 1.0  # copies both ways: neither network sees this
    assert B.to_numpy(net.params[key])[0, 0] == B.to_numpy(other.params[key])[0, 0] != state[key][0, 0]


def _same_state(a, b):
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_bad_state_dict_raises_and_leaves_the_net_unchanged():
    net = _randomise(_net(nonlocal_blocks=1))
    before = net.state_dict()

    def changed(**entries):  # an early key changed too, so a half-done load would show
        state = {k: v.copy() for k, v in before.items()}
        state["stem.conv.weight"] += 1.0
        state.update(entries)
        return state

    missing = changed()
    del missing["res3.nl1.theta.weight"]
    with pytest.raises(ValueError, match=r"missing \['res3.nl1.theta.weight'\], unexpected \[\]"):
        net.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['res3.nl1.extra'\]"):
        net.load_state_dict(changed(**{"res3.nl1.extra": np.zeros(2)}))
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(2, 7\), expected \(2, 8\)"):
        net.load_state_dict(changed(**{"fc.weight": np.zeros((2, 7))}))
    bad = before["fc.bias"].copy()
    bad[1] = np.nan
    with pytest.raises(ValueError, match="'fc.bias' holds non-finite values"):
        net.load_state_dict(changed(**{"fc.bias": bad}))
    inf = before["res4.1.conv2.bn.running_var"].copy()
    inf[0] = np.inf
    with pytest.raises(ValueError, match="'res4.1.conv2.bn.running_var' holds non-finite"):
        net.load_state_dict(changed(**{"res4.1.conv2.bn.running_var": inf}))
    # finite in float64, infinite in the float32 network; a negative variance; complex; text
    with pytest.raises(ValueError, match="'fc.bias' holds non-finite values \\(NaN or infinite values in float32"):
        _net(nonlocal_blocks=1, dtype="float32").load_state_dict(changed(**{"fc.bias": np.array([1e300, 0.0])}))
    with pytest.raises(ValueError, match="'res3.nl1.bn.running_var' holds negative values"):
        net.load_state_dict(changed(**{"res3.nl1.bn.running_var": -before["res3.nl1.bn.running_var"]}))
    with pytest.raises(TypeError, match="'fc.bias' must hold real numbers .*complex"):
        net.load_state_dict(changed(**{"fc.bias": before["fc.bias"] + 1j}))
    with pytest.raises(TypeError, match="'fc.bias' must be an array of real numbers; got str"):
        net.load_state_dict(changed(**{"fc.bias": "ab"}))
    assert _same_state(net.state_dict(), before)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(flavour="r3d"), r"flavour must be one of \('c2d', 'i3d', 'i3d_3x1x1'\), got 'r3d'"),
    (dict(mode="cosine"), "mode must be one of .*got 'cosine'"),
    (dict(extent="channel"), "extent must be one of .*got 'channel'"),
    (dict(nonlocal_blocks=1, stage="res5"), "stage must be one of .*got 'res5'"),
    (dict(stage="res1"), "stage must be one of"),
    (dict(nonlocal_blocks=-1), "nonlocal count must be an integer >= 0, got -1"),
    (dict(nonlocal_blocks=5), "nonlocal count must be at most 4"),
    (dict(nonlocal_blocks=None), "nonlocal count must be an integer >= 0, got None"),
    (dict(nonlocal_blocks=1.0), "nonlocal count must be an integer >= 0, got 1.0"),
    (dict(widths=(4, 6)), r"widths must be 3 positive integers, got \(4, 6\)"),
    (dict(widths=(4, 0, 8)), "widths must be 3 positive integers"),
    (dict(widths=(4, 6.0, 8)), "widths must be 3 positive integers"),
    (dict(widths=(4, True, 8)), "widths must be 3 positive integers"),
    (dict(blocks=(1, 2, 2, 2)), "blocks must be 3 positive integers"),
    (dict(blocks=(0, 2, 2)), "blocks must be 3 positive integers"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), "dropout must be in"),
    (dict(dropout="0.5"), "dropout must be in"),
    (dict(dropout=float("nan")), "dropout must be in"),
    (dict(dtype="float16"), "dtype must be 'float32' or 'float64', got 'float16'"),
    (dict(in_channels=0), "in_channels must be a positive integer, got 0"),
    (dict(num_classes=True), "num_classes must be a positive integer, got True"),
    (dict(nonlocal_options={"sub_sampling": False}), r"nonlocal_options may hold .*unknown \['sub_sampling'\]"),
    (dict(nonlocal_options={"mode": "gaussian"}), r"unknown \['mode'\]"),
    (dict(nonlocal_blocks=1, nonlocal_options={"sub_sample": "yes"}), "sub_sample must be True or False"),
    (dict(nonlocal_blocks=1, mode="dot_product", nonlocal_options={"scale": True}), "scale applies to the softmax modes"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VideoNet(**{**TINY, **kwargs})



@pytest.mark.parametrize("xp", ["numpy", __import__("math")])
def test_an_xp_that_is_no_array_library_is_named(xp):
    """VideoNet(xp="numpy") raised AttributeError: 'str' object has no attribute 'float32'."""
    with pytest.raises(TypeError, match="xp must be an array library module .* got"):
        VideoNet(**TINY, xp=xp)


def test_backward_without_input_grad_gives_the_same_parameter_gradients():
    net = _randomise(_net(nonlocal_blocks=1, dropout=0.5))
    dlogits = np.random.default_rng(2).standard_normal((X_SHAPE[0], 2))
    net.forward(_x(), dropout_seed=4)
    assert net.backward(dlogits).shape == X_SHAPE
    grads = {k: v.copy() for k, v in net.grads.items()}
    net.forward(_x(), dropout_seed=4)
    assert net.backward(dlogits, input_grad=False) is None
    assert net.grads.keys() == grads.keys()
    for k, v in grads.items():
        np.testing.assert_array_equal(net.grads[k], v, err_msg=k)


def test_forward_backward_errors():
    import array_api_strict as xs

    net = _net(nonlocal_blocks=1)
    with pytest.raises(RuntimeError, match="VideoNet.backward needs a forward pass before it"):
        net.backward(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, T, H, W\), got \(3, 1, 12, 12\)"):
        net.forward(np.zeros((3, 1, 12, 12)))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, T, H, W\), got \(3, 2, 4, 12, 12\)"):
        net.forward(np.zeros((3, 2, 4, 12, 12)))
    with pytest.raises(TypeError, match="x must be float64 like the network, got float32"):
        net.forward(np.zeros(X_SHAPE, np.float32))
    with pytest.raises(TypeError, match="x is a array_api_strict array but the network lives in"):
        net.forward(xs.zeros(X_SHAPE, dtype=xs.float64))
    with pytest.raises(TypeError, match="x must be an array"):
        net.forward(np.zeros(X_SHAPE).tolist())
    with pytest.raises(ValueError, match="too few for its sub-sampling kernel"):
        net.forward(np.zeros((3, 1, 4, 4, 4)))  # res3 at 1x1: too small to pool
    stem_calls = []
    real_stem = net.stem.forward
    net.stem.forward = lambda h: stem_calls.append(h.shape) or real_stem(h)
    for seed in ("a", 1.5, True):  # checked before any work, even when no dropout runs
        with pytest.raises(TypeError, match="dropout_seed must be an int or None, got"):
            net.forward(_x(), dropout_seed=seed)
    assert stem_calls == []  # the first layer never ran
    net.forward(_x(), dropout_seed=1)
    assert stem_calls == [X_SHAPE]  # (the spy sees a forward that runs)
    del net.stem.forward
    logits = net.forward(_x())
    net.backward(np.zeros_like(logits))
    with pytest.raises(RuntimeError, match="runs once per forward"):
        net.backward(np.zeros_like(logits))
    with pytest.raises(KeyError):
        net.set_param("res9.0.conv1.conv.weight", logits)



@pytest.mark.parametrize("shape", [(0, 1, 4, 12, 12), (3, 1, 0, 12, 12), (3, 1, 4, 0, 12), (3, 1, 4, 12, 0)])
@pytest.mark.parametrize("training", [True, False])
def test_an_empty_batch_or_axis_is_refused_by_name(shape, training):
    """An empty batch failed deep inside with "cannot reshape array of size 0", an empty frame axis with a
    message about a padded input; neither said that x was empty."""
    net = _net(nonlocal_blocks=1)
    net.train() if training else net.eval()
    with pytest.raises(ValueError, match=rf"^x must hold at least one clip .* got shape {re.escape(str(shape))}$"):
        net.forward(np.zeros(shape))


# --------------------------------------------------------------------------- libraries
def test_keeps_library(xp, device):
    """Logits, dL/dx and gradients come back in the input's library, with the same numbers as NumPy."""
    config = dict(flavour="i3d", nonlocal_blocks=2, extent="space", dropout=0.5)
    net, ref = _randomise(_net(xp, device=device, **config)), _randomise(_net(np, **config))
    x = _x(xp, device=device)
    logits = net.forward(x, dropout_seed=6)
    assert_same_library(logits, x)
    assert tuple(logits.shape) == (X_SHAPE[0], 2)
    dlogits = np.random.default_rng(0).standard_normal((X_SHAPE[0], 2))
    dx = net.backward(B.asarray(dlogits, like=x))
    assert_same_library(dx, x)
    ref_logits = ref.forward(_x(), dropout_seed=6)
    ref_dx = ref.backward(dlogits)
    np.testing.assert_allclose(B.to_numpy(logits), ref_logits, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(B.to_numpy(dx), ref_dx, rtol=1e-10, atol=1e-12)
    for k, g in net.grads.items():
        assert_same_library(g, x)
        assert_same_library(net.params[k], x)
    net.eval()
    assert_same_library(net.forward(x), x)


def test_dropout_seed_and_own_generator():
    net = _net(dropout=0.5)
    x = _x()
    a, b = net.forward(x, dropout_seed=1), net.forward(x, dropout_seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(net.forward(x), net.forward(x))  # fresh masks from the net's generator
    net.eval()
    np.testing.assert_array_equal(net.forward(x), net.forward(x, dropout_seed=5))  # no dropout in eval


def test_return_attention():
    net = _net(nonlocal_blocks=2, extent="space")
    logits, attention = net.forward(_x(), return_attention=True)
    assert set(attention) == {"res3.nl1", "res4.nl1"}
    # space: one map per frame, (B*T, H*W, H*W/4): res3 at 3x3 pools to 1x1, res4 at 2x2 to 1x1
    assert attention["res3.nl1"].shape == (12, 9, 1)
    np.testing.assert_array_equal(logits, net.forward(_x()))


@pytest.mark.parametrize("extent, options, stage, smallest, size", [
    ("spacetime", {}, "res3", 5, (4, 9)),                  # res3's maps are a quarter of the frames, rounded up
    ("space", {"pool": "flattened"}, "res3", 5, (4, 4)),   # one frame's 1x1 map: 1 position for a kernel of 2
    ("spacetime", {"pool": "after"}, "res4", 9, (12, 8)),  # res4's maps are an eighth
])
def test_input_too_small_for_a_block_is_refused_in_the_input_terms_before_any_work(extent, options, stage,
                                                                                    smallest, size):
    """The error names the input's size and the smallest square size the network takes, not the block's maps."""
    net = _net(nonlocal_blocks=1, stage=stage, extent=extent, nonlocal_options=options)
    stem_calls = []
    real_stem = net.stem.forward
    net.stem.forward = lambda h: stem_calls.append(h.shape) or real_stem(h)
    too_small = (2, 1, 3) + size
    message = (rf"x of 3 frame\(s\) of {size[0]}x{size[1]} pixels is too small for this network \(its smallest "
               rf"square input is {smallest}x{smallest} pixels\): its non-local block '{stage}\.nl\d' would get ")
    with pytest.raises(ValueError, match=message):
        net.forward(_x(shape=too_small))
    assert stem_calls == []  # refused before the first layer ran
    assert net.forward(_x(shape=(2, 1, 3, smallest, smallest))).shape == (2, 2)  # the size it names works
    with pytest.raises(ValueError, match="too small for this network"):
        net.forward(_x(shape=(2, 1, 3, smallest - 1, smallest - 1)))  # and is the smallest
    free = _net(nonlocal_blocks=1, stage=stage, extent=extent, nonlocal_options={"sub_sample": False})
    assert free.forward(_x(shape=too_small)).shape == (2, 2)  # the way out it names works too
