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
