"""SGD, Adam and StepSchedule against torch.optim (the same gradients in, 1e-12 out), an end-to-end
training run against the torch twin, state round trips, and bad arguments."""

import math
from fractions import Fraction

import numpy as np
import pytest

import nlref.backend as B
from nlref.nn import functional as F
from nlref.nn.models import VideoNet
from nlref.nn.optim import SGD, Adam, StepSchedule

try:
    import torch

    from tests.nn.torch_oracle import TorchVideoNet, load_videonet_params
except ImportError:  # the oracle is optional
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch (the optional oracle) is not installed")

TINY = dict(widths=(4, 6, 8), blocks=(1, 2, 2), dtype="float64")
BATCH = 3


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _net(xp=np, seed=3, dropout=0.5):
    """A tiny I3D with one non-local block whose BN gamma is not zero (so every gradient is alive)."""
    net = VideoNet("i3d", nonlocal_blocks=1, **TINY, dropout=dropout, seed=seed, xp=xp)
    gamma = net.params["res3.nl1.bn.gamma"]
    net.set_param("res3.nl1.bn.gamma", B.asarray(np.linspace(-1.0, 1.0, gamma.shape[0]), like=gamma))
    return net


def _batch(step, xp=np):
    rng = np.random.default_rng(100 + step)
    x = B.asarray(rng.standard_normal((BATCH, 1, 4, 12, 12)), xp=xp)
    return x, B.asarray(np.array([0, 1, step % 2]), xp=xp)


def _backward(net, step, xp=np):
    """One training step's gradients: softmax cross-entropy of a fixed batch, dropout seeded by the step."""
    x, labels = _batch(step, xp)
    logits = net.forward(x, dropout_seed=step)
    loss, cache = F.softmax_cross_entropy_forward(logits, labels)
    net.backward(F.softmax_cross_entropy_backward(1.0, cache))
    return float(B.to_numpy(loss))


def _host(net):
    return {k: B.to_numpy(v) for k, v in net.params.items()}


def _torch_twin_params(net):
    """Leaf tensors holding the net's parameters, and torch param groups: weight decay off for
    batch-norm parameters and biases (``no_decay``)."""
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in _host(net).items()}
    decay = [t for k, t in tensors.items() if not net.no_decay(k)]
    plain = [t for k, t in tensors.items() if net.no_decay(k)]
    return tensors, decay, plain


def _assert_params_close(net, tensors, *, rtol=1e-12, what=""):
    for k, v in _host(net).items():
        theirs = tensors[k].detach().numpy().reshape(v.shape)
        np.testing.assert_allclose(v, theirs, rtol=rtol, atol=rtol * 1e-2, err_msg=f"{what} {k}")


# --------------------------------------------------------------------------- torch.optim, same gradients
@needs_torch
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_sgd_matches_torch(xp_cpu, momentum):
    net = _net(xp_cpu)
    opt = SGD(net, lr=0.1, momentum=momentum, weight_decay=1e-4)
    schedule = StepSchedule(0.1, 5, milestones=(0.6,))  # divided by 10 from step 3
    tensors, decay, plain = _torch_twin_params(net)
    t_opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": plain, "weight_decay": 0.0}],
                            lr=0.1, momentum=momentum, foreach=False)
    t_schedule = torch.optim.lr_scheduler.MultiStepLR(t_opt, milestones=[3], gamma=0.1)
    assert sum(t.numel() for t in decay) > 0 and sum(t.numel() for t in plain) > 0
    for step in range(5):
        _backward(net, step, xp_cpu)
        for k, g in net.grads.items():
            tensors[k].grad = torch.tensor(B.to_numpy(g))
        assert schedule(step) == t_opt.param_groups[0]["lr"]
        opt.step(lr=schedule(step))
        t_opt.step()
        t_schedule.step()
        _assert_params_close(net, tensors, what=f"step {step}")
        if momentum:
            for k, slots in opt.state.items():
                np.testing.assert_allclose(B.to_numpy(slots["momentum"]),
                                           t_opt.state[tensors[k]]["momentum_buffer"].numpy(), rtol=1e-12, atol=1e-14)
    assert opt.steps == 5
    assert (opt.state == {}) == (momentum == 0)


@needs_torch
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_adam_matches_torch(xp_cpu, weight_decay):
    net = _net(xp_cpu)
    opt = Adam(net, lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=weight_decay)
    tensors, decay, plain = _torch_twin_params(net)
    t_opt = torch.optim.Adam([{"params": decay, "weight_decay": weight_decay},
                              {"params": plain, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.8, 0.99), eps=1e-8, foreach=False)
    for step in range(5):
        _backward(net, step, xp_cpu)
        for k, g in net.grads.items():
            tensors[k].grad = torch.tensor(B.to_numpy(g))
        opt.step()
        t_opt.step()
        _assert_params_close(net, tensors, what=f"step {step}")
        for k, slots in opt.state.items():
            theirs = t_opt.state[tensors[k]]
            np.testing.assert_allclose(B.to_numpy(slots["m"]), theirs["exp_avg"].numpy(), rtol=1e-12, atol=1e-16)
            np.testing.assert_allclose(B.to_numpy(slots["v"]), theirs["exp_avg_sq"].numpy(), rtol=1e-12, atol=1e-20)


@needs_torch
def test_adam_is_not_single_group_torch_adam():
    """The docstring's claim has two sides: with weight decay, one torch group (decay on every
    parameter) moves the biases and BN parameters differently, and the weights alike."""
    net = _net()
    opt = Adam(net, lr=1e-2, weight_decay=1e-1)
    tensors, _, _ = _torch_twin_params(net)
    t_opt = torch.optim.Adam(list(tensors.values()), lr=1e-2, weight_decay=1e-1, foreach=False)
    for step in range(3):
        _backward(net, step)
        for k, g in net.grads.items():
            tensors[k].grad = torch.tensor(B.to_numpy(g))
        opt.step()
        t_opt.step()
    ours = _host(net)
    differ = {k for k in ours if not np.allclose(ours[k], tensors[k].detach().numpy().reshape(ours[k].shape),
                                                 rtol=1e-9, atol=1e-12)}
    assert differ and all(net.no_decay(k) for k in differ)


def test_adam_flat_update_equals_the_per_parameter_update(monkeypatch):
    """On NumPy Adam updates all parameters as one flat vector; it gives, to the bit, what the
    parameter-by-parameter update (the path of the other libraries) gives, through a reload too."""
    import nlref.nn.optim as optim

    nets = [_net(), _net()]
    opts = [Adam(n, lr=1e-2, weight_decay=1e-3) for n in nets]
    for step in range(4):
        for i, (net, opt) in enumerate(zip(nets, opts)):
            _backward(net, step, np)
            with monkeypatch.context() as m:
                if i == 1:
                    m.setattr(optim.B, "supports_out", lambda xp: False)
                opt.step()
        if step == 1:  # load other moments in the middle: the flat buffers must be rebuilt from them
            state = opts[1].state_dict()
            for slots in state["state"].values():
                slots["m"] *= 2.0
            for opt in opts:
                opt.load_state_dict(state)
        assert opts[0]._flat is not None and opts[1]._flat is None
        for k in nets[0].params:
            np.testing.assert_array_equal(nets[0].params[k], nets[1].params[k], err_msg=f"step {step} {k}")
            for slot in ("m", "v"):
                np.testing.assert_array_equal(opts[0].state[k][slot], opts[1].state[k][slot])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("make", [lambda net: Adam(net, lr=1e-2, weight_decay=1e-3),
                                  lambda net: SGD(net, lr=1e-2)], ids=["Adam", "SGD"])
def test_a_copied_optimiser_keeps_its_own_state(make, how):
    """(network, optimiser) copied after two steps, as an EMA copy or a pickle is made: each trains on
    as a twin that was never copied does, and the copy's state_dict (what a checkpoint saves) holds its
    own moments. Adam's state held views of its flat buffers; in a copy they became arrays of their
    own, and the copy's state_dict kept the moments of the step it was copied at."""
    import copy
    import pickle

    copies = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}
    runs = [(net, make(net)) for net in (_net(), _net())]
    for step in range(2):
        for net, opt in runs:
            _backward(net, step)
            opt.step()
    runs.append(copies[how](runs[0]))
    assert runs[2][1].model is runs[2][0]
    for step in range(2, 4):
        for net, opt in runs:
            _backward(net, step)
            opt.step()
    (net, opt), (twin, twin_opt), (copied, copied_opt) = runs
    for other, other_opt in ((net, opt), (copied, copied_opt)):
        for k, v in twin.state_dict().items():
            np.testing.assert_array_equal(other.state_dict()[k], v, err_msg=k)
        for k, slots in twin_opt.state_dict()["state"].items():
            for name, v in slots.items():
                np.testing.assert_array_equal(other_opt.state_dict()["state"][k][name], v, err_msg=f"{k} {name}")


class _ZeroGrads:
    """The network with every gradient zero (what the optimiser sees of a model)."""

    def __init__(self, net):
        self.net = net

    params = property(lambda self: self.net.params)
    grads = property(lambda self: {k: v * 0.0 for k, v in self.net.params.items()})

    def set_param(self, key, value):
        self.net.set_param(key, value)

    def no_decay(self, key):
        return self.net.no_decay(key)


def test_no_decay_params_get_no_weight_decay():
    """With a zero gradient, only weights decay, p <- p (1 - lr wd); gamma, beta and biases stay put."""
    net = _net()
    before = _host(net)
    SGD(_ZeroGrads(net), lr=0.5, momentum=0.9, weight_decay=0.1).step()
    for k, v in _host(net).items():
        expected = before[k] if net.no_decay(k) else before[k] * (1 - 0.5 * 0.1)
        np.testing.assert_allclose(v, expected, rtol=1e-15, atol=0, err_msg=k)
    decayed = [k for k in before if not net.no_decay(k)]
    assert "res3.nl1.W_z.weight" in decayed and "fc.weight" in decayed and "fc.bias" not in decayed


# --------------------------------------------------------------------------- end to end against the torch twin
@needs_torch
def test_sgd_training_matches_torch_twin():
    """Three steps of SGD, each side with its own gradients (nlref by hand, torch by autograd)."""
    net = _net(dropout=0.0)
    twin = load_videonet_params(TorchVideoNet(net), net)
    names = twin.named_tensors()
    for name, unit in twin.nonlocal_units():  # the non-local block's parameters under nlref names
        block = unit.block
        for key, conv in unit.conv.items():
            names[f"{name}.{key}.weight"], names[f"{name}.{key}.bias"] = conv.weight, conv.bias
        names[f"{name}.bn.gamma"], names[f"{name}.bn.beta"] = block.W[1].weight, block.W[1].bias
    tensors = {k: names[k] for k in net.params}
    assert len({id(t) for t in tensors.values()}) == len(list(twin.parameters()))
    opt = SGD(net, lr=0.05, momentum=0.9, weight_decay=1e-4)
    t_opt = torch.optim.SGD([{"params": [t for k, t in tensors.items() if not net.no_decay(k)], "weight_decay": 1e-4},
                             {"params": [t for k, t in tensors.items() if net.no_decay(k)], "weight_decay": 0.0}],
                            lr=0.05, momentum=0.9, foreach=False)
    for step in range(3):
        loss = _backward(net, step)
        opt.step()
        x, labels = _batch(step)
        t_opt.zero_grad()
        t_loss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(labels))
        t_loss.backward()
        t_opt.step()
        assert abs(loss - t_loss.item()) <= 1e-12 * abs(loss)
        _assert_params_close(net, tensors, rtol=1e-10, what=f"step {step}")


# --------------------------------------------------------------------------- the schedule
SCHEDULES = [
    dict(base_lr=0.1, total_steps=20, milestones=(0.3, 0.75)),
    dict(base_lr=0.1, total_steps=90, milestones=(0.7,)),  # 0.7 * 90 = 62.99999999999999 in floating point
    dict(base_lr=0.3, total_steps=100, milestones=(0.85, 0.29)),  # unsorted; 0.29 * 100 = 28.999999999999996
    dict(base_lr=0.05, total_steps=40, milestones=(0.6, 0.85), warmup=5),
    dict(base_lr=1.0, total_steps=10, milestones=(0.2, 0.2), factor=0.5, warmup=4),  # milestone inside warm-up
    dict(base_lr=0.2, total_steps=16, milestones=(0.01,)),  # falls on step 0
]


@needs_torch
@pytest.mark.parametrize("kwargs", SCHEDULES)
def test_step_schedule_matches_torch(kwargs):
    schedule = StepSchedule(**kwargs)
    total, warmup = kwargs["total_steps"], kwargs.get("warmup", 0)
    steps = [math.floor(Fraction(str(m)) * total) for m in kwargs["milestones"]]  # exact decimal arithmetic
    assert schedule.milestone_steps == tuple(sorted(steps))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=kwargs["base_lr"])
    chain = [torch.optim.lr_scheduler.MultiStepLR(opt, milestones=steps, gamma=kwargs.get("factor", 0.1))]
    if warmup > 1:
        chain.insert(0, torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0,
                                                          total_iters=warmup - 1))
    torch_schedule = torch.optim.lr_scheduler.ChainedScheduler(chain)
    for step in range(total):
        assert schedule(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=0), step
        opt.step()
        torch_schedule.step()


def test_step_schedule_values():
    s = StepSchedule(1.0, 10, milestones=(0.5, 0.8), warmup=4)
    np.testing.assert_allclose([s(i) for i in range(10)],
                               [0.25, 0.5, 0.75, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01], rtol=1e-15)
    assert StepSchedule(0.1, 10, warmup=1)(0) == 0.1
    assert StepSchedule(0.1, 10, milestones=())(9) == 0.1
    paper = StepSchedule(0.1, 400_000, milestones=(0.375, 0.75))  # Kinetics: / 10 at 150k and 300k
    assert paper.milestone_steps == (150_000, 300_000)
    assert [paper(i) for i in (149_999, 150_000, 299_999, 300_000)] == pytest.approx([0.1, 0.01, 0.01, 0.001])


# --------------------------------------------------------------------------- state round trip
@pytest.mark.parametrize("make", [lambda net: SGD(net, lr=0.1, momentum=0.9, weight_decay=1e-4),
                                  lambda net: Adam(net, lr=1e-2, weight_decay=1e-4)], ids=["sgd", "adam"])
def test_state_dict_round_trip_continues_identically(xp_cpu, make):
    net = _net(xp_cpu)
    opt = make(net)
    for step in range(2):
        _backward(net, step, xp_cpu)
        opt.step()
    model_state, opt_state = net.state_dict(), opt.state_dict()
    assert opt_state["steps"] == 2 and set(opt_state["state"]) == set(net.params)
    assert all(type(a) is np.ndarray for slots in opt_state["state"].values() for a in slots.values())

    other = _net(xp_cpu, seed=99).load_state_dict(model_state)
    other_opt = make(other).load_state_dict(opt_state)
    first = next(iter(opt_state["state"].values()))
    next(iter(first.values()))[...] += 1.0  # host copies: the loaded optimiser does not see this
    for step in range(2, 5):
        for n, o in ((net, opt), (other, other_opt)):
            _backward(n, step, xp_cpu)
            o.step()
        mine, theirs = _host(net), _host(other)
        for k in mine:
            np.testing.assert_array_equal(mine[k], theirs[k], err_msg=f"step {step} {k}")
    assert other_opt.steps == opt.steps == 5


def test_load_state_dict_errors():
    net = _net()
    opt = SGD(net)
    _backward(net, 0)
    opt.step()
    state = opt.state_dict()
    with pytest.raises(ValueError, match=r"parameters this model lacks: \['res9.weight'\]"):
        SGD(net).load_state_dict({"steps": 1, "state": {**state["state"], "res9.weight": {"momentum": np.zeros(1)}}})
    bad = {k: dict(v) for k, v in state["state"].items()}
    bad["fc.weight"]["momentum"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"'fc.weight'/momentum has shape \(3, 3\), expected \(2, 8\)"):
        SGD(net).load_state_dict({"steps": 1, "state": bad})
    with pytest.raises(ValueError, match=r"state 'fc.bias' holds \['momentum'\], but Adam keeps \['m', 'v'\]"):
        Adam(net).load_state_dict({"steps": 1, "state": {"fc.bias": state["state"]["fc.bias"]}})
    with pytest.raises(ValueError, match="optimiser state must be a dict with 'steps' and 'state'"):
        SGD(net).load_state_dict(state["state"])
    fresh = SGD(net)
    with pytest.raises(ValueError):
        fresh.load_state_dict({"steps": 1, "state": bad})
    assert fresh.state == {} and fresh.steps == 0  # nothing half-loaded


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("make,match", [
    (lambda n: SGD(n, lr=0), r"lr must be a number in \(0.0, inf\), got 0"),
    (lambda n: SGD(n, lr=-0.1), "lr must be a number in"),
    (lambda n: SGD(n, lr=float("nan")), "lr must be a number in"),
    (lambda n: SGD(n, lr="0.1"), "lr must be a number in .*got '0.1'"),
    (lambda n: SGD(n, lr=True), "lr must be a number in .*got True"),
    (lambda n: SGD(n, momentum=1.0), r"momentum must be a number in \[0.0, 1.0\), got 1.0"),
    (lambda n: SGD(n, momentum=-0.5), "momentum must be a number in"),
    (lambda n: SGD(n, weight_decay=-1e-4), r"weight_decay must be a number in \[0.0, inf\)"),
    (lambda n: SGD(n, weight_decay=float("inf")), "weight_decay must be a number in"),
    (lambda n: Adam(n, lr=0.0), "lr must be a number in"),
    (lambda n: Adam(n, betas=(1.0, 0.999)), r"betas\[0\] must be a number in \[0.0, 1.0\), got 1.0"),
    (lambda n: Adam(n, betas=(0.9, -0.1)), r"betas\[1\] must be a number in"),
    (lambda n: Adam(n, betas=(0.9,)), r"betas must be a pair of numbers in \[0, 1\), got \(0.9,\)"),
    (lambda n: Adam(n, betas=0.9), "betas must be a pair"),
    (lambda n: Adam(n, eps=0.0), r"eps must be a number in \(0.0, inf\), got 0.0"),
    (lambda n: Adam(n, weight_decay=-1.0), "weight_decay must be a number in"),
    (lambda n: StepSchedule(0.0, 10), r"base_lr must be a number in \(0.0, inf\), got 0.0"),
    (lambda n: StepSchedule(0.1, 0), "total_steps must be a positive integer, got 0"),
    (lambda n: StepSchedule(0.1, 10.0), "total_steps must be a positive integer, got 10.0"),
    (lambda n: StepSchedule(0.1, True), "total_steps must be a positive integer, got True"),
    (lambda n: StepSchedule(0.1, 10, milestones=(0.0,)), r"milestones must be a number in \(0.0, 1.0\), got 0.0"),
    (lambda n: StepSchedule(0.1, 10, milestones=(0.5, 1.0)), "milestones must be a number in .*got 1.0"),
    (lambda n: StepSchedule(0.1, 10, milestones=("0.5",)), "milestones must be a number in"),
    (lambda n: StepSchedule(0.1, 10, factor=1.0), r"factor must be a number in \(0.0, 1.0\), got 1.0"),
    (lambda n: StepSchedule(0.1, 10, factor=0), "factor must be a number in"),
    (lambda n: StepSchedule(0.1, 10, warmup=-1), "warmup must be an integer >= 0, got -1"),
    (lambda n: StepSchedule(0.1, 10, warmup=2.5), "warmup must be an integer >= 0, got 2.5"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make(_net())


def test_misuse():
    with pytest.raises(TypeError, match="model must have params, grads, set_param and no_decay"):
        SGD(object())
    for opt in (SGD(_net()), Adam(_net())):
        with pytest.raises(RuntimeError, match="no gradient for 'stem.conv.weight': call model.backward before step"):
            opt.step()


# --------------------------------------------------------------------------- a step's rate and a loaded state
@pytest.mark.parametrize("make", [SGD, Adam], ids=["sgd", "adam"])
@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.1, 0.0, True, "0.1"])
def test_step_refuses_a_rate_the_constructor_refuses(make, lr):
    """``step(lr=nan)`` turned every weight into NaN; ``-0.1`` climbed the loss; ``True`` was 1."""
    net = _net()
    opt = make(net)
    _backward(net, 0)
    before = _host(net)
    with pytest.raises(ValueError, match=r"lr must be a number in \(0.0, inf\)"):
        opt.step(lr=lr)
    assert opt.steps == 0 and all(np.array_equal(v, _host(net)[k]) for k, v in before.items())


@pytest.mark.parametrize("make", [SGD, Adam], ids=["sgd", "adam"])
def test_numpy_numbers_are_numbers(make):
    net = _net()
    opt = make(net, lr=np.float32(0.5), weight_decay=np.int64(0))
    assert opt.lr == 0.5 and opt.weight_decay == 0.0
    _backward(net, 0)
    opt.step(lr=np.int64(1))
    assert StepSchedule(np.int64(1), 10, milestones=(np.float32(0.5),))(np.int64(5)) == pytest.approx(0.1)


@pytest.mark.parametrize("step", [-1, 2.0, "3", True, None])
def test_schedule_refuses_a_step_that_is_not_a_count(step):
    """A negative step gave a negative rate in the warm-up (-0.04 at step -5)."""
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        StepSchedule(0.1, 100, warmup=10)(step)


def _stepped(make, steps=1):
    net = _net()
    opt = make(net)
    for step in range(steps):
        _backward(net, step)
        opt.step()
    return net, opt


@pytest.mark.parametrize("change,error,match", [
    (lambda s: s.update(steps=-3), ValueError, "optimiser state 'steps' must be a whole number >= 0; got -3"),
    (lambda s: s.update(steps=1.5), ValueError, "'steps' must be a whole number >= 0; got 1.5"),
    (lambda s: s.update(steps="1"), TypeError, "'steps' must be a whole number >= 0"),
    (lambda s: s.update(state=[]), ValueError, "optimiser state must be a dict with 'steps' and 'state'"),
    (lambda s: s["state"].update({"fc.bias": [1.0]}), ValueError, r"'fc.bias' holds list, but Adam keeps"),
    (lambda s: s["state"]["fc.bias"].update(m=s["state"]["fc.bias"]["m"] * np.nan), ValueError,
     r"'fc.bias'/m holds non-finite values"),
    (lambda s: s["state"]["fc.bias"].update(v=s["state"]["fc.bias"]["v"] + 1j), TypeError,
     r"'fc.bias'/v must hold real numbers"),
    (lambda s: s["state"]["fc.bias"].update(v=-s["state"]["fc.bias"]["v"] - 1), ValueError,
     r"'fc.bias'/v holds negative values"),
    (lambda s: s["state"].pop("fc.bias"), ValueError,
     r"state after 1 steps must hold every parameter's slots; it lacks \['fc.bias'\]"),
    (lambda s: s.update(steps=0), ValueError, r"state after 0 steps must hold no parameter's slots; it holds"),
], ids=["negative-steps", "float-steps", "str-steps", "state-list", "slots-list", "nan", "complex",
        "negative-v", "partial", "state-before-a-step"])
def test_load_state_dict_checks_every_entry(change, error, match):
    """Each of these was loaded: NaN moments made the next step NaN, a negative ``v`` its square root NaN,
    a partial state restarted some moments at zero with the bias correction of step 2, and
    ``steps=-3`` or ``"1"`` were taken."""
    _, opt = _stepped(Adam)
    state = opt.state_dict()
    change(state)
    fresh = Adam(_net())
    with pytest.raises(error, match=match):
        fresh.load_state_dict(state)
    assert fresh.state == {} and fresh.steps == 0


def test_load_state_dict_without_momentum_holds_no_slots():
    _, opt = _stepped(lambda n: SGD(n, momentum=0.0), steps=2)
    state = opt.state_dict()
    assert state == {"steps": 2, "state": {}}
    assert SGD(_net(), momentum=0.0).load_state_dict(state).steps == 2
    _, with_momentum = _stepped(SGD)
    with pytest.raises(ValueError, match="must hold no parameter's slots"):
        SGD(_net(), momentum=0.0).load_state_dict(with_momentum.state_dict())
