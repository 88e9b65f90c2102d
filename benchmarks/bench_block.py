"""The non-local block: nlref's hand-written backprop against PyTorch autograd on the CPU.

Both peers run in this one process on the same float32 input, with the same
weights (copied from the nlref block into the PyTorch module), in training
mode (batch norm on batch statistics), as one forward + backward pass
(``dz`` fixed and random). The PyTorch peer is written here with autograd and
the same semantics (paper defaults: no scale, max-pool after phi and g); its
concatenation uses the same split ``ReLU(a_i + b_j)`` as nlref, so neither
builds the (B, 2d, N, N') tensor. Timings: two rounds of [nlref: a pause,
0.3 s of untimed runs, ``--repeats`` timed runs; then PyTorch the same way];
the table shows the medians of the timed runs and their ratio.

FLOPs count the multiply-adds of the matrix products (2 per multiply-add):
forward = the four 1x1 convolutions + the pairwise products (not for the
concatenation) + y = g A^T; backward = twice the forward. Elementwise work
(softmax, batch norm, pooling) is not counted, so the GFLOP/s column is a
lower bound of the work done per second.

The memory section measures the chunked form against the full form with
``tracemalloc`` (NumPy reports its allocations to it; the Python-side peak of
one forward + backward, after a warm-up) at N = 8 x 28 x 28.

    python benchmarks/bench_block.py              # the full table (a few minutes on 2 cores)
    python benchmarks/bench_block.py --quick      # smoke test: the small shape only, 2 repeats
    python benchmarks/bench_block.py --plot docs/images/block_memory_vs_n.png

With ``--plot PATH`` the script measures only memory against N: the peak of one
forward + backward (tracemalloc, as above) of an embedded-Gaussian block with
C = 64 and no subsampling (N' = N), batch 1, full form and chunked form
(chunk_size 256), for N = 8 x S x S with S from 7 to 28; it prints the table and
saves a log-log figure of peak MiB against N to PATH. Memory is not a timing,
so it needs no lock and no repeats.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
import tracemalloc

import numpy as np

import ceiling
import nlref
from _args import figure_path, whole
from nlref._files import replaced_atomically
from nlref.nn import NonLocalBlock
from nlref.nn.engine import nonlocal_op as nonlocal_engine

MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
SHAPES = ((8, 64, 4, 14, 14), (4, 64, 8, 28, 28))


def torch_block(torch, block):
    """A PyTorch autograd module with the block's semantics and a copy of its weights."""
    nn, F = torch.nn, torch.nn.functional
    c, d, mode = block.in_channels, block.inter_channels, block.mode

    class Peer(nn.Module):
        def __init__(self):
            super().__init__()
            conv = lambda i, o: nn.Conv3d(i, o, 1)  # noqa: E731
            self.g, self.W = conv(c, d), conv(d, c)
            if mode != "gaussian":
                self.theta, self.phi = conv(c, d), conv(c, d)
            if mode == "concatenation":
                self.w_f = nn.Parameter(torch.zeros(2 * d))
            self.bn = nn.BatchNorm3d(c)

        def keys(self, h):
            return F.max_pool3d(h, (1, 2, 2)) if block.sub_sample else h

        def forward(self, x):
            b = x.shape[0]
            g = self.keys(self.g(x)).flatten(2)  # (B, d, M)
            if mode == "gaussian":
                theta, phi = x.flatten(2), self.keys(x).flatten(2)
            else:
                theta, phi = self.theta(x).flatten(2), self.keys(self.phi(x)).flatten(2)
            m = phi.shape[2]
            if mode == "concatenation":
                a = torch.einsum("c,bcn->bn", self.w_f[:d], theta)
                k = torch.einsum("c,bcm->bm", self.w_f[d:], phi)
                attention = F.relu(a[:, :, None] + k[:, None, :]) / m
            else:
                f = theta.transpose(1, 2) @ phi
                attention = F.softmax(f, dim=-1) if mode in ("gaussian", "embedded_gaussian") else f / m
            y = (g @ attention.transpose(1, 2)).reshape(b, d, *x.shape[2:])
            return self.bn(self.W(y)) + x

    peer = Peer()
    p = {k: torch.from_numpy(np.asarray(v)) for k, v in block.state_dict().items()}
    with torch.no_grad():
        for name in ("theta", "phi", "g"):
            if f"{name}.weight" in p:
                getattr(peer, name).weight.copy_(p[f"{name}.weight"].reshape(d, c, 1, 1, 1))
                getattr(peer, name).bias.copy_(p[f"{name}.bias"])
        peer.W.weight.copy_(p["W_z.weight"].reshape(c, d, 1, 1, 1))
        peer.W.bias.copy_(p["W_z.bias"])
        peer.bn.weight.copy_(p["bn.gamma"])
        peer.bn.bias.copy_(p["bn.beta"])
        if mode == "concatenation":
            peer.w_f.copy_(p["w_f"])
    return peer.train()


def random_block(mode, sub_sample, c, seed=0, **kw):
    """A float32 block with random weights and gamma = 1 (so every gradient is non-zero)."""
    block = NonLocalBlock(c, mode=mode, dims=3, sub_sample=sub_sample, seed=seed, **kw)
    rng = np.random.default_rng(seed)
    for k, v in block.params.items():
        block.params[k] = (rng.standard_normal(v.shape) * 0.2).astype(np.float32)
    block.params["bn.gamma"] = np.ones(c, np.float32)
    return block


def matmul_flops(mode, shape, sub_sample, factored=False):
    """The matrix products' FLOPs of one forward + backward; ``factored``: nlref's route for the
    dot product and the concatenation (engine.nonlocal_op.FACTORED_MODES), which skips the
    (B, N, M) products (the concatenation's sweeps are not products and are not counted)."""
    b, c, t, h, w = shape
    d = c // 2
    n = t * h * w
    m = t * (h // 2) * (w // 2) if sub_sample else n
    convs = 2 * b * n * c * d * 4  # theta, phi, g, W_z (phi and g before pooling)
    if mode == "gaussian":
        convs = 2 * b * n * c * d * 2
        pairwise = 2 * b * n * m * c
    elif mode == "concatenation":
        pairwise = 2 * b * (n + m) * d
    else:
        pairwise = 2 * b * n * m * d
    weighted_sum = 2 * b * n * m * d  # y = g A^T
    if factored and mode == "dot_product":  # K = g phi^T, then y = K theta
        pairwise, weighted_sum = 0, 2 * b * (n + m) * d * d
    elif factored and mode == "concatenation":
        weighted_sum = 0
    return 3 * (convs + pairwise + weighted_sum)


def _settle(run, seconds=0.3):
    """Untimed runs for at least ``seconds`` (at least one)."""
    t_end = time.perf_counter() + seconds
    run()
    while time.perf_counter() < t_end:
        run()


def time_pair(run_a, run_b, repeats, rounds=2):
    """Medians of ``rounds`` x ``repeats`` timed runs of each peer, in blocks: A...A B...B A...A B...B.

    Blocks, not strict alternation, and each block starts with a pause and
    0.3 s of untimed runs: both libraries keep worker threads spinning for a
    while after a call, and on this 2-core machine the first runs after a
    switch ran up to twice as slow against the other library's threads.
    """
    ta, tb = [], []
    for _ in range(rounds):
        for run, times in ((run_a, ta), (run_b, tb)):
            time.sleep(0.2)
            _settle(run)
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def speed_rows(torch, shapes, repeats):
    rows = []
    for shape in shapes:
        for sub_sample in (True, False):
            for mode in MODES:
                block = random_block(mode, sub_sample, shape[1])
                rng = np.random.default_rng(1)
                x = rng.standard_normal(shape).astype(np.float32)
                dz = rng.standard_normal(shape).astype(np.float32)
                peer = torch_block(torch, block)
                tx, tdz = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dz)

                def ours():
                    block.forward(x)
                    block.backward(dz)

                def theirs():
                    peer.zero_grad(set_to_none=True)
                    tx.grad = None
                    peer(tx).backward(tdz)

                # the same numbers first (float32: relative norm error below 1e-4), then the clock
                z, dx = block.forward(x), block.backward(dz)
                peer.zero_grad(set_to_none=True)
                tz = peer(tx)
                tz.backward(tdz)
                dw_g, dw_z = (peer.g.weight.grad.numpy().reshape(block.grads["g.weight"].shape),
                              peer.W.weight.grad.numpy().reshape(block.grads["W_z.weight"].shape))
                pairs = [(z, tz.detach().numpy()), (dx, tx.grad.numpy()),
                         (block.grads["g.weight"], dw_g), (block.grads["W_z.weight"], dw_z)]
                ok = max(float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in pairs)
                t_ours, t_theirs = time_pair(ours, theirs, repeats)
                flops = (matmul_flops(mode, shape, sub_sample, factored=mode in nonlocal_engine.FACTORED_MODES),
                         matmul_flops(mode, shape, sub_sample))
                rows.append((shape, sub_sample, mode, t_ours, t_theirs, flops, ok))
                print(f"  {shape} sub_sample={sub_sample} {mode}: nlref {t_ours * 1e3:.1f} ms, "
                      f"torch {t_theirs * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return rows


def _warm_up():
    """A small forward + backward of each form, outside any trace: the process's one-time costs.

    The first call in a process imports Numba and loads the engine's compiled kernels
    (``NLREF_NN_ENGINE``): about 31 MiB of Python objects, which tracemalloc counts. Traced
    with the first block they were read as the block's memory (the chunked form at
    chunk_size 256 showed 120 MiB instead of 89, above 1/8 of the full form's peak at 512).
    """
    x = np.random.default_rng(0).standard_normal((2, 8, 2, 4, 4)).astype(np.float32)
    for sub_sample in (True, False):
        for chunk in (None, 4):
            block = random_block("embedded_gaussian", sub_sample, 8, chunk_size=chunk)
            block.forward(x)
            block.backward(x)


def peak_of(make_block, run):
    """Peak traced memory of a new block's first forward + backward.

    The block is created inside the trace, so its reusable scratch buffers
    (allocated by the first call and kept between calls) are counted; the
    process's one-time imports are not (:func:`_warm_up`).
    """
    _warm_up()
    tracemalloc.start()
    block = make_block()
    run(block)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, block


def training_step(shape, seed):
    """``run(block)``: one forward and backward pass on a fixed random input and output gradient."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    dz = rng.standard_normal(shape).astype(np.float32)

    def run(block):
        block.forward(x)
        block.backward(dz)

    return run


def memory_rows(shape, chunks, repeats):
    rows = []
    run = training_step(shape, seed=2)
    for sub_sample in (True, False):
        for chunk in (None,) + tuple(chunks):
            peak, block = peak_of(
                lambda: random_block("embedded_gaussian", sub_sample, shape[1], chunk_size=chunk), run)
            _settle(lambda: run(block))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run(block)
                times.append(time.perf_counter() - t0)
            rows.append((sub_sample, chunk, peak, statistics.median(times)))
            print(f"  memory sub_sample={sub_sample} chunk={chunk}: {peak / 2**20:.0f} MiB",
                  file=sys.stderr, flush=True)
    return rows


PLOT_SIDES = (7, 10, 14, 20, 28)
PLOT_CHUNK = 256


def memory_against_n(sides=PLOT_SIDES, chunk=PLOT_CHUNK):
    """Peak MiB of the full and the chunked form for inputs (1, 64, 8, S, S), N' = N."""
    ns, full, chunked = [], [], []
    for side in sides:
        shape = (1, 64, 8, side, side)
        run = training_step(shape, seed=3)
        ns.append(math.prod(shape[2:]))
        for chunk_size, out in ((None, full), (chunk, chunked)):
            peak, _ = peak_of(lambda: random_block("embedded_gaussian", False, shape[1], chunk_size=chunk_size), run)
            out.append(peak / 2**20)
        print(f"  N = {ns[-1]}: full {full[-1]:.1f} MiB, chunked {chunked[-1]:.1f} MiB", file=sys.stderr, flush=True)
    return ns, full, chunked


def plot_memory(ns, full, chunked, path, chunk=PLOT_CHUNK):
    """Log-log figure of peak memory against N, with N^2 and N guide lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    ax.plot(ns, full, marker="o", label="full form (holds the N x N attention)")
    ax.plot(ns, chunked, marker="s", label=f"chunked form, chunk_size = {chunk}")
    n0 = ns[-1]
    ax.plot(ns, [full[-1] * (n / n0) ** 2 for n in ns], ls=":", color="grey", label="slope 2 (grows as N^2)")
    ax.plot(ns, [chunked[-1] * n / n0 for n in ns], ls="--", color="grey", label="slope 1 (grows as N)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("positions N = T x H x W (keys N' = N, log scale)")
    ax.set_ylabel("peak memory of forward + backward (MiB, log scale)")
    ax.set_title("Non-local block memory against N\n(embedded Gaussian, B = 1, C = 64, d = 32, float32)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    try:
        with replaced_atomically(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def header(torch):
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    try:
        load = "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "unknown"
    return [
        "# Non-local block benchmark: nlref (hand-written backprop) vs PyTorch autograd, CPU",
        "",
        f"- command: `{shlex.join(['python'] + sys.argv)}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; load average at start {load} (1 / 5 / 15 min)",
        f"- versions: nlref {nlref.__version__}, numpy {np.__version__}, torch {torch.__version__}",
        f"- threads: torch.get_num_threads() = {torch.get_num_threads()}; NumPy's BLAS with its default "
        f"(OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}); NumPy ufuncs single-threaded",
        "- float32, training mode, forward + backward with a fixed random dz; block: C = 64, d = 32, 3-D, "
        "BN after W_z, no scale, pool after",
        "- nlref's dot product and concatenation: " + (
            f"the factored route, without the (B, N, N') matrix (FACTORED_MODES = {nonlocal_engine.FACTORED_MODES}); "
            "the PyTorch peer builds the matrix, as the published blocks do; GFLOP/s count each peer's own products"
            if nonlocal_engine.FACTORED_MODES else "the matrix route (--matrix-route), as the PyTorch peer"),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=whole(1), default=5)
    parser.add_argument("--quick", action="store_true", help="small shape only, 2 repeats, no memory section")
    parser.add_argument("--only", choices=("speed", "memory"), help="run one section")
    parser.add_argument("--matrix-route", action="store_true",
                        help="nlref's dot product and concatenation build the (B, N, N') matrix too (no factored route)")
    parser.add_argument("--plot", metavar="PATH", type=figure_path,
                        help="measure only peak memory against N and save its log-log figure to PATH (a .png)")
    args = parser.parse_args(argv)
    if args.plot:
        ns, full, chunked = memory_against_n(PLOT_SIDES[:2] if args.quick else PLOT_SIDES)
        print(f"- command: `{shlex.join(['python'] + sys.argv)}`\n")
        print("| N | full form peak MiB | chunked peak MiB | chunked / full |\n|---:|---:|---:|---:|")
        for n, f, c in zip(ns, full, chunked):
            print(f"| {n} | {f:.1f} | {c:.1f} | {c / f:.3f} |")
        plot_memory(ns, full, chunked, args.plot)
        return
    if args.matrix_route:
        nonlocal_engine.FACTORED_MODES = ()
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    repeats = 2 if args.quick else args.repeats
    shapes = SHAPES[:1] if args.quick else SHAPES
    lines = header(torch)
    if args.only != "memory":
        lines += speed_section(torch, shapes, repeats)
    if not args.quick and args.only != "speed":
        lines += memory_section(repeats)
    print("\n".join(lines))


def speed_section(torch, shapes, repeats):
    gflops = ceiling.matmul_gflops()
    rows = speed_rows(torch, shapes, repeats)
    lines = ["", f"## Speed: forward + backward, median of 2 x {repeats} runs per peer", "",
             ceiling.describe(gflops, {}) + " (before the cases); \"of ceiling\": nlref's GFLOP/s over it", "",
             "| input (B, C, T, H, W) | sub-sample | mode | nlref ms | PyTorch ms | nlref / PyTorch "
             "| nlref GFLOP/s | of ceiling | PyTorch GFLOP/s | max rel. diff |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape, sub, mode, t_ours, t_theirs, (flops, flops_peer), diff in rows:
        lines.append(f"| {shape} | {'yes' if sub else 'no'} | {mode} | {t_ours * 1e3:.1f} | {t_theirs * 1e3:.1f} "
                     f"| {t_ours / t_theirs:.2f} | {flops / t_ours / 1e9:.1f} | {flops / t_ours / 1e9 / gflops:.0%} "
                     f"| {flops_peer / t_theirs / 1e9:.1f} | {diff:.0e} |")
    lines += ["", "max rel. diff: the largest of ||nlref - PyTorch|| / ||PyTorch|| over z, dx, dW_g and dW_z "
              "(float32 both)."]
    ratios = [r[3] / r[4] for r in rows]
    lines += ["", f"Median ratio over the {len(rows)} cases: {statistics.median(ratios):.2f} "
              f"(range {min(ratios):.2f} to {max(ratios):.2f}); issue 32's target: median <= 0.5, none above 0.8."]
    return lines


def memory_section(repeats):
    shape = SHAPES[1]
    n = math.prod(shape[2:])
    mem = memory_rows(shape, (256, 384, 512), repeats)
    lines = ["", f"## Memory: chunked vs full, embedded Gaussian, input {shape} (N = {n})", "",
             "Peak: tracemalloc's peak over a new block's first forward + backward, scratch buffers "
             f"included. Time: median of {repeats} runs after 0.3 s of warm-up.", "",
             "| sub-sample (N') | chunk_size | peak MiB | peak / full | time ms | time / full |",
             "|---|---:|---:|---:|---:|---:|"]
    full = {}
    for sub, chunk, peak, t in mem:
        if chunk is None:
            full[sub] = (peak, t)
        keys = n // 4 if sub else n
        lines.append(f"| {'yes' if sub else 'no'} ({keys}) | {chunk or 'full'} | {peak / 2**20:.0f} "
                     f"| {peak / full[sub][0]:.3f} | {t * 1e3:.0f} | {t / full[sub][1]:.2f} |")
    lines += ["", "Targets at N = 8 x 28 x 28: chunked peak <= 1/8 of the full form's, time <= 1.5x."]
    return lines


if __name__ == "__main__":
    main()
