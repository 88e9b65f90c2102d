r"""The non-local block (Wang et al., CVPR 2018, Eq. 6), with its backward pass by hand.

.. math::

    z = \mathrm{BN}(W_z\, y) + x, \qquad
    y_i = \frac{1}{\mathcal C(x)} \sum_j f(\theta(x_i), \phi(x_j))\, g(x_j)

``theta``, ``phi``, ``g`` and ``W_z`` are 1x1 convolutions; ``theta``, ``phi``
and ``g`` map ``C`` channels to ``inter_channels`` (``C // 2`` by default, the
bottleneck), ``W_z`` maps them back. With ``sub_sample`` the keys and values are
max-pooled ((1, 2, 2) in 3-D, (2, 2) in 2-D, 2 in 1-D): after the ``phi`` and
``g`` convolutions (``pool="after"``, the paper and the AlexHex7 PyTorch port)
or on ``x`` before them (``pool="before"``, the official Caffe2 code), or over
the flattened (row-major) position sequence after phi and g, ``pool_kernel``
consecutive positions at a time (``pool="flattened"``, the titu1994 Keras port's
``MaxPool1D`` "compression"). BN's
gamma starts at 0 (or ``W_z`` at 0 when ``bn_layer=False``), so a new block is
exactly the identity and can be inserted into a trained network.

The block reads and writes the weight layouts of five PyTorch peers and of the
Keras port (the tables
live in :mod:`nlref.nn.layouts`; see :meth:`NonLocalBlock.load_state_dict` and
``docs/nonlocal_block.md``), and has
the options those peers need: a numeric logit scale, the pool's kernel and
stride, ``W_z`` and the projections theta, phi, g without a bias, BN's eps and momentum.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .._typing import DType, Size
from .. import backend as B
from . import engine
from . import functional as F
from .nonlocal_op import SOFTMAX_MODES, cached_attention, check_mode, nonlocal_backward, nonlocal_forward
from .nonlocal_op import attention_map as _attention_map
from . import layouts as _layouts
from ._state import state_entry, whole_count
from .layouts import LAYOUTS

__all__ = ["NonLocalBlock"]

POOLS = ("after", "before", "flattened")


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _scale_option(value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and value > 0:
        return float(value)
    raise ValueError(f"scale must be True, False or a positive finite number, got {value!r}")


def check_options(*, mode, sub_sample, scale, pool):
    """Refuse block options that contradict each other; ``nlref.train.TrainConfig`` asks before any block is built.

    The messages name the arguments without ``=`` so that a command line can put its flags in
    their place (``nlref train``'s ``--scale``, ``--no-sub-sample``).
    """
    if scale is not False and mode not in SOFTMAX_MODES:
        shown = "" if scale is True else f" {scale!r}"
        raise ValueError(f"scale{shown} applies to the softmax modes {SOFTMAX_MODES}, not mode {mode!r}: leave scale "
                         "out, or choose one of those modes")
    if not sub_sample and pool != "after":  # "after", the default, is what a block without subsampling says
        raise ValueError(f"pool {pool!r} places the subsampling, and sub_sample turns it off: leave one of them out")


def _kernel_option(name, value, dims):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,) * dims
    if not isinstance(value, (tuple, list)) or len(value) != dims:
        raise ValueError(f"{name} must be an int or a tuple of {dims} ints (one per spatial axis), got {value!r}")
    return tuple(_positive_int(name, v) for v in value)


class NonLocalBlock(B.KeepsNamespace):
    """A non-local block with hand-written forward and backward passes.

    Parameters
    ----------
    in_channels : int
        ``C``, the channels of the input.
    mode : {"embedded_gaussian", "gaussian", "dot_product", "concatenation"}
        The pairwise function (see :mod:`nlref.nn.nonlocal_op`).
    inter_channels : int, optional
        Bottleneck width of theta, phi and g; default ``max(C // 2, 1)``.
    dims : {1, 2, 3}
        Spatial axes of the input: (B, C, L), (B, C, H, W) or (B, C, T, H, W).
    sub_sample : bool
        Max-pool the keys and values (N' = N / 2, N / 4 or N / 4 for 1, 2, 3 dims).
    bn_layer : bool
        Batch norm after W_z (gamma = 0 at start); without it W_z starts at 0.
    scale : bool or float
        Multiply the softmax logits: ``True`` by ``1/sqrt(d)`` (Caffe2, mmcv,
        SlowFast; ``d = inter_channels``, or ``C`` in Gaussian mode), a number by
        that number (timm: ``in_channels ** -0.5``), ``False`` by 1 (the paper).
        Only for the softmax modes.
    pool : {"after", "before", "flattened"}
        Where subsampling happens (see the module docstring); ``"before"`` and
        ``"flattened"`` only with ``sub_sample``. ``"flattened"``
        max-pools the row-major sequence of the N key positions after phi and g,
        windows of ``pool_kernel`` consecutive positions (N' = N // pool_kernel;
        a window may straddle the end of a row).
    pool_kernel : int or tuple of int, optional
        The max-pool window, one size per spatial axis (SlowFast's ``pool_size``,
        e.g. (1, 2, 2), (2, 2, 2), (1, 3, 3)). Default: 2, (2, 2) or (1, 2, 2).
        With ``pool="flattened"`` one int, the number of consecutive positions
        (the Keras port's ``compression``; default 2). Only with ``sub_sample``.
    pool_stride : int or tuple of int, optional
        The pool's stride; default the kernel (non-overlapping windows, as every peer).
    W_z_bias : bool
        Give ``W_z`` a bias (default). mmcv drops it when a norm follows ``W_z``.
    projection_bias : bool
        Give theta, phi and g biases (default, as the PyTorch peers). The Keras
        port's 1x1 convolutions have none (``projection_bias=False``).
    bn_eps, bn_momentum : float
        Batch norm's epsilon and running-statistics momentum (PyTorch's defaults,
        1e-5 and 0.1; mmcv and SlowFast configs set others).
    chunk_size : int, optional
        Use the chunked (memory-efficient) non-local operation with this many keys per block.
    dtype : {"float32", "float64"}
    seed : int
        Seeds the initial weights (PyTorch's default conv init: uniform in
        +-1/sqrt(fan_in) for weights and biases).
    xp : module, optional
        The array library for the parameters: ``numpy`` (default), ``cupy``,
        ``array_api_strict``, ``torch``...
    device : device, optional
        The device of the parameters (and of the inputs the block takes): a
        ``cupy.cuda.Device``, a ``torch.device``, ``array_api_strict.Device(...)``;
        None: ``xp``'s default device. An input on another device is an error
        (nothing is moved behind the caller's back).

    Attributes
    ----------
    params : dict of arrays
        ``theta.weight`` (d, C), ``theta.bias`` (d,), ``phi.*``, ``g.*``,
        ``W_z.weight`` (C, d), ``W_z.bias`` (C,) (unless ``W_z_bias=False``),
        ``bn.gamma``, ``bn.beta`` (C,), ``w_f`` (2d,) for the concatenation.
        Gaussian mode has no theta and phi.
    grads : dict of arrays
        Same keys; set (not accumulated) by :meth:`backward`.
    buffers : dict of arrays
        ``bn.running_mean`` and ``bn.running_var`` when ``bn_layer``.
    training : bool
        Batch statistics (True, the initial state) or running statistics.
    loaded_layout : str or None
        The layout the last :meth:`load_state_dict` read (the detected one when
        it was not named); None before any load.

    Notes
    -----
    On NumPy the block keeps its (B, N, N') scratch buffers between calls (an
    :class:`nlref.nn.engine.NonLocalWorkspace`, ``nonlocal_forward``'s ``workspace``);
    :meth:`free_scratch` returns them.
    Like a PyTorch module, one block is not meant to run in several threads at once: it keeps
    the cache of its last forward pass for its backward pass, and its scratch buffers. Different
    blocks, copies included, are independent in any threads. ``copy.deepcopy`` and ``pickle``
    copy a block whole, also between a forward pass and its backward pass, without its scratch
    buffers (the copy makes its own).
    """

    def __init__(self, in_channels: int, *, mode: str = "embedded_gaussian", inter_channels: int | None = None,
                 dims: int = 2, sub_sample: bool = True, bn_layer: bool = True, scale: bool | float = False,
                 pool: str = "after", pool_kernel: Size | None = None, pool_stride: Size | None = None,
                 W_z_bias: bool = True, projection_bias: bool = True, bn_eps: float = 1e-5,
                 bn_momentum: float = 0.1, chunk_size: int | None = None,
                 dtype: DType = "float32", seed: int = 0, xp: Any = None, device: Any = None) -> None:
        self.in_channels = _positive_int("in_channels", in_channels)
        check_mode(mode)
        self.mode = mode
        if inter_channels is None:
            inter_channels = max(self.in_channels // 2, 1)
        self.inter_channels = _positive_int("inter_channels", inter_channels)
        if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)) or dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
        self.dims = int(dims)
        self.sub_sample = B.check_flag("sub_sample", sub_sample)
        self.bn_layer = B.check_flag("bn_layer", bn_layer)
        self.scale = _scale_option(scale)
        if pool not in POOLS:
            raise ValueError(f"pool must be 'after', 'before' or 'flattened', got {pool!r}")
        check_options(mode=mode, sub_sample=self.sub_sample, scale=self.scale, pool=pool)
        self.pool = pool
        if not self.sub_sample and (pool_kernel is not None or pool_stride is not None):
            raise ValueError(f"pool_kernel={pool_kernel!r} and pool_stride={pool_stride!r} need sub_sample=True")
        self.kernel = self.stride = None  # the pool's window and stride, one entry per spatial axis
        if self.sub_sample:
            axes = 1 if pool == "flattened" else self.dims  # flattened: one axis, the position sequence
            self.kernel = ((2,) if pool == "flattened" else F.pool_kernel(self.dims)) if pool_kernel is None \
                else _kernel_option("pool_kernel", pool_kernel, axes)
            self.stride = self.kernel if pool_stride is None else _kernel_option("pool_stride", pool_stride, axes)
        self.W_z_bias = B.check_flag("W_z_bias", W_z_bias)
        self.projection_bias = B.check_flag("projection_bias", projection_bias)
        for name, value in (("bn_eps", bn_eps), ("bn_momentum", bn_momentum)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if bn_eps <= 0:
            raise ValueError(f"bn_eps must be positive, got {bn_eps!r}")
        self.bn_eps, self.bn_momentum = float(bn_eps), float(bn_momentum)
        if chunk_size is not None:
            chunk_size = _positive_int("chunk_size", chunk_size)
        self.chunk_size = chunk_size
        name = dtype if isinstance(dtype, str) else B.dtype_name(dtype)
        if name not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype_name = name
        self.xp = B.library(xp)
        self.dtype = getattr(self.xp, name)
        self.device = device
        self.training = True
        self.loaded_layout = None
        self.num_batches_tracked = 0
        self._cache = None
        self._workspace = engine.NonLocalWorkspace() if B.is_numpy(self.xp) else None
        self.params = self._init_params(seed)
        self.buffers = {}
        if self.bn_layer:
            self.buffers = {"bn.running_mean": self._array(np.zeros(self.in_channels)),
                            "bn.running_var": self._array(np.ones(self.in_channels))}
        self.grads = {k: None for k in self.params}

    # ------------------------------------------------------------------ set-up
    def _array(self, host):
        return B.asarray(np.asarray(host), xp=self.xp, dtype=self.dtype, device=self.device)

    def _init_params(self, seed):
        rng = B.rng(seed)
        c, d = self.in_channels, self.inter_channels

        def uniform(shape, fan_in):
            bound = 1.0 / math.sqrt(fan_in)
            return self._array(rng.uniform(-bound, bound, size=shape))

        params = {}
        convs = ["g"] if self.mode == "gaussian" else ["theta", "phi", "g"]
        for name in convs:
            params[f"{name}.weight"] = uniform((d, c), c)
            params[f"{name}.bias"] = uniform((d,), c)  # drawn either way, as W_z's
            if not self.projection_bias:
                del params[f"{name}.bias"]
        if self.mode == "concatenation":
            params["w_f"] = uniform((2 * d,), 2 * d)
        if self.bn_layer:
            params["W_z.weight"] = uniform((c, d), d)
            params["W_z.bias"] = uniform((c,), d)  # drawn either way: the same weight without it
            params["bn.gamma"] = self._array(np.zeros(c))
            params["bn.beta"] = self._array(np.zeros(c))
        else:
            params["W_z.weight"] = self._array(np.zeros((c, d)))
            params["W_z.bias"] = self._array(np.zeros(c))
        if not self.W_z_bias:
            del params["W_z.bias"]
        return params

    def free_scratch(self):
        """Drop the reusable scratch buffers (they are rebuilt by the next call). Returns self."""
        if self._workspace is not None:
            self._workspace.clear()
        return self

    def train(self):
        """Use batch statistics in BN and update the running ones. Returns self."""
        self.training = True
        return self

    def eval(self):
        """Use BN's running statistics. Returns self."""
        self.training = False
        return self

    def __repr__(self):
        opts = [f"mode={self.mode!r}", f"inter_channels={self.inter_channels}", f"dims={self.dims}",
                f"sub_sample={self.sub_sample}", f"bn_layer={self.bn_layer}", f"scale={self.scale!r}",
                f"pool={self.pool!r}", f"chunk_size={self.chunk_size}", f"dtype={self.dtype_name!r}"]
        if self.sub_sample and (self.kernel != F.pool_kernel(self.dims) or self.stride != self.kernel
                                or self.pool == "flattened"):
            opts += [f"pool_kernel={self.kernel}", f"pool_stride={self.stride}"]
        if not self.W_z_bias:
            opts.append("W_z_bias=False")
        if not self.projection_bias:
            opts.append("projection_bias=False")
        if (self.bn_eps, self.bn_momentum) != (1e-5, 0.1):
            opts += [f"bn_eps={self.bn_eps:g}", f"bn_momentum={self.bn_momentum:g}"]
        return f"NonLocalBlock({self.in_channels}, {', '.join(opts)})"

    # ------------------------------------------------------------------ forward
    def _check_input(self, x):
        B.check_not_masked(x, "x")
        xp_x = B.array_namespace(x, names=["x"])
        if xp_x is not self.xp:
            raise TypeError(f"x comes from {getattr(xp_x, '__name__', xp_x)} but the block's parameters live in "
                            f"{getattr(self.xp, '__name__', self.xp)}; move x or build the block with xp=")
        if B.dtype_name(x.dtype) != self.dtype_name:
            raise TypeError(f"x has dtype {B.dtype_name(x.dtype)} but the block's parameters are {self.dtype_name}")
        self._check_device("x", x)
        layout = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}[self.dims]
        if x.ndim != self.dims + 2:
            raise ValueError(f"x must have shape {layout} for dims={self.dims}, got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels (axis 1); the block expects in_channels={self.in_channels}")
        if x.shape[0] < 1 or math.prod(x.shape[2:]) < 1:
            raise ValueError(f"x must hold at least one sample and one position, got shape {tuple(x.shape)}")
        problem = self._too_small(tuple(x.shape[2:]))
        if problem:
            raise ValueError(f"x {problem}; use sub_sample=False or a larger input")

    def _too_small(self, spatial):
        """Why positions of shape ``spatial`` are too few to subsample, or None when they are not."""
        if self.sub_sample and self.pool == "flattened" and math.prod(spatial) < self.kernel[0]:
            return f"has {math.prod(spatial)} positions, fewer than pool_kernel={self.kernel[0]} (pool='flattened')"
        if self.sub_sample and self.pool != "flattened" and any(n < k for n, k in zip(spatial, self.kernel)):
            return f"has spatial shape {spatial}, smaller than the sub-sampling kernel {self.kernel}"
        return None

    def _check_device(self, name, a):
        B.check_on_device(a, next(iter(self.params.values())), name=name, owner="block")

    def _conv(self, name, x):
        return F.conv1x1_forward(x, self.params[f"{name}.weight"], self.params.get(f"{name}.bias"))

    def _pool(self, x):
        """Max-pool the key positions: (B, C, *S) -> (B, C, *S'), and the cache for :meth:`_unpool`.

        With ``pool="flattened"`` the positions are first laid out as one row-major
        sequence, (B, C, N), and pooled along it: (B, C, N'). A stride other than the
        kernel takes the 3-D pool on a (B, C, 1.., *S) view."""
        xp = B.array_namespace(x)
        x_shape = tuple(x.shape)
        if self.pool == "flattened":
            x = F._flat(x)
        if self.stride == self.kernel:
            out, cache = F.maxpool_forward(x, self.kernel)
            return out, (x_shape, None, cache)
        ones = (1,) * (5 - x.ndim)
        out, cache = F.maxpool3d_forward(xp.reshape(x, tuple(x.shape[:2]) + ones + tuple(x.shape[2:])),
                                         ones + self.kernel, ones + self.stride)
        return xp.reshape(out, tuple(out.shape[:2]) + tuple(out.shape[2 + len(ones):])), (x_shape, ones, cache)

    def _unpool(self, dout, cache):
        """Gradient of :meth:`_pool`: (B, C, *S') -> (B, C, *S)."""
        x_shape, ones, cache = cache
        xp = B.array_namespace(dout)
        if ones is None:
            dx = F.maxpool_backward(dout, cache)
        else:
            dx = F.maxpool3d_backward(xp.reshape(dout, tuple(dout.shape[:2]) + ones + tuple(dout.shape[2:])), cache)
        return xp.reshape(dx, x_shape)

    @property
    def _pool_places(self):
        """(pool before phi and g, pool after them): where the keys are subsampled, if at all
        ("after" covers ``pool="flattened"`` too)."""
        before = self.sub_sample and self.pool == "before"
        return before, self.sub_sample and not before

    def _project(self, names, x, cache):
        """The 1x1 convolutions ``names`` of the same input ``x`` as one, their weights stacked
        (one product instead of one per projection, as PyTorch's MultiheadAttention's
        ``in_proj_weight``); returns their outputs, views of one (B, len(names) d, *S) array."""
        xp = self.xp
        weight = xp.concat([self.params[f"{n}.weight"] for n in names], axis=0)
        bias = xp.concat([self.params[f"{n}.bias"] for n in names]) if self.projection_bias else None
        h, conv = F.conv1x1_forward(x, weight, bias)
        cache.setdefault("projections", []).append((names, conv))
        d = self.inter_channels
        return {n: h[:, k * d:(k + 1) * d, ...] for k, n in enumerate(names)}, h

    def _project_backward(self, projections, dh, grads):
        """Gradients of :meth:`_project`: ``dh[i]`` (B, len(names_i) d, *S) for each stacked product
        of the forward (``projections``, in its order); sets ``grads``, returns the input gradients."""
        d = self.inter_channels
        dxs = []
        for (names, conv), dout in zip(projections, dh):
            dx, dw, db = F.conv1x1_backward(dout, conv)
            for k, n in enumerate(names):
                grads[f"{n}.weight"] = dw[k * d:(k + 1) * d, ...]
                if db is not None:
                    grads[f"{n}.bias"] = db[k * d:(k + 1) * d]
            dxs.append(dx)
        return dxs

    @property
    def logit_scale(self):
        """The number the softmax logits are multiplied by (1.0 without ``scale``)."""
        if self.scale is False:
            return 1.0
        if self.scale is True:
            return 1.0 / math.sqrt(self.in_channels if self.mode == "gaussian" else self.inter_channels)
        return self.scale

    def forward(self, x, *, return_attention=False):
        """z = BN(W_z y) + x.

        Parameters
        ----------
        x : array, shape (B, C, *S), the block's library and dtype
        return_attention : bool
            Also return the attention matrix ``A = f / C``, shape (B, N, N'),
            row ``i`` = query position ``i`` (row-major over ``S``).

        Returns
        -------
        z : array, shape of ``x``
        attention : array, shape (B, N, N'), only if ``return_attention``
        """
        return_attention = B.check_flag("return_attention", return_attention)
        # the last forward's cache points into the scratch buffers this call overwrites: if this call
        # fails part-way (batch norm refusing one value per channel, say), backward must refuse too
        self._cache = None
        self._check_input(x)
        xp = self.xp
        cache = {}
        pool_before, pool_after = self._pool_places
        keys_in = x
        if pool_before:
            keys_in, cache["pool_x"] = self._pool(x)
        d = self.inter_channels
        if self.mode == "gaussian":  # f compares x itself: no theta, no phi, only g
            theta = x
            g_out, _ = self._project(["g"], keys_in, cache)
            phi, g = keys_in, g_out["g"]
            if pool_after:
                (phi, cache["pool_phi"]), (g, cache["pool_g"]) = self._pool(phi), self._pool(g)
        else:
            names = ["theta"] if pool_before else ["theta", "phi", "g"]
            h, stacked = self._project(names, x, cache)
            theta = h["theta"]
            if pool_before:
                _, keys = self._project(["phi", "g"], keys_in, cache)
            else:
                keys = stacked[:, d:, ...]  # phi's and g's rows, next to each other
            if pool_after:
                keys, cache["pool_keys"] = self._pool(keys)  # phi and g pooled as one array
            phi, g = keys[:, :d, ...], keys[:, d:, ...]
        cache["x_shape"], cache["theta_shape"] = tuple(x.shape), tuple(theta.shape)
        cache["key_shape"] = tuple(phi.shape)

        flat = F._flat
        op_args = dict(mode=self.mode, scale=self.logit_scale, w_f=self.params.get("w_f"))
        y, cache["op"] = nonlocal_forward(flat(theta), flat(phi), flat(g), chunk_size=self.chunk_size,
                                          workspace=self._workspace, **op_args)
        y = xp.reshape(y, (x.shape[0], self.inter_channels) + tuple(x.shape[2:]))
        wy, cache["W_z"] = self._conv("W_z", y)
        if self.bn_layer:
            stats = {"running_mean": self.buffers["bn.running_mean"], "running_var": self.buffers["bn.running_var"]}
            wy, cache["bn"] = F.batchnorm_forward(wy, self.params["bn.gamma"], self.params["bn.beta"], stats,
                                                  training=self.training, momentum=self.bn_momentum, eps=self.bn_eps)
            self.buffers["bn.running_mean"] = stats["running_mean"]
            self.buffers["bn.running_var"] = stats["running_var"]
            if self.training:
                self.num_batches_tracked += 1
        z = engine.add_owned(wy, x)  # wy + x, written into wy (fresh)
        self._cache = cache
        if not return_attention:
            return z
        attention = cached_attention(cache["op"])
        if attention is None:
            attention = _attention_map(flat(theta), flat(phi), **op_args)
        return z, attention

    # ------------------------------------------------------------------ backward
    def backward(self, dz):
        """Back-propagate dL/dz; sets :attr:`grads` and returns dL/dx.

        Parameters
        ----------
        dz : array, shape of the last forward's ``z``

        Returns
        -------
        dx : array, shape (B, C, *S)
        """
        if self._cache is None:
            raise RuntimeError("backward() called before forward() (or twice for one forward)")
        cache = self._cache
        xp = self.xp
        if B.array_namespace(dz, names=["dz"]) is not xp or B.dtype_name(dz.dtype) != self.dtype_name:
            raise TypeError(f"dz must be a {self.dtype_name} array of the block's library, like x; "
                            f"got {B.dtype_name(dz.dtype)} from {type(dz).__module__}")
        self._check_device("dz", dz)
        if tuple(dz.shape) != cache["x_shape"]:
            raise ValueError(f"dz must have the shape of z, {cache['x_shape']}; got {tuple(dz.shape)}")
        self._cache = None  # entries are dropped as they are used, so memory is returned early
        grads = {}
        dwy = dz  # dx gets dz too, through the residual path (added last)
        if self.bn_layer:
            dwy, grads["bn.gamma"], grads["bn.beta"] = F.batchnorm_backward(dz, cache.pop("bn"))
        dy, grads["W_z.weight"], grads["W_z.bias"] = F.conv1x1_backward(dwy, cache.pop("W_z"))
        del dwy
        dy = xp.reshape(dy, (dy.shape[0], dy.shape[1], math.prod(dy.shape[2:])))
        dtheta, dphi, dg, dw_f = nonlocal_backward(dy, cache.pop("op"))
        del dy
        if dw_f is not None:
            grads["w_f"] = dw_f
        dphi, dg = (xp.reshape(dh, dh.shape[:2] + cache["key_shape"][2:]) for dh in (dphi, dg))
        projections = cache.pop("projections")
        pool_before, pool_after = self._pool_places
        dtheta = xp.reshape(dtheta, cache["theta_shape"])
        if self.mode == "gaussian":
            if pool_after:
                dphi, dg = self._unpool(dphi, cache.pop("pool_phi")), self._unpool(dg, cache.pop("pool_g"))
            (dkeys,) = self._project_backward(projections, [dg], grads)
            dkeys = engine.add_owned(dkeys, dphi)  # in dkeys (fresh)
        else:
            dkeys = xp.concat([dphi, dg], axis=1)
            if pool_after:
                dkeys = self._unpool(dkeys, cache.pop("pool_keys"))
            if pool_before:
                dtheta, dkeys = self._project_backward(projections, [dtheta, dkeys], grads)
            else:
                (dtheta,) = self._project_backward(projections, [xp.concat([dtheta, dkeys], axis=1)], grads)
                dkeys = None
        del dphi, dg
        if pool_before:
            dkeys = self._unpool(dkeys, cache.pop("pool_x"))
        dx = dtheta if dkeys is None else engine.add_owned(dtheta, dkeys)  # in dtheta (fresh)
        dx += dz
        self.grads = {k: grads[k] for k in self.params}  # (no W_z.bias entry without the bias)
        return dx

    # ------------------------------------------------------------------ state
    def state_dict(self, layout="nlref"):
        """Parameters and running statistics as host NumPy copies, in nlref's or a peer's layout.

        Parameters
        ----------
        layout : {"nlref", "alexhex7", "mmcv", "slowfast", "pytorchvideo", "timm", "keras"}
            ``"nlref"``: the keys of ``params`` and :attr:`buffers`, nlref's
            shapes, and with BN ``bn.num_batches_tracked`` (as PyTorch's
            ``state_dict()`` has it). A PyTorch peer's name: that peer's keys and PyTorch shapes (conv
            weights (out, in, 1, ..., 1), BN's ``num_batches_tracked`` included),
            ready for ``torch.from_numpy`` and the peer's
            ``load_state_dict(..., strict=True)``; the table in
            ``docs/nonlocal_block.md`` lists them. ``"keras"``: the titu1994 Keras
            port's kernels by role, ``{"theta", "phi", "g", "W_z"}``, each as Keras
            stores a ``Conv{1,2,3}D`` kernel, (1, ..., 1, C_in, C_out) (for a block
            with ``projection_bias=False, W_z_bias=False, bn_layer=False``).

        Returns
        -------
        dict of str to numpy.ndarray

        Raises
        ------
        ValueError
            An unknown layout, or a block whose options the peer cannot express
            (its weights would mean something else there); the message names the option.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        state = {k: np.array(B.to_numpy(v)) for k, v in {**self.params, **self.buffers}.items()}
        if layout == "nlref":
            out = state
        else:
            _layouts.check_expressible(self, layout)
            mapping = _layouts.key_map(self, layout)
            out = {peer_key: _layouts.to_layout(layout, state[key], shape)
                   for key, (peer_key, shape) in mapping.items()}
        if _layouts.counter_key(self, layout) is not None:
            out[_layouts.counter_key(self, layout)] = np.asarray(self.num_batches_tracked, dtype=np.int64)
        return out

    def load_state_dict(self, state, layout=None, *, prefix=""):
        """Load parameters and running statistics, in nlref's or a peer's layout; the values are copied.

        Parameters
        ----------
        state : dict of str to array
            NumPy arrays, PyTorch tensors (a peer module's ``state_dict()``), or
            anything ``numpy.asarray`` takes. Every expected key must be there with
            the expected shape; unknown keys are an error (BN's
            ``num_batches_tracked`` is optional). The values are copied into the
            block's library and dtype: changing ``state`` afterwards does not change
            the block, and training the block does not change ``state``.
        layout : {None, "nlref", "alexhex7", "mmcv", "slowfast", "pytorchvideo", "timm", "keras"}
            None (or ``"auto"``): the layout whose keys for this block's options
            match ``state`` exactly; ``block.loaded_layout`` says which was read.
        prefix : str
            Read only the keys that start with ``prefix``, without it: ``"module."``
            for a state dict saved from ``DataParallel`` or ``DistributedDataParallel``,
            ``"layer3.1.nl."`` for the block inside a whole model's state dict (the
            other keys are ignored). A state that fits no layout as it is, but does
            under some prefix, is refused with that prefix named.

        Returns
        -------
        self

        Raises
        ------
        ValueError
            An unknown layout; a state that fits no layout (the message names,
            for the closest layout, the unmatched and the missing keys); a wrong
            shape; NaN or infinite values (in the block's dtype); a negative running
            variance; a ``num_batches_tracked`` that is not a whole number >= 0; or block
            options the peer cannot express. The block is unchanged when anything is wrong.
        TypeError
            ``state`` is not a dict, or an entry does not hold real numbers.
        """
        if layout not in LAYOUTS + (None, "auto"):
            raise ValueError(f"layout must be None (detect) or one of {LAYOUTS}, got {layout!r}")
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of arrays, got {type(state).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str (e.g. 'module.'), got {type(prefix).__name__}")
        if prefix:
            selected = {key[len(prefix):]: value for key, value in state.items()
                        if isinstance(key, str) and key.startswith(prefix)}
            if not selected:
                raise ValueError(f"prefix={prefix!r}: no key of the state dict starts with it (its keys start with "
                                 f"{sorted({str(k).split('.')[0] + '.' for k in state})[:8]})")
            state = selected
        if layout in (None, "auto"):
            try:
                layout = _layouts.detect(self, state)
            except ValueError as err:
                hint = _layouts._prefix_hint(self, state)
                raise ValueError(f"{err}{hint}") from None
        # first: a block the layout cannot express fits none of its states (else its keys would be blamed)
        _layouts.check_expressible(self, layout)
        expected = _layouts.key_map(self, layout)
        counter = _layouts.counter_key(self, layout)
        wanted = {peer_key for peer_key, _ in expected.values()}
        missing = sorted(wanted - set(state))
        unexpected = sorted(set(state) - wanted - {counter})
        if missing or unexpected:
            raise ValueError(f"state dict ({layout} layout) does not match {self!r}: "
                             f"unmatched keys {unexpected}, missing keys {missing}"
                             f"{_layouts._prefix_hint(self, state, layout)}")
        new = {}
        for key, (peer_key, shape) in expected.items():
            # a checked copy in the block's dtype, never a view of the caller's memory
            host = state_entry(f"state[{peer_key!r}]", state[peer_key], shape, self.dtype_name)
            new[key] = self._array(_layouts.from_layout(layout, host, self._native_shape(key)))
        count = whole_count(f"state[{counter!r}]", state[counter]) if counter in state else None
        for key, value in new.items():  # only after every entry has been checked
            (self.params if key in self.params else self.buffers)[key] = value
        if count is not None:
            self.num_batches_tracked = count
        self.loaded_layout = layout
        return self

    def _native_shape(self, key):
        return tuple(({**self.params, **self.buffers})[key].shape)
