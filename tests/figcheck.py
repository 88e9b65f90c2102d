"""The figure standard, as a check: every figure a person reads has a title, labels, and a colour bar
where colour carries a value.

``figure_problems(fig)`` lists what a matplotlib Figure misses, one sentence per problem, naming the
axes (by its index in ``fig.axes`` and its title); an empty list means the figure passes. It draws the
figure (Agg) to measure its text. Used by tests/test_figures.py and scripts/check_notebook_figures.py.

Per axes that shows data (an image, a line, a collection, a bar, a patch or text; the empty panels
of a grid and the colour bars' own axes are skipped):

- a title: its own (left, centre or right) or the figure's suptitle;
- x and y labels where that axis shows numbers (visible tick labels); an axis with its ticks turned
  off (an image drawn with ``axis("off")``) needs none. A label on another axes sharing the axis
  (``sharex``/``sharey``) counts;
- a colour bar for each image, mesh or scatter whose colours map values: a 2-D array drawn through a
  colour map other than a grey one (a grey picture is a photograph, not a value map), or a mesh or
  scatter with a colour array. A colour bar drawn for another artist with the same colour map and
  the same limits counts (one bar for a row of maps on one scale);
- a legend where two or more lines (of two or more points; a single marker is not a line) are drawn;
- a label on each colour bar, saying what its colours mean;
- text inside the figure: no title, suptitle, axis label or colour bar label crosses the figure's
  edge, and no two titles or labels overlap each other.
"""

from __future__ import annotations

import numpy as np

GREYS = {"gray", "grey", "greys", "gist_gray", "gist_grey", "gist_yarg", "binary", "bone"}


def _is_grey(cmap):
    name = cmap.name.lower()
    return name.removesuffix("_r") in GREYS


def _is_colorbar_axes(ax):
    return getattr(ax, "_colorbar", None) is not None or ax.get_label() == "<colorbar>"


def _shows_data(ax):
    return bool(ax.images or ax.lines or ax.collections or ax.patches or ax.texts or ax.tables)


def _name(fig, ax):
    title = ax.get_title() or ax.get_title("left") or ax.get_title("right")
    return f"axes {fig.axes.index(ax)}" + (f" ({title.splitlines()[0]!r})" if title else "")


def _value_mapped(artist):
    """True when the artist's colours encode numbers through a colour map (so it needs a colour bar)."""
    from matplotlib.image import AxesImage

    if isinstance(artist, AxesImage):
        a = artist.get_array()
        return a is not None and np.ndim(a) == 2 and not _is_grey(artist.get_cmap())
    get = getattr(artist, "get_array", None)
    a = get() if get is not None else None
    return a is not None and np.size(a) > 0 and not _is_grey(artist.get_cmap())


def _scale(artist):
    norm = artist.norm
    return artist.get_cmap().name, type(norm).__name__, norm.vmin, norm.vmax


def _shows_numbers(axis):
    """An axis whose tick labels are visible and non-empty (the figure has been drawn)."""
    if not axis.get_visible():
        return False
    for tick in axis.get_major_ticks() + axis.get_minor_ticks():
        for label in (tick.label1, tick.label2):
            if label.get_visible() and label.get_text().strip():
                return True
    return False


def _siblings(ax, which):
    group = ax.get_shared_x_axes() if which == "x" else ax.get_shared_y_axes()
    return group.get_siblings(ax)


def _texts(fig):
    """(name, Text) of each title, suptitle, axis label and colour bar label with text."""
    found = []
    if fig._suptitle is not None and fig._suptitle.get_text():
        found.append(("the suptitle", fig._suptitle))
    for ax in fig.axes:
        name = _name(fig, ax)
        for where, title in (("title", ax.title), ("left title", ax._left_title), ("right title", ax._right_title)):
            if title.get_text() and title.get_visible():
                found.append((f"{where} of axes {fig.axes.index(ax)}", title))
        for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if axis.label.get_text() and axis.label.get_visible() and axis.get_visible():
                found.append((f"{which} label of {name}", axis.label))
    return found


def figure_problems(fig, *, overlap_px=2.0):
    """What ``fig`` misses of the figure standard: a list of sentences, empty when none."""
    fig.canvas.draw()
    problems = []
    axes = [ax for ax in fig.axes if not _is_colorbar_axes(ax) and ax.get_visible()]
    suptitle = fig._suptitle is not None and bool(fig._suptitle.get_text().strip())
    bars = {_scale(m) for m in _mappables(fig) if getattr(m, "colorbar", None) is not None}
    for ax in axes:
        if not _shows_data(ax):
            continue
        name = _name(fig, ax)
        if not (suptitle or any(ax.get_title(loc).strip() for loc in ("center", "left", "right"))):
            problems.append(f"{name} has no title (and the figure no suptitle)")
        if ax.axison:
            for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
                if _shows_numbers(axis) and not any(
                        (s.xaxis if which == "x" else s.yaxis).label.get_text().strip() for s in _siblings(ax, which)):
                    problems.append(f"{name} shows numbers on its {which} axis but has no {which} label")
        for artist in list(ax.images) + list(ax.collections):
            if _value_mapped(artist) and getattr(artist, "colorbar", None) is None and _scale(artist) not in bars:
                problems.append(f"{name} maps values to colours ({type(artist).__name__}, colour map "
                                f"{artist.get_cmap().name!r}) without a colour bar of that scale")
        lines = [line for line in ax.lines if np.size(line.get_xdata()) >= 2]
        if len(lines) >= 2 and ax.get_legend() is None and not fig.legends:
            problems.append(f"{name} draws {len(lines)} lines but has no legend")
    for ax in fig.axes:
        if _is_colorbar_axes(ax) and ax.get_visible():
            bar = ax._colorbar
            axis = ax.yaxis if bar.orientation == "vertical" else ax.xaxis
            if not axis.label.get_text().strip():
                problems.append(f"the colour bar {_name(fig, ax)} has no label (what its colours mean)")
    problems += _text_problems(fig, overlap_px)
    return problems


def _mappables(fig):
    for ax in fig.axes:
        yield from ax.images
        yield from ax.collections


def _text_problems(fig, overlap_px):
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    problems = []
    boxes = []
    for name, text in _texts(fig):
        box = text.get_window_extent(renderer)
        # a text's box reaches the font's ascent, about a fifth of its height above the capitals: that much
        # may cross the top edge unseen (a descender crossing the bottom edge is cut off)
        top = max(overlap_px, 0.18 * box.height)
        if box.x0 < -overlap_px or box.x1 > width + overlap_px or box.y0 < -overlap_px or box.y1 > height + top:
            problems.append(f"the {name} ({text.get_text().splitlines()[0]!r}) crosses the figure's edge "
                            f"(its box {box.x0:.0f}..{box.x1:.0f} x {box.y0:.0f}..{box.y1:.0f} px, the figure "
                            f"{width:.0f} x {height:.0f} px)")
        boxes.append((name, text, box))
    for i, (name_a, text_a, a) in enumerate(boxes):
        for name_b, text_b, b in boxes[i + 1:]:
            dx = min(a.x1, b.x1) - max(a.x0, b.x0)
            dy = min(a.y1, b.y1) - max(a.y0, b.y0)
            if dx > overlap_px and dy > overlap_px:
                problems.append(f"the {name_a} ({text_a.get_text().splitlines()[0]!r}) overlaps the {name_b} "
                                f"({text_b.get_text().splitlines()[0]!r})")
    return problems


def assert_figure_readable(fig, what="the figure"):
    """Raise AssertionError listing every problem of ``fig`` (see the module docstring)."""
    problems = figure_problems(fig)
    assert not problems, f"{what} misses the figure standard:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- notebooks
def check_open_figures():
    """Raise AssertionError naming every open pyplot figure that misses the standard (none open: nothing)."""
    import sys

    if "matplotlib.pyplot" not in sys.modules:
        return
    plt = sys.modules["matplotlib.pyplot"]
    found = {num: figure_problems(plt.figure(num)) for num in plt.get_fignums()}
    found = {num: problems for num, problems in found.items() if problems}
    if found:
        raise AssertionError("a figure misses the figure standard (tests/figcheck.py):\n" + "\n".join(
            f"  figure {num}: " + "\n    ".join(problems) for num, problems in found.items()))


def install_in_ipython(shell):
    """Check the figures each cell leaves open, at its end, so that a figure missing the standard fails the cell
    (and so the notebook's test; root conftest.py installs this in the kernels nbmake starts).

    The cell's code gets a last statement that calls :func:`check_open_figures` (a cell ending with an
    expression still shows its value), and ``pyplot.show`` checks before it shows (the inline backend
    closes what it shows).
    """
    import ast

    class _AppendCheck(ast.NodeTransformer):
        def visit_Module(self, node):
            call = ast.parse("__import__('tests.figcheck').figcheck.check_open_figures()").body
            body = list(node.body)
            if body and isinstance(body[-1], ast.Expr):
                last = body.pop()
                body += [ast.Assign(targets=[ast.Name("_figcheck_last", ast.Store())], value=last.value),
                         *call, ast.Expr(ast.Name("_figcheck_last", ast.Load()))]
            else:
                body += call
            node.body = body
            return ast.fix_missing_locations(node)

    def _wrap_show(*args, **kwargs):
        import sys

        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None and not getattr(plt.show, "_figcheck", False):
            show = plt.show

            def checked_show(*a, **k):
                check_open_figures()
                return show(*a, **k)

            checked_show._figcheck = True
            plt.show = checked_show

    shell.ast_transformers.append(_AppendCheck())
    shell.events.register("pre_run_cell", _wrap_show)
