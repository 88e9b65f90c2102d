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
is listed in ``zero``. A gradient that is not zero but too small for the step looks
the same (at inputs of 1e8, the differences of ``x ** 2`` sink below the floor, and a
wrong or zero backward would pass), so such an input is measured again with a step
``PROBE_FACTOR`` times larger, whose floor is that much lower while rounding noise stays
where it was: a real gradient rises above it and is compared (the input is then listed
in ``coarse``, and the check says to pass a larger ``eps``); a zero one stays below.
Checks run in float64: with float32 the rounding of ``L`` swamps the differences.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._typing import Array
from .. import backend as B
from ._shapes import check_int, check_number

__all__ = ["gradcheck", "layer_gradcheck", "GradcheckResult"]


@dataclass
class GradcheckResult:
    """Relative error per checked input, with the settings that produced it.

    ``zero`` lists the inputs whose gradients are below the rounding floor at both steps
    (reported as error 0); ``coarse`` those below it at ``eps`` only, compared at the
    larger step (see the module docstring). ``passed`` covers a zero gradient only as
    far as the backward gives zero too, which a backward wrong by any factor also
    does, so the printed result says how many were zero and names them.
    """

    errors: dict = field(default_factory=dict)
    zero: list = field(default_factory=list)
    coarse: list = field(default_factory=list)
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
        head = f"gradcheck ({self.method}, eps={self.eps:g}, rtol={self.rtol:g}): {'passed' if self.passed else 'FAILED'}"
        if self.zero:  # "passed" must not read as covering them: a backward wrong by any factor gives 0 there too
            head += (f"{', but' if self.passed else ';'} {len(self.zero)} of {len(self.errors)} gradients are zero "
                     f"here and were checked only as zero: {', '.join(self.zero)} (a backward wrong by any factor "
                     "passes there; where they are zero only at this point, as behind a new block's BN gamma = 0, "
                     "check at other values)")
        lines = [head]
        for k, v in self.errors.items():
            note = "  (zero gradient)" if k in self.zero else ("" if v <= self.rtol else "  <-- too large")
            if k in self.coarse:
                note += (f"  (below the rounding floor at eps={self.eps:g}: measured with a step "
                         f"{PROBE_FACTOR:g} times larger; pass a larger eps)")
            lines.append(f"  {k:<{width}}  {v:.2e}{note}")
        return "\n".join(lines)


#: How much larger the step is when a gradient below the rounding floor is measured again.
PROBE_FACTOR = 1e3


def _norm(v):
    """The Euclidean norm; scaled first where the squares underflow (NumPy gives 0 for values of 1e-200)."""
    norm = float(np.linalg.norm(v))
    if norm == 0:
        peak = float(np.max(np.abs(v), initial=0.0))
        if peak > 0:
            return peak * float(np.linalg.norm(np.asarray(v) / peak))
    return norm


def _rel(num, ana, floor, typical=0.0):
    """Relative error, or None when both sides are below ``floor`` (a zero gradient).

    ``typical`` (random directions) keeps a projection that happens to be nearly
    orthogonal to the gradient from dividing by almost nothing.
    """
    scale = max(_norm(num), _norm(ana))
    if scale <= floor:
        return None
    return _norm(num - ana) / max(scale, typical)


def gradcheck(forward: Callable[..., Array], backward: Callable[[Array], dict], inputs: dict[str, Array], *,
              wrt: Sequence[str] | None = None, method: str = "centred", eps: float = 1e-6, rtol: float = 1e-6,
              atol: float | None = None, directions: int = 3, seed: int = 0) -> GradcheckResult:
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
    _check_settings(eps=eps, rtol=rtol, atol=atol, directions=directions, seed=seed, wrt=wrt)
    if not isinstance(inputs, dict) or not inputs:
        raise TypeError("inputs must be a non-empty dict of name -> array")
    for name, value in inputs.items():
        B.array_namespace(value, names=[name])  # a clear TypeError for a list or a scalar
        if B.dtype_name(value.dtype) != "float64":
            raise TypeError(f"gradcheck needs float64 inputs; {name!r} is {B.dtype_name(value.dtype)}")
    out = forward(**inputs)
    B.array_namespace(out, names=["forward(**inputs)"])  # a clear TypeError for a float or a list
    dout = B.normal(tuple(out.shape), seed=seed, like=out, dtype=out.dtype)
    dout_host = B.to_numpy(dout)
    analytic = backward(dout)
    if not isinstance(analytic, dict):
        raise TypeError(f"backward(dout) must return a dict of input name -> gradient, got {type(analytic).__name__}")
    names = [n for n, v in analytic.items() if v is not None] if wrt is None else list(wrt)
    if not names:  # nothing checked must not read as passed
        raise ValueError("no gradient to check: backward(dout) returned no gradient for any input"
                         if wrt is None else "wrt is empty: name at least one input to check")
    unknown = [n for n in names if n not in inputs or n not in analytic or analytic[n] is None]
    if unknown:
        raise ValueError(f"wrt names {unknown} are not both inputs and gradients returned by backward")
    given_atol = atol is not None
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
    for n in names:
        if ana[n].shape != hosts[n].shape:
            raise ValueError(f"gradient for {n!r} has shape {ana[n].shape}, input has {hosts[n].shape}")
        if hosts[n].size == 0:  # an empty input has nothing to check, and must not read as passed
            raise ValueError(f"input {n!r} has shape {hosts[n].shape}: no element to check")
        _check_step(n, hosts[n], eps)
    rng, probe_rng = np.random.default_rng(seed + 1), np.random.default_rng(seed + 2)
    measure = _centred if method == "centred" else _random
    for n in names:
        err = measure(loss, n, hosts[n], ana[n], eps, atol, directions, rng)
        if err is None and not given_atol:
            # Below the floor a gradient that is zero and one too small for this step look alike; a step
            # PROBE_FACTOR times larger lifts a real one above its floor (rounding noise does not grow with it).
            err = measure(loss, n, hosts[n], ana[n], eps * PROBE_FACTOR, atol / PROBE_FACTOR, directions, probe_rng)
            if err is not None:
                result.coarse.append(n)
        if err is None:
            result.zero.append(n)
        result.errors[n] = 0.0 if err is None else err
    forward(**inputs)  # leave any layer state as it was at the checked point
    return result


def _centred(loss, n, base, ana, eps, atol, directions, rng):
    """The relative error of ``ana`` against centred differences, one element at a time (None: a zero gradient)."""
    num = np.zeros(base.size)
    for k in range(base.size):
        step = np.zeros(base.size)
        step[k] = eps
        step = step.reshape(base.shape)
        num[k] = (loss({n: base + step}) - loss({n: base - step})) / (2 * eps)
    return _rel(num.reshape(base.shape), ana, atol * np.sqrt(base.size))


def _random(loss, n, base, ana, eps, atol, directions, rng):
    """The worst relative error of ``ana`` projected on random unit directions (None: a zero gradient)."""
    errs = []
    for _ in range(directions):
        v = rng.standard_normal(base.shape)
        v /= np.linalg.norm(v)
        num = (loss({n: base + eps * v}) - loss({n: base - eps * v})) / (2 * eps)
        projected = np.asarray(np.sum(ana * v))
        typical = _norm(ana) / np.sqrt(base.size)  # |<g, v>| for a random unit v
        errs.append(_rel(np.asarray(num), projected, atol, typical))
    return None if all(e is None for e in errs) else max(e for e in errs if e is not None)


def _check_step(name, x, eps):
    """ValueError where ``x + eps`` rounds back to ``x`` for some element: no step is taken there, and
    the differences (0) would read as a wrong backward. At 1e12 the float64 values are 1.2e-4 apart."""
    peak = float(np.max(np.abs(x), initial=0.0))
    if np.any(np.isfinite(x) & (x + eps == x - eps)):
        raise ValueError(f"eps={eps:g} is below the spacing of the float64 values of input {name!r} ({name} reaches "
                         f"{peak:.3g}, where neighbouring floats are {float(np.spacing(peak)):.3g} apart): x + eps "
                         f"rounds back to x and no step is taken; pass eps of at least {float(np.spacing(peak)):.2g} "
                         f"(about 1e-6 times {name}'s scale is a good step), or check at a smaller scale")


def _check_settings(*, eps, rtol, atol, directions, seed, wrt):
    """The checks' settings, refused with the argument named when they could not check anything."""
    check_number("eps", eps, low=0, strict=True)
    check_number("rtol", rtol, low=0)
    if atol is not None:
        check_number("atol", atol, low=0)
    check_int("directions", directions, low=1)
    check_int("seed", seed, low=0)
    if isinstance(wrt, str):
        raise TypeError(f"wrt must be a list of input names, not a string: wrt=[{wrt!r}]")


def _parameter_slots(layer):
    """``{name: (get, set, grad)}`` for every parameter of ``layer``, reached the way the layer allows.

    * A layer with ``set_param`` (a :class:`~nlref.nn.models.VideoNet`, whose ``params`` is a
      fresh dict on every access): read through ``params``, written through ``set_param``.
    * A composite layer (``children()`` not empty: ``ConvBN``, ``ResidualBlock``): its own
      parameters and those of every descendant, by dotted name, each written into its owner's
      ``params`` dict.
    * Any other layer: its ``params`` dict, which must be the same dict on every access
      (else a perturbation would never reach the layer, and the check is refused).
    """
    if callable(getattr(layer, "set_param", None)):
        return {name: (lambda n=name: layer.params[n], lambda v, n=name: layer.set_param(n, v),
                       lambda n=name: layer.grads.get(n))
                for name in layer.params}
    slots = {}

    def visit(prefix, node):
        params = node.params
        if params is not node.params:
            raise TypeError(f"layer_gradcheck cannot perturb {type(node).__name__}'s parameters: its params "
                            "is a new dict on every access and it has no set_param(key, value)")
        for key in params:
            slots[prefix + key] = (lambda d=params, k=key: d[k], lambda v, d=params, k=key: d.__setitem__(k, v),
                                   lambda o=node, k=key: (o.grads or {}).get(k))
        children = node.children() if callable(getattr(node, "children", None)) else []
        for name, child in children:
            visit(f"{prefix}{name}.", child)

    visit("", layer)
    return slots


def _leaves(layer):
    """``layer`` and its descendants (through ``children()``)."""
    out = [layer]
    children = layer.children() if callable(getattr(layer, "children", None)) else []
    for _, child in children:
        out.extend(_leaves(child))
    return out


def _copy(a):
    return B.array_namespace(a).asarray(a, copy=True)


def _save_state(layer):
    """What to restore after the check: the state dict where the layer has one, else copies of
    every node's parameters, buffers and batch counter."""
    if callable(getattr(layer, "state_dict", None)) and callable(getattr(layer, "load_state_dict", None)):
        # the counter apart: a state dict in nlref's layout leaves it out
        return ("state_dict", (layer.state_dict(), getattr(layer, "num_batches_tracked", None)))
    nodes = []
    for node in _leaves(layer):
        nodes.append((node, {k: _copy(v) for k, v in node.params.items()},
                      {k: _copy(v) for k, v in getattr(node, "buffers", {}).items()},
                      getattr(node, "num_batches_tracked", None)))
    return ("nodes", nodes)


def _restore_state(layer, saved):
    kind, state = saved
    if kind == "state_dict":
        state, counter = state  # as saved before the check (it counts every forward the check made)
        layer.load_state_dict(state)
        if counter is not None:
            layer.num_batches_tracked = counter
        return
    for node, params, buffers, counter in state:
        node.params.update(params)
        if buffers:
            node.buffers.update(buffers)
        if counter is not None:
            node.num_batches_tracked = counter


def layer_gradcheck(layer: Any, x: Array, *, wrt: Sequence[str] | None = None, **options: Any) -> GradcheckResult:
    """:func:`gradcheck` of a layer object (``forward``, ``backward``, ``params``, ``grads``).

    Checks dL/dx and every parameter gradient (or those named in ``wrt``; ``"x"``
    names the input). Parameters are perturbed the way the layer is updated: through its
    ``set_param(key, value)`` where it has one (a :class:`~nlref.nn.models.VideoNet`),
    otherwise in its ``params`` dict; a composite layer's parameters are those of its
    children (``children()``, e.g. ``ConvBN`` and ``ResidualBlock``), by dotted name
    (``"conv.weight"``, ``"conv1.bn.gamma"``). A layer whose parameters cannot be reached
    is refused with a TypeError, and a parameter the backward pass leaves without a
    gradient is an error: nothing is reported as passed without being checked. A
    network's dropout mask is held fixed during the check (``dropout_seed``).

    The layer's parameters, running statistics and batch counter are restored afterwards:
    through ``state_dict()`` / ``load_state_dict()`` where the layer has them, otherwise
    from copies. ``options`` go to :func:`gradcheck`.
    """
    B.array_namespace(x, names=["x"])  # a clear TypeError for a list (convert it first)
    missing = [a for a in ("forward", "backward", "params", "grads") if not hasattr(layer, a)]
    if missing:
        raise TypeError(f"layer must be a layer object with forward, backward, params and grads; "
                        f"{type(layer).__name__} has no {', '.join(missing)}")
    if isinstance(wrt, str):
        raise TypeError(f"wrt must be a list of names, not a string: wrt=[{wrt!r}]")
    slots = _parameter_slots(layer)
    if "x" in slots:
        raise ValueError("layer_gradcheck names the input 'x': the layer has a parameter of that name")
    if wrt is None:
        wrt = ["x", *slots]
    saved = _save_state(layer)
    forward_options = {}
    try:
        if "dropout_seed" in inspect.signature(layer.forward).parameters:
            forward_options["dropout_seed"] = 0  # one dropout mask for every evaluation
    except (TypeError, ValueError):
        pass

    def forward(x, **params):
        for name, value in params.items():
            slots[name][1](value)
        return layer.forward(x, **forward_options)

    def backward(dout):
        dx = layer.backward(dout)
        grads = {"x": dx}
        for name, (_, _, grad) in slots.items():
            g = grad()
            if g is None and name in wrt:
                raise ValueError(f"{type(layer).__name__}.backward left no gradient for parameter {name!r}: "
                                 "it cannot be checked")
            grads[name] = g
        if dx is None and "x" in wrt:
            raise ValueError(f"{type(layer).__name__}.backward returned no gradient for the input x")
        return grads

    try:
        inputs = {"x": x, **{name: get() for name, (get, _, _) in slots.items()}}
        return gradcheck(forward, backward, inputs, wrt=list(wrt), **options)
    finally:
        _restore_state(layer, saved)
