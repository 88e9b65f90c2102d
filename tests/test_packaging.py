"""The package's metadata agrees with itself: one version, one Python floor, every extra explained.

These read the source tree (a clone or the unpacked sdist). Building the wheel and the
sdist with the oldest setuptools allowed, and running tests from the unpacked sdist, is
``.ci/check_package.py`` (a CI step: it needs the package index).
"""

from __future__ import annotations

import inspect
import re
import tomllib
import typing
from pathlib import Path

import pytest

import nlref
import nlref.train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_one_version_source(pyproject):
    project = pyproject["project"]
    assert "version" not in project, "pyproject.toml writes the version: it belongs to nlref/__init__.py only"
    assert "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "nlref.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([a-z]+\d+)?", nlref.__version__)
    conf = (ROOT / "docs" / "conf.py").read_text(encoding="utf-8")
    assert "__version__" in conf and not re.search(r"""version\s*=\s*["']\d""", conf), \
        "docs/conf.py writes its own version"
    cff = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert re.search(rf"^version: {re.escape(nlref.__version__)}$", cff, re.M), \
        "CITATION.cff's version differs from nlref.__version__"


def test_licence_is_shipped(pyproject):
    project = pyproject["project"]
    assert project["license"] == "BSD-3-Clause"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, the nlref developers" in text
    # the SPDX licence string and license-files need setuptools 77 (PEP 639)
    assert "setuptools>=77" in pyproject["build-system"]["requires"]
    assert (ROOT / "nlref" / "py.typed").is_file()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["nlref"]


def test_python_versions_agree(pyproject):
    project = pyproject["project"]
    floor = re.fullmatch(r">=3\.(\d+)", project["requires-python"])
    assert floor, project["requires-python"]
    minor = int(floor.group(1))
    # the docs extra (Sphinx 9) and the dask extra (zarr 3.1) need 3.11
    assert minor == 11
    listed = [int(c.rsplit(".", 1)[1]) for c in project["classifiers"]
              if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert listed and min(listed) == minor, listed
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"Python 3.{minor}" in readme
    assert not re.search(r"Python 3\.(?:[0-9]|10)\b", readme), "the README names a Python below the floor"
    # a classifier is a claim: each version listed is one the suite ran on, said in the README and, beyond
    # CI's 3.11, in CONTRIBUTING.md with the commands and the counts
    assert listed == list(range(minor, max(listed) + 1)), listed
    contributing = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    for m in listed:
        assert f"Python 3.{m}" in readme or f"3.{m - 1} and 3.{m}" in readme, f"the README does not name 3.{m}"
        if m > minor:
            assert re.search(rf"^\| 3\.{m}\.\d+ \| \d+ passed", contributing, re.M), \
                f"CONTRIBUTING.md's table has no run on 3.{m}"


def test_readme_explains_every_extra(pyproject):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(\w+)` \|", readme, re.M))
    extras = set(pyproject["project"]["optional-dependencies"])
    assert extras <= rows, f"extras the README's table does not explain: {sorted(extras - rows)}"


def test_notebooks_run_without_an_nbmake_flag(pyproject):
    # the README's `python -m pytest` runs the notebooks through the root conftest's hook,
    # and a plain pytest without nbmake must not fail on an unknown --nbmake option
    assert "--nbmake" not in pyproject["tool"]["pytest"]["ini_options"]["addopts"]
    assert "notebooks" in pyproject["tool"]["pytest"]["ini_options"]["testpaths"]
    conftest = (ROOT / "conftest.py").read_text(encoding="utf-8")
    assert "config.option.nbmake = True" in conftest


def _public_callables():
    from nlref.nn import models, optim

    funcs = [getattr(nlref, name) for name in nlref.__all__ if callable(getattr(nlref, name))
             and not isinstance(getattr(nlref, name), type) and not inspect.ismodule(getattr(nlref, name))]
    classes = [nlref.NonLocalBlock, nlref.nn.VideoNet, models.Conv3d, models.BatchNorm, models.ConvBN,
               models.ResidualBlock, models.NonLocal, optim.SGD, optim.Adam, optim.StepSchedule]
    return funcs + [nlref.train.train] + [c.__init__ for c in classes]


@pytest.mark.parametrize("func", _public_callables(), ids=lambda f: f.__qualname__)
def test_public_api_is_annotated(func):
    # py.typed promises annotations: every parameter and the return of the top-level functions
    # and of the layers' constructors, and each annotation resolves to a real type
    hints = typing.get_type_hints(func)
    params = [p for p in inspect.signature(func).parameters.values() if p.name != "self"]
    missing = [p.name for p in params if p.name not in hints]
    assert not missing, f"{func.__qualname__} lacks annotations for {missing}"
    assert "return" in hints
