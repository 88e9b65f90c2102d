"""The exercises as the notebooks state them agree with the checks that mark them.

The book numbers a chapter's exercises in the order they appear (sphinx-exercise), the code cells
call ``chNN.exK`` by the label's number, and the teachers' page and the syllabus read ``LEVELS`` and
``GRADED``: all of these must tell the same story, and a statement that says what the check does
must say what it does.
"""

import importlib
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest

import nlref
from nlref.exercises import ch02

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LABEL = re.compile(r":label: ch(\d\d)-ex(\d+)")
LEVEL = re.compile(r"\*(?:(Graded); |Level: )(warm-up|core|stretch); about (\d+) minutes\.\*")


def _exercises(path):
    """``[(cell index, exercise number, statement)]`` of the notebook's exercise directives, in order."""
    nb = nbformat.read(path, as_version=4)
    found = []
    for n, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("```{exercise}"):
            label = LABEL.search(cell.source)
            assert label and label.group(1) == path.name[:2], cell.source[:120]
            found.append((n, int(label.group(2)), cell.source))
    return nb, found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_exercises_are_numbered_in_order_at_the_end(path):
    """The book shows the k-th exercise as "Exercise k": it must be the one ``chNN.exk`` checks."""
    nb, found = _exercises(path)
    assert [k for _, k, _ in found] == list(range(1, len(found) + 1))
    heading = [n for n, cell in enumerate(nb.cells)
               if cell.cell_type == "markdown" and re.search(r"^## Exercises\s*$", cell.source, re.M)]
    assert len(heading) == 1 and heading[0] < found[0][0], "the chapter ends with one section of exercises"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_each_exercise_calls_its_own_check(path):
    nb, found = _exercises(path)
    bounds = [n for n, _, _ in found] + [len(nb.cells)]
    for (start, k, _), stop in zip(found, bounds[1:]):
        calls = {call for cell in nb.cells[start:stop] if cell.cell_type == "code"
                 for call in re.findall(r"\b(ch\d\d\.ex\d+)\(", cell.source)}
        assert calls <= {f"ch{path.name[:2]}.ex{k}"}, (k, calls)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_each_statement_gives_the_level_and_graded_mark_of_its_module(path):
    module = importlib.import_module(f"nlref.exercises.ch{path.name[:2]}")
    _, found = _exercises(path)
    for _, k, statement in found:
        level = LEVEL.search(statement)
        assert level, statement[:200]
        assert (level.group(2), int(level.group(3))) == module.LEVELS[f"ex{k}"], k
        assert (level.group(1) == "Graded") == (f"ex{k}" in module.GRADED), k


def test_the_patchwise_statement_names_the_crops_the_check_uses(capsys):
    shapes = []

    def patchwise(v, *, sigma, h, patch, search):
        shapes.append(v.shape)
        return nlref.nl_means(v, sigma=sigma, h=h, patch_size=patch, search_size=search, aggregation="patch")

    assert ch02.ex2(patchwise) is True
    _, found = _exercises(ROOT / "notebooks" / "02_nl_means.ipynb")
    (statement,) = [text for _, k, text in found if k == 2]
    assert len(shapes) == 2
    for rows, cols in shapes:
        assert f"{rows}×{cols}" in statement, (rows, cols, statement)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_chapter_switches_to_the_gpu_with_the_line_it_names(path):
    """Each notebook "switches to the GPU by changing one line" (GUIDE): chapter 1 had no switch, and chapter 8
    told the reader to write ``xp = cupy``, a NameError where ``cupy`` was never imported."""
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    prose = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    tried = re.search(r"try:\n\s+import cupy\n.*\n\s+xp = cupy\nexcept Exception:\n\s+xp = np", code)
    assert tried or re.search(r"^xp = np\b.*import cupy as xp", code, re.M), "no GPU switch"
    assert not re.search(r"`xp = cupy`", prose), "`xp = cupy` alone is a NameError: say `import cupy as xp`"


def test_the_h_sweep_mark_scheme_states_what_the_sweep_measures():
    """Its figures against ``ch02.uncorrected_sweep`` and the corrected sweep on the same crop; it said the two
    agree from h = 1.5 sigma on, where the uncorrected one is 0.4 dB ahead."""
    nb = nbformat.read(ROOT / "notebooks" / "02_nl_means.ipynb", as_version=4)
    (scheme,) = [c.source for c in nb.cells if c.cell_type == "markdown" and "collapse without the correction" in c.source]
    plain = ch02.uncorrected_sweep()
    clean, noisy = ch02._noisy()
    corrected = np.array([nlref.psnr(clean[ch02.ZONE], nlref.nl_means(noisy[ch02.ZONE], sigma=ch02.SIGMA, h=f * ch02.SIGMA,
                                                                       patch_size=5, search_size=21))
                          for f in ch02.FACTORS])
    low = re.search(r"\(([\d.]+) dB at \$h = 0\.5.*?against ([\d.]+) dB with it\)", scheme, re.S)
    assert low and (float(low.group(1)), float(low.group(2))) == (round(plain[0], 1), round(corrected[0], 1))
    best = re.search(r"\(([\d.]+) against ([\d.]+) dB here\)", scheme)
    assert best and (float(best.group(1)), float(best.group(2))) == (round(plain.max(), 1), round(corrected.max(), 1))
    agree = re.search(r"From \$h = ([\d.]+)\\,\\sigma\$ on the two agree within ([\d.]+) dB", scheme)
    assert agree, scheme
    start, within = float(agree.group(1)), float(agree.group(2))
    far = np.array(ch02.FACTORS) >= start
    assert np.all(np.abs(plain - corrected)[far] <= within)
    assert np.abs(plain - corrected)[~far].min() > within          # and not from a smaller h already


def test_the_median_checks_docstring_gives_the_measured_distance_to_the_limit():
    """``ch01.ex3`` says how far the measured loss lies from ``10 log10(pi/2)``, to justify its atol: it said
    0.06 dB, the chapter's measurement is 0.042 dB."""
    import math

    from nlref.exercises import ch01

    said = re.search(r"the ([\d.]+) dB between it and the large-N limit", " ".join(ch01.ex3.__doc__.split()))
    assert said, ch01.ex3.__doc__
    assert float(said.group(1)) == round(10 * math.log10(math.pi / 2) - ch01.median_loss_db(), 2)


def _teachers_kinds():
    """``{(chapter, exercise): kind}`` from the tables of docs/teachers.md."""
    kinds, chapter = {}, None
    for line in (ROOT / "docs" / "teachers.md").read_text().splitlines():
        heading = re.match(r"### Chapter (\d)", line)
        chapter = int(heading.group(1)) if heading else chapter
        row = re.match(r"\| (\d+)\. [^|]+\|[^|]+\|[^|]+\| (.+) \|$", line)
        if row and chapter:
            kinds[chapter, int(row.group(1))] = row.group(2)
    return kinds


#: What the check of a number exercise takes, as the teachers' page must name it (it named the
#: timings, the chunk size and the epochs that the statements also ask about, but no check reads).
CHECKED_NUMBER = {(1, 2): "the floor", (2, 4): "distance maps", (5, 3): "the slope", (7, 2): "the ceiling"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_teachers_page_says_what_each_check_takes(path):
    """A kind "number (...)" is a value the check reads (the page's definition): a check that takes a
    function is "code", and one that takes one number says so, naming what it is."""
    kinds = _teachers_kinds()
    chapter = int(path.name[:2])
    for _, k, statement in _exercises(path)[1]:
        answer = re.search(r"\*\*Answer:\*\*(.*?)(?:```|$)", statement, re.S)
        if not answer:
            continue
        answer, kind = " ".join(answer.group(1).split()), kinds[chapter, k]
        if re.match(r"(the|a|the broken) function", answer):
            assert "number" not in kind, (chapter, k, kind, answer)
        if "(one number)" in answer:
            assert "number" in kind, (chapter, k, kind, answer)
        if (chapter, k) in CHECKED_NUMBER:
            assert re.match(rf"number \([^)]*{CHECKED_NUMBER[chapter, k]}", kind), (chapter, k, kind)


def test_chapter_2s_summary_says_how_equal_the_fast_method_is():
    """Section 3 measures the fast loop against the definition; the summary said "exactly equal", and the two
    differ by about 1e-15 (float64 rounding: the same terms summed in another order)."""
    nb = nbformat.read(ROOT / "notebooks" / "02_nl_means.ipynb", as_version=4)
    (summary,) = [c.source for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## Summary")]
    (line,) = [s for s in summary.splitlines() if "fast method" in s]
    clean, noisy = ch02._noisy()
    small = np.asarray(noisy, dtype=np.float64)[140:164, 60:84]
    kw = dict(sigma=ch02.SIGMA, h=0.4 * ch02.SIGMA, patch_size=5, search_size=11)
    naive, fast = (nlref.nl_means(small, method=m, **kw) for m in ("naive", "fast"))
    if "exactly" in line:
        assert np.array_equal(naive, fast), line
    else:
        said = re.search(r"about (1e-\d+) in float64", line)
        assert said and 0 < np.max(np.abs(naive - fast)) < 10 * float(said.group(1)), line
