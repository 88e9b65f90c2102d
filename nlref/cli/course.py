"""``nlref course``: the student edition of the notebooks (the work is :mod:`nlref.course`'s)."""

from __future__ import annotations

from pathlib import Path

from nlref.cli._common import CommandError, say, writable_folder


def add_parser(sub, fmt):
    """The ``nlref course`` subcommand (its options are :mod:`nlref.course`'s)."""
    from nlref import course

    return course.add_parser(sub, fmt)


def run(args):
    """Write the student edition; a bad ``--student`` or ``--notebooks`` is named by its flag."""
    from nlref import course

    if not args.student:  # Path("") is the current folder: "'' already exists" said nothing useful
        raise CommandError("--student must name a new folder for the student edition; got ''")
    student = Path(args.student)
    if (student.exists() or student.is_symlink()) and not args.overwrite:
        raise CommandError(f"--student {args.student!r} already exists; add --overwrite to replace it, or choose "
                           "another folder")
    if student.exists() and not student.is_dir():
        raise CommandError(f"--student {args.student!r} exists and is not a folder; it is never replaced")
    notebooks = Path(course.default_notebooks() if args.notebooks is None else args.notebooks)
    if not (notebooks.is_dir() and any(notebooks.glob("*.ipynb"))):
        raise CommandError(f"--notebooks {str(notebooks)!r} must be a folder holding the course's .ipynb files; "
                           "it holds none")
    try:
        course.check_destination(student, notebooks)
    except ValueError as err:
        raise CommandError(f"--student: {err}") from None
    from nlref._files import writing_target

    writable_folder(writing_target(student).parent, "--student", args.student)  # the edition is written beside DIR, then renamed into place
    try:
        written = course.write_student_edition(args.student, notebooks=notebooks, overwrite=args.overwrite)
    except ValueError as err:  # a notebook of --notebooks whose solution markers do not pair up
        raise CommandError(f"--notebooks: {err}") from None
    except ModuleNotFoundError as err:  # imported before anything is read or written
        if err.name != "nbformat":
            raise
        raise CommandError("nlref course reads and writes the notebooks with nbformat, which is not installed "
                           "here (it is not a dependency of nlref): pip install nbformat, or pip install "
                           "\"nlref[notebooks]\", which brings JupyterLab too") from None
    say(f"student edition: {len(written)} notebooks in {args.student}")
    for path in written:
        say(f"  {path.name}")
