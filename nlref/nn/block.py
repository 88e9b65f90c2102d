r"""The non-local block (Wang et al., CVPR 2018, Eq. 6), with its backward pass by hand.

.. math::

    z = \mathrm{BN}(W_z\, y) + x, \qquad
    y_i = \frac{1}{\mathcal C(x)} \sum_j f(\theta(x_i), \phi(x_j))\, g(x_j)

``theta``, ``phi``, ``g`` and ``W_z`` are 1x1 convolutions; ``theta``, ``phi``
and ``g`` map ``C`` channels to ``inter_channels`` (``C // 2`` by default, the
bottleneck), ``W_z`` maps them back. With ``sub_sample`` the keys and values are
max-pooled ((1, 2, 2) in 3-D, (2, 2) in 2-D, 2 in 1-D): after the ``phi`` and
``g`` convolutions (``pool="after"``, the paper and the AlexHex7 PyTorch port)
or on ``x`` before them (``pool="before"``, the official Caffe2 code). BN's
gamma starts at 0 (or ``W_z`` at 0 when ``bn_layer=False``), so a new block is
exactly the identity and can be inserted into a trained network.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend as B
from . import functional as F
from .nonlocal_op import SOFTMAX_MODES, cached_attention, check_mode, nonlocal_backward, nonlocal_forward
from .nonlocal_op import attention_map as _attention_map

__all__ = ["NonLocalBlock"]

POOLS = ("after", "before")
LAYOUTS = ("nlref", "alexhex7")


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _host(a):
    """A host NumPy view of ``a`` (NumPy, Python numbers, or any library's array)."""
    if isinstance(a, (np.ndarray, np.generic, int, float, list, tuple)):
        return np.asarray(a)
    return B.to_numpy(a)


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


class NonLocalBlock:
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
    scale : bool
        Multiply the softmax logits by ``1/sqrt(d)`` (Caffe2, mmcv); only for the
        softmax modes. The paper has no scale.
    pool : {"after", "before"}
        Where subsampling happens (see the module docstring).
    chunk_size : int, optional
        Use the chunked (memory-efficient) non-local operation with this many keys per block.
    dtype : {"float32", "float64"}
    seed : int
        Seeds the initial weights (PyTorch's default conv init: uniform in
        +-1/sqrt(fan_in) for weights and biases).
    xp : module, optional
        The array library for the parameters: ``numpy`` (default), ``cupy``,
        ``array_api_strict``, ``torch``...

    Attributes
    ----------
    params : dict of arrays
        ``theta.weight`` (d, C), ``theta.bias`` (d,), ``phi.*``, ``g.*``,
        ``W_z.weight`` (C, d), ``W_z.bias`` (C,), ``bn.gamma``, ``bn.beta`` (C,),
        ``w_f`` (2d,) for the concatenation. Gaussian mode has no theta and phi.
    grads : dict of arrays
        Same keys; set (not accumulated) by :meth:`backward`.
    buffers : dict of arrays
        ``bn.running_mean`` and ``bn.running_var`` when ``bn_layer``.
    training : bool
        Batch statistics (True, the initial state) or running statistics.

    Notes
    -----
    On NumPy the block keeps its (B, N, N') scratch buffers between calls
    (fresh arrays that size cost more than the arithmetic on Linux; see
    ``nonlocal_forward``'s ``workspace``). :meth:`free_scratch` returns them.
    Like a PyTorch module, one block is not meant to run in several threads at once.
    """

    def __init__(self, in_channels, *, mode="embedded_gaussian", inter_channels=None, dims=2,
                 sub_sample=True, bn_layer=True, scale=False, pool="after", chunk_size=None,
                 dtype="float32", seed=0, xp=None):
        self.in_channels = _positive_int("in_channels", in_channels)
        check_mode(mode)
        self.mode = mode
        if inter_channels is None:
            inter_channels = max(self.in_channels // 2, 1)
        self.inter_channels = _positive_int("inter_channels", inter_channels)
        if dims not in (1, 2, 3) or isinstance(dims, bool):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
        self.dims = int(dims)
        self.sub_sample = _flag("sub_sample", sub_sample)
        self.bn_layer = _flag("bn_layer", bn_layer)
        self.scale = _flag("scale", scale)
        if self.scale and mode not in SOFTMAX_MODES:
            raise ValueError(f"scale=True applies to the softmax modes {SOFTMAX_MODES}, not mode={mode!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be 'after' or 'before', got {pool!r}")
        self.pool = pool
        if chunk_size is not None:
            chunk_size = _positive_int("chunk_size", chunk_size)
        self.chunk_size = chunk_size
        name = dtype if isinstance(dtype, str) else B.dtype_name(dtype)
        if name not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype_name = name
        self.xp = B.compat_namespace(np if xp is None else xp)
        if not all(hasattr(self.xp, f) for f in ("asarray", "matmul", "float32")):
            raise TypeError(f"xp must be an array library module (numpy, cupy, array_api_strict, torch), got {xp!r}")
        self.dtype = getattr(self.xp, name)
        self.kernel = F.pool_kernel(self.dims) if self.sub_sample else None
        self.training = True
        self.num_batches_tracked = 0
        self._cache = None
        self._workspace = {} if B.is_numpy(self.xp) else None  # reused (B, N, N') scratch (see nonlocal_op)
        self.params = self._init_params(seed)
        self.buffers = {}
        if self.bn_layer:
            self.buffers = {"bn.running_mean": self._array(np.zeros(self.in_channels)),
                            "bn.running_var": self._array(np.ones(self.in_channels))}
        self.grads = {k: None for k in self.params}

    # ------------------------------------------------------------------ set-up
    def _array(self, host):
        return B.asarray(np.asarray(host), xp=self.xp, dtype=self.dtype)

    def _init_params(self, seed):
        rng = np.random.default_rng(seed)
        c, d = self.in_channels, self.inter_channels

        def uniform(shape, fan_in):
            bound = 1.0 / math.sqrt(fan_in)
            return self._array(rng.uniform(-bound, bound, size=shape))

        params = {}
        convs = ["g"] if self.mode == "gaussian" else ["theta", "phi", "g"]
        for name in convs:
            params[f"{name}.weight"] = uniform((d, c), c)
            params[f"{name}.bias"] = uniform((d,), c)
        if self.mode == "concatenation":
            params["w_f"] = uniform((2 * d,), 2 * d)
        if self.bn_layer:
            params["W_z.weight"] = uniform((c, d), d)
            params["W_z.bias"] = uniform((c,), d)
            params["bn.gamma"] = self._array(np.zeros(c))
            params["bn.beta"] = self._array(np.zeros(c))
        else:
            params["W_z.weight"] = self._array(np.zeros((c, d)))
            params["W_z.bias"] = self._array(np.zeros(c))
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
                f"sub_sample={self.sub_sample}", f"bn_layer={self.bn_layer}", f"scale={self.scale}",
                f"pool={self.pool!r}", f"chunk_size={self.chunk_size}", f"dtype={self.dtype_name!r}"]
        return f"NonLocalBlock({self.in_channels}, {', '.join(opts)})"

    # ------------------------------------------------------------------ forward
    def _check_input(self, x):
        xp_x = B.array_namespace(x, names=["x"])
        if xp_x is not self.xp:
            raise TypeError(f"x comes from {getattr(xp_x, '__name__', xp_x)} but the block's parameters live in "
                            f"{getattr(self.xp, '__name__', self.xp)}; move x or build the block with xp=")
        if B.dtype_name(x.dtype) != self.dtype_name:
            raise TypeError(f"x has dtype {B.dtype_name(x.dtype)} but the block's parameters are {self.dtype_name}")
        layout = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}[self.dims]
        if x.ndim != self.dims + 2:
            raise ValueError(f"x must have shape {layout} for dims={self.dims}, got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels (axis 1); the block expects in_channels={self.in_channels}")
        if self.sub_sample and any(n < k for n, k in zip(x.shape[2:], self.kernel)):
            raise ValueError(f"x's spatial shape {tuple(x.shape[2:])} is smaller than the sub-sampling kernel "
                             f"{self.kernel}; use sub_sample=False or a larger input")

    def _conv(self, name, x):
        return F.conv1x1_forward(x, self.params[f"{name}.weight"], self.params[f"{name}.bias"])

    def _key_branch(self, name, keys_in, cache):
        """phi or g of the key positions, pooled afterwards if pool='after'."""
        if name == "phi" and self.mode == "gaussian":
            h = keys_in
        else:
            h, cache[name] = self._conv(name, keys_in)
        if self.sub_sample and self.pool == "after":
            h, cache[f"pool_{name}"] = F.maxpool_forward(h, self.kernel)
        return h

    def _logit_scale(self, x):
        if not self.scale:
            return 1.0
        d = x.shape[1] if self.mode == "gaussian" else self.inter_channels
        return 1.0 / math.sqrt(d)

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
        self._check_input(x)
        xp = self.xp
        cache = {}
        keys_in = x
        if self.sub_sample and self.pool == "before":
            keys_in, cache["pool_x"] = F.maxpool_forward(x, self.kernel)
        if self.mode == "gaussian":
            theta = x
        else:
            theta, cache["theta"] = self._conv("theta", x)
        phi = self._key_branch("phi", keys_in, cache)
        g = self._key_branch("g", keys_in, cache)
        cache["x_shape"], cache["theta_shape"] = tuple(x.shape), tuple(theta.shape)
        cache["key_shape"] = tuple(phi.shape)

        flat = F._flat
        op_args = dict(mode=self.mode, scale=self._logit_scale(x), w_f=self.params.get("w_f"))
        y, cache["op"] = nonlocal_forward(flat(theta), flat(phi), flat(g), chunk_size=self.chunk_size,
                                          workspace=self._workspace, **op_args)
        y = xp.reshape(y, (x.shape[0], self.inter_channels) + tuple(x.shape[2:]))
        wy, cache["W_z"] = self._conv("W_z", y)
        if self.bn_layer:
            stats = {"running_mean": self.buffers["bn.running_mean"], "running_var": self.buffers["bn.running_var"]}
            wy, cache["bn"] = F.batchnorm_forward(wy, self.params["bn.gamma"], self.params["bn.beta"],
                                                  stats, training=self.training)
            self.buffers["bn.running_mean"] = stats["running_mean"]
            self.buffers["bn.running_var"] = stats["running_var"]
            if self.training:
                self.num_batches_tracked += 1
        z = wy + x
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
        dkeys = None
        for name, dh in (("phi", dphi), ("g", dg)):
            dh = xp.reshape(dh, dh.shape[:2] + cache["key_shape"][2:])
            if self.sub_sample and self.pool == "after":
                dh = F.maxpool_backward(dh, cache.pop(f"pool_{name}"))
            if name in cache:
                dh, grads[f"{name}.weight"], grads[f"{name}.bias"] = F.conv1x1_backward(dh, cache.pop(name))
            dkeys = dh if dkeys is None else dkeys + dh
        del dphi, dg
        if self.sub_sample and self.pool == "before":
            dkeys = F.maxpool_backward(dkeys, cache.pop("pool_x"))
        dtheta = xp.reshape(dtheta, cache["theta_shape"])
        if "theta" in cache:
            dtheta, grads["theta.weight"], grads["theta.bias"] = F.conv1x1_backward(dtheta, cache.pop("theta"))
        dx = dtheta + dkeys
        dx += dz
        self.grads = {k: grads[k] for k in self.params}
        return dx

    # ------------------------------------------------------------------ state
    def state_dict(self, layout="nlref"):
        """Parameters and running statistics as host NumPy copies.

        ``layout="nlref"``: the keys of :attr:`params` and :attr:`buffers`.
        ``layout="alexhex7"``: the keys and shapes of AlexHex7/Non-local_pytorch
        (``g.0.weight`` (d, C, 1, 1), ``W.1.running_var``, ...; see
        ``docs/nonlocal_block.md``), ready for ``torch.from_numpy``.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        state = {k: B.to_numpy(v).copy() for k, v in {**self.params, **self.buffers}.items()}
        if layout == "nlref":
            return state
        out = {}
        for key, (torch_key, torch_shape) in self._alexhex7_map().items():
            out[torch_key] = state[key].reshape(torch_shape)
        if self.bn_layer:
            out["W.1.num_batches_tracked"] = np.asarray(self.num_batches_tracked, dtype=np.int64)
        return out

    def load_state_dict(self, state, layout="auto"):
        """Load parameters and running statistics from host arrays (NumPy, or anything ``numpy.asarray`` takes).

        ``layout="auto"`` recognises the AlexHex7 layout by its ``W.`` keys.
        Every expected key must be present with the expected shape; unknown keys
        are an error. Values are copied into the block's library and dtype.
        """
        if layout not in LAYOUTS + ("auto",):
            raise ValueError(f"layout must be 'auto', 'nlref' or 'alexhex7', got {layout!r}")
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of arrays, got {type(state).__name__}")
        if layout == "auto":
            layout = "alexhex7" if any(k.startswith("W.") for k in state) else "nlref"
        if layout == "nlref":
            expected = {k: (k, tuple(v.shape)) for k, v in {**self.params, **self.buffers}.items()}
            extra = set()
        else:
            expected = self._alexhex7_map()
            extra = {"W.1.num_batches_tracked"} if self.bn_layer else set()
        wanted = {tk for tk, _ in expected.values()}
        missing = sorted(wanted - set(state))
        unexpected = sorted(set(state) - wanted - extra)
        if missing or unexpected:
            raise ValueError(f"state dict ({layout} layout) does not match this block: "
                             f"missing keys {missing}, unexpected keys {unexpected}")
        new = {}
        for key, (torch_key, shape) in expected.items():
            host = _host(state[torch_key])
            if tuple(host.shape) != tuple(shape):
                raise ValueError(f"state[{torch_key!r}] has shape {tuple(host.shape)}, expected {tuple(shape)}")
            if not np.all(np.isfinite(host)):
                raise ValueError(f"state[{torch_key!r}] holds NaN or infinite values")
            new[key] = self._array(host.reshape(self._native_shape(key)))
        for key, value in new.items():  # only after every entry has been checked
            (self.params if key in self.params else self.buffers)[key] = value
        if "W.1.num_batches_tracked" in state:
            self.num_batches_tracked = int(_host(state["W.1.num_batches_tracked"]))
        return self

    def _native_shape(self, key):
        return tuple(({**self.params, **self.buffers})[key].shape)

    def _alexhex7_map(self):
        """nlref key -> (AlexHex7 key, AlexHex7 shape)."""
        if self.pool != "after" or self.scale:
            raise ValueError("the AlexHex7 port pools after the convolutions and has no scale; this block has "
                             f"pool={self.pool!r}, scale={self.scale}, so its weights would mean something else there")
        ones = (1,) * self.dims
        wrap = ".0" if self.sub_sample else ""
        c, d = self.in_channels, self.inter_channels
        names = {"g": f"g{wrap}", "theta": "theta", "phi": f"phi{wrap}", "W_z": "W.0" if self.bn_layer else "W"}
        out = {}
        for key, value in self.params.items():
            if key == "w_f":
                out[key] = ("concat_project.0.weight", (1, 2 * d, 1, 1))
            elif key.startswith("bn."):
                out[key] = ({"bn.gamma": "W.1.weight", "bn.beta": "W.1.bias"}[key], (c,))
            else:
                module, kind = key.split(".")
                shape = tuple(value.shape) + ones if kind == "weight" else tuple(value.shape)
                out[key] = (f"{names[module]}.{kind}", shape)
        for key in self.buffers:
            out[key] = ("W.1." + key.split(".")[1], (c,))
        return out
