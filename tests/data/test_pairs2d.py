"""The 2-D two-shape task: generator (seeded, balanced, labels as drawn, shapes far apart,
array-agnostic), its errors, and both ceilings of local-features-plus-linear-head rules."""

import itertools

import numpy as np
import pytest

import nlref.backend as B
from nlref.data.pairs2d import additive_ceiling, pair_images, pair_splits, position_aware_ceiling
from nlref.data.sprites import GLYPHS, _levels
from tests.helpers import assert_same_library


def test_seeded_and_balanced():
    a, b = pair_images(41, seed=3), pair_images(41, seed=3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, pair_images(41, seed=4).image)
    assert abs(int(a.labels.sum()) - 41 / 2) <= 0.5
    assert a.image.shape == (41, 1, 24, 24) and a.image.dtype == np.float32 and a.labels.dtype == np.int64


@pytest.mark.parametrize("relation,channels", [("brightness", 1), ("shape", 1), ("shape", 3), ("brightness", 3)])
def test_labels_say_whether_the_kinds_match_and_the_pixels_show_them(relation, channels):
    data = pair_images(60, seed=1, relation=relation, channels=channels, kinds=5, noise=0.0, dtype="float64")
    kind, glyph, origin = data.meta["kind"], data.meta["glyph"], data.meta["origin"]
    np.testing.assert_array_equal(data.labels, (kind[:, 0] == kind[:, 1]).astype(np.int64))
    glyphs = np.stack(list(GLYPHS.values()))
    for i in range(60):
        for s in range(2):
            r, c = origin[i, s]
            patch = data.image[i, :, r:r + 5, c:c + 5]
            mask = glyphs[glyph[i, s]].astype(bool)
            assert np.all(patch[:, ~mask] == 0) and np.all(patch[:, mask] > 0)
            if relation == "brightness":
                np.testing.assert_allclose(patch[:, mask], _levels(5)[kind[i, s]], rtol=1e-6)  # drawn in float32
            else:
                assert glyph[i, s] == kind[i, s]
        assert np.count_nonzero(data.image[i].sum(axis=0)) == sum(glyphs[g].sum() for g in glyph[i])


@pytest.mark.parametrize("size,margin", [(24, 3), (25, 3), (20, 0), (30, 7)])
def test_shapes_sit_in_opposite_quadrants_far_apart(size, margin):
    data = pair_images(200, seed=2, size=size, margin=margin)
    origin, quadrant = data.meta["origin"], data.meta["quadrant"]
    top = origin[:, :, 0] < size // 2
    left = origin[:, :, 1] < size // 2
    np.testing.assert_array_equal(top[:, 0], quadrant // 2 == 0)
    np.testing.assert_array_equal(left[:, 0], quadrant % 2 == 0)
    assert np.all(top[:, 0] != top[:, 1]) and np.all(left[:, 0] != left[:, 1])
    for axis in range(2):  # nearest pixels along each axis: exactly 2 * margin + 1 apart at the closest
        first, second = origin[:, 0, axis], origin[:, 1, axis]
        gap = np.abs(first - second) - 5 + 1
        assert gap.min() >= 2 * margin + 1
    assert origin.min() >= 0 and origin.max() <= size - 5


def test_other_libraries_and_splits(xp_cpu):
    data = pair_images(6, seed=0, xp=xp_cpu, dtype="float64")
    assert_same_library(data.image, xp_cpu.zeros(1))
    np.testing.assert_array_equal(B.to_numpy(data.image), pair_images(6, seed=0, dtype="float64").image)
    train, val = pair_splits(10, 7, seed=5)
    _, val2 = pair_splits(30, 7, seed=5)
    np.testing.assert_array_equal(val.image, val2.image)  # the validation set does not depend on n_train
    assert not np.array_equal(train.image[:7], val.image)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n must be an integer >= 1"), (dict(size=14, margin=3), "size // 2 must be at least 5 \\+ margin"),
    (dict(margin=-1), "margin must be an integer >= 0"), (dict(kinds=9), "kinds must be between 2 and 8"),
    (dict(relation="colour"), "relation must be one of"), (dict(channels=2), "channels must be 1 or 3"),
    (dict(noise=1.5), "noise must be a number in"), (dict(dtype="int8"), "dtype must be"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pair_images(**dict(dict(n=4), **kwargs))


def _brute_force_two_function_ceiling(k, values=range(-3, 4)):
    """max over u, v in a small integer grid and every threshold of the accuracy of u(a) + v(b) > t."""
    best = 0.0
    cells = [(a, b, (1 / (2 * k)) if a == b else -1 / (2 * k * (k - 1))) for a in range(k) for b in range(k)]
    for u in itertools.product(values, repeat=k):
        for v in itertools.product(values, repeat=k):
            sums = {}
            for a, b, gain in cells:
                sums.setdefault(u[a] + v[b], 0.0)
                sums[u[a] + v[b]] += gain
            ordered = sorted(sums)  # threshold between consecutive sums: call "same" every sum above it
            tail = np.cumsum([sums[s] for s in ordered[::-1]])
            best = max(best, 0.5 + max(0.0, tail.max()))
    return best


@pytest.mark.parametrize("k", [2, 3])
def test_position_aware_ceiling_matches_brute_force(k):
    assert position_aware_ceiling(k) == pytest.approx(_brute_force_two_function_ceiling(k), abs=1e-12)


def test_the_two_ceilings():
    assert [round(additive_ceiling(k), 4) for k in (2, 3, 4, 8)] == [0.75, 0.6667, 0.6667, 0.6429]
    for k in range(2, 8):
        assert position_aware_ceiling(k) == pytest.approx(0.75, abs=1e-12)
        assert position_aware_ceiling(k) >= additive_ceiling(k) - 1e-12
    with pytest.raises(ValueError, match="kinds must be at most 7"):
        position_aware_ceiling(8)


def test_the_rule_a_at_least_b_reaches_75_percent_on_samples():
    """u(a) = a, v(b) = -b on the drawn kinds (the upper shape's kind minus the lower one's) scores ~75%."""
    data = pair_images(4000, seed=0, kinds=6)
    upper = np.where(data.meta["origin"][:, 0, 0] < 12, 0, 1)
    a = data.meta["kind"][np.arange(4000), upper]
    b = data.meta["kind"][np.arange(4000), 1 - upper]
    accuracy = np.mean((a >= b).astype(np.int64) == data.labels)
    assert abs(accuracy - 0.75) < 0.02


def test_seeds_and_channels_are_checked_in_nlrefs_words():
    for make, args in ((pair_images, (2,)), (pair_splits, (2, 2))):
        with pytest.raises(TypeError, match="seed must be an int >= 0"):   # NumPy's SeedSequence message
            make(*args, seed="1")
        with pytest.raises(ValueError, match="seed must be an int >= 0"):
            make(*args, seed=-1)
    with pytest.raises(ValueError, match="channels must be 1 or 3, got 3.0"):   # TypeError from NumPy
        pair_images(2, channels=3.0)
    a, b = pair_splits(2, 2, seed=np.random.default_rng(1)), pair_splits(2, 2, seed=np.random.default_rng(1))
    np.testing.assert_array_equal(a[1].image, b[1].image)


def test_dtype_objects_and_a_bad_xp():
    """``pair_images(dtype=np.float64)`` was refused where ``sprite_clips`` took it, and ``xp="numpy"`` raised
    AttributeError in both, after the images were made."""
    from nlref.data import sprite_clips

    assert np.array_equal(pair_images(4, dtype=np.float64).image, pair_images(4, dtype="float64").image)
    for make in (pair_images, sprite_clips):
        with pytest.raises(TypeError, match="xp must be an array library module"):
            make(4, xp="numpy")


def test_the_draws_are_the_distribution_the_ceilings_assume():
    """The ceilings assume: kind a uniform, b = a with probability 1/2 (the label), else uniform over the other
    kinds, and where the shapes sit independent of both. Counted over 40,000 images (noise-free)."""
    k, n = 4, 40000
    data = pair_images(n, seed=11, kinds=k, noise=0.0)
    kind, labels = data.meta["kind"], np.asarray(data.labels)
    assert abs(labels.mean() - 0.5) <= 0.5 / n
    joint = np.zeros((k, k))
    np.add.at(joint, (kind[:, 0], kind[:, 1]), 1)
    expected = np.where(np.eye(k, dtype=bool), 1 / (2 * k), 1 / (2 * k * (k - 1)))
    np.testing.assert_allclose(joint / n, expected, atol=4 * np.sqrt(expected.max() / n))
    upper = data.meta["origin"][:, 0, 0] < 12                       # shape 1 in the upper half
    for side in (upper, ~upper):                                     # the same within each placement
        sub = np.zeros((k, k))
        np.add.at(sub, (kind[side, 0], kind[side, 1]), 1)
        np.testing.assert_allclose(sub / side.sum(), expected, atol=4 * np.sqrt(expected.max() / side.sum()))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_additive_ceiling_matches_brute_force(k):
    """max over w in {0..3}^K and every threshold t of the accuracy of w(a) + w(b) > t (one function)."""
    cells = [(a, b, (1 / (2 * k)) if a == b else -1 / (2 * k * (k - 1))) for a in range(k) for b in range(k)]
    best = 0.0
    for w in itertools.product(range(4), repeat=k):
        sums = {}
        for a, b, gain in cells:
            sums[w[a] + w[b]] = sums.get(w[a] + w[b], 0.0) + gain
        tail = np.cumsum([sums[s] for s in sorted(sums)[::-1]])
        best = max(best, 0.5 + max(0.0, tail.max()))
    assert additive_ceiling(k) == pytest.approx(best, abs=1e-12)
