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


def pytest_report_header(config):
    if _nbmake_loaded(config):
        return "notebooks: executed as tests (nbmake)"
    return "notebooks: not run (nbmake is not installed or was disabled)"
