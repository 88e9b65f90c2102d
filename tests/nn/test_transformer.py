"""The small space-time transformer: against a PyTorch twin built from torch.nn modules (logits and
every gradient, float64), gradient checks, array-api-strict, and training through nlref.train with
exact resume and the command line."""

from __future__ import annotations


import numpy as np
import pytest

import nlref.backend as B
from nlref.nn import functional as F
from nlref.nn import gradcheck
from nlref.nn.models import VideoTransformer
from nlref.train import TrainConfig, train

torch = pytest.importorskip("torch")

SMALL = dict(frames=4, size=8, in_channels=2, num_classes=3, tubelet=(2, 4, 4), embed_dim=6, depth=2, num_heads=3,
             mlp_dim=10)


# SMALL's token grid is 2 x 2 x 2 and its tubelet 4 x 4 in space, where mixing up time, rows and columns in
# the tubelet reshapes changes nothing; the twin runs on a clip whose grid (3, 4, 2) and tubelet (3, 2, 4) differ
TWIN = dict(SMALL, frames=9, tubelet=(3, 2, 4))


def _clips(b=2, seed=0, xp=np, dtype="float64", device=None, frames=4):
    x = np.random.default_rng(seed).standard_normal((b, 2, frames, 8, 8))
    return B.asarray(x, xp=xp, dtype=getattr(B.compat_namespace(xp), dtype), device=device)


def _perturb(net, scale=0.2, seed=1):
    """Move every parameter off its initial value (zero biases and unit gains hide missing terms)."""
    rng = np.random.default_rng(seed)
    for key, value in net.params.items():
        host = B.to_numpy(value) + scale * rng.standard_normal(tuple(value.shape))
        net.set_param(key, B.asarray(host, like=value))
    return net


class TorchTwin(torch.nn.Module):
    """The same network from torch.nn modules, with VideoTransformer's names (its own state dict loads)."""

    def __init__(self, net):
        super().__init__()
        c = net.config
        e = c["embed_dim"]
        self.cfg, self.grid, self.tubelet = c, net.grid, net.tubelet
        self.patch_embed = torch.nn.Linear(c["in_channels"] * int(np.prod(c["tubelet"])), e)
        self.pos = torch.nn.Module()
        self.pos.time = torch.nn.Parameter(torch.zeros(net.grid[0], e))
        self.pos.space = torch.nn.Parameter(torch.zeros(net.grid[1] * net.grid[2], e))
        if c["pool"] == "cls":
            self.cls = torch.nn.Module()
            self.cls.token = torch.nn.Parameter(torch.zeros(1, 1, e))
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(e, c["num_heads"], c["mlp_dim"], dropout=0.0, activation="gelu",
                                             batch_first=True, norm_first=True) for _ in range(c["depth"]))
        self.norm = torch.nn.LayerNorm(e)
        self.head = torch.nn.Linear(e, c["num_classes"])
        self.double()
        self.load_state_dict({k: torch.tensor(v) for k, v in net.state_dict().items()})

    def forward(self, x):
        b, ch = x.shape[:2]
        (t, h, w), (pt, ph, pw) = self.grid, self.tubelet
        p = x.reshape(b, ch, t, pt, h, ph, w, pw).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, t * h * w, -1)
        z = self.patch_embed(p)
        z = z + (self.pos.time[:, None, :] + self.pos.space[None, :, :]).reshape(t * h * w, -1)
        if self.cfg["pool"] == "cls":
            z = torch.cat([self.cls.token.expand(b, 1, -1), z], dim=1)
        for block in self.blocks:
            z = block(z)
        z = self.norm(z)
        return self.head(z[:, 0] if self.cfg["pool"] == "cls" else z.mean(dim=1))


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_transformer_matches_torch_twin(pool):
    net = _perturb(VideoTransformer(**TWIN, pool=pool, dtype="float64", seed=3))
    twin = TorchTwin(net)
    assert net.grid == (3, 4, 2)
    x = _clips(4, frames=9)  # 4 clips: not the 3 heads
    labels = np.array([0, 2, 1, 2])
    logits = net.forward(x)
    loss, cache = F.softmax_cross_entropy_forward(logits, labels)
    dx = net.backward(F.softmax_cross_entropy_backward(1.0, cache))
    xt = torch.tensor(x, requires_grad=True)
    lt = twin(xt)
    torch.nn.functional.cross_entropy(lt, torch.tensor(labels)).backward()
    np.testing.assert_allclose(logits, lt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-13)
    theirs = {k: p.grad.numpy() for k, p in twin.named_parameters()}
    assert set(theirs) == set(net.grads)
    for key, value in net.grads.items():
        np.testing.assert_allclose(value, theirs[key], rtol=1e-9, atol=1e-13, err_msg=key)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_transformer_gradcheck(xp_cpu, pos):
    net = _perturb(VideoTransformer(**SMALL, pos=pos, pool="cls", dtype="float64", seed=2, xp=xp_cpu))
    labels = B.asarray(np.array([1, 2]), xp=xp_cpu)
    cache = {}

    def forward(x, **params):
        for key, value in params.items():
            net.set_param(key, value)
        loss, cache["c"] = F.softmax_cross_entropy_forward(net.forward(x), labels)
        return loss

    def backward(dloss):
        dx = net.backward(F.softmax_cross_entropy_backward(dloss, cache["c"]))
        return {"x": dx, **net.grads}

    result = gradcheck(forward, backward, {"x": _clips(2, xp=xp_cpu), **net.params}, method="random",
                       directions=2)
    assert result.passed, str(result)
    assert len(result.errors) == 1 + len(net.params) and not result.zero


def test_transformer_attention_and_library(xp, device):
    net = VideoTransformer(**SMALL, pool="cls", dtype="float32", xp=xp, device=device)
    x = _clips(2, xp=xp, dtype="float32", device=device)
    logits, attention = net.forward(x, return_attention=True)
    assert B.array_namespace(logits) is B.array_namespace(x) and tuple(logits.shape) == (2, 3)
    assert set(attention) == {"blocks.0", "blocks.1"}
    a = B.to_numpy(attention["blocks.1"])
    assert a.shape == (2, 3, 1 + net.num_tokens, 1 + net.num_tokens)
    np.testing.assert_allclose(a.sum(axis=-1), 1.0, rtol=1e-5)
    dx = net.backward(logits)
    assert tuple(dx.shape) == tuple(x.shape) and B.dtype_name(dx.dtype) == "float32"
    assert net.buffers == {}


def test_transformer_errors():
    with pytest.raises(ValueError, match="tubelet .* must divide"):
        VideoTransformer(frames=8, size=10, tubelet=(1, 4, 4))
    with pytest.raises(ValueError, match="num_heads .* must divide embed_dim"):
        VideoTransformer(embed_dim=10, num_heads=4)
    with pytest.raises(ValueError, match="pool must be one of"):
        VideoTransformer(pool="max")
    with pytest.raises(ValueError, match="tubelet must be 3 positive"):
        VideoTransformer(tubelet=(1, 4))
    net = VideoTransformer(**SMALL, dtype="float64")
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, 4, 8, 8\)"):
        net.forward(np.zeros((1, 2, 4, 8, 4)))
    with pytest.raises(TypeError, match="must be float64"):
        net.forward(np.zeros((1, 2, 4, 8, 8), dtype=np.float32))
    with pytest.raises(RuntimeError, match="needs a forward pass"):
        net.backward(np.zeros((1, 3)))
    state = net.state_dict()
    state["head.weight"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match="'head.weight' has shape"):
        net.load_state_dict(state)
    with pytest.raises(ValueError, match="num_heads .* must divide"):
        TrainConfig(model="transformer", embed_dim=10, num_heads=4).validate()


def test_transformer_refuses_an_empty_batch_and_a_state_that_is_not_a_dict():
    """An empty batch failed in a reshape (NumPy's words); a list's items were called unexpected keys, None raised
    'NoneType' object is not iterable. VideoNet's load_state_dict shares the check."""
    from nlref.nn.models import VideoNet

    net = VideoTransformer(**SMALL, dtype="float64")
    with pytest.raises(ValueError, match=r"x must hold at least one clip, got shape \(0, 2, 4, 8, 8\)"):
        net.forward(np.zeros((0, 2, 4, 8, 8)))
    for model in (net, VideoNet(widths=(4, 4, 4), blocks=(1, 1, 1))):
        for state in (None, list(model.state_dict().values())):
            with pytest.raises(TypeError, match="state must be a dict of arrays"):
                model.load_state_dict(state)


# --------------------------------------------------------------------------- training
TINY = dict(model="transformer", embed_dim=8, depth=1, num_heads=2, mlp_dim=16, epochs=3, batch_size=8, n_train=32,
            n_val=16, frames=6, size=16, tubelet=(2, 8, 8), dtype="float64", seed=5)


def test_transformer_resume_is_exact(tmp_path):
    config = TrainConfig(**TINY)
    full = train(config, tmp_path / "full", progress=False, log=None)

    def interrupt(epoch, row, model):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "part", progress=False, log=None, callback=interrupt)
    resumed = train(config, tmp_path / "part", resume=True, progress=False, log=None)
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert [r["val_loss"] for r in full["history"]] == [r["val_loss"] for r in resumed["history"]]
    assert resumed["model"].params["blocks.0.self_attn.in_proj_weight"].shape == (24, 8)
    # and it learned something: the training loss fell
    assert full["history"][-1]["train_loss"] < full["history"][0]["train_loss"]
