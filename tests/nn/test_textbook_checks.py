"""The textbook's forwards check their float data like conv3d_forward: an integer array, or
float32 mixed with float64, is a TypeError that names the argument (not a silent promotion
or a raw casting error deep inside)."""

from __future__ import annotations

import numpy as np
import pytest

import nlref.backend as B
from nlref.nn import functional as F
from nlref.nn import nonlocal_op as op


def _arr(xp, shape, dtype="float64", seed=0):
    host = np.random.default_rng(seed).standard_normal(shape)
    if dtype.startswith("int"):
        host = np.round(host * 3)
    return B.asarray(host.astype(dtype), xp=xp)


def _state(xp, c, dtype="float64"):
    return {"running_mean": _arr(xp, (c,), dtype, 1), "running_var": B.asarray(np.ones(c, dtype), xp=xp)}


# (name, call(xp, dtype of the argument under test), the argument's name in the message)
def _cases():
    return [
        ("conv1x1 x", lambda xp, d: F.conv1x1_forward(_arr(xp, (2, 3, 4), d), _arr(xp, (5, 3))), "x"),
        ("conv1x1 w", lambda xp, d: F.conv1x1_forward(_arr(xp, (2, 3, 4)), _arr(xp, (5, 3), d)), "w"),
        ("conv1x1 b", lambda xp, d: F.conv1x1_forward(_arr(xp, (2, 3, 4)), _arr(xp, (5, 3)), _arr(xp, (5,), d)), "b"),
        ("batchnorm x train", lambda xp, d: F.batchnorm_forward(_arr(xp, (2, 3, 4), d), _arr(xp, (3,)),
                                                                _arr(xp, (3,)), _state(xp, 3), training=True), "x"),
        ("batchnorm x eval", lambda xp, d: F.batchnorm_forward(_arr(xp, (2, 3, 4), d), _arr(xp, (3,)),
                                                               _arr(xp, (3,)), _state(xp, 3), training=False), "x"),
        ("batchnorm gamma", lambda xp, d: F.batchnorm_forward(_arr(xp, (2, 3, 4)), _arr(xp, (3,), d),
                                                              _arr(xp, (3,)), _state(xp, 3), training=True), "gamma"),
        ("batchnorm state", lambda xp, d: F.batchnorm_forward(_arr(xp, (2, 3, 4)), _arr(xp, (3,)), _arr(xp, (3,)),
                                                              _state(xp, 3, d), training=False),
         "state['running_mean']"),
        ("maxpool x", lambda xp, d: F.maxpool_forward(_arr(xp, (2, 3, 4, 4), d), (2, 2)), "x"),
        ("softmax s", lambda xp, d: F.softmax_forward(_arr(xp, (2, 5), d)), "s"),
        ("dot theta", lambda xp, d: F.dot_pairwise_forward(_arr(xp, (2, 3, 4), d), _arr(xp, (2, 3, 5))), "theta"),
        ("concat w_f", lambda xp, d: F.concat_pairwise_forward(_arr(xp, (2, 3, 4)), _arr(xp, (2, 3, 5)),
                                                               _arr(xp, (6,), d)), "w_f"),
        ("nonlocal g", lambda xp, d: op.nonlocal_forward(_arr(xp, (2, 3, 4)), _arr(xp, (2, 3, 4)),
                                                         _arr(xp, (2, 2, 4), d), mode="embedded_gaussian"), "g"),
        ("nonlocal theta", lambda xp, d: op.nonlocal_forward(_arr(xp, (2, 3, 4), d), _arr(xp, (2, 3, 4)),
                                                             _arr(xp, (2, 2, 4)), mode="dot_product"), "theta"),
        ("attention phi", lambda xp, d: op.attention_map(_arr(xp, (2, 3, 4)), _arr(xp, (2, 3, 4), d),
                                                         mode="gaussian"), "phi"),
        ("reference g", lambda xp, d: op.nonlocal_reference(_arr(xp, (2, 3, 4)), _arr(xp, (2, 3, 4)),
                                                            _arr(xp, (2, 2, 4), d), mode="gaussian"), "g"),
    ]


_CASES = _cases()


@pytest.mark.parametrize("name, call, arg", _CASES, ids=[c[0] for c in _CASES])
def test_integer_input_is_refused_by_name(xp_cpu, name, call, arg):
    call(xp_cpu, "float64")                                         # the all-float64 call works
    with pytest.raises(TypeError) as info:
        call(xp_cpu, "int64")
    assert arg in str(info.value) and "float32 or float64" in str(info.value)


_MIXED = [c for c in _CASES if c[0] not in ("maxpool x", "softmax s")]  # those take one array


@pytest.mark.parametrize("name, call, arg", _MIXED, ids=[c[0] for c in _MIXED])
def test_float32_mixed_with_float64_is_refused_by_name(xp_cpu, name, call, arg):
    with pytest.raises(TypeError) as info:
        call(xp_cpu, "float32")
    assert arg in str(info.value) and "float64" in str(info.value) and "float32" in str(info.value)


def test_batchnorm_float32_throughout_keeps_float32_in_both_modes():
    x = _arr(np, (2, 3, 4), "float32")
    g, b = _arr(np, (3,), "float32"), _arr(np, (3,), "float32")
    for training in (True, False):
        out, _ = F.batchnorm_forward(x, g, b, _state(np, 3, "float32"), training=training)
        assert out.dtype == np.float32


def test_conv1x1_shapes_are_checked():
    with pytest.raises(ValueError, match=r"conv1x1_forward: .*w \(5, 2\)"):
        F.conv1x1_forward(_arr(np, (2, 3, 4)), _arr(np, (5, 2)))
    with pytest.raises(ValueError, match=r"b \(4,\)"):
        F.conv1x1_forward(_arr(np, (2, 3, 4)), _arr(np, (5, 3)), _arr(np, (4,)))
