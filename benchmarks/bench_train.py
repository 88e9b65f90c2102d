"""Training throughput: nlref's hand-written backprop vs PyTorch autograd, same network, same process.

One training step = forward, softmax cross-entropy, backward, Adam update, on a
batch of clips of the default task (8 x 16 x 16, one channel, float32). The
PyTorch peer is ``tests/nn/torch_oracle.py``'s ``TorchVideoNet``, an independent
autograd version of the same architecture loaded with the same weights, trained
with ``torch.optim.Adam`` on the same batches.

Usage::

    python benchmarks/bench_train.py            # 3 networks, 7 timed blocks of 10 steps each
    python benchmarks/bench_train.py --quick    # 1 network, 3 blocks
    python benchmarks/bench_train.py --device cuda --backend cupy   # on a GPU
    python benchmarks/bench_train.py --layers   # the default network layer by layer (CPU)

Both peers get the same threads (NumPy's BLAS and ``torch.set_num_threads``).
Blocks alternate between the peers after a warm-up, with a short pause, and
the reported figure is the median over blocks of clips per second.

``--layers`` instead times every convolution, batch norm and non-local block of
the default network on its own (forward + backward, on the input it gets in a
training step and a random output gradient), alternating the peers, to show
where the time of a step goes.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# OpenBLAS (NumPy's BLAS) keeps its worker threads spinning for about 2^28 cycles after every
# product, which in a training step means always. On the 2-core test VM that made nlref's
# step about 2x slower for minutes at a time, at random (the spinning core ran slowly, see
# docs/benchmarks.md); with the workers going to sleep right after each product (2^4
# cycles) that slow mode did not occur. OpenBLAS reads this when NumPy loads it.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "nn"))

import ceiling  # noqa: E402
from _args import whole  # noqa: E402
import nlref.backend as B  # noqa: E402
from nlref.data.sprites import sprite_clips  # noqa: E402
from nlref.nn import functional as F  # noqa: E402
from nlref.nn.optim import Adam  # noqa: E402
from nlref.train import TrainConfig, build_model  # noqa: E402

NETWORKS = {
    "NL C2D (default)": dict(),
    "C2D baseline": dict(nonlocal_blocks=0),
    "NL I3D": dict(model="i3d"),
}


def nlref_steps(net, optimiser, batches):
    for x, y in batches:
        logits = net.forward(x, dropout_seed=0)
        _, cache = F.softmax_cross_entropy_forward(logits, y)
        net.backward(F.softmax_cross_entropy_backward(1.0, cache), input_grad=False)
        optimiser.step()


def torch_steps(torch, tnet, optimiser, batches):
    for x, y in batches:
        optimiser.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(tnet(x), y)
        loss.backward()
        optimiser.step()


def _leaves(net, tnet):
    """(name, nlref layer, torch module) for every conv, batch norm and non-local block, in network order."""
    from nlref.nn import models as M
    from torch_oracle import TorchConvBN, TorchResidualBlock

    out = []
    for (name, layer), unit in zip(net.layers[:-1], tnet.units):
        if isinstance(layer, M.NonLocal):
            out.append((name, layer, unit))
            continue
        pairs = [(name, layer, unit)] if isinstance(unit, TorchConvBN) else [
            (f"{name}.{sub}", nl_unit, t_unit) for (sub, nl_unit), (_, t_unit) in zip(layer.children(), unit.units())]
        assert isinstance(unit, (TorchConvBN, TorchResidualBlock))
        for prefix, nl_unit, t_unit in pairs:
            out += [(f"{prefix}.conv", nl_unit.conv, t_unit.conv), (f"{prefix}.bn", nl_unit.bn, t_unit.bn)]
    return out


def layer_work(layer, h, out, input_grad):
    """("GFLOP/s", flops) or ("GB/s", bytes) of one forward + backward of ``layer`` on ``h``.

    Convolutions and the non-local block count the multiply-adds of their
    products (2 flops each; the backward twice the forward, once without the
    input's gradient); batch norm counts its passes over the tensor (forward:
    read x, write y; backward: read x and dy, write dx), a lower bound of its
    memory traffic.
    """
    from bench_block import matmul_flops

    from nlref.nn import models as M

    if isinstance(layer, M.Conv3d):
        w = layer.params["weight"]
        forward = 2 * out.size * math.prod(w.shape[1:])
        return "GFLOP/s", forward * (3 if input_grad else 2)
    if isinstance(layer, M.NonLocal):
        block = layer.block
        if block.inter_channels * 2 != block.in_channels or h.ndim != 5:
            return None, None
        return "GFLOP/s", matmul_flops(block.mode, h.shape, block.sub_sample)
    return "GB/s", 5 * h.nbytes


def layer_table(torch, net, tnet, x, repeats, ceilings):
    """Markdown rows: forward + backward of every leaf layer alone, nlref vs PyTorch, median ms.

    ``ceilings``: (matmul GFLOP/s, copy GB/s as a function of bytes); each row
    gives nlref's achieved rate and its fraction of the matching ceiling.
    """
    matmul, copy_rate = ceilings
    leaves = _leaves(net, tnet)
    inputs = {}
    for name, layer, _ in leaves:  # record what each layer gets in a training step
        def record(h, _forward=layer.forward, _name=name):
            inputs[_name] = h
            return _forward(h)
        layer.forward = record
    net.forward(x, dropout_seed=0)
    for _, layer, _ in leaves:
        del layer.forward
    rng = np.random.default_rng(0)
    rows, totals = [], [0.0, 0.0]
    for name, layer, module in leaves:
        h = inputs[name]
        out = layer.forward(h)
        d = np.empty_like(out)  # the output's storage order, as a network's gradient has it
        d[...] = rng.standard_normal(out.shape)
        first = {"input_grad": False} if name == "stem.conv" else {}  # as in training: no gradient for the clips
        layer.backward(d, **first)
        th = torch.from_numpy(np.ascontiguousarray(h)).requires_grad_(not first)
        td = torch.from_numpy(np.ascontiguousarray(d))

        def ours():
            layer.forward(h)
            layer.backward(d, **first)

        def theirs():
            module(th).backward(td)

        times = {ours: [], theirs: []}
        for _ in range(repeats):
            for f in (ours, theirs):
                t0 = time.perf_counter()
                f()
                times[f].append(time.perf_counter() - t0)
        a, b = (statistics.median(times[f]) * 1e3 for f in (ours, theirs))
        totals[0] += a
        totals[1] += b
        shape = "x".join(str(n) for n in h.shape)
        unit, work = layer_work(layer, h, out, not first)
        if unit is None:
            rate = "| - | -"
        else:
            achieved = work / (a / 1e3) / 1e9
            limit = matmul if unit == "GFLOP/s" else copy_rate(h.nbytes)
            rate = f"| {achieved:.1f} {unit} | {achieved / limit:.0%}"
        rows.append(f"| {name} | {shape} | {a:.3f} | {b:.3f} | {a / b:.2f} {rate} |")
    rows.append(f"| all of the above | | {totals[0]:.2f} | {totals[1]:.2f} | {totals[0] / totals[1]:.2f} | | |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--blocks", type=whole(1), default=7, help="timed blocks per peer")
    parser.add_argument("--steps", type=whole(1), default=10, help="training steps per block")
    parser.add_argument("--batch-size", type=whole(1), default=32)
    parser.add_argument("--threads", type=whole(1), default=os.cpu_count())
    parser.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    parser.add_argument("--device", default="cpu", help="PyTorch device (cpu or cuda)")
    parser.add_argument("--per-block", action="store_true", help="also print every block's clips/s")
    parser.add_argument("--layers", action="store_true", help="time the default network's layers one by one")
    args = parser.parse_args()

    import torch
    from torch_oracle import TorchVideoNet, load_videonet_params

    torch.set_num_threads(args.threads)
    retained = B.retain_freed_memory()  # both peers run in this process, under the same allocator settings
    xp = np
    if args.backend == "cupy":
        import cupy as xp
    blocks = 3 if args.quick else args.blocks
    networks = dict(list(NETWORKS.items())[:1]) if args.quick else NETWORKS
    print(f"# training throughput: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.threads} threads, numpy {np.__version__}, torch {torch.__version__}, float32, "
          f"batch {args.batch_size}, clips 1x8x16x16, {blocks} blocks of {args.steps} steps, median, "
          f"glibc keeps freed memory: {retained}, OPENBLAS_THREAD_TIMEOUT={os.environ['OPENBLAS_THREAD_TIMEOUT']}")
    clips = sprite_clips(args.batch_size * args.steps, seed=0, size=16)
    if args.layers:
        if xp is not np or args.device != "cpu":
            parser.error("--layers times the NumPy and PyTorch CPU peers only")
        net = build_model(TrainConfig(dropout=0.0))
        tnet = load_videonet_params(TorchVideoNet(net).float(), net)
        gflops, copies = ceiling.matmul_gflops(), {}

        def copy_rate(nbytes):
            if nbytes not in copies:
                copies[nbytes] = ceiling.copy_gbs(nbytes)
            return copies[nbytes]

        table = layer_table(torch, net, tnet, clips.video[:args.batch_size], 5 if args.quick else 21,
                            (gflops, copy_rate))
        print(f"\nforward + backward of each layer alone, median of {5 if args.quick else 21} alternating runs, "
              "ms; nlref's achieved rate and its share of this machine's ceiling (matmul for products, a copy "
              "of the same bytes for batch norm)\n")
        print(ceiling.describe(gflops, {f"{n / 2**20:.1f} MiB": r for n, r in sorted(copies.items())}) + "\n")
        print("| layer | input | nlref | PyTorch | ratio (nlref / PyTorch time) | nlref rate | of ceiling |\n"
              "|---|---|---|---|---|---|---|")
        print("\n".join(table))
        return
    print("\n| network | params | nlref clips/s | PyTorch clips/s | ratio (nlref / PyTorch) |\n|---|---|---|---|---|")
    for label, overrides in networks.items():
        config = TrainConfig(**overrides, dropout=0.0)        # no dropout: both peers do identical work
        net = build_model(config, xp=None if xp is np else xp)
        tnet = TorchVideoNet(net).to(args.device).float()
        load_videonet_params(tnet, net)
        tnet.train()
        net.train()
        opt = Adam(net, lr=config.lr, weight_decay=config.weight_decay)
        decay = [p for n, p in tnet.named_parameters() if not net.no_decay(n)]
        rest = [p for n, p in tnet.named_parameters() if net.no_decay(n)]
        topt = torch.optim.Adam([{"params": decay, "weight_decay": config.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=config.lr)
        ours, theirs = [], []
        for i in range(args.steps):
            sl = slice(i * args.batch_size, (i + 1) * args.batch_size)
            x, y = clips.video[sl], clips.labels[sl]
            ours.append((B.asarray(x, xp=xp), B.asarray(y, xp=xp)))
            theirs.append((torch.from_numpy(x).to(args.device), torch.from_numpy(y).to(args.device)))

        def sync():
            if args.device != "cpu":
                torch.cuda.synchronize()
            if xp is not np:
                xp.cuda.Device().synchronize()

        nlref_steps(net, opt, ours[:3])
        torch_steps(torch, tnet, topt, theirs[:3])
        rates = {"nlref": [], "torch": []}
        for _ in range(blocks):
            for peer in ("nlref", "torch"):
                time.sleep(0.2)
                sync()
                t0 = time.perf_counter()
                if peer == "nlref":
                    nlref_steps(net, opt, ours)
                else:
                    torch_steps(torch, tnet, topt, theirs)
                sync()
                rates[peer].append(args.steps * args.batch_size / (time.perf_counter() - t0))
        if args.per_block:
            print(f"<!-- {label}: nlref {[round(r) for r in rates['nlref']]}, "
                  f"PyTorch {[round(r) for r in rates['torch']]} -->")
        a, b = statistics.median(rates["nlref"]), statistics.median(rates["torch"])
        ratios = [r / t for r, t in zip(rates["nlref"], rates["torch"])]
        print(f"| {label} | {net.num_params():,} | {a:.0f} | {b:.0f} | {a / b:.2f} "
              f"(blocks {min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
