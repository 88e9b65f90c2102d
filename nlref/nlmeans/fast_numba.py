r"""The offset loop of :mod:`nlref.nlmeans.fast` as one compiled kernel (optional: Numba).

The NumPy path (:mod:`.fast`) runs each step of the offset loop as a whole-image
array operation: about twenty NumPy calls per offset, each reading and writing
arrays the size of the image. Here the same steps run in one Numba-compiled
loop per *tile* of the image, so every intermediate stays in the CPU's cache,
and the Python interpreter is entered once per tile instead of once per step.

The arithmetic is the same definition (:mod:`.naive`), in the same flat layout:

* the squared differences ``D_o(x) = sum_c (v_c(x) - v_c(x + o))^2``;
* the box sum over the patch, one axis at a time, each box a plain sum of its
  terms in order (the same operations at every position);
* ``w = exp(clip(coef * box + bias, floor, 0))`` with the exponent floor of
  :data:`.fast._EXP_FLOOR`;
* the symmetry ``w(p, p + o) = w(p + o, p)``: one weight serves ``o`` and ``-o``.

It differs in two places, both for accuracy: the sums over the offsets are
kept in float64 (the NumPy path sums in the working dtype), and every output
pixel adds its offsets one after the other in the order of the search window.

**The same bits for any threads, tiles and chunks.** A tile is a run of flat positions; for every
offset it computes the weights of its own pixels, and of the pixels one offset
before them (their weight to the tile's pixels, by symmetry), from the image
alone. No value depends on where a tile starts, so the result is the same to
the bit for any number of threads (which only decide which thread runs which
tile), any tile size and any Dask chunking. No sum is split between threads.

The cost of that independence: a tile recomputes the weights of the ``o`` pixels
before it (the NumPy path shares them across the whole image), and the squared
differences of a patch radius on either side. For a 60-row tile of camera
512x512 (7x7 / 21x21) that is about 8 % more weights and 18 % more squared
differences on average over the offsets.

Across machines the bits can still differ: LLVM compiles for the CPU at hand,
and float64 weights call the C library's ``exp``.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .._files import numba_kernel
from ._pool import NEVER, stoppable_pool

__all__ = ["nl_means_numba_padded", "working_memory_numba", "compile_kernels", "TILE_ELEMENTS", "TILE_REACHES", "STEP_ELEMENTS"]

#: A tile covers about this many flat positions (whole rows of the padded image,
#: at least one row); its scratch arrays then stay in the L2 cache. No effect on
#: the result.
TILE_ELEMENTS = 2**15
#: ... and at least this many times the 2 K positions it recomputes around
#: itself (K: the patch's flat reach), so that the recomputation adds at most
#: 1/8. This binds on volumes, whose K spans a whole plane: a 32 x 256 x 256
#: volume with 3^3 patches has K of about 68,000, and tiles of 2**15 positions
#: computed about five times the work (docs/engine.md). No effect on the result.
TILE_REACHES = 8
#: A tile calls its kernel once per run of offsets worth about this many flat positions (a few
#: milliseconds), and between two runs reads whether the caller has stopped (Ctrl-C). The runs add
#: into the same float64 sums in the same order: no effect on the result.
STEP_ELEMENTS = 2**22

_KERNEL = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)

# Numba is imported, and the kernels below handed to it, on the first call only
# (compile_kernels): `import numba` takes about 0.4 s, as long as `import nlref`
# itself, and a process that never runs this engine should not pay it. Until
# then the kernels are plain Python functions.
_KERNELS = []
_compiled = threading.Lock()


def _kernel(fn):
    """Mark ``fn`` for compilation by :func:`compile_kernels`."""
    _KERNELS.append(fn.__name__)
    return fn


def compile_kernels():
    """Replace every kernel of this module by its Numba dispatcher (once; each compiles on its first call).

    Numba looks the kernels up in this module's globals when it compiles a
    caller, so all are replaced before any runs.
    """
    with _compiled:
        if not _KERNELS:
            return
        import numba

        names = globals()
        for name in _KERNELS:
            names[name] = numba_kernel(numba, names[name], _KERNEL)
        _KERNELS.clear()


# Every loop below runs ``for i in range(n)`` over 1-D slices: an index known to
# be non-negative lets Numba drop its negative-index check, and LLVM then
# vectorises the loop (8 float32 lanes here). Indexing ``a[i + k]`` instead kept
# each loop scalar: 1.05 against 0.19 ns per element for one shifted add
# (20,000 float32, this 2-core Xeon, Numba 0.68).


@_kernel
def _box(src, n_src, widths, steps, buf1, buf2):
    """Box-sum ``src[:n_src]`` along every axis (flat form): ``(result, its length)``.

    Along an axis of width ``P`` and flat step ``s``:
    ``out[i] = src[i] + src[i + s] + ... + src[i + (P - 1) s]``, added in that
    order at every position. The result lives in ``buf1`` or ``buf2`` (or is
    ``src`` for a 1-wide patch).
    """
    n = n_src
    cur = src
    into_first = True
    for a in range(widths.shape[0]):
        width, step = widths[a], steps[a]
        if width == 1:
            continue
        n -= (width - 1) * step
        out = buf1[:n] if into_first else buf2[:n]
        into_first = not into_first
        _box_axis(cur, out, n, width, step)
        cur = out
    return cur, n


@_kernel
def _box_axis(cur, out, n, width, step):
    """out[i] = cur[i] + cur[i + step] + ... (width terms, left to right), i < n.

    Widths 3, 5 and 7 read all their terms in one pass (one store per sample);
    other widths add one shifted copy per pass. Both add in the same order. One
    pass instead of six cut the 7x7 box from 1.8 to 0.6 ns per sample.
    """
    t0, t1, t2 = cur[0:n], cur[step : step + n], cur[2 * step : 2 * step + n]
    if width == 3:
        for i in range(n):
            out[i] = (t0[i] + t1[i]) + t2[i]
        return
    if width == 2:
        for i in range(n):
            out[i] = t0[i] + t1[i]
        return
    t3, t4 = cur[3 * step : 3 * step + n], cur[4 * step : 4 * step + n]
    if width == 5:
        for i in range(n):
            out[i] = (((t0[i] + t1[i]) + t2[i]) + t3[i]) + t4[i]
        return
    t5, t6 = cur[5 * step : 5 * step + n], cur[6 * step : 6 * step + n]
    if width == 7:
        for i in range(n):
            out[i] = (((((t0[i] + t1[i]) + t2[i]) + t3[i]) + t4[i]) + t5[i]) + t6[i]
        return
    for i in range(n):
        out[i] = t0[i] + t1[i]
    for k in range(2, width):
        term = cur[k * step : k * step + n]
        for i in range(n):
            out[i] += term[i]


@_kernel
def _in_first(widths):
    """Whether :func:`_box` leaves its result in ``buf1`` (an odd number of axes wider than 1)."""
    boxed = 0
    for a in range(widths.shape[0]):
        if widths[a] > 1:
            boxed += 1
    return boxed % 2 == 1


# exp for float32 arguments in [-50, 0] (the clamped exponents): exp(t) = 2^k exp(r),
# k = round(t / ln 2), r = t - k ln 2 (ln 2 in two parts, Cody & Waite, so that k * _LN2_HI
# is exact), exp(r) = 1 + r + r^2 P(r) with the degree-5 minimax P of Cephes' expf.c
# (S. L. Moshier, Cephes Math Library 2.2, 1992), and 2^k added to the float's exponent
# bits. Within 0.97 float32 ulp of the exact exp over [-50, 0] (200,001 points; NumPy's own
# float32 exp: 2.35 there). It vectorises where math.exp calls the C library once per
# sample: 0.78 against 4.4 ns per sample (NumPy's exp: 0.63 ns, but one more pass over memory).
_LOG2E = np.float32(1.4426950408889634)
_ROUND = np.float32(12582912.0)  # 1.5 * 2^23: adding and subtracting it rounds to an integer
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187e-06)
_P = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                   1.6666665459e-1, 5.0000001201e-1))
_ONE = np.float32(1.0)


@_kernel
def _weight32(box, coef, bias, floor, out, scratch):
    """out[i] = exp(clip(box[i] * coef + bias, floor, 0)), float32, floor >= -87 (``scratch``: int32, as long)."""
    n = box.shape[0]
    zero = floor - floor
    for i in range(n):
        x = min(max(box[i] * coef + bias, floor), zero)
        k = (x * _LOG2E + _ROUND) - _ROUND
        r = (x - k * _LN2_HI) - k * _LN2_LO
        scratch[i] = np.int32(k) << 23
        p = (((((_P[0] * r + _P[1]) * r + _P[2]) * r + _P[3]) * r + _P[4]) * r + _P[5]) * (r * r)
        out[i] = (p + r) + _ONE
    bits = out[:n].view(np.int32)
    for i in range(n):
        bits[i] += scratch[i]


@_kernel
def _weights(rows, base, d, size, widths, steps, coef, bias, floor, dist, buf1, buf2, w):
    """``w[j] = w(x, x + d)`` for the flat positions ``x = base + K + j``, ``j < size - 2K``; returns the count."""
    channels = rows.shape[0]
    dist = dist[:size]
    near, far = rows[0, base : base + size], rows[0, base + d : base + d + size]
    for i in range(size):
        diff = near[i] - far[i]
        dist[i] = diff * diff
    for c in range(1, channels):
        near, far = rows[c, base : base + size], rows[c, base + d : base + d + size]
        for i in range(size):
            diff = near[i] - far[i]
            dist[i] += diff * diff
    box, m = _box(dist, size, widths, steps, buf1, buf2)
    box = box[:m]
    in_buf1 = _in_first(widths)
    if w.itemsize == 4:  # float32; the box's other buffer serves as scratch
        _weight32(box, coef, bias, floor, w[:m], (buf2 if in_buf1 else buf1).view(np.int32))
    else:
        t = w[:m]
        zero = floor - floor  # 0 in the working dtype
        for j in range(m):
            t[j] = math.exp(min(max(box[j] * coef + bias, floor), zero))
    return m


@_kernel
def _sums_tile(rows, lo, hi, deltas, reach, widths, steps, coef, bias, floor, want_num, num, den,
               dist, buf1, buf2, w):
    """Over the flat positions ``lo <= p < hi``: ``den[p - lo] += sum_o w(p, p + o)`` (o != 0),
    and with ``want_num`` ``num[c, p - lo] += sum_o w(p, p + o) v_c(p + o)``; float64."""
    channels = rows.shape[0]
    n = hi - lo
    dtype = rows.dtype
    coef, bias, floor = dtype.type(coef), dtype.type(bias), dtype.type(floor)
    for t in range(deltas.shape[0]):
        d = deltas[t]
        # weights w(x, x + d) for x in [lo - d, hi): boxes over [lo - d - K, hi + K)
        _weights(rows, lo - d - reach, d, n + d + 2 * reach, widths, steps, coef, bias, floor, dist, buf1, buf2, w)
        w_fwd, w_bwd = w[d : d + n], w[0:n]  # w(p, p + d) and w(p - d, p) = w(p, p - d)
        for i in range(n):
            den[i] += w_fwd[i]
            den[i] += w_bwd[i]
        if want_num:
            for c in range(channels):
                acc, v_fwd, v_bwd = num[c, :], rows[c, lo + d : hi + d], rows[c, lo - d : hi - d]
                for i in range(n):
                    acc[i] += np.float64(w_fwd[i]) * np.float64(v_fwd[i])
                    acc[i] += np.float64(w_bwd[i]) * np.float64(v_bwd[i])


@_kernel
def _patch_tile(rows, lo, hi, deltas, reach, widths, steps, coef, bias, floor, inv_z, z_lo, num,
                dist, buf1, buf2, w, share_f, share_b, c1, c2):
    """Patch-wise second pass over ``lo <= x < hi``:
    ``num[c, x - lo] += sum_o sum_{p in patch(x)} (w(p, p + o) / Z(p)) v_c(x + o)`` (o != 0), float64.

    ``inv_z[y - z_lo] = mask(y) / Z(y)`` for ``lo - K <= y < hi + K``.
    """
    channels = rows.shape[0]
    n = hi - lo
    K = reach
    m = n + 2 * K
    dtype = rows.dtype
    coef, bias, floor = dtype.type(coef), dtype.type(bias), dtype.type(floor)
    z = inv_z[lo - K - z_lo : hi + K - z_lo]
    for t in range(deltas.shape[0]):
        d = deltas[t]
        # weights w(y, y + d) for y in [lo - K - d, hi + K): boxes over [lo - 2K - d, hi + 2K)
        _weights(rows, lo - 2 * K - d, d, n + d + 4 * K, widths, steps, coef, bias, floor, dist, buf1, buf2, w)
        w_fwd, w_bwd = w[d : d + m], w[0:m]  # at y = lo - K + i: w(y, y + d) and w(y - d, y)
        for i in range(m):
            share_f[i] = w_fwd[i] * z[i]
            share_b[i] = w_bwd[i] * z[i]
        spread, _ = _box(share_f, m, widths, steps, buf1, buf2)
        for c in range(channels):
            acc, v = num[c, :], rows[c, lo + d : hi + d]
            for i in range(n):
                acc[i] += np.float64(spread[i]) * np.float64(v[i])
        spread, _ = _box(share_b, m, widths, steps, c1, c2)
        for c in range(channels):
            acc, v = num[c, :], rows[c, lo - d : hi - d]
            for i in range(n):
                acc[i] += np.float64(spread[i]) * np.float64(v[i])


def _tiles(lo, hi, row, reach, workers):
    """Cut the flat range [lo, hi) into runs of whole rows: about TILE_ELEMENTS positions (more where
    the reach asks, :data:`TILE_REACHES`), and at least one tile per worker where the rows allow (no
    effect on the result)."""
    rows = -(-(hi - lo) // row)
    per_tile = max(1, min(max(TILE_ELEMENTS, TILE_REACHES * 2 * reach) // row, -(-rows // workers)))
    size = per_tile * row
    return [(s, min(s + size, hi)) for s in range(lo, hi, size)]


def _run(tiles, task, workers):
    """``task(lo, hi, stop)`` for every tile, on ``workers`` threads; a Ctrl-C stops it within one run
    of offsets (:data:`STEP_ELEMENTS`)."""
    if workers == 1 or len(tiles) == 1:
        for tile in tiles:
            task(*tile, NEVER)  # Ctrl-C is raised here between two runs of offsets
        return
    with stoppable_pool(min(workers, len(tiles))) as (pool, stop):
        for future in [pool.submit(task, *tile, stop) for tile in tiles]:
            future.result()


def _in_runs(stop, cost, kernel, rows, lo, hi, deltas, *rest):
    """``kernel(rows, lo, hi, deltas, *rest)`` as one call per run of consecutive offsets, each about
    :data:`STEP_ELEMENTS` positions of work (``cost`` per offset, at least one offset per run), in order;
    False if ``stop`` was set between two runs. The scratch arrays in ``rest`` are freed on return, before
    the caller's last step."""
    per = max(1, STEP_ELEMENTS // max(1, cost))
    for i in range(0, deltas.shape[0], per):
        if stop.is_set():
            return False
        kernel(rows, lo, hi, deltas[i : i + per], *rest)
    return True


def working_memory_numba(geo, channels, aggregation, itemsize, workers):
    """Bytes an in-memory call holds at its peak with this engine (an upper estimate; no work done).

    ``geo``: the :class:`~nlref.nlmeans.fast._Geometry` of the image. Counts what
    :func:`nl_means_numba_padded` and its caller allocate, phase by phase, and takes the largest:
    the working copy and the padded image (held throughout); the flat estimate and the result
    built from it; the float64 sums and the scratch of every tile running at once (one per
    worker), and the temporaries of a tile's last step; patch-wise also the float64 ``Z``, its
    inverse, the mask, the centre term and the counts of the step between the passes. The NumPy
    engine's estimate (:func:`nlref.nlmeans.fast.working_memory`) is about four times this.
    """
    C, L, N, Z = channels, geo.length, math.prod(geo.shape), geo.span + 2 * geo.reach
    a, b, K = geo.start, geo.stop, geo.reach
    deltas = geo.deltas
    d_max = deltas[-1] if deltas else 0
    row = geo.padded_shape[-1]

    def running(lo, hi, per_tile):  # the tiles of [lo, hi) that run at once, each holding per_tile(n) bytes
        tiles = _tiles(lo, hi, row, K, workers)
        n = max(t[1] - t[0] for t in tiles)
        return (1 if workers == 1 else min(workers, len(tiles))) * per_tile(n)

    # working copy, padded image; the offsets (Python ints); 64 KiB for the small objects of a call and its
    # threads (measured: 10 to 30 KiB above the arrays, traced)
    held = itemsize * C * (N + L) + 48 * len(deltas) + 2**16
    result = itemsize * C * N  # the estimate unflattened into the image's shape
    if aggregation == "pixel":
        # num, den; kernel: 4 scratch arrays; last step: (rows + num), (1 + den) and the quotient
        tile = running(a, b, lambda n: 8 * (C + 1) * n + max(4 * itemsize * (n + d_max + 2 * K), 8 * (2 * C + 1) * n))
        return held + itemsize * C * geo.span + max(tile, result)
    first = 8 * Z + running(a - K, b + K, lambda n: 8 * n + max(4 * itemsize * (n + d_max + 2 * K), 8 * n))
    # mask, Z, 1/Z in float64; then 1/Z in the working dtype and the two buffers of a box sum
    between = 8 * L + 8 * Z + max(8 * Z, itemsize * Z + 16 * Z, 16 * (geo.span + 4 * K))
    kept = itemsize * Z + 8 * Z + 8 * (geo.span + 4 * K) + itemsize * C * geo.span  # 1/Z, centre, counts, estimate

    def patch_tile(n):  # num; kernel: 6 scratch arrays of ``big`` and 2 of n + 2K; last step: safe and 2 temporaries
        big = n + d_max + 4 * K
        return 8 * C * n + max(itemsize * (6 * big + 2 * (n + 2 * K)), 8 * (2 * C + 2) * n)

    return held + max(first, between, kept + max(running(a, b, patch_tile), result))


def nl_means_numba_padded(padded, *, inside, geo, h, sigma, aggregation, workers, floor, progress=None):
    """:func:`nlref.nlmeans.fast.nl_means_fast_padded` for a NumPy block, in compiled tiles.

    ``padded`` (C, padded shape) is the block with its halo, ``geo`` its
    :class:`~nlref.nlmeans.fast._Geometry`. Returns the flat estimates, one
    array of length ``geo.span`` per channel, over the flat range [a, b).
    """
    compile_kernels()
    channels = padded.shape[0]
    dtype = padded.dtype
    rows = np.ascontiguousarray(padded.reshape(channels, geo.length))
    coef = -1.0 / (channels * math.prod(geo.patch_size) * h**2)
    bias = 2.0 * sigma**2 / h**2
    deltas = np.asarray(geo.deltas, dtype=np.int64)
    d_max = int(deltas[-1]) if deltas.size else 0
    widths = np.asarray(geo.patch_size, dtype=np.int64)
    steps = np.asarray(geo.strides, dtype=np.int64)
    a, b, K = geo.start, geo.stop, geo.reach
    row = geo.padded_shape[-1]
    if deltas.size == 0:
        deltas = np.zeros(0, dtype=np.int64)

    def scratch(length, count):
        return [np.empty(length, dtype=dtype) for _ in range(count)]

    def done():
        if progress is not None:
            progress(len(geo.deltas))

    if aggregation == "pixel":
        out = np.empty((channels, b - a), dtype=dtype)

        def pixel_task(lo, hi, stop):
            n = hi - lo
            num = np.zeros((channels, n), dtype=np.float64)
            den = np.zeros(n, dtype=np.float64)
            if not _in_runs(stop, n + d_max + 2 * K, _sums_tile, rows, lo, hi, deltas, K, widths, steps, coef, bias,
                            floor, True, num, den, *scratch(n + d_max + 2 * K, 4)):
                return
            out[:, lo - a : hi - a] = (rows[:, lo:hi] + num) / (1.0 + den)

        _run(_tiles(a, b, row, K, workers), pixel_task, workers)
        done()
        return out

    # patch-wise, pass 1: Z(p) for every patch centre p in [a - K, b + K)
    z_lo, z_hi = a - K, b + K
    den = np.empty(z_hi - z_lo, dtype=np.float64)
    no_num = np.zeros((channels, 0), dtype=np.float64)

    def z_task(lo, hi, stop):
        n = hi - lo
        part = np.zeros(n, dtype=np.float64)
        if not _in_runs(stop, n + d_max + 2 * K, _sums_tile, rows, lo, hi, deltas, K, widths, steps, coef, bias,
                        floor, False, no_num, part, *scratch(n + d_max + 2 * K, 4)):
            return
        den[lo - z_lo : hi - z_lo] = 1.0 + part  # the centre offset has weight exp(0) = 1

    _run(_tiles(z_lo, z_hi, row, K, workers), z_task, workers)
    done()

    # each float64 array of the padded size dropped once read: the peak of this step held Z, 1/Z, the mask
    # and three buffers of _box_flat at once, 18 copies of a float32 image (512 x 512, traced)
    mask = _image_mask(geo, inside)
    inv_z64 = mask[z_lo:z_hi] / den
    den = None  # (z_task, done, still refers to the name)
    inv_z = inv_z64.astype(dtype)
    centre = _box_flat(inv_z64, geo)
    del inv_z64
    count = _box_flat(mask[a - 2 * K : b + 2 * K], geo)[K : K + b - a]
    del mask
    out = np.empty((channels, b - a), dtype=dtype)

    def patch_task(lo, hi, stop):
        n = hi - lo
        num = np.zeros((channels, n), dtype=np.float64)
        big = n + d_max + 4 * K
        # cost: two box passes per offset
        if not _in_runs(stop, 2 * big, _patch_tile, rows, lo, hi, deltas, K, widths, steps, coef, bias, floor,
                        inv_z, z_lo, num, *scratch(big, 4), *scratch(n + 2 * K, 2), *scratch(big, 2)):
            return
        i, j = lo - a, hi - a
        safe = np.where(count[i:j] > 0, count[i:j], 1.0)
        out[:, i:j] = (rows[:, lo:hi] * centre[i:j] + num) / safe

    _run(_tiles(a, b, row, K, workers), patch_task, workers)
    done()
    return out


def _image_mask(geo, inside):
    """Flat float64 indicator of the image pixels (``inside``, per axis [lo, hi)) in the padded block."""
    mask = np.zeros(geo.padded_shape, dtype=np.float64)
    mask[tuple(slice(lo, hi) for lo, hi in inside)] = 1.0
    return mask.reshape(-1)


def _box_flat(src, geo):
    """Box sum over the patch of a flat float64 array (length shrinks by 2K)."""
    widths = np.asarray(geo.patch_size, dtype=np.int64)
    steps = np.asarray(geo.strides, dtype=np.int64)
    src = np.ascontiguousarray(src)
    out, n = _box(src, src.shape[0], widths, steps, np.empty_like(src), np.empty_like(src))
    return out[:n]  # a view: its buffer is kept, the other one freed (a copy was a third array)
