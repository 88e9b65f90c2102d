"""``nlref course --student DIR`` as users run it: an atomic write that never overwrites by accident, and a
broken notebook folder that writes nothing (the student edition itself: tests/exercises/test_course.py)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from nlref.cli import main

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_write_is_atomic_and_never_overwrites(tmp_path, capsys):
    dest = tmp_path / "student"
    assert main(["course", "--student", str(dest)]) == 0
    written = sorted(p.name for p in dest.glob("*.ipynb"))
    assert written == [p.name for p in NOTEBOOKS]
    assert str(dest) in capsys.readouterr().out
    (dest / "mine.txt").write_text("a student's work")
    assert main(["course", "--student", str(dest)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (dest / "mine.txt").exists()
    assert main(["course", "--student", str(dest), "--overwrite"]) == 0
    assert not (dest / "mine.txt").exists() and len(list(dest.glob("*.ipynb"))) == len(NOTEBOOKS)
    assert [p.name for p in tmp_path.iterdir()] == ["student"]    # no staging folder left behind


def test_bad_notebook_folder_writes_nothing(tmp_path, capsys):
    broken = tmp_path / "teacher"
    broken.mkdir()
    nbformat.write(new_notebook(cells=[new_code_cell("### BEGIN SOLUTION\nx = 1")]), broken / "a.ipynb")
    assert main(["course", "--student", str(tmp_path / "out"), "--notebooks", str(broken)]) == 2
    assert "a.ipynb" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["course", "--student", str(tmp_path / "out"), "--notebooks", str(tmp_path / "none")]) == 2
    assert "holds none" in capsys.readouterr().err


def _teacher_copy(folder):
    folder.mkdir()
    for path in NOTEBOOKS[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_the_student_edition_never_replaces_the_teachers_notebooks(tmp_path, capsys):
    """--student equal to --notebooks, with --overwrite, replaced the teacher's notebooks by the student
    edition: every solution lost, and exit status 0."""
    teacher = tmp_path / "nb"
    before = _teacher_copy(teacher)
    for student in (teacher, tmp_path, teacher / ".." / "nb"):   # the folder itself, one that holds it, another spelling
        assert main(["course", "--student", str(student), "--notebooks", str(teacher), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--student:" in err and "teacher's notebooks" in err
        assert {p.name: p.read_bytes() for p in teacher.iterdir()} == before


def test_the_student_edition_is_never_written_among_the_teachers_notebooks(tmp_path, capsys):
    """--student notebooks/sub wrote the student edition inside the teacher's folder, beside the solutions (and
    collected with them wherever that folder's notebooks are run, as the suite runs notebooks/)."""
    teacher = tmp_path / "nb"
    before = _teacher_copy(teacher)
    for student in (teacher / "student", teacher / "a" / "b", tmp_path / "nb" / "." / "x"):
        assert main(["course", "--student", str(student), "--notebooks", str(teacher)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--student:" in err and "inside the notebooks folder" in err
        assert {p.name: p.read_bytes() for p in teacher.iterdir()} == before   # nothing made there
    assert main(["course", "--student", str(tmp_path / "student"), "--notebooks", str(teacher)]) == 0   # beside it


def test_the_current_folder_is_never_the_student_folder(tmp_path, capsys, monkeypatch):
    """--student . tried to rename the folder the process runs in: a raw "Device or resource busy", and
    hidden folders left behind."""
    teacher = tmp_path / "nb"
    _teacher_copy(teacher)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for student in (".", "sub/..", str(tmp_path)):
        assert main(["course", "--student", student, "--notebooks", str(teacher), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("current folder" in err or "teacher's notebooks" in err)
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["nb", "work"]
    for extra in ([], ["--overwrite"]):   # '' is the current folder too; it said "'' already exists"
        assert main(["course", "--student", "", "--notebooks", str(teacher), *extra]) == 2
        assert capsys.readouterr().err == "nlref course: error: --student must name a new folder for the student " \
                                          "edition; got ''\n"


def test_course_without_nbformat_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """nbformat is not a dependency of nlref: an installed nlref without it said "internal error
    (ModuleNotFoundError ...): this is a bug in nlref"."""
    import sys

    monkeypatch.setitem(sys.modules, "nbformat", None)   # import nbformat now raises ModuleNotFoundError
    assert main(["course", "--student", str(tmp_path / "student")]) == 2
    err = capsys.readouterr().err
    assert "nlref course reads and writes the notebooks with nbformat, which is not installed" in err
    assert "internal error" not in err and not (tmp_path / "student").exists()


def test_an_installed_nlref_finds_its_notebooks(tmp_path, monkeypatch):
    """The wheel carried no notebooks, and outside a clone `nlref course` looked in site-packages/notebooks.
    The notebooks are installed in share/nlref/notebooks and found through the installed files' record."""
    from importlib import metadata

    from nlref import course

    prefix = tmp_path / "env"
    site = prefix / "lib" / "python3.11" / "site-packages"
    (site / "nlref").mkdir(parents=True)
    share = prefix / "share" / "nlref" / "notebooks"
    share.mkdir(parents=True)
    for path in NOTEBOOKS[:2]:
        (share / path.name).write_bytes(path.read_bytes())

    class Installed:
        files = [metadata.PackagePath("nlref/__init__.py")] + [
            metadata.PackagePath(f"../../../share/nlref/notebooks/{p.name}") for p in NOTEBOOKS[:2]]

        def locate_file(self, path):
            return site / path

    monkeypatch.setattr(metadata, "distribution", lambda name: Installed())
    monkeypatch.setattr(course, "__file__", str(site / "nlref" / "course.py"))
    monkeypatch.chdir(tmp_path)
    assert course.default_notebooks() == share.resolve()
    assert main(["course", "--student", "student"]) == 0
    assert sorted(p.name for p in (tmp_path / "student").iterdir()) == [p.name for p in NOTEBOOKS[:2]]
