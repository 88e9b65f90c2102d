"""The machine's own limits, measured in the run that compares against them.

Two probes, each the median of several timed runs after one untimed run:

* ``matmul_gflops``: a square float32 matrix product through NumPy's BLAS
  (``2 n^3`` floating-point operations), the most a dense layer can hope for;
* ``copy_gbs``: a copy of a float32 array of a given size, counted as the bytes
  read plus the bytes written, the most an elementwise pass can hope for at
  that size (a small array stays in the caches, a large one goes to memory).

A benchmark divides each path's achieved GFLOP/s or GB/s by these, so that its
tables say how far each path is from what this machine can do (docs/engine.md).
"""

from __future__ import annotations

import statistics
import time

import numpy as np


def median_seconds(run, repeats):
    """The median time of ``repeats`` runs of ``run()``, after one untimed run."""
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(n=1024, repeats=7):
    """GFLOP/s of a float32 (n, n) @ (n, n) product with NumPy's BLAS (its default threads)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    out = np.empty((n, n), np.float32)
    return 2 * n**3 / median_seconds(lambda: np.matmul(a, b, out=out), repeats) / 1e9


def copy_gbs(nbytes, repeats=7):
    """GB/s (read + write) of copying a float32 array of ``nbytes`` bytes into another (one thread)."""
    n = max(1, int(nbytes) // 4)
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    return 2 * 4 * n / median_seconds(lambda: np.copyto(dst, src), repeats) / 1e9


def describe(gflops, copies):
    """One Markdown line naming the probes' results (``copies``: {label: GB/s})."""
    rates = ", ".join(f"copy {label} {gbs:.1f} GB/s" for label, gbs in copies.items())
    return f"- ceilings measured in this run: float32 matmul 1024^3 {gflops:.1f} GFLOP/s; {rates}"
