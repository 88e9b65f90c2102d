"""NL-means on Dask: a volume larger than 2 GB on disk, denoised chunk by chunk; peers on a piece that fits.

Run it alone (other engineers share the CPUs of the benchmark machine)::

    flock /tmp/nlref-bench.lock python benchmarks/bench_dask.py

1. Generates a noisy float32 volume of ``--size-gb`` (default 2.1) as an
   uncompressed Zarr store in ``--dir`` (default /tmp), chunk by chunk on a
   LocalCluster (no process holds the whole volume), and deletes it at the end.
2. On a piece that fits in memory (``--piece``), single-threaded, median of
   ``--repeats``: in-memory ``nl_means``; ``nl_means`` of the piece as a Dask
   array and ``nl_means_store`` of it at each chunk size (bitwise comparison,
   halo overhead in time and bytes); scikit-image's ``denoise_nl_means`` on
   the whole piece and through ``apply_parallel`` at the same chunk size and
   depth; PSNR of each.
3. The whole volume, read from the store and written to another one by
   ``nl_means_store`` (each task reads its chunk and halo from the store),
   with ``--workers`` worker processes (one thread each) at each chunk size:
   throughput (voxels/s), tasks per chunk, the halo's extra bytes, the peak
   RSS of a worker during the run (its VmHWM, reset before the run) against
   (chunk + halo) bytes; once, the parameters with the exact noise estimate
   of the whole volume; and once the same run through ``nl_means`` of
   ``da.from_zarr(...)`` (``map_overlap``), for the memory its workers hold.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import nlref
from _args import positive, whole, wholes
from nlref.nlmeans.fast import halo

from ceiling import median_seconds


def clean_block(block_info=None):
    """The clean signal of one chunk (nlref.data.waves), from the chunk's global position."""
    return nlref.data.waves(block_info[None]["array-location"])


def noisy_block(block_info=None, *, sigma, seed):
    """clean + Gaussian noise, seeded by the chunk's position."""
    rng = np.random.default_rng([seed, *block_info[None]["chunk-location"]])
    clean = clean_block(block_info)
    return clean + (sigma * rng.standard_normal(clean.shape)).astype(np.float32)


def clean_piece(shape):
    """The clean signal of the piece [0:n_0, 0:n_1, ...] (the same function as the chunks)."""
    return nlref.data.waves([(0, n) for n in shape])


def _lazy(block, shape, chunks, **kwargs):
    import dask.array as da

    grid = da.empty(shape, chunks=chunks, dtype=np.float32).chunks
    return da.map_blocks(block, chunks=grid, dtype=np.float32, meta=np.empty((0,) * len(shape), np.float32),
                         **kwargs)


def disk_bytes(path):
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])


def halo_bytes_ratio(shape, chunk, depth):
    """(sum over chunks of chunk + halo volume) / volume, for a regular grid of chunks."""
    ratio = 1.0
    for n, c, m in zip(shape, chunk, depth):
        count = math.ceil(n / c)
        ratio *= (n + 2 * m * count) / n
    return ratio


def _reset_peak_rss():
    """Reset this process's peak RSS (Linux: clear_refs 5) and return its current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _warm(patch, search, sigma):
    """Import nlref and run it once in the worker, so that the measured peak is the run's, not the imports'."""
    import nlref as lib

    lib.nl_means(np.zeros((8, 16, 16), np.float32) + 0.5, sigma=sigma, h=0.1, patch_size=patch, search_size=search)


def _peak_rss():
    return _status("VmHWM")


def generate(path, shape, chunks, sigma, workers):
    import dask.array as da
    import zarr
    from distributed import Client, LocalCluster

    volume = _lazy(noisy_block, shape, chunks, sigma=sigma, seed=0)
    target = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="float32", compressors=None)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        client.compute(da.store(volume, target, lock=False, compute=False), sync=True)
        return time.perf_counter() - t0


def piece_comparison(path, piece, chunk_sizes, patch, search, sigma, repeats):
    import dask
    import dask.array as da
    import zarr
    from skimage.restoration import denoise_nl_means
    from skimage.util import apply_parallel

    from nlref.nlmeans.chunked import nl_means_store

    noisy = zarr.open_array(str(path), mode="r")[tuple(slice(0, n) for n in piece)]
    clean = clean_piece(piece)
    kw = dict(sigma=sigma, patch_size=patch, search_size=search)
    h = nlref.resolve_parameters(noisy, **kw)["h"]
    kw["h"] = h
    depth = halo((patch,) * 3, (search,) * 3)
    rows = []
    with dask.config.set(scheduler="synchronous"):
        ref = nlref.nl_means(noisy, workers=1, **kw)
        t_mem = median_seconds(lambda: nlref.nl_means(noisy, workers=1, **kw), repeats)
        rows.append(("nlref nl_means, in memory", "-", t_mem, 1.0, nlref.psnr(clean, ref, data_range=1.0), "-"))
        sk_kw = dict(patch_size=patch, patch_distance=search // 2, h=h, sigma=sigma, fast_mode=True)
        sk_ref = denoise_nl_means(noisy, **sk_kw)
        for c in chunk_sizes:
            x = da.from_array(noisy, chunks=c)
            out = nlref.nl_means(x, **kw).compute()
            same = "bitwise" if np.array_equal(out, ref) else f"max diff {np.abs(out - ref).max():.1e}"
            t = median_seconds(lambda: nlref.nl_means(x, **kw).compute(), repeats)
            extra = halo_bytes_ratio(piece, (c,) * 3, depth) - 1
            rows.append((f"nlref nl_means, Dask chunks {c}", f"+{extra:.0%}", t, t / t_mem,
                         nlref.psnr(clean, out, data_range=1.0), same))
        for c in chunk_sizes:
            out = nl_means_store(noisy, chunks=c, **kw).compute()
            same = "bitwise" if np.array_equal(out, ref) else f"max diff {np.abs(out - ref).max():.1e}"
            t = median_seconds(lambda: nl_means_store(noisy, chunks=c, **kw).compute(), repeats)
            extra = halo_bytes_ratio(piece, (c,) * 3, depth) - 1
            rows.append((f"nlref nl_means_store, chunks {c}", f"+{extra:.0%}", t, t / t_mem,
                         nlref.psnr(clean, out, data_range=1.0), same))
        t_sk = median_seconds(lambda: denoise_nl_means(noisy, **sk_kw), repeats)
        rows.append(("skimage denoise_nl_means, in memory", "-", t_sk, t_sk / t_mem,
                     nlref.psnr(clean, sk_ref, data_range=1.0), "-"))
        for c in chunk_sizes:
            def run():
                return apply_parallel(denoise_nl_means, noisy, chunks=c, depth=depth[0], extra_keywords=sk_kw,
                                      dtype=np.float32, compute=True)
            out = run()
            t = median_seconds(run, repeats)
            rows.append((f"skimage apply_parallel, chunks {c}", "-", t, t / t_mem, nlref.psnr(clean, out, data_range=1.0),
                         f"max diff {np.abs(out - sk_ref).max():.1e} vs skimage in memory"))
    print(f"\npiece {piece} float32, sigma {sigma}, patch {patch}, search {search}, h {h:.4f}, one thread, "
          f"median of {repeats}; noisy PSNR {nlref.psnr(clean, noisy, data_range=1.0):.2f} dB")
    print("| method | halo bytes | time (s) | vs nlref in memory | PSNR (dB) | equal to in memory |")
    print("|---|---|---|---|---|---|")
    for name, extra, t, ratio, p, same in rows:
        print(f"| {name} | {extra} | {t:.2f} | {ratio:.2f}x | {p:.2f} | {same} |")


def volume_run(path, out_path, shape, chunk, workers, patch, search, sigma, route, estimate):
    """The whole volume, store -> store: ``route`` "store" (nl_means_store) or "dask" (nl_means of da.from_zarr)."""
    import dask.array as da
    import zarr
    from distributed import Client, LocalCluster

    from nlref.nlmeans.chunked import nl_means_store, resolve_parameters_store

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster, Client(cluster) as client:
        source = zarr.open_array(str(path), mode="r")
        if estimate:
            t0 = time.perf_counter()
            p = resolve_parameters_store(source, chunks=chunk, patch_size=patch, search_size=search)
            t_sigma = time.perf_counter() - t0
            print(f"  parameters with the exact noise estimate of the whole volume (store route, {chunk}^3 tasks): "
                  f"sigma {p['sigma']:.5f} (true {sigma}) in {t_sigma:.1f} s", flush=True)
        t0 = time.perf_counter()
        kw = dict(sigma=sigma, patch_size=patch, search_size=search)
        if route == "store":
            out = nl_means_store(source, chunks=chunk, **kw)  # resolves h: one finiteness pass
        else:
            out = nlref.nl_means(da.from_zarr(str(path)).rechunk(chunk, method="tasks"), **kw)
        t_check = time.perf_counter() - t0
        target = zarr.create_array(str(out_path), shape=shape, chunks=(chunk,) * 3, dtype="float32",
                                   compressors=None)
        store = da.store(out, target, lock=False, compute=False)
        tasks = len(store.__dask_graph__())
        client.run(_warm, patch, search, sigma)
        base = client.run(_reset_peak_rss)
        t0 = time.perf_counter()
        client.compute(store, sync=True)
        seconds = time.perf_counter() - t0
        peaks = client.run(_peak_rss)
    depth = halo((patch,) * 3, (search,) * 3)
    block = math.prod(c + 2 * m for c, m in zip((chunk,) * 3, depth)) * 4
    peak = max(peaks.values())
    grow = max(peaks[w] - base[w] for w in peaks)
    return dict(route=route, workers=workers, chunk=chunk, seconds=seconds, check=t_check,
                rate=math.prod(shape) / seconds, extra=halo_bytes_ratio(shape, (chunk,) * 3, depth) - 1, peak=peak,
                grow=grow, block=block, tasks=tasks, chunks=out.npartitions)


def check_plan(parser, args, shape, piece):
    """Refuse, before the volume is written, a piece or patch that does not fit, or a folder without room."""
    if not args.dir.is_dir():
        parser.error(f"--dir {str(args.dir)!r} is not an existing folder")
    if any(p > s for p, s in zip(piece, shape)):
        parser.error(f"--piece {','.join(map(str, piece))} does not fit in the volume {shape}")
    if args.patch > min(piece) or args.search > min(piece):
        parser.error(f"--patch {args.patch} and --search {args.search} must fit in the piece {piece}")
    needed = 2 * 4 * math.prod(shape)  # the input and the output store, uncompressed float32
    free = shutil.disk_usage(args.dir).free
    if needed > free:
        parser.error(f"--dir {str(args.dir)!r} has {free / 1e9:.1f} GB free; the input and output stores of "
                     f"--size-gb {args.size_gb:g} need {needed / 1e9:.1f} GB")


_TERMINATED = []


def _terminate(*_):
    """SIGTERM (a timeout, a job scheduler): leave through ``finally``, which removes the stores."""
    _TERMINATED.append(True)
    sys.exit(128 + signal.SIGTERM)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=positive, default=2.1, help="volume size on disk, 1e9 bytes (default 2.1)")
    parser.add_argument("--plane", type=whole(1), default=1024, help="height = width of the volume (default 1024)")
    parser.add_argument("--chunks", type=wholes(1), default=[64, 128], help="chunk sizes to compare (default 64,128)")
    parser.add_argument("--workers", type=wholes(1), default=[1, 2], help="worker counts to compare (default 1,2)")
    parser.add_argument("--patch", type=whole(1, odd=True), default=3)
    parser.add_argument("--search", type=whole(1, odd=True), default=5)
    parser.add_argument("--sigma", type=positive, default=0.1)
    parser.add_argument("--piece", type=wholes(1, count=3), default=[32, 256, 256],
                        help="the in-memory piece (default 32,256,256)")
    parser.add_argument("--repeats", type=whole(1), default=5)
    parser.add_argument("--dir", type=Path, default=Path("/tmp"), help="an existing folder where the Zarr stores go "
                        "(deleted at the end, and on Ctrl-C or SIGTERM)")
    parser.add_argument("--keep", action="store_true", help="keep the generated store")
    parser.add_argument("--no-dask-route", dest="dask_route", action="store_false",
                        help="skip the run through nl_means of a Dask array (map_overlap)")
    args = parser.parse_args(argv)

    chunk_sizes, worker_counts, piece = args.chunks, args.workers, tuple(args.piece)
    store_chunk = math.gcd(*chunk_sizes)
    depth_n = math.ceil(args.size_gb * 1e9 / (4 * args.plane**2) / store_chunk) * store_chunk
    shape = (depth_n, args.plane, args.plane)
    path = args.dir / "nlref-bench-dask-input.zarr"
    out_path = args.dir / "nlref-bench-dask-output.zarr"
    check_plan(parser, args, shape, piece)
    signal.signal(signal.SIGTERM, _terminate)  # the stores go in `finally` too

    import dask
    import distributed
    import skimage

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; numpy {np.__version__}, "
          f"dask {dask.__version__}, distributed {distributed.__version__}, scikit-image {skimage.__version__}")
    try:
        for p in (path, out_path):
            shutil.rmtree(p, ignore_errors=True)
        seconds = generate(path, shape, (store_chunk,) * 3, args.sigma, max(worker_counts))
        size = disk_bytes(path)
        print(f"generated {shape} float32 ({math.prod(shape) / 1e6:.0f} M voxels), {size / 1e9:.2f} GB on disk "
              f"(Zarr, uncompressed, chunks {store_chunk}^3) in {seconds:.1f} s")

        piece_comparison(path, piece, chunk_sizes, args.patch, args.search, args.sigma, args.repeats)

        print(f"\nwhole volume {shape}, patch {args.patch}, search {args.search}, store -> store, one thread per "
              "worker process")
        print("| route | workers | chunk | tasks / chunk | halo bytes | time (s) | voxels/s | worker peak RSS | "
              "of which the run | run / (chunk + halo) bytes |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        configs = [("store", w, c) for c in chunk_sizes for w in worker_counts
                   if w == max(worker_counts) or c == chunk_sizes[0]]
        if args.dask_route:  # the Dask-array route (map_overlap) once, for the memory it holds
            configs.append(("dask", max(worker_counts), chunk_sizes[0]))
        estimate_at = next(cfg for cfg in configs if cfg[1] == max(worker_counts))  # the noise estimate, once
        for route, w, c in configs:
            r = volume_run(path, out_path, shape, c, w, args.patch, args.search, args.sigma, route,
                           estimate=(route, w, c) == estimate_at)
            shutil.rmtree(out_path, ignore_errors=True)
            name = "nl_means_store" if route == "store" else "nl_means(da.from_zarr)"
            print(f"| {name} | {r['workers']} | {r['chunk']}^3 | {r['tasks'] / r['chunks']:.1f} | +{r['extra']:.1%} | "
                  f"{r['seconds']:.1f} | {r['rate'] / 1e6:.2f} M | {r['peak'] / 2**20:.0f} MiB | "
                  f"{r['grow'] / 2**20:.0f} MiB | {r['grow'] / r['block']:.1f} |", flush=True)
    finally:
        shutil.rmtree(out_path, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException as err:
        # SystemExit can land inside Dask's cluster start or close, whose clean-up may raise another error in its
        # place (once, on a loaded machine, the script then ended with status 1); a SIGTERM is reported as one
        if _TERMINATED and not (isinstance(err, SystemExit) and err.code == 128 + signal.SIGTERM):
            print(f"bench_dask: stopped by SIGTERM (then {type(err).__name__}: {err})", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        raise
