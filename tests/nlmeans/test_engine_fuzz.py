"""The NL-means offset loop (NumPy and Numba engines) against the definition, on random small inputs.

Each case draws a 1-D to 3-D image of one or two channels, patch widths 1 to 9 (every box path),
search widths 1 to 5, ``h``, ``sigma``, both aggregations, 1 or 2 workers, a storage order (C,
negative strides, Fortran, a strided slice), and moves the engines' size thresholds (tiles, runs of
offsets, batches) so that their other branches run on small images. The fast result must equal
:func:`~nlref.nlmeans.naive.nl_means_naive` in float64 (1e-10; float32 inputs 2e-4, the working
dtype's rounding), leave the input as it was, and stay as it was after the next call.
"""

from __future__ import annotations

import numpy as np
import pytest

from nlref.nlmeans import fast
from nlref.nlmeans.fast import nl_means_fast
from nlref.nlmeans.naive import nl_means_naive
from tests.helpers import random_layout

fast_numba = pytest.importorskip("nlref.nlmeans.fast_numba")

TOL = {np.float32: 2e-4, np.float64: 1e-10}


@pytest.mark.parametrize("seed", range(3))
def test_fast_engines_equal_the_definition(monkeypatch, seed):
    rng = np.random.default_rng(500 + seed)
    for _ in range(25):
        dtype = (np.float32, np.float64)[rng.integers(2)]
        nd = int(rng.integers(1, 4))
        shape = (int(rng.integers(1, 3)),) + tuple(int(s) for s in rng.integers(1, {1: 14, 2: 11, 3: 5}[nd], size=nd))
        patch = tuple(int(2 * rng.integers(0, 5 if nd < 3 else 2) + 1) for _ in range(nd))
        search = tuple(int(2 * rng.integers(0, 3) + 1) for _ in range(nd))
        args = dict(h=float(rng.choice([0.1, 0.5, 2.0])), sigma=float(rng.choice([0.0, 0.1, 0.3])), patch_size=patch,
                    search_size=search, aggregation=("pixel", "patch")[rng.integers(2)])
        engine, workers = ("numpy", "numba")[rng.integers(2)], int(rng.integers(1, 3))
        for module, name, values in ((fast_numba, "TILE_ELEMENTS", [2**15, 1, 7]), (fast_numba, "TILE_REACHES", [8, 0]),
                                     (fast_numba, "STEP_ELEMENTS", [2**22, 1, 5]), (fast, "BATCH_ELEMENTS", [2**16, 1, 9]),
                                     (fast, "MAX_BATCH", [16, 1, 3])):
            monkeypatch.setattr(module, name, values[rng.integers(len(values))])
        v = (rng.random(shape) * (100 if rng.random() < 0.3 else 1)).astype(dtype)
        info = dict(args, shape=shape, dtype=dtype.__name__, engine=engine, workers=workers)
        ref = nl_means_naive(v.astype(np.float64), **args)
        vl = random_layout(rng, v)
        out = nl_means_fast(vl, workers=workers, engine=engine, **args)
        assert np.array_equal(vl, v), f"the input was written to: {info}"
        assert out.dtype == dtype and out.shape == v.shape, info
        err = float(np.max(np.abs(out.astype(np.float64) - ref))) / max(float(np.max(np.abs(ref))), 1e-300)
        assert err <= TOL[dtype], f"relative error {err:.3g}: {info}"
        kept = out.copy()
        nl_means_fast(vl[..., ::-1], workers=workers, engine=engine, **args)
        assert np.array_equal(out, kept), f"the next call wrote over the result: {info}"
