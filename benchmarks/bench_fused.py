"""The fused Numba passes (``nlref.nn.engine.fused_numba``) against the NumPy passes they replace.

One process, the same float32 inputs, ``NLREF_NN_ENGINE`` switched between ``numpy`` and
``numba`` in alternating rounds; each figure is the median of the timed calls (after one
untimed call per round), and the ratio is numba / numpy. Two parts:

* the passes alone: the non-local operation's softmax rows (exp(s - max) and the row sums) and
  its backward step e (de - c) on (8, 784, 196) scores (the small subsampled block of
  ``bench_block.py``), batch norm forward + backward on the block's (B, C, N) layout
  (8, 64, 784) and on a channels-last (32, 64, 8, 28, 28) activation (the training network's
  layout, whose fused passes are not wired by default: ``fused_numba.BN_CHANNELS_LAST``), at 1
  and 2 Numba threads;
* a whole block's forward + backward (``bench_block.py``'s blocks: C = 64, 3-D, training mode)
  at the small shape, every mode, with and without subsampling.

    python benchmarks/bench_fused.py            # about a minute on 2 cores
    python benchmarks/bench_fused.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from _args import whole
from nlref.nn import NonLocalBlock
from nlref.nn import functional as F
from nlref.nn.engine import fused_numba

MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")


def paired(fns, rounds, calls):
    """{engine: median seconds} of fn() under each engine, alternating rounds."""
    times = {engine: [] for engine in fns}
    for _ in range(rounds):
        for engine, fn in fns.items():
            os.environ[fused_numba.ENGINE_VARIABLE] = engine
            fn()
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times[engine].append(time.perf_counter() - t0)
    return {engine: statistics.median(t) for engine, t in times.items()}


def passes(rounds):
    rng = np.random.default_rng(0)
    s0 = (rng.standard_normal((8, 784, 196)) * 3).astype(np.float32)
    buf, de = np.empty_like(s0), np.empty_like(s0)
    e = np.exp(s0 - s0.max(axis=2, keepdims=True))
    c = rng.standard_normal((8, 784)).astype(np.float32)

    def softmax():
        np.copyto(buf, s0)
        if fused_numba.numba_applies(buf):
            return fused_numba.softmax_rows(buf)
        buf[...] -= np.max(buf, axis=2, keepdims=True)
        np.exp(buf, out=buf)
        return np.sum(buf, axis=2)

    def grad():
        np.copyto(de, s0)
        if fused_numba.numba_applies(de):
            return fused_numba.softmax_rows_grad(de, e, c)
        de[...] -= c[:, :, None]
        de[...] *= e

    def copy():
        np.copyto(buf, s0)

    def batchnorm(x):
        ones = np.ones(x.shape[1], np.float32)

        def run():
            state = {"running_mean": 0 * ones, "running_var": ones.copy()}
            out, cache = F.batchnorm_forward(x, ones, ones, state, training=True)
            F.batchnorm_backward(out, cache)
        return run

    bcn = rng.standard_normal((8, 64, 784)).astype(np.float32)
    last = rng.standard_normal((32, 8, 28, 28, 64)).astype(np.float32).transpose(0, 4, 1, 2, 3)  # stored channels-last
    cases = [("copy of the (8, 784, 196) scores (for scale)", copy, 20),
             ("softmax rows: exp(s - max), row sums", softmax, 20),
             ("softmax backward step e (de - c)", grad, 20),
             ("batch norm fwd + bwd, (8, 64, 784)", batchnorm(bcn), 20),
             ("batch norm fwd + bwd, channels-last (32, 64, 8, 28, 28)", batchnorm(last), 4)]
    import numba

    fused_numba.BN_CHANNELS_LAST = True  # not wired by default (see its comment): measured here all the same
    print("| pass | threads | NumPy ms | Numba ms | Numba / NumPy |\n|---|---:|---:|---:|---:|")
    for threads in (1, 2):
        numba.set_num_threads(threads)
        for name, fn, calls in cases:
            t = paired({"numpy": fn, "numba": fn}, rounds, calls)
            print(f"| {name} | {threads} | {t['numpy'] * 1e3:.2f} | {t['numba'] * 1e3:.2f} | "
                  f"{t['numba'] / t['numpy']:.2f} |", flush=True)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def blocks(rounds, shape=(8, 64, 4, 14, 14)):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    dz = rng.standard_normal(shape).astype(np.float32)
    print(f"\n| block {shape}, forward + backward | sub-sample | NumPy ms | Numba ms | Numba / NumPy |\n"
          "|---|---|---:|---:|---:|")
    for sub_sample in (True, False):
        for mode in MODES:
            block = NonLocalBlock(shape[1], mode=mode, dims=3, sub_sample=sub_sample, dtype="float32", seed=0)

            def step():
                block.forward(x)
                block.backward(dz)
            t = paired({"numpy": step, "numba": step}, rounds, 5)
            print(f"| {mode} | {'yes' if sub_sample else 'no'} | {t['numpy'] * 1e3:.1f} | {t['numba'] * 1e3:.1f} | "
                  f"{t['numba'] / t['numpy']:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=whole(1), default=3, help="alternating rounds per engine")
    args = parser.parse_args()
    import numba

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"# Fused Numba passes against NumPy's\n\n- {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, numpy {np.__version__}, numba {numba.__version__}, "
          f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}; load average at start {load}\n")
    fused_numba.compile_kernels()
    passes(args.rounds)
    os.environ[fused_numba.ENGINE_VARIABLE] = "numba"
    blocks(args.rounds)


if __name__ == "__main__":
    main()
