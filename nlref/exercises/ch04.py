"""Checks for the exercises of chapter 4, the non-local block and its backward pass.

The chapter's setup: ``x = default_rng(0).standard_normal((2, 4, 6, 6))`` and a
float64 ``NonLocalBlock(4, dims=2, seed=0)`` whose parameters ``randomise(block,
seed=1)`` draws from ``default_rng(1)`` in the order of ``block.params``.
"""

from __future__ import annotations

import numpy as np

from . import _host, _report, _shown, check_close, check_true, not_answered
from ._student import as_names, call, entries, fresh
from ._graded import Wrong, attempt, compare, numerical_gradient, verdict

__all__ = ["LEVELS", "GRADED", "ex1", "ex2", "ex3", "ex4", "ex5", "ex6", "randomise", "chapter_input", "bn_jacobian_reference",
           "near_tie_results", "ex7", "ex8", "ex9"]

#: Each exercise's level and time estimate in minutes (the teachers' page and the syllabus use them).
LEVELS = {'ex1': ('core', 30), 'ex2': ('core', 40), 'ex3': ('warm-up', 15), 'ex4': ('warm-up', 15), 'ex5': ('stretch', 45), 'ex6': ('core', 20), 'ex7': ('core', 20), 'ex8': ('core', 40), 'ex9': ('warm-up', 15)}
#: The graded implementation exercises (the student writes a function, checked against nlref
#: and, for a backward pass, against finite differences).
GRADED = ('ex7', 'ex8', 'ex9')


def randomise(block, seed):
    """Give every parameter of ``block`` standard-normal values from ``default_rng(seed)`` (the chapter's helper)."""
    r = np.random.default_rng(seed)
    for name, value in block.params.items():
        block.params[name] = r.standard_normal(value.shape)
    return block


def chapter_input():
    """The chapter's input ``x``, shape (2, 4, 6, 6), float64."""
    return np.random.default_rng(0).standard_normal((2, 4, 6, 6))


def _block(**options):
    import nlref

    return randomise(nlref.NonLocalBlock(4, dims=2, dtype="float64", seed=0, **options), seed=1)


def _zero_gradients(block, x):
    import nlref

    result = nlref.layer_gradcheck(block, x)
    return result, set(result.zero)


def ex1(answer):
    """The parameters whose gradient is exactly zero in a randomised ``pool="before"`` block (training mode).

    ``answer``: a list or set of parameter names. Expected: ``layer_gradcheck(block,
    x).zero`` on the chapter's randomised block built with ``pool="before"``; the
    check also requires that gradient check to pass.
    """
    name = "ch04 ex1"
    if not_answered(name, answer):
        return None
    names = as_names(name, answer)
    if names is None:
        return False
    result, zero = _zero_gradients(_block(pool="before"), chapter_input())
    detail = (f"the gradient check failed ({result.max_error:.1e})" if not result.passed else
              f"missing {sorted(zero - names)}, not zero {sorted(names - zero)}")
    return check_true(name, answer, result.passed and names == zero, detail)


def bn_jacobian_reference(x, eps=1e-5):
    """``d xhat_i / d x_k`` of training-mode batch norm for one channel of values ``x`` (R,), from nlref's backward.

    Row ``i`` is ``batchnorm_backward`` of the unit output gradient ``e_i`` with
    ``gamma = 1``: the chain rule read backwards, one row at a time.
    """
    from ..nn.functional import batchnorm_backward, batchnorm_forward

    m = len(x)
    state = {"running_mean": np.zeros(1), "running_var": np.ones(1)}
    _, cache = batchnorm_forward(np.asarray(x, dtype=np.float64).reshape(m, 1), np.ones(1), np.zeros(1), state,
                                 training=True, eps=eps)
    return np.stack([batchnorm_backward(np.eye(m)[i].reshape(m, 1), cache)[0].ravel() for i in range(m)])


def ex2(answer, *, m=8, seed=0):
    """A student's ``bn_jacobian(x)``: the (R, R) Jacobian of ``xhat`` for one channel of R values (eps = 1e-5).

    The check calls it on ``m`` random values, then on ``m - 3`` (so that R is read from ``x``,
    not fixed), and compares with :func:`bn_jacobian_reference` (``rtol=1e-9``, ``atol=1e-12``:
    float64 rounding).
    """
    name = "ch04 ex2"
    if not_answered(name, answer):
        return None
    rng = np.random.default_rng(seed)
    for r in (m, max(m - 3, 2)):
        x = rng.standard_normal(r) * 2 + 1
        ok, mine = call(name, answer, x)
        if not ok:
            return ok
        if not check_close(f"{name} (R = {r})", mine, bn_jacobian_reference(x), rtol=1e-9, atol=1e-12):
            return False
    return _report(name, True)


def ex3(answer):
    """The parameters with a non-zero gradient when both BN's gamma and W_z (weights and bias) are zero.

    ``answer``: a list or set of names. Expected: the names whose gradient has a
    non-zero entry after one forward and backward pass of such a block on the
    chapter's ``x`` with ``dz = default_rng(5).standard_normal(x.shape)``.
    """
    import nlref

    name = "ch04 ex3"
    if not_answered(name, answer):
        return None
    names = as_names(name, answer)
    if names is None:
        return False
    x = chapter_input()
    block = nlref.NonLocalBlock(4, dims=2, dtype="float64", seed=0)
    block.params["W_z.weight"] = np.zeros_like(block.params["W_z.weight"])
    block.params["W_z.bias"] = np.zeros_like(block.params["W_z.bias"])
    block.forward(x)
    block.backward(np.random.default_rng(5).standard_normal(x.shape))
    moving = {k for k, v in block.grads.items() if np.any(v != 0)}
    return check_true(name, answer, names == moving,
                      f"missing {sorted(moving - names)}, zero in fact {sorted(names - moving)}")


def ex4(answer, *, seed=0):
    """A student's broken ``softmax_backward(dp, cache)`` without the row-sum term: ``ds = p * dp``.

    The check calls it on random logits (2, 4, 5) with the cache of
    ``nlref.nn.functional.softmax_forward`` and compares with ``p * dp``
    (``rtol=1e-12``); it prints what ``gradcheck`` says of it, centred and random.
    """
    import nlref
    from ..nn.functional import softmax_forward

    name = "ch04 ex4"
    if not_answered(name, answer):
        return None
    rng = np.random.default_rng(seed)
    s, dp = rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 4, 5))
    p, cache = softmax_forward(s)
    ok, mine = call(name, answer, dp, cache)
    if not ok:
        return ok
    if not check_close(name, mine, p * dp, rtol=1e-12):
        return False
    memo = {}

    def forward(s):
        out, memo["cache"] = softmax_forward(s)
        return out

    def backward(dout):  # the answer as check_close read it: a list or a torch tensor made gradcheck raise
        return {"s": _host(answer(*fresh((dout, memo["cache"]))))}

    for method in ("centred", "random"):
        try:
            result = nlref.gradcheck(forward, backward, {"s": s}, method=method)
        except Exception as err:  # the answer passed once; what gradcheck makes of it is an illustration
            print(f"  gradcheck ({method}) could not run your function: {type(err).__name__}: {err}")
            continue
        print(f"  gradcheck ({method}) of your broken backward: relative error {result.max_error:.2e}, "
              f"{'passed' if result.passed else 'caught'}")
    return True


def ex5(answer, *, chunk_size=2):
    """``dx`` of the chapter's randomised block with ``chunk_size=2`` for ``dz = default_rng(5).standard_normal``.

    Expected: ``dx`` of the same block without chunks (the full form), ``rtol=1e-10``
    and ``atol=1e-12``: the chunked backward sums the same terms in another order.
    """
    name = "ch04 ex5"
    if not_answered(name, answer):
        return None
    x = chapter_input()
    block = _block()
    block.forward(x)
    expected = block.backward(np.random.default_rng(5).standard_normal(x.shape))
    return check_close(name, answer, expected, rtol=1e-10, atol=1e-12)


def near_tie_results(epsilons=(1e-6, 1e-8), bump=1e-7):
    """Whether ``gradcheck`` passes the 2x2 max pool of section 9 with its tie broken by ``bump``, per epsilon."""
    import nlref
    from ..nn.functional import maxpool_backward, maxpool_forward

    x = np.array([[1., 5., 2., 0.], [3., 4., 8., 1.], [0., 2., 6., 6.], [7., 1., 6., 3.]])[None, None]
    x[0, 0, 2, 2] += bump
    memo = {}

    def forward(x):
        out, memo["cache"] = maxpool_forward(x, (2, 2))
        return out

    def backward(dout):
        return {"x": maxpool_backward(dout, memo["cache"])}

    return tuple(bool(nlref.gradcheck(forward, backward, {"x": x}, eps=e).passed) for e in epsilons)


def ex6(answer):
    """``(passed with eps = 1e-6, passed with eps = 1e-8)`` for the tie broken by 1e-7: two bools.

    Expected: :func:`near_tie_results`, which runs ``nlref.gradcheck`` on both.
    """
    name = "ch04 ex6"
    if not_answered(name, answer):
        return None
    flags = entries(answer, ordered=True)  # a tuple, a list or a NumPy array of two bools
    if not (flags is not None and len(flags) == 2 and all(isinstance(a, (bool, np.bool_)) for a in flags)):
        return _report(name, False, f"expected two bools (passed at 1e-6, passed at 1e-8), got {_shown(answer)}")
    expected = near_tie_results()
    return check_true(name, answer, tuple(bool(a) for a in flags) == expected,
                      f"gradcheck says {expected}")



def _grads(name, answer, n, *args):
    """The student's tuple of ``n`` gradients, or Wrong."""
    grads = attempt(name, answer, *args)
    if not isinstance(grads, (tuple, list)) or len(grads) != n:
        raise Wrong(f"expected a tuple of {n} arrays, got {type(grads).__name__}")
    return grads


def ex7(answer):
    """``softmax_backward(dp, p)``: ``ds`` for ``p = softmax(s)`` along the last axis.

    Graded (core, about 20 minutes). Compared with :func:`nlref.nn.functional.softmax_backward`
    and with finite differences of the softmax, on a (2, 4, 5) batch and on one row.
    """
    from ..nn import functional as F

    rng = np.random.default_rng(47)

    def run():
        ok = True
        for shape in [(2, 4, 5), (6,)]:
            s, dp = 1.5 * rng.standard_normal(shape), rng.standard_normal(shape)
            p, cache = F.softmax_forward(s)
            ds = attempt("ch04 ex7", answer, dp, p)
            ok &= compare(f"ds {shape} (vs nlref)", ds, F.softmax_backward(dp, cache))
            numeric = numerical_gradient(lambda v: F.softmax_forward(v)[0], s, dp)
            ok &= compare(f"ds {shape} (vs finite differences)", ds, numeric, rtol=1e-5, atol=1e-8)
        return ok
    return verdict("ch04 ex7", run)


def ex8(answer):
    """``batchnorm_backward_train(dout, x, gamma, eps)`` returning ``(dx, dgamma, dbeta)``.

    Graded (core, about 40 minutes): batch norm in training mode over every axis but the
    channel axis 1 of ``x`` (B, C, H, W), the batch statistics with the biased variance.
    Compared with :func:`nlref.nn.functional.batchnorm_backward` and with finite differences.
    """
    from ..nn import functional as F

    rng = np.random.default_rng(48)
    eps = 1e-5

    def forward(x, gamma, beta):
        state = {"running_mean": np.zeros(x.shape[1]), "running_var": np.ones(x.shape[1])}
        return F.batchnorm_forward(x, gamma, beta, state, training=True, eps=eps)

    def run():
        ok = True
        for shape in [(2, 3, 4, 4), (5, 2, 1, 3)]:
            x = 2 * rng.standard_normal(shape) + 1
            gamma, beta = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
            out, cache = forward(x, gamma, beta)
            dout = rng.standard_normal(shape)
            got = _grads("ch04 ex8", answer, 3, dout, x, gamma, eps)
            want = F.batchnorm_backward(dout, cache)
            for label, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
                ok &= compare(f"{label} {shape} (vs nlref)", g, w)
            numeric = [numerical_gradient(lambda v: forward(v, gamma, beta)[0], x, dout),
                       numerical_gradient(lambda v: forward(x, v, beta)[0], gamma, dout),
                       numerical_gradient(lambda v: forward(x, gamma, v)[0], beta, dout)]
            for label, g, w in zip(("dx", "dgamma", "dbeta"), got, numeric):
                ok &= compare(f"{label} {shape} (vs finite differences)", g, w, rtol=1e-5, atol=1e-7)
        return ok
    return verdict("ch04 ex8", run)


def ex9(answer):
    """``matmul_backward(dy, g, A)`` returning ``(dg, dA)`` for ``y = g A^T``.

    Graded (warm-up, about 15 minutes): ``g`` (B, d, M), ``A`` (B, N, M), ``y`` (B, d, N).
    Compared with the products ``dy A`` and ``dy^T g`` and with finite differences.
    """
    rng = np.random.default_rng(49)

    def run():
        ok = True
        g, A = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 4, 5))
        dy = rng.standard_normal((2, 3, 4))
        got = _grads("ch04 ex9", answer, 2, dy, g, A)
        want = (dy @ A, np.swapaxes(dy, 1, 2) @ g)
        numeric = (numerical_gradient(lambda v: v @ np.swapaxes(A, 1, 2), g, dy),
                   numerical_gradient(lambda v: g @ np.swapaxes(v, 1, 2), A, dy))
        for label, gr, w, num in zip(("dg", "dA"), got, want, numeric):
            ok &= compare(f"{label} (vs the products)", gr, w)
            ok &= compare(f"{label} (vs finite differences)", gr, num, rtol=1e-6, atol=1e-8)
        return ok
    return verdict("ch04 ex9", run)
