"""Use nlref as an oracle for a PyTorch non-local block: :func:`compare_block`.

Given a peer's module (AlexHex7's port, mmcv's ``NonLocal1d/2d/3d``, SlowFast's
``Nonlocal``, timm's ``NonLocalAttn``, or any module with one of their weight
layouts) and an input, :func:`compare_block` reads the module's configuration
and weights, builds the :class:`~nlref.nn.NonLocalBlock` that computes the same
function, runs both forward and backward in float64 and reports the largest
absolute and relative differences of everything the two compute: the output,
``dx``, every parameter gradient and BN's running statistics. PyTorch is needed
only here (imported when the function runs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._typing import Array
from .. import backend as B
from .block import LAYOUTS, NonLocalBlock
from .nonlocal_op import MODES

__all__ = ["compare_block", "BlockComparison"]

_PEERS = LAYOUTS[1:]  # the layouts a torch module can have


@dataclass
class BlockComparison:
    """What :func:`compare_block` found; ``str()`` gives the printed table.

    Attributes
    ----------
    layout : str
        The peer's weight layout (``"alexhex7"``, ``"mmcv"``, ``"slowfast"``, ``"timm"``).
    block : NonLocalBlock
        The float64 nlref block built from the module (its state after the run).
    options : dict
        The :class:`NonLocalBlock` arguments that reproduce the module.
    rows : list of (str, float, float, bool)
        ``(quantity, max abs error, max rel error, reference all zero)``, one row per
        compared array; the relative error is ``max |nlref - peer| / max |peer|``.
    agree : bool
        Every row has a relative error at most ``rtol`` or an absolute error at
        most ``atol * scale`` (and the peer's backward ran).
    verdict : str
    peer_error : str or None
        The message of the peer's backward pass if it raised (mmcv's concatenation
        mode does), else None; then only the forward rows are compared.
    rtol, atol : float
    scale : float
        The largest magnitude among the peer's compared arrays, at least 1: the
        size of the numbers whose rounding a zero gradient is made of.
    """

    layout: str
    block: NonLocalBlock
    options: dict
    rows: list = field(default_factory=list)
    agree: bool = False
    verdict: str = ""
    peer_error: str | None = None
    rtol: float = 1e-9
    atol: float = 1e-12
    scale: float = 1.0

    def row_ok(self, row):
        """Whether one row passes: relative error <= rtol or absolute error <= atol * scale."""
        return row[2] <= self.rtol or row[1] <= self.atol * self.scale

    def __str__(self):
        width = max(len(r[0]) for r in self.rows) + 2
        lines = [f"compare_block: {self.layout} layout, float64, {'train' if self.block.training else 'eval'} mode",
                 f"nlref block: {self.block!r}",
                 f"{'quantity':<{width}}{'max abs err':>12}{'max rel err':>13}"]
        for name, abs_err, rel_err, zero in self.rows:
            note = "  (reference is all zero)" if zero else ""
            if rel_err > self.rtol and abs_err <= self.atol * self.scale:
                note += "  (ok by atol: the value is 0 up to rounding)"
            lines.append(f"{name:<{width}}{abs_err:>12.1e}{rel_err:>13.1e}{note}")
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)


def _layout_of(keys):
    """The peer layout a module's state-dict keys belong to (None if none fits)."""
    keys = set(keys)
    if any(k.startswith("conv_out.conv.") for k in keys):
        return "mmcv"
    if "conv_theta.weight" in keys or "conv_g.weight" in keys:
        return "slowfast"
    if {"t.weight", "z.weight"} <= keys:
        return "timm"
    if "W.weight" in keys or "W.0.weight" in keys:
        return "alexhex7"
    return None


def _tuple(value, dims):
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _infer_options(module, state, layout):
    """NonLocalBlock keyword arguments that make the block compute ``module``."""
    import torch.nn as nn

    g_key = {"alexhex7": ("g.weight", "g.0.weight"), "mmcv": ("g.conv.weight", "g.0.conv.weight"),
             "slowfast": ("conv_g.weight",), "timm": ("g.weight",)}[layout]
    g_weight = next(state[k] for k in g_key if k in state)
    dims = g_weight.ndim - 2
    opts = {"in_channels": int(g_weight.shape[1]), "inter_channels": int(g_weight.shape[0]), "dims": dims}
    keys = set(state)
    if layout == "alexhex7":
        mode = getattr(module, "mode", None)
        if "theta.weight" not in keys:
            mode = "gaussian"
        elif "concat_project.0.weight" in keys:
            mode = "concatenation"
        elif mode not in MODES:  # the port has one file per mode: non_local_dot_product.py, ...
            found = [m for m in MODES if f"non_local_{m}" in type(module).__module__]
            mode = found[0] if len(found) == 1 else None
        scale = getattr(module, "scale", False)
        pool = getattr(module, "pool", "after")
    elif layout == "mmcv":
        mode = module.mode
        scale = bool(module.use_scale) and mode == "embedded_gaussian"
        pool = "after"
    elif layout == "slowfast":
        modes = {"softmax": "embedded_gaussian", "dot_product": "dot_product"}
        if module.instantiation not in modes or module.norm_type not in ("batchnorm", "none"):
            raise ValueError(f"SlowFast's instantiation={module.instantiation!r} with norm_type="
                             f"{module.norm_type!r} has no nlref twin (softmax or dot_product, batchnorm or none)")
        mode = modes[module.instantiation]
        scale = mode == "embedded_gaussian"
        pool = "before"
    else:
        mode = "embedded_gaussian"
        scale = False if float(module.scale) == 1.0 else float(module.scale)
        pool = "after"
    opts.update(mode=mode, pool=pool, scale=scale if mode in ("gaussian", "embedded_gaussian") else False)
    pools = [m for m in module.modules() if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))]
    sub_sample = getattr(module, "sub_sample", getattr(module, "use_pool", None))  # the ports' own flags
    opts["sub_sample"] = bool(pools) if sub_sample is None else bool(sub_sample) and bool(pools)
    if opts["sub_sample"]:
        kernel, stride = _tuple(pools[0].kernel_size, dims), _tuple(pools[0].stride, dims)
        if _tuple(pools[0].padding, dims) != (0,) * dims or _tuple(pools[0].dilation, dims) != (1,) * dims:
            raise ValueError(f"the module's pool {pools[0]} pads or dilates; nlref's subsampling does neither")
        opts["pool_kernel"], opts["pool_stride"] = kernel, stride
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    opts["bn_layer"] = bool(norms)
    if norms:
        if norms[0].momentum is None or not norms[0].affine or not norms[0].track_running_stats:
            raise ValueError(f"the module's norm {norms[0]} needs momentum, affine and running statistics")
        opts["bn_eps"], opts["bn_momentum"] = float(norms[0].eps), float(norms[0].momentum)
    w_z_bias = {"alexhex7": ("W.bias", "W.0.bias"), "mmcv": ("conv_out.conv.bias",),
                "slowfast": ("conv_out.bias",), "timm": ("z.bias",)}[layout]
    opts["W_z_bias"] = any(k in keys for k in w_z_bias)
    return opts


def _rel(a, b):
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    ref = float(np.max(np.abs(b))) if b.size else 0.0
    if ref == 0.0:
        return err, (0.0 if err == 0.0 else float("inf")), True
    return err, err / ref, False


def compare_block(module: Any, x: Array, layout: str | None = None, *, dz: Array | None = None, seed: int = 0,
                  rtol: float = 1e-9, atol: float = 1e-12, verbose: bool = True, **options: Any) -> BlockComparison:
    """Check a PyTorch non-local module against nlref's block, forward and backward, in float64.

    The module is copied (the caller's is left untouched) and converted to
    float64; its configuration is read from its attributes and weights (see
    ``docs/compare_block.md``), the matching :class:`~nlref.nn.NonLocalBlock` is
    built and loaded with its weights, and both run forward on ``x`` and backward
    from the same ``dz``, in the module's mode (``module.training``: batch
    statistics and running-statistics updates in train mode, running statistics
    in eval mode).

    Parameters
    ----------
    module : torch.nn.Module
        A non-local block with one of the layouts ``"alexhex7"``, ``"mmcv"``,
        ``"slowfast"``, ``"timm"`` (see :meth:`NonLocalBlock.load_state_dict`).
    x : array or torch.Tensor, shape (B, C, *S)
        The input; converted to float64 on the host.
    layout : str, optional
        The module's layout; detected from its state-dict keys by default.
    dz : array, shape of ``x``, optional
        The upstream gradient; default standard normal from ``seed``.
    seed : int
        Seeds the default ``dz``.
    rtol, atol : float
        A row agrees when its relative error (``max |nlref - peer| / max |peer|``)
        is at most ``rtol`` or its absolute error at most ``atol`` times the
        largest magnitude among the peer's compared arrays (at least 1). The
        absolute bound is for quantities that are zero up to rounding (in train
        mode a bias followed by BN has a zero gradient, e.g. ``g``'s bias in
        Gaussian mode, whose rows of A sum to 1), where a relative error means
        nothing: their rounding is that of the cancelling terms, which grow with
        the gradients, so the bound scales with them.
    verbose : bool
        Print the table.
    **options
        :class:`NonLocalBlock` arguments that override what was read from the
        module (e.g. ``mode=`` for a port whose mode is not an attribute).

    Returns
    -------
    BlockComparison
        The rows of the table, the verdict, the options and the nlref block.

    Raises
    ------
    ValueError
        The layout is unknown or undetectable, the module's configuration has no
        nlref twin (the message says which part), or ``x`` does not fit.
    ImportError
        PyTorch is not installed.
    """
    import torch

    if layout is not None and layout not in _PEERS:
        raise ValueError(f"layout must be None (detect) or one of {_PEERS}, got {layout!r}")
    peer = copy.deepcopy(module).double()
    peer.train(module.training)
    state = peer.state_dict()
    if layout is None:
        layout = _layout_of(state)
        if layout is None:
            raise ValueError(f"the module's state-dict keys {sorted(state)} fit none of the layouts {_PEERS}; "
                             "pass layout= if it is one of them")
    opts = _infer_options(peer, state, layout)
    opts.update(options)
    if opts.get("mode") not in MODES:
        raise ValueError(f"could not read the {layout} module's mode; pass mode= (one of {MODES})")
    host_x = np.array(B.to_numpy(x) if not isinstance(x, np.ndarray) else x, dtype=np.float64)
    if host_x.ndim < 3:
        raise ValueError(f"x must have shape (B, C, *S), got {host_x.shape}")
    block = NonLocalBlock(dtype="float64", **opts)
    block.load_state_dict(state, layout=layout)
    block.training = peer.training
    if dz is None:
        dz = np.random.default_rng(seed).standard_normal(host_x.shape)
    dz = np.array(B.to_numpy(dz) if not isinstance(dz, np.ndarray) else dz, dtype=np.float64)
    if dz.shape != host_x.shape:
        raise ValueError(f"dz must have the shape of x, {host_x.shape}; got {dz.shape}")

    z = block.forward(host_x)
    dx = block.backward(dz)
    tx = torch.tensor(host_x, requires_grad=True)
    tz = peer(tx)
    peer_error = None
    try:
        tz.backward(torch.from_numpy(dz))
    except RuntimeError as err:  # mmcv's concatenation divides its ReLU's output in place
        peer_error = str(err).split("\n")[0]
    rows, magnitudes = [], [1.0]

    def compare(name, ours, theirs):
        rows.append((name, *_rel(ours, theirs)))
        magnitudes.append(float(np.max(np.abs(theirs))) if theirs.size else 0.0)

    compare("output z", z, tz.detach().numpy())
    if peer_error is None:
        compare("dx", dx, tx.grad.numpy())
        peer_params = dict(peer.named_parameters())
        for key, (peer_key, _) in block._peer_map(layout).items():
            if key in block.params:
                grad = peer_params[peer_key].grad
                compare(f"d{key} ({peer_key})", block.grads[key], grad.reshape(block.grads[key].shape).numpy())
    after = peer.state_dict()
    for key, (peer_key, _) in block._peer_map(layout).items():
        if key in block.buffers:
            compare(f"{key} ({peer_key})", block.buffers[key], after[peer_key].numpy())
    scale = max(magnitudes)
    result = BlockComparison(layout=layout, block=block, options=opts, rows=rows, peer_error=peer_error,
                             rtol=rtol, atol=atol, scale=scale)
    result.agree = agree = peer_error is None and all(result.row_ok(r) for r in rows)
    if peer_error is not None:
        verdict = (f"{'forward agrees' if result.row_ok(rows[0]) else 'forward DIFFERS'} (max rel err "
                   f"{rows[0][2]:.1e}); the "
                   f"peer's backward failed, so no gradient was compared: {peer_error}")
    elif agree:
        worst = max(r[2] for r in rows if r[2] <= rtol)
        verdict = (f"agree: every max rel err <= {rtol:g} (largest {worst:.1e}) or max abs err <= {atol:g} x "
                   f"{scale:.3g} (the largest peer magnitude)")
    else:
        bad = [r[0] for r in rows if not result.row_ok(r)]
        verdict = (f"DIFFER: max rel err above {rtol:g} and max abs err above {atol:g} x {scale:.3g} for "
                   f"{', '.join(bad)}")
    result.verdict = verdict
    if verbose:
        print(result)
    return result
