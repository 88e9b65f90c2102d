"""Every flag of the public API takes True or False only, through one check (backend.check_flag).

A truthy string or a 1 used to be taken as True: ``forward(x, return_attention="no")`` returned a
tuple, ``dropout_forward(x, p, training=0)`` skipped the dropout, and
``write_student_edition(dest, overwrite="no")`` replaced an existing edition.
"""

import re

import numpy as np
import pytest

from nlref import backend as B
from nlref import course
from nlref.nn import NonLocalBlock
from nlref.nn import functional as F
from nlref.nn.attention import MultiHeadAttention, TransformerBlock
from nlref.nn.models import ImageResNet, VideoNet, VideoTransformer

BAD = ["no", 1, 0, None, np.array(True), [True]]
RNG = np.random.default_rng(0)
CLIP = RNG.standard_normal((2, 1, 8, 16, 16)).astype(np.float32)
TOKENS = RNG.standard_normal((2, 5, 8)).astype(np.float32)
X = RNG.standard_normal((2, 4, 2, 4, 4)).astype(np.float32)


def _block_forward(flag):
    return NonLocalBlock(4, dims=3, seed=0).forward(X, return_attention=flag)


def _conv_backward(flag):
    out, cache = F.conv3d_forward(X, RNG.standard_normal((3, 4, 1, 3, 3)).astype(np.float32), padding=(0, 1, 1))
    return F.conv3d_backward(np.ones_like(out), cache, input_grad=flag)


def _batchnorm(flag):
    state = {"running_mean": np.zeros(4, np.float32), "running_var": np.ones(4, np.float32)}
    return F.batchnorm_forward(X, np.ones(4, np.float32), np.zeros(4, np.float32), state, training=flag)


CALLS = {
    "NonLocalBlock.forward(return_attention=)": ("return_attention", _block_forward),
    "VideoNet.forward(return_attention=)": (
        "return_attention", lambda flag: VideoNet(nonlocal_blocks=1).forward(CLIP, return_attention=flag)),
    "ImageResNet.forward(return_attention=)": (
        "return_attention", lambda flag: ImageResNet(nonlocal_blocks=1).forward(CLIP[:, :, 0], return_attention=flag)),
    "VideoTransformer.forward(return_attention=)": (
        "return_attention", lambda flag: VideoTransformer().forward(CLIP, return_attention=flag)),
    "MultiHeadAttention.forward(return_attention=)": (
        "return_attention", lambda flag: MultiHeadAttention(8, 2).forward(TOKENS, return_attention=flag)),
    "MultiHeadAttention.forward(causal=)": (
        "causal", lambda flag: MultiHeadAttention(8, 2).forward(TOKENS, causal=flag)),
    "TransformerBlock.forward(return_attention=)": (
        "return_attention", lambda flag: TransformerBlock(8, 2, 16).forward(TOKENS, return_attention=flag)),
    "TransformerBlock.forward(causal=)": (
        "causal", lambda flag: TransformerBlock(8, 2, 16).forward(TOKENS, causal=flag)),
    "conv3d_backward(input_grad=)": ("input_grad", _conv_backward),
    "batchnorm_forward(training=)": ("training", _batchnorm),
    "dropout_forward(training=)": ("training", lambda flag: F.dropout_forward(X, 0.5, training=flag, seed=0)),
    "NonLocalBlock(sub_sample=)": ("sub_sample", lambda flag: NonLocalBlock(4, sub_sample=flag)),
    "MultiHeadAttention(bias=)": ("bias", lambda flag: MultiHeadAttention(8, 2, bias=flag)),
}


@pytest.mark.parametrize("bad", BAD, ids=repr)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_flag_that_is_not_a_bool_is_refused_and_named(call, bad):
    name, run = CALLS[call]
    with pytest.raises(B.FlagError, match=re.escape(f"{name} must be True or False, got {bad!r}")):
        run(bad)


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("good", [True, False, np.True_, np.False_], ids=repr)
def test_python_and_numpy_bools_are_taken(call, good):
    CALLS[call][1](good)


def test_the_error_is_both_a_type_error_and_a_value_error():
    # a TypeError by its nature; a ValueError as the constructors' flag checks raised before
    for error in (TypeError, ValueError):
        with pytest.raises(error):
            B.check_flag("flag", "yes")


@pytest.mark.parametrize("net, make_input", [
    (lambda: VideoNet(nonlocal_blocks=1), lambda: CLIP),
    (lambda: VideoTransformer(), lambda: CLIP),
])
def test_a_bad_input_grad_leaves_the_forward_pass_for_a_good_backward(net, make_input):
    model = net()
    logits = model.forward(make_input())
    with pytest.raises(B.FlagError, match="input_grad must be True or False, got 'no'"):
        model.backward(np.ones_like(logits), input_grad="no")
    assert model.backward(np.ones_like(logits), input_grad=True).shape == CLIP.shape


def test_a_student_edition_is_not_replaced_by_a_truthy_overwrite(tmp_path):
    dest = tmp_path / "student"
    course.write_student_edition(dest)
    mine = dest / "mine.txt"
    mine.write_text("kept")
    for bad in ("no", 1):
        with pytest.raises(B.FlagError, match=f"overwrite must be True or False, got {bad!r}"):
            course.write_student_edition(dest, overwrite=bad)
    assert mine.read_text() == "kept"
    course.write_student_edition(dest, overwrite=True)
    assert not mine.exists()


@pytest.mark.parametrize("bad", ["no", 0], ids=repr)
def test_compare_block_takes_only_a_bool_verbose(bad, capsys):
    pytest.importorskip("torch")
    from nlref import compare_block
    from tests.nn.peer_modules import SlowFastNonlocal

    module = SlowFastNonlocal(4, 2).eval()
    x = RNG.standard_normal((2, 4, 2, 3, 3))
    with pytest.raises(B.FlagError, match=f"verbose must be True or False, got {bad!r}"):
        compare_block(module, x, verbose=bad)
    assert compare_block(module, x, verbose=False).agree
    assert capsys.readouterr().out == ""  # verbose=0 used to mean quiet; only False does now
