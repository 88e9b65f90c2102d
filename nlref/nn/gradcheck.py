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

**Kinks.** At a ReLU input of exactly 0, or a max-pool tie, the function has no derivative: its
left and right slopes differ, the centred difference is their mean, and a right backward, which
returns one of them, reads as wrong. Where the check fails, each failing element (centred) or
direction (random) is measured again with steps ``KINK_FACTOR`` (4), 16 and 64 times smaller,
watching the gap between the one-sided differences. Along a smooth function the gap shrinks with
the step (by that factor); across a kink at the point itself it stays; across a kink off the point
but within ``eps`` it vanishes once the step no longer reaches it. An element whose gap stays and
whose backward value lies between its one-sided slopes is *at a kink*; one whose gap vanishes has
a kink *within eps*, and its centred difference at the step where it vanished is kept. A smooth
function measured with too large a step is neither, and neither is a backward value outside the
one-sided slopes. A direction whose gap stays is at a kink whatever its projection: it may cross
several kinks at once, and then a right projection need not lie between its one-sided slopes.

By default (``kinks="report"``) this changes no verdict: a check that fails still fails, and the
result counts the failing elements or directions at a kink (``kinks``) and within eps of one
(``near_kinks``) and says so, as PyTorch's ``gradcheck`` fails there too. With ``kinks="skip"``
the elements at a kink are left out of the comparison, those within eps are compared at the
smaller step, and a direction at a kink is replaced by a fresh one (up to ``directions`` times);
an input with nothing left to compare is ``inconclusive``, and so is the check unless another
input failed.
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
    kinks: dict = field(default_factory=dict)
    near_kinks: dict = field(default_factory=dict)
    failing: dict = field(default_factory=dict)
    inconclusive: list = field(default_factory=list)
    kinks_rule: str = "report"

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_error <= self.rtol and not self.inconclusive

    @property
    def verdict(self) -> str:
        """``"passed"``, ``"FAILED"`` or ``"INCONCLUSIVE"`` (with ``kinks="skip"``: nothing failed, but
        some input had every element or direction at a kink, so nothing of it was compared)."""
        if self.max_error > self.rtol:
            return "FAILED"
        return "INCONCLUSIVE" if self.inconclusive else "passed"

    def __str__(self):
        width = max((len(k) for k in self.errors), default=4)
        head = f"gradcheck ({self.method}, eps={self.eps:g}, rtol={self.rtol:g}): {self.verdict}"
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
            lines.append(f"  {k:<{width}}  {v:.2e}{note}{self._kink_note(k)}")
        return "\n".join(lines)

    def _kink_note(self, name):
        """What the kinks did to input ``name``'s line ("" where there were none)."""
        unit = "element" if self.method == "centred" else "direction"

        def count(n):
            return f"{n} {unit}{'' if n == 1 else 's'}"

        at, near, failing = self.kinks.get(name, 0), self.near_kinks.get(name, 0), self.failing.get(name, 0)
        # one-sided: the left and right differences differ there, and (centred) the backward's value lies between
        between = "one-sided slopes differ" + (", the backward's value between them" if unit == "element" else "")
        if name in self.inconclusive:
            drawn = " drawn" if unit == "direction" else ""
            return f"  (not compared: every {unit}{drawn} is at a kink ({between}); check at another point)"
        notes = []
        if at and self.kinks_rule == "skip":
            notes.append(f"{count(at)} at a kink not compared ({between})")
        elif at:
            notes.append(f"{at} of {count(failing)} failing at a kink ({between}), where no derivative exists; "
                         "pass kinks='skip' to leave them out, or check away from kinks")
        if near and self.kinks_rule == "skip":
            notes.append(f"{count(near)} with a kink within eps compared at a smaller step")
        elif near:
            notes.append(f"{near} of {count(failing)} failing with a kink within eps, gone at a smaller step: "
                         "pass a smaller eps")
        return "".join(f"  ({n})" for n in notes)


#: How much larger the step is when a gradient below the rounding floor is measured again.
PROBE_FACTOR = 1e3
#: How much smaller the step is, at each of ``KINK_LEVELS`` levels, when a failing element or direction is
#: measured again for a kink.
KINK_FACTOR = 4.0
KINK_LEVELS = 3


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
              atol: float | None = None, directions: int = 3, seed: int = 0, kinks: str = "report") -> GradcheckResult:
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
    kinks : {"report", "skip"}
        Where a check fails at a kink of the function (a ReLU input of 0, a max-pool tie), no
        derivative exists there. ``"report"`` keeps the verdict and says which failing elements or
        directions are at a kink or within ``eps`` of one; ``"skip"`` leaves them out of the
        comparison (see the module docstring).

    Returns
    -------
    GradcheckResult
        ``errors`` per input, ``max_error``, ``passed``; ``print`` it for a table.
    """
    if method not in ("centred", "random"):
        raise ValueError(f"method must be 'centred' or 'random', got {method!r}")
    _check_settings(eps=eps, rtol=rtol, atol=atol, directions=directions, seed=seed, wrt=wrt)
    if kinks not in ("report", "skip"):
        raise ValueError(f"kinks must be 'report' or 'skip', got {kinks!r}")
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

    result = GradcheckResult(method=method, eps=eps, rtol=rtol, kinks_rule=kinks)
    seen = _Kinks(kinks == "skip")
    for n in names:
        if ana[n].shape != hosts[n].shape:
            raise ValueError(f"gradient for {n!r} has shape {ana[n].shape}, input has {hosts[n].shape}")
        if hosts[n].size == 0:  # an empty input has nothing to check, and must not read as passed
            raise ValueError(f"input {n!r} has shape {hosts[n].shape}: no element to check")
        _check_step(n, hosts[n], eps)
    rng, probe_rng = np.random.default_rng(seed + 1), np.random.default_rng(seed + 2)
    measure = _centred if method == "centred" else _random
    for n in names:
        err = measure(loss, n, hosts[n], ana[n], eps, atol, directions, rng, rtol, seen)
        if err is None and not given_atol:
            # Below the floor a gradient that is zero and one too small for this step look alike; a step
            # PROBE_FACTOR times larger lifts a real one above its floor (rounding noise does not grow with it).
            err = measure(loss, n, hosts[n], ana[n], eps * PROBE_FACTOR, atol / PROBE_FACTOR, directions, probe_rng,
                          rtol, seen)
            if err is not None:
                result.coarse.append(n)
        if err is _AT_KINKS:
            result.inconclusive.append(n)
            err = 0.0
        elif err is None:
            result.zero.append(n)
        result.errors[n] = 0.0 if err is None else err
    if seen.at or seen.near:  # the failing count is read only beside them
        result.kinks, result.near_kinks, result.failing = dict(seen.at), dict(seen.near), dict(seen.failing)
    forward(**inputs)  # leave any layer state as it was at the checked point
    return result


#: What a measure returns when every element or direction of an input is at a kink (nothing compared).
_AT_KINKS = object()


class _Kinks:
    """What the measures found at kinks, per input: ``at`` a kink, ``near`` (within eps); ``skip``: whether
    those are left out of the comparison (else only counted)."""

    def __init__(self, skip):
        self.skip, self.at, self.near, self.failing = skip, {}, {}, {}

    def count(self, kind, name):
        """One failing element or direction of input ``name``, of ``kind`` "kink", "near" or None."""
        self.failing[name] = self.failing.get(name, 0) + 1
        if kind is not None:
            table = self.at if kind == "kink" else self.near
            table[name] = table.get(name, 0) + 1


def _centred(loss, n, base, ana, eps, atol, directions, rng, rtol, kinks):
    """The relative error of ``ana`` against centred differences, one element at a time (None: a zero gradient;
    ``_AT_KINKS``: every element at a kink, with ``kinks.skip``). Failing elements at or near a kink are
    counted in ``kinks``."""
    plus, minus = np.zeros(base.size), np.zeros(base.size)
    for k in range(base.size):
        plus[k], minus[k] = (loss({n: base + sign * _unit_step(base, k, eps)}) for sign in (1, -1))
    num = (plus - minus) / (2 * eps)
    floor = atol * np.sqrt(base.size)
    err = _rel(num.reshape(base.shape), ana, floor)
    if err is None or err <= rtol:
        return err
    flat_ana, at_kink, smaller = ana.reshape(-1), np.zeros(base.size, dtype=bool), num.copy()
    middle = loss({n: base})
    for k in np.flatnonzero(np.abs(num - flat_ana) > rtol * np.maximum(np.abs(num), np.abs(flat_ana))):
        def at(h, k=k):
            return tuple(loss({n: base + sign * _unit_step(base, k, h)}) for sign in (1, -1))

        kind, value = _kink(at, plus[k], minus[k], middle, eps, flat_ana[k], atol)
        kinks.count(kind, n)
        if kind == "kink":
            at_kink[k] = True
        elif kind == "near":
            smaller[k] = value
    if not kinks.skip:
        return err
    kept = ~at_kink
    if not kept.any():
        return _AT_KINKS
    return _rel(smaller[kept], flat_ana[kept], atol * np.sqrt(kept.sum()))


def _unit_step(base, k, eps):
    step = np.zeros(base.size)
    step[k] = eps
    return step.reshape(base.shape)


def _kink(at, plus, minus, middle, eps, value, atol):
    """Where the centred difference at ``eps`` disagrees with the backward's ``value``: ``("kink", None)`` if
    the function has a kink at the point and ``value`` is a one-sided slope (between the two; any value when
    ``value`` is None); ``("near", d)`` if the kink lies off the point, within ``eps``, ``d`` the centred difference at a step that no longer
    reaches it; ``(None, None)`` otherwise (a smooth function, or a wrong value). ``at(h)`` gives the loss at
    ``+h`` and ``-h`` along the element or direction; ``plus``, ``minus`` and ``middle`` are the losses at
    ``+eps``, ``-eps`` and the point.

    One-sided differences have a gap ``right - left`` of about ``h f''`` along a smooth function, shrinking with
    the step ``h``; across a kink at the point it is the jump of the slope at every step, and across a kink at
    a distance from the point it vanishes once the step is shorter than that distance. Each level divides
    the step by ``KINK_FACTOR`` and asks which of the three the gap does.
    """
    step, gap = eps, abs(plus + minus - 2 * middle) / eps
    for _ in range(KINK_LEVELS):
        if gap <= 4 * atol * eps / step:  # within the one-sided differences' rounding at this step
            return None, None
        step /= KINK_FACTOR
        plus_s, minus_s = at(step)
        right, left = (plus_s - middle) / step, (middle - minus_s) / step
        gap_s = abs(right - left)
        if gap_s >= (1 + 1 / KINK_FACTOR) / 2 * gap:  # the gap stays: a kink at the point
            slack = 0.01 * gap_s + 4 * atol * eps / step
            if value is None or min(right, left) - slack <= value <= max(right, left) + slack:
                return "kink", None
            return None, None
        if gap_s <= 0.1 * gap / KINK_FACTOR:  # gone, far below a smooth function's gap / KINK_FACTOR
            return "near", (plus_s - minus_s) / (2 * step)
        gap = gap_s
    return None, None


def _random(loss, n, base, ana, eps, atol, directions, rng, rtol, kinks):
    """The worst relative error of ``ana`` projected on random unit directions (None: a zero gradient;
    ``_AT_KINKS``: every direction drawn at a kink, with ``kinks.skip``). Failing directions at or near a
    kink are counted in ``kinks``; with ``kinks.skip`` one at a kink is replaced by a fresh one, up to
    ``directions`` times in all."""
    errs, middle, spare = [], None, directions
    typical = _norm(ana) / np.sqrt(base.size)  # |<g, v>| for a random unit v
    while len(errs) < directions:
        v = rng.standard_normal(base.shape)
        v /= np.linalg.norm(v)
        plus, minus = loss({n: base + eps * v}), loss({n: base - eps * v})
        projected = np.asarray(np.sum(ana * v))
        err = _rel(np.asarray((plus - minus) / (2 * eps)), projected, atol, typical)
        if err is not None and err > rtol:
            middle = loss({n: base}) if middle is None else middle
            # value None: a direction may cross several kinks at once, and then a right projection need not lie
            # between its two one-sided slopes (each kink adds its jump on one side only)
            kind, value = _kink(lambda h, v=v: (loss({n: base + h * v}), loss({n: base - h * v})), plus, minus,
                                middle, eps, None, atol)
            kinks.count(kind, n)
            if kinks.skip and kind == "kink":
                if spare == 0:
                    break
                spare -= 1
                continue
            if kinks.skip and kind == "near":
                err = _rel(np.asarray(value), projected, atol, typical)
        errs.append(err)
    if not errs:
        return _AT_KINKS
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
