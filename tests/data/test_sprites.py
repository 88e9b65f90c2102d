"""The two-sprite task: determinism, the geometry the argument needs, labels, errors, the ceiling."""

import itertools

import numpy as np
import pytest

import nlref.backend as B
from nlref.data.sprites import GLYPHS, additive_ceiling, sprite_clips, sprite_splits
from tests.helpers import assert_same_library


def test_same_seed_same_clips_on_every_backend(xp, device):
    a = sprite_clips(20, seed=3)
    b = sprite_clips(20, seed=3, xp=xp, device=device)
    assert_same_library(b.video, B.asarray(np.zeros(1), xp=xp, device=device))
    assert_same_library(b.labels, b.video)
    np.testing.assert_array_equal(B.to_numpy(b.video), a.video)
    np.testing.assert_array_equal(B.to_numpy(b.labels), a.labels)


def test_another_seed_gives_other_clips():
    a, b = sprite_clips(20, seed=3), sprite_clips(20, seed=4)
    assert not np.array_equal(a.video, b.video) and not np.array_equal(a.meta["kind"], b.meta["kind"])


def test_splits_are_independent_and_val_does_not_depend_on_train_size():
    tr1, va1 = sprite_splits(30, 10, seed=0)
    tr2, va2 = sprite_splits(50, 10, seed=0)
    np.testing.assert_array_equal(va1.video, va2.video)
    assert not np.array_equal(tr1.video[:10], va1.video)


@pytest.mark.parametrize("relation", ["brightness", "shape"])
@pytest.mark.parametrize("channels", [1, 3])
def test_geometry_and_labels(relation, channels):
    n, frames, size = 400, 8, 16
    clips = sprite_clips(n, seed=1, relation=relation, channels=channels, noise=0.0, frames=frames, size=size)
    video, labels, meta = clips.video, clips.labels, clips.meta
    assert video.shape == (n, channels, frames, size, size) and video.dtype == np.float32
    assert labels.sum() == n // 2                                   # balanced
    same = meta["kind"][:, 0] == meta["kind"][:, 1]
    np.testing.assert_array_equal(labels, same.astype(np.int64))
    lit = (video != 0).any(axis=(1, 3, 4))                          # (n, T): which frames show a sprite
    half = frames // 2
    for i in range(n):
        frames_1 = np.arange(meta["start"][i, 0], meta["start"][i, 0] + 3)
        frames_2 = np.arange(meta["start"][i, 1], meta["start"][i, 1] + 3)
        assert frames_1.max() < half <= frames_2.min()              # never in the same frame
        np.testing.assert_array_equal(np.flatnonzero(lit[i]), np.concatenate([frames_1, frames_2]))
        quadrants = [tuple(meta["origin"][i, s] // (size // 2)) for s in range(2)]
        assert quadrants[0] == tuple(1 - q for q in quadrants[1])   # diagonally opposite
        for s, t0 in ((0, frames_1[0]), (1, frames_2[0])):           # each sprite stays in its quadrant
            for step in range(3):
                r, c = meta["origin"][i, s] + meta["velocity"][i, s] * step
                assert (r // (size // 2), c // (size // 2)) == quadrants[s]
                assert (r + 4) // (size // 2) == quadrants[s][0] and (c + 4) // (size // 2) == quadrants[s][1]
    if relation == "brightness":                                    # the kind is the brightness
        level = video.max(axis=(1, 3, 4))                           # (n, T)
        peak = [level[i, meta["start"][i, 0]] for i in range(n)], [level[i, meta["start"][i, 1]] for i in range(n)]
        np.testing.assert_allclose(np.isclose(peak[0], peak[1]), same)
    else:                                                           # the kind is the glyph
        np.testing.assert_array_equal(meta["glyph"], meta["kind"])


def test_glyphs_are_distinct_5x5_masks():
    masks = np.stack(list(GLYPHS.values()))
    assert masks.shape == (8, 5, 5)
    assert len({m.tobytes() for m in masks}) == 8


def _best_symmetric_additive_rule(k):
    """Brute force: best accuracy of w(a) + w(b) > t over w in a grid (an independent check)."""
    p = np.full((k, k), 0.5 / (k * (k - 1)))
    np.fill_diagonal(p, 0.5 / k)
    same = np.eye(k, dtype=bool)
    best = 0.0
    for w in itertools.product(range(k), repeat=k):
        s = np.add.outer(w, w)
        for t in np.unique(s):
            said_same = s >= t
            best = max(best, p[said_same == same].sum())
    return best


@pytest.mark.parametrize("k", [2, 3, 4])
def test_additive_ceiling_matches_brute_force(k):
    assert additive_ceiling(k) == pytest.approx(_best_symmetric_additive_rule(k), abs=1e-12)


def test_additive_ceiling_values():
    assert [round(additive_ceiling(k), 4) for k in (2, 4, 6, 8)] == [0.75, 0.6667, 0.65, 0.6429]
    assert additive_ceiling(1000) == pytest.approx(0.625, abs=1e-3)


@pytest.mark.parametrize("kw, match", [
    (dict(n=0), "n must be an integer >= 1"),
    (dict(kinds=9), "kinds must be between 2 and 8"),
    (dict(kinds=1), "kinds must be an integer >= 2"),
    (dict(channels=2), "channels must be 1 or 3"),
    (dict(frames=5), "frames must be even"),
    (dict(size=8), "size must be an integer >= 16"),
    (dict(noise=-0.1), "noise must be a number"),
    (dict(relation="colour"), "relation must be one of"),
    (dict(dtype="int8"), "dtype must be float32 or float64"),
])
def test_bad_arguments(kw, match):
    args = {"n": 4, **kw}
    with pytest.raises(ValueError, match=match):
        sprite_clips(args.pop("n"), **args)


@pytest.mark.parametrize("kw, match", [
    # a sprite moving one pixel per frame left its quadrant (seed 5: rows 12 to 16 of a 32-pixel clip, so
    # both sprites were seen by one quadrant's units), or raised IndexError
    (dict(frames=26, duration=13, size=32), r"size // 2 must be at least 5 \+ duration - 1 = 17"),
    (dict(frames=16, duration=8, size=16), r"size // 2 must be at least 5 \+ duration - 1 = 12"),
    (dict(channels=True), "channels must be 1 or 3, got True"),  # TypeError: an integer is required
    (dict(channels=3.0), "channels must be 1 or 3, got 3.0"),
    (dict(dtype=5), "dtype must be float32 or float64, got 5"),  # TypeError: Cannot interpret '5'
])
def test_bad_arguments_found_by_the_probe(kw, match):
    with pytest.raises(ValueError, match=match):
        sprite_clips(2, seed=5, **kw)


def test_a_sprite_path_that_just_fits_stays_in_its_quadrant():
    clips = sprite_clips(64, frames=24, duration=12, size=32, noise=0.0, seed=0)   # 16 >= 5 + 11
    origin, velocity = clips.meta["origin"], clips.meta["velocity"]
    for step in (0, 11):
        top_left = origin + velocity * step                     # (n, 2, 2)
        assert np.all(top_left // 16 == (top_left + 4) // 16)   # the whole 5x5 sprite in one quadrant
    assert np.all(origin // 16 == (origin + velocity * 11) // 16)


@pytest.mark.parametrize("make", [sprite_clips, sprite_splits])
def test_seeds_are_checked_in_nlrefs_words(make):
    args = (2,) if make is sprite_clips else (2, 2)
    for bad, error in (("1", TypeError), (1.5, TypeError), (-1, ValueError)):   # NumPy's SeedSequence messages
        with pytest.raises(error, match="seed must be an int >= 0"):
            make(*args, seed=bad)
    np.testing.assert_array_equal(make(*args, seed=np.int64(3))[-1].video if make is sprite_splits
                                  else make(*args, seed=np.int64(3)).video,
                                  make(*args, seed=3)[-1].video if make is sprite_splits else make(*args, seed=3).video)


def test_splits_take_a_generator_as_the_clips_do():
    # sprite_clips took a Generator; sprite_splits raised "SeedSequence expects int or sequence of ints"
    a = sprite_splits(3, 2, seed=np.random.default_rng(7))
    b = sprite_splits(3, 2, seed=np.random.default_rng(7))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.video, y.video)
    assert not np.array_equal(a[0].video[:2], a[1].video)
    np.testing.assert_array_equal(sprite_splits(3, 2, seed=4)[1].video, sprite_splits(5, 2, seed=4)[1].video)
