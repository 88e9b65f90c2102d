"""The peers' layouts and nlref.compare_block against the peers' own modules.

Against the real code wherever the package installs here: mmcv's bricks (mmcv-lite and
mmengine), pytorchvideo's ``nonlocal_net`` (``--no-deps``), timm's ``non_local_attn.py``
loaded from timm's own wheel (``import timm`` needs torchvision). SlowFast is not on PyPI and
AlexHex7's port is a repository: their twins in ``peer_modules.py`` carry the real file's
constructor signature, names and keys at a named commit, which the tests below hold to the
lists recorded from those files. The real-code tests skip where a package is absent
(``.ci/run`` installs them). Every mode and dimensionality each peer supports, train and eval
mode, float64; as built and with random weights; right answers, wrong ones and the
degenerate all-zero case.
"""

import inspect
import itertools
import re

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nlref  # noqa: E402
from nlref.nn import NonLocalBlock  # noqa: E402
from nlref.nn import layouts  # noqa: E402
from nlref.nn.block import LAYOUTS  # noqa: E402
from nlref.nn.compare import randomize_module  # noqa: E402
from tests.nn.peer_modules import (MmcvNonLocal, SlowFastNonlocal, TimmNonLocalAttn, alexhex7_class, real_mmcv,  # noqa: E402
                          real_pytorchvideo, real_timm)
from tests.nn.torch_oracle import TorchNonLocal  # noqa: E402

SHAPES = {1: (2, 6, 8), 2: (2, 6, 4, 6), 3: (2, 6, 4, 4, 6)}

REAL_MMCV = real_mmcv()
REAL_PTV = real_pytorchvideo()
REAL_TIMM = real_timm()
IMPLS = [pytest.param("twin", id="twin"), pytest.param("real", id="real")]
needs_ptv = pytest.mark.skipif(REAL_PTV is None, reason="pytorchvideo is not installed (pip install --no-deps "
                               "pytorchvideo==0.1.5, see .ci/run)")


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
        pytest.skip("timm is not installed (pip install --no-deps timm==0.6.13, see .ci/run)")
    return REAL_TIMM.NonLocalAttn(c, **kwargs)


def _ptv(**kwargs):
    return REAL_PTV.create_nonlocal(**kwargs)


def _randomize(module, seed=0, *, train=True):
    """Random weights and running statistics (float64), and train or eval mode."""
    return randomize_module(module.double().train(train), seed)


def _x(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


def _check(module, x, **options):
    """compare_block agrees on random weights; other seeds until no compared array is exactly zero (a
    concatenation whose ReLU is off everywhere would compare 0 with 0, which is INCONCLUSIVE)."""
    for seed in range(10):
        result = nlref.compare_block(_randomize(module, seed, train=module.training), x, verbose=False,
                                     weights="own", **options)
        if result.verdict.startswith("INCONCLUSIVE"):
            assert not result.agree
            continue
        assert result.agree, str(result)
        assert result.weights == "the module's own"
        return result
    raise AssertionError(f"every seed left an all-zero quantity:\n{result}")


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _as_built(module, x, *, randomised):
    """compare_block on a module as its constructor built it: a verdict, and the module untouched."""
    before = _state(module)
    result = nlref.compare_block(module, x, verbose=False)
    assert result.agree, str(result)
    assert result.weights.startswith("a copy with random weights") == randomised, result.weights
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's module untouched
    if randomised:  # its own weights: every gradient upstream of the zero is zero; never "agree"
        own = nlref.compare_block(module, x, verbose=False, weights="own")
        assert not own.agree and own.verdict.startswith("INCONCLUSIVE") and own.weights == "the module's own"
        assert "(reference is all zero)" in str(own)
    return result


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


def test_mmcv_concatenation_as_built_is_never_called_agreeing():
    """mmcv's concatenation has no backward (in-place division); as built its conv_out is 0, so z = x: the
    forward comparison alone would compare x with x. Its own weights: INCONCLUSIVE; by default: a random copy."""
    module = _mmcv("real", 3, 8, mode="concatenation", sub_sample=True)
    x = _x((2, 8, 2, 4, 4))
    own = nlref.compare_block(module, x, verbose=False, weights="own")
    assert own.peer_error is not None and not own.agree
    assert own.verdict.startswith("forward INCONCLUSIVE") and own.rows[1][0] == "branch z - x" and own.rows[1][3]
    auto = nlref.compare_block(module, x, verbose=False)
    assert auto.verdict.startswith("forward agrees") and auto.weights.startswith("a copy with random weights")
    assert not auto.agree  # no gradient was compared


@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_mmcv_use_scale(impl, use_scale):
    module = _randomize(_mmcv(impl, 2, 8, use_scale=use_scale, norm_cfg=dict(type="BN")))
    result = _check(module, 3 * _x(SHAPES[2][:1] + (8,) + SHAPES[2][2:]))
    assert result.block.logit_scale == (4 ** -0.5 if use_scale else 1.0)


# --------------------------------------------------------------------------- SlowFast (twin)
# Recorded from facebookresearch/SlowFast slowfast/models/nonlocal_helper.py, class Nonlocal, at
# commit 728d8f7b33742fdd65684408403ca2aee91ef177 (read December 2026).
SLOWFAST_SIGNATURE = [("dim", inspect.Parameter.empty), ("dim_inner", inspect.Parameter.empty),
                      ("pool_size", None), ("instantiation", "softmax"), ("zero_init_final_conv", False),
                      ("zero_init_final_norm", True), ("norm_eps", 1e-5), ("norm_momentum", 0.1),
                      ("norm_module", torch.nn.BatchNorm3d)]
SLOWFAST_ATTRIBUTES = ["dim", "dim_inner", "pool_size", "instantiation", "use_pool", "norm_eps", "norm_momentum",
                       "conv_theta", "conv_phi", "conv_g", "conv_out", "bn", "conv_out.zero_init",
                       "bn.transform_final_bn"]
SLOWFAST_KEYS = ["conv_theta.weight", "conv_theta.bias", "conv_phi.weight", "conv_phi.bias", "conv_g.weight",
                 "conv_g.bias", "conv_out.weight", "conv_out.bias", "bn.weight", "bn.bias", "bn.running_mean",
                 "bn.running_var", "bn.num_batches_tracked"]


def test_slowfast_twin_has_the_real_files_signature_names_and_keys():
    params = inspect.signature(SlowFastNonlocal).parameters
    assert [(name, p.default) for name, p in params.items()] == SLOWFAST_SIGNATURE
    for pool_size in (None, [1, 2, 2]):
        module = SlowFastNonlocal(8, 4, pool_size=pool_size)
        assert list(module.state_dict()) == SLOWFAST_KEYS  # the pool has no weights
        for name in SLOWFAST_ATTRIBUTES:
            owner, _, attr = name.rpartition(".")
            assert hasattr(module.get_submodule(owner) if owner else module, attr), name
        assert hasattr(module, "pool") == (pool_size is not None)
    # the layout nlref writes is that key list
    block = NonLocalBlock(**layouts.slowfast_options(8, 4, pool_size=[1, 2, 2]))
    assert sorted(block.state_dict(layout="slowfast")) == sorted(SLOWFAST_KEYS)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool_size", [None, (1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 3, 3)])
@pytest.mark.parametrize("instantiation", ["softmax", "dot_product"])
def test_slowfast(instantiation, pool_size, train):
    module = _randomize(SlowFastNonlocal(6, 3, pool_size=pool_size, instantiation=instantiation,
                                         norm_eps=1e-4, norm_momentum=0.2), train=train)
    result = _check(module, _x(SHAPES[3]))
    pooled = pool_size is not None and max(pool_size) > 1
    assert result.layout == "slowfast" and result.options["sub_sample"] == pooled
    assert result.options["bn_eps"] == 1e-4 and result.options["bn_momentum"] == 0.2
    if pooled:
        assert result.block.kernel == result.block.stride == pool_size and result.block.pool == "before"


def test_slowfast_options_build_the_block_that_loads_into_nonlocal():
    kwargs = dict(pool_size=[2, 2, 2], instantiation="dot_product", zero_init_final_conv=True, norm_eps=1e-3,
                  norm_momentum=0.05, norm_module=torch.nn.BatchNorm3d)
    block = NonLocalBlock(dtype="float64", seed=3, **layouts.slowfast_options(6, 3, **kwargs))
    block.params["bn.gamma"] = np.random.default_rng(0).standard_normal(6)
    module = SlowFastNonlocal(6, 3, **kwargs).double().eval()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in block.state_dict(layout="slowfast").items()},
                           strict=True)
    x = _x((2, 6, 4, 4, 4))
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), block.eval().forward(x), rtol=1e-12,
                               atol=1e-12)
    assert (module.bn.eps, module.bn.momentum) == (block.bn_eps, block.bn_momentum)


@pytest.mark.parametrize("pool_size", [None, (1, 1, 1)])
def test_slowfast_options_without_pooling_place_no_pool(pool_size):
    """SlowFast's Nonlocal without pooling gave pool="before" with sub_sample=False: a placement of nothing,
    which the block now refuses; the options leave the placement out, and the block loads the module."""
    options = layouts.slowfast_options(6, 3, pool_size=pool_size)
    assert "pool" not in options and options["sub_sample"] is False
    block = NonLocalBlock(dtype="float64", **options)
    module = SlowFastNonlocal(6, 3, pool_size=pool_size).double()
    assert block.load_state_dict(module.state_dict()).loaded_layout == "slowfast"
    assert layouts.slowfast_options(6, 3, pool_size=(1, 2, 2))["pool"] == "before"


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm_module=torch.nn.SyncBatchNorm), "norm_module=SyncBatchNorm has no nlref twin"),
    (dict(norm_module=torch.nn.GroupNorm), "norm_module=GroupNorm has no nlref twin"),
    (dict(instantiation="layernorm"), "instantiation must be 'softmax' or 'dot_product'"),
    (dict(pool_size=(2, 2)), "pool_size must be None or 3 ints"),
    (dict(pool_size=(1, 0, 2)), "ints >= 1"),
    (dict(zero_init_final_norm="yes"), "zero_init_final_norm must be True or False"),
])
def test_slowfast_options_refuse_what_nlref_cannot_compute(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layouts.slowfast_options(6, 3, **kwargs)


def test_compare_block_refuses_a_slowfast_norm_module_other_than_batchnorm3d():
    class SubBatchNorm3d(torch.nn.Module):  # SlowFast's split-batch norm: its own keys and statistics
        def __init__(self, num_features, eps, momentum):
            super().__init__()
            self.bn = torch.nn.BatchNorm3d(num_features, eps=eps, momentum=momentum)
            self.split_bn = torch.nn.BatchNorm3d(num_features * 2, eps=eps, momentum=momentum)

        def forward(self, x):
            return self.bn(x)

    def group_norm(num_features, eps, momentum):
        return torch.nn.GroupNorm(1, num_features, eps=eps)

    x = _x((2, 4, 2, 2, 2))
    with pytest.raises(ValueError, match=r"SlowFastNonlocal.bn is a GroupNorm"):
        nlref.compare_block(SlowFastNonlocal(4, 2, norm_module=group_norm), x)
    with pytest.raises(ValueError, match=r"SlowFastNonlocal.bn is a SubBatchNorm3d"):
        nlref.compare_block(SlowFastNonlocal(4, 2, norm_module=SubBatchNorm3d), x)


# --------------------------------------------------------------------------- pytorchvideo (real)
@needs_ptv
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", [True, False], ids=["bn", "no-norm"])
@pytest.mark.parametrize("pool_size", [(1, 1, 1), (1, 2, 2), (2, 2, 2)])
@pytest.mark.parametrize("instantiation", ["softmax", "dot_product"])
def test_pytorchvideo(instantiation, pool_size, norm, train):
    module = _ptv(dim_in=6, dim_inner=3, pool_size=pool_size, instantiation=instantiation,
                  norm=torch.nn.BatchNorm3d if norm else None, norm_eps=1e-4, norm_momentum=0.2)
    module = _randomize(module, train=train)
    result = _check(module, _x(SHAPES[3]))
    assert result.layout == "pytorchvideo" and result.options["bn_layer"] == norm
    assert result.options["sub_sample"] == (max(pool_size) > 1)
    assert result.block.logit_scale == pytest.approx(3 ** -0.5 if instantiation == "softmax" else 1.0, rel=1e-15)


@needs_ptv
def test_pytorchvideo_nonlocal_built_by_hand_is_read_from_its_parts():
    """NonLocal(conv_theta=..., pool=..., norm=...): the widths from the convs, the pool from the pool."""
    conv = torch.nn.Conv3d
    module = REAL_PTV.NonLocal(conv_theta=conv(8, 2, 1), conv_phi=conv(8, 2, 1), conv_g=conv(8, 2, 1),
                               conv_out=conv(2, 8, 1), pool=torch.nn.MaxPool3d((1, 3, 2)),
                               norm=torch.nn.BatchNorm3d(8, eps=1e-3), instantiation="softmax")
    result = _check(_randomize(module), _x((2, 8, 3, 6, 4)))
    assert result.options["inter_channels"] == 2 and result.block.kernel == (1, 3, 2)
    assert result.options["bn_eps"] == 1e-3


# --------------------------------------------------------------------------- every peer as built
def _built():
    """(id, factory of the module as its own constructor builds it, input, randomised by default)."""
    yield "slowfast", lambda: SlowFastNonlocal(6, 3, pool_size=(1, 2, 2)), SHAPES[3], False  # BN gamma = 1
    yield "pytorchvideo", lambda: _ptv(dim_in=6, dim_inner=3, pool_size=(1, 2, 2)), SHAPES[3], False
    yield "mmcv", lambda: _mmcv("real", 2, 6, sub_sample=True, norm_cfg=dict(type="BN")), SHAPES[2], True
    yield "mmcv-no-norm", lambda: _mmcv("real", 3, 6, mode="dot_product"), SHAPES[3], True  # conv_out = 0
    yield "timm", lambda: _timm("real", 16), (2, 16, 4, 5), True
    for mode, bn in itertools.product(("gaussian", "embedded_gaussian", "dot_product", "concatenation"),
                                      (True, False)):
        yield f"alexhex7-{mode}-{'bn' if bn else 'no-bn'}", (
            lambda mode=mode, bn=bn: alexhex7_class(mode, 2)(6, bn_layer=bn)), SHAPES[2], True


@pytest.mark.parametrize("name,make,shape,randomised", list(_built()), ids=[c[0] for c in _built()])
def test_compare_block_on_each_peer_as_built(name, make, shape, randomised):
    if name == "pytorchvideo" and REAL_PTV is None:
        pytest.skip("pytorchvideo is not installed")
    torch.manual_seed(0)
    result = _as_built(make(), _x(shape), randomised=randomised)
    assert result.layout == name.split("-")[0]
    # and in eval mode (running statistics as built: mean 0, var 1)
    module = make().eval()
    assert nlref.compare_block(module, _x(shape), verbose=False).agree


# --------------------------------------------------------------------------- timm
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_timm(impl, use_scale, train):
    module = _randomize(_timm(impl, 16, use_scale=use_scale), train=train)
    result = _check(module, _x((2, 16, 4, 5)))
    assert result.layout == "timm" and result.options["inter_channels"] == 8  # make_divisible(16 / 8, 8)
    assert result.block.logit_scale == (16 ** -0.5 if use_scale else 1.0)  # in_channels, not the bottleneck


# --------------------------------------------------------------------------- AlexHex7 (twin)
# Recorded from AlexHex7/Non-local_pytorch lib/non_local_<mode>.py at commit
# 0276c7b11d313a5f057363f9f89f99b48b2e29bc: _NonLocalBlockND(in_channels, inter_channels=None,
# dimension=3, sub_sample=True, bn_layer=True); NONLocalBlock{1,2,3}D(in_channels, inter_channels=None,
# sub_sample=True, bn_layer=True); keys of NONLocalBlock2D(6) (sub_sample and bn_layer True) per file.
ALEXHEX7_KEYS = {
    "embedded_gaussian": ["g.0.weight", "g.0.bias", "W.0.weight", "W.0.bias", "W.1.weight", "W.1.bias",
                          "W.1.running_mean", "W.1.running_var", "W.1.num_batches_tracked", "theta.weight",
                          "theta.bias", "phi.0.weight", "phi.0.bias"],
    "gaussian": ["g.0.weight", "g.0.bias", "W.0.weight", "W.0.bias", "W.1.weight", "W.1.bias", "W.1.running_mean",
                 "W.1.running_var", "W.1.num_batches_tracked"],
    "concatenation": ["g.0.weight", "g.0.bias", "W.0.weight", "W.0.bias", "W.1.weight", "W.1.bias",
                      "W.1.running_mean", "W.1.running_var", "W.1.num_batches_tracked", "theta.weight", "theta.bias",
                      "phi.0.weight", "phi.0.bias", "concat_project.0.weight"],
}
ALEXHEX7_KEYS["dot_product"] = ALEXHEX7_KEYS["embedded_gaussian"]


@pytest.mark.parametrize("mode", sorted(ALEXHEX7_KEYS))
def test_alexhex7_twin_has_the_real_files_signature_and_keys(mode):
    cls = alexhex7_class(mode, 2)
    assert cls.__name__ == "NONLocalBlock2D" and cls.__module__ == f"lib.non_local_{mode}"
    assert [(n, p.default) for n, p in inspect.signature(cls).parameters.items()] == [
        ("in_channels", inspect.Parameter.empty), ("inter_channels", None), ("sub_sample", True), ("bn_layer", True)]
    module = cls(6)
    assert list(module.state_dict()) == ALEXHEX7_KEYS[mode]
    assert not hasattr(module, "mode")  # the mode is the file
    assert all(hasattr(module, a) for a in ("dimension", "sub_sample", "in_channels", "inter_channels"))
    assert not module.W[1].weight.detach().any() and not module.W[1].bias.detach().any()  # gamma = beta = 0
    plain = cls(6, sub_sample=False, bn_layer=False)
    assert [k.replace("g.0.", "g.").replace("phi.0.", "phi.").replace("W.0.", "W.")
            for k in ALEXHEX7_KEYS[mode] if not k.startswith("W.1")] == list(plain.state_dict())


@pytest.mark.parametrize("mode", sorted(ALEXHEX7_KEYS))
def test_the_tests_oracle_has_the_ports_keys(mode):
    """TorchNonLocal (tests/nn/torch_oracle.py) claims the port's layout: the same keys as the port's file."""
    oracle = TorchNonLocal(6, mode=mode, inter=3, dims=2, sub_sample=True, bn_layer=True)
    assert sorted(oracle.state_dict()) == sorted(ALEXHEX7_KEYS[mode])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims,mode,sub_sample,bn", list(itertools.product(
    (1, 2, 3), ("gaussian", "embedded_gaussian", "dot_product", "concatenation"), (False, True), (False, True))))
def test_alexhex7(dims, mode, sub_sample, bn, train):
    module = _randomize(alexhex7_class(mode, dims)(6, inter_channels=3, sub_sample=sub_sample, bn_layer=bn),
                        train=train)
    result = _check(module, _x(SHAPES[dims]))
    assert result.layout == "alexhex7" and result.options["mode"] == mode


# --------------------------------------------------------------------------- wrong answers
class _SlowFastForgetsTheScale(SlowFastNonlocal):
    """A SlowFast block with a deliberate mistake: softmax without dim_inner ** -0.5."""

    def forward(self, x):
        b, _, t, h, w = x.shape
        theta = self.conv_theta(x).flatten(2)
        keys = self.pool(x) if self.use_pool else x
        phi, g = self.conv_phi(keys).flatten(2), self.conv_g(keys).flatten(2)
        weights = torch.softmax(theta.transpose(1, 2) @ phi, dim=2)
        return x + self.bn(self.conv_out((g @ weights.transpose(1, 2)).reshape(b, self.dim_inner, t, h, w)))


class _DotProductDividesByN(SlowFastNonlocal):
    """Dot product divided by the number of queries N instead of keys M (they differ with a pool)."""

    def forward(self, x):
        b, _, t, h, w = x.shape
        theta = self.conv_theta(x).flatten(2)
        keys = self.pool(x)
        phi, g = self.conv_phi(keys).flatten(2), self.conv_g(keys).flatten(2)
        logits = theta.transpose(1, 2) @ phi
        y = (g @ (logits / logits.shape[1]).transpose(1, 2)).reshape(b, self.dim_inner, t, h, w)
        return x + self.bn(self.conv_out(y))


def _softmax_over_queries(cls):
    class Wrong(cls):
        """An AlexHex7 block normalising over the wrong axis (queries, not keys)."""

        def forward(self, x):
            b = x.shape[0]
            g = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)
            f = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1) @ self.phi(x).view(
                b, self.inter_channels, -1)
            y = (torch.softmax(f, dim=1) @ g).permute(0, 2, 1).reshape(b, self.inter_channels, *x.shape[2:])
            return self.W(y) + x
    Wrong.__module__ = cls.__module__
    return Wrong


def _wrong():
    yield "slowfast-no-scale", lambda: _SlowFastForgetsTheScale(6, 3, pool_size=(1, 2, 2)), SHAPES[3]
    yield "slowfast-divides-by-N", lambda: _DotProductDividesByN(6, 3, pool_size=(1, 2, 2),
                                                                  instantiation="dot_product"), SHAPES[3]
    yield "alexhex7-softmax-axis", lambda: _softmax_over_queries(alexhex7_class("embedded_gaussian", 2))(6), SHAPES[2]


@pytest.mark.parametrize("name,make,shape", list(_wrong()), ids=[c[0] for c in _wrong()])
def test_compare_block_finds_a_wrong_piece_as_built_and_with_random_weights(name, make, shape):
    torch.manual_seed(0)
    x = _x(shape)
    module = make()
    if name.startswith("alexhex7"):  # as built it is the identity: its own weights show the mistake in BN only
        own = nlref.compare_block(module, x, verbose=False, weights="own")
        assert not own.agree and own.verdict.startswith("DIFFER") and "(reference is all zero)" in str(own)
    for weights in ("auto", "random"):
        result = nlref.compare_block(module, x, verbose=False, weights=weights)
        assert not result.agree and result.verdict.startswith("DIFFER"), str(result)
        assert result.rows[0][0] == "output z" and result.rows[0][2] > 1e-6
    # the right one of the same family agrees on the same input
    right = type(module).__mro__[1]
    if name.startswith("alexhex7"):
        right = alexhex7_class("embedded_gaussian", 2)
        args = (6,)
    else:
        args = (6, 3)
    kwargs = dict(pool_size=(1, 2, 2), instantiation=module.instantiation) if hasattr(module, "instantiation") else {}
    assert nlref.compare_block(right(*args, **kwargs), x, verbose=False).agree


class _SoftmaxWithAWrongBackward(torch.autograd.Function):
    """softmax over the last axis whose backward is twice the true one (a hand-written backward with a slip)."""

    @staticmethod
    def forward(ctx, logits):
        a = torch.softmax(logits, dim=-1)
        ctx.save_for_backward(a)
        return a

    @staticmethod
    def backward(ctx, da):
        (a,) = ctx.saved_tensors
        return 2 * a * (da - (a * da).sum(-1, keepdim=True))


class _SlowFastWrongBackward(SlowFastNonlocal):
    """A SlowFast block whose forward is right and whose gradient into the logits is twice the true one."""

    def forward(self, x):
        b, _, t, h, w = x.shape
        theta = self.conv_theta(x).flatten(2)
        keys = self.pool(x) if self.use_pool else x
        phi, g = self.conv_phi(keys).flatten(2), self.conv_g(keys).flatten(2)
        weights = _SoftmaxWithAWrongBackward.apply(theta.transpose(1, 2) @ phi * self.dim_inner ** -0.5)
        return x + self.bn(self.conv_out((g @ weights.transpose(1, 2)).reshape(b, self.dim_inner, t, h, w)))


def _degenerate_x(shape):
    """Inputs that leave a softmax's attention uniform: the same at every position (per sample and channel),
    and the same everywhere (in train mode BN's batch variance is then 0 too)."""
    per_channel = np.broadcast_to(_x(shape[:2] + (1,) * (len(shape) - 2)), shape).copy()
    return {"same-at-every-position": per_channel, "ones": np.ones(shape)}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("weights", ["auto", "own", "random"])
def test_compare_block_does_not_agree_on_an_input_that_makes_the_attention_uniform(weights, train):
    """x the same at every position: every logit of a row is the same, so the softmax is uniform whatever
    the logits' scale, and theta's and phi's gradients are zero up to rounding (not exactly zero). A block
    that forgets the scale used to "agree" (those rows passed by atol, as zero up to rounding); now they are
    unchecked and the verdict INCONCLUSIVE, for the wrong block and the right one, and names them."""
    shape = (2, 6, 2, 4, 4)
    for make in (lambda: _SlowFastForgetsTheScale(6, 3, pool_size=(1, 2, 2)),
                 lambda: SlowFastNonlocal(6, 3, pool_size=(1, 2, 2))):
        torch.manual_seed(0)
        module = make().train(train)
        if weights == "own":
            _randomize(module, 3, train=train)
        for name, x in _degenerate_x(shape).items():
            result = nlref.compare_block(module, x, verbose=False, weights=weights)
            assert not result.agree and result.verdict.startswith("INCONCLUSIVE"), (name, str(result))
            assert "dtheta.weight (conv_theta.weight)" in result.unchecked, (name, result.unchecked)
            assert "dphi.weight (conv_phi.weight)" in result.unchecked, (name, result.unchecked)
            assert "(reference is 0 up to rounding: not checked)" in str(result)
            assert "an x the same at every position" in result.verdict or weights == "own"
        # a random x: the wrong block differs, the right one agrees
        result = nlref.compare_block(module, _x(shape), verbose=False, weights=weights)
        assert result.agree is (type(module) is SlowFastNonlocal), str(result)
        assert result.unchecked == []


def test_compare_block_does_not_agree_on_a_dz_that_bn_passes_nothing_of():
    """In train mode BN passes no gradient back from a dz the same at every position of every sample
    (``z.sum().backward()``): every gradient upstream of it is zero up to rounding. A block with a wrong
    backward and a right forward used to "agree" with dz = 1; a random dz shows it."""
    x = _x((2, 6, 2, 4, 4))
    for make in (_SlowFastWrongBackward, SlowFastNonlocal):
        module = _randomize(make(6, 3, pool_size=(1, 2, 2)), 2)
        ones = nlref.compare_block(module, x, dz=np.ones_like(x), verbose=False)
        assert not ones.agree and ones.verdict.startswith("INCONCLUSIVE"), str(ones)
        assert {"dtheta.weight (conv_theta.weight)", "dg.weight (conv_g.weight)", "dW_z.weight (conv_out.weight)",
                "dbn.gamma (bn.weight)"} <= set(ones.unchecked)
        result = nlref.compare_block(module, x, verbose=False)
        assert result.agree is (make is SlowFastNonlocal), str(result)
        if make is _SlowFastWrongBackward:
            assert result.verdict.startswith("DIFFER") and "dtheta.weight (conv_theta.weight)" in result.verdict


@pytest.mark.parametrize("instantiation,train,expected", [
    ("softmax", True, ["dphi.bias (conv_phi.bias)", "dg.bias (conv_g.bias)", "dW_z.bias (conv_out.bias)"]),
    ("softmax", False, ["dphi.bias (conv_phi.bias)"]),
    ("dot_product", True, ["dW_z.bias (conv_out.bias)"]),
    ("dot_product", False, []),
])
def test_compare_block_knows_which_gradients_the_equations_make_zero(instantiation, train, expected):
    """Those are judged by atol and do not make a comparison INCONCLUSIVE; every other row near zero does."""
    module = _randomize(SlowFastNonlocal(6, 3, pool_size=(1, 2, 2), instantiation=instantiation), 4, train=train)
    result = nlref.compare_block(module, _x((2, 6, 2, 4, 4)), verbose=False)
    assert result.expected_zero == expected and result.unchecked == [] and result.agree, str(result)


# --------------------------------------------------------------------------- export and load
def _peer_cases():
    """(id, layout, module factory, block options): the peers' own modules where installed, else their twins."""
    mmcv = "real" if REAL_MMCV is not None else "twin"
    yield "mmcv-concatenation", "mmcv", lambda: _mmcv(mmcv, 3, 6, sub_sample=True, norm_cfg=dict(type="BN"),
                                                      mode="concatenation"), dict(
        dims=3, mode="concatenation", sub_sample=True, W_z_bias=False)
    yield "mmcv-gaussian", "mmcv", lambda: _mmcv(mmcv, 1, 6, mode="gaussian"), dict(
        dims=1, mode="gaussian", sub_sample=False, bn_layer=False)
    yield "slowfast", "slowfast", lambda: SlowFastNonlocal(6, 3, pool_size=(1, 3, 3)), dict(
        dims=3, pool="before", pool_kernel=(1, 3, 3), scale=True)
    yield "slowfast-dot", "slowfast", lambda: SlowFastNonlocal(6, 3, instantiation="dot_product"), dict(
        dims=3, mode="dot_product", sub_sample=False)
    if REAL_PTV is not None:
        yield "pytorchvideo", "pytorchvideo", lambda: _ptv(dim_in=6, dim_inner=3, pool_size=(1, 2, 2)), dict(
            dims=3, pool="before", scale=True)
        yield "pytorchvideo-no-norm", "pytorchvideo", lambda: _ptv(dim_in=6, dim_inner=3, norm=None,
                                                                   instantiation="dot_product"), dict(
            dims=3, mode="dot_product", sub_sample=False, bn_layer=False)
    timm = "real" if REAL_TIMM is not None else "twin"
    yield "timm", "timm", lambda: _timm(timm, 6, rd_channels=3), dict(dims=2, sub_sample=False, scale=6 ** -0.5)
    yield "alexhex7", "alexhex7", lambda: alexhex7_class("dot_product", 2)(6), dict(dims=2, mode="dot_product")
    yield "alexhex7-gaussian", "alexhex7", lambda: alexhex7_class("gaussian", 3)(6, bn_layer=False), dict(
        dims=3, mode="gaussian", bn_layer=False)


@pytest.mark.parametrize("name,layout,make,options", list(_peer_cases()), ids=[c[0] for c in _peer_cases()])
def test_export_loads_into_the_peer_strictly_and_back(name, layout, make, options):
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
    for layout in ("nlref", "slowfast", "pytorchvideo"):
        state = block.state_dict(layout=layout)
        again = NonLocalBlock(4, dims=3, dtype="float64", pool="before", scale=True, seed=3).load_state_dict(state)
        assert again.loaded_layout == layout
        assert again.state_dict(layout=layout).keys() == state.keys()
        assert all(np.array_equal(again.state_dict(layout=layout)[k], v) for k, v in state.items())
    assert set(LAYOUTS) == {"nlref", "alexhex7", "mmcv", "slowfast", "pytorchvideo", "timm", "keras"}
    assert layouts.PEER_LAYOUTS == LAYOUTS[1:-1]  # the PyTorch modules' layouts; Keras's is the last
    assert set(layouts.MODULE_NAMES) == set(layouts.SOURCES) == set(LAYOUTS[1:])


def test_slowfast_and_pytorchvideo_keys_are_told_apart():
    """Both FAIR codebases name the convolutions conv_*; SlowFast's norm is bn, pytorchvideo's norm."""
    block = NonLocalBlock(4, dims=3, dtype="float64", pool="before", scale=True)
    sf, ptv = block.state_dict(layout="slowfast"), block.state_dict(layout="pytorchvideo")
    assert {k for k in sf if not k.startswith("conv_")} == {f"bn.{k}" for k in (
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert {k.replace("bn.", "norm.") for k in sf} == set(ptv)
    assert NonLocalBlock(4, dims=3, pool="before", scale=True).load_state_dict(sf).loaded_layout == "slowfast"
    assert NonLocalBlock(4, dims=3, pool="before", scale=True).load_state_dict(ptv).loaded_layout == "pytorchvideo"
    assert layouts.layout_of_keys(sf) == "slowfast" and layouts.layout_of_keys(ptv) == "pytorchvideo"
    # without a norm the keys are the same; only pytorchvideo (norm=None) can express that block
    plain = NonLocalBlock(4, dims=3, pool="before", scale=True, bn_layer=False)
    assert plain.load_state_dict(plain.state_dict(layout="pytorchvideo")).loaded_layout == "pytorchvideo"
    with pytest.raises(ValueError, match="SlowFast's Nonlocal always builds its norm_module"):
        plain.state_dict(layout="slowfast")


def test_module_names_fill_the_wrappers():
    assert layouts.module_names("alexhex7", sub_sample=True, bn_layer=True)["phi"] == "phi.0"
    assert layouts.module_names("alexhex7", sub_sample=False, bn_layer=False)["W_z"] == "W"
    assert layouts.module_names("mmcv", sub_sample=True, bn_layer=False)["g"] == "g.0.conv"
    with pytest.raises(ValueError, match="layout must be one of"):
        layouts.module_names("nlref", sub_sample=True, bn_layer=True)


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
    ("pytorchvideo", dict(dims=3, pool="before", scale=True, mode="gaussian"), "instantiation"),
    ("pytorchvideo", dict(dims=3, pool="before", scale=True, W_z_bias=False), "conv_out has a bias"),
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
    assert "verdict: agree" in table and str(ok) in table and "weights: the module's own" in table
    # a wrong option (BN's eps): the output and every gradient differ
    bad = nlref.compare_block(module, x, verbose=False, bn_eps=0.5)
    assert not bad.agree and bad.verdict.startswith("DIFFER") and bad.rows[0][2] > 1e-6
    assert module.training and module.bn.running_mean.dtype == torch.float64  # the caller's module untouched
    before = module.bn.running_mean.clone()
    nlref.compare_block(module, x, verbose=False)
    assert torch.equal(module.bn.running_mean, before)


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
    with pytest.raises(ValueError, match="weights must be one of"):
        nlref.compare_block(SlowFastNonlocal(4, 2), _x((1, 4, 2, 2, 2)), weights="fresh")
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        nlref.compare_block({"conv_g.weight": 0}, _x((1, 4, 2, 2, 2)))
    with pytest.raises(ValueError, match="Conv2d's state-dict keys .* fit none of the layouts"):
        nlref.compare_block(torch.nn.Conv2d(4, 4, 1), _x((1, 4, 2, 2)))
    module = TorchNonLocal(4, mode="dot_product", inter=2, dims=2, sub_sample=False, bn_layer=True)
    module.mode = "unreadable"  # the port keeps its mode in its file name only (its forward here: f / M)
    with pytest.raises(ValueError, match="TorchNonLocal has the alexhex7 layout.*pass mode="):
        nlref.compare_block(module, _x((1, 4, 2, 2)))
    assert nlref.compare_block(module, _x((2, 4, 2, 2)), verbose=False, mode="dot_product").agree
    with pytest.raises(ValueError, match=r"mode must be one of .*, got 'dot'"):  # was "could not read ...; pass mode="
        nlref.compare_block(module, _x((2, 4, 2, 2)), verbose=False, mode="dot")
    with pytest.raises(ValueError, match=r"SlowFastNonlocal's parameters do not fit the timm layout; they fit the "
                                         r"slowfast layout"):
        nlref.compare_block(SlowFastNonlocal(4, 2), _x((1, 4, 2, 2, 2)), layout="timm")


def test_compare_block_names_the_option_a_layout_cannot_express_not_its_keys():
    """A module with AlexHex7's names that pools x before phi and g (the Caffe2 placement, which the port
    cannot express) was reported as a key mismatch (g.weight unmatched, g.0.weight missing); now the option."""
    module = TorchNonLocal(4, mode="dot_product", inter=2, dims=2, sub_sample=True, bn_layer=True, pool="before")
    with pytest.raises(ValueError, match=r"the alexhex7 layout cannot express this block's options: pool='before'"):
        nlref.compare_block(module, _x((2, 4, 4, 4)), mode="dot_product", verbose=False)
    block = NonLocalBlock(4, mode="dot_product", pool="before")
    with pytest.raises(ValueError, match=r"the alexhex7 layout cannot express this block's options: pool='before'"):
        block.load_state_dict(module.state_dict(), layout="alexhex7")


def _peer_modules():
    """One module per peer and option set whose keys a wrong layout half-matches: (module, its layout, x)."""
    found = [(alexhex7_class("embedded_gaussian", 2)(6), "alexhex7", (1, 6, 4, 4)),
             (alexhex7_class("dot_product", 2)(6, sub_sample=False, bn_layer=False), "alexhex7", (1, 6, 4, 4)),
             (alexhex7_class("gaussian", 1)(6), "alexhex7", (1, 6, 8)),
             (SlowFastNonlocal(6, 3, pool_size=(1, 2, 2)), "slowfast", (1, 6, 2, 4, 4)),
             (MmcvNonLocal(2, 6, norm_cfg=dict(type="BN")), "mmcv", (1, 6, 4, 4)),
             (TimmNonLocalAttn(16), "timm", (1, 16, 4, 4))]
    if REAL_MMCV is not None:
        found += [(REAL_MMCV.NonLocal2d(6, sub_sample=True, norm_cfg=dict(type="BN2d")), "mmcv", (1, 6, 4, 4)),
                  (REAL_MMCV.NonLocal3d(6, mode="gaussian"), "mmcv", (1, 6, 2, 4, 4))]
    if REAL_PTV is not None:
        found += [(_ptv(dim_in=6, dim_inner=3, pool_size=(1, 2, 2)), "pytorchvideo", (1, 6, 2, 4, 4)),
                  (_ptv(dim_in=6, dim_inner=3, norm=None), "pytorchvideo", (1, 6, 2, 4, 4))]
    if REAL_TIMM is not None:
        found.append((REAL_TIMM.NonLocalAttn(16), "timm", (1, 16, 4, 4)))
    return found


def test_compare_block_with_a_wrong_layout_says_which_layout_the_module_has():
    """A layout forced on a module of another peer failed on an option: pytorchvideo's NonLocal without a norm as
    "slowfast" with "cannot express bn_layer=False", AlexHex7's port as "timm" with "no attribute 'scale' ... pass
    scale=", timm's as "alexhex7" with a mismatch against a Gaussian-mode block. Now: the parameters do not fit
    that layout, and the one they fit is named."""
    for module, own, shape in _peer_modules():
        x = _x(shape)
        assert nlref.compare_block(module, x, verbose=False).layout == own
        for layout in layouts.PEER_LAYOUTS:
            if layout == own:
                assert nlref.compare_block(module, x, layout=layout, verbose=False).agree
                continue
            message = (f"{type(module).__name__}'s parameters do not fit the {layout} layout; they fit the {own} "
                       f"layout: pass layout='{own}'")
            with pytest.raises(ValueError, match=re.escape(message)):
                nlref.compare_block(module, x, layout=layout, verbose=False)
    assert layouts.parameter_mismatch(["conv_g.weight", "conv_out.weight", "conv_out.bias", "conv_g.bias",
                                       "conv_theta.weight", "conv_theta.bias", "conv_phi.weight", "conv_phi.bias"],
                                      "slowfast") == ([], ["bn.bias", "bn.weight"])  # SlowFast always has its norm


def test_compare_block_and_load_state_dict_take_bfloat16_tensors():
    """NumPy has no bfloat16: a bfloat16 x or weight was "not an array of real numbers; got Tensor"."""
    module = SlowFastNonlocal(4, 2)
    x = torch.from_numpy(_x((2, 4, 2, 2, 2))).bfloat16()
    result = nlref.compare_block(module, x, verbose=False)
    assert result.agree, str(result)
    state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in module.state_dict().items()}
    block = NonLocalBlock(**layouts.slowfast_options(4, 2), dtype="float64").load_state_dict(state)
    np.testing.assert_array_equal(block.params["theta.weight"], state["conv_theta.weight"].float().numpy()[..., 0, 0, 0])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(x="abc"), TypeError, "x must be an array of real numbers; got str"),
    (dict(x=np.full((1, 4, 2, 2, 2), 1j)), TypeError, "x must hold real numbers .*got dtype complex128"),
    (dict(x=np.full((1, 4, 2, 2, 2), np.nan)), ValueError, "x holds non-finite values"),
    (dict(dz=np.full((1, 4, 2, 2, 2), np.inf)), ValueError, "dz holds non-finite values"),
    (dict(rtol=-1.0), ValueError, "rtol must be a finite number >= 0"),
    (dict(rtol=math.nan), ValueError, "rtol must be a finite number >= 0"),
    (dict(atol="1e-9"), ValueError, "atol must be a finite number >= 0"),
    (dict(seed=-1), ValueError, "seed must be an int >= 0"),
])
def test_compare_block_refuses_input_that_would_blame_the_module(kwargs, error, message):
    """A NaN in x or dz gave "DIFFER ... for z, dx, ..." (the module blamed for the input); complex x lost
    its imaginary part; rtol=-1 ended in "max() arg is an empty sequence"."""
    args = {"x": _x((1, 4, 2, 2, 2)), **kwargs}
    with pytest.raises(error, match=message):
        nlref.compare_block(SlowFastNonlocal(4, 2), args.pop("x"), verbose=False, **args)


def test_compare_block_names_the_class_when_it_cannot_read_an_attribute():
    """The mode and scale come from the attributes the peer's own class keeps; a module without them is named."""
    module = SlowFastNonlocal(4, 2)
    del module.instantiation
    with pytest.raises(ValueError, match="SlowFastNonlocal has the slowfast layout's weights but no attribute "
                                         "'instantiation'.*pass mode="):
        nlref.compare_block(module, _x((2, 4, 2, 2, 2)))
    timm = TimmNonLocalAttn(8, rd_channels=4)
    del timm.scale
    with pytest.raises(ValueError, match="TimmNonLocalAttn has the timm layout's weights but no attribute 'scale'"):
        nlref.compare_block(timm, _x((2, 8, 2, 3)))
    mmcv = MmcvNonLocal(2, 4)
    del mmcv.use_scale
    with pytest.raises(ValueError, match="MmcvNonLocal has the mmcv layout's weights but no attribute 'use_scale'"):
        nlref.compare_block(mmcv, _x((2, 4, 2, 3)))
    padded = SlowFastNonlocal(4, 2, pool_size=(1, 2, 2))
    padded.pool.padding = 1
    with pytest.raises(ValueError, match="SlowFastNonlocal's pool .* pads"):
        nlref.compare_block(padded, _x((2, 4, 2, 4, 4)))
