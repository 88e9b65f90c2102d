r"""NL-means by looping over offsets instead of pixels (the "fast" method).

The naive method (:mod:`nlref.nlmeans.naive`) visits every pixel ``p`` and every
offset ``o`` of the search window and compares two patches. Here the two loops
are exchanged: for one offset ``o`` at a time, the patch distance of *every*
pixel to its partner ``p + o`` is one box filter of the image of squared
differences,

.. math::

    d_o^2(p) = \frac{1}{C|P|} \sum_{k \in P} D_o(p + k),
    \qquad D_o(x) = \sum_c \big(v_c(x) - v_c(x + o)\big)^2,

so the cost per offset is a handful of whole-image array operations, independent
of the patch area. Three further tricks, each exact:

* **Symmetry.** ``d_o(p) = d_{-o}(p + o)``: one weight map serves the offsets
  ``o`` and ``-o``, so only half of the search window is computed.
* **Flat offsets.** The padded image is flattened in C order; an N-d offset
  ``o`` becomes one integer shift ``delta = sum_a o_a * stride_a`` and every
  shifted image is a contiguous 1-D slice. Positions near the row ends mix two
  rows, but they are never read back as results (their numbers are finite
  garbage, multiplied by zero or sliced away).
* **Buffers.** On NumPy and CuPy every step writes into preallocated buffers
  (``out=``). Other array libraries run the same steps with fresh arrays.

The same bits for any number of threads: the offsets are cut into a fixed
number of parts (``N_PARTS``, never the number of workers); each part sums
its offsets in order and the parts' sums are added in order. On NumPy, threads
run the parts (ufuncs release the GIL), but which thread runs which part
changes no number.

Patch-wise aggregation needs each patch's normaliser ``Z(p)`` before its
estimate can be spread over the pixels it covers, so it makes two passes over
the offsets: the first sums the weights, the second spreads
``w_o(p) / Z(p)`` over the patch (another box filter) and accumulates.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import itertools
import math
import os
import threading
from itertools import product

from numpy.lib.stride_tricks import as_strided as _as_strided

from ..backend import array_namespace, device, is_numpy, native_namespace, reflect_pad, supports_out
from ._pool import NEVER, stoppable_pool
from .checks import check_kernel
from .fast_numba import nl_means_numba_padded, working_memory_numba  # imports Numba only when it first runs

__all__ = ["nl_means_fast", "nl_means_fast_padded", "halo", "working_memory", "resolve_engine", "ENGINES",
           "ENGINE_VARIABLE"]

#: The engines of the offset loop. "numpy" runs this module's array steps (every
#: library), "numba" the compiled tiles of ``nlref.nlmeans.fast_numba`` (NumPy
#: arrays only), and "auto" picks numba for NumPy arrays when Numba is installed,
#: else numpy.
ENGINES = ("auto", "numpy", "numba")
#: The environment variable that picks the engine for every call of the process
#: (the in-memory call and every Dask or store chunk alike); default "auto".
ENGINE_VARIABLE = "NLREF_NLMEANS_ENGINE"


def resolve_engine(xp, engine=None):
    """The engine that runs the offset loop for arrays of namespace ``xp``: "numpy" or "numba".

    ``engine`` None reads :data:`ENGINE_VARIABLE` (default "auto"). The choice
    depends on the library and on what is installed, never on the array's size,
    so that a Dask chunk runs the same engine as the whole in-memory array.
    """
    source = "engine"
    if engine is None:
        engine, source = os.environ.get(ENGINE_VARIABLE, "auto").strip().lower() or "auto", ENGINE_VARIABLE
    if engine not in ENGINES:
        raise ValueError(f"{source} must be one of {ENGINES}; got {engine!r}")
    if engine == "numpy":
        return "numpy"
    installed = importlib.util.find_spec("numba") is not None
    if engine == "numba":
        if not is_numpy(xp):
            raise ValueError(f"{source}='numba' runs on NumPy arrays only; got a {xp.__name__} array "
                             "(use 'numpy' or 'auto', which runs the array steps on every library)")
        if not installed:
            raise ImportError(f"{source}='numba' needs the optional dependency Numba: pip install 'nlref[fast]' "
                              "(or use 'numpy' or 'auto')")
        return "numba"
    return "numba" if installed and is_numpy(xp) else "numpy"

# The weights' exponent is clamped at a floor far above the denormal range:
# a product of a weight with a sample (or a weight added to a small sum) that
# falls below the smallest normal number (float32 1.2e-38, float64 2.2e-308)
# takes the CPU's slow path. Measured (16,384 samples, this 2-core Xeon, NumPy
# 2.4): float32 weight exp(-87) = 1.6e-38 times 0.5: 281 us against 2.8 us at
# exp(-50); float64 exp(-708): 798 us for exp and 623 us for the product
# against 16 and 9 us at exp(-600). The floor changes nothing representable:
# every clamped weight is below e^-50 = 1.9e-22 (float32; e^-600 for float64)
# next to the centre weight 1, so even 10^5 offsets move a sum by less than
# 1e-16 of it. The float32 camera 128x128 call (7x7 / 21x21, h = 0.6 sigma)
# took 0.82x the time with this floor (median of 9 paired runs; docs/engine.md).
_EXP_FLOOR = {4: -50.0, 8: -600.0}


#: Boxes at least this wide are summed from pair sums (see ``_Steps.box``).
_PAIR_BOX_WIDTH = 7


def _c_strides(shape):
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class _Steps:
    """The elementwise steps of the offset loop, in place where the library allows.

    With ``out=`` support every method writes into the buffer it is given and
    returns it; otherwise it returns a fresh array and ignores the buffer.
    """

    def __init__(self, xp, dtype, device=None):
        self.xp = xp
        self.dtype = dtype
        self.device = device
        self.np = native_namespace(xp) if supports_out(xp) else None

    def buffer(self, n):
        # through the array-API namespace, on the image's device: a bare cupy.empty would allocate on the
        # *current* CUDA device, which is not the image's when the caller picked another GPU
        return self.xp.empty(n, dtype=self.dtype, device=self.device) if self.np is not None else None

    @staticmethod
    def head(buf, n):
        return buf[:n] if buf is not None else None

    @staticmethod
    def view(buf, rows, n):
        """The first rows * n entries of a flat buffer as an array (rows, n)."""
        return buf[: rows * n].reshape(rows, n) if buf is not None else None

    def shifted(self, r, start, rows, size):
        """Array (rows, size) whose row j is r[start + j : start + j + size] (a strided view, no copy)."""
        if self.np is None:
            if rows != 1:
                raise ValueError("only NumPy and CuPy batch offsets")
            return self.xp.reshape(r[start : start + size], (1, size))
        return self.np.lib.stride_tricks.as_strided(r[start:], shape=(rows, size), strides=(r.strides[0],) * 2)

    def anti_shifted(self, w, m):
        """Array (rows, m) whose row j is w[j, rows - 1 - j : rows - 1 - j + m], for a C-contiguous w (view)."""
        rows, length = w.shape
        if self.np is None:
            if rows != 1:
                raise ValueError("only NumPy and CuPy batch offsets")
            return w[:, 0:m]
        item = w.strides[1]
        return self.np.lib.stride_tricks.as_strided(w.reshape(-1)[rows - 1 :], shape=(rows, m),
                                                    strides=((length - 1) * item, item))

    def sqdiff_sum(self, pairs, out, tmp):
        """sum over pairs (a, b) of (a - b)**2."""
        if self.np is None:
            total = None
            for a, b in pairs:
                d = a - b
                total = d * d if total is None else total + d * d
            return total
        for i, (a, b) in enumerate(pairs):
            target = out if i == 0 else tmp
            self.np.subtract(a, b, out=target)
            self.np.multiply(target, target, out=target)
            if i:
                self.np.add(out, tmp, out=out)
        return out

    def box(self, src, width, step, out, pairs=None):
        """out[..., i] = sum_{k < width} src[..., i + k*step] (last axis shrinks by (width-1)*step).

        From the sums of neighbouring pairs, ``P[i] = src[i] + src[i + step]``:
        ``out = P[0] + P[2 step] + P[4 step] + ... (+ src[(width-1) step] for odd
        widths)``, ceil(width / 2) additions instead of width - 1 (7 wide: 4
        instead of 6). Measured on the whole call (paired, median of 7):
        0.89x to 0.94x the time for 7x7 patches, 1.08x for 5x5, so only boxes
        of 7 or more use it. The same order on every library, so NumPy and
        array-api-strict agree to the bit.
        """
        n = src.shape[-1] - (width - 1) * step
        if width == 1:
            return src
        if width < _PAIR_BOX_WIDTH:  # nothing gained: add the shifted copies one by one
            if self.np is None:
                total = src[..., 0:n]
                for k in range(1, width):
                    total = total + src[..., k * step : k * step + n]
                return total
            out = out[:n] if src.ndim == 1 else self.view(out, src.shape[0], n)
            self.np.add(src[..., 0:n], src[..., step : step + n], out=out)
            for k in range(2, width):
                self.np.add(out, src[..., k * step : k * step + n], out=out)
            return out
        m = src.shape[-1] - step
        if self.np is None:
            pair = src[..., 0:m] + src[..., step : step + m]
            total = pair[..., 0:n] + pair[..., 2 * step : 2 * step + n]
            for k in range(4, width - 1, 2):
                total = total + pair[..., k * step : k * step + n]
            if width % 2:
                total = total + src[..., (width - 1) * step : (width - 1) * step + n]
            return total
        if pairs is None:
            pairs = self.buffer(src.size)
        pair = pairs[:m] if src.ndim == 1 else self.view(pairs, src.shape[0], m)
        out = out[:n] if src.ndim == 1 else self.view(out, src.shape[0], n)
        self.np.add(src[..., 0:m], src[..., step : step + m], out=pair)
        self.np.add(pair[..., 0:n], pair[..., 2 * step : 2 * step + n], out=out)
        for k in range(4, width - 1, 2):
            self.np.add(out, pair[..., k * step : k * step + n], out=out)
        if width % 2:
            self.np.add(out, src[..., (width - 1) * step : (width - 1) * step + n], out=out)
        return out

    def weight(self, dist_sum, coef, bias, floor, out):
        """exp(clip(coef * dist_sum + bias, floor, 0))."""
        if self.np is None:
            return self.xp.exp(self.xp.clip(dist_sum * coef + bias, min=floor, max=0.0))
        self.np.multiply(dist_sum, coef, out=out)
        self.np.add(out, bias, out=out)
        self.np.clip(out, floor, 0.0, out=out)
        return self.np.exp(out, out=out)

    def mul(self, a, b, out):
        return a * b if self.np is None else self.np.multiply(a, b, out=out)

    def zero(self, acc):
        """An array of zeros shaped like ``acc``: ``acc`` itself, cleared, where the library allows."""
        if self.np is None:
            return self.xp.zeros_like(acc)
        acc.fill(0)
        return acc

    def accumulate(self, acc, value):
        """acc + value, written into acc where possible."""
        return acc + value if self.np is None else self.np.add(acc, value, out=acc)

    def accumulate_product(self, acc, a, b, tmp):
        """acc + a * b."""
        if self.np is None:
            return acc + a * b
        self.np.multiply(a, b, out=tmp)
        return self.np.add(acc, tmp, out=acc)


class _Geometry:
    """Sizes, strides and flat ranges of the padded, flattened image."""

    def __init__(self, shape, patch_size, search_size, aggregation):
        self.shape = tuple(shape)
        self.patch_size = tuple(patch_size)
        rp = [p // 2 for p in patch_size]
        rs = [s // 2 for s in search_size]
        # patch-wise reads weights up to one patch radius beyond the image
        reach = 2 if aggregation == "patch" else 1
        self.margin = tuple(s + reach * p for s, p in zip(rs, rp))
        self.padded_shape = tuple(n + 2 * m for n, m in zip(shape, self.margin))
        self.strides = _c_strides(self.padded_shape)
        self.length = math.prod(self.padded_shape)
        self.start = sum(m * s for m, s in zip(self.margin, self.strides))
        self.stop = sum((m + n - 1) * s for m, n, s in zip(self.margin, shape, self.strides)) + 1
        self.span = self.stop - self.start
        self.reach = sum(r * s for r, s in zip(rp, self.strides))  # K: half a patch, flat
        self.search_radius = tuple(rs)

    @functools.cached_property
    def deltas(self):
        """The flat offsets of the half search window (> 0), ascending (only the loop needs them)."""
        rs = self.search_radius
        flat = (sum(o * s for o, s in zip(off, self.strides)) for off in product(*(range(-r, r + 1) for r in rs)))
        return [d for d in flat if d > 0]


def working_memory(shape, channels, patch_size, search_size, aggregation, itemsize, workers=1, engine="numpy"):
    """Bytes of working memory the fast method needs (an upper estimate).

    Counts the padded image, the accumulators of every worker and its scratch
    buffers; used to refuse requests that would not fit before any work starts.
    ``engine`` "numpy" (the default) is the estimate of this module's array
    steps, which also bounds the Numba engine; "numba" is the Numba engine's
    own, about a quarter of it
    (``nlref.nlmeans.fast_numba.working_memory_numba``).
    """
    if engine not in ("numpy", "numba"):
        raise ValueError(f"working_memory: engine must be 'numpy' or 'numba'; got {engine!r}")
    geo = _Geometry(shape, patch_size, search_size, aggregation)
    if engine == "numba":
        return working_memory_numba(geo, channels, aggregation, itemsize, workers)
    # one part's sums + scratch (batches of offsets: see _batch_rows)
    per_worker = (channels + 1) + _batch_rows(geo.length) * len(_scratch_names(channels, aggregation, patch_size))
    # padded image and working copy; patch-wise adds mask, 1/Z, counts, centre term, estimate;
    # and the running total of the parts' sums
    shared = 2 * channels + (channels + 5 if aggregation == "patch" else 1) + (channels + 1)
    return itemsize * geo.length * (shared + workers * per_worker)


def _scratch_names(channels, aggregation, patch_size):
    """The scratch buffers one running part needs (each as long as the padded image, times the batch)."""
    names = ["d", "b1", "b2", "w", "tmp"]  # squared differences, box stages, weights, products
    if max(patch_size) >= _PAIR_BOX_WIDTH:
        names.append("p")  # the box's pair sums
    if channels > 1:
        names.append("t")  # one channel's squared difference
    if aggregation == "patch":
        names += ["a1", "a2", "c1", "c2"]  # the shares w / Z forward and backward, the second's box stages
    return tuple(names)


#: A batch of consecutive offsets holds at most this many samples per buffer
#: (and at most MAX_BATCH offsets); images whose padded size exceeds it run one
#: offset at a time.
BATCH_ELEMENTS = 2**16
MAX_BATCH = 16


def _batch_rows(length):
    """Offsets per batch for a padded image of ``length`` samples (no effect on the result)."""
    return max(1, min(MAX_BATCH, BATCH_ELEMENTS // length))


def _batches(deltas, size):
    """(first offset, count) of runs of consecutive offsets, each at most ``size`` long, in order."""
    out = []
    for delta in deltas:
        if out and delta == out[-1][0] + out[-1][1] and out[-1][1] < size:
            out[-1][1] += 1
        else:
            out.append([delta, 1])
    return [tuple(x) for x in out]


def halo(patch_size, search_size, aggregation="pixel"):
    """Samples per side, along each spatial axis, that one output pixel depends on.

    Pixel-wise: search radius + patch radius (the farthest patch compared).
    Patch-wise: search radius + 2 x patch radius (a pixel takes the estimates
    of every patch covering it, whose weights reach one more patch radius).
    It is also the width of the reflect padding of :func:`nl_means_fast`.
    """
    return _Geometry((1,) * len(patch_size), patch_size, search_size, aggregation).margin


def nl_means_fast(v, *, h, sigma, patch_size, search_size, aggregation="pixel", workers=1, progress=None,
                  engine=None):
    """NL-means by the offset loop; equal to :func:`~nlref.nlmeans.naive.nl_means_naive`.

    Parameters
    ----------
    v : array, shape (C, n_0, ..., n_{d-1})
        Channel-first noisy image, floating point (the working dtype).
    h, sigma : float
        Filter strength (> 0) and noise level (>= 0), in image units.
    patch_size, search_size : tuple of int
        Odd full widths per spatial axis.
    aggregation : {"pixel", "patch"}
    workers : int
        Threads running the parts of the offsets (NumPy only; other libraries
        use 1). The result is the same to the bit for any value.
    progress : callable, optional
        Called with the number of offsets just finished.
    engine : {"auto", "numpy", "numba"}, optional
        See :func:`resolve_engine` (None: the environment variable
        :data:`ENGINE_VARIABLE`, default "auto").

    Returns
    -------
    u : array, shape (C, n_0, ..., n_{d-1}), same library, device and dtype as ``v``.
    """
    h, sigma, patch_size, search_size, _ = check_kernel(
        "nl_means_fast", v, h=h, sigma=sigma, patch_size=patch_size, search_size=search_size, aggregation=aggregation)
    m = halo(patch_size, search_size, aggregation)
    padded = reflect_pad(v, [(0, 0)] + [(w, w) for w in m])
    inside = [(w, w + n) for w, n in zip(m, v.shape[1:])]
    return nl_means_fast_padded(padded, inside=inside, h=h, sigma=sigma, patch_size=patch_size,
                                search_size=search_size, aggregation=aggregation, workers=workers, progress=progress,
                                engine=engine)


def nl_means_fast_padded(padded, *, inside, h, sigma, patch_size, search_size, aggregation="pixel", workers=1,
                         progress=None, engine=None):
    """The offset loop on a block that already carries its :func:`halo` on every side.

    The block is either the whole image reflect-padded (:func:`nl_means_fast`)
    or one chunk of a larger array with its neighbours' samples around it (and
    reflect padding only where it touches the array's edge: :mod:`.chunked`).
    Every output sample is computed by the same operations in the same order
    in both cases, so the results agree bit for bit.

    Parameters
    ----------
    padded : array, shape (C, n_0 + 2 m_0, ..., n_{d-1} + 2 m_{d-1})
        Channel-first block, ``m = halo(patch_size, search_size, aggregation)``.
    inside : sequence of (int, int)
        Per spatial axis, the index range ``[lo, hi)`` of ``padded`` holding
        samples of the image (the rest is reflect padding). Patch-wise
        aggregation counts only patches centred there.
    h, sigma, patch_size, search_size, aggregation, workers, progress, engine
        As for :func:`nl_means_fast`.

    Returns
    -------
    u : array, shape (C, n_0, ..., n_{d-1})
        The denoised centre of the block.
    """
    xp = array_namespace(padded, names=["image"])
    v = padded
    channels = v.shape[0]
    m = halo(patch_size, search_size, aggregation)
    geo = _Geometry(tuple(n - 2 * w for n, w in zip(v.shape[1:], m)), patch_size, search_size, aggregation)
    flat = xp.reshape(padded, (channels, geo.length))
    rows = [flat[c, :] for c in range(channels)]
    steps = _Steps(xp, v.dtype, device(v))
    workers = max(1, int(workers)) if is_numpy(xp) else 1

    coef = -1.0 / (channels * math.prod(patch_size) * h**2)
    bias = 2.0 * sigma**2 / h**2
    floor = _EXP_FLOOR[8 if v.dtype == xp.float64 else 4]
    if resolve_engine(xp, engine) == "numba":  # the same steps, compiled per tile (see fast_numba.py)
        flat_estimate = nl_means_numba_padded(padded, inside=inside, geo=geo, h=h, sigma=sigma,
                                              aggregation=aggregation, workers=workers, floor=floor,
                                              progress=progress)
        return _unflatten(xp, list(flat_estimate), geo, v)
    a, b, n = geo.start, geo.stop, geo.span
    K = geo.reach
    # box along the axis with the largest stride first: it shrinks the array most
    box_axes = [(p, s) for p, s in zip(geo.patch_size, geo.strides)]

    def weights(d0, count, lo, hi, buf):
        """Array (count, hi - lo): row j holds w(x, x + d0 + j) for flat positions lo <= x < hi.

        Row j is computed by exactly the operations of a batch of one offset
        (elementwise steps, box sums in the same order), so batching changes
        no bit; it only cuts the number of NumPy calls.
        """
        size = hi - lo + 2 * K
        base = lo - K
        dist = steps.sqdiff_sum(
            [(r[base : base + size], steps.shifted(r, base + d0, count, size)) for r in rows],
            steps.view(buf["d"], count, size),
            steps.view(buf.get("t"), count, size),
        )
        box = _box_all(steps, dist, box_axes, buf["b1"], buf["b2"], buf.get("p"))
        return steps.weight(box, coef, bias, floor, steps.view(buf["w"], count, hi - lo))

    # Batches of consecutive offsets: offsets d, d + 1, ... (neighbours along the last axis)
    # read overlapping slices, so one strided view holds all their shifted images and the
    # weights of a whole batch take one call per step. Only on NumPy/CuPy, and only as many
    # offsets as keep a batch within BATCH_ELEMENTS samples (nothing to gain on large images,
    # where the calls are a small part of the time). Measured: see docs/engine.md.
    batch = _batch_rows(geo.length) if steps.np is not None else 1
    names = _scratch_names(channels, aggregation, patch_size)
    buffers = _BufferPool(lambda: {k: steps.buffer(batch * geo.length) for k in names})
    lock = threading.Lock()

    def tick(count):
        if progress is not None:
            with lock:
                progress(count)

    def zeros(size):
        return xp.zeros((size,), dtype=v.dtype, device=device(v))

    # A part's sums, once added into the total, are cleared and reused by a later part: a fresh set
    # per part costs a page fault per page in a Dask worker, whose allocator returns freed memory
    # to the system at once (measured: docs/dask.md, "Measured").
    recycled = _BufferPool(None)

    def part_sums(sizes):
        kept = recycled.take()
        return [zeros(s) for s in sizes] if kept is None else [steps.zero(acc) for acc in kept]

    parts = partition_offsets(geo.deltas)

    # ---- pass 1: the normaliser Z(p), and for pixel-wise the numerator too ----
    want_num = aggregation == "pixel"
    # patch-wise needs Z(p) for every patch centre p within half a patch of the output, [a - K, b + K)
    z_lo, z_hi = (a, b) if want_num else (a - K, b + K)
    z_n = z_hi - z_lo

    def first_pass(deltas, stop):
        """Partial sums over one part: [den] or [num_0, ..., num_{C-1}, den] (unfinished once ``stop`` is set)."""
        sums = part_sums([n] * channels + [z_n] if want_num else [z_n])
        with buffers.borrow() as buf:
            for d0, count in _batches(deltas, batch):
                if stop.is_set():
                    break
                d_max = d0 + count - 1
                w = weights(d0, count, z_lo - d_max, z_hi, buf)
                for j in range(count):
                    delta = d0 + j
                    # weight of p -> p+delta (at x = p), and of p-delta -> p (at x = p - delta)
                    w_fwd, w_bwd = w[j, d_max : d_max + z_n], w[j, count - 1 - j : count - 1 - j + z_n]
                    sums[-1] = steps.accumulate(sums[-1], w_fwd)
                    sums[-1] = steps.accumulate(sums[-1], w_bwd)
                    if want_num:
                        tmp = steps.head(buf["tmp"], n)
                        for c, r in enumerate(rows):
                            sums[c] = steps.accumulate_product(sums[c], w_fwd, r[a + delta : b + delta], tmp)
                            sums[c] = steps.accumulate_product(sums[c], w_bwd, r[a - delta : b - delta], tmp)
                tick(count)
        return sums

    sums = _sum_parts(steps, first_pass, parts, workers, recycled.give)
    buffers.release()
    recycled.release()
    den = 1.0 + sums.pop()  # the centre offset has weight exp(0) = 1
    if want_num:
        num = [rows[c][a:b] + sums[c] for c in range(channels)]
        estimate = [num[c] / den for c in range(channels)]
        return _unflatten(xp, estimate, geo, v)

    # ---- pass 2 (patch-wise): spread w_o(p) / Z(p) over the patch around p ----
    mask = _image_mask(xp, geo, inside, v)  # 1 on image pixels, 0 on padding (flat, length L)
    inv_z = mask[a - K : b + K] / den  # over [a - K, b + K)
    count = _box_all(steps, mask[a - 2 * K : b + 2 * K], box_axes)[K : K + n]  # patches covering x

    def patch_pass(deltas, stop):
        """Partial sums over one part: [num_0, ..., num_{C-1}] (unfinished once ``stop`` is set)."""
        num = part_sums([n] * channels)
        m = n + 2 * K
        with buffers.borrow() as buf:
            for d0, count in _batches(deltas, batch):
                if stop.is_set():
                    break
                d_max = d0 + count - 1
                w = weights(d0, count, a - K - d_max, b + K, buf)
                share_fwd = steps.mul(w[:, d_max : d_max + m], inv_z, steps.view(buf["a1"], count, m))
                share_bwd = steps.mul(steps.anti_shifted(w, m), inv_z, steps.view(buf["a2"], count, m))
                spread_fwd = _box_all(steps, share_fwd, box_axes, buf["b1"], buf["b2"], buf.get("p"))
                spread_bwd = _box_all(steps, share_bwd, box_axes, buf["c1"], buf["c2"], buf.get("p"))
                tmp = steps.head(buf["tmp"], n)
                for j in range(count):
                    delta = d0 + j
                    for c, r in enumerate(rows):
                        num[c] = steps.accumulate_product(num[c], spread_fwd[j, :], r[a + delta : b + delta], tmp)
                    for c, r in enumerate(rows):
                        num[c] = steps.accumulate_product(num[c], spread_bwd[j, :], r[a - delta : b - delta], tmp)
                tick(count)
        return num

    num = _sum_parts(steps, patch_pass, parts, workers, recycled.give)
    buffers.release()
    recycled.release()
    centre = _box_all(steps, inv_z, box_axes)
    safe_count = xp.where(count > 0, count, xp.ones_like(count))
    estimate = [(rows[c][a:b] * centre + num[c]) / safe_count for c in range(channels)]
    return _unflatten(xp, estimate, geo, v)


#: The offsets of the half search window are always cut into this many parts
#: (fewer when there are fewer offsets), whatever the number of workers: each
#: part sums its offsets in order, and the parts' sums are added in order. The
#: result is thus the same to the bit for any ``workers`` and any Dask chunking
#: (every output sample sees the same operations in the same order); workers
#: only decide which thread runs which part. 24 divides evenly among 1, 2, 3,
#: 4, 6, 8 and 12 threads.
N_PARTS = 24


def partition_offsets(deltas, parts=N_PARTS):
    """Cut the list of (flat) offsets into ``min(parts, len(deltas))`` runs of near-equal length, in order."""
    k = max(1, min(parts, len(deltas)))
    return [deltas[i * len(deltas) // k : (i + 1) * len(deltas) // k] for i in range(k)]


class _BufferPool:
    """Sets of arrays reused from part to part: scratch (one set per running task, :meth:`borrow`), part sums."""

    def __init__(self, make):
        self.make = make
        self.free = []
        self.lock = threading.Lock()

    def take(self):
        """A set given back earlier, or None."""
        with self.lock:
            return self.free.pop() if self.free else None

    def give(self, buf):
        with self.lock:
            self.free.append(buf)

    @contextlib.contextmanager
    def borrow(self):
        buf = self.take()
        if buf is None:
            buf = self.make()
        try:
            yield buf
        finally:
            self.give(buf)

    def release(self):
        """Drop the buffers (between passes and before the final steps, which need the memory)."""
        with self.lock:
            self.free.clear()


def _sum_parts(steps, task, parts, workers, recycle):
    """The sum over ``parts`` of ``task(part, stop)`` (a list of arrays each), added in part order.

    ``recycle(sums)`` receives each part's sums once they are added (the
    first part's become the total).

    ``workers`` threads run the parts (NumPy ufuncs release the GIL); at most
    ``workers`` parts are started and not yet added, so at most that many sets
    of partial sums are alive besides the total. The order of the additions never depends on
    ``workers``. If this thread raises (Ctrl-C), ``stop`` is set, and a task reads it between
    its batches of offsets (``_pool.stoppable_pool``).
    """

    def add(total, part_sums):
        if total is None:
            return part_sums
        total = [steps.accumulate(t, s) for t, s in zip(total, part_sums)]
        recycle(part_sums)
        return total

    total = None
    if workers == 1 or len(parts) == 1:
        for part in parts:
            total = add(total, task(part, NEVER))  # Ctrl-C stops this thread between two NumPy calls
        return total
    upcoming = iter(parts)
    with stoppable_pool(workers) as (pool, stop):
        pending = collections.deque(pool.submit(task, part, stop) for part in itertools.islice(upcoming, workers))
        while pending:
            total = add(total, pending.popleft().result())
            following = next(upcoming, None)  # started only now: at most `workers` partial sums wait
            if following is not None:
                pending.append(pool.submit(task, following, stop))
    return total


def _box_all(steps, src, box_axes, buf1=None, buf2=None, pairs=None):
    """Box-sum ``src`` along every axis (flat form), alternating two buffers (``pairs``: the box's scratch).

    The result may live in ``buf1`` or ``buf2``: use it before the next call
    that is given the same buffers. Without buffers, fresh ones are made.
    """
    if buf1 is None:
        buf1, buf2 = steps.buffer(src.shape[0]), steps.buffer(src.shape[0])
    held = None  # the buffer that holds src (None: neither)
    for width, step in box_axes:
        if width == 1:  # nothing to sum; and the next box must not write into the buffer it reads
            continue    # (a 3x1x3 patch wrote its last box over its own input before this check)
        target = buf2 if held is buf1 else buf1
        src = steps.box(src, width, step, target, pairs)
        held = target
    return src


def _image_mask(xp, geo, inside, like):
    """Flat indicator of the image pixels (``inside``, per axis [lo, hi)) in the padded array."""
    ones = xp.ones(tuple(hi - lo for lo, hi in inside), dtype=like.dtype, device=device(like))
    zeros_pad = [(lo, n - hi) for (lo, hi), n in zip(inside, geo.padded_shape)]
    mask = ones
    for axis, (before, after) in enumerate(zeros_pad):
        shape_b = list(mask.shape)
        shape_b[axis] = before
        shape_a = list(mask.shape)
        shape_a[axis] = after
        z_b = xp.zeros(tuple(shape_b), dtype=like.dtype, device=device(like))
        z_a = xp.zeros(tuple(shape_a), dtype=like.dtype, device=device(like))
        mask = xp.concat([z_b, mask, z_a], axis=axis)
    return xp.reshape(mask, (geo.length,))


def _unflatten(xp, estimate, geo, like):
    """Flat per-channel estimates on [a, b) -> array (C, n_0, ..., n_{d-1})."""
    L, a, b = geo.length, geo.start, geo.stop
    if is_numpy(xp) and all(e.ndim == 1 and e.flags.c_contiguous for e in estimate):
        # pixel (i_0, ..., i_{d-1}) lies at a + sum_k i_k stride_k: a strided view of each estimate, copied once.
        # The padded array per channel below (zeros around it, then sliced and stacked) made two more
        # image-sized arrays at the call's peak: 5.4 float32 copies of a 2048 x 2048 image, 4.2 this way.
        views = [xp.asarray(_as_strided(e, shape=geo.shape, strides=tuple(s * e.itemsize for s in geo.strides)))
                 for e in estimate]
        return xp.stack(views, axis=0)
    dev = device(like)
    channels = []
    for e in estimate:
        full = xp.concat(
            [xp.zeros((a,), dtype=like.dtype, device=dev), e, xp.zeros((L - b,), dtype=like.dtype, device=dev)]
        )
        full = xp.reshape(full, geo.padded_shape)
        channels.append(full[tuple(slice(m, m + n) for m, n in zip(geo.margin, geo.shape))])
    return xp.stack(channels, axis=0)
