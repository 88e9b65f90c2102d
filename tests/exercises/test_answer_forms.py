"""Every function check against a battery of answers derived from a right one, as students write them.

Wrong: the values off by 1 % or by an offset, transposed, with an axis too many, float16, rounded to
ints, NaN, a str, complex. Right in another form: float32, a list, a torch tensor (one that requires
grad too), a view. Each wrong one is False with a line that says what is wrong, each right one True,
and no check raises. Found by probing every check this way; the cases below failed before this file
(a float32 answer refused, a tensor that requires grad or a 0-d array raising inside the check).
"""

import numpy as np
import pytest
import torch

from nlref.exercises import FLOAT32_RTOL, ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08, check_close
from nlref.nn.attention import sinusoidal_encoding

from .test_ch06 import _dw_im2col, _flip
from .test_ch08 import _ln_right
from .test_exercises import _add_positions, _bn_jacobian, _causal_attention, _euclid_attention, _multi_head
from .test_graded import (conv3d_naive, matmul_backward, mean_field_update, online_update, pixel_weights, softmax_backward,
                          train_step)

# the checks that run in well under a second; the slow ones (finite differences of a convolution,
# naive NL-means) take the same routes (check_close, _graded.compare) as these
RIGHT = {
    "ch02.ex6": (ch02.ex6, pixel_weights), "ch03.ex2": (ch03.ex2, _euclid_attention),
    "ch03.ex5": (ch03.ex5, mean_field_update), "ch04.ex2": (ch04.ex2, _bn_jacobian),
    "ch04.ex4": (ch04.ex4, lambda dp, cache: cache[0] * dp), "ch04.ex7": (ch04.ex7, softmax_backward),
    "ch04.ex9": (ch04.ex9, matmul_backward), "ch05.ex1": (ch05.ex1, _multi_head),
    "ch05.ex2": (ch05.ex2, _causal_attention), "ch05.ex5": (ch05.ex5, _add_positions),
    "ch05.ex7": (ch05.ex7, online_update), "ch06.ex2": (ch06.ex2, _dw_im2col), "ch06.ex4": (ch06.ex4, _flip),
    "ch07.ex7": (ch07.ex7, train_step), "ch08.ex1": (ch08.ex1, _ln_right),
    "ch08.ex4": (ch08.ex4, sinusoidal_encoding),
}


def _each(out, f):
    """``f`` applied to every array of the answer (a tuple's items, a dict's values; a float loss too)."""
    if isinstance(out, tuple):
        return tuple(_each(o, f) for o in out)
    if isinstance(out, dict):
        return {k: _each(v, f) for k, v in out.items()}
    return f(np.array(out, dtype=np.float64))


def _swap(a):
    return np.swapaxes(a, -1, -2) if a.ndim >= 2 else a[::-1].copy()


WRONG = {  # name: (what is done to every array of the right answer, words the check's output must hold)
    "1 % off": (lambda a: 1.01 * a, "not yet"),
    "offset": (lambda a: a + 1e-3, "not yet"),
    "transposed": (_swap, "not yet"),
    "an axis too many": (lambda a: a[None], "an axis of length 1 too many"),
    "float16": (lambda a: a.astype(np.float16), "not yet"),
    "rounded to ints": (lambda a: np.round(1000 * a).astype(np.int64), "not yet"),
    "NaN": (lambda a: a * np.nan, "NaN"),
    "a str": (lambda a: "done", "got str"),
    "complex": (lambda a: a + 0j, "complex128"),
}

FORMS = {  # right answers in other forms
    "float32": lambda a: a.astype(np.float32),
    "a list": lambda a: a.tolist(),
    "a torch tensor": torch.tensor,
    "a tensor that requires grad": lambda a: torch.tensor(a, requires_grad=True),
    "a view": lambda a: a[...],
}


def _mutated(fn, f):
    def answer(*args):
        return _each(fn(*args), f)
    return answer


@pytest.mark.parametrize("key", list(RIGHT))
@pytest.mark.parametrize("wrong", list(WRONG))
def test_a_wrong_answer_is_reported(key, wrong, capsys):
    check, right = RIGHT[key]
    f, says = WRONG[wrong]
    if wrong == "transposed" and key == "ch04.ex2":
        pytest.skip("the batch-norm Jacobian is symmetric: its transpose is right")
    assert check(_mutated(right, f)) is False
    out = capsys.readouterr().out
    assert "not yet" in out and says in out and ": correct" not in out.splitlines()[-1], out


@pytest.mark.parametrize("key", list(RIGHT))
@pytest.mark.parametrize("form", list(FORMS))
def test_a_right_answer_in_another_form_is_right(key, form, capsys):
    check, right = RIGHT[key]
    assert check(_mutated(right, FORMS[form])) is True, capsys.readouterr().out


# --------------------------------------------------------------------------- float32 and its limits
def test_a_float32_answer_gets_float32s_tolerance_and_no_more(capsys):
    e = np.random.default_rng(0).standard_normal((3, 4))
    assert check_close("q", e.astype(np.float32), e, rtol=1e-12) is True       # refused before (2.7e-8)
    assert check_close("q", (e * (1 + 3 * FLOAT32_RTOL)).astype(np.float32), e, rtol=1e-12) is False
    assert check_close("q", e.astype(np.float32), e, rtol=0.0) is False        # an exact check stays exact
    assert check_close("q", e.astype(np.float16), e, rtol=1e-6) is False
    assert "float16" in capsys.readouterr().out.splitlines()[-1]


def test_float32_does_not_hide_a_forgotten_eps(capsys):
    from .test_graded import batchnorm_backward_train

    assert ch04.ex2(lambda x: _bn_jacobian(x, eps=0.0).astype(np.float32)) is False
    assert ch04.ex8(lambda d, x, g, e: tuple(a.astype(np.float32) for a in batchnorm_backward_train(d, x, g, 0.0))) is False
    assert ch04.ex8(lambda d, x, g, e: tuple(a.astype(np.float32) for a in batchnorm_backward_train(d, x, g, e))) is True


def test_a_count_in_float32_stays_exact(capsys):
    right = 4 * (8 * 56 * 56) ** 2
    assert ch03.ex4(np.float32(right)) is True                                 # 2517630976 is a float32
    assert ch03.ex4(np.float32(right + 3000)) is False                         # 1.2e-6 off: not a count of it


# --------------------------------------------------------------------------- odd answers reported, not raised
@pytest.mark.parametrize("answer", [np.array(5), torch.tensor(5)], ids=["0-d array", "0-d tensor"])
@pytest.mark.parametrize("check, says", [
    (ch04.ex1, "expected a list or set of parameter names"),
    (ch04.ex3, "expected a list or set of parameter names"),
    (ch06.ex1, "expected a tuple of 5 ints"),
    (lambda a: ch07.ex6({"res2": a, "res4": (32, 8)}), "must be two whole numbers"),
], ids=["ch04.ex1", "ch04.ex3", "ch06.ex1", "ch07.ex6"])
def test_a_0d_array_is_reported(check, says, answer, capsys):
    # it has __iter__, and iterating it raises TypeError: the check raised it
    assert check(answer) is False
    assert says in capsys.readouterr().out


def test_the_broken_softmax_backward_may_return_a_list(capsys):
    # it passed, then gradcheck's illustration raised AttributeError on the list
    assert ch04.ex4(lambda dp, cache: (cache[0] * dp).tolist()) is True
    assert "gradcheck (random) of your broken backward" in capsys.readouterr().out


def test_two_bools_may_come_as_an_array_but_not_as_a_set(capsys):
    assert ch04.ex6(np.array([False, True])) is True
    assert ch04.ex6(torch.tensor([False, True])) is True
    assert ch04.ex6({False, True}) is False                                    # a set has no order


@pytest.mark.parametrize("answer, says", [
    (np.ones(3) + 1j, "got an array of complex128"),
    ([[1.0, 2.0], [3.0]], "got a list that is not a regular array"),
    (10**400, "too large for float64"),
    (["1.5"], "got a list of str"),
], ids=["complex", "ragged", "1e400", "str"])
def test_a_non_number_is_named(answer, says, capsys):
    assert check_close("q", answer, np.ones(3)) is False
    assert says in capsys.readouterr().out


def test_a_missing_factor_with_nan_says_so(capsys):
    P, _ = ch03.patch_vectors()
    assert ch03.ex1(np.full(len(P), np.nan)) is False
    assert "NaN" in capsys.readouterr().out


def test_a_transposed_shape_is_pointed_out(capsys):
    assert check_close("q", np.zeros((4, 3)), np.zeros((3, 4))) is False
    assert "axes swapped?" in capsys.readouterr().out


# --------------------------------------------------------------------------- inputs that separate the axes
def _axes_reversed(fn, arg):
    """``fn`` with its stride and padding read in reverse order (W, H, T), a slip the checks must catch."""
    def wrong(*args):
        args = list(args)
        for i in arg:
            args[i] = tuple(np.broadcast_to(args[i], 3))[::-1]
        return fn(*args)
    return wrong


def _hw_padding_swapped(fn, i):
    def wrong(*args):
        args = list(args)
        t, h, w = np.broadcast_to(args[i], 3)
        args[i] = (int(t), int(w), int(h))
        return fn(*args)
    return wrong


@pytest.mark.parametrize("check, wrong", [
    (ch06.ex6, _axes_reversed(conv3d_naive, [3])),           # the stride (1, 2, 1) read backwards is the same
    (ch06.ex6, _hw_padding_swapped(conv3d_naive, 4)),        # so is the padding (0, 1, 1) with H and W swapped
    (ch06.ex2, _axes_reversed(_dw_im2col, [3])),
    (ch06.ex2, _hw_padding_swapped(_dw_im2col, 4)),
], ids=["ex6-stride", "ex6-padding", "ex2-stride", "ex2-padding"])
def test_a_convolution_that_mixes_up_the_axes_is_wrong(check, wrong, capsys):
    assert check(wrong) is False


def test_counts_may_come_as_a_tensor_but_not_as_floats(capsys):
    # a torch tensor iterates into 0-d tensors, which are no int: the right shape was refused
    assert ch06.ex1(torch.tensor([2, 4, 5, 5, 4])) is True
    assert ch06.ex1(torch.tensor([2.0, 4.0, 5.0, 5.5, 4.0])) is False
    assert ch07.ex6({"res2": torch.tensor([512, 128]), "res4": (32, 8)}) is True


@pytest.mark.parametrize("check, answer", [
    (ch07.ex7, lambda prm, x, y, lr: (0.5, {1: 0.0, "w1": prm["w1"]})),
    (ch08.ex2, lambda x, prm, heads, dout: {0: x, "x": x}),
], ids=["ch07.ex7", "ch08.ex2"])
def test_a_dict_with_keys_of_two_types_is_reported(check, answer, capsys):
    # sorted() of its keys, for the message, raised TypeError ('<' between str and int)
    assert check(answer) is False
    assert "keys" in capsys.readouterr().out


@pytest.mark.parametrize("key", ["ch04.ex9", "ch05.ex7", "ch07.ex7"])
def test_the_arrays_of_a_backward_may_come_in_a_list(key, capsys):
    # "expected a tuple of 2 arrays, got list": chapter 8's checks took a list, chapters 4 to 7 refused it
    check, right = RIGHT[key]
    assert check(lambda *args: list(right(*args))) is True
    assert check(lambda *args: list(right(*args))[:-1]) is False


def test_a_list_of_tensors_that_require_grad_is_read(capsys):
    # np.asarray raised RuntimeError on the first of them
    t = [torch.tensor(v, requires_grad=True) for v in (1.0, 2.0)]
    assert check_close("q", t, [1.0, 2.0]) is True
    assert check_close("q", t, [1.0, 2.5]) is False
    assert check_close("q", ("a", "b"), [1.0, 2.0]) is False
    assert "got a tuple of str" in capsys.readouterr().out


def _failing_names():
    yield "phi.bias"
    raise KeyError("g.bias")          # a student's generator with a bug, run by the check


class _NoRepr:
    def __repr__(self):
        raise RuntimeError("a student's class")


@pytest.mark.parametrize("check, answer, says", [
    (ch04.ex1, _failing_names(), "expected a list or set of parameter names"),
    (ch01.ex4, _NoRepr(), "got a _NoRepr"),
    (ch06.ex1, [_NoRepr()] * 5, "got a list"),
], ids=["generator", "repr-ch01", "repr-ch06"])
def test_an_answer_that_fails_when_read_is_reported(check, answer, says, capsys):
    assert check(answer) is False
    assert says in capsys.readouterr().out


def test_a_long_answer_is_shown_short(capsys):
    assert ch06.ex1(list(range(100_000))) is False
    assert len(capsys.readouterr().out) < 300      # it printed all 100 000 of them


# --------------------------------------------------------------------------- functions right only on the check's own input
def _positions_for_4x5(x):
    """Right for the check's (2, 3, 4, 5) input only: the grid's sizes written in."""
    rows = np.broadcast_to(np.linspace(-1, 1, 4)[:, None], (2, 1, 4, 5))
    cols = np.broadcast_to(np.linspace(-1, 1, 5)[None, :], (2, 1, 4, 5))
    return np.concatenate([x, rows, cols], axis=1)


def _causal_for_10_keys(theta, phi, g, chunk_size):
    """Right for N = 10 only: the mask built for the check's size."""
    s = np.swapaxes(theta, 1, 2) @ phi
    s = np.where(np.tril(np.ones((10, 10), dtype=bool)), s, -np.inf)
    a = np.exp(s - s.max(axis=2, keepdims=True))
    return g @ np.swapaxes(a / a.sum(axis=2, keepdims=True), 1, 2)


@pytest.mark.parametrize("check, wrong, right", [
    (ch05.ex5, _positions_for_4x5, _add_positions),
    (ch05.ex2, _causal_for_10_keys, _causal_attention),
], ids=["ch05.ex5", "ch05.ex2"])
def test_a_function_with_the_checks_sizes_written_in_is_wrong(check, wrong, right, capsys):
    assert check(wrong) is False
    assert check(right) is True
