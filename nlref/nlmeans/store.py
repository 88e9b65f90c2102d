r"""NL-means of an array in a store (Zarr, TIFF, HDF5, a memory map): one independent task per chunk.

Each task opens the file, reads its own chunk and halo, pads reflectively
where the chunk touches the array's edge and denoises it: no task depends on
another, so a worker holds only the chunks it is computing, whatever the size
of the array. The result equals :func:`nlref.nl_means` of the whole array in
memory, bit for bit, whatever ``workers`` either call uses.

What travels to the tasks is an :class:`Opener`: the kind of file, its
absolute path and what locates the array in it (a Zarr array's path, an HDF5
dataset's name, a TIFF series, a memory map's dtype, shape, offset and order).
Never an open file or a copy of the data: an open ``h5py.Dataset`` does not
pickle, a ``numpy.memmap`` pickles as a copy of the whole file, and a path
relative to the client's folder names nothing (or another file) on a worker
started elsewhere. Paths are made absolute where an :class:`Opener` is made,
in the client's process, and a task that finds no file there raises instead of
reading fill values.
"""

from __future__ import annotations

import functools
import mmap
import numbers
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from .._files import absolute
from .._typing import Size
from .checks import check_lazy, check_workers, sigma_axes, warn_layout
from .chunk import denoise_with_halo
from .fast import halo
from .median import resolve_lazy
from .noise import filter_dtype, second_differences
from .params import check_arguments, check_working_memory, chunk_working_memory, run_parameters

__all__ = ["Opener", "as_source", "nl_means_store", "resolve_parameters_store", "denoise_store", "close_opened",
           "read_block", "check_chunk_memory"]

KINDS = ("zarr", "tiff", "hdf5", "memmap")



def _native(dtype):
    """``dtype`` in the machine's byte order (the values a reader hands back, whatever the order on disk)."""
    return np.dtype(dtype).newbyteorder("=")


@dataclass(frozen=True)
class Opener:
    """Opens an array in a file, in whichever process reads it: a kind, an absolute path, and its place there.

    Small and picklable: this, not the open file or the data, travels into
    every task. Make one with :meth:`zarr`, :meth:`tiff`, :meth:`hdf5` or
    :meth:`memmap` (they read the metadata now), or let
    :func:`nl_means_store` make it from a ``zarr.Array``, ``h5py.Dataset`` or
    ``numpy.memmap``.

    Attributes
    ----------
    kind : {"zarr", "tiff", "hdf5", "memmap"}
    path : str
        Absolute (a relative path is made absolute against the current folder
        when the opener is made).
    shape : tuple of int
    dtype : numpy.dtype
    key : str
        The Zarr array's path in its store, the HDF5 dataset's name, the TIFF
        series' index; "" for a memory map.
    offset : int
        Memory map: bytes before the array's first element.
    order : {"C", "F"}
        Memory map: the layout.
    chunks : tuple of int or None
        The file's own chunk shape, where it has one (the default chunks of
        :func:`nl_means_store`).
    """

    kind: str
    path: str
    shape: tuple
    dtype: np.dtype
    key: str = ""
    offset: int = 0
    order: str = "C"
    chunks: tuple | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Opener kind must be one of {KINDS}; got {self.kind!r}")
        object.__setattr__(self, "path", absolute(self.path))  # link/.. kept: where the system goes
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.chunks is not None:
            object.__setattr__(self, "chunks", tuple(int(n) for n in self.chunks))
        if self.order not in ("C", "F"):
            raise ValueError(f"Opener order must be 'C' or 'F'; got {self.order!r}")

    @property
    def ndim(self):
        return len(self.shape)

    @classmethod
    def zarr(cls, path, key=""):
        """The Zarr array at ``path`` (``key``: its path inside a group)."""
        import zarr

        array = zarr.open_array(absolute(path), mode="r", path=key or None)
        return cls("zarr", path, array.shape, array.dtype, key=key, chunks=array.chunks)

    @classmethod
    def tiff(cls, path, series=0):
        """The image series ``series`` of the TIFF file at ``path``: memory-mapped where its data lie
        uncompressed in one piece (``tifffile.memmap``), else read through tifffile's Zarr view."""
        import tifffile

        with tifffile.TiffFile(absolute(path)) as tif:
            s = tif.series[series]
            return cls("tiff", path, s.shape, s.dtype, key=str(series))

    @classmethod
    def hdf5(cls, path, dataset):
        """The dataset named ``dataset`` in the HDF5 file at ``path``."""
        import h5py

        with h5py.File(absolute(path), "r") as f:
            d = f[dataset]
            return cls("hdf5", path, d.shape, d.dtype, key=d.name, chunks=d.chunks)

    @classmethod
    def memmap(cls, path, dtype, shape, offset=0, order="C"):
        """A raw array in the file at ``path``: ``dtype``, ``shape``, ``offset`` bytes in, ``order`` layout."""
        return cls("memmap", path, shape, dtype, offset=int(offset), order=order)

    def open(self):
        """The array, opened in this process (once per process and file version; nothing is read but metadata)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.kind} source {self.path!r} does not exist on this machine (every worker "
                                    f"of a cluster must see it at this path)") from None
        stamp = (self, stat.st_mtime_ns, stat.st_size)
        with _LOCK:
            array = _OPENED.get(stamp)
        if array is None:
            array = self._open()
            # the byte order aside: Zarr 3 hands back a big-endian array, reopened, in the machine's order
            if tuple(array.shape) != self.shape or _native(array.dtype) != _native(self.dtype):
                raise ValueError(f"{self.kind} source {self.path!r} holds {tuple(array.shape)} "
                                 f"{np.dtype(array.dtype)}, not the {self.shape} {np.dtype(self.dtype)} it held when "
                                 f"the run was planned")
            with _LOCK:
                array = _OPENED.setdefault(stamp, array)
        return array

    def _open(self):
        if self.kind == "zarr":
            import zarr

            return zarr.open_array(self.path, mode="r", path=self.key or None)
        if self.kind == "tiff":
            import tifffile
            import zarr

            # Image data stored uncompressed, in one piece and in native byte order (what tifffile and most
            # microscopes write) are mapped: a task reads its chunk and halo. Through the Zarr view they are one
            # chunk per strip, and such a file often holds a whole page in one strip: every task decoded the
            # whole page (a 4096 x 4096 uint16 image denoised in 64 x 64 chunks took 72 s instead of 8.8 s,
            # and each running task held the page, 32 MiB, beside its chunk).
            try:
                mapped = tifffile.memmap(self.path, series=int(self.key), mode="r")
            except ValueError:  # compressed, tiled, in several pieces: the Zarr view decodes what is asked
                mapped = None
            if mapped is not None and mapped.shape == self.shape and mapped.dtype == self.dtype:
                return mapped
            return zarr.open(tifffile.imread(self.path, aszarr=True, series=int(self.key)), mode="r")
        if self.kind == "hdf5":
            import h5py

            return h5py.File(self.path, "r")[self.key]
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", offset=self.offset, shape=self.shape,
                         order=self.order)


_OPENED = {}
_LOCK = threading.Lock()


def close_opened():
    """Close every file this process opened through an :class:`Opener` (a worker's close with its process)."""
    with _LOCK:
        opened = list(_OPENED.values())
        _OPENED.clear()
    for array in opened:
        store = getattr(array, "store", None)
        if hasattr(store, "close") and type(store).__module__.startswith("tifffile"):
            store.close()
        elif hasattr(array, "file") and type(array).__module__.startswith("h5py"):
            array.file.close()


def _opener_of(source):
    """An :class:`Opener` for a ``zarr.Array`` in a folder, an ``h5py.Dataset`` or a ``numpy.memmap``; else None."""
    library = type(source).__module__.split(".")[0]
    if library == "zarr":
        root = getattr(getattr(source, "store", None), "root", None)
        if root is None:  # a remote or in-memory store: the array travels as itself (its store's address)
            return None
        return Opener("zarr", root, source.shape, source.dtype, key=source.path, chunks=source.chunks)
    if library == "h5py":
        import h5py

        if not isinstance(source, h5py.Dataset):  # a view that converts on read (dataset.astype, .fields):
            return None                           # an array-like, placed in the graph
        if source.file.driver == "core":
            raise TypeError("source is a dataset of an HDF5 file held in memory (driver 'core'): the tasks open the "
                            "file by name, and would find none or one they cannot open while this process holds it. "
                            "Pass numpy.array(source) to denoise its values in memory, or close the file and "
                            "open it from disk")
        if source.file.mode != "r":  # the tasks open the file by name: what HDF5 still caches here must be in it
            source.file.flush()
        return Opener("hdf5", source.file.filename, source.shape, source.dtype, key=source.name, chunks=source.chunks)
    if isinstance(source, np.memmap) and source.filename is not None:  # (a copy of a memmap has no file)
        if not isinstance(source.base, mmap.mmap):
            raise TypeError("source is a view of a numpy.memmap (a slice, a transpose): pass the memmap itself, or "
                            "nlref.nlmeans.store.Opener.memmap(path, dtype, shape, offset, order) for the part to read")
        if source.mode == "c":  # its changes live in this process only: the tasks would read the file
            raise TypeError("source is a copy-on-write numpy.memmap (mode 'c'): what was changed in it is in this "
                            "process only, and the tasks read the file. Map it with mode 'r' "
                            "(numpy.load(path, mmap_mode='r')), or pass numpy.array(source) to denoise its "
                            "values in memory")
        if source.mode in ("r+", "w+"):  # the same for a writable map's pages (another machine reads the file)
            source.flush()
        order = "F" if source.flags.f_contiguous and not source.flags.c_contiguous else "C"
        return Opener("memmap", source.filename, source.shape, source.dtype, offset=source.offset, order=order)
    return None


def as_source(source):
    """What the tasks read: an :class:`Opener` where ``source`` is a file (see :class:`Opener`), else ``source``.

    Any other object with ``shape``, ``dtype`` and NumPy slicing (a NumPy
    array, a ``zarr.Array`` in a remote store) is placed in the graph once,
    and every task reads its chunk from that one copy. A Dask array is
    refused (a TypeError pointing to :func:`nlref.nl_means`): placed in the
    graph, it would be computed whole in one task.
    """
    if isinstance(source, Opener):
        return source
    from dask import is_dask_collection  # a Dask array, or an xarray object backed by one

    if is_dask_collection(source):
        raise TypeError(f"source is a lazy {type(source).__name__} (a Dask collection): the store route would "
                        f"compute it whole in one task, for every pass. Denoise it chunk by chunk with "
                        f"nlref.nl_means(source, ...), or pass the array in its store (zarr.Array, h5py.Dataset, "
                        f"numpy.memmap)")
    if not isinstance(source, np.ndarray) and array_api_compat.is_array_api_obj(source):
        # a PyTorch, CuPy or array-api-strict array: its dtype is not NumPy's, and its chunks would be
        # copied to the host one by one (a GPU array moved behind the caller's back)
        raise TypeError(f"source is an in-memory {type(source).__module__.split('.')[0]} {type(source).__name__}, "
                        f"not an array in a store: denoise it with nlref.nl_means(source, ...), which keeps its "
                        f"library, device and dtype, or write it to a store (zarr, HDF5, numpy.memmap) first")
    opener = _opener_of(source)
    if opener is not None:
        return opener
    if not all(hasattr(source, name) for name in ("shape", "dtype", "__getitem__")):
        raise TypeError(f"source must be an array in a store (zarr.Array, h5py.Dataset, numpy.memmap, an "
                        f"nlref.nlmeans.store.Opener) or any object with shape, dtype and NumPy slicing; "
                        f"got {type(source).__name__}")
    return source


def read_block(source, key):
    """``source[key]`` as a NumPy array, opening ``source`` first when it is an :class:`Opener`."""
    array = source.open() if isinstance(source, Opener) else source
    return np.asarray(array[key])


def _store_chunks(source, chunks, channel_axis, spatial):
    """The chunk grid (one tuple per axis) from ``chunks``: the channel axis is never split."""
    def refuse():
        return ValueError(f"chunks must be a positive int or one positive int per spatial axis ({len(spatial)}, "
                          f"shape {tuple(spatial)}); got {chunks!r}")

    if chunks is None:
        stored = getattr(source, "chunks", None)
        if not (isinstance(stored, tuple) and len(stored) == len(source.shape)
                and all(isinstance(c, numbers.Integral) for c in stored)):
            what = f"{source.kind} {source.path}" if isinstance(source, Opener) else type(source).__name__
            raise ValueError(f"chunks must be given: the source ({what}) has no chunk grid")
        sizes = [c for a, c in enumerate(stored) if a != channel_axis]
    elif isinstance(chunks, numbers.Integral) and not isinstance(chunks, bool):
        sizes = [int(chunks)] * len(spatial)
    else:
        sizes = list(chunks) if isinstance(chunks, (tuple, list)) else None
        if sizes is not None and channel_axis is not None and len(sizes) == len(source.shape):
            del sizes[channel_axis]
        if sizes is None or len(sizes) != len(spatial):
            raise refuse()
    if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 1 for c in sizes):
        raise refuse()
    sizes = [min(int(c), n) for c, n in zip(sizes, spatial)]
    if channel_axis is not None:
        sizes.insert(channel_axis, source.shape[channel_axis])
    return tuple(tuple([c] * (n // c) + ([n % c] if n % c else [])) for c, n in zip(sizes, source.shape))


def _run_block(*held, block_id=None, edges, read, source=None, **kwargs):
    """One task: ``read(source, key, **kwargs)`` for the block ``block_id`` (``held``: a source in the graph).

    ``edges``: per axis, the chunk boundaries (0, ..., n).
    """
    key = tuple(slice(e[i], e[i + 1]) for e, i in zip(edges, block_id))
    return read(held[0] if held else source, key, **kwargs)


def _tasks(read, source, grid, dtype, prefix, **kwargs):
    """A Dask array whose block ``i`` is ``read(source, key_i, **kwargs)``: one independent task per chunk.

    ``source`` is an :class:`Opener` (a few strings, in every task) or an
    array placed in the graph once (not copied per task, not read whole by
    ``dask.array.from_array``), on which every task depends.
    """
    import dask
    import dask.array as da

    name = f"{prefix}-{uuid.uuid4().hex}"
    meta = np.empty((0,) * len(grid), np.dtype(dtype))
    edges = tuple(tuple(int(e) for e in np.cumsum((0, *c))) for c in grid)
    # one opaque callable: Dask would otherwise rebuild every tuple and dict argument as a node, in every task
    task = functools.partial(_run_block, edges=edges, read=functools.partial(read, **kwargs),
                             source=source if isinstance(source, Opener) else None)
    if isinstance(source, Opener):
        return da.map_blocks(task, chunks=grid, dtype=dtype, meta=meta, name=name)
    held = da.from_delayed(dask.delayed(source, name=f"{name}-source"), shape=(), dtype=object,
                           meta=np.empty((), object))
    return da.map_blocks(task, held, new_axis=list(range(len(grid))), chunks=grid, dtype=dtype, meta=meta, name=name)


def _read_with_halo(source, key, shape, depth):
    """``source[key]`` grown by ``depth`` samples per axis (clipped to the array), and what the clip cut off."""
    read, missing = [], []
    for s, n, m in zip(key, shape, depth):
        lo, hi = max(s.start - m, 0), min(s.stop + m, n)
        read.append(slice(lo, hi))
        missing.append((m - (s.start - lo), m - (hi - s.stop)))
    return read_block(source, tuple(read)), missing


def _denoised_block(source, key, *, shape, depth, channel_axis, params, workers):
    """One task of the store route: read the chunk ``key`` with its halo, denoise it."""
    block, missing = _read_with_halo(source, key, shape, depth)
    if channel_axis is not None:
        del missing[channel_axis]
    return denoise_with_halo(block, missing, channel_axis=channel_axis, params=params, workers=workers)


def _filtered_block(source, key, *, channel_axis, axes):
    """The absolute second differences of one chunk (channel first), read with two more samples along ``axes``."""
    grown = [slice(s.start, s.stop + 2) if a in axes else s for a, s in enumerate(key)]
    spatial = grown[1:]
    if channel_axis is None:
        x = read_block(source, tuple(spatial))[None, ...]
    else:
        spatial.insert(channel_axis, grown[0])
        x = np.moveaxis(read_block(source, tuple(spatial)), channel_axis, 0)
    filtered = second_differences(x, axes, filter_dtype(x.dtype))  # fresh: its absolute value in place
    return np.abs(filtered, out=filtered)


def _filtered_store(source, channel_axis, grid):
    """The absolute second differences of every channel (lazy), one task per chunk (its chunk and two more samples)."""
    shape = list(source.shape)
    channels = 1 if channel_axis is None else shape.pop(channel_axis)
    axes = tuple(1 + a for a in sigma_axes(shape, source.shape))
    filtered_shape = [channels, *shape]
    for a in axes:
        filtered_shape[a] -= 2
    sizes = [max(c) for a, c in enumerate(grid) if a != channel_axis]
    filtered_grid = tuple(tuple([c] * (n // c) + ([n % c] if n % c else [])) for c, n in
                          zip([1, *sizes], filtered_shape))
    dtype = filter_dtype(source.dtype)
    values = _tasks(_filtered_block, source, filtered_grid, dtype, "nlref-filtered", channel_axis=channel_axis,
                    axes=axes)
    return [values[c, ...] for c in range(channels)], len(axes)


def _prepare(source, chunks, channel_axis):
    source = as_source(source)
    channel_axis, spatial = check_lazy(source, channel_axis)
    return source, channel_axis, spatial, _store_chunks(source, chunks, channel_axis, spatial)


def resolve_parameters_store(source, *, chunks=None, sigma=None, h=None, patch_size=None, search_size=None,
                             channel_axis=None, aggregation="pixel", data_range=None):
    """:func:`nlref.resolve_parameters` for an array in a store: once, for the whole array.

    The passes of :func:`nlref.nlmeans.median.resolve_lazy`, each made of
    independent tasks, one per chunk, that read their chunk (and, for the
    noise estimate, two more samples) straight from the file.

    Parameters
    ----------
    source, chunks
        As for :func:`nl_means_store`.
    Other parameters
        As for :func:`nlref.resolve_parameters`.
    """
    return _resolve_store(source, chunks=chunks, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                          channel_axis=channel_axis, aggregation=aggregation, data_range=data_range, stacklevel=4)


def _resolve_store(source, *, chunks, sigma, h, patch_size, search_size, channel_axis, aggregation, data_range,
                   stacklevel):
    """:func:`resolve_parameters_store`, its layout warning ``stacklevel`` frames up (at the user's call)."""
    given = channel_axis
    source, channel_axis, spatial, grid = _prepare(source, chunks, channel_axis)
    warn_layout(source.shape, given, stacklevel=stacklevel)
    image = _tasks(read_block, source, grid, source.dtype, "nlref-source")
    return resolve_lazy(image, lambda: _filtered_store(source, channel_axis, grid), spatial, sigma=sigma, h=h,
                        patch_size=patch_size, search_size=search_size, channel_axis=channel_axis,
                        aggregation=aggregation, data_range=data_range)


def denoise_store(source, params, *, chunks=None, channel_axis=None, aggregation="pixel", workers=None):
    """NL-means of an array in a store with parameters already resolved; lazy, reads nothing now.

    ``params`` is what :func:`resolve_parameters_store` returned for the same
    ``source``, ``chunks``, ``channel_axis`` and ``aggregation`` (``h``,
    ``sigma``, ``patch_size``, ``search_size``). :func:`nl_means_store` is
    the two calls in one; a caller that prints the parameters before the run
    (the ``nlref denoise`` command) makes them apart, and the data is read
    once less.
    """
    workers = check_workers(workers)
    source, channel_axis, spatial, grid = _prepare(source, chunks, channel_axis)
    missing = [k for k in ("h", "sigma", "patch_size", "search_size") if k not in params]
    if missing:
        raise ValueError(f"params must be resolve_parameters_store's result; it lacks {missing}")
    run = run_parameters(params, aggregation)
    check_working_memory(grid, channel_axis, run, aggregation, np.dtype(source.dtype), workers)
    depth = list(halo(run["patch_size"], run["search_size"], aggregation))
    if channel_axis is not None:
        depth.insert(channel_axis, 0)
    return _tasks(_denoised_block, source, grid, source.dtype, "nlref-nl-means", shape=tuple(source.shape),
                  depth=tuple(depth), channel_axis=channel_axis, params=run, workers=workers)


def check_chunk_memory(source, *, chunks=None, patch_size=None, search_size=None, channel_axis=None,
                       aggregation="pixel", workers=None):
    """Refuse chunks whose offset loop would not fit in memory, before any pass over the data.

    Only where both sizes are given (a preset's sizes wait for the noise
    estimate); :func:`denoise_store` checks again with the resolved ones.
    Returns the bytes of working memory one task needs (the largest chunk's),
    or None where a size is left to the preset.
    """
    workers = check_workers(workers)
    if patch_size is None or search_size is None:
        return None
    source, channel_axis, spatial, grid = _prepare(source, chunks, channel_axis)
    sizes = check_arguments(spatial, sigma=None, h=None, patch_size=patch_size, search_size=search_size,
                            aggregation=aggregation, data_range=None)
    check_working_memory(grid, channel_axis, sizes, aggregation, np.dtype(source.dtype), workers)
    return chunk_working_memory(grid, channel_axis, sizes, aggregation, np.dtype(source.dtype), workers)


def nl_means_store(source: Any, *, chunks: int | Sequence[int] | None = None, sigma: float | None = None,
                   h: float | None = None, patch_size: Size | None = None, search_size: Size | None = None,
                   channel_axis: int | None = None, aggregation: str = "pixel", data_range: float | None = None,
                   workers: int | None = None) -> Any:
    """NL-means of an array in a store (Zarr, TIFF, HDF5, a memory map), chunk by chunk; returns a lazy Dask array.

    Each task opens the file, reads its chunk and its halo, pads reflectively
    where the chunk touches the array's edge and denoises it: one task per
    chunk, none depending on another. So a worker holds only the chunks it is
    computing (its threads times about 10 to 15 (chunk + halo) bytes),
    whatever the size of the array, where a Dask array's ``map_overlap``
    keeps neighbour chunks waiting for each other. The result equals
    :func:`nlref.nl_means` of the whole array in memory, bit for bit,
    whatever ``workers`` either call uses.

    Parameters
    ----------
    source : array-like or Opener
        ``zarr.Array``, ``h5py.Dataset``, ``numpy.memmap`` or an
        :class:`Opener`: the tasks get an opener (kind and absolute path), and
        each reads only its chunk and halo, on whichever machine it runs (the
        path must be readable there). A NumPy array, or any object with
        ``shape``, ``dtype`` and NumPy slicing, is placed in the graph once
        and sliced by the tasks. A Dask array is refused (TypeError):
        :func:`nlref.nl_means` denoises it chunk by chunk.
    chunks : int or tuple of int, optional
        Chunk size per spatial axis (one int for all); the channel axis is
        never split. Default: the store's own chunks. Chunks of any size
        work, also smaller than the halo (each task reads what it needs).
    workers : int, optional
        Threads per chunk (default 1: Dask runs chunks in parallel).
    Other parameters
        As for :func:`nlref.nl_means`; resolved once for the whole array
        (:func:`resolve_parameters_store`) before this returns.

    Returns
    -------
    denoised : dask.array.Array
        Lazy, NumPy-backed: the source's shape and dtype, the given chunks.
        Write it with ``dask.array.to_zarr`` or ``dask.array.store``.
    """
    check_chunk_memory(source, chunks=chunks, patch_size=patch_size, search_size=search_size,
                       channel_axis=channel_axis, aggregation=aggregation, workers=workers)
    p = _resolve_store(source, chunks=chunks, sigma=sigma, h=h, patch_size=patch_size, search_size=search_size,
                       channel_axis=channel_axis, aggregation=aggregation, data_range=data_range, stacklevel=4)
    return denoise_store(source, p, chunks=chunks, channel_axis=channel_axis, aggregation=aggregation,
                         workers=workers)
