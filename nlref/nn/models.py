"""Small C2D / I3D video networks with non-local blocks, trained by hand-written backprop.

The network is a miniature of the ResNet video models of Wang et al. (2018),
Table 1: a stem, three residual stages, global average pooling, dropout and a
fully connected classifier. Every layer is a thin object over the
forward/backward pairs of :mod:`nlref.nn.functional`::

    stem   conv 1x3x3, stride (1, 2, 2) -> BN -> ReLU           (B, w0, T, H/2, W/2)
    res2   blocks[0] residual blocks, width w0                  (B, w0, T, H/2, W/2)
    res3   blocks[1] residual blocks, width w1, first stride 2  (B, w1, T, H/4, W/4)
    res4   blocks[2] residual blocks, width w2, first stride 2  (B, w2, T, H/8, W/8)
    head   global average pool -> dropout -> fully connected    (B, classes)

A residual block is ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``
with a 1x1x1 convolution + BN shortcut where the shape changes. ``conv2`` is
always 1x3x3. ``conv1`` is 1x3x3 in the C2D flavour (no temporal mixing at
all before the head, like the paper's C2D baseline) and is inflated in every
other block (the first, third, ... of each stage) in the I3D flavours: to
3x3x3 (``"i3d"``) or to a temporal 3x1x1 (``"i3d_3x1x1"``).

Non-local blocks are placed as in the paper: one block goes right before the
last residual block of a stage (``res3`` by default, the second-to-last
stage, as res4 is in the paper's ResNet-50); several blocks fill the slots
``(res3, 1), (res4, 1), (res3, 0), (res4, 0)`` in that order, where
``(stage, j)`` means "before residual block ``j`` of ``stage``". With two
blocks per stage that is one block in every residual block of res3 and res4
at 4 blocks (the paper's 5- and 10-block models use every other block of a
deeper network).

Parameters, gradients and buffers of the whole network are flat dicts with
dotted names (``"res3.1.conv1.conv.weight"``, ``"res3.nl1.theta.weight"``,
``"fc.weight"``) in :attr:`VideoNet.params`, :attr:`VideoNet.grads` and
:attr:`VideoNet.buffers`.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._typing import Array, DType, Size
from .. import backend as B
from . import engine
from . import functional as F
from ._state import state_entry
from .block import NonLocalBlock
from .nonlocal_op import MODES

__all__ = ["VideoNet", "VideoTransformer", "ImageResNet", "FLAVOURS", "MODELS", "EXTENTS", "STAGES", "nonlocal_slots"]

FLAVOURS = ("c2d", "i3d", "i3d_3x1x1")
#: What ``nlref train --model`` builds: a :class:`VideoNet` flavour or the :class:`VideoTransformer`.
MODELS = FLAVOURS + ("transformer",)
#: Which positions a non-local block relates (all of space-time, the same frame, or the same place).
EXTENTS = ("spacetime", "space", "time")
STAGES = ("res2", "res3", "res4")
_MANY = (("res3", 1), ("res4", 1), ("res3", 0), ("res4", 0))


# --------------------------------------------------------------------------- layers
class Layer:
    """A node of the network: ``params``/``grads``/``buffers`` dicts, ``forward``/``backward``."""

    def __init__(self):
        self.params, self.grads, self.buffers = {}, {}, {}
        self.training = True
        self._cache = None

    def children(self):
        return []

    def _pop_cache(self):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called without a forward pass before it")
        cache, self._cache = self._cache, None
        return cache


class Conv3d(Layer):
    """3-D convolution, weight (out, in, kt, kh, kw), PyTorch's default init (uniform +-1/sqrt(fan_in))."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int], *, stride: Size = 1, padding: Size = 0,
                 rng: np.random.Generator, make: Callable[[np.ndarray], Array]) -> None:
        super().__init__()
        fan_in = c_in * math.prod(kernel)
        self.params["weight"] = make(rng.uniform(-1, 1, (c_out, c_in) + tuple(kernel)) / math.sqrt(fan_in))
        self.stride, self.padding = stride, padding

    def forward(self, x):
        out, self._cache = F.conv3d_forward(x, self.params["weight"], stride=self.stride, padding=self.padding)
        return out

    def backward(self, dout, *, input_grad=True):
        dx, self.grads["weight"], _ = F.conv3d_backward(dout, self._pop_cache(), input_grad=input_grad)
        return dx


class BatchNorm(Layer):
    """Batch norm over (B, *S) per channel, gamma = 1, beta = 0 at start (or gamma = 0 when ``zero``)."""

    def __init__(self, channels: int, *, make: Callable[[np.ndarray], Array]) -> None:
        super().__init__()
        self.params["gamma"] = make(np.ones(channels))
        self.params["beta"] = make(np.zeros(channels))
        self.buffers["running_mean"] = make(np.zeros(channels))
        self.buffers["running_var"] = make(np.ones(channels))

    def forward(self, x):
        out, self._cache = F.batchnorm_forward(x, self.params["gamma"], self.params["beta"], self.buffers,
                                               training=self.training)
        return out

    def backward(self, dout):
        dx, self.grads["gamma"], self.grads["beta"] = F.batchnorm_backward(dout, self._pop_cache())
        return dx


class ConvBN(Layer):
    """conv -> BN (-> ReLU): the unit every stage is built from."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int], *, stride: Size = 1, relu: bool = True,
                 rng: np.random.Generator, make: Callable[[np.ndarray], Array]) -> None:
        super().__init__()
        padding = tuple(k // 2 for k in kernel)
        self.conv = Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, rng=rng, make=make)
        self.bn = BatchNorm(c_out, make=make)
        self.relu = relu

    def children(self):
        return [("conv", self.conv), ("bn", self.bn)]

    def forward(self, x):
        h = self.bn.forward(self.conv.forward(x))
        if self.relu:
            h = self._cache = engine.relu_owned(h)
        return h

    def backward(self, dout, *, input_grad=True):
        if self.relu:
            dout = F.relu_backward(dout, self._pop_cache())  # out > 0 exactly where the input was
        return self.conv.backward(self.bn.backward(dout), input_grad=input_grad)


class ResidualBlock(Layer):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, *, kernel1: tuple[int, int, int], stride: int,
                 rng: np.random.Generator, make: Callable[[np.ndarray], Array]) -> None:
        super().__init__()
        self.unit1 = ConvBN(c_in, c_out, kernel1, stride=(1, stride, stride), rng=rng, make=make)
        self.unit2 = ConvBN(c_out, c_out, (1, 3, 3), relu=False, rng=rng, make=make)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = ConvBN(c_in, c_out, (1, 1, 1), stride=(1, stride, stride), relu=False,
                                   rng=rng, make=make)

    def children(self):
        kids = [("conv1", self.unit1), ("conv2", self.unit2)]
        return kids + ([("shortcut", self.shortcut)] if self.shortcut is not None else [])

    def forward(self, x):
        h = self.unit2.forward(self.unit1.forward(x))
        s = x if self.shortcut is None else self.shortcut.forward(x)
        self._cache = out = engine.relu_owned(engine.add_owned(h, s))  # relu(h + s), written into h (fresh)
        return out

    def backward(self, dout):
        d = F.relu_backward(dout, self._pop_cache())
        dx = self.unit1.backward(self.unit2.backward(d))
        ds = d if self.shortcut is None else self.shortcut.backward(d)
        return engine.add_owned(dx, ds)  # dx + ds, in dx (fresh)


class NonLocal(Layer):
    """A :class:`~nlref.nn.NonLocalBlock` on (B, C, T, H, W) with a chosen attention extent.

    ``"spacetime"`` relates all T*H*W positions (a 3-D block). ``"space"`` folds
    time into the batch, so positions only see their own frame (a 2-D block on
    (B*T, C, H, W)); ``"time"`` folds space into the batch, so a position only
    sees the same pixel in other frames (a 1-D block on (B*H*W, C, T), without
    subsampling). Batch-norm statistics are the same in all three, because the
    set of values per channel is.
    """

    def __init__(self, channels: int, *, extent: str, options: dict, seed: int, make_xp: Any,
                 device: Any = None) -> None:
        self.training, self._cache = True, None
        if extent not in EXTENTS:
            raise ValueError(f"extent must be one of {EXTENTS}, got {extent!r}")
        self.extent = extent
        dims = {"spacetime": 3, "space": 2, "time": 1}[extent]
        options = dict(options)
        if extent == "time":  # one frame's pixel over time: never subsampled, so nothing to place
            options["sub_sample"] = False
            options.pop("pool", None)
        self.block = NonLocalBlock(channels, dims=dims, seed=seed, xp=make_xp, device=device, **options)

    # the block's own dicts (it replaces ``grads`` on every backward)
    params = property(lambda self: self.block.params)
    grads = property(lambda self: self.block.grads)
    buffers = property(lambda self: self.block.buffers)

    def _fold(self, x):
        xp = B.array_namespace(x)
        b, c, t, h, w = x.shape
        if self.extent == "space":
            return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3, 4)), (b * t, c, h, w))
        if self.extent == "time":
            return xp.reshape(xp.permute_dims(x, (0, 3, 4, 1, 2)), (b * h * w, c, t))
        return x

    def _unfold(self, y, shape):
        xp = B.array_namespace(y)
        b, c, t, h, w = shape
        if self.extent == "space":
            return xp.permute_dims(xp.reshape(y, (b, t, c, h, w)), (0, 2, 1, 3, 4))
        if self.extent == "time":
            return xp.permute_dims(xp.reshape(y, (b, h, w, c, t)), (0, 3, 4, 1, 2))
        return y

    def positions(self, size):
        """The spatial shape the block sees for (T, H, W) maps: (T, H, W), a frame's (H, W), or (T,)."""
        return tuple({"spacetime": size, "space": size[1:], "time": size[:1]}[self.extent])

    def too_small(self, size):
        """Why (T, H, W) maps are too small for this block's subsampling (a str), or None when they are not."""
        return self.block._too_small(self.positions(size))

    def forward(self, x, *, return_attention=False):
        self.block.training = self.training
        channels_last = engine.stored_channels_last(x)
        self._cache = (tuple(x.shape), channels_last)
        out = self.block.forward(self._fold(_contiguous(x)), return_attention=return_attention)
        z, attention = out if return_attention else (out, None)
        z = _store_like(self._unfold(z, x.shape), channels_last)
        return (z, attention) if return_attention else z

    def backward(self, dout):
        shape, channels_last = self._pop_cache()
        return _store_like(self._unfold(self.block.backward(self._fold(_contiguous(dout))), shape), channels_last)


def _conv_size(size, conv):
    """(T, H, W) after ``conv``: ``(n + 2 p - k) // s + 1`` per axis."""
    def triple(v):
        return (int(v),) * 3 if isinstance(v, (int, np.integer)) else tuple(int(u) for u in v)
    kernel = conv.params["weight"].shape[2:]
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(size, kernel, triple(conv.stride), triple(conv.padding)))


def _contiguous(x):
    """x stored the usual (row-major) way, which the block's flattening reads without a copy."""
    xp = B.array_namespace(x)
    return B.native_namespace(xp).ascontiguousarray(x) if B.supports_out(xp) else x


def _store_like(z, channels_last):
    """z stored channels-last when the block's input was (as convolution outputs are), so that
    the elementwise layers after it see operands of one storage order (mixed orders are slow)."""
    if not channels_last:
        return z
    xp = B.array_namespace(z)
    return engine.channels_first(xp, engine.channels_last(z))


# --------------------------------------------------------------------------- the network
def nonlocal_slots(count, *, stage="res3", blocks=(1, 2, 2)):
    """Where ``count`` non-local blocks go: a list of ``(stage, j)`` = "before residual block j".

    One block goes before the last residual block of ``stage``; more blocks fill
    ``(res3, 1), (res4, 1), (res3, 0), (res4, 0)`` (see the module docstring).
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"nonlocal count must be an integer >= 0, got {count!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if count == 0:
        return []
    if count == 1:
        return [(stage, blocks[STAGES.index(stage)] - 1)]
    slots = [s for s in _MANY if s[1] < blocks[STAGES.index(s[0])]]
    if count > len(slots):
        raise ValueError(f"nonlocal count must be at most {len(slots)} for blocks={tuple(blocks)}, got {count}")
    return slots[:count]


def _as_param(net, host):
    """Host data as one of ``net``'s arrays: its library (``net.xp``), dtype and device."""
    return B.asarray(np.asarray(host), xp=net.xp, dtype=getattr(net.xp, net.dtype), device=net.device)


def _like_network(net, a, name, weight):
    """``a`` (``x`` or ``dlogits``) must have the network's dtype, library and ``weight``'s device; returns
    its namespace."""
    xp = B.array_namespace(a, names=[name])
    if B.dtype_name(a.dtype) != net.dtype:
        raise TypeError(f"{name} must be {net.dtype} like the network, got {B.dtype_name(a.dtype)}")
    if B.compat_namespace(xp) is not net.xp and not (B.is_numpy(xp) and B.is_numpy(net.xp)):
        raise TypeError(f"{name} is a {getattr(xp, '__name__', xp)} array but the network lives in "
                        f"{getattr(net.xp, '__name__', net.xp)}")
    B.check_on_device(a, weight, name=name, owner="network")
    return xp


def _check_state(state):
    """A state dict must be a mapping of names to arrays (a list's items were reported as unexpected keys)."""
    if not hasattr(state, "keys") or not hasattr(state, "__getitem__"):
        raise TypeError(f"state must be a dict of arrays (a state_dict()), got {type(state).__name__}")


def _check_dlogits(net, dlogits, shape, weight):
    """``dlogits`` must have the logits' shape and the network's library, dtype and device: a float64
    gradient made a float32 network's gradients float64, and the optimiser's step then its weights."""
    _like_network(net, dlogits, "dlogits", weight)
    if tuple(dlogits.shape) != tuple(shape):
        raise ValueError(f"dlogits must have the logits' shape {tuple(shape)}, got {tuple(dlogits.shape)}")


class VideoNet(B.KeepsNamespace):
    """A small ResNet video classifier (C2D or I3D) with optional non-local blocks.

    Parameters
    ----------
    flavour : {"c2d", "i3d", "i3d_3x1x1"}
        C2D: every convolution is 1xkxk (frames are processed independently up to
        the global pool). I3D: the first convolution of every other residual block
        is inflated to 3x3x3, or to 3x1x1.
    nonlocal_blocks : int
        How many non-local blocks (0 for the baseline); placed by :func:`nonlocal_slots`.
    stage : {"res2", "res3", "res4"}
        The stage of a single non-local block.
    mode : str
        Pairwise function of the non-local blocks (:data:`nlref.nn.nonlocal_op.MODES`).
    extent : {"spacetime", "space", "time"}
        What each non-local block attends over (see :class:`NonLocal`).
    nonlocal_options : dict, optional
        Passed to :class:`~nlref.nn.NonLocalBlock`: ``sub_sample``, ``bn_layer``,
        ``scale``, ``pool``, ``inter_channels``, ``chunk_size``.
    in_channels, num_classes : int
    widths : 3 ints
        Channels of res2, res3, res4 (the stem has ``widths[0]``).
    blocks : 3 ints
        Residual blocks per stage.
    dropout : float
        Dropout probability before the classifier (0.5 in the paper).
    dtype : {"float32", "float64"}
    seed : int
        Seeds every initial weight (and the dropout masks when ``forward`` gets no seed).
    xp : module, optional
        Array library of the parameters (numpy by default).
    device : device, optional
        Device of the parameters (a ``cupy.cuda.Device``, ``array_api_strict.Device(...)``);
        None: ``xp``'s default. Inputs must be on it (nothing is moved silently).

    Notes
    -----
    One network object is not meant to run in several threads at once: its layers keep the
    cache of their last forward pass for the backward pass. Different objects, copies included,
    are independent in any threads; ``copy.deepcopy`` and ``pickle`` copy one whole (its array
    library by name), also between a forward pass and its backward pass.
    """

    def __init__(self, flavour: str = "c2d", *, nonlocal_blocks: int = 0, stage: str = "res3",
                 mode: str = "embedded_gaussian", extent: str = "spacetime", nonlocal_options: dict | None = None,
                 in_channels: int = 1, num_classes: int = 2, widths: Sequence[int] = (16, 32, 64),
                 blocks: Sequence[int] = (1, 2, 2), dropout: float = 0.5, dtype: DType = "float32", seed: int = 0,
                 xp: Any = None, device: Any = None) -> None:
        if flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if extent not in EXTENTS:
            raise ValueError(f"extent must be one of {EXTENTS}, got {extent!r}")
        widths, blocks = tuple(widths), tuple(blocks)
        for name, value in (("widths", widths), ("blocks", blocks)):
            if len(value) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                                          for v in value):
                raise ValueError(f"{name} must be 3 positive integers, got {value!r}")
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(dropout, bool) or not (isinstance(dropout, numbers.Real) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        dtype = dtype if isinstance(dtype, str) else B.dtype_name(dtype)
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        options = dict(nonlocal_options or {})
        allowed = {"sub_sample", "bn_layer", "scale", "pool", "inter_channels", "chunk_size"}
        if set(options) - allowed:
            raise ValueError(f"nonlocal_options may hold {sorted(allowed)}, got unknown {sorted(set(options) - allowed)}")
        self.slots = nonlocal_slots(nonlocal_blocks, stage=stage, blocks=blocks)  # validates the count first
        self.config = {"flavour": flavour, "nonlocal_blocks": int(nonlocal_blocks), "stage": stage, "mode": mode,
                       "extent": extent, "nonlocal_options": options, "in_channels": int(in_channels),
                       "num_classes": int(num_classes), "widths": list(widths), "blocks": list(blocks),
                       "dropout": float(dropout), "dtype": dtype}
        self.xp = B.library(xp)
        self.device = device
        self.dtype = dtype
        self.dropout = float(dropout)
        self.training = True
        rng = B.rng(seed)
        self._dropout_rng = np.random.default_rng(rng.integers(2**63))

        make = functools.partial(_as_param, self)

        kernel1 = {"c2d": (1, 3, 3), "i3d": (3, 3, 3), "i3d_3x1x1": (3, 1, 1)}[flavour]
        self.stem = ConvBN(in_channels, widths[0], (1, 3, 3), stride=(1, 2, 2), rng=rng, make=make)
        self.layers = [("stem", self.stem)]
        c_in = widths[0]
        for s, (name, width, count) in enumerate(zip(STAGES, widths, blocks)):
            for j in range(count):
                if (name, j) in self.slots:
                    nl = NonLocal(c_in, extent=extent, options={"mode": mode, "dtype": dtype, **options},
                                  seed=int(rng.integers(2**31)), make_xp=xp if xp is not None else np, device=device)
                    self.layers.append((f"{name}.nl{j}", nl))
                k1 = kernel1 if (flavour != "c2d" and j % 2 == 0) else (1, 3, 3)
                stride = 2 if (j == 0 and s > 0) else 1
                self.layers.append((f"{name}.{j}", ResidualBlock(c_in, width, kernel1=k1, stride=stride,
                                                                 rng=rng, make=make)))
                c_in = width
        self.fc = Layer()
        bound = 1.0 / math.sqrt(c_in)
        self.fc.params = {"weight": make(rng.uniform(-bound, bound, (num_classes, c_in))),
                          "bias": make(rng.uniform(-bound, bound, num_classes))}
        self.layers.append(("fc", self.fc))
        self._head_cache = None
        self._leaves = dict(self._walk())

    # ------------------------------------------------------------------ bookkeeping
    def _walk(self):
        """(dotted name, leaf layer) for every layer that owns parameters."""
        def visit(prefix, layer):
            kids = layer.children()
            if not kids:
                yield prefix, layer
            for name, kid in kids:
                yield from visit(f"{prefix}.{name}", kid)
        for name, layer in self.layers:
            yield from visit(name, layer)

    def _collect(self, attr):
        return {f"{name}.{key}": value for name, leaf in self._leaves.items()
                for key, value in getattr(leaf, attr).items()}

    @property
    def params(self):
        """Every parameter, by dotted name (the arrays themselves, not copies)."""
        return self._collect("params")

    @property
    def grads(self):
        """dL/d(parameter) from the last :meth:`backward`, same keys as :attr:`params`."""
        return self._collect("grads")

    @property
    def buffers(self):
        """Batch-norm running statistics, by dotted name."""
        return self._collect("buffers")

    def _owner(self, key):
        name, _, leaf_key = key.rpartition(".")
        while name and name not in self._leaves:
            name, _, head = name.rpartition(".")
            leaf_key = f"{head}.{leaf_key}"
        if name not in self._leaves:
            raise KeyError(key)
        return self._leaves[name], leaf_key

    def set_param(self, key, value):
        """Replace parameter ``key`` (used by the optimiser; works for immutable array libraries)."""
        leaf, leaf_key = self._owner(key)
        leaf.params[leaf_key] = value

    def no_decay(self, key):
        """True for parameters that get no weight decay: batch-norm gamma/beta and biases."""
        leaf_key = key.rsplit(".", 1)[-1]
        return leaf_key in ("gamma", "beta", "bias")

    def num_params(self):
        return int(sum(math.prod(v.shape) for v in self.params.values()))

    def _set_training(self, flag):
        self.training = flag
        for layer in list(self._leaves.values()) + [layer for _, layer in self.layers]:
            layer.training = flag
        return self

    def train(self):
        """Batch statistics in BN (and their running averages updated), dropout on. Returns self."""
        return self._set_training(True)

    def eval(self):
        """BN's running statistics, no dropout. Returns self."""
        return self._set_training(False)

    # ------------------------------------------------------------------ passes
    def _check_input(self, x):
        B.array_namespace(x, names=["x"])  # an array (a list has no ndim), before its shape is read
        c = self.config["in_channels"]
        if x.ndim != 5 or x.shape[1] != c:
            raise ValueError(f"x must have shape (B, {c}, T, H, W), got {tuple(x.shape)}")
        if min(x.shape) < 1:
            raise ValueError(f"x must hold at least one clip of at least one frame of 1 x 1 pixels, got shape "
                             f"{tuple(x.shape)}")
        self._check_size(tuple(x.shape[2:]))
        return _like_network(self, x, "x", self.stem.conv.params["weight"])

    def _block_inputs(self, size):
        """(name, non-local layer, (T, H, W) of the maps it gets) for input frames of (T, H, W) ``size``."""
        for name, layer in self.layers[:-1]:
            if isinstance(layer, NonLocal):
                yield name, layer, size
            elif isinstance(layer, ConvBN):
                size = _conv_size(size, layer.conv)
            elif isinstance(layer, ResidualBlock):
                size = _conv_size(_conv_size(size, layer.unit1.conv), layer.unit2.conv)

    def _check_size(self, size):
        """Refuse, before any work, input too small for a non-local block's subsampling, in the input's terms."""
        for name, layer, maps in self._block_inputs(size):
            if layer.too_small(maps):
                t, h, w = size
                smallest = next((n for n in range(1, 4097)
                                 if all(not nl.too_small(m) for _, nl, m in self._block_inputs((t, n, n)))), None)
                frames = f"{t} frame(s) of {h}x{w} pixels" if type(self) is VideoNet else f"{h}x{w} pixels"
                takes = f" (its smallest square input is {smallest}x{smallest} pixels)" if smallest else ""
                raise ValueError(f"x of {frames} is too small for this network{takes}: its non-local block {name!r} "
                                 f"would get {'x'.join(map(str, layer.positions(maps)))} positions, too few for its "
                                 f"sub-sampling kernel {layer.block.kernel}; use larger "
                                 "input or nonlocal_options={'sub_sample': False}")

    def forward(self, x, *, dropout_seed=None, return_attention=False):
        """Logits for a batch of clips.

        Parameters
        ----------
        x : array, shape (B, in_channels, T, H, W)
        dropout_seed : int, optional
            Seeds this step's dropout mask (the trainer passes one per step so a
            resumed run draws the same masks); drawn from the network's own
            generator when omitted.
        return_attention : bool
            Also return ``{layer name: (B', N, N') attention}`` of every non-local block.

        Returns
        -------
        logits : array, shape (B, num_classes)
        """
        return_attention = B.check_flag("return_attention", return_attention)
        self._head_cache = None  # a forward that fails leaves no cache for a backward to misuse
        self._check_input(x)
        if dropout_seed is not None and (isinstance(dropout_seed, bool)
                                         or not isinstance(dropout_seed, (int, np.integer))):
            raise TypeError(f"dropout_seed must be an int or None, got {dropout_seed!r}")
        attention = {}
        h = x
        for name, layer in self.layers[:-1]:
            if return_attention and isinstance(layer, NonLocal):
                h, attention[name] = layer.forward(h, return_attention=True)
            else:
                h = layer.forward(h)
        pooled, pool_cache = F.global_avgpool_forward(h)
        if self.training and self.dropout > 0:
            seed = int(self._dropout_rng.integers(2**63)) if dropout_seed is None else int(dropout_seed)
            pooled, drop_cache = F.dropout_forward(pooled, self.dropout, training=True, seed=seed)
        else:
            drop_cache = None
        logits, fc_cache = F.linear_forward(pooled, self.fc.params["weight"], self.fc.params["bias"])
        self._head_cache = (pool_cache, drop_cache, fc_cache, tuple(logits.shape))
        return (logits, attention) if return_attention else logits

    def backward(self, dlogits, *, input_grad=True):
        """Back-propagate dL/dlogits through the network; sets :attr:`grads`, returns dL/dx.

        With ``input_grad=False`` the gradient with respect to the clips is not
        computed (training needs only the parameters' gradients) and None is returned.
        """
        if self._head_cache is None:
            raise RuntimeError("VideoNet.backward needs a forward pass before it (and runs once per forward)")
        input_grad = B.check_flag("input_grad", input_grad)
        pool_cache, drop_cache, fc_cache, shape = self._head_cache
        _check_dlogits(self, dlogits, shape, self.fc.params["weight"])
        self._head_cache = None
        d, self.fc.grads["weight"], self.fc.grads["bias"] = F.linear_backward(dlogits, fc_cache)
        if drop_cache is not None:
            d = F.dropout_backward(d, drop_cache)
        d = F.global_avgpool_backward(d, pool_cache)
        for _, layer in reversed(self.layers[1:-1]):
            d = layer.backward(d)
        d = self.stem.backward(d, input_grad=input_grad)
        return d

    # ------------------------------------------------------------------ state
    def state_dict(self):
        """Host NumPy copies of every parameter and buffer, by dotted name."""
        return {k: np.array(B.to_numpy(v)) for k, v in {**self.params, **self.buffers}.items()}

    def load_state_dict(self, state):
        """Load parameters and buffers; the whole dict is validated before anything changes.

        Raises
        ------
        ValueError
            Missing or unexpected keys, a wrong shape, or non-finite values (the key is named).
        """
        _check_state(state)
        own = {**self.params, **self.buffers}
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise ValueError(f"state dict does not fit this network: missing {missing[:5]}, unexpected {extra[:5]}")
        # checked copies in the network's dtype: later changes to the caller's dict do not leak in
        host = {key: state_entry(f"state dict entry {key!r}", state[key], ref.shape, self.dtype)
                for key, ref in own.items()}
        for key, value in host.items():
            array = _as_param(self, value)
            leaf, leaf_key = self._owner(key)
            (leaf.params if leaf_key in leaf.params else leaf.buffers)[leaf_key] = array
        return self

    def __repr__(self):
        c = self.config
        return (f"VideoNet({c['flavour']!r}, nonlocal_blocks={c['nonlocal_blocks']}, slots={self.slots}, "
                f"mode={c['mode']!r}, extent={c['extent']!r}, widths={tuple(c['widths'])}, "
                f"blocks={tuple(c['blocks'])}, params={self.num_params()})")


# =========================================================================== a small space-time transformer
class _Collected(B.KeepsNamespace):
    """``params``, ``grads`` and ``buffers`` as :class:`VideoNet` has them, gathered from ``_leaves``.

    (A base class, so that the API pages keep one documented target for each of the three names.)
    """

    @property
    def params(self):
        return self._collect("params")

    @property
    def grads(self):
        return self._collect("grads")

    @property
    def buffers(self):
        return {}  # no batch norm, no running statistics


class VideoTransformer(_Collected):
    r"""A small space-time transformer for clips, trained by the hand-written backward passes.

    ::

        tubelets  (B, C, T, H, W) -> (B, N, C pt ph pw), N = T/pt * H/ph * W/pw
        embed     linear to E channels                                   (B, N, E)
        positions + PositionalEncoding((T', H', W'), E)                  (B, N, E)
        [cls]     a learned class token in front                         (B, 1 + N, E)
        blocks    depth x TransformerBlock (pre-norm, every token attends to all of space-time)
        norm      LayerNorm
        pool      mean over the N tokens, or the class token             (B, E)
        head      linear to the classes                                  (B, classes)

    It has the interface of :class:`VideoNet` that :func:`nlref.train.train` and the
    optimisers use (``params``, ``grads``, ``buffers``, ``set_param``, ``no_decay``,
    ``train``/``eval``, ``forward(x, dropout_seed=)``, ``backward``, ``state_dict``,
    ``load_state_dict``), with dotted names: ``patch_embed.weight``, ``pos.time``,
    ``blocks.0.self_attn.in_proj_weight`` (PyTorch's names inside a block), ``norm.weight``,
    ``head.weight``... It has no dropout (``dropout_seed`` is accepted and unused).

    Parameters
    ----------
    frames, size : int
        The clip's T and H = W.
    in_channels, num_classes : int
    tubelet : 3 ints
        (pt, ph, pw), dividing (T, H, W): (1, 4, 4) makes one token per 4x4 patch of each frame.
    embed_dim, depth, num_heads, mlp_dim : int
        ``E``, the number of blocks, heads per block, the MLP's width.
    pos : {"learned", "sinusoidal"}
        Factorised space-time encodings (see :class:`~nlref.nn.attention.PositionalEncoding`).
    pool : {"mean", "cls"}
    dtype, seed, xp, device :
        As :class:`VideoNet`.

    Notes
    -----
    Threads and copies: as :class:`VideoNet`.
    """

    POOLS = ("mean", "cls")

    def __init__(self, *, frames=8, size=16, in_channels=1, num_classes=2, tubelet=(1, 4, 4), embed_dim=32,
                 depth=2, num_heads=2, mlp_dim=64, pos="learned", pool="mean", dtype="float32", seed=0, xp=None,
                 device=None):
        from .attention import ENCODINGS, PositionalEncoding, TransformerBlock

        ints = {"frames": frames, "size": size, "in_channels": in_channels, "num_classes": num_classes,
                "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_dim": mlp_dim}
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        tubelet = tuple(tubelet) if isinstance(tubelet, (tuple, list)) else (tubelet,)
        if len(tubelet) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                                        for v in tubelet):
            raise ValueError(f"tubelet must be 3 positive integers (pt, ph, pw), got {tubelet!r}")
        if frames % tubelet[0] or size % tubelet[1] or size % tubelet[2]:
            raise ValueError(f"tubelet {tubelet} must divide the clip (frames, size, size) = "
                             f"({frames}, {size}, {size})")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide embed_dim ({embed_dim})")
        if pos not in ENCODINGS:
            raise ValueError(f"pos must be one of {ENCODINGS}, got {pos!r}")
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {self.POOLS}, got {pool!r}")
        dtype = dtype if isinstance(dtype, str) else B.dtype_name(dtype)
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.config = {"frames": int(frames), "size": int(size), "in_channels": int(in_channels),
                       "num_classes": int(num_classes), "tubelet": [int(v) for v in tubelet],
                       "embed_dim": int(embed_dim), "depth": int(depth), "num_heads": int(num_heads),
                       "mlp_dim": int(mlp_dim), "pos": pos, "pool": pool, "dtype": dtype}
        self.xp = B.library(xp)
        self.device = device
        self.dtype = dtype
        self.tubelet = tuple(int(v) for v in tubelet)
        self.grid = (frames // tubelet[0], size // tubelet[1], size // tubelet[2])
        self.num_tokens = math.prod(self.grid)
        self.training = True
        rng = B.rng(seed)

        make = functools.partial(_as_param, self)

        e, patch = int(embed_dim), int(in_channels) * math.prod(self.tubelet)
        self.patch_embed = Layer()
        self.patch_embed.params = {"weight": make(rng.uniform(-1, 1, (e, patch)) / math.sqrt(patch)),
                                   "bias": make(rng.uniform(-1, 1, e) / math.sqrt(patch))}
        self.pos = PositionalEncoding(self.grid, e, kind=pos, dtype=dtype, seed=int(rng.integers(2**31)), xp=xp,
                                      device=device)
        self.cls = Layer()
        if pool == "cls":
            self.cls.params = {"token": make(0.02 * rng.standard_normal((1, 1, e)))}
        self.blocks = [TransformerBlock(e, num_heads, mlp_dim, dtype=dtype, seed=int(rng.integers(2**31)), xp=xp,
                                        device=device)
                       for _ in range(depth)]
        self.norm = Layer()
        self.norm.params = {"weight": make(np.ones(e)), "bias": make(np.zeros(e))}
        self.head = Layer()
        bound = 1.0 / math.sqrt(e)
        self.head.params = {"weight": make(rng.uniform(-bound, bound, (num_classes, e))),
                            "bias": make(rng.uniform(-bound, bound, num_classes))}
        self._leaves = {"patch_embed": self.patch_embed, "pos": self.pos, "cls": self.cls, "norm": self.norm,
                        "head": self.head, **{f"blocks.{i}": b for i, b in enumerate(self.blocks)}}
        self._cache = None

    # ------------------------------------------------------------------ bookkeeping (as VideoNet)
    _collect = VideoNet._collect

    def _owner(self, key):
        for name, leaf in self._leaves.items():
            if key.startswith(name + ".") and key[len(name) + 1:] in leaf.params:
                return leaf, key[len(name) + 1:]
        raise KeyError(key)

    def set_param(self, key, value):
        """Replace parameter ``key`` (used by the optimiser)."""
        leaf, leaf_key = self._owner(key)
        leaf.params[leaf_key] = value

    def no_decay(self, key):
        """True for biases, LayerNorm gains, positional tables and the class token (no weight decay)."""
        return (key.endswith("bias") or key.startswith(("pos.", "cls.", "norm."))
                or ".norm1." in key or ".norm2." in key)

    def num_params(self):
        return int(sum(math.prod(v.shape) for v in self.params.values()))

    def train(self):
        """A flag only (no dropout, no batch norm). Returns self."""
        self.training = True
        return self

    def eval(self):
        """See :meth:`train`. Returns self."""
        self.training = False
        return self

    # ------------------------------------------------------------------ tubelets
    def _patches(self, x):
        """(B, C, T, H, W) -> (B, N, C pt ph pw), tokens row-major over the (T', H', W') grid."""
        xp = self.xp
        b, c = x.shape[0], x.shape[1]
        (t, h, w), (pt, ph, pw) = self.grid, self.tubelet
        x = xp.reshape(x, (b, c, t, pt, h, ph, w, pw))
        x = xp.permute_dims(x, (0, 2, 4, 6, 1, 3, 5, 7))
        return xp.reshape(x, (b, t * h * w, c * pt * ph * pw))

    def _unpatch(self, d, x_shape):
        xp = self.xp
        b, c = x_shape[0], x_shape[1]
        (t, h, w), (pt, ph, pw) = self.grid, self.tubelet
        d = xp.reshape(d, (b, t, h, w, c, pt, ph, pw))
        return xp.reshape(xp.permute_dims(d, (0, 4, 1, 5, 2, 6, 3, 7)), x_shape)

    # ------------------------------------------------------------------ passes
    def _check_input(self, x):
        B.array_namespace(x, names=["x"])  # an array (a list has no ndim), before its shape is read
        c, t, s = self.config["in_channels"], self.config["frames"], self.config["size"]
        if tuple(x.shape[1:]) != (c, t, s, s) or x.ndim != 5:
            raise ValueError(f"x must have shape (B, {c}, {t}, {s}, {s}) (the clip size the transformer was built "
                             f"for), got {tuple(x.shape)}")
        if x.shape[0] < 1:
            raise ValueError(f"x must hold at least one clip, got shape {tuple(x.shape)}")
        _like_network(self, x, "x", self.patch_embed.params["weight"])

    def forward(self, x, *, dropout_seed=None, return_attention=False):
        """Logits for a batch of clips, shape (B, num_classes).

        With ``return_attention``, also ``{"blocks.i": (B, h, N', N') attention}`` of every
        block (``N' = N + 1`` with a class token, which comes first).
        """
        return_attention = B.check_flag("return_attention", return_attention)
        self._cache = None  # a forward that fails leaves no cache for a backward to misuse
        self._check_input(x)
        xp, e = self.xp, self.config["embed_dim"]
        b = x.shape[0]
        n = self.num_tokens
        tokens, c_embed = F.linear_forward(xp.reshape(self._patches(x), (b * n, -1)),
                                           self.patch_embed.params["weight"], self.patch_embed.params["bias"])
        h = self.pos.forward(xp.reshape(tokens, (b, n, e)))
        if self.config["pool"] == "cls":
            token = self.cls.params["token"]
            h = xp.concat([xp.broadcast_to(token, (b, 1, e)), h], axis=1)
        attention = {}
        for i, block in enumerate(self.blocks):
            if return_attention:
                h, attention[f"blocks.{i}"] = block.forward(h, return_attention=True)
            else:
                h = block.forward(h)
        h, c_norm = F.layernorm_forward(h, self.norm.params["weight"], self.norm.params["bias"])
        pooled = h[:, 0, :] if self.config["pool"] == "cls" else xp.mean(h, axis=1)
        logits, c_head = F.linear_forward(pooled, self.head.params["weight"], self.head.params["bias"])
        self._cache = (tuple(x.shape), tuple(h.shape), c_embed, c_norm, c_head)
        return (logits, attention) if return_attention else logits

    def backward(self, dlogits, *, input_grad=True):
        """Back-propagate dL/dlogits; sets ``grads``, returns dL/dx (None with ``input_grad=False``)."""
        if self._cache is None:
            raise RuntimeError("VideoTransformer.backward needs a forward pass before it (and runs once per forward)")
        input_grad = B.check_flag("input_grad", input_grad)
        x_shape, h_shape, c_embed, c_norm, c_head = self._cache
        _check_dlogits(self, dlogits, (x_shape[0], self.config["num_classes"]), self.head.params["weight"])
        self._cache = None
        xp, e = self.xp, self.config["embed_dim"]
        b, m = h_shape[0], h_shape[1]
        dpooled, self.head.grads["weight"], self.head.grads["bias"] = F.linear_backward(dlogits, c_head)
        if self.config["pool"] == "cls":
            rest = xp.zeros((b, m - 1, e), dtype=dpooled.dtype, device=B.device(dpooled))
            dh = xp.concat([dpooled[:, None, :], rest], axis=1)
        else:
            dh = xp.broadcast_to(dpooled[:, None, :] / m, (b, m, e))
        dh, self.norm.grads["weight"], self.norm.grads["bias"] = F.layernorm_backward(dh, c_norm)
        for block in reversed(self.blocks):
            dh = block.backward(dh)
        if self.config["pool"] == "cls":
            self.cls.grads["token"] = xp.sum(dh[:, :1, :], axis=0, keepdims=True)
            dh = dh[:, 1:, :]
        dh = self.pos.backward(dh)
        dp, self.patch_embed.grads["weight"], self.patch_embed.grads["bias"] = F.linear_backward(
            xp.reshape(dh, (b * self.num_tokens, e)), c_embed)
        if not input_grad:
            return None
        return self._unpatch(xp.reshape(dp, (b, self.num_tokens, -1)), x_shape)

    # ------------------------------------------------------------------ state
    def state_dict(self):
        """Host NumPy copies of every parameter, by dotted name."""
        return {k: np.array(B.to_numpy(v)) for k, v in self.params.items()}

    def load_state_dict(self, state):
        """Load parameters; the whole dict is validated before anything changes (ValueError naming the key)."""
        _check_state(state)
        own = self.params
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise ValueError(f"state dict does not fit this network: missing {missing[:5]}, unexpected {extra[:5]}")
        # checked copies in the network's dtype: later changes to the caller's dict do not leak in
        host = {key: state_entry(f"state dict entry {key!r}", state[key], ref.shape, self.dtype)
                for key, ref in own.items()}
        for key, value in host.items():
            self.set_param(key, _as_param(self, value))
        return self

    def __repr__(self):
        c = self.config
        return (f"VideoTransformer(tubelet={tuple(c['tubelet'])}, tokens={self.num_tokens}, "
                f"embed_dim={c['embed_dim']}, "
                f"depth={c['depth']}, num_heads={c['num_heads']}, mlp_dim={c['mlp_dim']}, pos={c['pos']!r}, "
                f"pool={c['pool']!r}, params={self.num_params()})")


# =========================================================================== a small 2-D residual network
class ImageResNet(VideoNet):
    """A shallow 2-D residual image classifier with optional non-local blocks (``dims=2``).

    Built for :mod:`nlref.data.pairs2d`, whose ceiling binds only networks that see little
    (see :attr:`local_receptive_field`)::

        stem   conv 3x3, stride 1 -> BN -> ReLU                     (B, width, H, W)
        res2   ``blocks`` residual blocks of width ``width``, stride 1
        head   global average pool -> dropout -> fully connected    (B, classes)

    The layers are those of :class:`VideoNet` on a one-frame time axis (every
    convolution is 1x3x3), so parameters, state dicts, the optimisers and the trainer
    treat both networks alike. ``nonlocal_blocks`` blocks go right before the last
    residual blocks (one: before the last, as in the paper); each relates all H*W
    positions of an image (a 2-D :class:`~nlref.nn.NonLocalBlock`). Names:
    ``"stem.conv.weight"``, ``"res2.0.conv1.conv.weight"``, ``"res2.nl0.theta.weight"``,
    ``"fc.weight"``.

    Parameters
    ----------
    nonlocal_blocks : int
        0 to ``blocks``.
    mode : str
        Pairwise function of the non-local blocks.
    nonlocal_options : dict, optional
        As for :class:`VideoNet`.
    in_channels, num_classes, width, blocks : int
    dropout : float
        Before the classifier, in [0, 1).
    dtype, seed, xp, device
        As for :class:`VideoNet`.
    """

    def __init__(self, *, nonlocal_blocks: int = 0, mode: str = "embedded_gaussian",
                 nonlocal_options: dict | None = None, in_channels: int = 1, num_classes: int = 2,
                 width: int = 16, blocks: int = 1, dropout: float = 0.0, dtype: DType = "float32", seed: int = 0,
                 xp: Any = None, device: Any = None) -> None:
        def positive(name, value, low=1):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
            return int(value)

        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width),
                            ("blocks", blocks)):
            positive(name, value)
        positive("nonlocal_blocks", nonlocal_blocks, 0)
        if nonlocal_blocks > blocks:
            raise ValueError(f"nonlocal_blocks must be at most blocks ({blocks}), got {nonlocal_blocks}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(dropout, bool) or not (isinstance(dropout, numbers.Real) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        dtype = dtype if isinstance(dtype, str) else B.dtype_name(dtype)
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        options = dict(nonlocal_options or {})
        allowed = {"sub_sample", "bn_layer", "scale", "pool", "inter_channels", "chunk_size"}
        if set(options) - allowed:
            raise ValueError(f"nonlocal_options may hold {sorted(allowed)}, "
                             f"got unknown {sorted(set(options) - allowed)}")
        self.slots = [("res2", j) for j in range(blocks - nonlocal_blocks, blocks)]
        self.config = {"nonlocal_blocks": int(nonlocal_blocks), "mode": mode, "nonlocal_options": options,
                       "in_channels": int(in_channels), "num_classes": int(num_classes), "width": int(width),
                       "blocks": int(blocks), "dropout": float(dropout), "dtype": dtype}
        self.xp = B.library(xp)
        self.device = device
        self.dtype, self.dropout, self.training = dtype, float(dropout), True
        rng = B.rng(seed)
        self._dropout_rng = np.random.default_rng(rng.integers(2**63))

        make = functools.partial(_as_param, self)

        self.stem = ConvBN(in_channels, width, (1, 3, 3), stride=1, rng=rng, make=make)
        self.layers = [("stem", self.stem)]
        for j in range(blocks):
            if ("res2", j) in self.slots:
                nl = NonLocal(width, extent="space", options={"mode": mode, "dtype": dtype, **options},
                              seed=int(rng.integers(2**31)), make_xp=xp if xp is not None else np, device=device)
                self.layers.append((f"res2.nl{j}", nl))
            self.layers.append((f"res2.{j}", ResidualBlock(width, width, kernel1=(1, 3, 3), stride=1,
                                                           rng=rng, make=make)))
        self.fc = Layer()
        bound = 1.0 / math.sqrt(width)
        self.fc.params = {"weight": make(rng.uniform(-bound, bound, (num_classes, width))),
                          "bias": make(rng.uniform(-bound, bound, num_classes))}
        self.layers.append(("fc", self.fc))
        self._head_cache = None
        self._leaves = dict(self._walk())

    @property
    def local_receptive_field(self):
        """Side in pixels of the square one unit of the last feature map sees through the convolutions.

        Computed from the layers themselves: each convolution of kernel ``k`` and stride
        ``s`` adds ``(k - 1) * jump`` and multiplies ``jump`` (the input pixels between
        neighbouring units) by ``s``; a residual block's widest path is its two
        convolutions (the shortcut is the identity or 1x1). A non-local block sees the
        whole image, so with one this is what the rest of the network sees locally; without
        one it is the network's receptive field.
        """
        rf, jump = 1, 1

        def conv(unit):
            nonlocal rf, jump
            kh = unit.conv.params["weight"].shape[-2]          # kernels and strides are square here
            stride = unit.conv.stride
            sh = stride if isinstance(stride, (int, np.integer)) else tuple(stride)[-2]
            rf += (kh - 1) * jump
            jump *= sh

        for _, layer in self.layers[:-1]:
            if isinstance(layer, ConvBN):
                conv(layer)
            elif isinstance(layer, ResidualBlock):
                conv(layer.unit1)
                conv(layer.unit2)
        return rf

    def _check_image(self, x):
        xp = B.array_namespace(x, names=["x"])
        c = self.config["in_channels"]
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"x must have shape (B, {c}, H, W), got {tuple(x.shape)}")
        if min(x.shape) < 1:
            raise ValueError(f"x must hold at least one image of at least 1 x 1 pixels, got shape {tuple(x.shape)}")
        return xp

    def forward(self, x, *, dropout_seed=None, return_attention=False):
        """Logits for a batch of images ``x`` of shape (B, in_channels, H, W); see :meth:`VideoNet.forward`.

        The attention of a block is (B, H*W, N'), N' the keys after any subsampling.
        """
        xp = self._check_image(x)
        b, c, h, w = x.shape
        return super().forward(xp.reshape(x, (b, c, 1, h, w)), dropout_seed=dropout_seed,
                               return_attention=return_attention)

    def backward(self, dlogits, *, input_grad=True):
        """Back-propagate dL/dlogits; sets :attr:`VideoNet.grads`, returns dL/dx (B, C, H, W) or None."""
        d = super().backward(dlogits, input_grad=input_grad)
        if d is None:
            return None
        xp = B.array_namespace(d)
        b, c, _, h, w = d.shape
        return xp.reshape(d, (b, c, h, w))

    def __repr__(self):
        c = self.config
        return (f"ImageResNet(nonlocal_blocks={c['nonlocal_blocks']}, mode={c['mode']!r}, width={c['width']}, "
                f"blocks={c['blocks']}, receptive_field={self.local_receptive_field}, params={self.num_params()})")
