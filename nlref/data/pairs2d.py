"""A 2-D image task that needs a long-range relation: are two shapes far apart the same kind?

The image task in miniature behind the paper's COCO experiments (non-local blocks in an
image backbone). Each image shows two 5x5 glyphs (:data:`nlref.data.sprites.GLYPHS`) in
diagonally opposite quadrants; each has a *kind*, and the label is 1 when the kinds are
equal (balanced classes). With ``relation="brightness"`` the kind is one of ``kinds``
brightness levels and the glyph is a random nuisance; with ``relation="shape"`` the kind
is the glyph.

Where the shapes sit: in diagonally opposite quadrants, each at least ``margin`` pixels from
the image's centre lines, so along both axes their nearest pixels are ``2 * margin + 1``
apart: no unit whose receptive field spans at most ``2 * margin + 1`` pixels sees both.

What local convolutions with global average pooling and a linear head can do. If no unit
sees both shapes, the pooled feature is ``Phi(a, p) + Phi(b, q) + c``: one term per shape,
depending on its kind and where it sits (``p``, ``q``; convolutions are
translation-equivariant, so the place matters only through the zero padding at the
border, which a 5x5 shape near the edge reaches). The head's score is ``u_p(a) + v_q(b)``.
Two ceilings, and the second is the one that binds such a network:

- A rule that cannot use where the shapes sit (``u = v = w``: features blind to the
  border, e.g. circular padding) is the sprite task's exchangeable ``w(a) + w(b) > t``:
  :func:`nlref.data.sprites.additive_ceiling`, 75% for 2 kinds, 66.7% for 3 and 4, 62.5%
  as the kinds grow.
- A position-aware rule may use one function for the shape in the upper half and another
  for the one in the lower half. Positions are independent of kinds and label, so the
  best such rule is the best ``u(a) + v(b) > t``. The pairs it calls "same" form an
  up-set once kinds are sorted by ``u`` (rows) and by ``v`` (columns), a staircase, and
  every staircase is realised by some ``u``, ``v``, ``t``; :func:`position_aware_ceiling`
  tries every column order and staircase. It is 75% for every number of kinds: ``u(a) = a,
  v(b) = -b`` calls "same" exactly when ``a >= b``, right on every equal pair and on the
  half of the unequal pairs with ``a < b``.

So a network of local convolutions whose receptive field stays within ``2 * margin + 1``
pixels, global average pooling and a linear head scores at most 75% (in expectation);
a deeper or strided network can see both shapes and is not bound. A non-local block
brings one shape's features to the other's positions, after which a local nonlinearity
can compare them.

Images are generated on the host with NumPy's PCG64 and moved to the requested library,
so a seed gives the same images on every backend.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from .. import backend as B
from .sprites import (GLYPHS, RELATIONS, _check_channels, _check_int, _check_noise, _check_target, _levels,
                      _paired_kinds, _split_seeds, additive_ceiling)

__all__ = ["PairImages", "pair_images", "pair_splits", "additive_ceiling", "position_aware_ceiling"]

_SHAPE = 5


@dataclass
class PairImages:
    """Images, labels and what was drawn where.

    Attributes
    ----------
    image : array, shape (n, channels, size, size)
        In the requested library and dtype; background 0, shapes up to 1, plus noise.
    labels : array, shape (n,), int64
        1 when both shapes are the same kind, else 0.
    meta : dict of host NumPy arrays, each of length n
        ``kind`` (n, 2), ``glyph`` (n, 2), ``origin`` (n, 2, 2) top-left (row, col) of
        shape 1 and shape 2, ``quadrant`` (n,) shape 1's quadrant (0..3, row-major;
        shape 2 is in the opposite one).
    """

    image: object
    labels: object
    meta: dict = field(default_factory=dict)

    def __len__(self):
        return int(self.labels.shape[0])


def pair_images(n, *, seed=0, relation="brightness", size=24, margin=3, kinds=4, channels=1, noise=0.05,
                xp=None, dtype="float32", device=None):
    """Generate ``n`` labelled images of the two-shape "same kind?" task.

    Parameters
    ----------
    n : int
        Number of images.
    seed : int or numpy.random.Generator
        Everything (labels, kinds, places, glyphs, colours, noise) follows from it.
    relation : {"brightness", "shape"}
        What the kind is (see the module docstring).
    size : int
        Height and width; the shapes are 5x5, one per quadrant.
    margin : int
        Each shape keeps at least this many pixels from the centre lines (so the two are
        ``2 * margin + 1`` pixels apart along both axes); ``size // 2 >= 5 + margin``.
    kinds : int
        Number of kinds in play, 2 to 8.
    channels : int
        1 (grey) or 3 (in the shape relation each shape gets a random colour, a nuisance).
    noise : float
        Standard deviation of additive Gaussian noise, in [0, 1).
    xp : module, optional
        Target library (numpy, cupy, array_api_strict, torch ...); NumPy when omitted.
    device : device, optional
        Target device (with ``xp``): a ``cupy.cuda.Device``, ``array_api_strict.Device(...)``; the library's
        default when omitted.
    dtype : {"float32", "float64"} or the dtype

    Returns
    -------
    PairImages
    """
    n = _check_int("n", n, 1)
    size = _check_int("size", size, 10)
    margin = _check_int("margin", margin, 0)
    if size // 2 < _SHAPE + margin:
        raise ValueError(f"size // 2 must be at least 5 + margin = {_SHAPE + margin} (a 5x5 shape per quadrant), "
                         f"got size={size}, margin={margin}")
    kinds = _check_int("kinds", kinds, 2)
    if kinds > len(GLYPHS):
        raise ValueError(f"kinds must be between 2 and {len(GLYPHS)}, got {kinds}")
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    channels = _check_channels(channels)
    noise = _check_noise(noise)
    dtype = _check_target(dtype, xp)
    rng = B.rng(seed)

    labels, kind = _paired_kinds(rng, n, kinds)

    quad = size // 2
    quadrant = rng.integers(0, 4, n)                         # shape 1's quadrant; shape 2 opposite
    half = np.stack([np.stack([quadrant // 2, quadrant % 2], 1),
                     np.stack([1 - quadrant // 2, 1 - quadrant % 2], 1)], axis=1)   # (n, 2, 2): 0 top/left, 1 bottom/right
    offset = rng.integers(0, quad - _SHAPE - margin + 1, (n, 2, 2))  # from the image's outer edge
    origin = np.where(half == 0, offset, size - _SHAPE - offset)

    if relation == "brightness":                             # kind = brightness level, glyph = nuisance
        glyph = rng.integers(0, len(GLYPHS), (n, 2))
        colour = np.repeat(_levels(kinds)[kind][:, :, None], channels, axis=2)
    else:                                                    # kind = glyph, colour = nuisance
        glyph = kind
        colour = rng.uniform(0.6, 1.0, (n, 2, channels)) if channels == 3 else np.ones((n, 2, 1))
    image = rng.standard_normal((n, channels, size, size), dtype=np.float32) * np.float32(noise)
    glyphs = np.stack(list(GLYPHS.values()))
    ys, xs = np.meshgrid(np.arange(_SHAPE), np.arange(_SHAPE), indexing="ij")
    item = np.arange(n)[:, None, None]
    for s in range(2):
        pattern = glyphs[glyph[:, s]][:, None] * colour[:, s, :, None, None].astype(np.float32)  # (n, C, 5, 5)
        rows = origin[:, s, 0, None, None] + ys
        cols = origin[:, s, 1, None, None] + xs
        for c in range(channels):
            image[item, c, rows, cols] += pattern[:, c]
    meta = {"kind": kind, "glyph": glyph, "origin": origin, "quadrant": quadrant}
    target = np if xp is None else xp
    return PairImages(B.asarray(image.astype(dtype), xp=target, device=device),
                      B.asarray(labels.astype(np.int64), xp=target, device=device),
                      meta)


def pair_splits(n_train, n_val, *, seed=0, **options):
    """Train and validation images from independent streams of one seed (the validation set
    does not depend on ``n_train``)."""
    train_rng, val_rng = _split_seeds(seed)
    return pair_images(n_train, seed=train_rng, **options), pair_images(n_val, seed=val_rng, **options)


def position_aware_ceiling(kinds):
    """Best accuracy of any rule ``u(a) + v(b) > t`` (two functions) on the balanced task.

    Kind ``a`` is uniform; ``b = a`` with probability 1/2, else uniform over the other
    kinds. Calling a pair "same" gains ``1/(2K)`` on the diagonal and loses
    ``1/(2K(K-1))`` off it, from a base of 1/2 (everything "different"). The "same"
    pairs of such a rule form a staircase once rows are sorted by ``u`` and columns by
    ``v``; with rows in a fixed order (any order can be relabelled so), every column
    order and every staircase is tried: ``K! * C(2K, K)`` cases, so ``kinds <= 7``.
    """
    k = _check_int("kinds", kinds, 2)
    if k > 7:
        raise ValueError(f"kinds must be at most 7 for the exhaustive search, got {k}")
    gain, loss = 1 / (2 * k), 1 / (2 * k * (k - 1))
    best = 0.0
    for order in itertools.permutations(range(k)):           # column j holds kind order[j]
        diag_col = np.argsort(order)                          # row a's diagonal cell sits in column diag_col[a]
        # a staircase: row lengths l_0 >= l_1 >= ... >= l_{K-1}; row a with length l scores
        # l * (-loss) + (gain + loss) if its diagonal column < l
        row_score = np.array([[length * -loss + ((gain + loss) if diag_col[a] < length else 0.0)
                               for length in range(k + 1)] for a in range(k)])
        # the best non-increasing lengths, by dynamic programming over rows
        dp = row_score[0].copy()                              # dp[l]: best with the current row's length l
        for a in range(1, k):
            suffix_best = np.maximum.accumulate(dp[::-1])[::-1]   # best of the previous rows with length >= l
            dp = row_score[a] + suffix_best
        best = max(best, float(dp.max()))
    return 0.5 + best
