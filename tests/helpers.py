"""Helpers the tests share (imported as ``from tests.helpers import ...``; fixtures live in conftest.py)."""

from __future__ import annotations

import tracemalloc

import numpy as np

import nlref.backend as B


def assert_same_library(result, like):
    """The result must come back from the library (and device) it was given."""
    assert type(result) is type(like), f"{type(result)} is not {type(like)}"
    assert B.device(result) == B.device(like)


def distinct_samples(shape, xp, rng):
    """Zero-mean samples whose gaps are all at least 1e-3 (no ties at a max-pool kink)."""
    n = int(np.prod(shape))
    host = (rng.permutation(n) * 1e-2 + rng.uniform(0, 1e-3, n)).reshape(shape)
    return B.asarray(host - host.mean(), xp=xp)


def assert_gradcheck(forward, backward, inputs, **options):
    """Run :func:`nlref.gradcheck` and fail with its table when it does not pass."""
    from nlref.nn import gradcheck

    result = gradcheck(forward, backward, inputs, **options)
    assert result.passed, str(result)
    return result


#: A training run small enough for a test (seconds on 2 cores): the sprite task, three narrow stages.
TINY = dict(n_train=48, n_val=24, batch_size=16, widths=(4, 6, 8), size=16, epochs=3)


def tiny_run(out, **changes):
    """:func:`nlref.train.train` of :data:`TINY` (with ``changes``) into ``out``, silent."""
    from nlref.train import TrainConfig, train

    return train(TrainConfig(**{**TINY, **changes}), out, progress=False, log=None)


def folder_bytes(folder):
    """Every file directly in ``folder``, by name, with its bytes (to show that nothing changed)."""
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def random_block(xp, shape, accept, *, dtype="float64", **config):
    """A 4-channel NonLocalBlock with every parameter and buffer random (gamma != 0) and an input of ``shape``.

    Seeds 0, 1, ... are tried until ``accept(block, x)`` holds (an input away
    from the kinks a finite difference must not cross).
    """
    from nlref.nn import NonLocalBlock

    for seed in range(50):
        rng = np.random.default_rng(seed)
        block = NonLocalBlock(4, dims=len(shape) - 2, dtype=dtype, seed=seed, xp=xp, **config)
        for k, v in block.params.items():
            block.params[k] = B.asarray(rng.standard_normal(tuple(v.shape)), like=v, dtype=v.dtype)
        for k, v in block.buffers.items():
            host = rng.uniform(0.5, 2.0, tuple(v.shape)) if k.endswith("var") else rng.standard_normal(tuple(v.shape))
            block.buffers[k] = B.asarray(host, like=v, dtype=v.dtype)
        x = B.asarray(rng.standard_normal(shape), xp=xp, dtype=block.dtype)
        if accept(block, x):
            return block, x
    raise AssertionError(f"no seed gave an input that {accept.__name__} accepts")


def traced_peak(run):
    """The largest amount of memory (tracemalloc) allocated above the start while ``run()`` runs."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        run()
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def random_layout(rng, a):
    """The values of NumPy array ``a`` in a random storage order: C, negative strides, Fortran, a strided slice."""
    k = int(rng.integers(4))
    if k == 0:
        return a.copy()
    if k == 1:
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    if k == 2:
        return np.asfortranarray(a)
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1] + 1,), a.dtype)
    big[..., 0:2 * a.shape[-1]:2] = a
    return big[..., 0:2 * a.shape[-1]:2]
