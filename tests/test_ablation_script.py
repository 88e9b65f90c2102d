"""benchmarks/ablation.py refuses what would fail, before its first run (a run of the default schedule takes
minutes, the whole ablation about an hour): a bad seed failed after the first seed's runs with a traceback, a
--json that cannot be written after all of them (the results lost), and rows matching nothing ran nothing."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args,message", [
    (["--seeds", "0", "-1", "--only", "2a"], "row 'C2D baseline', seed -1: seed must be an integer >= 0"),
    (["--only", "2a", "--rows", "res2"], r"--rows res2: no such row in the tables chosen \(2a\)"),
    (["--only", "2a", "--json", "/nonexistent-folder/x.json"], "--json '/nonexistent-folder/x.json': not a file"),
    (["--only", "2b", "--epochs", "0"], "row 'res2', seed 0: epochs must be a positive integer"),
])
def test_refused_before_any_run(args, message, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "## Table" not in done.stdout
    assert re.search(message, done.stderr), done.stderr


def test_a_json_on_a_full_disk_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    """os.access passed a folder on a full disk: an hour of runs, then the results lost at the --json write."""
    import argparse
    import errno

    import nlref._files as files

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ablation

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_atomically", full)
    args = argparse.Namespace(only=["2a"], rows=None, seeds=[0], json=str(tmp_path / "x.json"))
    with pytest.raises(SystemExit) as stop:
        ablation.check_plan(argparse.ArgumentParser(prog="ablation.py"), args, ablation.SCHEDULE)
    assert stop.value.code == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
