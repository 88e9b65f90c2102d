"""CI step: build the wheel and the sdist with the oldest setuptools pyproject.toml allows,
check what they carry, and run tests from the unpacked sdist.

Run from the repository root with the test extra installed (``.ci/run`` does):

    python .ci/check_package.py

0. ``CITATION.cff`` is valid CFF 1.2.0 (the JSON schema shipped in cffconvert's wheel).
1. The build floor. ``build-system.requires`` says ``setuptools>=77``: the SPDX
   ``license = "BSD-3-Clause"`` string and ``license-files`` (PEP 639) arrived in
   setuptools 77. The wheel and the sdist are built with exactly setuptools 77.0.3 in a
   fresh virtual environment that holds nothing else (no pip, no wheel package), through
   the PEP 517 hooks a build frontend calls; setuptools 76.1.0 must refuse the same tree,
   which shows that 77 is the floor and not a guess.
2. The wheel and the sdist carry the licence (``License-File`` in their metadata, the
   file itself inside), the version of ``nlref/__init__.py`` (the one version source),
   ``py.typed``, and the sdist carries every tracked file of ``nlref/``, ``tests/`` and
   ``notebooks/`` with the root ``conftest.py``.
3. From the unpacked sdist, with nlref imported from there: a fast subset of the tests
   with nbmake disabled (a plain ``pytest`` without the notebook plugin), then the first
   notebook through nbmake.

The tree built is the one a clean clone has: the files git tracks, plus new files git
does not ignore (so an uncommitted change is checked too), copied to a temporary folder.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = "77.0.3"        # the oldest setuptools that must build (build-system.requires: >=77)
BELOW = "76.1.0"        # the last setuptools before PEP 639 support: must refuse
FAST_TESTS = ["tests/test_averaging.py", "tests/nn/test_optim.py", "tests/nlmeans/test_input_checks.py",
              "tests/test_packaging.py"]
NOTEBOOK = "notebooks/01_image_averaging.ipynb"


def say(msg: str) -> None:
    print(f"[check_package] {msg}", flush=True)


def fail(msg: str) -> None:
    raise SystemExit(f"[check_package] FAILED: {msg}")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def project_version() -> str:
    tree = ast.parse((ROOT / "nlref" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    fail("nlref/__init__.py has no __version__")


def tracked_files() -> list[str]:
    out = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT)
    if out.returncode:
        fail(f"git ls-files: {out.stderr}")
    return [f for f in out.stdout.split("\0") if f and (ROOT / f).is_file()]


def copy_tree(files: list[str], dest: Path) -> None:
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)


def build(setuptools_version: str, src: Path, work: Path) -> subprocess.CompletedProcess:
    """PEP 517 build_sdist then build_wheel with exactly ``setuptools_version``."""
    target = work / f"setuptools-{setuptools_version}"
    got = run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
               f"setuptools=={setuptools_version}"])
    if got.returncode:
        fail(f"cannot fetch setuptools {setuptools_version}: {got.stderr}")
    env_dir = work / f"env-{setuptools_version}"
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    dist = work / f"dist-{setuptools_version}"
    code = (
        "import setuptools, sys\n"
        f"assert setuptools.__version__ == {setuptools_version!r}, setuptools.__version__\n"
        "from setuptools import build_meta as b\n"
        "out = sys.argv[1]  # before the hooks: setuptools rewrites sys.argv\n"
        "print('sdist', b.build_sdist(out))\n"
        "print('wheel', b.build_wheel(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(target)
    return run([str(python), "-c", code, str(dist)], cwd=src, env=env)


def check_metadata(text: str, where: str, version: str) -> None:
    lines = text.splitlines()
    for needed in (f"Version: {version}", "License-Expression: BSD-3-Clause", "License-File: LICENSE",
                   "Requires-Python: >=3.11"):
        if needed not in lines:
            fail(f"{where} lacks the line {needed!r}")


def check_citation(work: Path) -> None:
    """CITATION.cff against the CFF 1.2.0 JSON schema (shipped in cffconvert's wheel)."""
    target = work / "cff"
    got = run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
               "cffconvert==2.0.0", "PyYAML>=6"])
    if got.returncode:
        fail(f"cannot fetch cffconvert's schema: {got.stderr}")
    code = (
        "import json, sys, jsonschema, yaml\n"
        "schema = json.load(open(sys.argv[1], encoding='utf-8'))\n"
        "data = yaml.safe_load(open(sys.argv[2], encoding='utf-8'))\n"
        "v = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())\n"
        "errors = [f'{list(e.path)}: {e.message}' for e in v.iter_errors(data)]\n"
        "print('\\n'.join(errors)); sys.exit(1 if errors else 0)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    schema = target / "cffconvert" / "schemas" / "1.2.0" / "schema.json"
    got = run([sys.executable, "-c", code, str(schema), str(ROOT / "CITATION.cff")], env=env)
    if got.returncode:
        fail(f"CITATION.cff is not valid CFF 1.2.0:\n{got.stdout}{got.stderr}")
    say("CITATION.cff is valid CFF 1.2.0")


def main() -> int:
    version = project_version()
    files = tracked_files()
    with tempfile.TemporaryDirectory(prefix="nlref-package-") as tmp:
        work = Path(tmp)
        check_citation(work)
        src = work / "src"
        copy_tree(files, src)

        below = build(BELOW, src, work)
        if below.returncode == 0:
            fail(f"setuptools {BELOW} built the package: build-system.requires' floor (77) is not the floor")
        if "license" not in (below.stdout + below.stderr).lower():
            fail(f"setuptools {BELOW} failed for a reason other than the licence:\n{below.stderr[-3000:]}")
        say(f"setuptools {BELOW} refuses the tree, as expected (the SPDX licence needs 77)")
        shutil.rmtree(src / "nlref.egg-info", ignore_errors=True)

        built = build(FLOOR, src, work)
        if built.returncode:
            fail(f"setuptools {FLOOR} could not build:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}")
        dist = work / f"dist-{FLOOR}"
        sdist = dist / f"nlref-{version}.tar.gz"
        wheel = dist / f"nlref-{version}-py3-none-any.whl"
        if not (sdist.is_file() and wheel.is_file()):
            fail(f"expected {sdist.name} and {wheel.name}, found {sorted(p.name for p in dist.iterdir())}\n{built.stdout}\n{built.stderr[-3000:]}")
        say(f"setuptools {FLOOR} built {sdist.name} and {wheel.name}")

        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            info = f"nlref-{version}.dist-info"
            check_metadata(z.read(f"{info}/METADATA").decode(), "the wheel's METADATA", version)
            licence = f"{info}/licenses/LICENSE"
            if licence not in names:
                fail(f"the wheel has no {licence}")
            if z.read(licence) != (ROOT / "LICENSE").read_bytes():
                fail("the wheel's LICENSE differs from the repository's")
            for f in ("nlref/py.typed", "nlref/__init__.py", "nlref/nn/block.py"):
                if f not in names:
                    fail(f"the wheel lacks {f}")
            # nlref course reads the installed notebooks (nlref.course.default_notebooks); nothing else is data
            notebooks = {f"nlref-{version}.data/data/share/nlref/notebooks/{Path(f).name}"
                         for f in files if f.startswith("notebooks/") and f.endswith(".ipynb")}
            if not notebooks or notebooks - names:
                fail(f"the wheel lacks the notebooks {sorted(notebooks - names)}")
            strays = sorted(n for n in names if not n.startswith(("nlref/", f"nlref-{version}.dist-info/"))
                            and n not in notebooks)
            if strays:
                fail(f"the wheel carries files that are neither the package nor its notebooks: {strays}")
        say("wheel: LICENSE, License-File, version, py.typed and the notebooks present, nothing else")

        with tarfile.open(sdist) as t:
            prefix = f"nlref-{version}/"
            names = {m.name[len(prefix):] for m in t.getmembers() if m.name.startswith(prefix)}
            check_metadata(t.extractfile(prefix + "PKG-INFO").read().decode(), "the sdist's PKG-INFO", version)
            needed = {"LICENSE", "CITATION.cff", "CHANGELOG.md", "CONTRIBUTING.md", "conftest.py",
                      "pyproject.toml", "nlref/py.typed"}
            needed |= {f for f in files if f.split("/")[0] in ("nlref", "tests", "notebooks")}
            missing = sorted(needed - names)
            if missing:
                fail(f"the sdist lacks {missing}")
            unpacked = work / "unpacked"
            t.extractall(unpacked, filter="data")
        say(f"sdist: LICENSE, License-File and all {len(needed)} needed files present")

        root = unpacked / f"nlref-{version}"
        env = dict(os.environ, PYTHONPATH=str(root))
        where = run([sys.executable, "-c", "import nlref; print(nlref.__file__, nlref.__version__)"],
                    cwd=root, env=env)
        if where.returncode or not where.stdout.startswith(str(root)) or version not in where.stdout:
            fail(f"nlref does not import from the unpacked sdist: {where.stdout}{where.stderr}")
        for args in (["-p", "no:nbmake", *FAST_TESTS], [NOTEBOOK]):
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
            say("from the unpacked sdist: " + " ".join(cmd[1:]))
            got = subprocess.run(cmd, cwd=root, env=env)
            if got.returncode:
                fail(f"tests from the unpacked sdist failed: {' '.join(args)}")
    say("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
