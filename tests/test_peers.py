"""The peers' layouts and nlref.compare_block against the peers' own modules.

Against the real code where the package imports here (mmcv's bricks need mmcv-lite and
mmengine; timm's package imports torchvision, so its real module is skipped without it),
and always against the twins in ``peer_modules.py`` written from the peers' layouts and
equations (SlowFast is not on PyPI). Every mode and dimensionality each peer supports,
train and eval mode, float64, weights and running statistics random (BN's gamma is zero
at init, which would leave every gradient upstream of it zero).
"""

import importlib
import warnings
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nlref  # noqa: E402
from nlref.nn import NonLocalBlock  # noqa: E402
from nlref.nn.block import LAYOUTS  # noqa: E402
from peer_modules import MmcvNonLocal, SlowFastNonlocal, TimmNonLocalAttn  # noqa: E402
from torch_oracle import TorchNonLocal  # noqa: E402

SHAPES = {1: (2, 6, 8), 2: (2, 6, 4, 6), 3: (2, 6, 4, 4, 6)}


def _import(name):
    try:
        with warnings.catch_warnings():  # mmcv's bricks use torch.jit.script, which torch 2.13 deprecates (66 warnings)
            warnings.filterwarnings("ignore", r"`torch\.jit\.(script|interface)` is deprecated", DeprecationWarning)
            return importlib.import_module(name)
    except ImportError:  # the package, or one of its imports (timm needs torchvision), is absent
        return None


REAL_MMCV = _import("mmcv.cnn.bricks.non_local")
REAL_TIMM = _import("timm.layers.non_local_attn")
IMPLS = [pytest.param("twin", id="twin"), pytest.param("real", id="real")]


def _mmcv(impl, dims, c, **kwargs):
    if impl == "twin":
        return MmcvNonLocal(dims, c, **kwargs)
    if REAL_MMCV is None:
        pytest.skip("mmcv's non-local bricks do not import (pip install --no-deps mmcv-lite mmengine, see .ci/run)")
    if kwargs.get("norm_cfg") is not None:
        kwargs["norm_cfg"] = dict(kwargs["norm_cfg"], type=f"BN{dims}d")
    return getattr(REAL_MMCV, f"NonLocal{dims}d")(c, **kwargs)


def _timm(impl, c, **kwargs):
    if impl == "twin":
        return TimmNonLocalAttn(c, **kwargs)
    if REAL_TIMM is None:
        pytest.skip("timm's layers do not import here (timm imports torchvision)")
    return REAL_TIMM.NonLocalAttn(c, **kwargs)


def _randomize(module, seed=0, *, train=True):
    """Random weights and running statistics (float64), and train or eval mode."""
    gen = torch.Generator().manual_seed(seed)
    module.double().train(train)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen, dtype=t.dtype))
            elif t.is_floating_point():
                t.copy_(0.7 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
    return module


def _x(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


def _check(module, x, **options):
    """compare_block agrees; with other random weights until no compared array is exactly zero (a
    concatenation whose ReLU is off everywhere would compare 0 with 0)."""
    for seed in range(10):
        result = nlref.compare_block(_randomize(module, seed, train=module.training), x, verbose=False, **options)
        assert result.agree, str(result)
        if not any(zero for *_, zero in result.rows):
            return result
    raise AssertionError(f"every seed left an all-zero quantity:\n{result}")


# --------------------------------------------------------------------------- mmcv
MMCV_CASES = [(d, m, s, n) for d, m, s, n in itertools.product((1, 2, 3), ("gaussian", "embedded_gaussian",
              "dot_product", "concatenation"), (False, True), (False, True))]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims,mode,sub_sample,norm", MMCV_CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_mmcv(impl, dims, mode, sub_sample, norm, train):
    norm_cfg = dict(type="BN", eps=1e-3, momentum=0.03) if norm else None
    module = _randomize(_mmcv(impl, dims, 6, sub_sample=sub_sample, norm_cfg=norm_cfg, mode=mode), train=train)
    x = _x(SHAPES[dims])
    if impl == "real" and mode == "concatenation":  # divides its ReLU's output in place: no backward
        result = nlref.compare_block(module, x, verbose=False)
        assert result.peer_error is not None and "inplace" in result.peer_error
        assert not result.agree and result.verdict.startswith("forward agrees")
        assert [r[0] for r in result.rows][0] == "output z" and result.rows[0][2] < 1e-12
        return
    result = _check(module, x)
    assert result.layout == "mmcv" and result.options["W_z_bias"] is not norm
    assert result.options["bn_eps"] == 1e-3 if norm else not result.options["bn_layer"]


@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_mmcv_use_scale(impl, use_scale):
    module = _randomize(_mmcv(impl, 2, 8, use_scale=use_scale, norm_cfg=dict(type="BN")))
    result = _check(module, 3 * _x(SHAPES[2][:1] + (8,) + SHAPES[2][2:]))
    assert result.block.logit_scale == (4 ** -0.5 if use_scale else 1.0)


# --------------------------------------------------------------------------- SlowFast
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm_type", ["batchnorm", "none"])
@pytest.mark.parametrize("pool_size", [None, (1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 3, 3)])
@pytest.mark.parametrize("instantiation", ["softmax", "dot_product"])
def test_slowfast(instantiation, pool_size, norm_type, train):
    module = _randomize(SlowFastNonlocal(6, 3, pool_size=pool_size, instantiation=instantiation,
                                         norm_type=norm_type, norm_eps=1e-4, norm_momentum=0.2), train=train)
    result = _check(module, _x(SHAPES[3]))
    pooled = pool_size is not None and max(pool_size) > 1
    assert result.layout == "slowfast" and result.options["sub_sample"] == pooled
    if pooled:
        assert result.block.kernel == result.block.stride == pool_size


# --------------------------------------------------------------------------- timm
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_timm(impl, use_scale, train):
    module = _randomize(_timm(impl, 16, use_scale=use_scale), train=train)
    result = _check(module, _x((2, 16, 4, 5)))
    assert result.layout == "timm" and result.options["inter_channels"] == 8  # make_divisible(16 / 8, 8)
    assert result.block.logit_scale == (16 ** -0.5 if use_scale else 1.0)  # in_channels, not the bottleneck


# --------------------------------------------------------------------------- AlexHex7 (the tests' oracle)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims,mode,sub_sample,bn", list(itertools.product(
    (1, 2, 3), ("gaussian", "embedded_gaussian", "dot_product", "concatenation"), (False, True), (False, True))))
def test_alexhex7(dims, mode, sub_sample, bn, train):
    module = _randomize(TorchNonLocal(6, mode=mode, inter=3, dims=dims, sub_sample=sub_sample, bn_layer=bn),
                        train=train)
    assert _check(module, _x(SHAPES[dims])).layout == "alexhex7"


# --------------------------------------------------------------------------- export and load
def _peer_cases():
    """(layout, module factory, block options): one per peer configuration family."""
    yield "mmcv", lambda: MmcvNonLocal(3, 6, sub_sample=True, norm_cfg=dict(type="BN"), mode="concatenation"), dict(
        dims=3, mode="concatenation", sub_sample=True, W_z_bias=False)
    yield "mmcv", lambda: MmcvNonLocal(1, 6, mode="gaussian"), dict(dims=1, mode="gaussian", sub_sample=False,
                                                                      bn_layer=False)
    yield "slowfast", lambda: SlowFastNonlocal(6, 3, pool_size=(1, 3, 3)), dict(
        dims=3, pool="before", pool_kernel=(1, 3, 3), scale=True)
    yield "timm", lambda: TimmNonLocalAttn(6, rd_channels=3), dict(dims=2, sub_sample=False, scale=6 ** -0.5)
    yield "alexhex7", lambda: TorchNonLocal(6, mode="dot_product", inter=3, dims=2, sub_sample=True,
                                            bn_layer=True), dict(dims=2, mode="dot_product")


@pytest.mark.parametrize("layout,make,options", list(_peer_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_export_loads_into_the_peer_strictly_and_back(layout, make, options):
    block = NonLocalBlock(6, inter_channels=3, dtype="float64", seed=4, **options)
    rng = np.random.default_rng(5)
    for k, v in block.params.items():
        block.params[k] = rng.standard_normal(v.shape)
    block.num_batches_tracked = 7
    exported = block.state_dict(layout=layout)
    module = make().double().eval()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    x = _x(SHAPES[options["dims"]])
    block.eval()
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), block.forward(x), rtol=1e-12, atol=1e-12)
    # and back: torch tensors (the peer's own state dict), the layout detected
    other = NonLocalBlock(6, inter_channels=3, dtype="float64", seed=9, **options).load_state_dict(module.state_dict())
    assert other.loaded_layout == layout and other.num_batches_tracked == (7 if block.bn_layer else 0)
    for k in block.params:
        np.testing.assert_array_equal(other.params[k], block.params[k])
    # NumPy arrays load the same, layout named
    third = NonLocalBlock(6, inter_channels=3, dtype="float64", **options).load_state_dict(exported, layout=layout)
    assert third.loaded_layout == layout
    assert all(np.array_equal(third.params[k], block.params[k]) for k in block.params)


def test_every_layout_round_trips_through_nlref():
    block = NonLocalBlock(4, dims=3, dtype="float64", pool="before", scale=True, seed=2)
    for layout in ("nlref", "slowfast"):
        state = block.state_dict(layout=layout)
        again = NonLocalBlock(4, dims=3, dtype="float64", pool="before", scale=True, seed=3).load_state_dict(state)
        assert again.loaded_layout == layout
        assert again.state_dict(layout=layout).keys() == state.keys()
        assert all(np.array_equal(again.state_dict(layout=layout)[k], v) for k, v in state.items())
    assert set(LAYOUTS) == {"nlref", "alexhex7", "mmcv", "slowfast", "timm"}


def test_unfit_state_names_unmatched_and_missing_keys():
    block = NonLocalBlock(6, inter_channels=3, dims=2, sub_sample=False, scale=6 ** -0.5)
    state = _randomize(TimmNonLocalAttn(6, rd_channels=3)).state_dict()
    state["extra.weight"] = state.pop("z.weight")
    with pytest.raises(ValueError, match=r"closest is 'timm', with unmatched keys \['extra.weight'\] and missing "
                                         r"keys \['z.weight'\]"):
        block.load_state_dict(state)
    with pytest.raises(ValueError, match=r"unmatched keys \['extra.weight'\], missing keys \['z.weight'\]"):
        block.load_state_dict(state, layout="timm")


@pytest.mark.parametrize("layout,options,match", [
    ("timm", dict(dims=2, sub_sample=True), "no subsampling"),
    ("timm", dict(dims=2, sub_sample=False, scale=True), r"in_channels \*\* -0.5"),
    ("slowfast", dict(dims=2), "3-D"),
    ("slowfast", dict(dims=3, pool="after"), "pools x before"),
    ("slowfast", dict(dims=3, pool="before"), "scale=True"),
    ("mmcv", dict(dims=2), "bias exactly when no norm follows"),
    ("mmcv", dict(dims=2, W_z_bias=False, pool_kernel=(2, 1)), "mmcv's are fixed"),
    ("alexhex7", dict(dims=2, bn_eps=1e-3, scale=True), "no scale"),
])
def test_layouts_refuse_options_the_peer_cannot_express(layout, options, match):
    block = NonLocalBlock(6, **options)
    with pytest.raises(ValueError, match=f"{layout} layout cannot express .*{match}"):
        block.state_dict(layout=layout)


def test_compare_block_reports_a_difference_and_prints_a_table(capsys):
    module = _randomize(SlowFastNonlocal(6, 3, pool_size=(1, 2, 2)))
    x = _x(SHAPES[3])
    ok = nlref.compare_block(module, x)
    table = capsys.readouterr().out
    assert "slowfast layout" in table and "dconv_theta" not in table and "dtheta.weight (conv_theta.weight)" in table
    assert "verdict: agree" in table and str(ok) in table
    # a wrong option (BN's eps): the output and every gradient differ
    bad = nlref.compare_block(module, x, verbose=False, bn_eps=0.5)
    assert not bad.agree and bad.verdict.startswith("DIFFER") and bad.rows[0][2] > 1e-6
    assert module.training and module.norm.running_mean.dtype == torch.float64  # the caller's module untouched
    before = module.norm.running_mean.clone()
    nlref.compare_block(module, x, verbose=False)
    assert torch.equal(module.norm.running_mean, before)


def test_compare_block_zero_gradients_are_judged_at_the_scale_of_the_computation():
    """A bias followed by BN (train mode) has a zero gradient: rounding of cancelling terms, as large as they are.

    With the upstream gradient 1e4 times larger, that rounding is too (here above
    a fixed 1e-12), yet nlref and the peer agree; the absolute bound scales with
    the largest magnitude compared, so the verdict does not depend on units. A
    wrong option still fails.
    """
    torch.manual_seed(117)
    module = TorchNonLocal(4, mode="dot_product", inter=2, dims=2, sub_sample=False, bn_layer=True)
    x = _x((2, 4, 2, 2))
    dz = 1e4 * np.random.default_rng(0).standard_normal(x.shape)
    ok = nlref.compare_block(module, x, dz=dz, verbose=False, mode="dot_product")
    bias = next(row for row in ok.rows if row[0].startswith("dW_z.bias"))
    assert bias[1] > 1e-12 and bias[2] > 1e-9  # neither fixed bound holds for this zero gradient
    assert ok.scale > 1e4 and ok.agree, ok
    assert "0 up to rounding" in str(ok)
    bad = nlref.compare_block(module, x, dz=dz, verbose=False, mode="dot_product", bn_eps=0.5)
    assert not bad.agree and bad.verdict.startswith("DIFFER")


def test_compare_block_errors():
    with pytest.raises(ValueError, match="layout must be"):
        nlref.compare_block(SlowFastNonlocal(4, 2), _x((1, 4, 2, 2, 2)), layout="caffe2")
    with pytest.raises(ValueError, match="fit none of the layouts"):
        nlref.compare_block(torch.nn.Conv2d(4, 4, 1), _x((1, 4, 2, 2)))
    with pytest.raises(ValueError, match="layernorm"):
        nlref.compare_block(SlowFastNonlocal(4, 2, norm_type="layernorm"), _x((1, 4, 2, 2, 2)))
    module = TorchNonLocal(4, mode="dot_product", inter=2, dims=2, sub_sample=False, bn_layer=True)
    module.mode = "unreadable"  # the port keeps its mode in its file name only (its forward here: f / M)
    with pytest.raises(ValueError, match="pass mode="):
        nlref.compare_block(module, _x((1, 4, 2, 2)))
    assert nlref.compare_block(module, _x((2, 4, 2, 2)), verbose=False, mode="dot_product").agree
    # the port's file name says the mode: lib/non_local_dot_product.py (and non_local_gaussian is not
    # read in non_local_embedded_gaussian)
    for mode in ("dot_product", "embedded_gaussian", "gaussian"):
        port = type("NONLocalBlock2D", (_ModeInFileName,), {"__module__": f"lib.non_local_{mode}"})
        module = _randomize(port(4, mode=mode, inter=2, dims=2, sub_sample=True, bn_layer=True))
        assert not hasattr(module, "mode")
        result = nlref.compare_block(module, _x((2, 4, 4, 4)), verbose=False)
        assert result.options["mode"] == mode and result.agree


class _ModeInFileName(TorchNonLocal):
    """A module with the port's layout and no ``mode`` attribute, like the port's classes."""

    def __init__(self, *args, mode, **kwargs):
        super().__init__(*args, mode=mode, **kwargs)
        self._which = self.__dict__.pop("mode")

    def forward(self, x):
        self.__dict__["mode"] = self._which
        try:
            return super().forward(x)
        finally:
            del self.__dict__["mode"]
