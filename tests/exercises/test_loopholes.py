"""Wrong answers the checks used to accept, and answers they crashed on, found by probing them.

Each case failed on the checks before this file: a check said ``correct`` to a wrong answer, refused
a right one, or raised instead of reporting.
"""

import re

import numpy as np
import pytest

import nlref
from nlref.exercises import ch01, ch02, ch04, ch05, ch06, ch07, ch08, check_close
from nlref.nn import functional as F

from .test_ch08 import _mha_right
from .test_exercises import _bn_jacobian, _multi_head, _patchwise
from .test_graded import conv3d_naive, conv3d_naive_backward, softmax_backward, train_step


def _false(check, answer, capsys, says):
    assert check(answer) is False
    out = capsys.readouterr().out
    assert "not yet" in out and says in out, out


# --------------------------------------------------------------------------- answers right only by accident
@pytest.mark.parametrize("answer", [
    (2, 4, (5 + 2 - 3) / 1 + 1, (10 + 2 - 3) / 2 + 1, (9 + 4 - 2) / 3 + 1),   # no floor: 5.5 and 4.67 truncated
    np.array([2, 4, 5.9, 5.5, 4.99]),
    "24554",
    (2, 4, 5, True, 4),
])
def test_the_output_shape_must_be_ints(answer, capsys):
    _false(ch06.ex1, answer, capsys, "expected a tuple of 5 ints")


def test_the_output_shape_right_as_ints(capsys):
    out, _ = F.conv3d_reference(np.zeros(ch06.EX1["x"]), np.zeros(ch06.EX1["w"]), stride=ch06.EX1["stride"],
                                padding=ch06.EX1["padding"])
    assert ch06.ex1(tuple(np.int64(n) for n in out.shape)) is True


def test_the_noisy_oracle_is_asked_for_as_an_image(capsys):
    # its PSNR is the noisy image's to 0.01 dB: a number could not tell a built oracle from no work
    _false(ch01.ex5, ch01.noisy_oracle_psnr(), capsys, "shape ()")
    noisy = np.asarray(nlref.add_gaussian_noise(nlref.data.camera(), 0.1, seed=0))
    _false(ch01.ex5, noisy, capsys, "relative error")
    assert ch01.ex5(ch01.noisy_oracle().astype(np.float32)) is True
    assert "the noisy image's" in capsys.readouterr().out


def test_patchwise_must_use_its_arguments(capsys):
    def with_the_notebooks_settings(v, sigma, h, patch, search):
        return _patchwise(v, ch02.SIGMA, 0.4 * ch02.SIGMA, 3, 5)
    _false(ch02.ex2, with_the_notebooks_settings, capsys, "relative error")
    assert ch02.ex2(_patchwise) is True


def test_multi_head_backward_must_use_num_heads(capsys):
    assert ch08.ex2(lambda x, p, heads, dout: _mha_right(x, p, 2, dout)) is False
    assert ch08.ex2(_mha_right) is True


def test_the_batch_norm_jacobian_must_read_r_from_x(capsys):
    assert ch04.ex2(lambda x: _bn_jacobian(np.resize(x, 8))) is False   # right for R = 8 only
    assert ch04.ex2(_bn_jacobian) is True


@pytest.mark.parametrize("answer", ["16640", True, b"16640"])
def test_a_str_or_a_bool_is_not_a_number(answer, capsys):
    assert check_close("q", answer, 16640.0 if answer != True else 1.0) is False  # noqa: E712
    assert "expected a number or an array" in capsys.readouterr().out


# --------------------------------------------------------------------------- inputs changed in place
def _doubling_x(x, w, b, s, p):
    x *= 2
    return conv3d_naive(x, w, b, s, p)


def _doubling_dout(dout, x, w, s, p):
    dout *= 2
    return conv3d_naive_backward(dout, x, w, s, p)


def _zeroing_dw(x, dout, kernel, stride, padding):
    dout[...] = 0
    return np.zeros((dout.shape[1], x.shape[1]) + tuple(kernel))


def _zeroing_w(w):
    w[...] = 0
    return np.zeros((w.shape[1], w.shape[0]) + w.shape[2:])


@pytest.mark.parametrize("check, wrong", [
    (ch06.ex6, _doubling_x),
    (ch06.ex7, _doubling_dout),
    (ch06.ex2, _zeroing_dw),
    (ch06.ex4, _zeroing_w),
    (ch04.ex7, lambda dp, p: (dp.__imul__(0), np.zeros_like(dp))[1]),
    (ch04.ex4, lambda dp, cache: (cache[0].__setitem__(Ellipsis, 1), dp.copy())[1]),   # p set to 1: "p * dp" = dp
    (ch04.ex9, lambda dy, g, A: (dy.__imul__(0), (np.zeros_like(g), np.zeros_like(A)))[1]),
])
def test_a_function_cannot_change_what_it_is_compared_with(check, wrong, capsys):
    assert check(wrong) is False


def _softmax_backward_in_place(dp, p):
    dp -= np.sum(dp * p, axis=-1, keepdims=True)
    dp *= p
    return dp


def _broken_softmax_backward_in_place(dp, cache):
    p, _ = cache
    p *= dp
    return p


@pytest.mark.parametrize("check, right", [
    (ch04.ex7, _softmax_backward_in_place),
    (ch04.ex4, _broken_softmax_backward_in_place),
    (ch06.ex6, lambda x, w, b, s, p: conv3d_naive(x, w, b, s, p)),
])
def test_a_right_function_may_work_in_place(check, right, capsys):
    assert check(right) is True


# --------------------------------------------------------------------------- degenerate answers reported, not raised
@pytest.mark.parametrize("check, answer, says", [
    (ch01.ex1, {1: 4.0}, "expected a number or an array, got dict"),
    (ch04.ex7, lambda dp, p: {"s": softmax_backward(dp, p)}, "expected an array, got dict"),
    (ch05.ex1, lambda theta, phi, g, heads: (_multi_head(theta, phi, g, heads), None), "expected a number or an array"),
    (ch07.ex7, lambda prm, x, y, lr: ((train_step(prm, x, y, lr)[0], "cache"), train_step(prm, x, y, lr)[1]),
     "loss: expected an array"),
    (ch02.ex2, lambda v, sigma, h, patch, search: None, "returned None"),
    (ch06.ex2, lambda *args: None, "returned None"),
    (ch06.ex6, lambda *args: None, "returned None"),
    (ch04.ex2, lambda x: None, "returned None"),
    (ch08.ex4, lambda length, dim: None, "returned None"),
])
def test_a_degenerate_answer_is_reported(check, answer, says, capsys):
    _false(check, answer, capsys, says)


def test_a_number_of_copies_far_from_the_law_is_refused_before_any_copy_is_made(capsys):
    # 10**6 copies of the crop would need 122 GiB; the law's check comes first
    _false(ch01.ex4, 10**6, capsys, "the law")


def _not_written(*args, **kwargs):
    raise NotImplementedError


@pytest.mark.parametrize("check", [ch02.ex2, ch04.ex2, ch04.ex4, ch05.ex1, ch05.ex2, ch05.ex5, ch08.ex1, ch08.ex4])
def test_a_function_still_to_write_is_unanswered_in_every_chapter(check, calls, capsys):
    # the student edition's placeholder body; chapter 8 said so before, the others called it wrong
    assert check(calls(_not_written)) is None
    out = capsys.readouterr().out
    assert "not answered yet" in out and "not yet:" not in out


@pytest.fixture
def calls():
    """Wrap a student function so that the test can count its calls (once per case, not twice)."""
    def wrap(func):
        def counted(*args, **kwargs):
            wrap.count += 1
            return func(*args, **kwargs)
        return counted
    wrap.count = 0
    return wrap


def test_a_student_function_runs_once_per_case(calls, capsys):
    from .test_ch08 import _ln_right
    assert ch08.ex1(calls(_ln_right)) is True
    assert calls.count == 2   # two cases, (2, 3, 5) and (7, 4); chapter 8 called it twice per case before


@pytest.mark.parametrize("check", [ch06.ex2, ch06.ex4])
def test_chapter_6_function_checks_take_the_shared_route(check, capsys):
    # the function still to write is unanswered, as in the other chapters (chapter 6 called it wrong)
    assert check(_not_written) is None
    assert "not answered yet" in capsys.readouterr().out


# --------------------------------------------------------------------------- answers read too loosely
@pytest.mark.parametrize("answer", [
    {"res2": (512.9, 128.7), "res4": (32.5, 8.99)},     # int() truncated each to the right count
    {"res2": ("512", "128"), "res4": ("32", "8")},       # and read the str as numbers
    {"res2": (512, 128), "res4": (True, 8)},             # a bool is not a count (but True == 1)
])
def test_attention_sizes_must_be_whole_numbers(answer, capsys):
    _false(ch07.ex6, answer, capsys, "must be two whole numbers")


def test_attention_sizes_as_whole_floats_or_numpy_ints_are_right(capsys):
    assert ch07.ex6({"res2": (512.0, 128.0), "res4": np.array([32, 8])}) is True


def test_the_missing_factor_must_be_numbers(capsys):
    from nlref.exercises import ch03

    P, _ = ch03.patch_vectors()
    right = -np.sum(P**2, axis=1) / (ch03.K * ch03.H_FILTER) ** 2
    _false(ch03.ex1, [repr(float(v)) for v in right], capsys, "real numbers")   # np.asarray(float64) parsed them
    assert ch03.ex1(list(right)) is True


def _ln_sums_over_axes_0_and_1(dout, cache):
    """Right for (B, N, D) only: the exercise asks for sums over every axis but the last."""
    x_hat, gamma, inv_std = cache
    g = dout * gamma
    dx = inv_std * (g - g.mean(-1, keepdims=True) - x_hat * (g * x_hat).mean(-1, keepdims=True))
    return dx, (dout * x_hat).sum((0, 1)), dout.sum((0, 1))


def test_layernorm_backward_must_sum_over_every_axis_but_the_last(capsys):
    _false(ch08.ex1, _ln_sums_over_axes_0_and_1, capsys, "x of shape (7, 4)")


def _dw_tuple_padding_only(x, dout, kernel, stride, padding):
    """Right for a 3-tuple padding only: the exercise allows an int too."""
    _, cache = F.conv3d_reference(x, np.zeros((dout.shape[1], x.shape[1]) + tuple(kernel)), stride=stride,
                                  padding=tuple(p for p in padding))
    return F.conv3d_reference_backward(dout, cache)[1]


def test_the_weight_gradient_must_take_an_int_padding(capsys):
    _false(ch06.ex2, _dw_tuple_padding_only, capsys, "your function raised TypeError")


@pytest.mark.parametrize("check", [ch02.ex2, ch04.ex2, ch04.ex4, ch05.ex1, ch05.ex5, ch06.ex2, ch06.ex4, ch08.ex1,
                                   ch08.ex2, ch08.ex4])
def test_a_function_still_to_write_is_told_to_write_it(check, capsys):
    # the student edition's function cells hold no None: "replace None by your answer" pointed nowhere
    assert check(_not_written) is None
    out = capsys.readouterr().out
    assert "write the function" in out and "replace None" not in out, out


def _every_check():
    from nlref.exercises import ch03

    return [(m, name) for m in (ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08)
            for name in m.__all__ if re.fullmatch(r"ex\d+", name)]


@pytest.mark.parametrize("module, name", _every_check(), ids=lambda v: getattr(v, "__name__", v)[-4:])
def test_every_line_a_check_prints_names_its_chapter(module, name, capsys):
    # the graded checks and chapter 6's printed "ex6: correct": which chapter's ex6, in an nbgrader log?
    assert getattr(module, name)(None) is None
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith(f"ch{module.__name__[-2:]} {name}:") for line in lines), lines


@pytest.mark.parametrize("check, answer, says", [
    (ch01.ex4, 10**400, "over 10**15 copies"),                  # int - float raised OverflowError
    (ch01.ex4, 10**5000, "over 10**15 copies"),                 # and str() of it raises ValueError
    (ch04.ex1, [["phi.bias"], ["g.bias"]], "parameter name"),   # set() raised: a list is unhashable
    (ch04.ex3, [["bn.beta"]], "parameter name"),
], ids=["1e400", "1e5000", "ch04.ex1-lists", "ch04.ex3-lists"])
def test_odd_answers_are_reported_not_raised(check, answer, says, capsys):
    _false(check, answer, capsys, says)
