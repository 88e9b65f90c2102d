"""Adam's update on all parameters at once, as one flat vector (NumPy and CuPy).

:meth:`nlref.nn.optim.Adam.step` writes the update parameter by parameter, as its
equation reads; where the library writes into existing arrays it calls
:func:`adam_step_flat` instead. About 60 small arrays cost 15 library calls each when
updated one by one; flattened, a step is a dozen calls, the same arithmetic in the same
order (so the same numbers to the bit), with one scratch buffer (part of the per-call
work of ``docs/benchmarks.md``, "One flat Adam update").
"""

from __future__ import annotations

import math

from ... import backend as B


def flat_adam_applies(params):
    """True when every parameter has one dtype and the library writes in place (NumPy, CuPy)."""
    dtype = next(iter(params.values())).dtype
    return all(p.dtype == dtype for p in params.values()) and B.supports_out(B.array_namespace(*params.values()))


def adam_step_flat(opt, params, grads, lr):
    """One Adam step of the optimiser ``opt`` (an :class:`nlref.nn.optim.Adam`) on all parameters at once.

    The moments live in two flat buffers, and ``opt.state`` holds views of them, so
    checkpoints see the usual layout.
    """
    b1, b2 = opt.betas
    t = opt.steps + 1
    keys = list(params)
    for key in keys:
        opt._check_gradient(key, grads.get(key))
    flat = opt._flat
    if flat is None or flat["keys"] != keys or not _views_hold_state(opt, flat):
        flat = opt._flat = _flatten(opt, params)
    nat = B.native_namespace(B.array_namespace(*params.values()))
    g = nat.concatenate([grads[k].reshape(-1) for k in flat["order"]])
    p = nat.concatenate([params[k].reshape(-1) for k in flat["order"]])  # the new parameters' storage
    m, v, tmp = flat["m"], flat["v"], flat["tmp"]
    if opt.weight_decay:  # the decayed parameters come first
        decayed = slice(0, flat["decayed"])
        g[decayed] += nat.multiply(p[decayed], opt.weight_decay, out=tmp[decayed])
    m *= b1
    m += nat.multiply(g, 1 - b1, out=tmp)
    v *= b2
    v += nat.multiply(nat.multiply(g, g, out=tmp), 1 - b2, out=tmp)
    denominator = nat.add(nat.sqrt(nat.divide(v, 1 - b2 ** t, out=tmp), out=tmp), opt.eps, out=tmp)
    p -= nat.divide(nat.multiply(m, lr / (1 - b1 ** t), out=g), denominator, out=g)
    for key, (start, stop, shape) in flat["spans"].items():
        opt.model.set_param(key, p[start:stop].reshape(shape))


def _views_hold_state(opt, flat):
    """Whether ``opt.state``'s moments are still the views of ``flat``'s buffers that :func:`_flatten` made.

    Not after :meth:`~nlref.nn.optim.Adam.load_state_dict` (new arrays), nor in a copy
    (``copy.deepcopy``, ``pickle``), where every view became an array of its own (its ``base``
    is gone): the copy's state would then keep the moments of the step it was copied at while
    its flat buffers moved on.
    """
    for key, (m, v, m_base, v_base) in flat["views"].items():
        slots = opt.state.get(key, {})
        if slots.get("m") is not m or slots.get("v") is not v or m.base is not m_base or v.base is not v_base:
            return False
    return True


def _flatten(opt, params):
    """Flat moment buffers (filled from ``opt.state`` where it has them) and the views ``opt.state`` keeps."""
    nat = B.native_namespace(B.array_namespace(*params.values()))
    first = next(iter(params.values()))
    order = sorted(params, key=opt.model.no_decay)  # weight-decayed parameters first (a stable sort)
    spans, start, decayed = {}, 0, 0
    for key in order:
        spans[key] = (start, start + math.prod(params[key].shape), tuple(params[key].shape))
        start += math.prod(params[key].shape)
        decayed = start if not opt.model.no_decay(key) else decayed
    flat = {"keys": list(params), "order": order, "spans": spans, "views": {}, "decayed": decayed,
            "m": nat.zeros(start, dtype=first.dtype), "v": nat.zeros(start, dtype=first.dtype),
            "tmp": nat.empty(start, dtype=first.dtype)}
    for key in params:  # state in the parameters' order, as the per-parameter update keeps it
        lo, hi, shape = spans[key]
        slots = {}
        for name in ("m", "v"):
            view = nat.reshape(flat[name][lo:hi], shape)
            if key in opt.state:
                view[...] = opt.state[key][name]
            slots[name] = view
        opt.state[key] = slots
        flat["views"][key] = (slots["m"], slots["v"], slots["m"].base, slots["v"].base)
    return flat
