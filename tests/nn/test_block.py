"""NonLocalBlock: gradient checks over every option, the PyTorch oracle, identity at start,
equivariance, stability, chunked == full, AlexHex7 weight interchange, bad input."""

import importlib
import itertools
import math

import numpy as np
import pytest

import nlref
import nlref.backend as B
from nlref.nn import NonLocalBlock, layer_gradcheck
from nlref.nn.nonlocal_op import MODES, SOFTMAX_MODES
from tests.helpers import assert_same_library, random_block

SHAPES = {1: (2, 4, 6), 2: (2, 4, 4, 4), 3: (2, 4, 2, 4, 4)}
# The oracle compares values, so its inputs share no size: batch 3, C = 4, inter_channels 2, every spatial
# size apart (H != W), pooled keys M != N. SHAPES (small, for the finite differences) has B == inter_channels
# and H == W, where a reshape that swaps them is the identity and no comparison could see it.
ORACLE_SHAPES = {1: (3, 4, 10), 2: (3, 4, 6, 8), 3: (3, 4, 5, 6, 8)}


def _configs():
    """Every mode x sub_sample x bn_layer x pool x scale (the pool with sub_sample, scale only where it applies)."""
    for mode, sub, bn, pool in itertools.product(MODES, (True, False), (True, False), ("after", "before")):
        if not sub and pool != "after":  # nothing is pooled: refused, naming both
            continue
        for scale in ((False, True) if mode in SOFTMAX_MODES else (False,)):
            yield dict(mode=mode, sub_sample=sub, bn_layer=bn, pool=pool, scale=scale)


CONFIGS = list(_configs())
CONFIG_IDS = ["-".join(f"{k}={v}" for k, v in c.items()) for c in CONFIGS]


def _margins_ok(block, x):
    """No pooled window within 1e-4 of a tie and no concatenation pre-activation within 1e-4 of 0."""
    from nlref.nn import functional as F

    checks = []
    keys = x
    if block.sub_sample and block.pool == "before":
        checks.append(keys)
        keys, _ = F.maxpool_forward(x, block.kernel)
    for name in ("phi", "g"):
        if name == "phi" and block.mode == "gaussian":
            h = keys
        else:
            h, _ = F.conv1x1_forward(keys, block.params[f"{name}.weight"], block.params[f"{name}.bias"])
        if block.sub_sample and block.pool == "after":
            checks.append(h)
    for h in checks:
        host = B.to_numpy(h)
        w = np.sort(np.stack([host[i] for i in F._window_samples(host.shape, block.kernel)], axis=-1), axis=-1)
        if np.min(w[..., -1] - w[..., -2]) < 1e-4:
            return False
    if block.mode == "concatenation":
        theta, _ = F.conv1x1_forward(x, block.params["theta.weight"], block.params["theta.bias"])
        phi = F.conv1x1_forward(keys, block.params["phi.weight"], block.params["phi.bias"])[0]
        if block.sub_sample and block.pool == "after":
            phi, _ = F.maxpool_forward(phi, block.kernel)
        d = block.inter_channels
        wf = B.to_numpy(block.params["w_f"])
        a = np.einsum("c,bc...->b...", wf[:d], B.to_numpy(theta)).reshape(x.shape[0], -1)
        b = np.einsum("c,bc...->b...", wf[d:], B.to_numpy(phi)).reshape(x.shape[0], -1)
        if np.abs(a[:, :, None] + b[:, None, :]).min() < 1e-4:
            return False
    return True


def _random_block(xp, dims, config, *, dtype="float64"):
    """A block with every parameter and buffer random (gamma != 0) and an input away from kinks."""
    return random_block(xp, SHAPES[dims], _margins_ok, dtype=dtype, **config)


# --------------------------------------------------------------------------- gradient checks
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_block_gradcheck(xp_cpu, dims, config):
    """Centred differences on NumPy; on array-api-strict (10x slower per call) random directions."""
    block, x = _random_block(xp_cpu, dims, config)
    method = "centred" if B.is_numpy(block.xp) else "random"
    result = layer_gradcheck(block, x, method=method, directions=3)
    assert result.passed, str(result)
    assert set(result.errors) == {"x"} | set(block.params)


def test_block_gradcheck_eval_mode_and_random_directions(xp_cpu):
    block, x = _random_block(xp_cpu, 2, dict(mode="embedded_gaussian"))
    block.eval()
    assert layer_gradcheck(block, x).passed
    assert layer_gradcheck(block, x, method="random", directions=2).passed


# --------------------------------------------------------------------------- PyTorch oracle
try:
    import torch

    from tests.nn.torch_oracle import TorchNonLocal, load_nlref_params, nlref_grads
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch (the optional oracle) is not installed")


def _oracle_for(block):
    module = TorchNonLocal(block.in_channels, mode=block.mode, inter=block.inter_channels, dims=block.dims,
                           sub_sample=block.sub_sample, bn_layer=block.bn_layer, scale=block.scale,
                           pool=block.pool).double()
    conv = load_nlref_params(module, block.state_dict(), block.state_dict())
    return module, conv


@needs_torch
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_block_matches_torch_oracle(xp_cpu, dims, config):
    for training in (True, False):  # no finite differences here: any seed will do, kinks or not
        block, x = random_block(xp_cpu, ORACLE_SHAPES[dims], lambda *_: True, **config)
        module, conv = _oracle_for(block)
        block.train() if training else block.eval()
        module.train(training)
        z = block.forward(x)
        dz_host = np.random.default_rng(5).standard_normal(ORACLE_SHAPES[dims])
        dx = block.backward(B.asarray(dz_host, like=x))

        tx = torch.tensor(B.to_numpy(x), requires_grad=True)
        tz = module(tx)
        (tz * torch.from_numpy(dz_host)).sum().backward()
        np.testing.assert_allclose(B.to_numpy(z), tz.detach().numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(B.to_numpy(dx), tx.grad.numpy(), rtol=1e-10, atol=1e-10)
        theirs = nlref_grads(module, conv)
        assert set(theirs) == set(block.grads)
        for k, v in theirs.items():
            np.testing.assert_allclose(B.to_numpy(block.grads[k]), v, rtol=1e-10, atol=1e-10, err_msg=k)
        if block.bn_layer:
            for k in ("running_mean", "running_var"):
                np.testing.assert_allclose(B.to_numpy(block.buffers[f"bn.{k}"]),
                                           getattr(module.W[1], k).numpy(), rtol=1e-12, atol=1e-14)


@needs_torch
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bn_layer", [True, False])
@pytest.mark.parametrize("sub_sample", [True, False])
def test_alexhex7_layout_round_trip(mode, bn_layer, sub_sample):
    """Our export loads into a module with the port's layout (strict keys), and its weights load back."""
    block, x = _random_block(np, 3, dict(mode=mode, bn_layer=bn_layer, sub_sample=sub_sample))
    block.forward(x)  # one training step: running stats and the batch counter move
    module = TorchNonLocal(4, mode=mode, inter=2, dims=3, sub_sample=sub_sample, bn_layer=bn_layer).double()
    exported = block.state_dict(layout="alexhex7")
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in exported.items()}, strict=True)
    block.eval()
    module.eval()
    np.testing.assert_allclose(block.forward(x), module(torch.from_numpy(x)).detach().numpy(), rtol=1e-12, atol=1e-12)

    fresh = TorchNonLocal(4, mode=mode, inter=2, dims=3, sub_sample=sub_sample, bn_layer=bn_layer).double()
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    fresh.eval()
    other = NonLocalBlock(4, mode=mode, dims=3, sub_sample=sub_sample, bn_layer=bn_layer, dtype="float64").eval()
    other.load_state_dict(fresh.state_dict())  # torch tensors, the port's keys: recognised automatically
    np.testing.assert_allclose(other.forward(x), fresh(torch.from_numpy(x)).detach().numpy(), rtol=1e-12, atol=1e-12)
    if bn_layer:
        assert other.num_batches_tracked == 0 and exported["W.1.num_batches_tracked"] == 1


def test_alexhex7_keys_documented_example():
    block = NonLocalBlock(8, dims=3, mode="concatenation")
    keys = {k: v.shape for k, v in block.state_dict(layout="alexhex7").items()}
    assert keys == {
        "g.0.weight": (4, 8, 1, 1, 1), "g.0.bias": (4,), "theta.weight": (4, 8, 1, 1, 1), "theta.bias": (4,),
        "phi.0.weight": (4, 8, 1, 1, 1), "phi.0.bias": (4,), "concat_project.0.weight": (1, 8, 1, 1),
        "W.0.weight": (8, 4, 1, 1, 1), "W.0.bias": (8,), "W.1.weight": (8,), "W.1.bias": (8,),
        "W.1.running_mean": (8,), "W.1.running_var": (8,), "W.1.num_batches_tracked": (),
    }


# --------------------------------------------------------------------------- properties
@pytest.mark.parametrize("bn_layer", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_identity_at_start(xp, device, mode, bn_layer):
    block = NonLocalBlock(4, mode=mode, dims=2, bn_layer=bn_layer, dtype="float64", xp=xp, device=device)
    x = B.asarray(np.random.default_rng(0).standard_normal((2, 4, 6, 6)), xp=xp, device=device)
    for training in (True, False):
        block.train() if training else block.eval()
        z = block.forward(x)
        assert_same_library(z, x)
        np.testing.assert_array_equal(B.to_numpy(z), B.to_numpy(x))
        dx = block.backward(B.asarray(np.random.default_rng(1).standard_normal((2, 4, 6, 6)), like=x))
        np.testing.assert_array_equal(B.to_numpy(dx), np.random.default_rng(1).standard_normal((2, 4, 6, 6)))
        for name, grad in block.grads.items():
            if name.split(".")[0] in ("theta", "phi", "g", "w_f"):
                assert np.all(B.to_numpy(grad) == 0), name
        learning = ["bn.gamma"] if bn_layer else ["W_z.weight"]
        assert all(np.any(B.to_numpy(block.grads[k]) != 0) for k in learning)


@pytest.mark.parametrize("mode", MODES)
def test_permutation_equivariance_without_subsampling(xp_cpu, mode):
    block, x = _random_block(xp_cpu, 2, dict(mode=mode, sub_sample=False))
    perm = np.random.default_rng(2).permutation(16)
    host = B.to_numpy(x)
    shuffled = host.reshape(2, 4, 16)[:, :, perm].reshape(host.shape)
    z = B.to_numpy(block.forward(x)).reshape(2, 4, 16)
    z_perm = B.to_numpy(block.forward(B.asarray(shuffled, like=x))).reshape(2, 4, 16)
    np.testing.assert_allclose(z_perm, z[:, :, perm], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", SOFTMAX_MODES)
def test_huge_inputs_stay_finite(xp_cpu, mode):
    block, x = _random_block(xp_cpu, 2, dict(mode=mode))
    x = x * 1e4
    z = block.forward(x)
    dx = block.backward(B.asarray(np.ones(tuple(x.shape)), like=x))
    assert np.all(np.isfinite(B.to_numpy(z))) and np.all(np.isfinite(B.to_numpy(dx)))
    assert all(np.all(np.isfinite(B.to_numpy(g))) for g in block.grads.values())


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("mode", MODES)
def test_chunked_block_equals_full(xp_cpu, mode, dtype, tol):
    full, x = _random_block(xp_cpu, 3, dict(mode=mode), dtype=dtype)
    chunked = NonLocalBlock(4, mode=mode, dims=3, dtype=dtype, chunk_size=3, xp=xp_cpu)
    chunked.params, chunked.buffers = dict(full.params), dict(full.buffers)
    dz = B.asarray(np.random.default_rng(4).standard_normal(SHAPES[3]), like=x, dtype=x.dtype)
    z_full, a_full = full.forward(x, return_attention=True)
    z_chunk, a_chunk = chunked.forward(x, return_attention=True)
    np.testing.assert_allclose(B.to_numpy(z_chunk), B.to_numpy(z_full), rtol=tol, atol=tol)
    np.testing.assert_allclose(B.to_numpy(a_chunk), B.to_numpy(a_full), rtol=tol, atol=tol)
    pairs = [(full.backward(dz), chunked.backward(dz))] + [(full.grads[k], chunked.grads[k]) for k in full.grads]
    pairs = [(B.to_numpy(f), B.to_numpy(c)) for f, c in pairs]
    biggest = max(np.linalg.norm(f) for f, _ in pairs)
    for f, c in pairs:  # gradients that are zero in exact arithmetic are compared on the scale of the rest
        assert np.linalg.norm(c - f) <= tol * max(np.linalg.norm(f), 0.1 * biggest)


@pytest.mark.parametrize("dims,sub,keys", [(1, True, 3), (2, True, 4), (3, True, 8), (2, False, 16)])
def test_attention_map_shape(dims, sub, keys):
    shape = {1: (2, 4, 6), 2: (2, 4, 4, 4), 3: (2, 4, 2, 4, 4)}[dims]
    block = NonLocalBlock(4, dims=dims, sub_sample=sub, dtype="float64")
    z, a = block.forward(np.random.default_rng(0).standard_normal(shape), return_attention=True)
    assert a.shape == (2, int(np.prod(shape[2:])), keys)
    np.testing.assert_allclose(a.sum(axis=2), 1.0, rtol=1e-12)


def test_state_dict_round_trip_and_library(xp, device):
    block = NonLocalBlock(6, mode="concatenation", dims=1, dtype="float64", seed=3, xp=xp, device=device)
    state = block.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    other = NonLocalBlock(6, mode="concatenation", dims=1, dtype="float64", seed=99, xp=xp,
                          device=device).load_state_dict(state)
    for k, v in block.params.items():
        assert_same_library(other.params[k], v)
        np.testing.assert_array_equal(B.to_numpy(other.params[k]), B.to_numpy(v))
    state["g.weight"][0, 0] += 1  # a copy: the block is untouched
    assert B.to_numpy(block.params["g.weight"])[0, 0] != state["g.weight"][0, 0]


def test_top_level_exports():
    """The top-level names are the objects the suite tests under nlref.nn, not copies or wrappers."""
    checks = importlib.import_module("nlref.nn.gradcheck")  # the module (nlref.nn.gradcheck is the function)
    assert nlref.NonLocalBlock is NonLocalBlock
    assert nlref.gradcheck is checks.gradcheck and nlref.layer_gradcheck is checks.layer_gradcheck


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="cosine"), "mode must be one of"),
    (dict(pool="middle"), "pool must be 'after', 'before' or 'flattened'"),
    (dict(inter_channels=0), "inter_channels must be an int >= 1"),
    (dict(dims=4), "dims must be 1, 2 or 3"),
    (dict(chunk_size=0), "chunk_size must be an int >= 1"),
    (dict(mode="dot_product", scale=True), "scale applies to the softmax modes .* not mode 'dot_product'"),
    (dict(dtype="float16"), "dtype must be 'float32' or 'float64'"),
    (dict(sub_sample="yes"), "sub_sample must be True or False"),
    (dict(scale=-1.0), "scale must be True, False or a positive finite number"),
    (dict(scale="yes"), "scale must be True, False or a positive finite number"),
    (dict(mode="concatenation", scale=0.5), "scale 0.5 applies to the softmax modes"),
    (dict(pool_kernel=(2, 2, 2)), r"pool_kernel must be an int or a tuple of 2 ints"),
    (dict(pool_stride=(0, 1)), "pool_stride must be an int >= 1"),
    (dict(sub_sample=False, pool_kernel=2), "need sub_sample=True"),
    (dict(W_z_bias=0), "W_z_bias must be True or False"),
    (dict(bn_eps=0.0), "bn_eps must be positive"),
    (dict(bn_momentum=1.5), r"bn_momentum must be a number in \[0, 1\]"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NonLocalBlock(4, **kwargs)


@pytest.mark.parametrize("pool", ["before", "flattened"])
def test_a_pool_placement_without_subsampling_is_refused(pool):
    """NonLocalBlock(4, sub_sample=False, pool="before") was a block that pooled nothing, its repr saying
    pool='before' (and the Caffe2 placement for the layouts' checks); now an error naming both arguments.
    pool="after" is what a block without subsampling says, so it stays accepted."""
    with pytest.raises(ValueError, match=f"pool '{pool}' places the subsampling, and sub_sample turns it off: "
                                         "leave one of them out"):
        NonLocalBlock(4, sub_sample=False, pool=pool)
    assert NonLocalBlock(4, sub_sample=False, pool="after").pool == NonLocalBlock(4, sub_sample=False).pool == "after"


def test_constructor_errors_of_channels_and_library():
    with pytest.raises(ValueError, match="in_channels must be an int >= 1"):
        NonLocalBlock(0)
    with pytest.raises(TypeError, match="xp must be an array library module"):
        NonLocalBlock(4, xp="numpy")


def test_forward_backward_errors():
    import array_api_strict

    block = NonLocalBlock(4, dims=2)
    with pytest.raises(RuntimeError, match="backward\\(\\) called before forward\\(\\)"):
        block.backward(np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="x has 3 channels .* in_channels=4"):
        block.forward(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\) for dims=2"):
        block.forward(np.zeros((1, 4, 4), np.float32))
    with pytest.raises(TypeError, match="x has dtype float64 but the block's parameters are float32"):
        block.forward(np.zeros((1, 4, 4, 4)))
    with pytest.raises(TypeError, match="x comes from array_api_strict"):
        block.forward(array_api_strict.zeros((1, 4, 4, 4), dtype=array_api_strict.float32))
    with pytest.raises(TypeError):
        block.forward([[1.0]])
    with pytest.raises(ValueError, match="smaller than the sub-sampling kernel"):
        block.forward(np.zeros((2, 4, 1, 4), np.float32))
    z = block.forward(np.ones((2, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="dz must have the shape of z"):
        block.backward(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(TypeError, match="dz must be a float32 array of the block's library"):
        block.backward(np.zeros((2, 4, 4, 4)))
    block.backward(np.zeros_like(z))
    with pytest.raises(RuntimeError, match="or twice"):
        block.backward(np.zeros_like(z))


def test_nlref_layout_keeps_the_batch_counter():
    """nlref's own layout left BN's num_batches_tracked out, unlike PyTorch's state_dict() and every peer layout:
    a round trip through it reset the counter to 0, and a state with ``bn.num_batches_tracked`` was refused as
    fitting no layout. Without the key the block keeps its own counter, as a PyTorch BatchNorm does."""
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 4))
    block = NonLocalBlock(4, dims=2, dtype="float64", seed=1)
    for _ in range(3):
        block.forward(x)
    state = block.state_dict()
    assert state["bn.num_batches_tracked"].dtype == np.int64 and state["bn.num_batches_tracked"].shape == ()
    assert int(state["bn.num_batches_tracked"]) == 3
    other = NonLocalBlock(4, dims=2, dtype="float64", seed=2).load_state_dict(state)
    assert other.num_batches_tracked == 3 and other.loaded_layout == "nlref"
    assert NonLocalBlock(4, dims=2, dtype="float64").load_state_dict(state, layout="nlref").num_batches_tracked == 3
    other.num_batches_tracked = 7
    without = {k: v for k, v in state.items() if k != "bn.num_batches_tracked"}
    assert other.load_state_dict(without).num_batches_tracked == 7
    with pytest.raises(ValueError, match=r"state\['bn.num_batches_tracked'\] must be a whole number >= 0"):
        other.load_state_dict(dict(state, **{"bn.num_batches_tracked": np.array(-1)}))
    assert "bn.num_batches_tracked" not in NonLocalBlock(4, dims=2, bn_layer=False).state_dict()


def test_load_state_dict_errors_leave_block_intact():
    block = NonLocalBlock(4, dims=2, seed=1)
    before = block.state_dict()
    bad = dict(before)
    bad.pop("theta.weight")
    bad["extra"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"closest is 'nlref', with unmatched keys \['extra'\] and missing keys "
                                         r"\['theta.weight'\]"):
        block.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"unmatched keys \['extra'\], missing keys \['theta.weight'\]"):
        block.load_state_dict(bad, layout="nlref")
    wrong = dict(before, **{"g.weight": np.zeros((3, 4)), "bn.gamma": np.ones(4) * 5})
    with pytest.raises(ValueError, match=r"state\['g.weight'\] has shape \(3, 4\), expected \(2, 4\)"):
        block.load_state_dict(wrong)
    with pytest.raises(ValueError, match="NaN"):
        block.load_state_dict(dict(before, **{"phi.bias": np.array([np.nan, 0.0])}))
    after = block.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing half-loaded
    with pytest.raises(ValueError, match="layout must be"):
        block.load_state_dict(before, layout="caffe2")
    with pytest.raises(ValueError, match="alexhex7 layout cannot express .*pool='before'"):
        NonLocalBlock(4, pool="before").state_dict(layout="alexhex7")



@pytest.mark.parametrize("key, value, error, message", [
    ("W.1.num_batches_tracked", np.array([1, 2]), ValueError, "whole number >= 0 \\(one value\\)"),
    ("W.1.num_batches_tracked", -5, ValueError, "whole number >= 0; got -5"),
    ("W.1.num_batches_tracked", 2.7, ValueError, "whole number >= 0; got 2.7"),
    ("W.1.num_batches_tracked", np.nan, ValueError, "whole number >= 0"),
    ("W.1.num_batches_tracked", "3", TypeError, "whole number >= 0; got str"),
    ("phi.0.bias", np.array([1e300, 0.0]), ValueError, "non-finite values \\(NaN or infinite values in float32\\)"),
    ("phi.0.bias", np.array([1j, 0.0]), TypeError, "real numbers .*complex128"),
    ("phi.0.bias", np.array([True, False]), TypeError, "real numbers .*bool"),
    ("phi.0.bias", "ab", TypeError, "array of real numbers; got str"),
    ("phi.0.bias", object(), TypeError, "array of real numbers; got object"),
    ("W.1.running_var", np.array([1.0, -0.5, 1.0, 1.0]), ValueError, "negative values; a running variance"),
])
def test_load_state_dict_checks_every_value_before_changing_anything(key, value, error, message):
    """A bad batch count (AlexHex7's layout, a PyTorch module's, carries one) used to fail after every
    weight had been replaced; 1e300 became inf in a float32 block, complex values lost their imaginary
    part, a negative running variance gave NaN in eval mode."""
    block = NonLocalBlock(4, dims=2, seed=1)
    before = block.state_dict()
    peer = block.state_dict(layout="alexhex7")
    state = {k: v + 1.0 if k.endswith("weight") else v for k, v in peer.items()}  # weights changed too
    state[key] = value
    with pytest.raises(error, match=message):
        block.load_state_dict(state)
    after = block.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before) and block.num_batches_tracked == 0
    block.load_state_dict(dict(state, **{key: peer[key]}))  # the rest of that state loads
    assert np.array_equal(block.state_dict()["theta.weight"], before["theta.weight"] + 1.0)


def test_returned_attention_survives_the_next_call():
    """On NumPy the block reuses scratch memory between calls; what it returns must not change."""
    block = NonLocalBlock(4, dims=2, dtype="float64")
    rng = np.random.default_rng(0)
    _, a1 = block.forward(rng.standard_normal((2, 4, 4, 4)), return_attention=True)
    kept = a1.copy()
    x2 = rng.standard_normal((2, 4, 4, 4))
    z2 = block.forward(x2)
    np.testing.assert_array_equal(a1, kept)
    assert block.free_scratch() is block  # the scratch dropped: the next call rebuilds it, to the same result
    np.testing.assert_array_equal(block.forward(x2), z2)


# --------------------------------------------------------------------------- options the peers need
@pytest.mark.parametrize("dims,options", [
    (1, dict(pool_kernel=3)), (2, dict(pool_kernel=(3, 3), pool_stride=(2, 1))),
    (3, dict(pool="before", pool_kernel=(2, 2, 2))), (3, dict(pool_kernel=(1, 3, 3), pool_stride=(1, 2, 2))),
    (2, dict(W_z_bias=False)), (2, dict(bn_eps=1e-2, bn_momentum=0.3)), (1, dict(scale=0.37)),
    (2, dict(mode="gaussian", scale=0.2, pool="before", pool_kernel=(1, 2), W_z_bias=False)),
])
def test_peer_options_gradcheck(dims, options):
    config = dict(dict(mode="embedded_gaussian"), **options)
    block, x = _random_block(np, dims, config)
    if config.get("pool_kernel") is not None:  # a larger input, so that the pool has room
        x = np.random.default_rng(0).standard_normal(SHAPES[dims][:2] + (7,) * dims)
    result = layer_gradcheck(block, x, method="centred", directions=3)
    assert result.passed, str(result)
    assert ("W_z.bias" in block.params) == config.get("W_z_bias", True)


@needs_torch
@pytest.mark.parametrize("dims,kernel,stride", [(1, (3,), (2,)), (2, (3, 2), (1, 2)), (3, (1, 3, 3), (1, 2, 2)),
                                                (3, (2, 2, 2), (2, 2, 2)),
                                                # stride == kernel takes the windowed pool: non-square kernels
                                                (2, (3, 2), (3, 2)), (3, (1, 2, 3), (1, 2, 3))])
@pytest.mark.parametrize("engine", ["auto", "numpy"])  # the windowed pool runs in Numba where it is installed
def test_pool_kernel_and_stride_match_torch(dims, kernel, stride, engine, monkeypatch):
    monkeypatch.setenv("NLREF_NN_ENGINE", engine)
    block = NonLocalBlock(4, dims=dims, pool_kernel=kernel, pool_stride=stride, dtype="float64")
    x = np.random.default_rng(1).standard_normal((2, 4) + (7,) * dims)
    out, cache = block._pool(x)
    tx = torch.tensor(x, requires_grad=True)
    tout = getattr(torch.nn.functional, f"max_pool{dims}d")(tx, kernel, stride)
    np.testing.assert_array_equal(out, tout.detach().numpy())
    dout = np.random.default_rng(2).standard_normal(out.shape)
    tout.backward(torch.from_numpy(dout))
    np.testing.assert_allclose(block._unpool(dout, cache), tx.grad.numpy(), rtol=1e-14, atol=1e-15)


def test_defaults_unchanged_and_scale_forms_agree():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 4))
    dz = rng.standard_normal(x.shape)
    plain = NonLocalBlock(4, dtype="float64", seed=3)
    assert (plain.scale, plain.kernel, plain.stride, plain.W_z_bias, plain.bn_eps, plain.bn_momentum) == (
        False, (2, 2), (2, 2), True, 1e-5, 0.1)
    explicit = NonLocalBlock(4, dtype="float64", seed=3, scale=False, pool_kernel=(2, 2), pool_stride=2,
                             W_z_bias=True, bn_eps=1e-5, bn_momentum=0.1)
    for blk in (plain, explicit):
        blk.params["bn.gamma"] = np.ones(4)
    np.testing.assert_array_equal(plain.forward(x), explicit.forward(x))
    np.testing.assert_array_equal(plain.backward(dz), explicit.backward(dz))
    a = NonLocalBlock(4, dtype="float64", seed=3, scale=True)
    b = NonLocalBlock(4, dtype="float64", seed=3, scale=1 / math.sqrt(2))  # inter_channels = 2
    assert a.logit_scale == b.logit_scale == 1 / math.sqrt(2)
    a.params["bn.gamma"] = b.params["bn.gamma"] = np.ones(4)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    no_bias = NonLocalBlock(4, dtype="float64", seed=3, W_z_bias=False)
    assert np.array_equal(no_bias.params["W_z.weight"], plain.params["W_z.weight"]) and "W_z.bias" not in no_bias.grads
    assert "bn_eps=0.01" in repr(NonLocalBlock(4, bn_eps=0.01)) and "W_z_bias=False" in repr(no_bias)


# --------------------------------------------------------------------------- load_state_dict copies
def _sources():
    yield "numpy", lambda block: {k: v.copy() for k, v in block.state_dict().items()}
    if torch is not None:
        yield "torch", lambda block: {k: torch.from_numpy(v.copy()) for k, v in block.state_dict().items()}


@pytest.mark.parametrize("xp_name", ["numpy", "torch"])
@pytest.mark.parametrize("source", [s for s, _ in _sources()])
def test_load_state_dict_copies_both_directions(xp_name, source):
    """Changing the source after loading leaves the block alone, and updating the block in place (as an
    optimiser does) leaves the source alone: for every same-dtype source, where sharing memory was possible."""
    if xp_name == "torch" and torch is None:
        pytest.skip("PyTorch not installed")
    xp = importlib.import_module(xp_name)
    make = dict(_sources())[source]
    origin = NonLocalBlock(4, dims=2, dtype="float64", seed=1)
    for layout in ("nlref", "alexhex7"):
        state = make(origin) if layout == "nlref" else {
            k: (torch.from_numpy(v) if source == "torch" else v) for k, v in origin.state_dict(layout).items()}
        kept = {k: np.array(B.to_numpy(v)) for k, v in state.items()}
        block = NonLocalBlock(4, dims=2, dtype="float64", seed=2, xp=xp).load_state_dict(state, layout=layout)
        for v in state.values():  # the source changes ...
            v[...] = 7
        after = block.state_dict(layout)
        assert all(np.array_equal(after[k], kept[k]) for k in kept), "the block changed with its source"
        for k, v in block.params.items():  # ... and the block is trained in place
            v += 1.0
        assert all((B.to_numpy(state[k]) == 7).all() for k in state), "training the block changed the source"
