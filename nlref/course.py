"""The student edition of the course: the chapters' notebooks with the solutions taken out.

The notebooks in ``notebooks/`` are the **teacher edition**. Their solutions are marked the
way nbgrader marks them, so that a teacher who uses nbgrader can generate and grade
assignments from them directly, and a teacher who does not can run ``nlref course --student
DIR``:

* **Code.** Solution code sits between a line ``### BEGIN SOLUTION`` and a line
  ``### END SOLUTION`` (any indentation, the same for both lines). In the student edition the
  lines between them are replaced by ``raise NotImplementedError`` at the marker's indentation
  (inside a function: the signature and docstring stay), or, at the top level of a cell, by
  ``name = None`` for every name the solution assigned there (the placeholder a check reads
  as "not answered yet"; ``raise NotImplementedError`` when it assigned none).
* **Written answers.** Text between a line ``=== BEGIN MARK SCHEME ===`` and a line
  ``=== END MARK SCHEME ===`` in a markdown cell is removed, and so is a markdown cell whose
  metadata tags include ``mark-scheme``.
* **Worked solutions.** A chapter shows its worked solutions folded under the exercise,
  between a markdown cell that opens a ``solution-start`` directive and one that opens a
  ``solution-end`` directive (the sphinx-exercise directives). The student edition drops such a block whole; every code cell
  in it is marked as solution code and every markdown cell as a mark scheme, so nbgrader
  removes the same content.

The student edition also has every output and execution count cleared. The checks
(``nlref.exercises``) stay: run on the student edition, each reports "not answered yet".
"""

from __future__ import annotations

import ast
import copy
import os
import re
import shutil
import tempfile
from pathlib import Path

from ._files import writing_target
from .backend import check_flag

__all__ = ["SOLUTION_BEGIN", "SOLUTION_END", "SCHEME_BEGIN", "SCHEME_END", "MARK_SCHEME_TAG",
           "solution_blocks", "student_source", "student_notebook", "teacher_display",
           "write_student_edition", "default_notebooks"]

#: The line that opens solution code in a code cell (nbgrader's marker).
SOLUTION_BEGIN = "### BEGIN SOLUTION"
#: The line that closes solution code, at the indentation of its ``SOLUTION_BEGIN``.
SOLUTION_END = "### END SOLUTION"
#: The line that opens a written answer (a mark scheme) in a markdown cell.
SCHEME_BEGIN = "=== BEGIN MARK SCHEME ==="
#: The line that closes a written answer.
SCHEME_END = "=== END MARK SCHEME ==="
#: A markdown cell with this tag in ``metadata["tags"]`` is a written answer, left out of the student edition.
MARK_SCHEME_TAG = "mark-scheme"

_ASSIGNED = re.compile(r"^([A-Za-z_]\w*)\s*(?::[^=]*)?=(?!=)")


def _regions(lines, begin, end, where):
    """``(start, stop, indent)`` of each marked region of ``lines`` (marker lines included)."""
    regions, start = [], None
    for n, line in enumerate(lines):
        text = line.strip()
        if text == begin:
            if start is not None:
                raise ValueError(f"{where}: {begin!r} on line {n + 1} inside another solution")
            start = n
        elif text == end:
            if start is None:
                raise ValueError(f"{where}: {end!r} on line {n + 1} without {begin!r}")
            indent = len(lines[start]) - len(lines[start].lstrip())
            regions.append((start, n, lines[start][:indent]))
            start = None
    if start is not None:
        raise ValueError(f"{where}: {begin!r} on line {start + 1} is never closed by {end!r}")
    return regions


def _assigned(body):
    """The names a top-level solution ``body`` (lines) binds, in order: ``x = ``, ``x: int = ``,
    ``a, b = ``, ``x += ``, a ``for`` or ``with`` target, also inside a top-level ``if`` or ``for``
    (not inside a function, a class or a comprehension). From the parsed statements; a body that
    does not parse on its own falls back to the lines that start with ``name =``."""
    try:
        tree = ast.parse("\n".join(body))
    except SyntaxError:
        return [m.group(1) for m in map(_ASSIGNED.match, body) if m]
    names, todo = [], list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.ListComp,
                             ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue  # their own scope (a comprehension's variable does not leak)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.append(node.id)
        todo[:0] = list(ast.iter_child_nodes(node))  # depth first: the names in the order they are written
    return names


def student_source(source: str, *, where: str = "cell") -> str:
    """A code cell's source with every marked solution replaced by its placeholder (see the module)."""
    lines = source.split("\n")
    out, done = [], 0
    for start, stop, indent in _regions(lines, SOLUTION_BEGIN, SOLUTION_END, where):
        out += lines[done:start]
        body = lines[start + 1:stop]
        names = [] if indent else _assigned(body)
        if names:
            out += [f"{name} = None  # your answer" for name in dict.fromkeys(names)]
        else:
            out.append(f"{indent}raise NotImplementedError  # your code here")
        done = stop + 1
    return "\n".join(out + lines[done:])


def _without_scheme(source: str, where: str) -> str:
    lines = source.split("\n")
    out, done = [], 0
    for start, stop, _ in _regions(lines, SCHEME_BEGIN, SCHEME_END, where):
        out += lines[done:start]
        done = stop + 1
    return "\n".join(out + lines[done:]).strip("\n")


def _directive(cell, name):
    return cell.cell_type == "markdown" and cell.source.lstrip().startswith("```{" + name + "}")


def solution_blocks(nb):
    """Indices ``(start, stop)`` (both included) of the worked-solution blocks of a notebook."""
    blocks, start = [], None
    for n, cell in enumerate(nb.cells):
        if _directive(cell, "solution-start"):
            if start is not None:
                raise ValueError(f"cell {n}: a solution-start inside another solution block")
            start = n
        elif _directive(cell, "solution-end"):
            if start is None:
                raise ValueError(f"cell {n}: a solution-end without a solution-start")
            blocks.append((start, n))
            start = None
    if start is not None:
        raise ValueError(f"cell {start}: a solution-start that is never ended")
    return blocks


def student_notebook(nb):
    """The student edition of one notebook (a new ``nbformat`` notebook; ``nb`` is not changed)."""
    nb = copy.deepcopy(nb)
    inside = {n for start, stop in solution_blocks(nb) for n in range(start, stop + 1)}
    cells = []
    for n, cell in enumerate(nb.cells):
        if n in inside:
            continue
        where = f"cell {n}"
        if cell.cell_type == "code":
            cell.source = student_source(cell.source, where=where)
            cell.outputs = []
            cell.execution_count = None
        elif cell.cell_type == "markdown":
            if MARK_SCHEME_TAG in cell.get("metadata", {}).get("tags", []):
                continue
            cell.source = _without_scheme(cell.source, where)
            if not cell.source.strip():
                continue
        cells.append(cell)
    nb.cells = cells
    return nb


def teacher_display(nb):
    """The teacher edition as the book shows it: marker lines hidden, graded solution code folded.

    Executing the result runs exactly the teacher edition (only comment and marker lines go).
    A code cell outside the worked-solution blocks that holds solution code (a graded
    exercise's function) gets the ``hide-input`` tag, so that the book folds it.
    """
    nb = copy.deepcopy(nb)
    inside = {n for start, stop in solution_blocks(nb) for n in range(start, stop + 1)}
    markers = {SOLUTION_BEGIN, SOLUTION_END, SCHEME_BEGIN, SCHEME_END}
    for n, cell in enumerate(nb.cells):
        lines = cell.source.split("\n")
        kept = [line for line in lines if line.strip() not in markers]
        if len(kept) != len(lines):
            cell.source = "\n".join(kept).strip("\n")
            if cell.cell_type == "code" and n not in inside:
                tags = cell.setdefault("metadata", {}).setdefault("tags", [])
                if "hide-input" not in tags:
                    tags.append("hide-input")
    return nb


def default_notebooks() -> Path:
    """``notebooks/`` of the current folder if it holds notebooks, else the one beside the package (a clone),
    else the notebooks installed with nlref (``share/nlref/notebooks`` of the environment)."""
    here = Path("notebooks")
    if here.is_dir() and any(here.glob("*.ipynb")):
        return here
    beside = Path(__file__).resolve().parent.parent / "notebooks"
    if beside.is_dir() and any(beside.glob("*.ipynb")):
        return beside
    return _installed_notebooks() or beside


def _installed_notebooks():
    """The folder of the notebooks an installed nlref carries (from the record of its files), or None."""
    from importlib import metadata

    try:
        dist = metadata.distribution("nlref")
        files = dist.files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.suffix == ".ipynb" and file.parent.parts[-3:] == ("share", "nlref", "notebooks"):
            folder = Path(dist.locate_file(file)).resolve().parent
            if folder.is_dir():
                return folder
    return None


def check_destination(dest, source):
    """Refuse a ``dest`` that is ``source``, holds it or lies inside it, or that is the current folder or holds it.

    Replacing it would replace the teacher's notebooks (with their solutions) by the student
    edition, or try to rename the folder a process is running in; inside ``source`` the student
    edition would sit among the teacher's notebooks, easy to hand out or run in their place.
    """
    dest_r, source_r, cwd = Path(dest).resolve(), Path(source).resolve(), Path.cwd().resolve()
    if dest_r == source_r or dest_r in source_r.parents:
        raise ValueError(f"{str(dest)!r} is the notebooks folder {str(source)!r} or holds it: the student edition "
                         "would replace the teacher's notebooks and their solutions; choose another folder")
    if source_r in dest_r.parents:  # the two editions side by side, one copied or run for the other
        raise ValueError(f"{str(dest)!r} is inside the notebooks folder {str(source)!r}: the student edition would "
                         "sit among the teacher's notebooks and their solutions (and run with them as the course's "
                         "notebooks); choose a folder outside it")
    if dest_r == cwd or dest_r in cwd.parents:
        raise ValueError(f"{str(dest)!r} is the current folder or holds it; choose a new folder for the student "
                         "edition")


def write_student_edition(dest, *, notebooks=None, overwrite=False):
    """Write the student edition of every notebook in ``notebooks`` into the folder ``dest``.

    The folder is written in full next to ``dest`` and then renamed into place, so ``dest`` is
    either the complete edition or untouched. An existing ``dest`` is replaced only with
    ``overwrite=True``.

    Returns
    -------
    list of Path : the notebooks written, in ``dest``.
    """
    import nbformat

    overwrite = check_flag("overwrite", overwrite)  # a truthy "no" would replace the edition
    source = Path(default_notebooks() if notebooks is None else notebooks)
    dest = Path(dest)
    found = sorted(source.glob("*.ipynb")) if source.is_dir() else []
    if not found:
        raise ValueError(f"notebooks must be a folder holding the course's .ipynb files; {str(source)!r} holds none")
    if (dest.exists() or dest.is_symlink()) and not overwrite:
        raise ValueError(f"{str(dest)!r} exists; pass --overwrite (overwrite=True) to replace it")
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{str(dest)!r} exists and is not a folder; it is never replaced")
    check_destination(dest, source)
    editions = []
    for path in found:  # every notebook converted before anything is written
        try:
            editions.append((path.name, student_notebook(nbformat.read(path, as_version=4))))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    asked, dest = dest, writing_target(dest)  # a link to an edition: the edition it points to is replaced, the link kept
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700: the edition is for others to read, as mkdir makes it
        for name, nb in editions:
            nbformat.write(nb, staging / name)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return [asked / name for name, _ in editions]


_HELP = """Write the course's student edition: the notebooks with solutions taken out.

Solution code between '### BEGIN SOLUTION' and '### END SOLUTION' becomes
'raise NotImplementedError' (or 'name = None'), mark schemes and the folded worked
solutions are removed, outputs are cleared; the exercise checks stay and report
"not answered yet". The folder is written atomically and never replaces an
existing one without --overwrite."""


def add_parser(sub, formatter_class):
    """The ``nlref course`` subcommand, added to the command's subparsers."""
    course = sub.add_parser("course", help="write the student edition of the course's notebooks",
                            description=_HELP, formatter_class=formatter_class)
    from nlref.cli._common import path_arg

    course.add_argument("--student", required=True, metavar="DIR", type=path_arg,
                        help="folder to write the student edition into (required, no default; it must not exist, unless --overwrite)")
    course.add_argument("--notebooks", metavar="DIR", type=path_arg,
                        help="the teacher edition (default: ./notebooks, else the notebooks of this nlref's checkout, "
                             "else those installed with it)")
    course.add_argument("--overwrite", action="store_true",
                        help="replace an existing DIR (default: off)")
    return course


def run(args):
    """Run ``nlref course`` from parsed arguments; prints what it wrote."""
    written = write_student_edition(args.student, notebooks=args.notebooks, overwrite=args.overwrite)
    print(f"student edition: {len(written)} notebooks in {args.student}")
    for path in written:
        print(f"  {path.name}")
