"""Checks for the exercises of chapter 7, training a non-local video network.

The chapter's setup: the two-sprite task with ``K = 3`` brightness kinds, clips of
8 x 16 x 16, the teaching network (widths 8, 16, 32).
"""

from __future__ import annotations

import numpy as np

from . import _report, check_close, check_true, not_answered

__all__ = ["ex1", "ex2", "ex6", "fit_logistic", "squared_feature_accuracy", "attention_sizes"]


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
    if not_answered("ch06 ex1", answer):
        return None
    return check_close("ch06 ex1", answer, squared_feature_accuracy(), rtol=0, atol=0.005)


def ex2(answer, *, kinds=8):
    """The additive ceiling for K = 8 kinds, worked out from the formula of section 2.

    Expected: ``nlref.data.sprites.additive_ceiling(8)`` (0.643), ``rtol=1e-9``;
    the large-K limit 5/8 or the K = 3 value 2/3 fail.
    """
    from ..data.sprites import additive_ceiling

    if not_answered("ch06 ex2", answer):
        return None
    return check_close("ch06 ex2", answer, additive_ceiling(kinds), rtol=1e-9)


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
    name = "ch06 ex6"
    if not_answered(name, answer):
        return None
    if not isinstance(answer, dict) or set(answer) != {"res2", "res4"}:
        return _report(name, False, f"expected a dict with the keys 'res2' and 'res4', got {answer!r}")
    expected = {stage: attention_sizes(stage) for stage in ("res2", "res4")}
    try:
        mine = {stage: tuple(int(n) for n in answer[stage]) for stage in answer}
    except (TypeError, ValueError):
        return _report(name, False, "each value must be two integers (N, N')")
    return check_true(name, answer, mine == expected, f"the network's attention has {expected}")
