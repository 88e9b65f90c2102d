"""``nlref denoise`` chunk by chunk: a Zarr store, TIFF stack, HDF5 or .npy file streamed with Dask."""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from nlref._files import WriteError, absolute, writing_target
from nlref.backend import available_memory
from nlref.cli._common import (CommandError, _count, _warned, flag_names, refuse_existing, say,
                               stack_note, writable_folder)

#: The parameters of NL-means as the flags of ``nlref denoise`` (for the messages of the library's checks).
FLAGS = {"sigma": "--sigma", "h": "--h", "patch_size": "--patch-size", "search_size": "--search-size",
         "aggregation": "--aggregation", "method": "--method", "chunks": "--chunks"}


def _is_zarr(folder):
    return any((folder / name).exists() for name in ("zarr.json", ".zarray", ".zgroup"))


def _is_chunked(args):
    """Stream with Dask when the input is a Zarr store, or a Zarr output or chunks are asked for."""
    image = None if args.image is None else str(args.image).rstrip("/")
    zarr_dir = image is not None and Path(image).is_dir() and _is_zarr(Path(image))
    return (image is not None and (image.endswith(".zarr") or zarr_dir)
            or str(args.out).rstrip("/").endswith(".zarr") or args.chunks is not None)


def _open_chunked(path):
    """An opener of the array in a Zarr store, TIFF stack, HDF5 file or .npy file (reads the metadata only)."""
    from nlref.nlmeans.store import Opener, as_source

    if path.is_dir():
        return _open_zarr(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            return Opener.tiff(path)
        except (tifffile.TiffFileError, ValueError, IndexError, OSError) as err:  # not a TIFF, or damaged
            raise CommandError(f"IMAGE {str(path)!r}: not a TIFF file a chunked run can read ({err})") from None
    if suffix == ".npy":  # a memory map of the file: each task reads its chunk, never the whole
        try:
            mapped = np.load(path, mmap_mode="r")
        except ValueError as err:  # not a .npy header NumPy reads, or an object array (it cannot be mapped)
            raise CommandError(f"IMAGE {str(path)!r}: not a NumPy array file a chunked run can map ({err})") from None
        return as_source(mapped)
    if suffix in (".h5", ".hdf5"):
        try:
            import h5py
        except ImportError as err:
            raise CommandError(f"IMAGE {str(path)!r}: reading HDF5 needs h5py: pip install h5py ({err})") from None
        try:
            with h5py.File(path, "r") as f:
                names = []
                f.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
        except OSError as err:  # not an HDF5 file, or a damaged one
            raise CommandError(f"IMAGE {str(path)!r}: not an HDF5 file a chunked run can read ({err})") from None
        if len(names) != 1:
            raise CommandError(f"IMAGE {str(path)!r}: a chunked run reads an HDF5 file holding one dataset; this one "
                               f"holds {len(names)} ({', '.join(names[:5])})")
        return Opener.hdf5(path, names[0])
    raise CommandError(f"IMAGE {str(path)!r}: a chunked run reads a Zarr store (a folder), a TIFF stack (.tif, .tiff), "
                       f"an HDF5 file (.h5, .hdf5) or a NumPy file (.npy)")


def _open_zarr(path):
    """An opener of the Zarr array in the folder ``path``: the store's array, or the one array of a group."""
    import zarr

    from nlref.nlmeans.store import Opener

    try:
        node = zarr.open(str(path), mode="r")
    except (ValueError, OSError) as err:  # no zarr.json / .zarray / .zgroup there, or a damaged one
        raise CommandError(f"IMAGE {str(path)!r}: a folder that is not a Zarr store a chunked run can read "
                           f"({err})") from None
    if isinstance(node, zarr.Array):
        return Opener.zarr(path)
    names = sorted(name for name, item in node.members(max_depth=None) if isinstance(item, zarr.Array))
    if len(names) != 1:  # as for an HDF5 file: which array is meant is not ours to guess
        raise CommandError(f"IMAGE {str(path)!r}: a chunked run reads a Zarr group holding one array; this one holds "
                           f"{len(names)} ({', '.join(names[:5])})")
    return Opener.zarr(path, key=names[0])


def _running(names, dask_worker=None):
    """The tasks of the graph layers ``names`` a worker still runs (run on the worker; a cancelled task runs on).

    A name is matched within the key: the optimiser fuses layers into keys that join their names.
    """
    states = ("executing", "long-running", "cancelled", "resumed")
    return [str(k) for k, task in dask_worker.state.tasks.items()
            if task.state in states and any(name in str(k) for name in names)]


def _wait_for_running_tasks(client, keys, timeout=60.0):
    """Wait (at most ``timeout`` s) until no worker runs a task of ``keys``: cancelling does not stop a running task."""
    names = sorted({k[0] if isinstance(k, tuple) else str(k) for k in keys})
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if not any(client.run(_running, names).values()):
                return
        except Exception:  # noqa: BLE001 -- a lost connection: nothing more to wait for from here
            return
        time.sleep(0.1)


#: Without --chunks and without a chunk grid in the file, a chunk holds about this many samples per channel
#: (64^3: 64 per axis for a volume, 512 x 512 for an image), and at least 64 along every axis.
DEFAULT_CHUNK_SAMPLES = 64**3


def default_chunk(spatial_dims):
    """The chunk size per spatial axis of a run without --chunks on a file with no chunk grid (TIFF, .npy).

    64 per axis was the default for every file: a 4096 x 4096 image became 4,096 tasks of 64 x 64
    samples, and ran 4.5 times as long as in 512 x 512 chunks (5.4 s against 1.2 s on 2 cores, patch
    3, search 7), each task's halo a large share of its read. Volumes keep 64.
    """
    return max(64, round(DEFAULT_CHUNK_SAMPLES ** (1 / spatial_dims)))


def _threads_that_fit(need, threads):
    """How many of ``threads`` tasks of ``need`` bytes of working memory each fit in the memory available now.

    Each local thread runs one chunk's task at a time, so a run holds about threads x ``need``.
    The per-chunk limit (``nlref.nlmeans.WORKING_MEMORY_LIMIT``) does not see the threads: chunks
    of 3 GiB each passed it, and 16 threads of them needed 48 GiB. A CommandError naming --chunks
    when not even one task fits; ``threads`` where the available memory is unknown. Returns the
    count and the bytes available (None: unknown).
    """
    available = available_memory()
    if available is None:
        return threads, None
    if need > available:
        raise CommandError(f"--chunks: one chunk's task needs about {need / 2**30:.2f} GiB of working memory, more "
                           f"than the {available / 2**30:.2f} GiB this machine has available; use smaller --chunks")
    return max(1, min(threads, available // need)), available


def run_denoise_chunked(args):
    """``nlref denoise big.zarr --chunks 64 --out clean.zarr``: chunk by chunk, never the whole volume.

    The input (a Zarr store, a TIFF stack, an HDF5 file with one dataset or a
    .npy file) is read by :func:`nlref.nlmeans.store.denoise_store`: one task
    per chunk of ``--chunks`` (default: the store's own chunks; otherwise
    :func:`default_chunk`, 64 per axis for a volume, 512 for an image), each opening the file by its absolute path and reading its
    chunk and halo (exact: equal to the in-memory result), on the local
    threads (as many as the available memory holds tasks of the largest
    chunk, at most one per core) or on the cluster at ``--scheduler``. The result is written chunk
    by chunk into a hidden Zarr store beside ``--out``, checked to hold every
    chunk, and renamed to ``--out`` (an existing store there is replaced only
    with ``--overwrite``), so an interrupted or failed run leaves no new
    ``--out``; once the tasks still running have finished, the hidden store
    is removed. A last axis of length 3 is taken as colour channels.
    """
    try:
        import dask
        import zarr
    except ImportError as err:
        raise CommandError(f"a chunked run needs the dask extra: pip install 'nlref[dask]' ({err})") from None
    import shutil
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from nlref.nlmeans.params import chunk_working_memory
    from nlref.nlmeans.store import check_chunk_memory, close_opened, denoise_store, resolve_parameters_store

    if args.image is None:
        raise CommandError("a chunked run (--chunks, or a .zarr input or output) needs IMAGE: a Zarr store, TIFF "
                           "stack, HDF5 or .npy file")
    # absolute here, where the paths are parsed: a worker of a cluster runs in another folder (with their
    # "link/.." kept: os.path.abspath dropped it as text, and read and wrote beside the link, not its target)
    source, out = Path(absolute(args.image)), Path(absolute(str(args.out).rstrip("/")))
    if not source.exists():
        raise CommandError(f"IMAGE {args.image!r} does not exist")
    if out.suffix != ".zarr":
        raise CommandError(f"--out must name a Zarr store (ending in .zarr) for a chunked run; got {args.out!r}")
    refuse_existing(Path(args.out), args.overwrite)
    if out.exists() and out.samefile(source):
        raise CommandError(f"--out {args.out!r} is IMAGE itself: it would overwrite the input; choose another name")
    real_source, real_out = source.resolve(), out.resolve()
    if real_out in real_source.parents:  # --overwrite would remove the folder, and the input with it
        raise CommandError(f"--out {args.out!r} holds IMAGE {args.image!r}: replacing it would delete the input; "
                           "choose another name")
    if real_source in real_out.parents:
        raise CommandError(f"--out {args.out!r} lies inside IMAGE {args.image!r}: it would change the input store; "
                           "choose a name outside it")
    if out.exists() and not (out.is_dir() and _is_zarr(out)):
        raise CommandError(f"--out {args.out!r} exists and is not a Zarr store; it is never replaced")
    if not out.parent.exists():
        raise CommandError(f"the folder of --out ({out.parent}) does not exist")
    if args.method != "fast":
        raise CommandError("a chunked run uses --method fast")
    # a store that --out links to is replaced where it is (the link kept, as for a file), not the link by a folder
    out = writing_target(out)
    # the result is written beside --out: a folder that cannot be written is the user's mistake, said now, not
    # after a pass over the data as an error about a hidden store (a full disk raises: the machine's failure)
    writable_folder(out.parent, "--out", args.out)
    image = _open_chunked(source)
    channel_axis = -1 if len(image.shape) >= 3 and image.shape[-1] == 3 else None
    # the store route checks --chunks (one place): its message is translated below
    chunks = args.chunks if args.chunks is not None else (
        None if image.chunks is not None else default_chunk(len(image.shape) - (channel_axis is not None)))

    client = None
    if args.scheduler is not None:
        from distributed import Client

        default = dask.config.get("scheduler", None)
        try:
            client = Client(args.scheduler)
        except (ValueError, OSError) as err:
            # a client that failed to start has already made itself the default scheduler: this process's
            # next dask.compute would ask for it ("no Client active")
            dask.config.set(scheduler=default)
            if isinstance(err, ValueError):  # not an address
                raise CommandError(f"--scheduler {args.scheduler!r}: not a scheduler address such as "
                                   f"tcp://HOST:8786 ({err})") from None
            # nothing answers there (a timeout), or the connection was refused
            raise CommandError(f"--scheduler {args.scheduler!r}: no scheduler could be reached there ({err}); "
                               "start one with `dask scheduler`, or leave --scheduler out to run on the local "
                               "threads") from None
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    threads = os.cpu_count() or 1
    pool, future, graph_keys = None, None, ()
    try:
        kwargs = dict(chunks=chunks, channel_axis=channel_axis, aggregation=args.aggregation)
        t0 = time.perf_counter()
        try:
            need = check_chunk_memory(image, patch_size=args.patch_size, search_size=args.search_size, **kwargs)
            if need is not None and client is None:  # before any pass over the data
                _threads_that_fit(need, threads)
            params = _warned(lambda: resolve_parameters_store(image, sigma=args.sigma, h=args.h,
                                                              patch_size=args.patch_size,
                                                              search_size=args.search_size, **kwargs), set())
        except (ValueError, TypeError) as err:  # the values the user typed: the message names their flags
            raise CommandError(flag_names(str(err), FLAGS)) from None
        say(f"sigma {params['sigma']:.3g} ({params['sigma_source']}), h {params['h']:.3g}, "
            f"patch {params['patch_size']}, search {params['search_size']}, {args.aggregation}-wise "
            f"(resolved for the whole array in {time.perf_counter() - t0:.1f} s){stack_note(params)}")
        lazy = denoise_store(image, params, **kwargs)  # the parameters just resolved: no further pass
        say(f"{args.image}: {image.shape} {image.dtype} in {_count(lazy.npartitions, 'chunk')} of {lazy.chunksize}")
        if client is None:  # the local threads, each holding one chunk's task: as many as the memory holds
            need = chunk_working_memory(lazy.chunks, None if channel_axis is None else channel_axis % lazy.ndim,
                                        params, args.aggregation, image.dtype, 1)
            fit, available = _threads_that_fit(need, threads)
            if fit < threads:
                say(f"running {fit} of {threads} threads: each chunk's task needs about {need / 2**20:,.0f} MiB "
                    f"of working memory, and {available / 2**20:,.0f} MiB are available")
                threads = fit
        # every chunk written, also one equal to the fill value, so that a complete store can be told from one
        # whose writes went elsewhere
        target = zarr.create_array(str(partial), shape=lazy.shape, chunks=lazy.chunksize, dtype=lazy.dtype,
                                   config={"write_empty_chunks": True})
        store = lazy.store(target, lock=False, compute=False)
        graph_keys = tuple(dict(store.__dask_graph__()))
        show = not args.no_progress and sys.stderr.isatty()  # as for a single image: a bar on a terminal only
        t0 = time.perf_counter()
        if client is not None:
            future = client.compute(store)
            if show:
                from contextlib import redirect_stdout

                from distributed import progress

                with redirect_stdout(sys.stderr):
                    progress(future)
            future.result()
        else:
            from contextlib import nullcontext

            from dask.diagnostics import ProgressBar

            pool = ThreadPoolExecutor(threads)  # ours: its running tasks are waited for on the way out
            with ProgressBar(out=sys.stderr) if show else nullcontext():
                dask.compute(store, scheduler="threads", pool=pool)
        seconds = time.perf_counter() - t0
        written = zarr.open_array(str(partial), mode="r").nchunks_initialized
        if written != target.nchunks:
            raise OSError(f"the result holds {written} of its {target.nchunks} chunks: the workers wrote elsewhere "
                          f"or failed; nothing was written to --out")
        if out.exists():  # --overwrite: the old store moved aside, the new one renamed in, the old one removed
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(partial, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(partial, out)  # a folder: fails rather than replace an --out made meanwhile
    except OSError as err:  # a full disk while the chunks are written: Zarr's error names no file, say which
        if err.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) or isinstance(err, WriteError):
            raise
        raise WriteError(err.errno, err.strerror or str(err), str(args.out)) from err
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # tasks still running finish before the clean-up
        if client is not None:
            if future is not None:
                client.cancel(future, force=True)  # the tasks waiting are dropped; those running still finish
                _wait_for_running_tasks(client, graph_keys)
            client.close()
        close_opened()
        shutil.rmtree(partial, ignore_errors=True)
    voxels = math.prod(image.shape) / (3 if channel_axis is not None else 1)
    say(f"denoised {image.shape} {np.dtype(image.dtype)} in {seconds:.1f} s ({voxels / seconds:,.0f} voxels/s) "
        f"-> {args.out}")


def _chunk_size(text):
    """--chunks: a positive int, or comma-separated positive ints (one per spatial axis)."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if not parts or any(p < 1 for p in parts):
        raise argparse.ArgumentTypeError(f"--chunks takes a positive int or comma-separated positive ints, one per "
                                         f"spatial axis (e.g. 64 or 16,128,128); got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)
