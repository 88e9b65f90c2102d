"""``copy.deepcopy`` and ``pickle`` of layers, blocks and networks, as users make them: an EMA copy
of a network, a model sent to a process (multiprocessing, Dask's ``processes`` scheduler), a model
saved with pickle, each also in the middle of a step (after a forward pass, its caches and scratch
buffers filled). A copy must compute what the original computes, to the bit, and own every buffer.
(The optimisers' copies: ``tests/nn/test_optim.py``.)"""

import copy
import pickle

import numpy as np
import pytest

import nlref.backend as B
from nlref.nn import MultiHeadAttention, NonLocalBlock, PositionalEncoding, TransformerBlock
from nlref.nn.models import ImageResNet, VideoNet, VideoTransformer

COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}


def _arrays(obj, seen=None):
    """Every NumPy array reachable from ``obj``'s attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _arrays(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _arrays(value, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.startswith("nlref"):
        yield from _arrays(vars(obj), seen)


def _layers():
    """(name, layer, input, output gradient) of every kind of layer object with a backward pass."""
    rng = np.random.default_rng(0)

    def block(mode, xp):
        b = NonLocalBlock(6, dims=2, mode=mode, dtype="float64", xp=xp)
        b.params["bn.gamma"] = b.params["bn.gamma"] + 0.5  # every path alive
        x = B.asarray(rng.standard_normal((2, 6, 4, 6)), xp=b.xp)
        return b, x, B.asarray(rng.standard_normal((2, 6, 4, 6)), xp=b.xp)

    tokens = (rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8)))
    clips = (rng.standard_normal((2, 1, 4, 16, 16)).astype(np.float32), rng.standard_normal((2, 2)).astype(np.float32))
    images = (rng.standard_normal((2, 1, 8, 8)).astype(np.float32), rng.standard_normal((2, 2)).astype(np.float32))
    import array_api_strict

    yield "block embedded_gaussian", *block("embedded_gaussian", np)
    yield "block concatenation", *block("concatenation", np)
    yield "block strict", *block("dot_product", array_api_strict)
    yield "attention", MultiHeadAttention(8, 2, dtype="float64"), *tokens
    yield "transformer block", TransformerBlock(8, 2, 16, dtype="float64"), *tokens
    yield "positions", PositionalEncoding((1, 1, 5), 8, dtype="float64"), *tokens
    yield "VideoNet", VideoNet("i3d", nonlocal_blocks=1, widths=(4, 4, 4), blocks=(1, 1, 1)), *clips
    yield "VideoTransformer", VideoTransformer(frames=4, size=16, embed_dim=8, mlp_dim=16), *clips
    yield "ImageResNet", ImageResNet(nonlocal_blocks=1), *images


def _forward(layer, x):
    return layer.forward(x, dropout_seed=3) if hasattr(layer, "config") else layer.forward(x)


@pytest.mark.parametrize("how", sorted(COPIES))
def test_a_copy_made_after_a_forward_pass_computes_what_the_original_does(how):
    """Every layer kept its array library as a module, which neither pickle nor deepcopy can copy
    ("TypeError: cannot pickle 'module' object"): no layer, block or network could be copied."""
    for name, layer, x, dout in _layers():
        y = _forward(layer, x)
        twin = COPIES[how](layer)
        assert twin.xp is layer.xp, name
        # the backward pass of the forward made before the copy, then a whole new step
        results = [(layer.backward(dout), _forward(layer, x), layer.backward(dout)),
                   (twin.backward(dout), _forward(twin, x), twin.backward(dout))]
        np.testing.assert_array_equal(B.to_numpy(_forward(twin, x)), B.to_numpy(y), err_msg=name)
        for ours, theirs in zip(*results):
            np.testing.assert_array_equal(B.to_numpy(theirs), B.to_numpy(ours), err_msg=name)
        twin_grads = twin.grads
        for key, grad in layer.grads.items():
            np.testing.assert_array_equal(B.to_numpy(twin_grads[key]), B.to_numpy(grad), err_msg=f"{name} {key}")


@pytest.mark.parametrize("how", sorted(COPIES))
def test_a_copied_block_owns_its_buffers_and_carries_no_scratch(how):
    """A copy made between a forward pass and its backward pass: the copy's own steps must not
    write into the original's memory (the original's backward pass is still to come), and the
    (B, N, N') scratch buffers are not copied (a pickle of a block would carry them)."""
    rng = np.random.default_rng(1)
    x, other = rng.standard_normal((2, 2, 8, 16, 32)).astype(np.float32)
    dz = rng.standard_normal(x.shape).astype(np.float32)
    blocks = [NonLocalBlock(8, dims=2, sub_sample=False, seed=4) for _ in range(2)]
    for block in blocks:
        block.params["bn.gamma"] = block.params["bn.gamma"] + 1.0
    expected = blocks[1].forward(x), blocks[1].backward(dz)
    block = blocks[0]
    y = block.forward(x)
    scratch = sum(buf.nbytes for buf in block._workspace._buffers.values())
    assert scratch >= 2 * (16 * 32) ** 2 * 4  # at least the (B, N, N) scores: 2 MiB
    twin = COPIES[how](block)
    assert len(twin._workspace) == 0
    mine = list(_arrays(block))
    for array in _arrays(twin):
        assert not any(np.shares_memory(array, a) for a in mine)
    twin.forward(other)  # writes its own scratch
    twin.backward(dz)
    np.testing.assert_array_equal(y, expected[0])
    np.testing.assert_array_equal(block.backward(dz), expected[1])
    assert len(block._workspace) and len(pickle.dumps(block)) < scratch / 8  # the step done: no cache either
