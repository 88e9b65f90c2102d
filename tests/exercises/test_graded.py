"""The graded implementation exercises: each check says True for a right answer, False for wrong ones
(wrong values, a wrong shape, the wrong type, a function that raises), and None while unanswered
(``None``, or a function that still raises ``NotImplementedError``, as in the student edition)."""

import numpy as np
import pytest

from nlref.exercises import ch01, ch02, ch03, ch04, ch05, ch06, ch07
from nlref.exercises._graded import LEVELS
from nlref.nn import functional as F

MODULES = (ch01, ch02, ch03, ch04, ch05, ch06, ch07)
GRADED = [(m, name) for m in MODULES for name in m.GRADED]


# ----------------------------------------------------------------------------- right answers, written here


def pixel_weights(v, p, sigma, h, patch, search):
    hp, hs = patch // 2, search // 2
    pad = np.pad(v, hp + hs, mode="reflect")
    r, c = p[0] + hp + hs, p[1] + hp + hs
    ref = pad[r - hp:r + hp + 1, c - hp:c + hp + 1]
    d2 = np.array([[np.mean((ref - pad[r + i - hp:r + i + hp + 1, c + j - hp:c + j + hp + 1]) ** 2)
                    for j in range(-hs, hs + 1)] for i in range(-hs, hs + 1)])
    return np.exp(-np.maximum(d2 - 2 * sigma ** 2, 0) / h ** 2)


def softmax_backward(dp, p):
    return p * (dp - np.sum(dp * p, axis=-1, keepdims=True))


def batchnorm_backward_train(dout, x, gamma, eps):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    r = 1 / np.sqrt(var + eps)
    xhat = (x - mu) * r
    dxhat = dout * gamma.reshape(shape)
    dx = r * (dxhat - dxhat.mean(axis=axes, keepdims=True) - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))
    return dx, np.sum(dout * xhat, axis=axes), np.sum(dout, axis=axes)


def matmul_backward(dy, g, A):
    return dy @ A, np.swapaxes(dy, 1, 2) @ g


def attention_backward(dy, theta, phi, g, scale):
    s = scale * np.swapaxes(theta, 1, 2) @ phi                   # (B, N, M)
    A = np.exp(s - s.max(axis=2, keepdims=True))
    A /= A.sum(axis=2, keepdims=True)
    dg = dy @ A
    dA = np.swapaxes(dy, 1, 2) @ g
    ds = A * (dA - np.sum(dA * A, axis=2, keepdims=True))
    return scale * phi @ np.swapaxes(ds, 1, 2), scale * theta @ ds, dg


def online_update(m, l, acc, s_block, g_block):
    m_new = np.maximum(m, s_block.max(axis=1))
    shrink = np.exp(m - m_new)
    e = np.exp(s_block - m_new[:, None])
    return m_new, l * shrink + e.sum(axis=1), acc * shrink + g_block @ e.T


def _geometry(x, w, stride, padding):
    s, p = np.broadcast_to(stride, 3), np.broadcast_to(padding, 3)
    xpad = np.pad(x, [(0, 0), (0, 0)] + [(q, q) for q in p])
    sizes = [(n + 2 * q - k) // st + 1 for n, q, k, st in zip(x.shape[2:], p, w.shape[2:], s)]
    return s, p, xpad, sizes


def _window(s, k, n, t, q, r):
    return (n, slice(None), slice(t * s[0], t * s[0] + k[0]), slice(q * s[1], q * s[1] + k[1]),
            slice(r * s[2], r * s[2] + k[2]))


def conv3d_naive(x, w, bias, stride, padding):
    s, _, xpad, sizes = _geometry(x, w, stride, padding)
    out = np.zeros((x.shape[0], w.shape[0], *sizes))
    for n, t, q, r in np.ndindex(x.shape[0], *sizes):
        out[n, :, t, q, r] = np.einsum("ocijl,cijl->o", w, xpad[_window(s, w.shape[2:], n, t, q, r)]) + bias
    return out


def conv3d_naive_backward(dout, x, w, stride, padding):
    s, p, xpad, sizes = _geometry(x, w, stride, padding)
    dxpad, dw = np.zeros_like(xpad), np.zeros_like(w)
    for n, t, q, r in np.ndindex(x.shape[0], *sizes):
        win = _window(s, w.shape[2:], n, t, q, r)
        dw += np.einsum("o,cijl->ocijl", dout[n, :, t, q, r], xpad[win])
        dxpad[win] += np.einsum("o,ocijl->cijl", dout[n, :, t, q, r], w)
    T, H, W = x.shape[2:]
    return dxpad[:, :, p[0]:p[0] + T, p[1]:p[1] + H, p[2]:p[2] + W], dw, dout.sum(axis=(0, 2, 3, 4))


def train_step(params, x, labels, lr):
    pooled = x.mean(axis=(2, 3, 4))
    h = pooled @ params["w1"].T + params["b1"]
    a = np.maximum(h, 0)
    z = a @ params["w2"].T + params["b2"]
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    b = len(labels)
    loss = -np.mean(np.log(p[np.arange(b), labels]))
    dz = p.copy()
    dz[np.arange(b), labels] -= 1
    dz /= b
    da = dz @ params["w2"]
    dh = da * (h > 0)
    grads = {"w2": dz.T @ a, "b2": dz.sum(axis=0), "w1": dh.T @ pooled, "b1": dh.sum(axis=0)}
    return loss, {k: params[k] - lr * grads[k] for k in params}


def mean_field_update(q, unary, kernel, mu):
    off = kernel - np.diag(np.diag(kernel))                      # j != i
    z = -unary - mu @ (q @ off.T)
    e = np.exp(z - z.max(axis=0))
    return e / e.sum(axis=0)


def _softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


RIGHT = {ch02.ex6: pixel_weights, ch03.ex5: mean_field_update, ch04.ex7: softmax_backward, ch04.ex8: batchnorm_backward_train,
         ch04.ex9: matmul_backward, ch05.ex6: attention_backward, ch05.ex7: online_update,
         ch06.ex6: conv3d_naive, ch06.ex7: conv3d_naive_backward, ch07.ex7: train_step}


def _scaled(fn, factor):
    def wrong(*args):
        out = fn(*args)
        return tuple(factor * o for o in out) if isinstance(out, tuple) else factor * out
    return wrong


def _first_only(fn):
    """Right but for the first returned array, which is zeroed (a half-done backward)."""
    def wrong(*args):
        out = list(fn(*args))
        out[0] = np.zeros_like(out[0])
        return tuple(out)
    return wrong


def _raises(*args):
    raise RuntimeError("a student's bug")


def _not_written(*args):
    raise NotImplementedError


WRONG = {
    ch02.ex6: [lambda v, p, s, h, pa, se: pixel_weights(v, p, 0.0, h, pa, se),          # no 2 sigma^2
               lambda v, p, s, h, pa, se: pixel_weights(v, p, s, h, pa, se).T,            # transposed
               lambda v, p, s, h, pa, se: pixel_weights(v, p, s, h, pa, se)[1:, 1:]],      # wrong shape
    ch03.ex5: [lambda q, u, k, mu: _softmax(-u - mu @ (q @ k.T), 0),                      # j = i kept
               lambda q, u, k, mu: mean_field_update(q, u, k, np.eye(len(mu))),          # mu forgotten
               lambda q, u, k, mu: _softmax(-u - mu @ (q @ (k - np.diag(np.diag(k))).T), 1),   # over the pixels
               lambda q, u, k, mu: mean_field_update(q, u, k, mu).T,                     # (N, L)
               lambda q, u, k, mu: _softmax(-u, 0)],                                     # the unaries alone
    ch04.ex7: [lambda dp, p: p * dp,                                                     # the diagonal only
               lambda dp, p: dp - np.sum(dp * p, axis=-1, keepdims=True),                # p forgotten
               lambda dp, p: softmax_backward(dp, p)[..., :-1]],
    ch04.ex8: [lambda d, x, g, e: (d * g.reshape(1, -1, *([1] * (x.ndim - 2))) / np.sqrt(x.var(axis=(0, 2, 3), keepdims=True) + e),)
               + batchnorm_backward_train(d, x, g, e)[1:],                               # normalisation held fixed
               _first_only(batchnorm_backward_train),
               lambda d, x, g, e: batchnorm_backward_train(d, x, g, e)[:2]],              # a tuple of 2
    ch04.ex9: [lambda dy, g, A: (dy @ A, np.swapaxes(g, 1, 2).T),
               lambda dy, g, A: (np.swapaxes(dy, 1, 2) @ g, dy @ A),                     # swapped
               _scaled(matmul_backward, 2.0)],
    ch05.ex6: [lambda dy, th, ph, g, sc: attention_backward(dy, th, ph, g, 1.0),         # the scale dropped
               _first_only(attention_backward),
               lambda dy, th, ph, g, sc: attention_backward(dy, th, ph, g, sc)[0]],      # one array, not 3
    ch05.ex7: [lambda m, l, acc, s, g: (s.max(axis=1), np.exp(s).sum(axis=1), g @ np.exp(s).T),   # no carry, no shift
               lambda m, l, acc, s, g: online_update(m, l, acc, s, g)[:2] + (acc,),      # acc never updated
               lambda m, l, acc, s, g: (np.maximum(m, s.max(axis=1)), l + np.exp(s - np.maximum(m, s.max(axis=1))[:, None]).sum(axis=1),
                                        acc + g @ np.exp(s - np.maximum(m, s.max(axis=1))[:, None]).T)],   # no shrink
    ch06.ex6: [lambda x, w, b, s, p: conv3d_naive(x, w, 0 * b, s, p),                    # bias forgotten
               lambda x, w, b, s, p: conv3d_naive(x, w, b, 1, p),                        # stride ignored
               lambda x, w, b, s, p: F.conv3d_reference(x, np.flip(w, axis=(2, 3, 4)), b, stride=s, padding=p)[0]],
    ch06.ex7: [_first_only(conv3d_naive_backward),
               lambda d, x, w, s, p: (conv3d_naive_backward(d, x, w, s, p)[0], np.flip(conv3d_naive_backward(d, x, w, s, p)[1],
                                      axis=(2, 3, 4)), conv3d_naive_backward(d, x, w, s, p)[2]),
               lambda d, x, w, s, p: conv3d_naive_backward(d, x, w, s, p)[:2]],
    ch07.ex7: [lambda prm, x, y, lr: (train_step(prm, x, y, lr)[0], dict(prm)),          # no step taken
               lambda prm, x, y, lr: train_step(prm, x, y, -lr),                         # uphill
               lambda prm, x, y, lr: (train_step(prm, x, y, lr)[0],
                                      {k: v for k, v in train_step(prm, x, y, lr)[1].items() if k != "b2"})],
}


def test_every_graded_exercise_has_tests_and_a_level():
    assert len(GRADED) >= 8
    assert {getattr(m, n) for m, n in GRADED} == set(RIGHT) == set(WRONG)
    for m in MODULES:
        for name, (level, minutes) in m.LEVELS.items():
            assert level in LEVELS and 0 < minutes <= 120, (m.__name__, name)
        checks = {n for n in dir(m) if n.startswith("ex") and n[2:].isdigit()}
        assert checks <= set(m.LEVELS), m.__name__


@pytest.mark.parametrize("check", list(RIGHT), ids=[f"{c.__module__[-4:]}.{c.__name__}" for c in RIGHT])
def test_right_answer_is_true(check, capsys):
    assert check(RIGHT[check]) is True
    out = capsys.readouterr().out
    assert ": correct" in out and "approximate: True" in out and "approximate: False" not in out


@pytest.mark.parametrize("check, index", [(c, i) for c in WRONG for i in range(len(WRONG[c]))],
                         ids=[f"{c.__module__[-4:]}.{c.__name__}-{i}" for c in WRONG for i in range(len(WRONG[c]))])
def test_wrong_answer_is_false(check, index, capsys):
    assert check(WRONG[check][index]) is False
    assert "not yet" in capsys.readouterr().out


@pytest.mark.parametrize("check", list(RIGHT), ids=[f"{c.__module__[-4:]}.{c.__name__}" for c in RIGHT])
def test_raising_and_unanswered(check, capsys):
    assert check(_raises) is False
    assert "RuntimeError: a student's bug" in capsys.readouterr().out
    assert check("a function") is False
    assert check(None) is None
    assert check(_not_written) is None                  # the student edition's placeholder
    out = capsys.readouterr().out
    assert out.count("not answered yet") == 2
