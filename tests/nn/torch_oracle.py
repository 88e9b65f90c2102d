"""An independent non-local block in PyTorch, differentiated by autograd: the tests' oracle.

Written from the paper's equations, not from nlref's code. Its modules follow the
layout of the AlexHex7/Non-local_pytorch port (``g``, ``theta``, ``phi``, ``W``,
``concat_project``; ``g``/``phi`` wrapped with the pool when sub-sampling after
the convolutions), so its ``state_dict`` has that port's keys and shapes. Two
options beyond the port: ``pool="before"`` (pool ``x``, then the key convolutions)
and ``scale`` (logits times ``1/sqrt(d)`` in the softmax modes).
"""

import torch
from torch import nn


class TorchNonLocal(nn.Module):
    def __init__(self, c, *, mode, inter, dims, sub_sample, bn_layer, scale=False, pool="after"):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        pool_layer = {1: nn.MaxPool1d(2), 2: nn.MaxPool2d((2, 2)), 3: nn.MaxPool3d((1, 2, 2))}[dims]
        self.mode, self.inter, self.c, self.scale = mode, inter, c, scale
        self.sub_sample, self.pool = sub_sample, pool
        self.pool_layer = pool_layer if sub_sample else None  # only a pool that is used, as the peers do
        self.g = conv(c, inter, 1)
        if mode != "gaussian":
            self.theta = conv(c, inter, 1)
            self.phi = conv(c, inter, 1)
        if mode == "concatenation":
            self.concat_project = nn.Sequential(nn.Conv2d(2 * inter, 1, 1, bias=False), nn.ReLU())
        self.W = nn.Sequential(conv(inter, c, 1), norm(c)) if bn_layer else conv(inter, c, 1)
        if sub_sample and pool == "after":
            self.g = nn.Sequential(self.g, pool_layer)
            if mode != "gaussian":
                self.phi = nn.Sequential(self.phi, pool_layer)

    def forward(self, x):
        b = x.shape[0]
        keys = self.pool_layer(x) if self.sub_sample and self.pool == "before" else x
        g = self.g(keys).reshape(b, self.inter, -1)  # (B, d, M)
        if self.mode == "gaussian":
            theta = x.reshape(b, self.c, -1)
            phi = (self.pool_layer(x) if self.sub_sample else x).reshape(b, self.c, -1)
        else:
            theta = self.theta(x).reshape(b, self.inter, -1)
            phi = self.phi(keys).reshape(b, self.inter, -1)
        n, m = theta.shape[2], phi.shape[2]
        if self.mode == "concatenation":  # the explicit (B, 2d, N, M) concatenation, as the port builds it
            pairs = torch.cat([theta[:, :, :, None].expand(-1, -1, n, m), phi[:, :, None, :].expand(-1, -1, n, m)], 1)
            attention = self.concat_project(pairs)[:, 0] / m
        else:
            f = theta.transpose(1, 2) @ phi
            if self.scale:
                f = f / theta.shape[1] ** 0.5
            attention = torch.softmax(f, dim=-1) if self.mode in ("gaussian", "embedded_gaussian") else f / m
        y = (attention @ g.transpose(1, 2)).transpose(1, 2).reshape(b, self.inter, *x.shape[2:])
        return self.W(y) + x


def load_nlref_params(module, params, buffers):
    """Copy an nlref block's params/buffers (host NumPy, nlref keys) into a TorchNonLocal."""
    conv = {}
    for name in ("theta", "phi", "g"):
        if f"{name}.weight" in params:
            layer = getattr(module, name)
            conv[name] = layer[0] if isinstance(layer, nn.Sequential) else layer
    conv["W_z"] = module.W[0] if isinstance(module.W, nn.Sequential) else module.W
    with torch.no_grad():
        for name, layer in conv.items():
            w = torch.from_numpy(params[f"{name}.weight"])
            layer.weight.copy_(w.reshape(layer.weight.shape))
            layer.bias.copy_(torch.from_numpy(params[f"{name}.bias"]))
        if "w_f" in params:
            module.concat_project[0].weight.copy_(torch.from_numpy(params["w_f"]).reshape(1, -1, 1, 1))
        if "bn.gamma" in params:
            bn = module.W[1]
            bn.weight.copy_(torch.from_numpy(params["bn.gamma"]))
            bn.bias.copy_(torch.from_numpy(params["bn.beta"]))
            bn.running_mean.copy_(torch.from_numpy(buffers["bn.running_mean"]))
            bn.running_var.copy_(torch.from_numpy(buffers["bn.running_var"]))
    return conv


def nlref_grads(module, conv):
    """The oracle's gradients under nlref's keys and shapes."""
    out = {}
    for name, layer in conv.items():
        out[f"{name}.weight"] = layer.weight.grad.reshape(layer.weight.shape[:2]).numpy()
        out[f"{name}.bias"] = layer.bias.grad.numpy()
    if hasattr(module, "concat_project"):
        out["w_f"] = module.concat_project[0].weight.grad.reshape(-1).numpy()
    if isinstance(module.W, nn.Sequential):
        out["bn.gamma"] = module.W[1].weight.grad.numpy()
        out["bn.beta"] = module.W[1].bias.grad.numpy()
    return out


# --------------------------------------------------------------------------- the video network
# An independent PyTorch twin of nlref.nn.models.VideoNet, built from the architecture
# described in that module's docstring (plain torch.nn modules, differentiated by autograd).
# Only the *configuration* is read from the nlref network (``net.config`` and ``net.slots``);
# its layer names are compared with ``net.layers`` as a placement check. Works in float64
# (the oracle) and float32 (benchmarks/bench_train.py times torch training with it).

_KERNEL1 = {"c2d": (1, 3, 3), "i3d": (3, 3, 3), "i3d_3x1x1": (3, 1, 1)}
_STAGES = ("res2", "res3", "res4")


class TorchConvBN(nn.Module):
    """conv (no bias, 'same' padding k // 2) -> BatchNorm3d (-> ReLU)."""

    def __init__(self, c_in, c_out, kernel, *, stride=(1, 1, 1), relu=True):
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=tuple(k // 2 for k in kernel), bias=False)
        self.bn = nn.BatchNorm3d(c_out)  # eps 1e-5, momentum 0.1, as nlref's batch norm
        self.relu = relu

    def forward(self, x):
        h = self.bn(self.conv(x))
        return torch.relu(h) if self.relu else h


class TorchResidualBlock(nn.Module):
    """``relu(conv2(conv1(x)) + shortcut(x))``, conv2 always 1x3x3 without ReLU, a 1x1x1 conv+BN shortcut
    where the shape changes."""

    def __init__(self, c_in, c_out, *, kernel1, stride):
        super().__init__()
        self.conv1 = TorchConvBN(c_in, c_out, kernel1, stride=(1, stride, stride))
        self.conv2 = TorchConvBN(c_out, c_out, (1, 3, 3), relu=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = TorchConvBN(c_in, c_out, (1, 1, 1), stride=(1, stride, stride), relu=False)

    def units(self):
        """(nlref sub-name, TorchConvBN) pairs."""
        pairs = [("conv1", self.conv1), ("conv2", self.conv2)]
        return pairs + ([("shortcut", self.shortcut)] if self.shortcut is not None else [])

    def forward(self, x):
        s = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(self.conv2(self.conv1(x)) + s)


class TorchNonLocalExtent(nn.Module):
    """A :class:`TorchNonLocal` on (B, C, T, H, W) attending over space-time, one frame, or one place in time.

    ``"space"``: (B, C, T, H, W) -> (B*T, C, H, W), a 2-D block; ``"time"``:
    -> (B*H*W, C, T), a 1-D block, never sub-sampled; ``"spacetime"``: the 3-D block.
    """

    def __init__(self, c, *, extent, mode, sub_sample=True, bn_layer=True, scale=False, pool="after",
                 inter_channels=None):
        super().__init__()
        dims = {"spacetime": 3, "space": 2, "time": 1}[extent]
        self.extent = extent
        inter = inter_channels if inter_channels is not None else max(c // 2, 1)
        self.block = TorchNonLocal(c, mode=mode, inter=inter, dims=dims, sub_sample=sub_sample and extent != "time",
                                   bn_layer=bn_layer, scale=scale, pool=pool)
        self.conv = None  # nlref name -> conv module, set by load_videonet_params

    def forward(self, x):
        b, c, t, h, w = x.shape
        if self.extent == "space":
            z = self.block(x.transpose(1, 2).reshape(b * t, c, h, w))
            return z.reshape(b, t, c, h, w).transpose(1, 2)
        if self.extent == "time":
            z = self.block(x.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t))
            return z.reshape(b, h, w, c, t).permute(0, 3, 4, 1, 2)
        return self.block(x)


class TorchVideoNet(nn.Module):
    """PyTorch twin of an nlref ``VideoNet``: stem, res2-res4 with the non-local blocks, pool, dropout, fc.

    Parameters
    ----------
    net : nlref.nn.models.VideoNet
        Only its ``config`` and ``slots`` are read (and its layer names checked).
        The weights are torch's own initialisation; copy nlref's with
        :func:`load_videonet_params`.
    dtype : torch.dtype, optional
        Default: the nlref network's dtype.

    ``forward(x, dropout_mask=None)``: in training mode with dropout > 0 the pooled
    features are multiplied by ``dropout_mask`` (B, C) when given -- nlref's
    scaled mask, ``functional.dropout_forward(..., seed=s)[1]`` for the seed the
    nlref forward got -- and go through ``torch.nn.functional.dropout`` otherwise.
    """

    def __init__(self, net, *, dtype=None):
        super().__init__()
        cfg = net.config
        widths, blocks, flavour = cfg["widths"], cfg["blocks"], cfg["flavour"]
        opts = dict(cfg["nonlocal_options"])
        opts.pop("chunk_size", None)  # memory layout only: the same numbers
        slots = [tuple(s) for s in net.slots]
        self.names = []
        self.units = nn.ModuleList()

        def add(name, module):
            self.names.append(name)
            self.units.append(module)

        add("stem", TorchConvBN(cfg["in_channels"], widths[0], (1, 3, 3), stride=(1, 2, 2)))
        c_in = widths[0]
        for s, (stage, width, count) in enumerate(zip(_STAGES, widths, blocks)):
            for j in range(count):
                if (stage, j) in slots:
                    add(f"{stage}.nl{j}", TorchNonLocalExtent(c_in, extent=cfg["extent"], mode=cfg["mode"], **opts))
                inflated = flavour != "c2d" and j % 2 == 0  # the first, third, ... block of a stage
                kernel1 = _KERNEL1[flavour] if inflated else (1, 3, 3)
                stride = 2 if (j == 0 and s > 0) else 1
                add(f"{stage}.{j}", TorchResidualBlock(c_in, width, kernel1=kernel1, stride=stride))
                c_in = width
        self.dropout = cfg["dropout"]
        self.fc = nn.Linear(c_in, cfg["num_classes"])
        expected = [name for name, _ in net.layers]
        if self.names + ["fc"] != expected:
            raise ValueError(f"TorchVideoNet layers {self.names + ['fc']} differ from the nlref network's {expected}")
        if dtype is None:
            dtype = {"float32": torch.float32, "float64": torch.float64}[cfg["dtype"]]
        self.to(dtype)

    def forward(self, x, dropout_mask=None):
        h = x
        for unit in self.units:
            h = unit(h)
        pooled = h.mean(dim=(2, 3, 4))
        if self.training and self.dropout > 0:
            if dropout_mask is None:
                pooled = nn.functional.dropout(pooled, self.dropout, training=True)
            else:
                pooled = pooled * torch.as_tensor(dropout_mask, dtype=pooled.dtype, device=pooled.device)
        return self.fc(pooled)

    def named_tensors(self):
        """nlref name -> torch parameter or buffer, for everything outside the non-local blocks."""
        out = {}
        for name, unit in zip(self.names, self.units):
            if isinstance(unit, TorchConvBN):
                pairs = [(name, unit)]
            elif isinstance(unit, TorchResidualBlock):
                pairs = [(f"{name}.{sub}", u) for sub, u in unit.units()]
            else:
                continue
            for prefix, u in pairs:
                out[f"{prefix}.conv.weight"] = u.conv.weight
                out[f"{prefix}.bn.gamma"] = u.bn.weight
                out[f"{prefix}.bn.beta"] = u.bn.bias
                out[f"{prefix}.bn.running_mean"] = u.bn.running_mean
                out[f"{prefix}.bn.running_var"] = u.bn.running_var
        out["fc.weight"], out["fc.bias"] = self.fc.weight, self.fc.bias
        return out

    def nonlocal_units(self):
        return [(name, unit) for name, unit in zip(self.names, self.units) if isinstance(unit, TorchNonLocalExtent)]


def load_videonet_params(torch_net, net):
    """Copy an nlref VideoNet's parameters and BN running statistics into its TorchVideoNet twin.

    Every nlref entry must find its place (and every torch tensor get a value), else ValueError.
    """
    state = net.state_dict()  # host NumPy copies, dotted nlref names
    used = set()
    tensors = torch_net.named_tensors()
    with torch.no_grad():
        for key, tensor in tensors.items():
            if key not in state or tuple(state[key].shape) != tuple(tensor.shape):
                raise ValueError(f"nlref state has no entry {key!r} of shape {tuple(tensor.shape)}")
            tensor.copy_(torch.from_numpy(state[key]))
            used.add(key)
    for name, unit in torch_net.nonlocal_units():
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        unit.conv = load_nlref_params(unit.block, sub, sub)
        used.update(f"{name}.{k}" for k in sub)
    if used != set(state):
        raise ValueError(f"nlref entries without a torch twin: {sorted(set(state) - used)[:5]}")
    return torch_net


def videonet_grads(torch_net):
    """The twin's ``.grad`` of every parameter as NumPy arrays, under nlref's names and shapes."""
    out = {}
    for key, tensor in torch_net.named_tensors().items():
        if not key.endswith(("running_mean", "running_var")):
            out[key] = tensor.grad.detach().cpu().numpy()
    for name, unit in torch_net.nonlocal_units():
        out.update({f"{name}.{k}": v for k, v in nlref_grads(unit.block, unit.conv).items()})
    return out


def videonet_buffers(torch_net):
    """The twin's BN running statistics as NumPy arrays, under nlref's names."""
    out = {k: t.detach().cpu().numpy() for k, t in torch_net.named_tensors().items()
           if k.endswith(("running_mean", "running_var"))}
    for name, unit in torch_net.nonlocal_units():
        if isinstance(unit.block.W, nn.Sequential):
            out[f"{name}.bn.running_mean"] = unit.block.W[1].running_mean.detach().cpu().numpy()
            out[f"{name}.bn.running_var"] = unit.block.W[1].running_var.detach().cpu().numpy()
    return out
