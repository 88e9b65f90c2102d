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
        self.pool_layer = pool_layer
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
