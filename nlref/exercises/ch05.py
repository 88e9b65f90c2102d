"""Checks for the exercises of chapter 5, the non-local block as self-attention.

Checks of code call the student's function on their own random inputs and
compare with nlref's ``nonlocal_forward`` (or a masked softmax built from
nlref's functional layers).
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np

from . import _host, _real, _report, _tolerances, check_close, not_answered
from ._student import call
from ._graded import Wrong, attempt, compare, numerical_gradient, verdict

__all__ = ["LEVELS", "GRADED", "ex1", "ex2", "ex3", "ex4", "ex5", "peak_mib", "chunk_bytes_per_element", "ex6", "ex7",
           "online_reference"]

#: Each exercise's level and time estimate in minutes (the teachers' page and the syllabus use them).
LEVELS = {'ex1': ('core', 30), 'ex2': ('core', 30), 'ex3': ('core', 20), 'ex4': ('core', 20), 'ex5': ('core', 25), 'ex6': ('core', 45), 'ex7': ('stretch', 40)}
#: The graded implementation exercises (the student writes a function, checked against nlref
#: and, for a backward pass, against finite differences).
GRADED = ('ex6', 'ex7')


def ex1(answer, *, seed=0):
    """A student's ``multi_head(theta, phi, g, heads)``: ``(B, d, N), (B, d, M), (B, d_g, M) -> (B, d_g, N)``.

    Each head is ``nonlocal_forward`` (embedded Gaussian) on its own consecutive
    group of ``d / heads`` channels of theta and phi and ``d_g / heads`` of g; the
    outputs are concatenated along the channels (before ``W_z``). The check tries
    ``heads = 2`` and ``heads = 1`` (which must be the single-head operation) on
    random inputs, ``rtol=1e-10``, ``atol=1e-12``.
    """
    from ..nn.nonlocal_op import nonlocal_forward

    name = "ch05 ex1"
    if not_answered(name, answer):
        return None
    rng = np.random.default_rng(seed)
    theta, phi, g = rng.standard_normal((2, 4, 10)), rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 6, 6))
    for heads in (2, 1):
        a, b = 4 // heads, 6 // heads
        expected = np.concatenate([nonlocal_forward(theta[:, h * a:(h + 1) * a], phi[:, h * a:(h + 1) * a],
                                                    g[:, h * b:(h + 1) * b], mode="embedded_gaussian")[0]
                                   for h in range(heads)], axis=1)
        ok, mine = call(name, answer, theta, phi, g, heads)
        if not ok:
            return ok
        if heads == 2:
            try:  # check_close's rule, silently (np.allclose raised on a torch tensor that requires grad)
                got, dtype = _real(mine)
                rtol, atol, _ = _tolerances(dtype, expected, 1e-10, 1e-12)
                close = got.shape == expected.shape and bool(np.all(np.abs(got - expected)
                                                                    <= atol + rtol * np.abs(expected)))
            except (TypeError, ValueError):  # not an array: (y, cache), say; check_close says what it is
                close = False
            if not close:
                return check_close(name + " (heads = 2)", mine, expected, rtol=1e-10, atol=1e-12)
    return check_close(name, mine, expected, rtol=1e-10, atol=1e-12)


def ex2(answer, *, seed=0, chunk_size=3):
    """A student's ``causal_attention(theta, phi, g, chunk_size)``: the online-softmax loop with a causal mask.

    Query ``i`` attends to keys ``j <= i`` only (``N = M``). The check calls it on
    random inputs with ``N = 10`` and ``chunk_size = 3``, then with ``N = 7`` and ``chunk_size = 4``
    (so that a mask or a loop built for one size fails), and compares with the
    masked full softmax: nlref's ``dot_pairwise_forward`` logits, ``-inf`` above the
    diagonal, ``softmax_forward``, times ``g`` (``rtol=1e-10``, ``atol=1e-12``).
    """
    from ..nn.functional import dot_pairwise_forward, softmax_forward

    name = "ch05 ex2"
    if not_answered(name, answer):
        return None
    rng = np.random.default_rng(seed)
    for n, chunk in ((10, chunk_size), (7, chunk_size + 1)):
        theta, phi, g = rng.standard_normal((2, 4, n)), rng.standard_normal((2, 4, n)), rng.standard_normal((2, 3, n))
        ok, mine = call(name, answer, theta, phi, g, chunk)
        if not ok:
            return ok
        s, _ = dot_pairwise_forward(theta, phi)                      # (B, N, M)
        s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
        a, _ = softmax_forward(s)
        if not check_close(f"{name} (N = {n}, chunk_size = {chunk})", mine, g @ a.transpose(0, 2, 1),
                           rtol=1e-10, atol=1e-12):
            return False
    return _report(name, True)


def peak_mib(n, chunk_size, *, d=16, seed=0):
    """Peak memory (MiB, ``tracemalloc``) of one chunked forward + backward pass, float32, ``N = M = n`` (section 4)."""
    from ..nn.nonlocal_op import nonlocal_backward, nonlocal_forward

    rng = np.random.default_rng(seed)
    theta, phi, g, dy = (rng.standard_normal((1, d, n), dtype=np.float32) for _ in range(4))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        y, cache = nonlocal_forward(theta, phi, g, mode="embedded_gaussian", scale=0.25, chunk_size=chunk_size)
        nonlocal_backward(dy, cache)
        return (tracemalloc.get_traced_memory()[1] - base) / 2**20
    finally:
        tracemalloc.stop()


def chunk_bytes_per_element(n=1024, chunks=(128, 512)):
    """The slope ``b`` of ``peak = a + b N c`` in bytes, measured at ``N = n`` for two chunk sizes."""
    peak_mib(n, chunks[0])                                         # warm-up
    p0, p1 = (peak_mib(n, c) for c in chunks)
    return (p1 - p0) * 2**20 / (n * (chunks[1] - chunks[0]))


def ex3(answer):
    """The slope ``b`` of the chunked peak memory ``a + b N c``, in bytes per element of an (N, c) block.

    Expected: :func:`chunk_bytes_per_element` (``tracemalloc`` at ``N = 1024``, ``c`` = 128
    and 512; about 12 bytes: three float32 blocks). ``rtol=0.05``: a fit over other
    chunk sizes or another N moves it by a few percent; 4 bytes (one block) fails.
    """
    if not_answered("ch05 ex3", answer):
        return None
    return check_close("ch05 ex3", answer, chunk_bytes_per_element(), rtol=0.05)


def ex4(answer, *, channels=8):
    """The ratio ``dL/d(theta.weight)`` of the ``scale=False`` copy over that of the ``scale=True`` block.

    Expected: measured with two ``NonLocalBlock(8, scale=...)`` (float64, BN's
    gamma set to 1, random input and output gradient), the copy's ``theta``
    divided by ``sqrt(d)``; the median of the element-wise ratios is ``sqrt(d) = 2``.
    ``rtol=1e-6``.
    """
    import nlref

    name = "ch05 ex4"
    if not_answered(name, answer):
        return None
    rng = np.random.default_rng(1)
    x, dz = rng.standard_normal((2, channels, 6, 6)), rng.standard_normal((2, channels, 6, 6))
    scaled = nlref.NonLocalBlock(channels, scale=True, dtype="float64", seed=0)
    plain = nlref.NonLocalBlock(channels, scale=False, dtype="float64", seed=0)
    scaled.params["bn.gamma"] = np.ones(channels)
    plain.params.update(scaled.params)
    d = scaled.params["theta.weight"].shape[0]
    plain.params["theta.weight"] = scaled.params["theta.weight"] / math.sqrt(d)
    plain.params["theta.bias"] = scaled.params["theta.bias"] / math.sqrt(d)
    grads = []
    for block in (plain, scaled):
        block.forward(x)
        block.backward(dz)
        grads.append(block.grads["theta.weight"])
    return check_close(name, answer, float(np.median(grads[0] / grads[1])), rtol=1e-6)


def ex5(answer):
    """A student's ``add_positions(x)``: ``(B, C, H, W) -> (B, C + 2, H, W)``, row then column in [-1, 1].

    The two new channels are ``linspace(-1, 1, H)`` down the rows and
    ``linspace(-1, 1, W)`` along the columns, the same for every batch element,
    after the C channels of ``x`` (unchanged). Checked on a (2, 3, 4, 5) and a (1, 2, 6, 3) input
    (so that a grid of one size written in fails), ``rtol=1e-12``.
    """
    name = "ch05 ex5"
    if not_answered(name, answer):
        return None
    rng = np.random.default_rng(0)
    for b, c, h, w in ((2, 3, 4, 5), (1, 2, 6, 3)):
        x = rng.standard_normal((b, c, h, w))
        ok, mine = call(name, answer, x)
        if not ok:
            return ok
        rows = np.broadcast_to(np.linspace(-1, 1, h)[:, None], (b, 1, h, w))
        cols = np.broadcast_to(np.linspace(-1, 1, w)[None, :], (b, 1, h, w))
        if not check_close(f"{name} (x of shape {x.shape})", mine, np.concatenate([x, rows, cols], axis=1),
                           rtol=1e-12, atol=1e-15):
            return False
    return _report(name, True)



def ex6(answer):
    """``attention_backward(dy, theta, phi, g, scale)`` returning ``(dtheta, dphi, dg)``.

    Graded (core, about 45 minutes): the whole backward pass of
    ``y = g softmax(scale * theta^T phi)^T`` with ``theta`` (B, d, N), ``phi`` (B, d, M),
    ``g`` (B, d_g, M), the softmax over the keys. Compared with
    :func:`nlref.nn.nonlocal_op.nonlocal_backward` and with finite differences.
    """
    from ..nn.nonlocal_op import nonlocal_backward, nonlocal_forward

    rng = np.random.default_rng(56)

    def run():
        ok = True
        for (b, d, n, m, dg), scale in [((2, 3, 5, 4, 2), 1.0), ((1, 4, 6, 6, 3), 0.5)]:
            theta, phi, g = (rng.standard_normal(s) for s in ((b, d, n), (b, d, m), (b, dg, m)))
            y, cache = nonlocal_forward(theta, phi, g, mode="embedded_gaussian", scale=scale)
            dy = rng.standard_normal(y.shape)
            got = attempt("ch05 ex6", answer, dy, theta, phi, g, scale)
            if not isinstance(got, (tuple, list)) or len(got) != 3:
                raise Wrong(f"expected a tuple (dtheta, dphi, dg), got {type(got).__name__}")
            want = nonlocal_backward(dy, cache)[:3]

            def f(**kw):
                a = {"theta": theta, "phi": phi, "g": g} | kw
                return nonlocal_forward(a["theta"], a["phi"], a["g"], mode="embedded_gaussian", scale=scale)[0]
            for label, gr, w, name, v in zip(("dtheta", "dphi", "dg"), got, want, ("theta", "phi", "g"),
                                            (theta, phi, g)):
                ok &= compare(f"{label}, scale {scale} (vs nlref)", gr, w)
                num = numerical_gradient(lambda u: f(**{name: u}), v, dy)
                ok &= compare(f"{label}, scale {scale} (vs finite differences)", gr, num, rtol=1e-5, atol=1e-8)
        return ok
    return verdict("ch05 ex6", run)


def online_reference(m, l, acc, s_block, g_block):
    """One step of the online softmax for all queries (the reference ex7 is checked against)."""
    m_new = np.maximum(m, np.max(s_block, axis=1))
    shrink = np.exp(m - m_new)                    # exp(-inf) = 0 on the first block
    e = np.exp(s_block - m_new[:, None])          # (N, c)
    return m_new, shrink * l + np.sum(e, axis=1), shrink[None, :] * acc + g_block @ e.T


def ex7(answer):
    """``online_update(m, l, acc, s_block, g_block)`` returning ``(m, l, acc)`` after one block of keys.

    Graded (stretch, about 40 minutes). For one example: ``m`` (N,) the running maxima (``-inf``
    before the first block), ``l`` (N,) the running sums of ``exp(s - m)``, ``acc`` (d_g, N) the
    running sums of ``exp(s - m) g``; ``s_block`` (N, c) the logits of ``c`` keys and ``g_block``
    (d_g, c) their values. Checked step by step against :func:`online_reference` on blocks of
    4, 4 and 2 keys (one with logits near 700, which overflow ``exp`` unshifted), and the final
    ``acc / l`` against the softmax attention computed in one piece.
    """
    from ..nn.nonlocal_op import nonlocal_forward

    rng = np.random.default_rng(57)
    n, dg, keys = 5, 3, 10
    s = rng.standard_normal((n, keys))
    s[:, 4:8] += 700.0                             # a block whose exp overflows without the shift
    g = rng.standard_normal((dg, keys))

    def run():
        ok = True
        state = (np.full(n, -np.inf), np.zeros(n), np.zeros((dg, n)))
        for start, stop in [(0, 4), (4, 8), (8, 10)]:
            want = online_reference(*state, s[:, start:stop], g[:, start:stop])
            got = attempt("ch05 ex7", answer, *state, s[:, start:stop], g[:, start:stop])
            if not isinstance(got, (tuple, list)) or len(got) != 3:
                raise Wrong(f"expected a tuple (m, l, acc), got {type(got).__name__}")
            for label, gr, w in zip(("m", "l", "acc"), got, want):
                ok &= compare(f"{label} after keys {start}..{stop - 1}", gr, w, rtol=1e-10, atol=1e-300)
            # _host: np.asarray raised on a torch tensor that requires grad
            single = ok and all(_real(a)[1] == np.float32 for a in got)
            state = tuple(_host(a) for a in got) if ok else want
        _, total, acc = state  # (m, l, acc)
        y = acc / total[None, :]
        y = y.astype(np.float32) if single else y  # compared as the float32 it would be in the student's hands
        full, _ = nonlocal_forward(np.eye(n)[None], s[None], g[None], mode="embedded_gaussian")  # theta = I: logits s
        ok &= compare("acc / l (vs attention in one piece)", y, full[0], rtol=1e-10, atol=1e-12)
        return ok
    return verdict("ch05 ex7", run)
