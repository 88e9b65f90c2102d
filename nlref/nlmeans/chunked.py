r"""NL-means larger than memory, chunk by chunk, with a halo that makes the result exact.

An output pixel of NL-means depends only on the input within a fixed distance
of it: the search radius plus the patch radius (pixel-wise), or the search
radius plus twice the patch radius (patch-wise: a pixel takes the estimates of
every patch covering it). :func:`nlref.nlmeans.fast.halo` gives that distance
``m`` per axis. So a chunk can be denoised on its own once it carries ``m``
samples of its neighbours on every side:

* between chunks, the halo is the neighbours' samples;
* at the array's true edges, the halo is nlref's own reflect padding, the same
  that the in-memory call applies to the whole array (``numpy.pad``'s
  ``"reflect"``; dask's ``boundary="reflect"`` is NumPy's ``"symmetric"``, a
  different image, and is never used).

Each chunk then runs the offset loop of :func:`nlref.nlmeans.fast.nl_means_fast_padded`
on its padded block (:func:`nlref.nlmeans.chunk.denoise_with_halo`): the same
operations, in the same order, on the same numbers as the in-memory call, so
the result is equal bit for bit, whatever ``workers`` either call uses (the
offsets are summed in a fixed partition, ``N_PARTS`` in ``fast.py``).

Three modules do the work, one job each, importing one way (the checks and
parameter rules below them, ``nlref/nlmeans/api.py`` above choosing):

* :mod:`nlref.nlmeans.median` -- the exact median of the absolute second
  differences by histogram selection (the noise estimate), and the one-pass
  parameter resolution both routes share;
* :mod:`nlref.nlmeans.overlap` -- a Dask array through ``map_overlap``
  (:func:`~nlref.nlmeans.overlap.nl_means_dask`, what :func:`nlref.nl_means` calls), where each chunk
  waits for its neighbours' halo pieces;
* :mod:`nlref.nlmeans.store` -- an array in a store (Zarr, TIFF, HDF5, a
  memory map) through :func:`~nlref.nlmeans.store.nl_means_store`, whose tasks each open the file
  (an :class:`~nlref.nlmeans.store.Opener`: kind and absolute path travel, never the data) and read
  their own chunk and halo: one task per chunk, none waiting for another, so
  a worker holds only the chunks it computes.

This module gathers their public names. Parameters are resolved once, for the
whole array, before any chunk runs (the noise estimate, the presets, ``h``, the
data range), never per chunk.
"""

from __future__ import annotations

from .checks import is_dask_array
from .median import GATHER_LIMIT, HISTOGRAM_BINS
from .overlap import chunks_for_halo, estimate_sigma_dask, nl_means_dask, resolve_parameters_dask
from .store import Opener, denoise_store, nl_means_store, resolve_parameters_store

__all__ = ["is_dask_array", "nl_means_dask", "resolve_parameters_dask", "estimate_sigma_dask", "chunks_for_halo",
           "nl_means_store", "resolve_parameters_store", "denoise_store", "Opener", "HISTOGRAM_BINS",
           "GATHER_LIMIT"]
