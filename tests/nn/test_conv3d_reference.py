"""conv3d_reference, the loop definition of the 3-D convolution, holds the fast path (the engine):
forward and gradients equal on every path the engine takes (im2col, paired columns, the dense
per-frame product, the flipped stride-1 backward, kept or rebuilt columns), for the network's
kernels, strides and paddings and for odd ones; both equal PyTorch's conv3d and its gradients."""

import math

import numpy as np
import pytest

import nlref.backend as B
from nlref.nn import functional as F
from nlref.nn.engine import conv as EC
from tests.helpers import assert_gradcheck, assert_same_library

try:
    import torch
except ImportError:  # the oracle is optional
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch (the optional oracle) is not installed")

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# name: (x shape (B, C, T, H, W), w shape (O, C, kt, kh, kw), stride, padding)
CASES = {
    # the networks' convolutions (nlref.nn.models), at small sizes
    "stem-1x3x3-s122": ((2, 1, 3, 8, 8), (4, 1, 1, 3, 3), (1, 2, 2), (0, 1, 1)),
    "res-1x3x3": ((2, 4, 2, 8, 8), (4, 4, 1, 3, 3), 1, (0, 1, 1)),
    "res-1x3x3-s122": ((2, 4, 2, 8, 8), (6, 4, 1, 3, 3), (1, 2, 2), (0, 1, 1)),
    "res-1x3x3-2x2maps": ((2, 6, 2, 2, 2), (5, 6, 1, 3, 3), 1, (0, 1, 1)),
    "i3d-3x3x3": ((2, 3, 4, 4, 6), (4, 3, 3, 3, 3), 1, 1),
    "i3d-3x1x1": ((2, 3, 4, 4, 4), (4, 3, 3, 1, 1), 1, (1, 0, 0)),
    "shortcut-1x1x1-s122": ((2, 4, 2, 8, 8), (6, 4, 1, 1, 1), (1, 2, 2), 0),
    "pointwise-1x1x1": ((2, 4, 2, 4, 4), (3, 4, 1, 1, 1), 1, 0),
    # odd ones
    "even-2x2x2": ((2, 3, 4, 5, 6), (4, 3, 2, 2, 2), 1, 0),
    "even-1x2x4-pad": ((2, 3, 2, 5, 8), (2, 3, 1, 2, 4), 1, (0, 1, 2)),
    "stride>kernel": ((2, 3, 5, 7, 8), (4, 3, 2, 2, 2), 3, 0),
    "stride>kernel-pad": ((1, 2, 4, 9, 9), (3, 2, 1, 2, 1), (1, 3, 4), (0, 1, 0)),
    "padding>kernel-1": ((2, 3, 2, 4, 4), (4, 3, 1, 3, 3), 1, (0, 3, 2)),
    "padding>kernel-1-strided": ((2, 2, 3, 5, 4), (3, 2, 2, 2, 2), (2, 1, 2), 2),
    "one-frame-3x3x3": ((2, 3, 1, 4, 6), (4, 3, 3, 3, 3), 1, 1),
    "one-frame-1x3x3": ((3, 2, 1, 6, 6), (2, 2, 1, 3, 3), (1, 2, 2), (0, 1, 1)),
}
RTOL = {"float64": 1e-12, "float32": 1e-5}


def _inputs(xp, case, dtype, bias=True, seed=0):
    xs, ws, _, _ = CASES[case]
    rng = np.random.default_rng(seed)
    host = {"x": rng.standard_normal(xs), "w": rng.standard_normal(ws), "b": rng.standard_normal(ws[0])}
    if not bias:
        del host["b"]
    return {k: B.asarray(v.astype(dtype), xp=xp) for k, v in host.items()}, rng


def _close(a, b, dtype, what):
    a, b = B.to_numpy(a), B.to_numpy(b)
    scale = max(1.0, float(np.max(np.abs(b))))  # sums of many terms of either sign: relative to the largest
    np.testing.assert_allclose(a, b, rtol=RTOL[dtype], atol=RTOL[dtype] * scale, err_msg=what)


def _paths(case):
    """The engine's paths that apply to ``case`` (forced by its knobs), the shipped setting first."""
    xs, ws, stride, padding = CASES[case]
    paths = {"as shipped": {}, "im2col": {"DENSE_MAX_RATIO": 0, "CONV_PAIR_CHANNELS": 0},
             "im2col, columns rebuilt in chunks": {"DENSE_MAX_RATIO": 0, "CONV_PAIR_CHANNELS": 0,
                                                   "CONV_KEEP_BYTES": 0, "CONV_CHUNK_BYTES": 1},
             "paired": {"DENSE_MAX_RATIO": 0, "CONV_PAIR_CHANNELS": math.inf}}
    if ws[2] == 1:
        paths["dense"] = {"DENSE_MAX_RATIO": math.inf}
    return paths


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_equals_reference(monkeypatch, xp_cpu, case, dtype):
    _, _, stride, padding = CASES[case]
    inputs, rng = _inputs(xp_cpu, case, dtype)
    ref, ref_cache = F.conv3d_reference(**inputs, stride=stride, padding=padding)
    dout = B.asarray(rng.standard_normal(tuple(ref.shape)).astype(dtype), xp=xp_cpu)
    ref_grads = F.conv3d_reference_backward(dout, ref_cache)
    assert_same_library(ref, inputs["x"])
    for path, knobs in _paths(case).items():
        for name, value in knobs.items():
            monkeypatch.setattr(EC, name, value)
        out, cache = F.conv3d_forward(**inputs, stride=stride, padding=padding)
        assert tuple(out.shape) == tuple(ref.shape) and B.dtype_name(out.dtype) == dtype
        _close(out, ref, dtype, f"{path}: out")
        for name, g, r in zip(("dx", "dw", "db"), F.conv3d_backward(dout, cache), ref_grads):
            _close(g, r, dtype, f"{path}: {name}")
        monkeypatch.undo()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", ["res-1x3x3-s122", "even-1x2x4-pad", "stride>kernel-pad", "padding>kernel-1",
                                  "one-frame-3x3x3"])
def test_reference_gradcheck(xp_cpu, case, bias):
    """The reference's own backward pass is the derivative of its forward pass (float64, centred
    differences on NumPy, random directions on array-api-strict)."""
    _, _, stride, padding = CASES[case]
    inputs, _ = _inputs(xp_cpu, case, "float64", bias=bias)
    out, cache = F.conv3d_reference(**inputs, stride=stride, padding=padding)  # the cache holds only the inputs
    assert (F.conv3d_reference_backward(out, cache)[2] is None) == (not bias)
    assert_gradcheck(lambda **kw: F.conv3d_reference(**kw, stride=stride, padding=padding)[0],
                     lambda dout: dict(zip(("x", "w", "b"), F.conv3d_reference_backward(dout, cache))),
                     inputs, method="centred" if xp_cpu is np else "random")


@needs_torch
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_and_fast_path_match_torch(xp_cpu, case, dtype):
    """Both forms against torch.nn.functional.conv3d and its autograd gradients."""
    _, _, stride, padding = CASES[case]
    inputs, rng = _inputs(xp_cpu, case, dtype)
    host = {k: torch.tensor(B.to_numpy(v), requires_grad=True) for k, v in inputs.items()}
    expected = torch.nn.functional.conv3d(host["x"], host["w"], host["b"], stride=stride, padding=padding)
    dout = rng.standard_normal(tuple(expected.shape)).astype(dtype)
    expected.backward(torch.tensor(dout))
    for name, (forward, backward) in {"reference": (F.conv3d_reference, F.conv3d_reference_backward),
                                      "fast": (F.conv3d_forward, F.conv3d_backward)}.items():
        out, cache = forward(**inputs, stride=stride, padding=padding)
        _close(out, expected.detach().numpy(), dtype, f"{name}: out")
        grads = backward(B.asarray(dout, xp=xp_cpu), cache)
        for g, key in zip(grads, ("x", "w", "b")):
            _close(g, host[key].grad.numpy(), dtype, f"{name}: d{key}")


@pytest.mark.parametrize("kernel, stride, padding", [
    ((1, 3, 3), (1, 2, 2), (0, 1, 1)), ((3, 3, 3), (1, 2, 2), (1, 1, 1)), ((1, 1, 1), (1, 2, 2), (0, 0, 0)),
    ((2, 2, 4), (2, 3, 3), (0, 2, 3)), ((1, 1, 5), (1, 1, 4), (0, 0, 1)), ((3, 1, 2), (2, 2, 1), (1, 1, 1)),
    ((1, 3, 3), (1, 1, 1), (0, 1, 1)), ((2, 3, 2), (1, 2, 3), (1, 0, 0))])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_col2im_grouped_is_the_offset_loop_to_the_bit(kernel, stride, padding, dtype):
    """The engine's col2im adds the taps along W a group of ``stride_w`` at a time; every position
    must still get its taps in increasing order from zero, so the result equals one add per
    offset (written out here) to the bit: W not a multiple of the stride, stride above the
    kernel, kernels of 1 to 5 taps along W."""
    rng = np.random.default_rng(5)
    spatial, batch, c = (5, 7, 9), 2, 3
    out_size = tuple((n + 2 * p - k) // s + 1 for n, p, k, s in zip(spatial, padding, kernel, stride))
    dcols = rng.standard_normal((batch * math.prod(out_size), math.prod(kernel) * c)).astype(dtype)
    taps = dcols.reshape((batch,) + out_size + (math.prod(kernel), c))
    padded = tuple(n + 2 * p for n, p in zip(spatial, padding))
    expected = np.zeros((batch,) + padded + (c,), dtype=dtype)
    for i, offset in enumerate(np.ndindex(*kernel)):
        index = (slice(None),) + tuple(slice(o, o + s * (n - 1) + 1, s)
                                       for o, s, n in zip(offset, stride, out_size))
        expected[index] += taps[..., i, :]
    expected = expected[(slice(None),) + tuple(slice(p, p + n) for p, n in zip(padding, spatial))]
    got = EC._col2im(np, dcols, spatial, kernel, stride, padding, out_size)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def test_reference_is_the_loop_definition():
    """The reference against the formula written out element by element, on a tiny case with
    stride and padding (an independent check that needs no other library)."""
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((1, 2, 3, 4, 3)), rng.standard_normal((2, 2, 2, 3, 2)), rng.standard_normal(2)
    stride, padding = (2, 1, 2), (1, 1, 0)
    out, _ = F.conv3d_reference(x, w, b, stride=stride, padding=padding)
    xpad = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in padding])
    expected = np.zeros(out.shape)
    for o, t, h, wo in np.ndindex(out.shape[1:]):
        window = xpad[0, :, stride[0] * t:stride[0] * t + 2, stride[1] * h:stride[1] * h + 3,
                      stride[2] * wo:stride[2] * wo + 2]
        expected[0, o, t, h, wo] = b[o] + np.sum(w[o] * window)
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-13)


def test_reference_errors():
    x, w = np.zeros((1, 2, 3, 3, 3)), np.zeros((1, 2, 3, 3, 3))
    with pytest.raises(ValueError, match="conv3d_reference: w must have shape"):
        F.conv3d_reference(x, np.zeros((1, 3, 3, 3, 3)))
    with pytest.raises(ValueError, match="stride must be a positive int"):
        F.conv3d_reference(x, w, stride=0)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        F.conv3d_reference(x[:, :, :1], w)
    with pytest.raises(TypeError, match="float32 or float64"):
        F.conv3d_reference(x.astype(np.int64), w)
