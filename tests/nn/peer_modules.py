"""The peers' non-local modules for the tests: their own code where it installs, twins where it cannot.

Loaders of the real modules (None where the package is absent):

* :func:`real_mmcv` -- ``mmcv.cnn.bricks.non_local`` (mmcv-lite 2.2.0 + mmengine 0.10.7).
* :func:`real_pytorchvideo` -- ``pytorchvideo.layers.nonlocal_net`` (``pip install --no-deps
  pytorchvideo==0.1.5``); the package's top level imports nothing heavy, and where it fails the
  module file is loaded from the installed package.
* :func:`real_timm` -- ``non_local_attn.py`` from timm 0.6.13's own wheel (``pip install --no-deps
  timm==0.6.13``). ``import timm`` needs torchvision (which would replace the CPU torch), so the
  file is loaded from the installed package under a private package name, with its sibling files
  (``conv_bn_act.py``, ``helpers.py``, ...), none of which imports torchvision in 0.6.13 (timm
  0.9.16 and 1.0.31 import it in ``norm_act.py`` and ``create_norm.py``). Nothing is copied.

Twins, for the peers that are not packages (SlowFast is not on PyPI; AlexHex7's port is a
repository of files). Each copies, as facts, the constructor signature, the attribute and
submodule names (hence the state-dict keys and shapes) and the forward equations of the real
file at the commit named; ``tests/nn/test_peers.py`` holds their key lists and signatures to the
ones recorded from those files.

* :class:`SlowFastNonlocal`: ``facebookresearch/SlowFast`` ``slowfast/models/nonlocal_helper.py``,
  class ``Nonlocal``, at commit ``728d8f7b33742fdd65684408403ca2aee91ef177``. Its norm is
  ``self.bn = norm_module(num_features=dim, eps=norm_eps, momentum=norm_momentum)`` (keys
  ``bn.*``); ``conv_out.zero_init`` and ``bn.transform_final_bn`` are flags SlowFast's weight
  initialiser reads later (the constructor leaves PyTorch's default values: BN gamma = 1).
  3-D; theta on x; phi and g on x max-pooled with kernel = stride = ``pool_size`` (no pool when
  every size is 1); ``softmax``: logits times ``dim_inner ** -0.5``, softmax over keys;
  ``dot_product``: divided by the number of keys; ``conv_out`` then ``bn``; plus the input.
* :func:`alexhex7_class`: ``AlexHex7/Non-local_pytorch`` ``lib/non_local_<mode>.py``, classes
  ``NONLocalBlock{1,2,3}D`` (``_NonLocalBlockND(in_channels, inter_channels=None, dimension=3,
  sub_sample=True, bn_layer=True)``), at commit ``0276c7b11d313a5f057363f9f89f99b48b2e29bc``.
  The mode is the file; g, W (``Sequential(conv, bn)`` with BN gamma = beta = 0, or a conv with
  weight = bias = 0), theta, phi are registered in that order; with ``sub_sample`` g and phi
  become ``Sequential(conv, pool)`` (Gaussian: ``phi`` is the pool itself); the concatenation's
  ``concat_project`` is ``Sequential(Conv2d(2d, 1, bias=False), ReLU)``. (The real
  ``non_local_gaussian.py`` at that commit reads ``self.store_last_batch_nl_map``, which its
  constructor never sets, so its forward raises AttributeError; the twin leaves that line out.)

Older twins kept for layout tests of modules whose packages may be absent: timm's
``NonLocalAttn`` and mmcv's ``NonLocalNd`` (used only where the real package is missing).
"""

import contextlib
import importlib
import importlib.metadata
import importlib.util
import math
import pathlib
import sys
import types
import warnings

import torch
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


# --------------------------------------------------------------------------- the real modules
@contextlib.contextmanager
def _quiet():
    """The peers' imports use torch.jit.script, which torch 2.13 deprecates (mmcv: 66 warnings; timm's too), and
    mmengine 0.10.7's calls re.split(pattern, docstring, 1), which Python 3.13 deprecates (maxsplit by position)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.(script|interface)` is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r"'maxsplit' is passed as positional argument", DeprecationWarning)
        yield


def _load_file(distribution, folder, module):
    """``folder/module.py`` of an installed distribution, imported without its package's ``__init__``.

    The folder becomes a private package (``_nlref_peer_<distribution>``) so that the file's
    relative imports find its siblings; None where the distribution or a file is missing.
    """
    try:
        init = pathlib.Path(importlib.metadata.distribution(distribution).locate_file(f"{folder}/__init__.py"))
    except importlib.metadata.PackageNotFoundError:
        return None
    package = f"_nlref_peer_{distribution}"
    if package not in sys.modules:
        pkg = types.ModuleType(package)
        pkg.__path__ = [str(init.parent)]
        sys.modules[package] = pkg
    name = f"{package}.{module}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, init.parent / f"{module}.py")
    if spec is None:
        return None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    try:
        with _quiet():
            spec.loader.exec_module(loaded)
    except (ImportError, FileNotFoundError):
        del sys.modules[name]
        return None
    return loaded


def _import(name):
    try:
        with _quiet():
            return importlib.import_module(name)
    except ImportError:  # the package, or one of its imports, is absent
        return None


def real_mmcv():
    """mmcv's ``mmcv.cnn.bricks.non_local`` module (``NonLocal1d/2d/3d``), or None."""
    return _import("mmcv.cnn.bricks.non_local")


def real_pytorchvideo():
    """pytorchvideo's ``pytorchvideo.layers.nonlocal_net`` module (``NonLocal``, ``create_nonlocal``), or None."""
    return _import("pytorchvideo.layers.nonlocal_net") or _load_file("pytorchvideo", "pytorchvideo/layers",
                                                                       "nonlocal_net")


def real_timm():
    """timm's ``non_local_attn`` module (``NonLocalAttn``) from its own wheel, or None."""
    return (_load_file("timm", "timm/models/layers", "non_local_attn")  # timm 0.6
            or _load_file("timm", "timm/layers", "non_local_attn"))  # timm 0.9+, where torchvision is present


# --------------------------------------------------------------------------- SlowFast (twin)
class SlowFastNonlocal(nn.Module):
    """SlowFast's ``Nonlocal`` (nonlocal_helper.py @ 728d8f7b): the real signature, names and keys."""

    def __init__(self, dim, dim_inner, pool_size=None, instantiation="softmax", zero_init_final_conv=False,
                 zero_init_final_norm=True, norm_eps=1e-5, norm_momentum=0.1, norm_module=nn.BatchNorm3d):
        super().__init__()
        self.dim, self.dim_inner, self.pool_size, self.instantiation = dim, dim_inner, pool_size, instantiation
        self.use_pool = pool_size is not None and any(size > 1 for size in pool_size)
        self.norm_eps, self.norm_momentum = norm_eps, norm_momentum
        self.conv_theta, self.conv_phi, self.conv_g = (nn.Conv3d(dim, dim_inner, 1) for _ in range(3))
        self.conv_out = nn.Conv3d(dim_inner, dim, 1)
        self.conv_out.zero_init = zero_init_final_conv
        self.bn = norm_module(num_features=dim, eps=norm_eps, momentum=norm_momentum)
        self.bn.transform_final_bn = zero_init_final_norm
        if self.use_pool:
            self.pool = nn.MaxPool3d(kernel_size=pool_size, stride=pool_size, padding=[0, 0, 0])

    def forward(self, x):
        b, _, t, h, w = x.shape
        theta = self.conv_theta(x).flatten(2)  # (B, d, N)
        keys = self.pool(x) if self.use_pool else x
        phi, g = self.conv_phi(keys).flatten(2), self.conv_g(keys).flatten(2)  # (B, d, M)
        logits = theta.transpose(1, 2) @ phi  # (B, N, M)
        if self.instantiation == "softmax":
            weights = torch.softmax(logits * self.dim_inner ** -0.5, dim=2)
        elif self.instantiation == "dot_product":
            weights = logits / logits.shape[2]
        else:
            raise NotImplementedError(f"Unknown norm type {self.instantiation}")
        y = (g @ weights.transpose(1, 2)).reshape(b, self.dim_inner, t, h, w)
        return x + self.bn(self.conv_out(y))


# --------------------------------------------------------------------------- AlexHex7 (twin)
class _AlexHex7NonLocalND(nn.Module):
    """AlexHex7's ``_NonLocalBlockND`` (lib/non_local_<mode>.py @ 0276c7b1); the mode is the class's file."""

    _mode = None  # set by alexhex7_class: the real classes have no mode attribute

    def __init__(self, in_channels, inter_channels=None, dimension=3, sub_sample=True, bn_layer=True):
        super().__init__()
        assert dimension in [1, 2, 3]
        self.dimension, self.sub_sample, self.in_channels = dimension, sub_sample, in_channels
        self.inter_channels = inter_channels if inter_channels is not None else max(in_channels // 2, 1)
        d = self.inter_channels
        conv, bn = _CONV[dimension], _BN[dimension]
        max_pool_layer = _POOL[dimension]({1: 2, 2: (2, 2), 3: (1, 2, 2)}[dimension])
        self.g = conv(in_channels, d, 1)
        if bn_layer:
            self.W = nn.Sequential(conv(d, in_channels, 1), bn(in_channels))
            nn.init.zeros_(self.W[1].weight)
            nn.init.zeros_(self.W[1].bias)
        else:
            self.W = conv(d, in_channels, 1)
            nn.init.zeros_(self.W.weight)
            nn.init.zeros_(self.W.bias)
        if self._mode != "gaussian":
            self.theta = conv(in_channels, d, 1)
            self.phi = conv(in_channels, d, 1)
        if self._mode == "concatenation":
            self.concat_project = nn.Sequential(nn.Conv2d(2 * d, 1, 1, 1, 0, bias=False), nn.ReLU())
        if sub_sample:
            self.g = nn.Sequential(self.g, max_pool_layer)
            self.phi = max_pool_layer if self._mode == "gaussian" else nn.Sequential(self.phi, max_pool_layer)

    def forward(self, x):
        b = x.shape[0]
        g = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)  # (B, M, d)
        if self._mode == "gaussian":
            theta = x.view(b, self.in_channels, -1).permute(0, 2, 1)
            phi = (self.phi(x) if self.sub_sample else x).view(b, self.in_channels, -1)
        else:
            theta = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)  # (B, N, d)
            phi = self.phi(x).view(b, self.inter_channels, -1)  # (B, d, M)
        if self._mode == "concatenation":
            n, m = theta.shape[1], phi.shape[2]
            pairs = torch.cat([theta.permute(0, 2, 1)[..., None].repeat(1, 1, 1, m),
                               phi[:, :, None, :].repeat(1, 1, n, 1)], dim=1)
            f = self.concat_project(pairs).view(b, n, m)
            weights = f / m
        else:
            f = theta @ phi
            weights = torch.softmax(f, dim=-1) if self._mode in ("gaussian", "embedded_gaussian") else f / f.shape[-1]
        y = (weights @ g).permute(0, 2, 1).contiguous().view(b, self.inter_channels, *x.shape[2:])
        return self.W(y) + x


_ALEXHEX7 = {}


def alexhex7_class(mode, dims):
    """The twin of ``NONLocalBlock{dims}D`` from ``lib/non_local_<mode>.py`` (its ``__module__`` says the file)."""
    if (mode, dims) not in _ALEXHEX7:
        def init(self, in_channels, inter_channels=None, sub_sample=True, bn_layer=True):
            _AlexHex7NonLocalND.__init__(self, in_channels, inter_channels=inter_channels, dimension=dims,
                                         sub_sample=sub_sample, bn_layer=bn_layer)

        _ALEXHEX7[mode, dims] = type(f"NONLocalBlock{dims}D", (_AlexHex7NonLocalND,),
                                     {"__init__": init, "_mode": mode, "__module__": f"lib.non_local_{mode}"})
    return _ALEXHEX7[mode, dims]


# --------------------------------------------------------------------------- timm and mmcv (twins, fallbacks)
def _make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """timm's rounding of a channel count to a multiple of ``divisor`` (not below 90% of v)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


class TimmNonLocalAttn(nn.Module):
    def __init__(self, in_channels, use_scale=True, rd_ratio=1 / 8, rd_channels=None, rd_divisor=8):
        super().__init__()
        if rd_channels is None:
            rd_channels = _make_divisible(in_channels * rd_ratio, divisor=rd_divisor)
        self.scale = in_channels ** -0.5 if use_scale else 1.0
        self.t, self.p, self.g = (nn.Conv2d(in_channels, rd_channels, 1) for _ in range(3))
        self.z = nn.Conv2d(rd_channels, in_channels, 1)
        self.norm = nn.BatchNorm2d(in_channels)

    def forward(self, x):
        t, p, g = self.t(x).flatten(2), self.p(x).flatten(2), self.g(x).flatten(2)
        weights = torch.softmax((t.transpose(1, 2) @ p) * self.scale, dim=2)
        y = (g @ weights.transpose(1, 2)).reshape(x.shape[0], g.shape[1], *x.shape[2:])
        return self.norm(self.z(y)) + x


class _ConvModule(nn.Module):
    """mmcv's ConvModule as the non-local block uses it: conv, optional BN, optional ReLU."""

    def __init__(self, conv, bn=None, relu=False):
        super().__init__()
        self.conv = conv
        if bn is not None:
            self.bn = bn
        self.relu = relu

    def forward(self, x):
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return torch.relu(x) if self.relu else x


class MmcvNonLocal(nn.Module):
    """``MmcvNonLocal(dims, in_channels, ...)``: the twin of mmcv's ``NonLocal{dims}d``.

    ``norm_cfg``: None or ``dict(type="BN" | "BN1d" | "BN2d" | "BN3d", eps=..., momentum=...)``.
    """

    def __init__(self, dims, in_channels, sub_sample=False, reduction=2, use_scale=True, norm_cfg=None,
                 mode="embedded_gaussian"):
        super().__init__()
        conv = _CONV[dims]
        self.in_channels, self.mode, self.use_scale, self.sub_sample = in_channels, mode, use_scale, sub_sample
        self.inter_channels = d = max(in_channels // reduction, 1)
        bn = None
        if norm_cfg is not None:
            extra = {k: v for k, v in norm_cfg.items() if k != "type"}
            bn = _BN[dims](in_channels, **extra)
        self.g = _ConvModule(conv(in_channels, d, 1))
        self.conv_out = _ConvModule(conv(d, in_channels, 1, bias=bn is None), bn)
        if mode != "gaussian":
            self.theta = _ConvModule(conv(in_channels, d, 1))
            self.phi = _ConvModule(conv(in_channels, d, 1))
        if mode == "concatenation":
            self.concat_project = _ConvModule(nn.Conv2d(2 * d, 1, 1, bias=False), relu=True)
        if sub_sample:
            pool = _POOL[dims]({1: 2, 2: (2, 2), 3: (1, 2, 2)}[dims])
            self.g = nn.Sequential(self.g, pool)
            self.phi = nn.Sequential(self.phi, pool) if mode != "gaussian" else pool

    def forward(self, x):
        b = x.shape[0]
        g = self.g(x).flatten(2)  # (B, d, M)
        if self.mode == "gaussian":
            theta = x.flatten(2)
            phi = (self.phi(x) if self.sub_sample else x).flatten(2)
        else:
            theta, phi = self.theta(x).flatten(2), self.phi(x).flatten(2)
        n, m = theta.shape[2], phi.shape[2]
        if self.mode == "concatenation":
            pairs = torch.cat([theta[:, :, :, None].expand(-1, -1, n, m), phi[:, :, None, :].expand(-1, -1, n, m)], 1)
            weights = self.concat_project(pairs)[:, 0] / m
        else:
            logits = theta.transpose(1, 2) @ phi
            if self.mode == "dot_product":
                weights = logits / m
            else:
                if self.mode == "embedded_gaussian" and self.use_scale:
                    logits = logits / math.sqrt(theta.shape[1])
                weights = torch.softmax(logits, dim=2)
        y = (g @ weights.transpose(1, 2)).reshape(b, self.inter_channels, *x.shape[2:])
        return x + self.conv_out(y)
