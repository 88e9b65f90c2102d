"""The benchmark scripts refuse a bad argument before any work, in one line naming it (benchmarks/_args.py).

Before: ``--blocks 0`` or ``--repeats 0`` measured everything, then failed on the median of nothing;
``--threads 0`` and ``--batch-size 0`` raised tracebacks; ``--plot`` into a missing folder saved
nothing after minutes of measurements (and a crash while saving left half a file);
``calibrate_presets.py --size 100000`` computed on crops cut short without a word, ``--size 3`` on
crops smaller than the patches; ``bench_dask.py`` wrote its 2 GB volume before reading ``--workers 0``,
``--repeats 0`` or ``--piece 1,2``, created a missing ``--dir``, and left the store behind on SIGTERM.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, cwd, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script,args,message", [
    ("bench_train.py", ["--blocks", "0"], r"argument --blocks: 0 is not a whole number >= 1"),
    ("bench_train.py", ["--steps", "-1"], r"argument --steps: -1 is not a whole number >= 1"),
    ("bench_train.py", ["--batch-size", "0"], r"argument --batch-size: 0 is not a whole number >= 1"),
    ("bench_train.py", ["--threads", "two"], r"argument --threads: 'two' is not a whole number"),
    ("bench_block.py", ["--repeats", "0"], r"argument --repeats: 0 is not a whole number >= 1"),
    ("bench_block.py", ["--plot", "/nonexistent-folder/m.png"], r"argument --plot: '/nonexistent-folder' is not an"),
    ("bench_block.py", ["--plot", "memory.xyz"], r"argument --plot: must end in a figure format \(.*\.png"),
    ("bench_nlmeans.py", ["--plot", "/nonexistent-folder/t.png"], r"argument --plot: '/nonexistent-folder' is not"),
    ("bench_nlmeans.py", ["--repeats", "0"], r"argument --repeats: 0 is not a whole number >= 1"),
    ("bench_nlmeans.py", ["--seed", "-3"], r"argument --seed: -3 is negative; a seed is an int >= 0"),
    ("bench_fused.py", ["--rounds", "0"], r"argument --rounds: 0 is not a whole number >= 1"),
    ("calibrate_presets.py", ["--size", "100000"], r"--size must be at most 300, the smallest image's side"),
    ("calibrate_presets.py", ["--size", "3"], r"argument --size: 3 is not a whole number >= 35"),
    ("bench_dask.py", ["--workers", "0"], r"argument --workers: 0 is not a list of whole numbers >= 1 separated by "
                                          r"commas"),
    ("bench_dask.py", ["--chunks", "abc"], r"argument --chunks: 'abc' is not a list of whole numbers >= 1 separated "
                                           r"by commas, e.g. 64,64"),
    ("bench_dask.py", ["--piece", "1,2"], r"argument --piece: 1,2 is not a list of 3 whole numbers >= 1 separated "
                                          r"by commas, e.g. 64,64,64"),
    ("bench_dask.py", ["--repeats", "0"], r"argument --repeats: 0 is not a whole number >= 1"),
    ("bench_dask.py", ["--size-gb", "-1"], r"argument --size-gb: -1 is not a number above 0"),
    ("bench_dask.py", ["--patch", "4"], r"argument --patch: 4 is not an odd whole number >= 1"),
    ("bench_dask.py", ["--piece", "32,256,2048"], r"--piece 32,256,2048 does not fit in the volume"),
    ("bench_dask.py", ["--size-gb", "1e6"], r"--dir '.*' has .* GB free; the input and output stores"),
])
def test_refused_before_any_work(script, args, message, tmp_path):
    extra = ["--dir", str(tmp_path)] if script == "bench_dask.py" else []
    done = _run(script, *args, *extra, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not done.stdout.strip(), (done.stdout[-500:], done.stderr[-2000:])
    assert re.search(message, done.stderr), done.stderr
    assert list(tmp_path.iterdir()) == []     # no store, no figure


def test_bench_dask_refuses_a_missing_dir_instead_of_creating_it(tmp_path):
    missing = tmp_path / "typo"
    done = _run("bench_dask.py", "--dir", str(missing), cwd=tmp_path)
    assert done.returncode == 2 and f"--dir {str(missing)!r} is not an existing folder" in done.stderr, done.stderr
    assert not missing.exists()


def test_bench_dask_removes_its_stores_on_sigterm(tmp_path):
    """Killed while it writes the volume (a timeout, a job scheduler), the script leaves no store behind."""
    process = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "bench_dask.py"), "--dir", str(tmp_path),
                                "--size-gb", "0.2", "--plane", "256", "--chunks", "32", "--workers", "1",
                                "--piece", "8,32,32"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    store = tmp_path / "nlref-bench-dask-input.zarr"
    deadline = time.monotonic() + 120
    while not store.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.exists(), "the volume was never started"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert list(tmp_path.iterdir()) == [], err


@pytest.mark.parametrize("code", ["EROFS", "ENOSPC"])
def test_a_plot_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, code):
    """--plot into a read-only folder (or on a full disk) was taken, and the figure failed after the measurements."""
    import argparse
    import errno

    import nlref._files as files

    def fails(*args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _args import figure_path

    monkeypatch.setattr(files, "write_atomically", fails)
    with pytest.raises(argparse.ArgumentTypeError, match=os.strerror(getattr(errno, code))):
        figure_path(str(tmp_path / "t.png"))
    assert list(tmp_path.iterdir()) == []
