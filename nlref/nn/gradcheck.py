r"""Finite-difference gradient checks: does a hand-written backward match its forward?

For a forward function ``out = f(inputs)`` and a fixed random ``dout``, the
scalar :math:`L = \sum \mathrm{out} \odot \mathrm{dout}` has gradient
``backward(dout)``. Two ways to check it numerically:

* **centred differences**, one input element at a time:
  :math:`\partial L/\partial x_k \approx (L(x + \epsilon e_k) - L(x - \epsilon e_k)) / 2\epsilon`,
  with an error of order :math:`\epsilon^2` (2 forward passes per element; for small tensors);
* **random directions**: for a random unit direction :math:`v`,
  :math:`(L(x + \epsilon v) - L(x - \epsilon v)) / 2\epsilon \approx \langle \nabla L, v\rangle`
  (2 forward passes per direction, whatever the size; for large tensors).

The error reported per input is
:math:`\|g_\text{num} - g_\text{ana}\| / \max(\|g_\text{num}\|, \|g_\text{ana}\|)`
(Euclidean norms). For random directions it is the worst direction's
:math:`|d_\text{num} - \langle g_\text{ana}, v\rangle|`, divided by the larger of the two
projections and :math:`\|g_\text{ana}\|/\sqrt{n}`, the typical size of a projection on a random
unit vector (so that a direction nearly orthogonal to the gradient does not divide by almost nothing). A gradient that
is zero in exact arithmetic (a bias followed by batch norm, say) cannot be told
apart from rounding noise: when both norms lie below the rounding floor of the
differences, :math:`64\,\epsilon_\text{mach} \sum|\mathrm{out}\odot\mathrm{dout}| / \epsilon`
per element (or ``atol`` when given), the error is reported as 0 and the input
is listed in ``zero``. Checks run in float64: with float32 the rounding of ``L``
swamps the differences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import backend as B

__all__ = ["gradcheck", "layer_gradcheck", "GradcheckResult"]


@dataclass
class GradcheckResult:
    """Relative error per checked input, with the settings that produced it."""

    errors: dict = field(default_factory=dict)
    zero: list = field(default_factory=list)
    method: str = "centred"
    eps: float = 1e-6
    rtol: float = 1e-6

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_error <= self.rtol

    def __str__(self):
        width = max((len(k) for k in self.errors), default=4)
        lines = [f"gradcheck ({self.method}, eps={self.eps:g}, rtol={self.rtol:g}): "
                 f"{'passed' if self.passed else 'FAILED'}"]
        for k, v in self.errors.items():
            note = "  (zero gradient)" if k in self.zero else ("" if v <= self.rtol else "  <-- too large")
            lines.append(f"  {k:<{width}}  {v:.2e}{note}")
        return "\n".join(lines)


def _rel(num, ana, floor, typical=0.0):
    """Relative error, or None when both sides are below ``floor`` (a zero gradient).

    ``typical`` (random directions) keeps a projection that happens to be nearly
    orthogonal to the gradient from dividing by almost nothing.
    """
    scale = max(float(np.linalg.norm(num)), float(np.linalg.norm(ana)))
    if scale <= floor:
        return None
    return float(np.linalg.norm(num - ana)) / max(scale, typical)


def gradcheck(forward, backward, inputs, *, wrt=None, method="centred", eps=1e-6, rtol=1e-6, atol=None,
              directions=3, seed=0):
    """Compare ``backward`` with finite differences of ``forward``.

    Parameters
    ----------
    forward : callable
        ``forward(**inputs) -> out`` (an array).
    backward : callable
        ``backward(dout) -> dict`` mapping input names to dL/d(input), for the
        most recent ``forward`` call.
    inputs : dict of arrays
        The point at which to check, float64, any array library.
    wrt : list of str, optional
        The inputs to check; default every input for which ``backward``
        returns a gradient (entries that are None are skipped).
    method : {"centred", "random"}
    eps : float
        Step of the finite differences.
    rtol : float
        The pass threshold on the relative error.
    atol : float, optional
        Per-element size below which a gradient counts as zero; default the
        rounding floor of the differences (see the module docstring).
    directions : int
        Random directions per input (``method="random"``).
    seed : int
        Seeds ``dout`` and the directions.

    Returns
    -------
    GradcheckResult
        ``errors`` per input, ``max_error``, ``passed``; ``print`` it for a table.
    """
    if method not in ("centred", "random"):
        raise ValueError(f"method must be 'centred' or 'random', got {method!r}")
    if not isinstance(inputs, dict) or not inputs:
        raise TypeError("inputs must be a non-empty dict of name -> array")
    for name, value in inputs.items():
        if B.dtype_name(value.dtype) != "float64":
            raise TypeError(f"gradcheck needs float64 inputs; {name!r} is {B.dtype_name(value.dtype)}")
    out = forward(**inputs)
    dout = B.normal(tuple(out.shape), seed=seed, like=out, dtype=out.dtype)
    dout_host = B.to_numpy(dout)
    analytic = backward(dout)
    names = [n for n, v in analytic.items() if v is not None] if wrt is None else list(wrt)
    unknown = [n for n in names if n not in inputs or n not in analytic or analytic[n] is None]
    if unknown:
        raise ValueError(f"wrt names {unknown} are not both inputs and gradients returned by backward")
    if atol is None:
        atol = 64 * np.finfo(np.float64).eps * float(np.sum(np.abs(B.to_numpy(out) * dout_host))) / eps
    hosts = {n: B.to_numpy(inputs[n]).astype(np.float64, copy=True) for n in names}
    ana = {n: B.to_numpy(analytic[n]) for n in names}

    def loss(changed):
        args = dict(inputs)
        for n, h in changed.items():
            args[n] = B.asarray(h, like=inputs[n])
        return float(np.sum(B.to_numpy(forward(**args)) * dout_host))

    result = GradcheckResult(method=method, eps=eps, rtol=rtol)
    rng = np.random.default_rng(seed + 1)
    for n in names:
        base = hosts[n]
        if ana[n].shape != base.shape:
            raise ValueError(f"gradient for {n!r} has shape {ana[n].shape}, input has {base.shape}")
        if method == "centred":
            num = np.zeros(base.size)
            for k in range(base.size):
                step = np.zeros(base.size)
                step[k] = eps
                step = step.reshape(base.shape)
                num[k] = (loss({n: base + step}) - loss({n: base - step})) / (2 * eps)
            err = _rel(num.reshape(base.shape), ana[n], atol * np.sqrt(base.size))
        else:
            errs = []
            for _ in range(directions):
                v = rng.standard_normal(base.shape)
                v /= np.linalg.norm(v)
                num = (loss({n: base + eps * v}) - loss({n: base - eps * v})) / (2 * eps)
                projected = np.asarray(np.sum(ana[n] * v))
                typical = float(np.linalg.norm(ana[n])) / np.sqrt(base.size)  # |<g, v>| for a random unit v
                errs.append(_rel(np.asarray(num), projected, atol, typical))
            err = None if all(e is None for e in errs) else max(e for e in errs if e is not None)
        if err is None:
            result.zero.append(n)
        result.errors[n] = 0.0 if err is None else err
    forward(**inputs)  # leave any layer state as it was at the checked point
    return result


def layer_gradcheck(layer, x, *, wrt=None, **options):
    """:func:`gradcheck` of a layer object (``forward``, ``backward``, ``params``, ``grads``).

    Checks dL/dx and every parameter gradient (or those named in ``wrt``; ``"x"``
    names the input). The layer's parameters, buffers and batch counter are
    restored afterwards. ``options`` go to :func:`gradcheck`.
    """
    saved_params = dict(layer.params)
    saved_buffers = dict(getattr(layer, "buffers", {}))
    saved_count = getattr(layer, "num_batches_tracked", None)

    def forward(x, **params):
        layer.params.update(params)
        return layer.forward(x)

    def backward(dout):
        dx = layer.backward(dout)
        return {"x": dx, **layer.grads}

    try:
        return gradcheck(forward, backward, {"x": x, **layer.params}, wrt=wrt, **options)
    finally:
        layer.params.update(saved_params)
        if saved_buffers:
            layer.buffers.update(saved_buffers)
        if saved_count is not None:
            layer.num_batches_tracked = saved_count
