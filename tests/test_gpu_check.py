"""benchmarks/gpu_check.py, the script a GPU machine runs: its dry run, its comparison and its errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _rows(text):
    """The table's rows as (part, check, status, value, detail) tuples."""
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return [tuple(c.strip() for c in r) for r in rows[1:]]  # without the header row


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--dry-run",
                           "--size", "tiny", "--tests", "tests/test_backend.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    return done, out


@pytest.mark.slow
def test_dry_run_writes_every_part(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (out / "gpu_check.md").read_text()
    rows = _rows(text)
    assert {r[0] for r in rows} == {"tests", "compare", "nlmeans", "block", "train"}
    assert all(r[2] == "ok" for r in rows), [r for r in rows if r[2] != "ok"]
    checks = " ".join(r[1] for r in rows if r[0] == "compare")
    for name in ("nl_means fast", "nl_means naive", "estimate_sigma", "conv3d", "batchnorm", "nonlocal_op",
                 "NonLocalBlock", "VideoNet", "ImageResNet", "VideoTransformer", "float64", "float32"):
        assert name in checks
    # every comparison is a number under its tolerance, and the float32 ones did differ from NumPy somewhere
    values = [(float(r[3]), float(r[4].split()[1])) for r in rows if r[0] == "compare"]
    assert all(v <= tol for v, tol in values)
    assert any(v > 0 for v, _ in values)
    assert "passed" in text.split("## pytest summary")[1]
    assert (out / "pytest.txt").read_text().startswith(sys.executable)
    timings = [r for r in rows if r[0] in ("nlmeans", "block", "train")]
    assert all(" ms" in r[3] for r in timings)


def test_comparison_flags_a_wrong_result(rng):
    a = rng.standard_normal((4, 5))
    for dtype, small, large in (("float64", 1e-13, 1e-8), ("float32", 1e-7, 1e-3)):
        worst, ok = gpu_check.compare_outputs([a], [a * (1 + small)], dtype)
        assert ok and 0 < worst < gpu_check.TOLERANCE[dtype]
        wrong = a.copy()
        wrong[2, 3] += large * np.abs(a).max()
        worst, ok = gpu_check.compare_outputs([a, a], [a, wrong], dtype)
        assert not ok and worst == pytest.approx(large)
    assert gpu_check.relative_difference(a, a.T) == np.inf
    nan = a.copy()
    nan[0, 0] = np.nan
    assert gpu_check.relative_difference(a, nan) == np.inf
    assert gpu_check.relative_difference(np.zeros(3), np.zeros(3)) == 0.0
    assert not gpu_check.compare_outputs([a, a], [a], "float64")[1]


def test_compare_part_reports_a_target_that_computes_wrongly(tmp_path, monkeypatch):
    """A target whose moves corrupt the data by 1e-3: every comparison it runs must fail."""
    target = gpu_check.Target(dry_run=True)
    move = target.move
    target.move = lambda host: move(np.asarray(host) * (1 + 1e-3) if np.asarray(host).dtype.kind == "f" else host)
    cases = gpu_check.compare_cases("tiny")
    picked = [c for c in cases if c[0].startswith(("nl_means fast pixel", "conv1x1", "NonLocalBlock dot_product"))]
    monkeypatch.setattr(gpu_check, "compare_cases", lambda size: picked)
    report = gpu_check.Report(tmp_path / "t.md", [])
    gpu_check.compare_part(target, "tiny")(report)
    assert len(report.rows) == len(picked) >= 4
    assert all(r[2] == "FAIL" for r in report.rows), report.rows


@pytest.mark.parametrize("argv, needle", [
    (["--size", "huge"], "--size"),
    (["--parts", "tests,gpu"], "--parts"),
    (["--parts", ""], "--parts"),
    (["--tests", "no/such/place.py"], "--tests"),
])
def test_bad_arguments_name_the_argument(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args([str(tmp_path), "--dry-run", *argv])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(SystemExit):
        gpu_check.parse_args([str(path)])
    assert "DIR must be a folder" in capsys.readouterr().err


def test_missing_packages_stop_with_advice_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "PACKAGES", gpu_check.PACKAGES + (
        ("nlref_no_such_module", "no-such-wheel", "nothing", True),
        ("nlref_no_such_peer", "no-such-peer", "nothing", False)))
    assert gpu_check.main([str(tmp_path / "out"), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "no-such-wheel" in captured.err and "pip download" in captured.err and "--no-index" in captured.err
    assert "no-such-peer" in captured.out
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()  # stopped before running (or writing) anything


def test_without_cupy_the_gpu_run_stops_with_a_message(tmp_path, capsys):
    pytest.importorskip("array_api_strict")
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here")
    assert gpu_check.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cupy-cuda13x" in err and "pip install --no-index" in err


def test_time_limits_fit_the_machines():
    """The parts' limits add up to less than the GPU machine's 8 minutes and the dry run's 5 (with a margin
    for start-up), and every part has one."""
    assert set(gpu_check.BUDGETS["gpu"]) == set(gpu_check.BUDGETS["dry"]) == set(gpu_check.PARTS)
    assert sum(gpu_check.BUDGETS["gpu"].values()) <= 8 * 60 - 20
    assert sum(gpu_check.BUDGETS["dry"].values()) <= 5 * 60 - 20
