"""What the README and the book tell a reader holds: links resolve, the API pages cover the public names,
and every documented parameter is one the function takes (and the reverse)."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted((DOCS / "api").glob("*.md"))]

# Modules with an ``__all__`` that no API page documents, and why.
NOT_ON_AN_API_PAGE = {
    "nlref.nlmeans.api": "its names are re-exported by nlref.nlmeans, documented there",
    "nlref.nlmeans.fast_numba": "the optional Numba engine behind nlref.nlmeans.fast (imports numba)",
    "nlref.cli": "the command line, documented by `nlref --help` and the pages",
}


def _without_code_blocks(text):
    return re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)


def _slug(heading):
    """The anchor of a heading, as MyST (``myst_heading_anchors``) and GitHub write it."""
    text = re.sub(r"[`*]", "", heading).strip().lower().replace(" ", "-")
    return re.sub(r"[^\w\-]", "", text)


def _anchors(page):
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", _without_code_blocks(page.read_text()),
                                                    re.M)}


def _links():
    for page in PAGES:
        for match in re.finditer(r"\]\(([^)\s]+)\)", _without_code_blocks(page.read_text())):
            target = match.group(1)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # not http:, mailto:, ...
                yield page, target


@pytest.mark.parametrize("page, target", [pytest.param(p, t, id=f"{p.relative_to(ROOT)}:{t}") for p, t in _links()])
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    assert linked.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
    if anchor and linked.suffix == ".md":
        assert anchor in _anchors(linked), f"{page.relative_to(ROOT)} links to {target}: no such heading"


def test_slug_is_mysts():
    assert _slug("5. Conventions: where implementations differ") == "5-conventions-where-implementations-differ"
    assert _slug("The factored dot product and concatenation (`engine.nonlocal_op.factored_modes`, issue 32)") == (
        "the-factored-dot-product-and-concatenation-enginenonlocal_opfactored_modes-issue-32")


def _documented_modules():
    names = []
    for page in sorted((DOCS / "api").glob("*.md")):
        names += re.findall(r"automodule:: ([\w.]+)", page.read_text())
    return names


def _public_modules():
    found = []
    for path in sorted((ROOT / "nlref").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts) or "__all__" not in path.read_text():
            continue
        found.append(".".join(parts))
    return found


def test_every_public_module_is_on_an_api_page():
    documented = set(_documented_modules())
    missing = [m for m in _public_modules()
               if m not in documented and m not in NOT_ON_AN_API_PAGE and not m.startswith("nlref.cli.")]
    assert not missing, f"modules with an __all__ that no page of docs/api documents: {missing}"
    assert set(NOT_ON_AN_API_PAGE) <= set(_public_modules())


@pytest.mark.parametrize("module", _documented_modules())
def test_api_page_names_exist(module):
    mod = importlib.import_module(module)
    assert [name for name in getattr(mod, "__all__", []) if not hasattr(mod, name)] == []


# --------------------------------------------------------------------------- docstring parameters
def _docstring_parameters(doc):
    """Names in the numpydoc ``Parameters`` / ``Other Parameters`` sections, and whether an entry
    defers the rest to another function (``Other parameters`` / ``As for ...``), or None without a section."""
    lines = inspect.cleandoc(doc or "").splitlines()
    names, found, defers = [], False, False

    def is_header(i):
        return (i + 1 < len(lines) and lines[i].strip() and len(lines[i + 1].strip()) >= 3
                and set(lines[i + 1].strip()) == {"-"})

    i = 0
    while i < len(lines):
        if is_header(i) and lines[i].strip() in ("Parameters", "Other Parameters"):
            found = True
            i += 2
            while i < len(lines) and not is_header(i):
                line = lines[i]
                if line.strip() and not line.startswith(" "):
                    head = line.split(" : ")[0]
                    entries = [entry.strip().lstrip("*") for entry in head.split(",")]
                    if all(re.fullmatch(r"\w+", entry) for entry in entries):
                        names += entries
                    else:  # "Other parameters" (then "As for nl_means"): the rest are another function's
                        defers = True
                i += 1
            continue
        i += 1
    return (names, defers) if found else None


def _signature_parameters(func):
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in parameters if p.name not in ("self", "cls")]


def _callables():
    seen = set()
    for module in _documented_modules():
        mod = importlib.import_module(module)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if id(obj) in seen or not callable(obj):
                continue
            seen.add(id(obj))
            qualname = f"{getattr(obj, '__module__', module)}.{name}"
            if inspect.isclass(obj):
                if obj.__init__ is not object.__init__:
                    yield qualname, obj, obj.__doc__  # numpydoc: the class docstring describes __init__
                for attr, member in vars(obj).items():
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if not attr.startswith("_") and inspect.isfunction(member):
                        yield f"{qualname}.{attr}", member, member.__doc__
            elif inspect.isfunction(obj) or inspect.isbuiltin(obj) or callable(obj):
                yield qualname, obj, getattr(obj, "__doc__", None)


def _mismatches():
    for qualname, func, doc in _callables():
        documented = _docstring_parameters(doc)
        signature = _signature_parameters(func)
        if documented is None or signature is None:
            continue
        names, defers = documented
        undocumented = [] if defers else [n for n in signature if n not in names]
        unknown = [n for n in names if n not in signature]
        if undocumented or unknown:
            yield qualname, undocumented, unknown


def test_docstring_parameters_match_signatures():
    """A numpydoc ``Parameters`` section names exactly the parameters of the signature."""
    wrong = [f"{name}: not in the docstring {undocumented}, not in the signature {unknown}"
             for name, undocumented, unknown in _mismatches()]
    assert not wrong, "\n".join(wrong)


def _optional_parameters(doc):
    """Names whose numpydoc type line ends in ``optional`` (``sigma : float, optional``)."""
    names = []
    for line in inspect.cleandoc(doc or "").splitlines():
        head, sep, kind = line.partition(" : ")
        if sep and not line.startswith(" ") and re.search(r"\boptional\s*$", kind):
            names += [entry.strip().lstrip("*") for entry in head.split(",")]
    return names


def test_optional_parameters_have_defaults():
    """A parameter the docstring calls ``optional`` can be left out: the signature gives it a default."""
    wrong = []
    for qualname, func, doc in _callables():
        try:
            parameters = inspect.signature(func).parameters
        except (TypeError, ValueError):
            continue
        wrong += [f"{qualname}({name})" for name in _optional_parameters(doc)
                  if name in parameters and parameters[name].default is inspect.Parameter.empty
                  and parameters[name].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    assert not wrong, f"documented as optional but required: {wrong}"
    assert _optional_parameters("x\n\nParameters\n----------\na, b : int, optional\nc : int\n") == ["a", "b"]


def test_docstring_parameter_parser():
    doc = """One line.

    Parameters
    ----------
    a, b : int
        Two.
    *args
    **options : dict

    Returns
    -------
    c : int
    """
    assert _docstring_parameters(doc) == (["a", "b", "args", "options"], False)
    assert _docstring_parameters("No sections.") is None
    deferring = "x\n\nParameters\n----------\nsource : array\nOther parameters\n    As for nl_means.\n"
    assert _docstring_parameters(deferring) == (["source"], True)


# --------------------------------------------------------------------------- the command line
def test_nlref_help_lists_every_command():
    """``nlref --help`` opens with one line per command; every command has its line."""
    from nlref.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    listed = re.findall(r"^  nlref (\w+) ", parser.description, re.M)
    assert listed == list(commands)


def test_block_check_counts_in_the_book_are_the_tests():
    """docs/nonlocal_block.md section 7 counts the block's gradient-checked configurations: tests/nn/test_block.py's."""
    from tests.nn.test_block import CONFIGS

    text = (DOCS / "nonlocal_block.md").read_text()
    configurations, cases = map(int, re.search(r"That is (\d+) configurations, each in 1, 2 and 3 dims: (\d+) cases",
                                               " ".join(text.split())).groups())
    assert (configurations, cases) == (len(CONFIGS), 3 * len(CONFIGS))
    assert re.search(rf"It is run in the same {cases} cases", " ".join(text.split()))


def _api_blocks():
    """(module, the text of its ``eval-rst`` block) for every ``automodule`` of docs/api that documents members."""
    for page in sorted((DOCS / "api").glob("*.md")):
        for block in re.findall(r"```\{eval-rst\}\n(.*?)```", page.read_text(), re.S):
            match = re.search(r"automodule:: ([\w.]+)", block)
            if match and ":no-members:" not in block:
                yield match.group(1), block


def _is_data(obj):
    return not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj) or callable(obj))


@pytest.mark.parametrize("module, block", list(_api_blocks()), ids=lambda value: value if "\n" not in value else "")
def test_every_exported_constant_is_on_its_api_page(module, block):
    """autodoc shows a module-level constant only with a ``#:`` comment in the module that exports it; any other
    needs a ``py:data::`` entry by hand on the API page, or the page silently leaves a name of ``__all__`` out."""
    mod = importlib.import_module(module)
    source = inspect.getsource(mod)
    missing = []
    for name in getattr(mod, "__all__", []):
        if not _is_data(getattr(mod, name)):
            continue
        commented = re.search(rf"^#:.*\n(?:#:.*\n)*{name}\s*(?::[^=\n]*)?=|^{name}\s*(?::[^=\n]*)?=.*#:", source, re.M)
        by_hand = re.search(rf"py:data:: {name}\b", block)
        if not (commented or by_hand):
            missing.append(name)
    assert not missing, f"{module}: constants in __all__ that its API page does not show: {missing}"


def test_every_extra_a_page_installs_exists():
    """``pip install "nlref[dask]"``, ``-e ".[notebooks,test]"``: every extra named exists in pyproject.toml."""
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    pages = [*PAGES, ROOT / "CONTRIBUTING.md"]
    named = {extra for page in pages
             for group in re.findall(r"""(?:nlref|["']\.)\[([a-z0-9_,\s-]+)\]""", page.read_text())
             for extra in group.replace(" ", "").split(",")}
    assert named, "no extra found: the pattern is wrong"
    assert named <= extras, f"extras named on the pages but not in pyproject.toml: {sorted(named - extras)}"
