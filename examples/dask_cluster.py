"""NL-means of a volume on a dask.distributed cluster, chunk by chunk, with a progress bar.

Here (a LocalCluster of processes on this machine)::

    python examples/dask_cluster.py --workers 2 --shape 64,512,512 --chunks 64

On a real cluster, start a scheduler and workers there (``dask scheduler``,
``dask worker tcp://HOST:8786``; every worker needs nlref installed) and give
its address; the same code runs unchanged::

    python examples/dask_cluster.py --scheduler tcp://HOST:8786 --shape 256,2048,2048 --chunks 128

The noisy volume is generated on the workers, chunk by chunk (seeded per
chunk, so no process ever holds the whole of it) and denoised as a Dask
array; ``--zarr PATH`` denoises a Zarr store instead with
``nl_means_store``, each task opening the store by its absolute path and
reading its chunk and halo (a path every worker can read). The result is
streamed chunk by chunk into the Zarr store ``--out`` (a path every worker
can write; it must not exist yet): the cluster never holds the whole result.
The script then prints the throughput and, for synthetic input, the PSNR of
the noisy and denoised volumes, read back from the store chunk by chunk.
See docs/dask.md.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import nlref


def clean_block(block_info=None):
    """The clean signal of one chunk (smooth waves, 0.2 .. 0.8), from the chunk's global position."""
    return nlref.data.waves(block_info[None]["array-location"])


def noise_block(block_info=None, *, sigma, seed):
    """Gaussian noise of one chunk, seeded by the chunk's position (reproducible, chunk-local)."""
    info = block_info[None]
    rng = np.random.default_rng([seed, *info["chunk-location"]])
    return (sigma * rng.standard_normal(info["chunk-shape"])).astype(np.float32)


def synthetic(shape, chunks, sigma, seed=0):
    """(clean, noisy) lazy float32 volumes, generated chunk by chunk on the workers."""
    import dask.array as da

    clean = da.map_blocks(clean_block, chunks=da.empty(shape, chunks=chunks).chunks, dtype=np.float32,
                          meta=np.empty((0,) * len(shape), np.float32))
    noise = da.map_blocks(noise_block, chunks=clean.chunks, dtype=np.float32, sigma=sigma, seed=seed,
                          meta=np.empty((0,) * len(shape), np.float32))
    return clean, clean + noise


def _ints(text):
    parts = tuple(int(p) for p in text.split(","))
    return parts[0] if len(parts) == 1 else parts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", help="address of a running scheduler (default: start a LocalCluster)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    parser.add_argument("--shape", type=_ints, default=(64, 512, 512), help="synthetic volume (default 64,512,512)")
    parser.add_argument("--chunks", type=_ints, default=64, help="chunk size, or one per axis (default 64)")
    parser.add_argument("--zarr", help="denoise this Zarr store instead of a synthetic volume")
    parser.add_argument("--out", default="denoised.zarr",
                        help="Zarr store for the result, not existing yet (default denoised.zarr)")
    parser.add_argument("--sigma", type=float, default=0.1, help="noise level (default 0.1; estimated for --zarr)")
    parser.add_argument("--patch-size", type=_ints, default=3)
    parser.add_argument("--search-size", type=_ints, default=5)
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)  # absolute here: a worker runs in another folder, often on another machine
    if os.path.exists(out):
        parser.error(f"--out {args.out!r} already exists; remove it or choose another name")

    import dask.array as da
    import zarr
    from distributed import Client, LocalCluster, progress

    if args.scheduler:
        client = Client(args.scheduler)
    else:
        client = Client(LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True))
    print(f"dashboard: {client.dashboard_link}")
    with client:
        kwargs = dict(patch_size=args.patch_size, search_size=args.search_size)
        t0 = time.perf_counter()
        if args.zarr:  # each task opens the store and reads its chunk and halo: a worker holds only its own chunks
            clean, noisy = None, zarr.open_array(args.zarr, mode="r")
            denoised = nlref.nl_means_store(noisy, chunks=args.chunks, **kwargs)  # sigma estimated on the workers
        else:  # a Dask array made on the workers: map_overlap brings each chunk its neighbours' halo
            clean, noisy = synthetic(args.shape, args.chunks, args.sigma)
            denoised = nlref.nl_means(noisy, sigma=args.sigma, **kwargs)
        print(f"{noisy.shape} {noisy.dtype} in {denoised.npartitions} chunks of {denoised.chunksize}; "
              f"parameters resolved in {time.perf_counter() - t0:.1f} s")
        # streamed into the store chunk by chunk (every chunk written, also one equal to the fill value)
        target = zarr.create_array(out, shape=denoised.shape, chunks=denoised.chunksize, dtype=denoised.dtype,
                                   config={"write_empty_chunks": True})
        t0 = time.perf_counter()
        future = client.compute(denoised.store(target, lock=False, compute=False))
        progress(future)  # a bar in the terminal (and in the dashboard)
        future.result()
        print()
        seconds = time.perf_counter() - t0
        if target.nchunks_initialized != target.nchunks:
            raise SystemExit(f"{out} holds {target.nchunks_initialized} of {target.nchunks} chunks: a worker wrote "
                             "elsewhere (is the path the same on every machine?)")
        print(f"denoised in {seconds:.1f} s: {denoised.size / seconds / 1e6:.2f} million voxels/s -> {out}")
        if clean is not None:
            result = da.from_zarr(out)
            before, after = client.compute([nlref_psnr(clean, noisy), nlref_psnr(clean, result)], sync=True)
            print(f"PSNR {before:.2f} dB -> {after:.2f} dB")


def nlref_psnr(clean, image, data_range=1.0):
    """PSNR as a lazy dask scalar (a reduction over the chunks)."""
    import dask.array as da

    return 10 * da.log10(data_range**2 / ((image - clean) ** 2).mean())


if __name__ == "__main__":
    main()
