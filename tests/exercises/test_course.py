"""The student edition (``nlref course --student DIR``): solutions out, checks kept, every check unanswered.

The teacher edition is ``notebooks/`` itself: the suite's nbmake run executes it, and each
worked solution ends with ``assert chNN.exK(...)``, so every check passes there. The command's own
behaviour (atomic write, --overwrite, a broken folder): tests/cli/test_course.py.
"""

import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from nlref import course

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHECK_CALL = re.compile(r"^ch\d\d\.ex\d+\(", re.M)


def _toy():
    return new_notebook(cells=[
        new_markdown_cell("```{exercise} E\n:label: x-ex1\n```"),
        new_code_cell("def f(x):\n    '''doc'''\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\n"
                      "check(f)", outputs=[nbformat.v4.new_output("stream", text="correct")], execution_count=3),
        new_code_cell("### BEGIN SOLUTION\nhelper = 3\nex2_answer = helper + 1\n### END SOLUTION\ncheck(ex2_answer)"),
        new_markdown_cell("Before.\n\n=== BEGIN MARK SCHEME ===\nThe answer is 4.\n=== END MARK SCHEME ==="),
        new_markdown_cell("hidden scheme", metadata={"tags": ["mark-scheme"]}),
        new_markdown_cell("```{solution-start} x-ex1\n:class: dropdown\n```"),
        new_code_cell("### BEGIN SOLUTION\nassert check(f)\n### END SOLUTION"),
        new_markdown_cell("```{solution-end}\n```"),
        new_markdown_cell("after"),
    ])


def test_student_notebook_replaces_solutions_and_keeps_checks():
    teacher = _toy()
    student = course.student_notebook(teacher)
    sources = [c.source for c in student.cells]
    assert sources[1] == "def f(x):\n    '''doc'''\n    raise NotImplementedError  # your code here\n\ncheck(f)"
    assert sources[2] == "helper = None  # your answer\nex2_answer = None  # your answer\ncheck(ex2_answer)"
    assert sources[3] == "Before."
    assert sources[4] == "after" and len(sources) == 5          # tagged scheme and the solution block gone
    assert student.cells[1].outputs == [] and student.cells[1].execution_count is None
    assert "return 2 * x" in teacher.cells[1].source                # the teacher edition is not changed


@pytest.mark.parametrize("source", ["### BEGIN SOLUTION\nx = 1\n",
                                    "x = 1\n### END SOLUTION",
                                    "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION"])
def test_unbalanced_markers_are_an_error(source):
    with pytest.raises(ValueError, match="cell 0"):
        course.student_source(source, where="cell 0")


def test_unended_solution_block_is_an_error():
    nb = new_notebook(cells=[new_markdown_cell("```{solution-start} a\n```"), new_code_cell("x = 1")])
    with pytest.raises(ValueError, match="never ended"):
        course.student_notebook(nb)


def test_teacher_display_hides_markers_and_folds_graded_code():
    shown = course.teacher_display(_toy())
    assert "### " not in shown.cells[1].source and "return 2 * x" in shown.cells[1].source
    assert shown.cells[1].metadata["tags"] == ["hide-input"]
    assert "tags" not in shown.cells[6].metadata                  # inside a folded solution already
    assert "MARK SCHEME" not in shown.cells[3].source and "The answer is 4." in shown.cells[3].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_teacher_solutions_are_marked_for_nbgrader(path):
    """Every cell of a worked solution is marked, so that nbgrader removes what the student edition removes."""
    nb = nbformat.read(path, as_version=4)
    blocks = course.solution_blocks(nb)
    assert blocks, "a chapter ends with exercises and their solutions"
    for start, stop in blocks:
        for cell in nb.cells[start + 1:stop]:
            text = cell.source.strip()
            if cell.cell_type == "code":
                assert text.startswith(course.SOLUTION_BEGIN) and text.endswith(course.SOLUTION_END), text[:80]
            else:
                assert text.startswith(course.SCHEME_BEGIN) and text.endswith(course.SCHEME_END), text[:80]
    student = course.student_notebook(nb)
    for cell in student.cells:
        assert "BEGIN SOLUTION" not in cell.source and "MARK SCHEME" not in cell.source
        assert "solution-start" not in cell.source


@pytest.fixture(scope="module")
def student_edition(tmp_path_factory):
    return course.write_student_edition(tmp_path_factory.mktemp("course") / "student", notebooks=ROOT / "notebooks")


@pytest.mark.parametrize("index", range(len(NOTEBOOKS)), ids=[p.stem for p in NOTEBOOKS])
def test_student_edition_runs_and_every_check_is_unanswered(student_edition, index):
    from nbclient import NotebookClient

    path = student_edition[index]
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    checks = [cell for cell in nb.cells if cell.cell_type == "code" and CHECK_CALL.search(cell.source)]
    assert checks, "every chapter has checked exercises"
    for cell in checks:
        text = "".join(out.get("text", "") for out in cell.outputs)
        assert "not answered yet" in text, (cell.source, text)
        assert ": correct" not in text and "not yet:" not in text, (cell.source, text)


@pytest.mark.parametrize("body, placeholders", [
    ("a, b = 1, 2", "a = None  # your answer\nb = None  # your answer"),     # was raise NotImplementedError
    ("if True:\n    x = 1\nelse: x = 2", "x = None  # your answer"),        # was "else = None", a SyntaxError
    ("sq = [k * k for k in range(3)]\nans: int = 2\nans += 1", "sq = None  # your answer\nans = None  # your answer"),
], ids=["tuple", "if-else", "comprehension"])
def test_every_name_a_top_level_solution_binds_becomes_a_placeholder(body, placeholders):
    # a top-level raise would stop the student's notebook with a traceback before the check runs
    source = f"{course.SOLUTION_BEGIN}\n{body}\n{course.SOLUTION_END}\ncheck(x)"
    assert course.student_source(source) == placeholders + "\ncheck(x)"
