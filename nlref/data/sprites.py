"""A procedural video task that needs long-range space-time relations.

Each clip shows two sprites (5x5 glyphs) far apart in space *and* in time:
sprite 1 in one quadrant during the first half of the clip, sprite 2 in the
diagonally opposite quadrant during the second half. Each sprite has a *kind*;
the label is 1 when the two kinds are equal, 0 when they differ (balanced
classes). With ``relation="brightness"`` (the default) the kind is one of
``kinds`` brightness levels and the glyph is a random nuisance; with
``relation="shape"`` the kind is the glyph and the colour is the nuisance.

Why a network of local (per-frame) convolutions with global average pooling
and a linear head cannot solve it: with no temporal convolution, no frame ever
holds both sprites, so every position's feature depends on one sprite only and
the pooled feature is ``phi(a) + phi(b) + const``. The two sprites are
exchangeable (same duration, same position distribution), so the head's score
is ``w(a) + w(b)`` for one function ``w`` of the kind. If a pair of equal kinds
``(a, a)`` is called "same" (``2 w(a) > t``) and so is ``(a', a')``, then
``w(a) + w(a') > t`` too, so the mixed pair is called "same" as well. The best
such rule marks a subset of ``m`` kinds and scores at most
``1/2 + max_m [m/(2K) - m(m-1)/(2K(K-1))]``: 66.7% for ``K = 4`` kinds, 64.3%
for 8, and 62.5% as ``K`` grows (:func:`additive_ceiling`). A non-local block
brings sprite 2's features to sprite 1's positions, after which a local
nonlinearity can compare them.

Clips are generated on the host with NumPy's PCG64 (vectorised: about 0.1 ms
per 8x32x32 clip on this 2-core machine) and moved to the requested library,
so a seed gives the same clips on every backend.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from .. import backend as B

__all__ = ["GLYPHS", "SpriteClips", "sprite_clips", "sprite_splits", "additive_ceiling"]

_GLYPH_ROWS = {
    "plus":    ["..#..", "..#..", "#####", "..#..", "..#.."],
    "cross":   ["#...#", ".#.#.", "..#..", ".#.#.", "#...#"],
    "ring":    ["#####", "#...#", "#...#", "#...#", "#####"],
    "diamond": ["..#..", ".#.#.", "#...#", ".#.#.", "..#.."],
    "tee":     ["#####", "..#..", "..#..", "..#..", "..#.."],
    "ell":     ["#....", "#....", "#....", "#....", "#####"],
    "bars":    ["#####", ".....", "#####", ".....", "#####"],
    "checker": ["#.#.#", ".#.#.", "#.#.#", ".#.#.", "#.#.#"],
}
#: The sprite kinds, 5x5 binary glyphs, in a fixed order (kind ``k`` is ``GLYPHS[k]``).
GLYPHS = {name: np.array([[c == "#" for c in row] for row in rows], dtype=np.float32)
          for name, rows in _GLYPH_ROWS.items()}
_SPRITE = 5
#: What "the same kind" means: the same brightness level (glyph random), or the same glyph.
RELATIONS = ("brightness", "shape")


def _levels(kinds):
    """The brightness of each kind: ``kinds`` levels evenly spaced in [0.3, 1]."""
    return np.linspace(0.3, 1.0, kinds)


@dataclass
class SpriteClips:
    """Clips, labels and what was drawn where.

    Attributes
    ----------
    video : array, shape (n, channels, frames, size, size)
        In the requested library and dtype; background 0, sprites up to 1, plus noise.
    labels : array, shape (n,), int64
        1 when both sprites are the same kind, else 0.
    meta : dict of host NumPy arrays, each of length n
        ``kind`` (n, 2), ``glyph`` (n, 2), ``start`` (n, 2) first visible frame, ``origin`` (n, 2, 2)
        top-left (row, col) at the first visible frame, ``velocity`` (n, 2, 2)
        pixels per frame; index 1 of the second axis is sprite 1 or 2.
    """

    video: object
    labels: object
    meta: dict = field(default_factory=dict)

    def __len__(self):
        return int(self.labels.shape[0])


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_channels(channels):
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    return int(channels)


def _check_noise(noise):
    if isinstance(noise, bool) or not (isinstance(noise, numbers.Real) and 0 <= noise < 1):
        raise ValueError(f"noise must be a number in [0, 1), got {noise!r}")
    return float(noise)


def _check_target(dtype, xp):
    """The dtype's name ("float32" or "float64", given as a string or a dtype) after checking ``xp`` (a
    string such as "numpy" raised AttributeError deep inside); else an error naming the argument."""
    try:
        name = B.dtype_name(dtype)
    except TypeError:
        name = None
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    if xp is not None:
        B.library(xp)
    return name


def _split_seeds(seed):
    """Two independent generators from one seed (an int >= 0, a Generator or None), for a train and a
    validation set; a bad seed is an error naming ``seed``."""
    if isinstance(seed, np.random.Generator):
        return seed.spawn(2)
    B.rng(seed)  # the checks, in nlref's words
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)]


def _paired_kinds(rng, n, kinds):
    """``(labels, kind)``: n balanced 0/1 labels and each example's two kinds, equal where the label is 1.

    labels (n,) int; kind (n, 2) int in [0, kinds). A second kind is uniform over the other kinds.
    """
    labels = rng.permutation(np.arange(n) % 2)              # balanced: floor/ceil of n/2 each
    kind1 = rng.integers(0, kinds, n)
    other = (kind1 + rng.integers(1, kinds, n)) % kinds     # uniform over the other kinds
    return labels, np.stack([kind1, np.where(labels == 1, kind1, other)], axis=1)


def sprite_clips(n, *, seed=0, relation="brightness", frames=8, size=32, kinds=8, channels=1, duration=3,
                 noise=0.05, xp=None, dtype="float32", device=None):
    """Generate ``n`` labelled clips of the two-sprite "same kind?" task.

    Parameters
    ----------
    n : int
        Number of clips.
    relation : {"brightness", "shape"}
        What the kind is (see the module docstring).
    seed : int or numpy.random.Generator
        Everything (labels, kinds, places, motion, noise, colours) follows from it.
    frames : int
        Clip length T (even, >= 2 * duration).
    size : int
        Frame height and width (>= 16); sprites are 5x5.
    kinds : int
        Number of kinds in play, 2 to 8: brightness levels evenly spaced in [0.3, 1],
        or the first ``kinds`` glyphs of :data:`GLYPHS`.
    channels : int
        1 (grey) or 3 (each sprite gets a random bright colour, which carries no label information).
    duration : int
        Frames each sprite stays visible (the same for both, which keeps them exchangeable);
        a sprite moving one pixel per frame must stay in its quadrant: ``size // 2 >= 5 + duration - 1``.
    noise : float
        Standard deviation of additive Gaussian noise.
    xp : module, optional
        Target library (numpy, cupy, array_api_strict, torch ...); NumPy when omitted.
    device : device, optional
        Target device (with ``xp``): a ``cupy.cuda.Device``, ``array_api_strict.Device(...)``; the library's
        default when omitted.
    dtype : str
        ``"float32"`` or ``"float64"``.

    Returns
    -------
    SpriteClips
    """
    n = _check_int("n", n, 1)
    frames = _check_int("frames", frames, 2)
    size = _check_int("size", size, 16)
    kinds = _check_int("kinds", kinds, 2)
    duration = _check_int("duration", duration, 1)
    if kinds > len(GLYPHS):
        raise ValueError(f"kinds must be between 2 and {len(GLYPHS)}, got {kinds}")
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    channels = _check_channels(channels)
    if frames % 2 or 2 * duration > frames:
        raise ValueError(f"frames must be even and hold two non-overlapping sprites of duration {duration}, "
                         f"got frames={frames}")
    if size // 2 < _SPRITE + duration - 1:
        raise ValueError(f"size // 2 must be at least 5 + duration - 1 = {_SPRITE + duration - 1} (a 5x5 sprite "
                         f"moving one pixel per frame stays in its quadrant), got size={size}, duration={duration}")
    noise = _check_noise(noise)
    name = _check_target(dtype, xp)
    rng = B.rng(seed)

    labels, kind = _paired_kinds(rng, n, kinds)

    half = frames // 2
    start = rng.integers(0, half - duration + 1, (n, 2))
    start[:, 1] += half                                      # sprite 2 in the second half

    quad = size // 2
    travel = duration - 1
    quadrant = rng.integers(0, 4, n)                         # sprite 1's quadrant; sprite 2 opposite
    corner = np.stack([np.stack([quadrant // 2, quadrant % 2], 1),
                       np.stack([1 - quadrant // 2, 1 - quadrant % 2], 1)], axis=1) * quad
    velocity = rng.integers(-1, 2, (n, 2, 2))
    lo = np.maximum(0, -velocity * travel)                   # keep the whole path inside the quadrant
    hi = quad - _SPRITE - np.maximum(0, velocity * travel)
    origin = corner + lo + np.floor(rng.random((n, 2, 2)) * (hi - lo + 1)).astype(np.int64)

    if relation == "brightness":                             # kind = brightness level, glyph = nuisance
        glyph = rng.integers(0, len(GLYPHS), (n, 2))
        colour = np.repeat(_levels(kinds)[kind][:, :, None], channels, axis=2)
    else:                                                    # kind = glyph, colour = nuisance
        glyph = kind
        colour = rng.uniform(0.6, 1.0, (n, 2, channels)) if channels == 3 else np.ones((n, 2, 1))
    colour = colour.astype(np.float32)
    video = rng.standard_normal((n, channels, frames, size, size), dtype=np.float32) * np.float32(noise)
    glyphs = np.stack(list(GLYPHS.values()))
    clip = np.arange(n)
    ys, xs = np.meshgrid(np.arange(_SPRITE), np.arange(_SPRITE), indexing="ij")
    for s in range(2):
        pattern = glyphs[glyph[:, s]][:, None, :, :] * colour[:, s, :, None, None]   # (n, C, 5, 5)
        for step in range(duration):
            top_left = origin[:, s] + velocity[:, s] * step
            rows = top_left[:, 0, None, None] + ys
            cols = top_left[:, 1, None, None] + xs
            t = start[:, s] + step
            for c in range(channels):
                video[clip[:, None, None], c, t[:, None, None], rows, cols] += pattern[:, c]
    meta = {"kind": kind, "glyph": glyph, "start": start, "origin": origin, "velocity": velocity}
    target = np if xp is None else xp
    return SpriteClips(B.asarray(video.astype(name), xp=target, device=device),
                       B.asarray(labels.astype(np.int64), xp=target, device=device), meta)


def sprite_splits(n_train, n_val, *, seed=0, **options):
    """Train and validation clips drawn from independent streams of one seed.

    ``sprite_splits(..., seed=s)`` always gives the same two sets; the
    validation set does not depend on ``n_train``.
    """
    train_rng, val_rng = _split_seeds(seed)
    return sprite_clips(n_train, seed=train_rng, **options), sprite_clips(n_val, seed=val_rng, **options)


def additive_ceiling(kinds):
    """Best accuracy of any rule ``w(a) + w(b) > t`` on the balanced same/different task.

    ``1/2 + max_m [m/(2K) - m(m-1)/(2K(K-1))]`` over the number ``m`` of kinds
    the rule calls "same" (see the module docstring for the argument).
    """
    k = _check_int("kinds", kinds, 2)
    return 0.5 + max(m / (2 * k) - m * (m - 1) / (2 * k * (k - 1)) for m in range(k + 1))
