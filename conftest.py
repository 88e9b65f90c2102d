"""Root of the test suite: the notebooks are tests when nbmake is installed.

``python -m pytest`` collects ``tests/`` and ``notebooks/`` (``testpaths`` in
pyproject.toml). The notebooks run through the nbmake plugin, which the ``test`` extra
installs. This hook turns it on whenever the plugin is loaded, so the README's test
command runs them with no ``--nbmake`` flag, and a plain ``pytest`` where nbmake is
absent runs the Python tests instead of failing on an unknown option; the report's
header says which of the two happened. ``-p no:nbmake`` leaves the notebooks out.
"""


def _nbmake_loaded(config):
    return config.pluginmanager.hasplugin("nbmake") and hasattr(config.option, "nbmake")


def pytest_configure(config):
    if _nbmake_loaded(config):
        config.option.nbmake = True
        _check_notebook_figures(config)


def _check_notebook_figures(config):
    """Every figure a notebook draws meets the figure standard (tests/figcheck.py), or its cell fails.

    The kernels nbmake starts read IPython's startup files from ``IPYTHONDIR``: this session points
    it at a folder of its own whose one startup file installs the check (the user's IPython profile
    is not read by these kernels; ``pytest_unconfigure`` puts the variable back).
    """
    import os
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent
    folder = Path(tempfile.mkdtemp(prefix="nlref-ipython-"))
    startup = folder / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-nlref-figcheck.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from tests.figcheck import install_in_ipython\n"
        "install_in_ipython(get_ipython())\n")
    config._nlref_ipythondir = (os.environ.get("IPYTHONDIR"), folder)
    os.environ["IPYTHONDIR"] = str(folder)


def pytest_unconfigure(config):
    import os
    import shutil

    saved = getattr(config, "_nlref_ipythondir", None)
    if saved is not None:
        before, folder = saved
        if before is None:
            os.environ.pop("IPYTHONDIR", None)
        else:
            os.environ["IPYTHONDIR"] = before
        shutil.rmtree(folder, ignore_errors=True)


def pytest_report_header(config):
    if _nbmake_loaded(config):
        return "notebooks: executed as tests (nbmake)"
    return "notebooks: not run (nbmake is not installed or was disabled)"
