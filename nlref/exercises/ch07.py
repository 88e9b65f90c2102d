"""Checks for the exercises of chapter 7, training a non-local video network.

The chapter's setup: the two-sprite task with ``K = 3`` brightness kinds, clips of
8 x 16 x 16, the teaching network (widths 8, 16, 32).
"""

from __future__ import annotations

import numpy as np

from . import _host, _report, _shown, check_close, check_true, not_answered
from ._student import entries
from ._graded import Wrong, attempt, compare, numerical_gradient, verdict

__all__ = ["LEVELS", "GRADED", "ex1", "ex2", "ex6", "fit_logistic", "squared_feature_accuracy", "attention_sizes", "ex7", "step_reference"]

#: Each exercise's level and time estimate in minutes (the teachers' page and the syllabus use them).
LEVELS = {'ex1': ('core', 20), 'ex2': ('warm-up', 15), 'ex3': ('stretch', 90), 'ex4': ('core', 30), 'ex5': ('core', 20), 'ex6': ('core', 25), 'ex7': ('core', 45)}
#: The graded implementation exercises (the student writes a function, checked against nlref
#: and, for a backward pass, against finite differences).
GRADED = ('ex7',)


def fit_logistic(X, y, steps=3000, lr=1.0):
    """Logistic regression by full-batch gradient descent on the mean cross-entropy (the chapter's helper)."""
    w, b = np.zeros(X.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(X @ w + b)))
        w -= lr * X.T @ (p - y) / len(y)
        b -= lr * np.mean(p - y)
    return w, b


def squared_feature_accuracy(kinds=3):
    """Validation accuracy of the logistic regression on ``(e_a + e_b) ** 2`` (section 2's clips and fit)."""
    from ..backend import to_numpy
    from ..data.sprites import sprite_splits

    tr, va = sprite_splits(4000, 2000, seed=1, kinds=kinds, frames=8, size=16)

    def features(kind):
        return (np.eye(kinds)[kind[:, 0]] + np.eye(kinds)[kind[:, 1]]) ** 2

    w, b = fit_logistic(features(tr.meta["kind"]), to_numpy(tr.labels))
    return float(np.mean((features(va.meta["kind"]) @ w + b > 0) == to_numpy(va.labels)))


def ex1(answer):
    """The validation accuracy of the logistic regression on the squared pooled features.

    Expected: :func:`squared_feature_accuracy`. ``atol=0.005`` (10 of the 2000
    validation clips): the same fit run with other rounding; the plain pooled
    features' accuracy (about 0.5) or the ceiling (2/3) fail.
    """
    if not_answered("ch07 ex1", answer):
        return None
    return check_close("ch07 ex1", answer, squared_feature_accuracy(), rtol=0, atol=0.005)


def ex2(answer, *, kinds=8):
    """The additive ceiling for K = 8 kinds, worked out from the formula of section 2.

    Expected: ``nlref.data.sprites.additive_ceiling(8)`` (0.643), ``rtol=1e-9``;
    the large-K limit 5/8 or the K = 3 value 2/3 fail.
    """
    from ..data.sprites import additive_ceiling

    if not_answered("ch07 ex2", answer):
        return None
    return check_close("ch07 ex2", answer, additive_ceiling(kinds), rtol=1e-9)


def attention_sizes(stage, *, frames=8, size=16):
    """``(N, N')`` of a block in ``stage`` of the teaching network: its attention's shape, from a forward pass."""
    from ..data.sprites import sprite_clips
    from ..train import TrainConfig, build_model

    config = TrainConfig(stage=stage, frames=frames, size=size, widths=(8, 16, 32), dropout=0.0, kinds=3)
    net = build_model(config).eval()
    clips = sprite_clips(1, seed=0, kinds=3, frames=frames, size=size)
    _, attention = net.forward(clips.video, return_attention=True)
    (a,) = attention.values()
    return tuple(int(n) for n in a.shape[1:])


def ex6(answer):
    """``{"res2": (N, N'), "res4": (N, N')}``: queries and keys of a block in res2 and in res4.

    Expected: the shapes of the attention maps that the teaching network returns
    with the block in that stage (:func:`attention_sizes`), exactly.
    """
    name = "ch07 ex6"
    if not_answered(name, answer):
        return None
    if not isinstance(answer, dict) or set(answer) != {"res2", "res4"}:
        return _report(name, False, f"expected a dict with the keys 'res2' and 'res4', got {_shown(answer)}")
    mine = {}
    for stage in ("res2", "res4"):
        counts = _counts(answer[stage])
        if counts is None:  # int() would pass 512.9 as 512 and "512" as 512
            return _report(name, False, f"answer[{stage!r}] must be two whole numbers (N, N'), got {_shown(answer[stage])}")
        mine[stage] = counts
    expected = {stage: attention_sizes(stage) for stage in ("res2", "res4")}
    return check_true(name, answer, mine == expected, f"the network's attention has {expected}")


def _counts(value):
    """``value`` as a tuple of ints when it holds whole numbers only (512 or 512.0, not 512.9, "512" or True)."""
    items = entries(value, ordered=True)  # None for a str or a 0-d array (whose iteration raises)
    if items is None:
        return None
    counts = []
    for n in items:
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, float, np.integer, np.floating)):
            return None
        if isinstance(n, (float, np.floating)) and not float(n).is_integer():
            return None
        counts.append(int(n))
    return tuple(counts)



def step_reference(params, x, labels, lr):
    """One SGD step of the head by nlref's layers: ``(loss, new_params)`` (what ex7 is checked against)."""
    from ..nn import functional as F

    pooled, c_pool = F.global_avgpool_forward(x)
    h, c1 = F.linear_forward(pooled, params["w1"], params["b1"])
    a, c_relu = F.relu_forward(h)
    logits, c2 = F.linear_forward(a, params["w2"], params["b2"])
    loss, c_loss = F.softmax_cross_entropy_forward(logits, labels)
    dlogits = F.softmax_cross_entropy_backward(1.0, c_loss)
    da, dw2, db2 = F.linear_backward(dlogits, c2)
    dh = F.relu_backward(da, c_relu)
    _, dw1, db1 = F.linear_backward(dh, c1)
    grads = {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}
    return float(loss), {k: params[k] - lr * grads[k] for k in params}


def ex7(answer):
    """``train_step(params, x, labels, lr)`` returning ``(loss, new_params)``: one training step by hand.

    Graded (core, about 45 minutes). The network is the head of the chapter's video network on
    its own: global average pooling of ``x`` (B, C, T, H, W), ``linear(w1, b1)``, ReLU,
    ``linear(w2, b2)`` (weights (out, in), PyTorch's layout), the mean softmax cross-entropy
    against integer ``labels``; then one plain SGD step ``p - lr * dL/dp`` on the four
    parameters. The student's loss and new parameters are compared with :func:`step_reference`;
    the gradients it implies, ``(p - p_new) / lr``, with finite differences of the loss.
    """
    from ..nn import functional as F

    rng = np.random.default_rng(77)
    b, c, hidden, classes, lr = 6, 4, 5, 2, 0.5
    x = rng.standard_normal((b, c, 2, 3, 3)) + 0.5
    labels = np.array([0, 1, 1, 0, 1, 0])
    params = {"w1": rng.standard_normal((hidden, c)), "b1": 0.1 * rng.standard_normal(hidden),
              "w2": rng.standard_normal((classes, hidden)), "b2": 0.1 * rng.standard_normal(classes)}

    def loss_of(p):
        pooled = F.global_avgpool_forward(x)[0]
        h = F.relu_forward(F.linear_forward(pooled, p["w1"], p["b1"])[0])[0]
        return F.softmax_cross_entropy_forward(F.linear_forward(h, p["w2"], p["b2"])[0], labels)[0]

    def run():
        got = attempt("ch07 ex7", answer, params, x, labels, lr)
        if not isinstance(got, (tuple, list)) or len(got) != 2 or not isinstance(got[1], dict):
            raise Wrong(f"expected a tuple (loss, new_params dict), got {type(got).__name__}")
        loss, new = got
        if set(new) != set(params):
            raise Wrong(f"new_params must have the keys {sorted(params)}, got {sorted(new, key=repr)}")
        want_loss, want = step_reference(params, x, labels, lr)
        ok = compare("loss", loss, want_loss)
        for k in ("w1", "b1", "w2", "b2"):
            ok &= compare(f"{k} after the step (vs nlref)", new[k], want[k])
            implied = (params[k] - _host(new[k])) / lr   # np.asarray raised on a tensor needing grad

            def f(v, k=k):
                return np.asarray(loss_of({**params, k: v}))
            numeric = numerical_gradient(f, params[k], np.ones(()))
            ok &= compare(f"d{k} implied (vs finite differences)", implied, numeric, rtol=1e-5, atol=1e-7)
        return ok
    return verdict("ch07 ex7", run)
