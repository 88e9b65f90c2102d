import numpy as np
import pytest

import nlref.backend as B
from tests.helpers import assert_same_library


@pytest.mark.parametrize("n", [1, 2, 3, 7])
@pytest.mark.parametrize("before,after", [(0, 0), (1, 2), (3, 3), (6, 0), (13, 20)])
def test_reflect_pad_matches_numpy_pad(xp, device, n, before, after):
    host = np.arange(n * 4, dtype=np.float64).reshape(n, 4)
    x = B.asarray(host, xp=xp, device=device)
    out = B.reflect_pad(x, [(before, after), (2, 1)])
    assert_same_library(out, x)
    np.testing.assert_array_equal(B.to_numpy(out), np.pad(host, [(before, after), (2, 1)], mode="reflect"))


def test_reflect_pad_rejects_bad_widths():
    x = np.zeros((3, 3))
    with pytest.raises(ValueError, match="widths must give"):
        B.reflect_pad(x, [(1, 1)])
    with pytest.raises(ValueError, match="non-negative"):
        B.reflect_pad(x, [(1, 1), (-1, 0)])


def test_mixing_libraries_is_a_type_error():
    import array_api_strict as xs

    a = np.zeros(3)
    b = B.asarray(np.zeros(3), xp=xs)
    with pytest.raises(TypeError, match="different libraries.*x: numpy.*y: array-api-strict"):
        B.array_namespace(a, b, names=["x", "y"])


@pytest.mark.parametrize("bad", [[1.0, 2.0], 3.0, None, "image"])
def test_non_arrays_are_a_type_error(bad):
    with pytest.raises(TypeError, match="image must be an array"):
        B.array_namespace(bad, names=["image"])


def test_normal_is_identical_on_every_backend(xp, device):
    on = B.normal((4, 5), seed=7, xp=xp, device=device)
    assert device is None or on.device == device
    a = B.to_numpy(on)
    b = B.to_numpy(B.normal((4, 5), seed=7, xp=np))
    c = B.to_numpy(B.normal((4, 5), seed=8, xp=np))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(b, c)


def test_normal_keeps_library_and_dtype(xp, device):
    like = B.asarray(np.zeros(2, dtype=np.float32), xp=xp, device=device)
    x = B.normal((3,), seed=0, like=like, dtype="float32")
    assert_same_library(x, like)
    assert "float32" in str(x.dtype)


def test_to_numpy_roundtrip(xp, device):
    host = np.arange(6.0).reshape(2, 3)
    x = B.asarray(host, xp=xp, device=device)
    back = B.to_numpy(x)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, host)


def test_asarray_needs_exactly_one_target():
    with pytest.raises(TypeError, match="exactly one"):
        B.asarray([1.0])
    with pytest.raises(TypeError, match="exactly one"):
        B.asarray([1.0], like=np.zeros(1), xp=np)


# In a fresh process: is a 16 MiB array served by mmap (glibc's default above its threshold), and is its memory
# kept in the heap once freed? (mallinfo2: glibc >= 2.33)
_HEAP_PROBE = """
import ctypes, sys
import numpy as np
import nlref.backend as B

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "retain":
    B.retain_freed_memory()
before = libc.mallinfo2().hblkhd
a = np.ones(2 << 20)
mapped = libc.mallinfo2().hblkhd - before
del a
print(mapped >> 20, libc.mallinfo2().fordblks >> 20)
"""


def test_retain_freed_memory_applies_on_glibc():
    """On glibc: a block of a few MiB comes from the heap instead of fresh mmap pages, and stays there once freed."""
    import ctypes
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    applied = B.retain_freed_memory()
    assert applied is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    assert B.retain_freed_memory() is applied  # idempotent
    if not applied or not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33: nothing applied, or no mallinfo2 to observe the heap with")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}

    def probe(how):
        done = subprocess.run([sys.executable, "-c", _HEAP_PROBE, how], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return [int(v) for v in done.stdout.split()]      # MiB mapped by the allocation, MiB free in the heap after

    if probe("default")[0] != 16:   # glibc's default serves it with mmap; the probe sees the difference
        pytest.skip("malloc here does not serve 16 MiB with mmap by default (MALLOC_MMAP_THRESHOLD_ set?)")
    mapped, kept = probe("retain")
    assert mapped == 0 and kept >= 16


def test_dtype_name_never_compares_dtypes_of_two_libraries(recwarn):
    """Issue 18: the name cache held NumPy and array-api-strict dtypes as keys of one dict, and a hash
    collision made the lookup compare them, which array-api-strict answers with a UserWarning (321 of them
    in one run of the suite)."""
    import warnings

    import array_api_strict as xs

    names = ("float32", "float64", "uint8", "uint16", "int16", "int32", "int64", "bool")
    B._DTYPE_NAMES.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in names:                                  # NumPy's first, as a training step would
            assert B.dtype_name(np.dtype(name)) == name
        for name in names:                                  # then array-api-strict's, twice (cached)
            assert B.dtype_name(getattr(xs, name)) == name
            assert B.dtype_name(getattr(xs, name)) == name
        for name in names:
            assert B.dtype_name(np.dtype(name)) == name


@pytest.mark.parametrize("make", [
    lambda seed: __import__("nlref").nn.NonLocalBlock(4, seed=seed),
    lambda seed: __import__("nlref").add_gaussian_noise(np.zeros((4, 4)), 0.1, seed=seed),
    lambda seed: __import__("nlref").nn.functional.dropout_forward(np.ones((2, 3)), 0.5, training=True, seed=seed),
])
@pytest.mark.parametrize("seed, error", [(-1, ValueError), (1.5, TypeError), ("a", TypeError)])
def test_a_bad_seed_is_named(make, seed, error):
    """NumPy's own messages ("expected non-negative integer", "SeedSequence expects int") did not say which
    argument was wrong."""
    with pytest.raises(error, match="seed must be an int"):
        make(seed)


def test_rng_gives_numpys_generator_for_the_same_seed():
    assert B.rng(7).random() == np.random.default_rng(7).random()
    g = np.random.default_rng(1)
    assert B.rng(g) is g and isinstance(B.rng(None), np.random.Generator)


# ------------------------------------------------------------------ PyTorch tensors, NumPy scalars, mixed inputs
def _requires_grad_calls(torch):
    """(the argument name in the message, a call of a public function with that argument requiring grad)."""
    import nlref
    import nlref.nn.functional as F
    from nlref.nn import nonlocal_op

    def grad(shape, dtype=torch.float64):
        return torch.rand(*shape, dtype=dtype, generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    def plain(shape):
        return torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    block = nlref.NonLocalBlock(4, dims=2, dtype="float64", seed=0, xp=torch)
    return [
        ("image", lambda: nlref.nl_means(grad((10, 12)), sigma=0.1, patch_size=3, search_size=5)),
        ("image", lambda: nlref.nl_means(grad((10, 12)), sigma=0.1, patch_size=3, search_size=5, method="naive")),
        ("image", lambda: nlref.nl_means_weights(grad((10, 12)), (4, 4), sigma=0.1, patch_size=3, search_size=5)),
        ("image", lambda: nlref.estimate_sigma(grad((10, 12)))),
        ("image", lambda: nlref.add_gaussian_noise(grad((10, 12)), 0.1, seed=0)),
        ("copies", lambda: nlref.average(grad((3, 10, 12)))),
        ("estimate", lambda: nlref.psnr(plain((10, 12)), grad((10, 12)), data_range=1.0)),
        ("w", lambda: F.conv1x1_forward(plain((2, 3, 4, 4)), grad((5, 3)))),
        ("x", lambda: F.relu_forward(grad((2, 3)))),
        ("s", lambda: F.softmax_forward(grad((2, 3)))),
        ("theta", lambda: nonlocal_op.nonlocal_forward(grad((1, 2, 6)), plain((1, 2, 6)), plain((1, 2, 6)),
                                                       mode="embedded_gaussian")),
        ("x", lambda: block.forward(grad((2, 4, 4, 4)))),
    ]


def test_a_tensor_that_requires_grad_is_refused_by_name():
    """A PyTorch tensor with requires_grad=True used to run through every function, silently recording an
    autograd graph through NL-means and the hand-written layers (and warning from deep inside, where a
    parameter was read with float()). It is refused now, by its argument's name, with the way out."""
    torch = pytest.importorskip("torch")
    for name, call in _requires_grad_calls(torch):
        with pytest.raises(TypeError, match=rf"^{name} is a PyTorch tensor with requires_grad=True.*"
                                            rf"pass {name}\.detach\(\)"):
            call()


def test_a_detached_tensor_runs_and_viz_accepts_one_that_requires_grad():
    """The way out the message gives works, and the plotting helpers (which copy to the host to draw) take
    a tensor that requires grad as it is."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nlref

    host = np.random.default_rng(0).random((10, 12))
    t = torch.tensor(host, requires_grad=True)
    out = nlref.nl_means(t.detach(), sigma=0.1, patch_size=3, search_size=5, method="naive")
    expected = nlref.nl_means(host, sigma=0.1, patch_size=3, search_size=5, method="naive")
    assert type(out) is torch.Tensor and out.dtype == torch.float64 and not out.requires_grad
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
    fig = nlref.viz.image_grid([t])
    plt.close(fig)


@pytest.mark.parametrize("scalar", [np.float64(0.25), np.float32(0.25), np.int64(3), np.float16(0.25)])
def test_numpy_scalars_are_0d_arrays(scalar):
    """numpy.float64 subclasses Python's float and was refused as "not an array", while numpy.float32
    and numpy.int64 were taken as 0-d arrays."""
    assert B.array_namespace(scalar, names=["x"]) is B.array_namespace(np.asarray(scalar))


def test_a_numpy_reduction_result_goes_back_in():
    """NumPy's full reductions return a NumPy scalar: the average of float64 copies of one sample is a
    numpy.float64, which mse and residual_variance refused ("reference must be an array")."""
    import nlref
    from nlref.averaging import residual_variance

    copies = np.array([0.5, 1.0, 2.0])                    # three float64 copies of a 0-d sample
    estimate = nlref.average(copies)                       # (0.5 + 1 + 2) / 3 = 7/6
    clean = np.asarray(1.0)
    assert nlref.mse(estimate, clean) == pytest.approx((7 / 6 - 1) ** 2, rel=1e-12)
    assert residual_variance(estimate, clean) == pytest.approx((7 / 6 - 1) ** 2, rel=1e-12)
    assert nlref.psnr(np.float64(1.0), np.float64(0.5), data_range=1.0) == pytest.approx(10 * np.log10(4))


def test_mixed_libraries_in_a_layer_are_named():
    """The functional layers named the arguments of a mixed-library call "argument 0", "argument 1"."""
    import array_api_strict as xs
    import nlref.nn.functional as F
    from nlref.nn import nonlocal_op

    x = B.asarray(np.ones((2, 3, 4, 4)), xp=xs)
    with pytest.raises(TypeError, match=r"different libraries .*\(x: array-api-strict, w: numpy\)"):
        F.conv1x1_forward(x, np.ones((5, 3)))
    with pytest.raises(TypeError, match=r"different libraries .*\(x: array-api-strict, gamma: numpy, beta: numpy\)"):
        F.batchnorm_forward(x, np.ones(3), np.zeros(3), {"mean": np.zeros(3), "var": np.ones(3)}, training=True)
    theta = B.asarray(np.ones((1, 2, 6)), xp=xs)
    with pytest.raises(TypeError, match=r"different libraries .*\(theta: array-api-strict, phi: numpy, g: numpy\)"):
        nonlocal_op.nonlocal_forward(theta, np.ones((1, 2, 6)), np.ones((1, 2, 6)), mode="dot_product")
    with pytest.raises(TypeError, match=r"different libraries .*\(dp: array-api-strict, p: numpy\)"):
        F.softmax_backward(B.asarray(np.ones((2, 3)), xp=xs), F.softmax_forward(np.ones((2, 3)))[1])


def test_bfloat16_is_not_named_float16():
    """dtype_name read PyTorch's bfloat16 as "float16" (its name ends so): a bfloat16 input and float16
    weights passed the layers' one-dtype checks and failed inside PyTorch ("expected scalar type Half but
    found BFloat16"), messages called bfloat16 float16, and normal(dtype=torch.bfloat16) gave float16."""
    torch = pytest.importorskip("torch")
    import nlref
    import nlref.nn.functional as F
    from nlref.nn import nonlocal_op

    assert B.dtype_name(torch.bfloat16) == "bfloat16"
    assert B.dtype_name(torch.float16) == "float16"
    x = torch.ones(2, 4, 3, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"arrays must share one dtype \(x: bfloat16, w: float16\)"):
        F.conv1x1_forward(x, torch.ones(5, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"arrays must share one dtype \(x: bfloat16, w: float16\)"):
        F.conv3d_forward(torch.ones(1, 2, 3, 3, 3, dtype=torch.bfloat16), torch.ones(2, 2, 1, 1, 1, dtype=torch.float16))
    half = torch.ones(1, 2, 4, dtype=torch.float16)
    with pytest.raises(TypeError, match="must share one dtype, got .*'theta': 'bfloat16', 'phi': 'float16'"):
        nonlocal_op.nonlocal_forward(torch.ones(1, 2, 4, dtype=torch.bfloat16), half, half, mode="dot_product")
    like = torch.zeros(3, dtype=torch.bfloat16)
    for dtype in (torch.bfloat16, "bfloat16"):
        samples = B.normal((4,), seed=5, like=like, dtype=dtype)
        assert samples.dtype == torch.bfloat16
        # float32 holds every bfloat16 value: the same samples rounded once, float32 -> bfloat16
        expected = torch.from_numpy(B.to_numpy(B.normal((4,), seed=5, xp=np, dtype="float32"))).bfloat16()
        assert torch.equal(samples, expected)
    with pytest.raises(TypeError, match="dtype='bfloat16' is not a dtype of"):
        B.normal((2,), seed=0, xp=np, dtype="bfloat16")
    # the noise estimate filters bfloat16 in float32, as it did: the same as the float32 copy of the values
    image = torch.from_numpy(np.random.default_rng(3).random((12, 14))).bfloat16()
    assert nlref.estimate_sigma(image) == nlref.estimate_sigma(image.float())


def _backward_cases():
    """(name, forward thunk, backward) of the layers whose backward pass keeps an array of the forward's dtype."""
    import nlref.nn.functional as F
    from nlref.nn import nonlocal_op

    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 4, 4))
    v = rng.standard_normal((2, 3, 6))
    x5 = rng.standard_normal((1, 2, 3, 4, 4))
    state = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    return [
        ("conv1x1", lambda: F.conv1x1_forward(x, rng.standard_normal((5, 3))), F.conv1x1_backward),
        ("batchnorm", lambda: F.batchnorm_forward(x, np.ones(3), np.zeros(3), dict(state), training=True),
         F.batchnorm_backward),
        ("relu", lambda: F.relu_forward(x), F.relu_backward),
        ("maxpool", lambda: F.maxpool_forward(x, (2, 2)), F.maxpool_backward),
        ("softmax", lambda: F.softmax_forward(x), F.softmax_backward),
        ("dot_pairwise", lambda: F.dot_pairwise_forward(v, v), F.dot_pairwise_backward),
        ("concat_pairwise", lambda: F.concat_pairwise_forward(v, v, rng.standard_normal(6)), F.concat_pairwise_backward),
        ("conv3d", lambda: F.conv3d_forward(x5, rng.standard_normal((3, 2, 1, 3, 3)), padding=(0, 1, 1)),
         F.conv3d_backward),
        ("conv3d_reference", lambda: F.conv3d_reference(x5, rng.standard_normal((3, 2, 1, 3, 3))),
         F.conv3d_reference_backward),
        ("dropout", lambda: F.dropout_forward(x, 0.5, training=True, seed=0), F.dropout_backward),
        ("linear", lambda: F.linear_forward(x[:, :, 0, 0], rng.standard_normal((5, 3))), F.linear_backward),
        ("layernorm", lambda: F.layernorm_forward(x, np.ones(4), np.zeros(4)), F.layernorm_backward),
        ("gelu", lambda: F.gelu_forward(x), F.gelu_backward),
        ("nonlocal", lambda: nonlocal_op.nonlocal_forward(v, v, v, mode="embedded_gaussian"),
         nonlocal_op.nonlocal_backward),
        ("nonlocal chunked", lambda: nonlocal_op.nonlocal_forward(v, v, v, mode="dot_product", chunk_size=2),
         nonlocal_op.nonlocal_backward),
    ]


_BACKWARD_NAMES = ["conv1x1", "batchnorm", "relu", "maxpool", "softmax", "dot_pairwise", "concat_pairwise", "conv3d",
                   "conv3d_reference", "dropout", "linear", "layernorm", "gelu", "nonlocal", "nonlocal chunked"]


@pytest.mark.parametrize("case", range(len(_BACKWARD_NAMES)), ids=_BACKWARD_NAMES)
def test_a_backward_pass_refuses_an_upstream_gradient_of_another_dtype_or_library(case):
    """The backward passes took a float32 upstream gradient for a float64 forward (and the reverse) and mixed
    them: relu_backward gave float32 gradients of a float64 layer, the others float64 ones of a float32 layer
    (attention_backward alone refused). A torch gradient for a NumPy forward got into the fused batch norm
    (converted to NumPy without a word). Each is now a TypeError naming the gradient, before any work."""
    torch = pytest.importorskip("torch")
    name, forward, backward = _backward_cases()[case]
    assert name == _BACKWARD_NAMES[case]
    out, cache = forward()
    out = out if isinstance(out, np.ndarray) else np.asarray(out)
    assert out.dtype == np.float64
    grad_name = "dy" if name.startswith("nonlocal") else {"softmax": "dp", "dot_pairwise": "ds",
                                                          "concat_pairwise": "df"}.get(name, "dout")
    with pytest.raises(TypeError, match=rf"{grad_name} must have the forward's dtype, float64; got float32"):
        backward(np.ones(out.shape, dtype=np.float32), cache)
    with pytest.raises(TypeError, match=rf"different libraries .*\({grad_name}: torch, "):
        backward(torch.ones(tuple(out.shape), dtype=torch.float64), cache)
    got = backward(np.ones(out.shape), cache)                         # the right one still runs
    first = got[0] if isinstance(got, tuple) else got
    assert first.dtype == np.float64


def test_nonlocal_backward_names_a_gradient_of_the_wrong_shape():
    """nonlocal_backward broadcast a dy of the wrong shape into NumPy's "operands could not be broadcast"."""
    from nlref.nn import nonlocal_op

    v = np.random.default_rng(12).standard_normal((1, 2, 5))
    _, cache = nonlocal_op.nonlocal_forward(v, v, v, mode="gaussian")
    with pytest.raises(ValueError, match=r"nonlocal_backward: dy must have the forward output's shape \(1, 2, 5\), "
                                         r"got \(1, 2, 4\)"):
        nonlocal_op.nonlocal_backward(np.ones((1, 2, 4)), cache)
    with pytest.raises(TypeError, match="dy must be an array"):
        nonlocal_op.nonlocal_backward(np.ones((1, 2, 5)).tolist(), cache)


def test_a_masked_array_is_refused_by_the_layers_too():
    """nl_means, the metrics and the block refused NumPy masked arrays, but the functional layers and the
    non-local operation took them: relu_forward returned a MaskedArray, conv1x1_forward and nonlocal_forward
    failed inside NumPy ("operands could not be broadcast together"). array_namespace refuses them now."""
    import nlref.nn.functional as F
    from nlref.nn import nonlocal_op

    masked = np.ma.masked_array(np.ones((2, 3, 4, 4)), mask=False)
    message = "is a NumPy masked array: nlref would read the values under the mask and drop the mask"
    with pytest.raises(TypeError, match="x " + message):
        F.relu_forward(masked)
    with pytest.raises(TypeError, match="w " + message):
        F.conv1x1_forward(np.ones((2, 3, 4, 4)), np.ma.masked_array(np.ones((5, 3))))
    with pytest.raises(TypeError, match="theta " + message):
        nonlocal_op.nonlocal_forward(masked[:, :, 0], masked[:, :, 0], masked[:, :, 0], mode="dot_product")
    with pytest.raises(TypeError, match="x " + message):
        B.array_namespace(np.ma.masked_array(np.zeros(3)), names=["x"])


def test_asarray_is_the_move_the_errors_advise(xp, device):
    """The errors for mixed libraries and devices say "move them ... (nlref.backend.asarray(x, like=y))", but
    asarray took host data only: an array on another device bound for NumPy (array-api-strict's device1 here;
    a CuPy array likewise) failed ("Can't convert array on the ... device to a NumPy array"), and a bfloat16
    tensor bound for any library but PyTorch failed ("Got unsupported ScalarType BFloat16"). Both move now."""
    import array_api_strict as xs

    host = np.arange(6.0).reshape(2, 3)
    x = B.asarray(host, xp=xp, device=device)
    for like in (np.zeros(1), xs.zeros(1), xs.zeros(1, device=xs.Device("device1"))):
        moved = B.asarray(x, like=like)
        assert_same_library(moved, like)
        np.testing.assert_array_equal(B.to_numpy(moved), host)
    torch = pytest.importorskip("torch")
    half = torch.tensor(host, dtype=torch.bfloat16)     # small integers: exact in bfloat16
    moved = B.asarray(half, like=x)
    assert_same_library(moved, x)
    if type(x) is not torch.Tensor:
        assert B.dtype_name(moved.dtype) == "float32"   # float32 holds every bfloat16 value
    np.testing.assert_array_equal(B.to_numpy(moved).astype(np.float64), host)


def test_asarray_refuses_what_every_function_refuses():
    """asarray dropped a masked array's mask without a word, and a tensor that requires grad failed inside
    PyTorch ("Can't call numpy() on Tensor that requires grad") or kept its graph."""
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="a is a NumPy masked array"):
        B.asarray(np.ma.masked_array(np.zeros(3), mask=[True, False, False]), xp=np)
    for target in (dict(xp=np), dict(like=torch.zeros(1))):
        with pytest.raises(TypeError, match=r"a is a PyTorch tensor with requires_grad=True.*a\.detach\(\)"):
            B.asarray(torch.zeros(3, requires_grad=True), **target)
