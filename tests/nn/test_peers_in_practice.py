"""compare_block and load_state_dict with the peers' real modules as people use them: a batch of one, odd
sizes, deliberate one-line defects in a subclass of the real class, trained weights, state dicts saved
to disk, wrapped in DataParallel or held inside a larger model, in half precision and odd memory layouts."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import nlref
from nlref.nn import NonLocalBlock
from tests.nn.peer_modules import real_mmcv, real_pytorchvideo

torch = pytest.importorskip("torch")

MMCV = real_mmcv()
PTV = real_pytorchvideo()
needs_mmcv = pytest.mark.skipif(MMCV is None, reason="mmcv's non-local bricks do not import (see .ci/run)")
needs_ptv = pytest.mark.skipif(PTV is None, reason="pytorchvideo is not installed (see .ci/run)")


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# --------------------------------------------------------------------------- one-line defects in the real class
def _defective(kind):
    """A subclass of mmcv's real NonLocal2d with one mistake (or none: "right")."""
    base = MMCV.NonLocal2d

    class Defective(base):
        def embedded_gaussian(self, theta_x, phi_x):
            if kind == "forgets-scale":  # use_scale read but never applied
                return torch.matmul(theta_x, phi_x).softmax(dim=-1)
            return super().embedded_gaussian(theta_x, phi_x)

        def dot_product(self, theta_x, phi_x):
            if kind == "divides-by-queries":  # N (queries) where mmcv divides by N' (pooled keys)
                weights = torch.matmul(theta_x, phi_x)
                return weights / weights.shape[-2]
            return super().dot_product(theta_x, phi_x)

        def forward(self, x):
            if kind != "pools-before":
                return super().forward(x)
            n = x.size(0)  # max-pool x, then the 1x1 convolution: the other side of the pool
            pooled = self.phi[1](x)
            g_x = self.g[0](pooled).view(n, self.inter_channels, -1).permute(0, 2, 1)
            theta_x = self.theta(x).view(n, self.inter_channels, -1).permute(0, 2, 1)
            phi_x = self.phi[0](pooled).view(n, self.inter_channels, -1)
            y = torch.matmul(getattr(self, self.mode)(theta_x, phi_x), g_x)
            return x + self.conv_out(y.permute(0, 2, 1).reshape(n, self.inter_channels, *x.shape[2:]))

    Defective.__name__ = f"NonLocal2d_{kind}"
    return Defective


@needs_mmcv
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind,mode", [("right", "embedded_gaussian"), ("right", "dot_product"),
                                       ("forgets-scale", "embedded_gaussian"),
                                       ("divides-by-queries", "dot_product"),
                                       ("pools-before", "embedded_gaussian"), ("pools-before", "dot_product")])
def test_compare_block_on_mmcv_defects_with_a_batch_of_one(kind, mode, train, batch):
    """With BN in train mode and one sample, theta's bias in the dot-product mode has no gradient (it adds the
    same vector at every position of the sample, which BN's mean removes): a right module used to be called
    INCONCLUSIVE there, "x or dz may be the cause". Now it agrees, and each defect still DIFFERs."""
    torch.manual_seed(0)
    module = _defective(kind)(7, reduction=3, sub_sample=True, mode=mode, use_scale=True,
                              norm_cfg=dict(type="BN2d")).train(train)
    result = nlref.compare_block(module, _x((batch, 7, 5, 6)), verbose=False, weights="random")
    if kind == "right":
        assert result.agree and result.unchecked == [], str(result)
        assert ("dtheta.bias (theta.conv.bias)" in result.expected_zero) is (
            train and batch == 1 and mode == "dot_product")
    else:
        assert not result.agree and result.verdict.startswith("DIFFER"), str(result)
        assert "branch z - x" in result.verdict


@needs_ptv
@pytest.mark.parametrize("pool_size", [(1, 1, 1), (1, 2, 2), (2, 3, 3)])
def test_pytorchvideo_dot_product_with_a_batch_of_one_in_train_mode_agrees(pool_size):
    """The same fact on pytorchvideo's own NonLocal (odd T, H, W; a pool that leaves a remainder)."""
    torch.manual_seed(0)
    module = PTV.create_nonlocal(dim_in=6, dim_inner=5, pool_size=pool_size, instantiation="dot_product").train()
    result = nlref.compare_block(module, _x((1, 6, 3, 5, 7)), verbose=False, weights="random")
    assert result.agree and "dtheta.bias (conv_theta.bias)" in result.expected_zero, str(result)


@needs_mmcv
def test_a_gradient_the_equations_make_zero_may_be_exactly_zero_in_the_peer():
    """phi's bias in a softmax has a gradient that is rounding, and with two pooled keys the rounding cancels
    exactly for some inputs (which ones depends on the machine's arithmetic); an exact 0 there is what a
    right peer computes and used to make the verdict INCONCLUSIVE. Every seed must agree."""
    torch.manual_seed(0)
    module = MMCV.NonLocal1d(7, reduction=3, sub_sample=True, norm_cfg=dict(type="BN1d")).train()
    for seed in range(40):
        result = nlref.compare_block(module, _x((1, 7, 4), seed), verbose=False, weights="random")
        assert result.agree and result.unchecked == [], (seed, str(result))


# --------------------------------------------------------------------------- state dicts as they arrive
def _trained_mmcv():
    """mmcv's real NonLocal2d after three SGD steps: BN's running statistics and counter are not their start."""
    torch.manual_seed(0)
    module = MMCV.NonLocal2d(8, sub_sample=True, norm_cfg=dict(type="BN2d")).train()
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    x = torch.randn(3, 8, 5, 6)
    for _ in range(3):
        opt.zero_grad()
        (module(x) - x).pow(2).mean().backward()
        opt.step()
    assert int(module.conv_out.bn.num_batches_tracked) == 3
    return module.eval()


def _block():
    return NonLocalBlock(8, dims=2, sub_sample=True, W_z_bias=False, scale=True, dtype="float64")


def _against(block, module, x):
    block.eval()
    return float(np.abs(block.forward(x) - module.double()(torch.from_numpy(x)).detach().numpy()).max())


@needs_mmcv
def test_a_trained_state_dict_saved_to_disk_loads_under_its_prefix(tmp_path):
    """torch.save / torch.load of a DataParallel's and of a whole model's state dict: every key has a prefix
    ('module.', '1.1.'). They used to be refused with "the closest is 'nlref'" and nothing about the prefix;
    now the error names the prefix that fits, and prefix= selects the block's keys."""
    module = _trained_mmcv()
    x = _x((2, 8, 5, 7))
    wrapped = {"dataparallel": (torch.nn.DataParallel(module), "module."),
               "model": (torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.Sequential(torch.nn.ReLU(), module)),
                         "1.1.")}
    for name, (holder, prefix) in wrapped.items():
        torch.save(holder.state_dict(), tmp_path / f"{name}.pt")
        state = torch.load(tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=f"the keys under '{prefix}' \\(mmcv layout\\) fit this block: "
                                             f"pass prefix='{prefix}'"):
            _block().load_state_dict(state)
        with pytest.raises(ValueError, match=f"pass prefix='{prefix}'"):
            _block().load_state_dict(state, layout="mmcv")
        block = _block().load_state_dict(state, prefix=prefix)
        assert block.loaded_layout == "mmcv" and block.num_batches_tracked == 3
        assert _against(block, module, x) < 1e-12
        np.testing.assert_array_equal(block.buffers["bn.running_var"],
                                      module.conv_out.bn.running_var.detach().double().numpy())
    with pytest.raises(ValueError, match=r"prefix='2\.': no key of the state dict starts with it"):
        _block().load_state_dict(wrapped["model"][0].state_dict(), prefix="2.")
    with pytest.raises(TypeError, match="prefix must be a str"):
        _block().load_state_dict(module.state_dict(), prefix=1)


@needs_mmcv
def test_compare_block_unwraps_dataparallel_and_names_the_submodule_of_a_model():
    module = _trained_mmcv().train()
    x = _x((2, 8, 5, 7))
    result = nlref.compare_block(torch.nn.DataParallel(module), x, verbose=False)
    assert result.agree and result.layout == "mmcv", str(result)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.Sequential(torch.nn.ReLU(), module))
    with pytest.raises(ValueError, match=r"its submodules '1\.1' \(mmcv layout\) have a peer's keys: pass "
                                         r"module.get_submodule\('1\.1'\)"):
        nlref.compare_block(model, x, verbose=False)


@needs_mmcv
@pytest.mark.parametrize("variant", ["float64", "float16", "bfloat16", "channels_last", "non_contiguous",
                                     "requires_grad"])
def test_state_dict_tensors_in_any_dtype_and_memory_layout_load_as_their_values(variant):
    """What loads is the tensors' values (cast to the block's dtype), whatever their dtype, strides or
    autograd flag; the reference is the same values cast by torch."""
    module = _trained_mmcv()
    state = module.state_dict()
    if variant == "requires_grad":
        state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    else:
        def convert(t):
            if not t.is_floating_point():
                return t
            if variant in ("float64", "float16", "bfloat16"):
                return t.to(getattr(torch, variant))
            if variant == "channels_last" and t.ndim == 4:
                return t.contiguous(memory_format=torch.channels_last)
            if variant == "non_contiguous" and t.ndim >= 2:
                return t.transpose(0, 1).contiguous().transpose(0, 1)
            return t
        state = {k: convert(v) for k, v in state.items()}
        assert variant != "non_contiguous" or not state["theta.conv.weight"].is_contiguous()
    block = _block().load_state_dict(state)
    for key, (peer_key, _) in nlref.nn.layouts.key_map(block, "mmcv").items():
        expected = state[peer_key].detach().double().numpy().reshape(block._native_shape(key))
        np.testing.assert_array_equal({**block.params, **block.buffers}[key], expected, err_msg=key)


@needs_mmcv
@pytest.mark.parametrize("shape,sub_sample", [((2, 8, 1, 1), False), ((2, 8, 2, 3), True), ((1, 8, 1, 1), False)])
def test_one_key_per_query_is_named_as_the_reason_for_an_inconclusive_verdict(shape, sub_sample):
    """One position (or one pooled key): the softmax is 1 whatever its logits, so theta's and phi's gradients
    are zero with any weights. The verdict is INCONCLUSIVE and used to suggest another seed or "an x the same
    at every position"; it now says that each query has one key."""
    torch.manual_seed(0)
    module = MMCV.NonLocal2d(8, sub_sample=sub_sample).train()
    for weights in ("random", "own"):
        peer = nlref.nn.compare.randomize_module(module, 1) if weights == "own" else module
        result = nlref.compare_block(peer, _x(shape), verbose=False, weights=weights)
        assert result.verdict.startswith("INCONCLUSIVE") and "dtheta.weight (theta.conv.weight)" in result.unchecked
        assert f"x of shape {shape} leaves each query one key to attend to" in result.verdict, result.verdict
    as_built = nlref.compare_block(MMCV.NonLocal2d(8), _x(shape), verbose=False, weights="own")
    assert "one key" not in as_built.verdict and "weights='random'" in as_built.verdict  # W_z = 0 is a cause too
    more = nlref.compare_block(module, _x((2, 8, 4, 5)), verbose=False, weights="random")
    assert more.agree, str(more)


class _KerasMomentumBN(torch.nn.BatchNorm2d):
    """A batch norm that reads momentum as Keras does: running = m * running + (1 - m) * batch."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)
        with torch.no_grad():
            self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean)
            self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var)
            self.num_batches_tracked += 1
        return torch.nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class _BiasedRunningVarBN(torch.nn.BatchNorm2d):
    """A batch norm that keeps the biased batch variance in running_var (PyTorch keeps the unbiased one)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)
            self.num_batches_tracked += 1
        return torch.nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


@needs_mmcv
@pytest.mark.parametrize("norm", [None, _KerasMomentumBN, _BiasedRunningVarBN])
def test_compare_block_catches_a_batch_norm_with_another_running_statistics_convention(norm):
    """Forward and every gradient agree (the batch statistics are right); only the running statistics, which
    eval mode will use, differ: compare_block compares them after the step and names them."""
    torch.manual_seed(0)
    module = MMCV.NonLocal2d(8, sub_sample=True, norm_cfg=dict(type="BN2d")).train()
    if norm is not None:
        right = module.conv_out.bn
        module.conv_out.bn = norm(8, eps=right.eps, momentum=right.momentum)
    result = nlref.compare_block(module, _x((2, 8, 4, 5)), verbose=False, weights="random")
    if norm is None:
        assert result.agree, str(result)
        return
    assert result.verdict.startswith("DIFFER"), str(result)
    assert "bn.running_var (conv_out.bn.running_var)" in result.verdict
    assert ("bn.running_mean (conv_out.bn.running_mean)" in result.verdict) is (norm is _KerasMomentumBN)
    assert "dx" not in result.verdict and "output z" not in result.verdict


@needs_mmcv
@pytest.mark.parametrize("how", ["frozen", "one-frozen", "no_grad", "inference_mode"])
def test_compare_block_on_a_frozen_module_or_under_no_grad_agrees(how):
    """A module loaded for inference (requires_grad_(False)), or a call inside torch.no_grad() /
    inference_mode(), is the same function. They used to DIFFER on every frozen parameter's gradient (the
    peer's were None, compared as zeros) or report that the peer's backward failed; the module is right."""
    torch.manual_seed(0)
    x = _x((2, 8, 4, 5))
    if how == "inference_mode":
        with torch.inference_mode():
            module = MMCV.NonLocal2d(8, norm_cfg=dict(type="BN2d")).train()
            result = nlref.compare_block(module, x, verbose=False, weights="random")
    else:
        module = MMCV.NonLocal2d(8, norm_cfg=dict(type="BN2d")).train()
        if how == "frozen":
            module.requires_grad_(False)
        elif how == "one-frozen":
            module.theta.conv.weight.requires_grad_(False)
        if how == "no_grad":
            with torch.no_grad():
                result = nlref.compare_block(module, x, verbose=False, weights="random")
        else:
            result = nlref.compare_block(module, x, verbose=False, weights="random")
    assert result.agree and result.peer_error is None, str(result)
    assert all(not p.requires_grad for p in module.parameters()) is (how == "frozen")  # the caller's, untouched


@needs_mmcv
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_mmcv_with_sync_bn_is_compared_as_the_batch_norm_it_is_on_one_process(train):
    """norm_cfg=dict(type="SyncBN"), common in mmcv configs, builds a torch.nn.SyncBatchNorm, which compare_block
    refused ("no twin"). On one process it is a batch norm: its own forward (run here, no process group) gives
    the output and running statistics of the BatchNorm2d compare_block puts in its copy, and the verdict agrees."""
    torch.manual_seed(0)
    module = MMCV.NonLocal2d(8, norm_cfg=dict(type="SyncBN", momentum=0.05)).train(train)
    nlref.nn.compare.randomize_module(module, 2)
    assert isinstance(module.conv_out.bn, torch.nn.SyncBatchNorm)
    x = _x((2, 8, 4, 5))
    result = nlref.compare_block(module, x, verbose=False)
    assert result.agree and result.options["bn_momentum"] == 0.05, str(result)
    assert isinstance(module.conv_out.bn, torch.nn.SyncBatchNorm)  # the caller's module is untouched
    plain = nlref.nn.compare._plain_batch_norms(copy.deepcopy(module), 2)
    assert type(plain.conv_out.bn) is torch.nn.BatchNorm2d and plain.conv_out.bn.momentum == 0.05
    ours, theirs = module(torch.from_numpy(x).float()), plain(torch.from_numpy(x).float())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(module.conv_out.bn.state_dict()[key], plain.conv_out.bn.state_dict()[key],
                                   rtol=0, atol=0)
