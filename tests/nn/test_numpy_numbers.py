"""NumPy scalars are numbers wherever the layers take one: ``np.float32(1e-5)`` or ``np.int64(2)``
(what a value read from an array or a config file often is) were refused, while ``np.float64``, a
Python float subclass, was taken. Each call below gives the same result as with the Python number."""

import numpy as np
import pytest

from nlref.nn import functional as F
from nlref.nn import layouts, models, nonlocal_op


def _same(a, b):
    a, b = (a[0] if isinstance(a, tuple) else a), (b[0] if isinstance(b, tuple) else b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_layernorm_eps():
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
    eps = np.float32(1e-3)
    _same(F.layernorm_forward(x, gamma, beta, eps=eps), F.layernorm_forward(x, gamma, beta, eps=float(eps)))


def test_nonlocal_chunk_size():
    rng = np.random.default_rng(1)
    theta, phi, g = (rng.standard_normal((1, 2, 7)) for _ in range(3))
    _same(nonlocal_op.nonlocal_forward(theta, phi, g, mode="gaussian", chunk_size=np.int64(3)),
          nonlocal_op.nonlocal_forward(theta, phi, g, mode="gaussian", chunk_size=3))


def test_slowfast_pool_size():
    assert layouts.slowfast_options(8, 4, pool_size=(np.int64(1), np.int32(2), 2))["pool_kernel"] == (1, 2, 2)


@pytest.mark.parametrize("make", [lambda d: models.VideoNet(dropout=d), lambda d: models.ImageResNet(dropout=d)],
                         ids=["VideoNet", "ImageResNet"])
def test_dropout(make):
    assert make(np.float32(0.5)).dropout == 0.5
    with pytest.raises(ValueError, match="dropout must be in"):
        make(False)  # a bool is not a probability
