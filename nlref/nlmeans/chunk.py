"""The work of one chunk, shared by both chunked routes: a block read with its halo -> its denoised centre.

Below :mod:`.overlap` (Dask arrays, ``map_overlap``) and :mod:`.store` (arrays
in a store, one independent task per chunk); above :mod:`.fast` and
:mod:`.params`.
"""

from __future__ import annotations

from ..backend import array_namespace, reflect_pad
from .fast import nl_means_fast_padded
from .params import from_working, to_working

__all__ = ["denoise_with_halo"]


def denoise_with_halo(block, missing, *, channel_axis, params, workers):
    """A block read with whatever halo the array has around it -> the denoised chunk at its centre.

    ``missing`` gives, per spatial axis, the ``(before, after)`` samples of the
    halo that lie outside the array: they are made here by reflection, exactly
    as the in-memory call pads the whole array. ``params``: ``h``, ``sigma``,
    ``patch_size``, ``search_size`` and ``aggregation``. The block keeps its
    library (NumPy, CuPy) and dtype.
    """
    xp = array_namespace(block, names=["image"])
    v = to_working(xp, block, channel_axis)
    padded = reflect_pad(v, [(0, 0), *missing])
    del v  # the padded block holds it: one block less during the offset loop
    inside = [(before, n - after) for (before, after), n in zip(missing, padded.shape[1:])]
    u = nl_means_fast_padded(padded, inside=inside, workers=workers, **params)
    return from_working(xp, u, block, channel_axis)
