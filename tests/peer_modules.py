"""Twins of the peers' non-local modules, written from their layouts and equations (not their code).

Used by the tests where the peer's package is absent (SlowFast is not on PyPI; timm's
package imports torchvision; mmcv needs mmcv-lite and mmengine). Each twin has the
peer's constructor arguments, attribute names, submodule names (hence state-dict keys
and shapes) and forward equations, as read from (December 2026):

* SlowFast ``slowfast/models/nonlocal_helper.py`` ``Nonlocal``: 3-D; theta on x, phi and g
  on x max-pooled with kernel = stride = ``pool_size`` (no pool when every size is 1);
  ``softmax``: logits times ``dim_inner ** -0.5``, softmax over keys; ``dot_product``:
  divided by the number of keys; ``conv_out`` then ``norm`` (BatchNorm3d with
  ``norm_eps``, ``norm_momentum``) or no norm; plus the input.
* timm ``timm/layers/non_local_attn.py`` ``NonLocalAttn``: 2-D; ``rd_channels`` =
  ``make_divisible(in_channels * rd_ratio, rd_divisor)``; logits ``t^T p`` times
  ``in_channels ** -0.5`` (``use_scale``), softmax; ``z`` then ``norm`` (BatchNorm2d); no pooling.
* mmcv ``mmcv/cnn/bricks/non_local.py`` ``NonLocal1d/2d/3d``: ``inter = max(C // reduction, 1)``;
  ConvModules (``.conv``, ``.bn`` when ``norm_cfg`` is given, in which case ``conv_out.conv``
  has no bias); sub-sampling wraps ``g`` and ``phi`` with the max-pool after the conv (for the
  Gaussian, ``phi`` is the pool of x); embedded Gaussian times ``inter ** -0.5`` with
  ``use_scale``; dot product and concatenation divided by the number of keys; the
  concatenation's projection is a 2-D ``ConvModule`` without bias and with a ReLU.
  (The twin divides out of place; mmcv divides its ReLU's output in place, so mmcv's
  backward fails in that mode.)
"""

import math

import torch
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


class SlowFastNonlocal(nn.Module):
    def __init__(self, dim, dim_inner, pool_size=None, instantiation="softmax", norm_type="batchnorm",
                 norm_eps=1e-5, norm_momentum=0.1):
        super().__init__()
        self.dim, self.dim_inner, self.pool_size = dim, dim_inner, pool_size
        self.instantiation, self.norm_type = instantiation, norm_type
        self.use_pool = pool_size is not None and any(k > 1 for k in pool_size)
        self.conv_theta, self.conv_phi, self.conv_g = (nn.Conv3d(dim, dim_inner, 1) for _ in range(3))
        self.conv_out = nn.Conv3d(dim_inner, dim, 1)
        if norm_type == "batchnorm":
            self.norm = nn.BatchNorm3d(dim, eps=norm_eps, momentum=norm_momentum)
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
        else:
            weights = logits / logits.shape[2]
        y = (g @ weights.transpose(1, 2)).reshape(b, self.dim_inner, t, h, w)
        p = self.conv_out(y)
        return x + (self.norm(p) if self.norm_type != "none" else p)


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
