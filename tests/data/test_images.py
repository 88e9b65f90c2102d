"""The bundled images and the procedural volume, waves and video: seeded, shaped as documented, bad sizes refused."""

import numpy as np
import pytest

from nlref.data import camera, video, volume, waves


def test_volume_is_seeded_and_in_range():
    a, b = volume((6, 7, 8), seed=1), volume((6, 7, 8), seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, volume((6, 7, 8), seed=2))
    assert a.shape == (6, 7, 8) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(volume((4, 4, 4), seed=np.int64(3)), volume((4, 4, 4), seed=3))


@pytest.mark.parametrize("shape", [(8, 8), (4, 8, 8, 8), (0, 8, 8), (-1, 8, 8), (8.0, 8, 8), 8, (True, 8, 8)])
def test_volume_refuses_other_shapes(shape):
    # (4, 8, 8, 8) gave balls stretched along the fourth axis, (8, 8) a 2-D "volume", (0, 8, 8) an empty one;
    # the others raised NumPy's errors
    with pytest.raises(ValueError, match=r"shape must be 3 ints >= 1 \(depth, rows, cols\)"):
        volume(shape)


@pytest.mark.parametrize("seed, error", [("a", TypeError), (1.5, TypeError), (-1, ValueError)])
def test_volume_seed_is_checked(seed, error):
    with pytest.raises(error, match="seed must be an int >= 0"):
        volume((4, 4, 4), seed=seed)


def test_waves_pieces_agree_and_bad_ranges_are_refused():
    np.testing.assert_array_equal(waves([(0, 8), (0, 9)])[2:6, 3:9], waves([(2, 6), (3, 9)]))
    assert waves([(-3, 2)]).shape == (5,)
    # [] raised ZeroDivisionError, (5, 2) gave an empty piece, (0.5, 2.5) samples between the grid's
    for bad in ([], [(5, 2)], [(3, 3)], [(0.5, 2.5)], [(0,)], 5, [(0, True)]):
        with pytest.raises(ValueError, match=r"ranges must be a non-empty sequence of \(start, stop\) int pairs"):
            waves(bad)


def test_video_pans_camera():
    clip = video(3, 16, step=(-2, 5))
    img = camera()
    assert clip.shape == (3, 16, 16) and clip.dtype == np.float32
    np.testing.assert_array_equal(clip[2], img[92:108, 170:186])


@pytest.mark.parametrize("kw, match", [
    (dict(frames=0), "frames must be an int >= 1"),           # NumPy's "need at least one array to stack"
    (dict(frames=True), "frames must be an int >= 1"),        # one frame
    (dict(frames=2.0), "frames must be an int >= 1"),
    (dict(size=0), "size must be an int >= 1"),               # an empty clip
    (dict(size=-5), "size must be an int >= 1"),
    (dict(step=(1,)), r"step must be 2 ints"),                # IndexError
    (dict(frames=4, size=64, step=(-50, 0)), "pan beyond the 512x512 camera image"),   # NumPy's stack error
    (dict(frames=4, size=64, step=(0, -60)), "pan beyond the 512x512 camera image"),
])
def test_video_refuses_bad_sizes(kw, match):
    with pytest.raises(ValueError, match=match):
        video(**kw)
