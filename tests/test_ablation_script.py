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
    (["--only", "2b", "--rows", "res2", "--seeds", "0", "1", "0", "--n-train", "32", "--n-val", "16", "--epochs", "1"],
     "--seeds: 0 given more than once; give each seed once"),
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


_TINY = ["--n-train", "32", "--n-val", "16", "--epochs", "1", "--seeds", "0", "--only", "2b"]


def test_an_existing_json_is_never_replaced_without_overwrite(tmp_path):
    """--json results.json replaced an existing file at the end of the ablation without a word."""
    (tmp_path / "results.json").write_text("last week's results")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation.py"), *_TINY, "--rows", "res2",
                           "--json", "results.json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--json 'results.json' already exists: add --overwrite" in done.stderr
    assert "## Table" not in done.stdout and (tmp_path / "results.json").read_text() == "last week's results"


def test_an_interrupted_ablation_keeps_the_rows_it_finished(tmp_path):
    """The results were written once, at the end: Ctrl-C after most of an hour kept nothing (and a traceback)."""
    import json
    import signal

    process = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "ablation.py"), *_TINY, "--json",
                                "results.json"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    for line in process.stdout:                       # the first row's line is printed after its results are saved
        if line.startswith("| res2 |"):
            process.send_signal(signal.SIGINT)
            break
    stdout, stderr = process.communicate(timeout=300)
    saved = json.loads((tmp_path / "results.json").read_text())
    labels = [row["label"] for row in saved["tables"]["2b"]]
    if process.returncode == 0:                       # the last rows ended before the signal came: all saved
        assert saved["complete"] and labels == ["res2", "res3", "res4"]
        return
    assert process.returncode == 130 and "Traceback" not in stderr
    assert not saved["complete"] and labels[0] == "res2"
    assert f"stopped by Ctrl-C; the {len(labels)} rows finished are in results.json" in stderr
    (run,) = saved["tables"]["2b"][0]["runs"]
    assert 0 <= run["val_accuracy"] <= 1
