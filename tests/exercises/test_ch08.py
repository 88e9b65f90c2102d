"""Chapter 8's exercise checks: right answers pass, wrong ones (and wrong shapes) fail, unanswered
ones (None, or a function still raising NotImplementedError) return None, nothing raises; and the
notebook's own solutions pass, while its student edition runs to None."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from nlref import course
from nlref.exercises import ch08
from nlref.nn import functional as F
from nlref.nn.attention import MultiHeadAttention, sinusoidal_encoding

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "08_transformer.ipynb"


def _not_written(*args):
    raise NotImplementedError


def _broken(*args):
    raise ZeroDivisionError("oops")


def _ln_right(dout, cache):
    return F.layernorm_backward(dout, cache)


def _ln_no_mean_terms(dout, cache):          # forgets the two mean terms of dx
    x_hat, gamma, inv_std = cache
    dx, dg, db = F.layernorm_backward(dout, cache)
    return dout * gamma * inv_std, dg, db


def _ln_wrong_shape(dout, cache):
    dx, dg, db = F.layernorm_backward(dout, cache)
    return dx, dg[None, :], db


def _mha_right(x, params, num_heads, dout):
    mha = MultiHeadAttention(x.shape[-1], num_heads, dtype="float64")
    mha.params.update(params)
    mha.forward(x)
    return {"x": mha.backward(dout), **mha.grads}


def _mha_one_head(x, params, num_heads, dout):  # ignores the heads: one softmax over all channels
    return _mha_right(x, params, 1, dout)


def _mha_missing_key(x, params, num_heads, dout):
    grads = _mha_right(x, params, num_heads, dout)
    del grads["in_proj_bias"]
    return grads


def _mha_transposed(x, params, num_heads, dout):
    grads = _mha_right(x, params, num_heads, dout)
    grads["out_proj.weight"] = grads["out_proj.weight"].T
    return grads


def _sin_swapped(length, dim):                # cos in the even channels, sin in the odd ones
    t = sinusoidal_encoding(length, dim)
    return np.stack([t[:, 1::2], t[:, 0::2]], axis=-1).reshape(length, dim)


CASES = {
    "ex1": (_ln_right, [_ln_no_mean_terms, _ln_wrong_shape, lambda d, c: None, lambda d, c: (1, 2)]),
    "ex2": (_mha_right, [_mha_one_head, _mha_missing_key, _mha_transposed, lambda *a: [1, 2]]),
    "ex3": (16640, [16640 + 64 * 4, 4 * 64 * 64, "sixteen thousand", np.zeros(2)]),
    "ex4": (sinusoidal_encoding, [_sin_swapped, lambda n, d: sinusoidal_encoding(n, d)[:, :-1],
                                  lambda n, d: np.zeros((n, d))]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_checks(name, capsys):
    check = getattr(ch08, name)
    right, wrongs = CASES[name]
    assert check(None) is None
    assert "not answered yet" in capsys.readouterr().out
    assert check(right) is True
    assert "correct" in capsys.readouterr().out
    for wrong in wrongs:
        assert check(wrong) is False, wrong
        assert "not yet" in capsys.readouterr().out
    if name != "ex3":
        assert check(_not_written) is None
        assert "not answered yet" in capsys.readouterr().out
        assert check(_broken) is False
        assert "raised ZeroDivisionError" in capsys.readouterr().out
        assert check("not a function") is False


def test_degenerate_answers_fail():
    """All-zero gradients would match a zero output gradient: the checks use random ones."""
    assert ch08.ex1(lambda d, c: tuple(np.zeros_like(a) for a in F.layernorm_backward(d, c))) is False
    assert ch08.ex2(lambda x, p, h, d: {k: np.zeros_like(v) for k, v in _mha_right(x, p, h, d).items()}) is False


# --------------------------------------------------------------------------- the notebook's solutions
def _cells():
    nb = json.loads(NOTEBOOK.read_text())
    return [("".join(c["source"]), c["cell_type"]) for c in nb["cells"]]


def _solution_cells():
    """The graded exercises' cells: a function whose body is a marked solution."""
    return [src for src, kind in _cells() if kind == "code" and src.startswith("def ") and "### BEGIN SOLUTION" in src]


def _student_edition(src):
    """What ``nlref course --student`` makes of the cell: the solution replaced by ``raise NotImplementedError``."""
    return course.student_source(src, where="chapter 8")


def _run(sources):
    namespace = {}
    exec(compile("import math\nimport numpy as np\nfrom nlref.exercises import ch08\n", "setup", "exec"), namespace)
    for i, src in enumerate(sources):
        exec(compile(src, f"cell{i}", "exec"), namespace)
    return namespace


def test_notebook_has_graded_exercises_with_levels():
    text = "\n".join(src for src, kind in _cells() if kind == "markdown")
    for label in ("ch08-ex1", "ch08-ex2", "ch08-ex3", "ch08-ex4"):
        assert f":label: {label}" in text
    assert len(re.findall(r"\*(?:Graded|Level:?);? (warm-up|core|stretch); about \d+ minutes", text)) >= 4
    assert len(_solution_cells()) >= 2


def test_notebook_solutions_pass_and_student_edition_is_unanswered(capsys):
    teacher = _run(_solution_cells())
    assert ch08.ex1(teacher["layernorm_backward_mine"]) is True
    assert ch08.ex2(teacher["mha_backward_mine"]) is True
    student = _run([_student_edition(src) for src in _solution_cells()])
    assert ch08.ex1(student["layernorm_backward_mine"]) is None
    assert ch08.ex2(student["mha_backward_mine"]) is None


def test_levels_match_the_notebook():
    """ch08.LEVELS (read by the teachers' page) says what each exercise's text says; GRADED are the backward passes."""
    found = {}
    for src, kind in _cells():
        label = re.search(r":label: ch08-(ex\d+)", src) if kind == "markdown" else None
        level = re.search(r"\*(?:Graded|Level:?);? (warm-up|core|stretch); about (\d+) minutes", src)
        if label and level:
            found[label.group(1)] = (level.group(1), int(level.group(2)))
    assert found == ch08.LEVELS
    assert set(ch08.GRADED) == {"ex1", "ex2"} and set(ch08.GRADED) <= set(ch08.LEVELS)
