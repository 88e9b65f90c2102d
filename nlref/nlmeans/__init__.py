"""Classical non-local means (Buades, Coll & Morel, 2005): reference, fast, presets.

* :func:`nl_means` -- the public entry point (grey, colour, volumes, video).
* :func:`nl_means_weights` -- the weights of one pixel (a picture of "attention").
* :func:`estimate_sigma` -- the noise level of an image.
* :func:`nl_means_store` -- an array in a store (Zarr, HDF5, a memory map),
  chunk by chunk on Dask; a Dask array given to :func:`nl_means` is
  denoised chunk by chunk too (:mod:`.chunked` explains both routes).
* :mod:`.naive` (the specification), :mod:`.fast` (the offset loop),
  :mod:`.presets` (parameters from sigma).
"""

from .api import (NAIVE_COMPARISON_LIMIT, WORKING_MEMORY_LIMIT, estimate_sigma, nl_means, nl_means_weights,
                  resolve_parameters)
from .store import nl_means_store

__all__ = ["nl_means", "nl_means_weights", "resolve_parameters", "estimate_sigma", "nl_means_store",
           "WORKING_MEMORY_LIMIT", "NAIVE_COMPARISON_LIMIT"]
