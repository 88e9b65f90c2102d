"""Sphinx configuration of the nlref book.

Build (the README's command; warnings are errors, -n checks every reference):

    sphinx-build -W --keep-going -n -b html docs docs/_build/html

The build needs no network: no intersphinx, MathJax shipped with the book
(sphinx-mathjax-offline), the theme's fonts and icons served from _static.
"""
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))

import chapters  # noqa: E402  (docs/_ext/chapters.py)
from nlref import __version__  # noqa: E402  (the one place the version is written)

chapters.write_pointers()

project = "nlref"
author = "the nlref developers"
copyright = "2026, the nlref developers, BSD-3-Clause"
release = version = __version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_exercise",
    "sphinx_togglebutton",        # folds the solutions (":class: dropdown")
]

exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# -- Maths without a network ----------------------------------------------------
# MathJax 3.2.2 from the PyPI package sphinx-mathjax-offline, copied into _static
# by _copy_mathjax below (the CommonHTML renderer, its fonts and the extensions it
# loads on demand; not the package's SVG and MathML bundles, which the book never
# loads). Sphinx's default would load MathJax from a CDN.
mathjax_path = "mathjax/tex-chtml.js"
MATHJAX_UNUSED = ["tex-svg*.js", "tex-mml-*.js", "mml-*.js", "tex-chtml-full*.js", "node-main.js", "svg",
                  "svg.js"]


def _copy_mathjax(app, exception):
    import importlib
    import shutil

    if exception is not None or app.builder.format != "html":
        return
    package = Path(importlib.import_module("sphinx-mathjax-offline").__file__).parent
    shutil.copytree(package / "static" / "mathjax", Path(app.outdir) / "_static" / "mathjax",
                    ignore=shutil.ignore_patterns(*MATHJAX_UNUSED), dirs_exist_ok=True)


# -- MyST ------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 4          # [text](page.md#a-heading) links, as the pages use them

# -- MyST-NB: the chapters are executed at build time ----------------------------
nb_custom_formats = {".nblink": "chapters.read_chapter"}
nb_execution_mode = "cache"       # executed on a clean build; cached in docs/_build/.jupyter_cache
nb_execution_timeout = 600        # seconds per cell (the training cells of chapter 6 take a while)
nb_execution_raise_on_error = True
nb_execution_in_temp = True       # a chapter that writes files writes them in a temporary folder
nb_execution_show_tb = True
nb_merge_streams = True


def _note_notebook_dependency(app, docname, source):
    """Rebuild a chapter when its notebook changes, not only when its pointer does."""
    if docname.startswith("chapters/"):
        app.env.note_dependency(str(chapters.notebook_path(source[0])))


def _chapter_download(app, pagename, templatename, context, doctree):
    """A chapter's download button gives its notebook (as in notebooks/), not the pointer."""
    if pagename.startswith("chapters/") and context.get("sourcename", "").endswith((".nblink", ".nblink.txt")):
        context["sourcename"] = pagename + ".ipynb"
        context["page_source_suffix"] = ".ipynb"


def _copy_chapter_notebooks(app, exception):
    import shutil

    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_sources" / "chapters"
    target.mkdir(parents=True, exist_ok=True)
    for notebook in chapters.NOTEBOOKS.glob("*.ipynb"):
        shutil.copyfile(notebook, target / notebook.name)
        for pointer in target.glob(notebook.stem + ".nblink*"):
            pointer.unlink()


# -- autodoc + napoleon (numpydoc docstrings) ------------------------------------
autodoc_default_options = {
    "members": True,               # honours each module's __all__
    "undoc-members": True,         # constants such as MODES or GLYPHS, named in docstrings
    "show-inheritance": False,
    "member-order": "bysource",
}
autodoc_member_order = "bysource"
autodoc_typehints = "none"         # the types are in the numpydoc sections
autodoc_preserve_defaults = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = False
napoleon_preprocess_types = False
napoleon_use_admonition_for_examples = False
# An "Attributes" section is rendered like "Parameters": a field list whose types
# are plain text, not one attribute directive per entry (which would describe a
# dataclass field twice, once from the docstring and once from autodoc).
napoleon_custom_sections = [("Attributes", "params_style")]

# Private helpers and tuning constants that docstrings name but the API does not export.
nitpick_ignore_regex = [
    (r"py:.*", r"(.*\.)?_[A-Za-z].*"),            # _row_fold, nlref.nn.optim._Optimiser, ...
    (r"py:data", r"CONV_[A-Z_]+"),                # nlref.nn.functional's conv3d tuning constants
    (r"py:class", r"NonLocal"),                   # nlref.nn.models' layer class, not exported
    (r"py:func", r"take"),                        # the array API's take, in nlref.backend's docstring
]


def _defining_name(dotted):
    """``module.__qualname__`` of the object a dotted name imports, or None."""
    import importlib

    module, _, attr = dotted.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return None
    if getattr(obj, "__module__", None) and getattr(obj, "__qualname__", None):
        return f"{obj.__module__}.{obj.__qualname__}"
    return None


def _resolve_short_python_name(app, env, node, contnode):
    """Resolve a docstring's short reference (``VideoNet``) when exactly one object has that name.

    Docstrings refer to names as their module sees them; a reference from another
    module (``nlref.train`` naming ``VideoNet``) is resolved to the single documented
    object whose full name ends in ``.VideoNet``. Ambiguous or unknown names stay
    unresolved, so -n still reports them.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    domain = env.get_domain("py")
    # A re-exported name (nlref.nn.NonLocalBlock): the object's defining name.
    defining = _defining_name(target)
    if defining in domain.objects:
        return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], defining,
                                   node, contnode)
    matches = sorted({entry.docname + "#" + entry.node_id: name
                      for name, entry in domain.objects.items()
                      if name == target or name.endswith("." + target)}.values())
    # Several (nlref.NonLocalBlock and nlref.nn.block.NonLocalBlock): the one nearest
    # the referring module, going up its package path.
    module = node.get("py:module") or ""
    while len(matches) > 1 and module:
        near = [name for name in matches if name.startswith(module + ".")]
        if near:
            matches = near
            if len(near) == 1:
                break
        module = module.rpartition(".")[0]
    if len(matches) != 1:
        return None
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], matches[0],
                               node, contnode)

# -- HTML ------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "nlref: non-local means to non-local networks"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "navigation_with_keys": False,
}
html_static_path = []
html_last_updated_fmt = None


def setup(app):
    app.connect("source-read", _note_notebook_dependency)
    app.connect("missing-reference", _resolve_short_python_name)
    app.connect("build-finished", _copy_mathjax)
    app.connect("html-page-context", _chapter_download, priority=400)   # before the theme's buttons (501)
    app.connect("build-finished", _copy_chapter_notebooks)
