"""Use nlref as an oracle for a PyTorch non-local block: :func:`compare_block`.

Given a peer's module (AlexHex7's port, mmcv's ``NonLocal1d/2d/3d``, SlowFast's
``Nonlocal``, pytorchvideo's ``NonLocal``, timm's ``NonLocalAttn``, or any module
with one of their weight layouts, :mod:`nlref.nn.layouts`) and an input,
:func:`compare_block` reads the module's configuration from its parts and weights,
builds the :class:`~nlref.nn.NonLocalBlock` that computes the same function, runs
both forward and backward in float64 and reports the largest absolute and
relative differences of everything the two compute: the output and the block's
branch ``z - x``, ``dx``, every parameter gradient and BN's running statistics.
A module as built (the identity: BN gamma = 0) is compared through a seeded
random copy unless ``weights="own"``, and no comparison in which a quantity is
zero in the peer (all zero, or zero up to rounding where the block's equations
do not make it so: an input the same at every position, say) is called
agreeing. PyTorch is needed only here (imported when the function runs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._typing import Array
from .. import backend as B
from . import layouts
from ._shapes import check_int, check_number
from ._state import real_host
from .block import NonLocalBlock
from .nonlocal_op import MODES

__all__ = ["compare_block", "BlockComparison", "randomize_module"]

#: compare_block's ``weights`` choices.
WEIGHTS = ("auto", "own", "random")


@dataclass
class BlockComparison:
    """What :func:`compare_block` found; ``str()`` gives the printed table.

    Attributes
    ----------
    layout : str
        The peer's weight layout (one of :data:`nlref.nn.layouts.PEER_LAYOUTS`).
    block : NonLocalBlock
        The float64 nlref block built from the module (its state after the run).
    options : dict
        The :class:`NonLocalBlock` arguments that reproduce the module.
    rows : list of (str, float, float, bool)
        ``(quantity, max abs error, max rel error, reference all zero)``, one row per
        compared array; the relative error is ``max |nlref - peer| / max |peer|``.
    agree : bool
        Every row has a relative error at most ``rtol`` or an absolute error at
        most ``atol * scale``, the peer's backward ran, and no row is unchecked
        (else the verdict is INCONCLUSIVE: zero against zero checks nothing).
    unchecked : list of str
        The quantities zero in the peer, so that no difference of their own size
        could show: all zero, or at most ``atol * scale`` where the block's
        equations do not make them zero (see ``expected_zero``).
    expected_zero : list of str
        The quantities the block's equations make zero up to rounding (train
        mode with BN: W_z's bias, g's bias where the attention's rows sum
        to 1, and with a batch of one theta's bias in the dot-product mode;
        softmax modes: phi's bias); for them only the rounding is compared, and
        their being exactly zero in the peer leaves nothing unchecked.
    verdict : str
    peer_error : str or None
        The message of the peer's backward pass if it raised (mmcv's concatenation
        mode does), else None; then only the forward rows are compared.
    rtol, atol : float
    scale : float
        The largest magnitude among the peer's compared arrays, at least 1: the
        size of the numbers whose rounding a zero gradient is made of.
    weights : str
        Which weights were compared: the module's own, or a randomised copy and why.
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
    weights: str = "the module's own"
    unchecked: list = field(default_factory=list)
    expected_zero: list = field(default_factory=list)

    def row_ok(self, row):
        """Whether one row passes: relative error <= rtol or absolute error <= atol * scale."""
        return row[2] <= self.rtol or row[1] <= self.atol * self.scale

    def __str__(self):
        width = max(len(r[0]) for r in self.rows) + 2
        lines = [f"compare_block: {self.layout} layout, float64, {'train' if self.block.training else 'eval'} mode",
                 f"nlref block: {self.block!r}",
                 f"weights: {self.weights}",
                 f"{'quantity':<{width}}{'max abs err':>12}{'max rel err':>13}"]
        for name, abs_err, rel_err, zero in self.rows:
            note = "  (reference is all zero)" if zero else ""
            if not zero and name in self.unchecked:
                note += "  (reference is 0 up to rounding: not checked)"
            elif rel_err > self.rtol and abs_err <= self.atol * self.scale:
                note += "  (ok by atol: the value is 0 up to rounding)"
            lines.append(f"{name:<{width}}{abs_err:>12.1e}{rel_err:>13.1e}{note}")
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)


def _tuple(value, dims):
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _submodule(module, name):
    """The submodule at dotted ``name``, or None where there is none (or it is None, as pytorchvideo's norm)."""
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _attribute(module, name, layout, option, why):
    """An attribute the peer's own class has; a clear message naming the class when this module lacks it."""
    if not hasattr(module, name):
        raise ValueError(f"{type(module).__name__} has the {layout} layout's weights but no attribute {name!r} "
                         f"({why}), so its {option} cannot be read; pass {option}= to compare_block")
    return getattr(module, name)


def _check_parts(module):
    """Refuse modules with a part nlref's block has no twin for, naming the part and its class."""
    import torch.nn as nn

    allowed = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.BatchNorm1d,
               nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.Identity)
    for name, part in module.named_modules():
        if name and not list(part.children()) and not isinstance(part, allowed):  # (mmcv's wrappers subclass them)
            raise ValueError(f"{type(module).__name__}.{name} is a {type(part).__name__}, which nlref's block has no "
                             "twin of (it has 1x1 convolutions, max-pooling, one torch.nn.BatchNorm1d/2d/3d after "
                             "W_z and, for the concatenation, a ReLU)")


def _ndim(x):
    """The number of axes of ``x`` (an array, a tensor or nested lists), or 0 where it has none."""
    shape = getattr(x, "shape", None)
    try:
        return len(shape) if shape is not None else np.ndim(x)
    except Exception:  # not array-like: real_host names the problem later
        return 0


def _plain_batch_norms(module, dims):
    """``module`` with each ``torch.nn.SyncBatchNorm`` replaced, in place, by the ``BatchNorm{dims}d`` it is
    on one process (same options, parameters, statistics and mode); ``dims`` outside 1..3: unchanged."""
    import torch.nn as nn

    if dims not in (1, 2, 3):
        return module
    for name, part in list(module.named_modules()):
        if isinstance(part, nn.SyncBatchNorm):
            plain = getattr(nn, f"BatchNorm{dims}d")(part.num_features, eps=part.eps, momentum=part.momentum,
                                                     affine=part.affine,
                                                     track_running_stats=part.track_running_stats)
            plain.load_state_dict(part.state_dict())
            plain = plain.to(dtype=next(iter(part.state_dict().values())).dtype).train(part.training)
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, plain)
    return module


def _peer_copy(module, x):
    """The copy of ``module`` that is compared: float64, a SyncBatchNorm as the batch norm it is on one
    process, in ``module``'s mode, and every parameter requiring a gradient (a frozen one would have none
    to compare); ``module`` itself is left as it is."""
    peer = _plain_batch_norms(copy.deepcopy(module).double(), _ndim(x) - 2)
    return peer.train(module.training).requires_grad_(True)


def _norm(module, layout):
    """The module's norm after W_z in ``layout`` (None without one); an error naming it unless it is a batch norm."""
    import torch.nn as nn

    name = layouts.MODULE_NAMES[layout]["bn"]
    norm = _submodule(module, name)
    if norm is not None and not isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        raise ValueError(f"{type(module).__name__}.{name} is a {type(norm).__name__}; nlref's block normalises "
                         "with one torch.nn.BatchNorm1d/2d/3d (or nothing)")
    return norm


def _check_layout_fits(module, layout):
    """Refuse a module whose parameter names no module of ``layout`` has, naming the layouts they fit."""
    _check_parts(module)
    _norm(module, layout)  # a norm nlref has no twin of is named as such, not as a key mismatch
    names = [name for name, _ in module.named_parameters()]
    mismatch = layouts.parameter_mismatch(names, layout)
    if mismatch is not None:
        fits = [other for other in layouts.PEER_LAYOUTS if layouts.parameter_mismatch(names, other) is None]
        hint = (f"they fit the {fits[0]} layout: pass layout={fits[0]!r} or leave layout= out" if fits
                else f"they fit none of the layouts {layouts.PEER_LAYOUTS}")
        raise ValueError(f"{type(module).__name__}'s parameters do not fit the {layout} layout; {hint} (against "
                         f"the closest {layout} module, unmatched parameters {mismatch[0]}, missing {mismatch[1]})")


def _read_options(module, state, layout, given):
    """NonLocalBlock keyword arguments that make the block compute ``module``, read from what it has.

    Widths and dimensionality from the convolutions' weights; subsampling, its placement,
    kernel and stride from the module's max-pool and where it sits; BN from the norm
    submodule (class, eps, momentum); W_z's bias from the keys; the mode and scale from
    the attributes the peer's own class has (``given`` options are not read).
    """
    import torch.nn as nn

    _check_parts(module)
    cls = type(module).__name__
    keys = set(state)
    names = layouts.MODULE_NAMES[layout]
    g_keys = list(dict.fromkeys(names["g"].format(pool=wrap) + ".weight" for wrap in ("", ".0")))
    g_key = next((k for k in g_keys if k in keys), None)
    if g_key is None:
        raise ValueError(f"{cls} has none of the {layout} layout's g weights {g_keys}")
    g_weight = state[g_key]
    dims = g_weight.ndim - 2
    opts = {"in_channels": int(g_weight.shape[1]), "inter_channels": int(g_weight.shape[0]), "dims": dims}
    # the pool: where it sits says where nlref pools (inside g's Sequential: after the convolution)
    pools = [m for m in module.modules() if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))]
    opts["sub_sample"] = bool(pools)
    if pools:
        pool = pools[0]
        kernel, stride = _tuple(pool.kernel_size, dims), _tuple(pool.stride, dims)
        if _tuple(pool.padding, dims) != (0,) * dims or _tuple(pool.dilation, dims) != (1,) * dims or pool.ceil_mode:
            raise ValueError(f"{cls}'s pool {pool} pads, dilates or rounds up; nlref's subsampling does none of them")
        g_part = _submodule(module, names["g"].split("{pool}")[0])  # g itself, or its Sequential(conv, pool)
        after = isinstance(g_part, nn.Sequential) and any(isinstance(m, type(pool)) for m in g_part.modules())
        opts.update(pool="after" if after else "before", pool_kernel=kernel, pool_stride=stride)
    # the norm after W_z
    norm_name = names["bn"]
    norm = _norm(module, layout)
    opts["bn_layer"] = norm is not None
    if norm is not None:
        if norm.momentum is None or not norm.affine or not norm.track_running_stats:
            raise ValueError(f"{cls}.{norm_name} ({norm}) needs momentum, affine and running statistics")
        opts["bn_eps"], opts["bn_momentum"] = float(norm.eps), float(norm.momentum)
    w_z = layouts.module_names(layout, sub_sample=opts["sub_sample"], bn_layer=opts["bn_layer"])["W_z"]
    opts["W_z_bias"] = f"{w_z}.bias" in keys
    # the mode and the logit scale: from the attributes the peer's class has
    mode, scale = given.get("mode"), given.get("scale")
    if layout == "alexhex7":  # the port keeps its mode in its file name: lib/non_local_<mode>.py
        if mode is None:
            if "theta.weight" not in keys:
                mode = "gaussian"
            elif "concat_project.0.weight" in keys:
                mode = "concatenation"
            elif getattr(module, "mode", None) in MODES:
                mode = module.mode
            else:
                found = [m for m in MODES if f"non_local_{m}" in type(module).__module__]
                if len(found) != 1:
                    raise ValueError(f"{cls} has the alexhex7 layout, whose mode is the file name "
                                     f"(non_local_<mode>.py), but it comes from {type(module).__module__!r} and has "
                                     f"no mode attribute; pass mode= (one of {MODES})")
                mode = found[0]
        if scale is None:
            scale = getattr(module, "scale", False)  # the port has none; the tests' oracle has one
    elif layout == "mmcv":
        if mode is None:
            mode = _attribute(module, "mode", layout, "mode", "mmcv's NonLocalNd keeps its mode there")
        if scale is None:
            use_scale = _attribute(module, "use_scale", layout, "scale", "mmcv's NonLocalNd keeps it there")
            scale = bool(use_scale) and mode == "embedded_gaussian"
    elif layout in ("slowfast", "pytorchvideo"):
        if mode is None:
            instantiation = _attribute(module, "instantiation", layout, "mode",
                                       "softmax or dot_product, in SlowFast's and pytorchvideo's classes")
            modes = {"softmax": "embedded_gaussian", "dot_product": "dot_product"}
            if instantiation not in modes:
                raise ValueError(f"{cls}.instantiation={instantiation!r} has no nlref twin (softmax or dot_product)")
            mode = modes[instantiation]
        if scale is None:
            scale = mode == "embedded_gaussian"  # dim_inner ** -0.5 in softmax mode
    else:
        mode = "embedded_gaussian" if mode is None else mode
        if scale is None:
            value = float(_attribute(module, "scale", layout, "scale", "timm's NonLocalAttn keeps it there"))
            scale = False if value == 1.0 else value
    opts.update(mode=mode, scale=scale if mode in ("gaussian", "embedded_gaussian") else False)
    return opts


def _key_count(block, x_shape):
    """How many keys each query attends over: the positions of ``x``, after the block's pooling."""
    spatial = tuple(x_shape[2:])
    if not block.sub_sample:
        return int(np.prod(spatial))
    if block.pool == "flattened":  # windows over the flattened sequence of positions
        spatial = (int(np.prod(spatial)),)
    return int(np.prod([(n - k) // s + 1 for n, k, s in zip(spatial, block.kernel, block.stride)]))


def _rel(a, b):
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    ref = float(np.max(np.abs(b))) if b.size else 0.0
    if ref == 0.0:
        return err, (0.0 if err == 0.0 else float("inf")), True
    return err, err / ref, False


def randomize_module(module, seed=0):
    """Give a PyTorch module's floating-point parameters and buffers random values, in place; returns it.

    Standard normal times 0.7 for weights, biases and running means; running
    variances uniform in [0.5, 1.5). Seeded (a ``torch.Generator``), so a
    comparison is repeatable. :func:`compare_block` uses it on its own copy of a
    module whose weights would make most of the comparison zeros.
    """
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t.dtype))
            elif t.is_floating_point():
                t.copy_(0.7 * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype))
    return module


def _expected_zeros(opts, training, batch):
    """nlref's keys whose gradient the block's equations make zero up to rounding, for any input.

    A softmax over keys ignores ``theta_i . b`` added to a row of logits, so phi's
    bias has none; in train mode BN removes a constant per channel, hence W_z's
    bias, and g's bias where the rows of the attention sum to 1 (``y_i`` gains
    ``b``), have none either. With one sample (``batch`` 1) BN's mean is over that
    sample alone, so whatever adds the same to every position of it has none: in
    the dot-product mode theta's bias (``y_i`` gains ``sum_j (b . phi_j) g_j / N``,
    the same for every ``i``).
    """
    zeros = set()
    if opts.get("mode") == "embedded_gaussian":
        zeros.add("phi.bias")
    if training and opts.get("bn_layer", True):
        zeros.add("W_z.bias")
        if opts.get("mode") in ("gaussian", "embedded_gaussian"):
            zeros.add("g.bias")
        if batch == 1 and opts.get("mode") == "dot_product":
            zeros.add("theta.bias")
    return zeros


def _run(peer, layout, opts, host_x, dz):
    """Both blocks forward and backward.

    Returns (nlref block, rows, each row's peer magnitude, the names of the rows the
    equations make zero, the peer's backward error).
    """
    import torch

    state = peer.state_dict()
    block = NonLocalBlock(dtype="float64", **opts)
    block.load_state_dict(state, layout=layout)
    block.training = peer.training
    z = block.forward(host_x)
    dx = block.backward(dz)
    tx = torch.tensor(host_x, requires_grad=True)
    tz = peer(tx)
    peer_error = None
    try:
        tz.backward(torch.from_numpy(dz))
    except RuntimeError as err:  # mmcv's concatenation divides its ReLU's output in place
        peer_error = str(err).split("\n")[0]
    rows, magnitudes, expected = [], [], []
    structural = _expected_zeros(opts, peer.training, host_x.shape[0])

    def compare(name, ours, theirs, key=None):
        rows.append((name, *_rel(ours, theirs)))
        magnitudes.append(float(np.max(np.abs(theirs))) if theirs.size else 0.0)
        if key in structural:
            expected.append(name)

    mapping = layouts.key_map(block, layout)
    compare("output z", z, tz.detach().numpy())
    # the branch alone: z is x plus it, so an error in it hides in z's relative error, and a branch
    # that is all zero (a new block's W_z = 0 or gamma = 0) makes the forward comparison vacuous
    compare("branch z - x", z - host_x, tz.detach().numpy() - host_x)
    if peer_error is None:
        compare("dx", dx, tx.grad.numpy())
        peer_params = dict(peer.named_parameters())
        for key, (peer_key, _) in mapping.items():
            if key in block.params:
                grad = peer_params[peer_key].grad
                grad = np.zeros(block.grads[key].shape) if grad is None else grad.reshape(block.grads[key].shape)
                compare(f"d{key} ({peer_key})", block.grads[key], np.asarray(grad), key)
    after = peer.state_dict()
    for key, (peer_key, _) in mapping.items():
        if key in block.buffers:
            compare(f"{key} ({peer_key})", block.buffers[key], after[peer_key].numpy())
    return block, rows, magnitudes, expected, peer_error


def _scale(magnitudes):
    """The largest magnitude among the peer's compared arrays, at least 1."""
    return max([1.0, *magnitudes])


def _unchecked(rows, magnitudes, expected, atol):
    """The quantities zero in the peer, so that comparing them checks nothing.

    All zero, or no larger than the rounding bound ``atol * scale`` (a difference of
    their own size would pass); except those the equations make zero (``expected``),
    which are zero or rounding in any right peer (exactly zero, too, by luck of the
    rounding: with two keys, say) and are judged by ``atol``.
    """
    bound = atol * _scale(magnitudes)
    return [r[0] for r, m in zip(rows, magnitudes) if r[0] not in expected and (r[3] or m <= bound)]


def compare_block(module: Any, x: Array, layout: str | None = None, *, dz: Array | None = None, seed: int = 0,
                  weights: str = "auto", rtol: float = 1e-9, atol: float = 1e-12, verbose: bool = True,
                  **options: Any) -> BlockComparison:
    """Check a PyTorch non-local module against nlref's block, forward and backward, in float64.

    The module is copied (the caller's is left untouched) and converted to
    float64; its configuration is read from what it has (its submodules, their
    classes and weight shapes, and the attributes its peer's class keeps; see
    ``docs/compare_block.md``), the matching :class:`~nlref.nn.NonLocalBlock` is
    built and loaded with its weights, and both run forward on ``x`` and backward
    from the same ``dz``, in the module's mode (``module.training``: batch
    statistics and running-statistics updates in train mode, running statistics
    in eval mode).

    A module as its constructor builds it starts as the identity (BN's gamma = 0,
    or W_z = 0), so every gradient upstream of the norm is zero and most rows
    would compare zero with zero: such a comparison says nothing about theta,
    phi, g or W_z. By default (``weights="auto"``) the comparison then runs on a
    copy with random weights (:func:`randomize_module`, seeded by ``seed``), and
    the report says so; ``weights="own"`` keeps the module's weights exactly. A
    comparison in which any quantity is all zero in the peer is reported as
    INCONCLUSIVE, never as agreeing; so is one in which a quantity is zero up to
    rounding (at most ``atol`` times the scale) where the block's equations do
    not make it zero: a difference of its own size would pass. The input can do
    that with any weights: an ``x`` the same at every position makes a softmax's
    attention uniform whatever its logits (theta's and phi's gradients vanish,
    and a forgotten scale would not show), and in train mode with BN
    an ``x`` or ``dz`` the same at every position of every sample leaves BN
    nothing to pass on. The gradients the equations do make zero (phi's bias in
    a softmax; in train mode with BN, W_z's bias, g's bias where the rows of
    the attention sum to 1, and with a batch of one theta's bias in the
    dot-product mode) are compared by ``atol`` alone.

    Parameters
    ----------
    module : torch.nn.Module
        A non-local block with one of the layouts of :data:`nlref.nn.layouts.PEER_LAYOUTS`
        (``DataParallel`` or ``DistributedDataParallel`` around one is unwrapped; a
        model that holds one is refused, naming the submodule to pass). A
        ``torch.nn.SyncBatchNorm`` (mmcv's ``SyncBN``) is compared as the batch norm
        it is on one process. Its parameters
        need not require gradients (frozen ones are unfrozen in the copy), and the call
        may sit inside ``torch.no_grad()`` or ``torch.inference_mode()``: the peer
        runs with gradients enabled.
    x : array or torch.Tensor, shape (B, C, *S)
        The input; converted to float64 on the host.
    layout : str, optional
        The module's layout; detected from its state-dict keys by default.
    dz : array, shape of ``x``, optional
        The upstream gradient; default standard normal from ``seed``.
    seed : int
        Seeds the default ``dz`` and the random weights.
    weights : {"auto", "own", "random"}
        ``"auto"``: the module's weights, unless a compared quantity is zero
        in the peer with them (as above); then a randomised copy. ``"own"``:
        the module's weights, always. ``"random"``: a randomised copy, always.
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
        The rows of the table, the verdict, the options, the weights compared and the nlref block.

    Raises
    ------
    ValueError
        The layout is unknown or undetectable, the module's configuration has no
        nlref twin or cannot be read (the message names the class and the part),
        or ``x``, ``dz`` or ``weights`` does not fit.
    ImportError
        PyTorch is not installed.
    """
    import torch

    # the caller's torch.no_grad() or inference_mode() would stop the peer's backward: blame no module for it
    with torch.inference_mode(False), torch.enable_grad():
        return _compare_block(module, x, layout, dz=dz, seed=seed, weights=weights, rtol=rtol, atol=atol,
                              verbose=verbose, **options)


def _compare_block(module, x, layout, *, dz, seed, weights, rtol, atol, verbose, **options):
    """compare_block's work, with gradients enabled."""
    import torch

    check_number("rtol", rtol, low=0)
    check_number("atol", atol, low=0)
    check_int("seed", seed, low=0)  # randomize_module seeds torch with it
    verbose = B.check_flag("verbose", verbose)
    if layout is not None and layout not in layouts.PEER_LAYOUTS:
        raise ValueError(f"layout must be None (detect) or one of {layouts.PEER_LAYOUTS}, got {layout!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    # DataParallel and DistributedDataParallel run their .module (on the host: that module itself)
    while isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        module = module.module
    peer = _peer_copy(module, x)
    state = peer.state_dict()
    if layout is None:
        layout = layouts.layout_of_keys(state)
        if layout is None:
            inner = [(name, found) for name, part in module.named_modules() if name
                     for found in [layouts.layout_of_keys(part.state_dict())] if found is not None]
            inner = [(name, found) for name, found in inner if not any(  # the outermost: not a part of one
                name.startswith(other + ".") for other, _ in inner)]
            hint = ("; its submodules " + ", ".join(f"{name!r} ({found} layout)" for name, found in inner[:4])
                    + f" have a peer's keys: pass module.get_submodule({inner[0][0]!r})") if inner else ""
            raise ValueError(f"{type(module).__name__}'s state-dict keys {sorted(state)[:12]} fit none of the "
                             f"layouts {layouts.PEER_LAYOUTS}; pass layout= if it is one of them{hint}")
    _check_layout_fits(peer, layout)  # before reading options: a wrong layout failed on an option
    opts = _read_options(peer, state, layout, options)
    opts.update(options)
    if "mode" in options and options["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {options['mode']!r}")
    if opts.get("mode") not in MODES:
        raise ValueError(f"could not read {type(module).__name__}'s mode ({layout} layout); pass mode= (one of "
                         f"{MODES})")
    host_x = real_host("x", x, np.float64)  # real and finite: a NaN would make every row DIFFER, blaming the module
    if host_x.ndim < 3:
        raise ValueError(f"x must have shape (B, C, *S), got {host_x.shape}")
    if dz is None:
        dz = np.random.default_rng(seed).standard_normal(host_x.shape)
    dz = real_host("dz", dz, np.float64)
    if dz.shape != host_x.shape:
        raise ValueError(f"dz must have the shape of x, {host_x.shape}; got {dz.shape}")

    weights_note = "the module's own"
    if weights == "random":
        randomize_module(peer, seed)
        weights_note = f"a copy with random weights (randomize_module, seed={seed}), as asked (weights='random')"
    block, rows, magnitudes, expected, peer_error = _run(peer, layout, opts, host_x, dz)
    own_zeros = _unchecked(rows, magnitudes, expected, atol)
    if weights == "auto" and own_zeros:
        exact = all(r[3] for r in rows if r[0] in own_zeros)
        what = "all zero" if exact else "zero (all zero, or zero up to rounding)"
        peer = randomize_module(_peer_copy(module, x), seed)
        block, rows, magnitudes, expected, peer_error = _run(peer, layout, opts, host_x, dz)
        weights_note = (f"a copy with random weights (randomize_module, seed={seed}): with the module's own, "
                        f"{len(own_zeros)} of {len(rows)} compared quantities were {what}, as in a module as built "
                        "(BN gamma = 0 or W_z = 0; running mean 0); weights='own' keeps them")
    scale = _scale(magnitudes)
    zeros = _unchecked(rows, magnitudes, expected, atol)
    result = BlockComparison(layout=layout, block=block, options=opts, rows=rows, peer_error=peer_error,
                             rtol=rtol, atol=atol, scale=scale, weights=weights_note, unchecked=zeros,
                             expected_zero=expected)
    inconclusive = bool(zeros)
    result.agree = peer_error is None and not inconclusive and all(result.row_ok(r) for r in rows)
    bad = [r[0] for r in rows if not result.row_ok(r)]
    if peer_error is not None:
        forward = rows[:2]  # z and the branch z - x
        if any(r[0] in zeros for r in forward):
            state = "forward INCONCLUSIVE (the block's branch z - x is zero in the peer)"
        else:
            state = "forward agrees" if all(result.row_ok(r) for r in forward) else "forward DIFFERS"
        verdict = (f"{state} (max rel err of z - x {rows[1][2]:.1e}); the peer's backward failed, so no "
                   f"gradient was compared: {peer_error}")
    elif bad:
        verdict = (f"DIFFER: max rel err above {rtol:g} and max abs err above {atol:g} x {scale:.3g} for "
                   f"{', '.join(bad)}")
    elif inconclusive:
        exact = all(r[3] for r in rows if r[0] in zeros)
        what = "all zero" if exact else f"zero (all zero, or at most {atol:g} x {scale:.3g}: rounding)"
        if (opts["mode"] in ("gaussian", "embedded_gaussian") and _key_count(block, host_x.shape) == 1
                and all(name.startswith(("dtheta.", "dphi.")) for name in zeros)):
            # one key: the softmax is 1 whatever its logits (and only theta and phi are left unchecked)
            hint = (f"x of shape {host_x.shape} leaves each query one key to attend to (after any pooling), so "
                    "the attention is 1 whatever the logits and no gradient reaches theta and phi; pass an x "
                    "with more positions")
        elif weights_note == "the module's own":
            hint = ("compare with weights='random' (or another seed), or trained weights"
                    + ("" if exact else ", and a random x and dz"))
        else:  # random weights did not make them non-zero: the input may have
            hint = ("they are zero with random weights too, so x or dz may be the cause: an x the same at every "
                    "position makes a softmax's attention uniform (no gradient reaches theta and phi), and in "
                    "train mode with BN an x or dz the same at every position of every sample leaves BN nothing "
                    "(its batch variance is 0, or it passes no gradient back); pass a random x and dz=None, "
                    "or try another seed")
        verdict = (f"INCONCLUSIVE: the rest agree, but {len(zeros)} of {len(rows)} quantities are {what} in "
                   f"the peer ({', '.join(zeros)}), so they were not checked; {hint}")
    else:
        # the largest relative error among the rows the relative test passes (none may: atol can pass them all)
        worst = max((r[2] for r in rows if r[2] <= rtol), default=None)
        largest = f" (largest {worst:.1e})" if worst is not None else ""
        verdict = (f"agree: every max rel err <= {rtol:g}{largest} or max abs err <= {atol:g} x "
                   f"{scale:.3g} (the largest peer magnitude)")
    result.verdict = verdict
    if verbose:
        print(result)
    return result
