"""The examples a reader copies from the README and the book name things that exist: every python block
parses, imports what is there and calls nlref with keywords its functions take; every ``nlref`` command
line in a shell block or in inline code parses with the command's own parser (flags, choices, values);
every flag given to a script of ``benchmarks/`` or ``examples/`` is one the script defines. Two cheap
examples run as written (the block's first example, the layouts' doctest). All static but those two:
the whole file takes a few seconds. The long examples (the README's denoising, the training runs, the
benchmarks) were run by hand; what they print is in the pages."""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def _fenced(page):
    """(language, first line number, code) of every fenced block of a page, indented ones included."""
    text = page.read_text()
    pattern = r"^([ \t]*)(```+|~~~+)[ \t]*\{?([\w-]*)\}?[^\n]*\n(.*?)^[ \t]*\2[ \t]*$"
    for match in re.finditer(pattern, text, re.S | re.M):
        indent, language, code = match.group(1), match.group(3), match.group(4)
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in code.splitlines())
        yield language, text[:match.start()].count("\n") + 1, code


def _python_blocks():
    for page in PAGES:
        for language, line, code in _fenced(page):
            if language in ("python", "code-cell"):
                yield pytest.param(page, code, id=f"{page.relative_to(ROOT)}:{line}")


# --------------------------------------------------------------------------- python blocks
@pytest.mark.parametrize("page, code", list(_python_blocks()))
def test_python_block_parses(page, code):
    ast.parse(code)


def _resolve(dotted):
    """The object a dotted name of nlref names, or raise AttributeError / ImportError naming the missing part."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


def _dotted(node, names):
    """``nlref.nn.X`` for an ``ast.Attribute`` / ``ast.Name`` chain whose root is bound to an nlref import."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in names:
        return ".".join([names[node.id], *reversed(attrs)])
    return None


def _nlref_uses(code, names):
    """(dotted name, keywords or None) for every nlref name a block reads or calls; ``names`` maps the
    block's local names to the nlref names they were imported as (updated, so a page's blocks share it)."""
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nlref":
                    names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "nlref"
                    yield alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nlref":
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                yield f"{node.module}.{alias.name}", None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            dotted = _dotted(node.func, names)
            if dotted:
                yield dotted, [k.arg for k in node.keywords if k.arg]
        elif isinstance(node, ast.Attribute) and not isinstance(getattr(node, "ctx", None), ast.Store):
            dotted = _dotted(node, names)
            if dotted:
                yield dotted, None


def _unknown_keywords(obj, keywords):
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return []
    return [k for k in keywords if k not in {p.name for p in parameters}]


def _page_problems(page):
    names, problems = {}, []
    for language, line, code in _fenced(page):
        if language not in ("python", "code-cell"):
            continue
        for dotted, keywords in _nlref_uses(code, names):
            try:
                obj = _resolve(dotted)
            except (AttributeError, ImportError) as err:
                problems.append(f"line {line}: {dotted}: {err}")
                continue
            if keywords and callable(obj):
                problems += [f"line {line}: {dotted}() takes no keyword {k!r}" for k in _unknown_keywords(obj, keywords)]
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_python_blocks_name_what_nlref_has(page):
    """Imports from nlref, ``nlref.x.y`` attributes and the keywords of calls to them exist."""
    assert _page_problems(page) == []


def test_the_name_check_sees_a_wrong_keyword_and_a_missing_name(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nimport nlref\nfrom nlref.nn import NonLocalBlock\n"
                    "nlref.nl_means(x, sigma=1, patch=3)\nNonLocalBlock(4, dim=2)\nnlref.no_such_thing(1)\n```\n")
    problems = " ".join(_page_problems(page))
    assert "'patch'" in problems and "'dim'" in problems and "no_such_thing" in problems
    assert "sigma" not in problems


# --------------------------------------------------------------------------- command lines
def _inline_code(page):
    text = re.sub(r"^[ \t]*(```+|~~~+).*?^[ \t]*\1[ \t]*$", "", page.read_text(), flags=re.S | re.M)
    return [" ".join(span.split()) for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", text)]


def _shell_lines():
    """Every shell line of a page's bash blocks and sessions, and every inline code span, as (page, text)."""
    for page in PAGES:
        for language, _, code in _fenced(page):
            if language in ("bash", "sh", ""):
                for line in code.replace("\\\n", " ").splitlines():
                    yield page, line
            elif language in ("text", "console"):  # a session: the commands are the lines after a prompt
                for line in code.splitlines():
                    if line.startswith("$ "):
                        yield page, line
        for span in _inline_code(page):
            yield page, span


def _commands(program):
    """``program ...`` commands, from their start to a comment, a pipe or the end of the line."""
    found = {}
    for page, line in _shell_lines():
        for match in re.finditer(rf"(?:^|[;&|]\s+|\bdo\s+|\$ |\b[A-Z_]+=\S+\s+|\bflock \S+\s+){re.escape(program)}(?=\s)([^#|;&`]*)",
                                 line):
            words = shlex.split(re.sub(r"\$\w+", "0", match.group(1)))  # a loop's $s: a number
            if words:
                found.setdefault(" ".join([program, *words]), page)
    return found


def _nlref_commands():
    return [pytest.param(words, id=words) for words in sorted(_commands("nlref"))]


@pytest.mark.parametrize("command", _nlref_commands())
def test_nlref_command_lines_parse(command, capsys):
    """``nlref train --task pairs2d --size 24 ...`` as the pages write it: every flag, choice and value is taken."""
    from nlref.cli import build_parser

    parser = build_parser()
    words = shlex.split(command)[1:]
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert words[0] in commands or words[0].startswith("-"), f"{command!r}: no such command"
    flags = [w.split("=")[0] for w in words if w.startswith("--")]
    known = {s for p in (parser, commands.get(words[0], parser)) for a in p._actions for s in a.option_strings}
    assert [flag for flag in flags if flag not in known] == [], command
    if len(words) == 1 or (len(words) == 2 and words[1].startswith("-")) or "..." in words:
        return  # a mention in the text (``nlref course``, ``nlref denoise --scheduler``), not a command to run
    try:
        parser.parse_args(words)
    except SystemExit as exit:
        if exit.code:
            pytest.fail(f"{command!r}: {capsys.readouterr().err.strip().splitlines()[-1]}")


@pytest.mark.parametrize("command", ["nlref train --epoch 2", "nlref train --mode dot", "nlref denoise --sigma x",
                                     "nlref denoize a.png"])
def test_the_command_check_refuses_a_wrong_command(command, capsys):
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        test_nlref_command_lines_parse(command, capsys)


def test_the_pages_show_nlref_commands():
    commands = {command.split()[1] for command in sorted(_commands("nlref")) if len(command.split()) > 1}
    assert {"demo", "denoise", "train", "course"} <= commands, commands


def _script_flags(path):
    source = path.read_text()
    return set(re.findall(r"""add_argument\(\s*(?:["']-\w["']\s*,\s*)?["'](--[\w-]+)["']""", source))


def _script_commands():
    for program in ("python",):
        for command, page in sorted(_commands(program).items()):
            words = shlex.split(command)[1:]
            if words and re.fullmatch(r"(benchmarks|examples)/\w+\.py", words[0]):
                yield pytest.param(words, page, id=command)


@pytest.mark.parametrize("words, page", list(_script_commands()))
def test_script_command_lines_use_the_scripts_flags(words, page):
    """``python benchmarks/bench_block.py --only memory``: the script exists and defines every flag given."""
    script = ROOT / words[0]
    assert script.exists(), f"{page.name}: {script} does not exist"
    flags = _script_flags(script)
    assert flags, f"{script}: no add_argument found"
    given = [word.split("=")[0] for word in words[1:] if word.startswith("--")]
    assert [flag for flag in given if flag not in flags] == [], f"{page.name}: {' '.join(words)}"


def test_the_command_scan_finds_the_commands_it_should():
    commands = _commands("nlref")
    assert "nlref train --model c2d --nonlocal 1 --mode embedded_gaussian --out run1" in commands  # across a line break
    assert any(c.startswith("nlref denoise big.zarr --sigma 10 --chunks 64") for c in commands)  # a bash block
    assert "nlref denoise in.png --sigma 10 --out /mnt/small/o.png --overwrite" in commands  # a session, indented
    scripts = [p.values[0] for p in _script_commands()]
    assert ["benchmarks/bench_block.py", "--only", "memory"] in scripts


# --------------------------------------------------------------------------- examples that run
def test_the_blocks_first_example_runs_as_written():
    """docs/nonlocal_block.md's first block (the README's too): its comment's shape, the identity, the grads."""
    code = next(code for language, _, code in _fenced(ROOT / "docs" / "nonlocal_block.md") if language == "python")
    namespace = {}
    exec(compile(code, "nonlocal_block.md", "exec"), namespace)
    assert "# attention: (2, 784, 196)" in code
    assert namespace["attention"].shape == (2, 784, 196)
    block = namespace["block"]
    assert sorted(block.grads) == sorted(block.params)
    assert np.array_equal(namespace["z"], namespace["x"])


def test_layouts_doctest():
    import nlref.nn.layouts

    result = doctest.testmod(nlref.nn.layouts)
    assert result.attempted > 0 and result.failed == 0
