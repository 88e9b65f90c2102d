"""The exercise checks: None while unanswered, False (never an exception) for wrong answers, True for a right one.

Each check meets a plausible wrong answer, a wrong shape or type, or a student function
that raises, and a right answer (a check that always said False would pass the wrong ones);
the notebooks' worked solutions, run by nbmake, are the students' route to the same answers.
"""

import numpy as np
import pytest

import nlref
from nlref.exercises import ch01, ch02, ch03, ch04, ch05, ch07, check_close

CHECKS = [(m, name) for m in (ch01, ch02, ch03, ch04, ch05, ch07) for name in m.__all__ if name.startswith("ex")]


@pytest.mark.parametrize("module, name", CHECKS, ids=[f"{m.__name__[-4:]}.{n}" for m, n in CHECKS])
def test_unanswered_is_none(module, name, capsys):
    assert getattr(module, name)(None) is None
    assert "not answered yet" in capsys.readouterr().out


def _raises(*args, **kwargs):
    raise RuntimeError("a student's bug")


def _identity(x, *args, **kwargs):
    return x


WRONG = [
    (ch01.ex1, 2.0),                      # the standard deviation's factor, not the variance's
    (ch01.ex1, "four"),
    (ch01.ex2, 0.05 ** 2 + 0.1 ** 2),     # the fresh part kept in the floor
    (ch01.ex3, 10 * np.log10(np.pi / 2)), # the large-N limit, not the measurement at N = 63
    (ch01.ex4, 10),
    (ch01.ex4, 100.0),                    # a float is not a number of copies
    (ch01.ex5, 30.0),
    (ch02.ex1, [29.0] * 5),
    (ch02.ex1, [1.0, 2.0]),               # wrong length
    (ch02.ex2, _identity),                # returns the noisy image
    (ch02.ex2, _raises),
    (ch02.ex2, 3),                        # not a function
    (ch02.ex3, 758.0),                    # N_eff, not the measured gain
    (ch02.ex4, 35 / 11),                  # the ratio of widths
    (ch02.ex5, (28.64, 29.64)),           # swapped
    (ch03.ex1, np.zeros(1089)),
    (ch03.ex1, np.zeros(3)),
    (ch03.ex1, "log m"),
    (ch03.ex2, lambda x: np.exp(-x)),     # wrong shape
    (ch03.ex2, _raises),
    (ch03.ex3, 4.0),                      # what C(x) = 1 would give
    (ch03.ex4, 25088 ** 2),               # entries, not bytes
    (ch04.ex1, ["phi.bias"]),
    (ch04.ex1, "phi.bias"),               # a str is not a list of names
    (ch04.ex2, lambda x: np.eye(len(x))),
    (ch04.ex3, ["bn.beta", "bn.gamma"]),
    (ch04.ex4, lambda dp, cache: dp),
    (ch04.ex4, _raises),
    (ch04.ex5, np.zeros((2, 4, 6, 6))),
    (ch04.ex5, np.zeros((1, 4, 6, 6))),
    (ch04.ex6, (True, True)),
    (ch04.ex6, "yes"),
    (ch05.ex1, lambda theta, phi, g, heads: g),
    (ch05.ex2, lambda theta, phi, g, c: g),
    (ch05.ex3, 4.0),                      # one float32 block
    (ch05.ex4, 0.5),                      # the inverse ratio
    (ch05.ex5, _identity),
    (ch05.ex5, None.__class__),           # a class that fails on the input
    (ch07.ex1, 2 / 3),
    (ch07.ex2, 5 / 8),                    # the large-K limit
    (ch07.ex6, {"res2": (512, 128)}),
    (ch07.ex6, {"res2": (128, 32), "res4": (32, 8)}),
    (ch07.ex6, {"res2": "N", "res4": (32, 8)}),
]


@pytest.mark.parametrize("check, answer", WRONG, ids=[f"{c.__module__[-4:]}.{c.__name__}-{i}"
                                                      for i, (c, _) in enumerate(WRONG)])
def test_wrong_answers_are_false(check, answer, capsys):
    assert check(answer) is False
    assert "not yet" in capsys.readouterr().out


def test_cheap_checks_accept_their_own_computation(capsys):
    """The expected values the checks compute satisfy them (the notebooks show the students' route)."""
    assert ch01.ex5(ch01.noisy_oracle())
    assert ch02.ex4((35**2 - 1) / (11**2 - 1)) and ch02.ex4(35**2 / 11**2)   # both counts within 1 %
    assert ch04.ex6(ch04.near_tie_results()) and ch04.near_tie_results() == (False, True)
    assert ch07.ex2(0.6428571428571429)
    P, _ = ch03.patch_vectors()
    assert ch03.ex1(-np.sum(P**2, axis=1) / (5 * 0.032) ** 2 + 7.0)           # any constant is allowed
    assert ch04.ex1({"phi.bias", "g.bias", "W_z.bias"})


def test_check_close_reports_instead_of_raising(capsys):
    assert check_close("t", [1.0, np.nan], [1.0, 2.0]) is False
    assert check_close("t", object(), 1.0) is False
    assert check_close("t", 1.0 + 1e-3, 1.0, rtol=0, atol=1e-2) is True
    out = capsys.readouterr().out
    assert "NaN" in out and "expected a number or an array" in out


# ----------------------------------------------------------------------------- right answers
# Each check with a right answer (True): a check that always said False would pass the tests above.
# Where the right answer is a measurement, it is the module's own measurement helper (which the
# notebook's solution reproduces); where it is a function, an independent one written here.


def _euclid_attention(x):
    d2 = np.sum((x[:, :, :, None] - x[:, :, None, :]) ** 2, axis=1)      # (B, N, N)
    e = np.exp(-(d2 - d2.min(axis=2, keepdims=True)))
    return e / e.sum(axis=2, keepdims=True)


def _multi_head(theta, phi, g, heads):
    from nlref.nn.nonlocal_op import nonlocal_forward

    a, b = theta.shape[1] // heads, g.shape[1] // heads
    return np.concatenate([nonlocal_forward(theta[:, h * a:(h + 1) * a], phi[:, h * a:(h + 1) * a],
                                            g[:, h * b:(h + 1) * b], mode="embedded_gaussian")[0]
                           for h in range(heads)], axis=1)


def _causal_attention(theta, phi, g, chunk_size):
    s = np.swapaxes(theta, 1, 2) @ phi
    s = np.where(np.tril(np.ones(s.shape[1:], dtype=bool)), s, -np.inf)
    a = np.exp(s - s.max(axis=2, keepdims=True))
    return g @ np.swapaxes(a / a.sum(axis=2, keepdims=True), 1, 2)


def _add_positions(x):
    b, _, h, w = x.shape
    rows = np.broadcast_to(np.linspace(-1, 1, h)[:, None], (b, 1, h, w))
    cols = np.broadcast_to(np.linspace(-1, 1, w)[None, :], (b, 1, h, w))
    return np.concatenate([x, rows, cols], axis=1)


def _bn_jacobian(x, eps=1e-5):
    r = 1 / np.sqrt(x.var() + eps)
    xh = (x - x.mean()) * r
    return r / len(x) * (len(x) * np.eye(len(x)) - 1 - np.outer(xh, xh))


def _patchwise(v, sigma, h, patch, search):
    """Patch-wise NL-means by the definition (method="naive"), not the offset loop the check compares with."""
    return nlref.nl_means(v, sigma=sigma, h=h, patch_size=patch, search_size=search, aggregation="patch",
                          method="naive")


def _chunked_dx():
    """dx of the chapter's randomised block run with chunk_size=2, for the check's dz."""
    x = ch04.chapter_input()
    block = ch04.randomise(nlref.NonLocalBlock(4, dims=2, dtype="float64", seed=0, chunk_size=2), seed=1)
    block.forward(x)
    return block.backward(np.random.default_rng(5).standard_normal(x.shape))


RIGHT = [
    (ch01.ex1, lambda: 4.0),
    (ch01.ex2, lambda: 0.05 ** 2),                        # the floor a**2 (the measurement adds b**2/256 + sampling)
    (ch01.ex3, lambda: ch01.median_loss_db()),
    (ch01.ex4, lambda: 100),
    (ch02.ex1, lambda: ch02.uncorrected_sweep()),
    (ch02.ex2, lambda: _patchwise),
    (ch02.ex3, lambda: ch02.flat_gain()),
    (ch02.ex4, lambda: (35 ** 2 - 1) / (11 ** 2 - 1)),
    (ch02.ex5, lambda: ch02.video_psnrs()),
    (ch03.ex2, lambda: _euclid_attention),
    (ch03.ex3, lambda: ch03.dot_output_ratio()),
    (ch03.ex4, lambda: 4 * (8 * 56 * 56) ** 2),
    (ch04.ex2, lambda: _bn_jacobian),
    (ch04.ex3, lambda: {"bn.beta"}),                      # W_z y = 0, so x-hat = 0 and d gamma = 0 too
    (ch04.ex4, lambda: (lambda dp, cache: cache[0] * dp)),
    (ch04.ex5, _chunked_dx),
    (ch05.ex1, lambda: _multi_head),
    (ch05.ex2, lambda: _causal_attention),
    (ch05.ex3, lambda: 12.0),                             # three float32 (N, c) blocks per element
    (ch05.ex4, lambda: 2.0),
    (ch05.ex5, lambda: _add_positions),
    (ch07.ex1, lambda: ch07.squared_feature_accuracy()),
    (ch07.ex2, lambda: 9 / 14),
    (ch07.ex6, lambda: {"res2": (512, 128), "res4": (32, 8)}),
]


@pytest.mark.parametrize("check, right", RIGHT, ids=[f"{c.__module__[-4:]}.{c.__name__}" for c, _ in RIGHT])
def test_right_answers_are_true(check, right, capsys):
    assert check(right()) is True
    assert "correct" in capsys.readouterr().out


def test_every_check_tried_wrong_is_also_tried_right():
    """A check tried only with wrong answers would pass those tests by always saying False."""
    # with those that test_cheap_checks_accept_their_own_computation tries
    cheap = {ch01.ex5, ch02.ex4, ch03.ex1, ch04.ex1, ch04.ex6, ch07.ex2}
    right = {check for check, _ in RIGHT} | cheap
    missing = sorted(f"{c.__module__}.{c.__name__}" for c, _ in WRONG if c not in right)
    assert not missing, f"checks tried only with wrong answers: {missing}"
