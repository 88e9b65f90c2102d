"""The checks of chapter 6's exercises: None while unanswered, True for a right answer, False (never an
exception) for wrong ones, including functions that raise or return the wrong shape."""

import numpy as np
import pytest

from nlref.exercises import ch06
from nlref.nn import functional as F


def _dw_im2col(x, dout, kernel, stride, padding):
    """A right answer to ex2, by im2col: dw = cols^T d."""
    xpad = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in np.broadcast_to(padding, 3)])
    stride = np.broadcast_to(stride, 3)
    out_size = dout.shape[2:]
    cols = []
    for i, j, k in np.ndindex(*kernel):
        cols.append(xpad[:, :, i:i + stride[0] * (out_size[0] - 1) + 1:stride[0],
                         j:j + stride[1] * (out_size[1] - 1) + 1:stride[1],
                         k:k + stride[2] * (out_size[2] - 1) + 1:stride[2]])
    cols = np.stack(cols, axis=2)  # (B, C, K, T', H', W')
    dw = np.einsum("bckthw,bothw->ock", cols, dout)
    return dw.reshape((dout.shape[1], x.shape[1]) + tuple(kernel))


def _flip(w):
    """A right answer to ex4."""
    return np.flip(w, axis=(2, 3, 4)).transpose(1, 0, 2, 3, 4)


def _raises(*args):
    raise RuntimeError("not written yet")


@pytest.mark.parametrize("check", [ch06.ex1, ch06.ex2, ch06.ex3, ch06.ex4])
def test_unanswered_is_none(check, capsys):
    assert check(None) is None
    assert "not answered" in capsys.readouterr().out


def test_ex1():
    out, _ = F.conv3d_reference(np.zeros(ch06.EX1["x"]), np.zeros(ch06.EX1["w"]), stride=ch06.EX1["stride"],
                                padding=ch06.EX1["padding"])
    assert ch06.ex1(tuple(out.shape)) is True
    assert ch06.ex1(list(out.shape)) is True
    wrong = [(2, 4, 5, 5, 3),  # W' without the padding
             (2, 4, 5, 10, 9),  # "same" size
             (2, 3, 5, 5, 4),  # C instead of O
             (2, 4, 5, 5), "shape", 7]
    for answer in wrong:
        assert ch06.ex1(answer) is False, answer


def test_ex2():
    assert ch06.ex2(_dw_im2col) is True
    wrong = [
        lambda x, d, k, s, p: 2 * _dw_im2col(x, d, k, s, p),
        lambda x, d, k, s, p: np.flip(_dw_im2col(x, d, k, s, p), axis=(2, 3, 4)),  # the flipped kernel's gradient
        lambda x, d, k, s, p: _dw_im2col(x, d, k, s, p).transpose(1, 0, 2, 3, 4),  # (C, O, ...)
        lambda x, d, k, s, p: 0 * _dw_im2col(x, d, k, s, p),
        _raises, "dw", np.zeros(3),
    ]
    for answer in wrong:
        assert ch06.ex2(answer) is False, answer


def test_ex3():
    b, c, t, h, w = ch06.EX3["x"]
    right = b * t * h * w * 9 * c * 4
    assert right == 9 * 32 * 16 * 8 * 8 * 8 * 4  # nine times the input's bytes
    assert ch06.ex3(right) is True
    for answer in [right // 4, right * 2, b * c * t * h * w * 4, right + 1, "many", np.nan]:
        assert ch06.ex3(answer) is False, answer


def test_ex4():
    assert ch06.ex4(_flip) is True
    wrong = [
        lambda w: w.transpose(1, 0, 2, 3, 4),  # not flipped
        lambda w: np.flip(w, axis=(2, 3, 4)),  # flipped, not transposed
        lambda w: np.flip(w, axis=(3, 4)).transpose(1, 0, 2, 3, 4),  # T left unflipped
        lambda w: -_flip(w),
        _raises, None.__class__, 3.0,
    ]
    for answer in wrong:
        assert ch06.ex4(answer) is False, answer
