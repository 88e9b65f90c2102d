"""The book's chapters are the notebooks in ``notebooks/``, read in place.

Sphinx reads only files under its source folder (``docs/``), so each chapter is a
one-line pointer file ``docs/chapters/<name>.nblink`` holding the notebook's path
relative to the repository root. conf.py writes one for every notebook in
``notebooks/`` at the start of each build (the folder is git-ignored), and MyST-NB
reads a ``.nblink`` file through :func:`read_chapter` below (``nb_custom_formats``).
The notebook itself is never copied, and the student's copy stays the only one.

The same step writes the course's student edition (``nlref course --student``) as
``docs/chapters/student-edition.zip``, which the teachers' page offers with a download
link: Sphinx copies it into the built book, so it works offline.
"""
import io
import os
import zipfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
CHAPTERS = ROOT / "docs" / "chapters"
STUDENT_ZIP = CHAPTERS / "student-edition.zip"


def write_pointers():
    """Write ``docs/chapters/<name>.nblink`` for each notebook; remove stale ones.

    A pointer is rewritten only when its text changes, so that an unchanged
    chapter is not read again by an incremental build.
    """
    CHAPTERS.mkdir(exist_ok=True)
    wanted = {}
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        wanted[notebook.stem + ".nblink"] = notebook.relative_to(ROOT).as_posix() + "\n"
    for pointer in CHAPTERS.glob("*.nblink"):
        if pointer.name not in wanted:
            pointer.unlink()
    for name, text in wanted.items():
        pointer = CHAPTERS / name
        if not pointer.exists() or pointer.read_text() != text:
            pointer.write_text(text)
    write_student_zip()


def write_student_zip():
    """Write ``docs/chapters/student-edition.zip``: every notebook's student edition, outputs cleared.

    The archive is the same bytes for the same notebooks (fixed timestamps), rewritten only when
    they change, and written to a temporary file first, then renamed into place.
    """
    from nlref.course import student_notebook

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
            student = student_notebook(nbformat.read(notebook, as_version=4))
            info = zipfile.ZipInfo(f"nlref-student/{notebook.name}", date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, nbformat.writes(student) + "\n")
    data = buffer.getvalue()
    if STUDENT_ZIP.exists() and STUDENT_ZIP.read_bytes() == data:
        return
    partial = STUDENT_ZIP.with_name(STUDENT_ZIP.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, STUDENT_ZIP)


def notebook_path(text):
    """The notebook a pointer file's text names, checked to be inside ``notebooks/``."""
    path = (ROOT / text.strip()).resolve()
    if path.parent != NOTEBOOKS or path.suffix != ".ipynb" or not path.is_file():
        raise ValueError(f"a chapter pointer must name a notebook in {NOTEBOOKS}, got {text.strip()!r}")
    return path


def read_chapter(text):
    """MyST-NB reader for a ``.nblink`` pointer: the notebook it names, as nbformat v4.

    The book shows the teacher edition as :func:`nlref.course.teacher_display` prepares it:
    the solution markers hidden and each graded exercise's solution code folded.
    """
    from nlref.course import teacher_display

    return teacher_display(nbformat.read(notebook_path(text), as_version=4))
