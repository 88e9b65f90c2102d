"""Optimisers and the learning-rate schedule, written out (PyTorch's update rules).

:class:`SGD` is the paper's optimiser (momentum 0.9, weight decay 1e-4, none on
batch-norm parameters and biases). :class:`Adam` is offered because, on the
miniature task of :mod:`nlref.data.sprites`, SGD does not find the relation
within a 5-minute budget while Adam does (see ``docs/training.md``).
:class:`StepSchedule` is the paper's schedule scaled down: the learning rate is
divided by 10 at fixed fractions of training.

An optimiser works on any object with ``params`` / ``grads`` dicts (same keys),
``set_param(key, value)`` and ``no_decay(key)`` -- a
:class:`~nlref.nn.models.VideoNet`. Updates make new arrays and hand them to
``set_param``, so they work for every array library.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import backend as B
from . import engine
from ._state import real_host, whole_count

__all__ = ["SGD", "Adam", "StepSchedule"]


def _number(name, value, *, low=0.0, high=math.inf, low_open=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value < high
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high})"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


class StepSchedule:
    """``lr(step) = base_lr * 0.1 ** (number of milestones passed)``, with an optional linear warm-up.

    Parameters
    ----------
    base_lr : float
    total_steps : int
        Length of training in optimiser steps.
    milestones : tuple of float
        Fractions of ``total_steps`` at which the rate is divided by ``1/factor``.
        The paper (Kinetics, 400k iterations) divides by 10 at 150k and 300k,
        i.e. at 0.375 and 0.75; nlref's default ``(0.6, 0.85)`` suits short runs.
    factor : float
        0.1, the paper's.
    warmup : int
        Steps of linear warm-up from ``base_lr / warmup`` (0: none).
    """

    def __init__(self, base_lr: float, total_steps: int, *, milestones: Sequence[float] = (0.6, 0.85),
                 factor: float = 0.1, warmup: int = 0) -> None:
        self.base_lr = _number("base_lr", base_lr, low=0.0, low_open=True)
        if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        self.total_steps = int(total_steps)
        for m in milestones:
            _number("milestones", m, low=0.0, high=1.0, low_open=True)
        self.milestones = tuple(sorted(float(m) for m in milestones))
        self.factor = _number("factor", factor, low=0.0, high=1.0, low_open=True)
        if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
        self.warmup = int(warmup)
        # floor(m * total_steps), but 0.7 * 90 is 62.99999999999999 in floating point: round first
        self.milestone_steps = tuple(math.floor(round(m * self.total_steps, 9)) for m in self.milestones)

    def __call__(self, step):
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        passed = sum(step >= s for s in self.milestone_steps)
        lr = self.base_lr * self.factor ** passed
        if step < self.warmup:
            lr *= (step + 1) / self.warmup
        return lr


class _Optimiser:
    def __init__(self, model, *, lr, weight_decay):
        if not all(hasattr(model, a) for a in ("params", "grads", "set_param", "no_decay")):
            raise TypeError("model must have params, grads, set_param and no_decay (a VideoNet)")
        self.model = model
        self.lr = _number("lr", lr, low=0.0, low_open=True)
        self.weight_decay = _number("weight_decay", weight_decay)
        self.state = {}
        self.steps = 0

    @staticmethod
    def _check_gradient(key, g):
        if g is None:
            raise RuntimeError(f"no gradient for {key!r}: call model.backward before step()")

    def _gradient(self, key, p, g):
        self._check_gradient(key, g)
        if self.weight_decay and not self.model.no_decay(key):
            g = g + self.weight_decay * p
        return g

    def state_dict(self):
        """Host copies of the optimiser state (for checkpoints)."""
        return {"steps": self.steps, "state": {k: {n: np.array(B.to_numpy(a)) for n, a in slots.items()}
                                               for k, slots in self.state.items()}}

    def _step_lr(self, lr):
        """The rate of one step: the optimiser's own, or ``lr`` checked as the constructor checks it."""
        return self.lr if lr is None else _number("lr", lr, low=0.0, low_open=True)

    def load_state_dict(self, state):
        """Load ``state`` (from :meth:`state_dict`), every entry checked before anything changes."""
        if not isinstance(state, dict) or set(state) != {"steps", "state"} or not isinstance(state["state"], dict):
            raise ValueError("optimiser state must be a dict with 'steps' and 'state' (from state_dict())")
        steps = whole_count("optimiser state 'steps'", state["steps"])
        params = self.model.params
        unknown = sorted(set(state["state"]) - set(params))
        if unknown:
            raise ValueError(f"optimiser state names parameters this model lacks: {unknown[:5]}")
        loaded = {}
        for key, slots in state["state"].items():
            loaded[key] = {}
            if not isinstance(slots, dict) or set(slots) != set(self._SLOTS):
                held = sorted(slots) if isinstance(slots, dict) else type(slots).__name__
                raise ValueError(f"optimiser state {key!r} holds {held}, but {type(self).__name__} "
                                 f"keeps {sorted(self._SLOTS)}")
            for name, host in slots.items():
                # a checked copy (the caller may go on using its arrays), finite in the parameters' dtype
                host = real_host(f"optimiser state {key!r}/{name}", host, B.dtype_name(params[key].dtype),
                                 tuple(params[key].shape))
                if name == "v" and np.any(host < 0):
                    raise ValueError(f"optimiser state {key!r}/v holds negative values; Adam's second moment is >= 0")
                loaded[key][name] = B.asarray(host, like=params[key], dtype=params[key].dtype)
        # after a step every parameter has its slots (SGD without momentum keeps none); before one, none has
        expected = set(params) if steps and self._keeps_state() else set()
        if set(loaded) != expected:
            missing = sorted(expected - set(loaded)) or sorted(loaded)
            raise ValueError(f"optimiser state after {steps} steps must hold {'every' if expected else 'no'} "
                             f"parameter's slots; it {'lacks' if expected else 'holds'} {missing[:5]}")
        self.state, self.steps = loaded, steps
        return self


class SGD(_Optimiser):
    r"""Stochastic gradient descent with momentum: ``torch.optim.SGD`` with two parameter groups.

    It equals ``torch.optim.SGD([{"params": decayed, "weight_decay": weight_decay},
    {"params": others, "weight_decay": 0.0}], lr=lr, momentum=momentum)``, where ``others``
    are the parameters for which ``model.no_decay(key)`` is true (batch-norm gamma and beta,
    and biases) and ``decayed`` are the rest (the convolution and linear weights);
    ``dampening=0``, ``nesterov=False``. ``tests/nn/test_optim.py`` holds it to that
    configuration (1e-12 after several steps). A single-group ``torch.optim.SGD(...,
    weight_decay=...)`` would also decay the biases and BN parameters, and differs.

    .. math::
        g \leftarrow \nabla_p L + \lambda p \ (\text{not for BN parameters and biases}), \quad
        v \leftarrow \mu v + g \ (v = g \text{ at the first step}), \quad
        p \leftarrow p - \eta v
    """

    _SLOTS = ("momentum",)

    def _keeps_state(self):
        return self.momentum > 0

    def __init__(self, model: Any, *, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4) -> None:
        super().__init__(model, lr=lr, weight_decay=weight_decay)
        self.momentum = _number("momentum", momentum, high=1.0)

    def step(self, lr=None):
        lr = self._step_lr(lr)
        grads = self.model.grads
        for key, p in self.model.params.items():
            g = self._gradient(key, p, grads.get(key))
            if self.momentum:
                v = g if key not in self.state else self.momentum * self.state[key]["momentum"] + g
                self.state[key] = {"momentum": v}
                g = v
            self.model.set_param(key, p - lr * g)
        self.steps += 1


class Adam(_Optimiser):
    r"""Adam (Kingma & Ba): ``torch.optim.Adam`` with two parameter groups.

    It equals ``torch.optim.Adam([{"params": decayed, "weight_decay": weight_decay},
    {"params": others, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)``, where ``others``
    are the parameters for which ``model.no_decay(key)`` is true (batch-norm gamma and beta,
    and biases) and ``decayed`` are the rest; the weight decay is L2, added to the gradient
    (``amsgrad=False``; not ``torch.optim.AdamW``'s decoupled decay). ``tests/nn/test_optim.py``
    holds it to that configuration (1e-12 after several steps). A single-group
    ``torch.optim.Adam(..., weight_decay=...)`` would also decay the biases and BN
    parameters, and differs.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
        p \leftarrow p - \eta\,\frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}
    """

    _SLOTS = ("m", "v")

    def _keeps_state(self):
        return True

    def __init__(self, model: Any, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(model, lr=lr, weight_decay=weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        self.betas = (_number("betas[0]", betas[0], high=1.0), _number("betas[1]", betas[1], high=1.0))
        self.eps = _number("eps", eps, low=0.0, low_open=True)
        self._flat = None

    def step(self, lr=None):
        lr = self._step_lr(lr)
        params, grads = self.model.params, self.model.grads
        if engine.flat_adam_applies(params):
            engine.adam_step_flat(self, params, grads, lr)  # the same update on one flat vector: fewer calls
        else:
            self._step_each(params, grads, lr)
        self.steps += 1

    def _step_each(self, params, grads, lr):
        """Parameter by parameter, with new arrays (every array library)."""
        b1, b2 = self.betas
        t = self.steps + 1
        for key, p in params.items():
            xp = B.array_namespace(p)
            g = self._gradient(key, p, grads.get(key))
            slots = self.state.get(key) or {"m": xp.zeros_like(p), "v": xp.zeros_like(p)}
            m = b1 * slots["m"] + (1 - b1) * g
            v = b2 * slots["v"] + (1 - b2) * (g * g)
            self.state[key] = {"m": m, "v": v}
            step = (lr / (1 - b1 ** t)) * m / (xp.sqrt(v / (1 - b2 ** t)) + self.eps)
            self.model.set_param(key, p - step)
