"""The commands on a full disk, a read-only folder, and the paths users type (``~``, ``link/..``, a link, ``-name``).

A full disk is the machine's failure: one line naming the file, exit status 1; a folder that cannot
be written is the user's mistake: one line naming the flag, exit status 2, before the work. The
failures are simulated (an ``OSError`` with the system's errno at the moment it comes), except the
per-file size limit of the PNG test, which is real; the same cases were run on real tmpfs mounts.
"""

import errno
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage import io

import nlref._files as files
import nlref.train as T  # imported before a test patches nlref._files.write_atomically, which it binds
from nlref.cli import main

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--epochs", "2", "--n-train", "16", "--n-val", "8", "--batch-size", "8", "--size", "16", "--no-progress"]


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")


def _npy(tmp_path):
    path = tmp_path / "in.npy"
    np.save(path, np.random.default_rng(0).random((24, 24)).astype(np.float32))
    return path


def _png(tmp_path, name="in.png"):
    path = tmp_path / name
    io.imsave(path, np.random.default_rng(0).integers(0, 256, (24, 24)).astype(np.uint8), check_contrast=False)
    return path


def _one_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", ["train", "demo", "course", "denoise"])
def test_a_full_disk_before_the_work_is_the_machines_failure(tmp_path, capsys, monkeypatch, command):
    """Exit status 2 ("the folder cannot be made or written"), as for a user's mistake, and an empty folder left."""
    src = _npy(tmp_path)
    monkeypatch.setattr(files, "write_atomically", _full)  # the folder check's test file
    out = tmp_path / "new" / "out"
    argv = {"train": ["train", *TRAIN, "--out", str(out)], "demo": ["demo", "--quick", "--out", str(out)],
            "course": ["course", "--student", str(out)],
            "denoise": ["denoise", str(src), "--chunks", "8", "--out", str(tmp_path / "o.zarr")]}[command]
    assert main(argv) == 1
    err = _one_line(capsys)
    assert "No space left on device" in err and "the disk is full" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy"]


def test_a_full_disk_is_said_before_an_image_is_denoised(tmp_path, capsys, monkeypatch):
    """os.access passes a full disk: NL-means ran in full, then the write failed."""
    import nlref

    src = _png(tmp_path)
    monkeypatch.setattr(files, "write_atomically", _full)
    monkeypatch.setattr(nlref, "nl_means", lambda *a, **k: pytest.fail("denoised before --out was checked"))
    assert main(["denoise", str(src), "--sigma", "20", "--out", str(tmp_path / "o.png")]) == 1
    err = _one_line(capsys)
    assert f"cannot write {str(tmp_path)!r}: No space left on device" in err and "the disk is full" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_a_read_only_folder_for_a_chunked_run_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    """No check before the work: a pass over the data, then exit 1 naming the hidden partial store."""
    import nlref.nlmeans.store as store

    def no_work(*args, **kwargs):
        raise AssertionError("the data were read before --out was checked")

    monkeypatch.setattr(files, "write_atomically", _read_only)
    monkeypatch.setattr(store, "resolve_parameters_store", no_work)
    assert main(["denoise", str(_npy(tmp_path)), "--chunks", "8", "--out", str(tmp_path / "o.zarr")]) == 2
    err = _one_line(capsys)
    assert "--out" in err and "Read-only file system" in err and ".partial" not in err


def test_a_disk_full_during_a_chunked_run_names_out_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import dask

    monkeypatch.setattr(dask, "compute", _full)  # the chunks' writes into the hidden store
    out = tmp_path / "o.zarr"
    assert main(["denoise", str(_npy(tmp_path)), "--chunks", "8", "--out", str(out), "--no-progress", "-q"]) == 1
    err = _one_line(capsys)
    assert f"cannot write {str(out)!r}: No space left on device" in err and "the disk is full" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy"]


def test_a_training_stopped_by_a_full_disk_says_how_to_continue(tmp_path, capsys, monkeypatch):
    """"[Errno 28] No space left on device" and nothing else: which file, and is the run lost?"""
    real, calls = T.write_atomically, []

    def fills_at_epoch_2(path, write):
        calls.append(path.name)
        if calls.count(T.CHECKPOINT) == 2 and path.name == T.CHECKPOINT:
            return real(path, _full)  # the write itself fails, as on a disk that filled after epoch 1
        return real(path, write)

    monkeypatch.setattr(T, "write_atomically", fills_at_epoch_2)
    out = tmp_path / "run"
    assert main(["train", *TRAIN, "--out", str(out), "-q"]) == 1
    err = _one_line(capsys)
    assert f"cannot write {str(out / T.CHECKPOINT)!r}: No space left on device" in err
    assert "of epoch 1 of 2 is complete; to continue: nlref train" in err
    again = shlex.split(err.split("to continue: ", 1)[1])
    assert again[:2] == ["nlref", "train"] and again[-1] == "--resume"
    monkeypatch.setattr(T, "write_atomically", real)
    assert main(again[1:] + ["-q"]) == 0
    assert T.load_checkpoint(out / T.CHECKPOINT)[0]["epoch"] == 2


@pytest.mark.skipif(importlib.util.find_spec("resource") is None, reason="needs a POSIX file size limit")
def test_a_png_that_cannot_be_written_is_one_line_and_no_traceback(tmp_path):
    """imageio's plugin closed the file again when collected: "Exception ignored in: PluginV3.__del__" and a
    traceback after the error line. A real failure: a per-file size limit (EFBIG), as a full disk fails."""
    src = _png(tmp_path)
    out = tmp_path / "o.png"
    out.write_bytes(b"yesterday's result")
    limit = ("import resource, signal, runpy, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)); sys.argv[0] = 'nlref'; "
             "runpy.run_module('nlref', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "NLREF_NLMEANS_ENGINE": "numpy", "NLREF_TRACEBACK": ""}
    run = subprocess.run([sys.executable, "-c", limit, "denoise", str(src), "--sigma", "20", "--search-size", "5",
                          "--out", str(out), "--overwrite", "-q"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=60)
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr and "Exception ignored" not in run.stderr
    assert f"cannot write {str(out)!r}" in run.stderr
    assert out.read_bytes() == b"yesterday's result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "o.png"]


def test_a_chunked_out_after_link_dotdot_goes_where_the_system_goes(tmp_path, capsys, monkeypatch):
    """--out link/../o.zarr was written beside the link (os.path.abspath), not beside its target (ls, open)."""
    src = _npy(tmp_path)
    (tmp_path / "data" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data" / "deep")
    monkeypatch.chdir(tmp_path)
    assert main(["denoise", "link/../../in.npy", "--chunks", "8", "--sigma", "0.1", "--out", "link/../o.zarr",
                 "-q", "--no-progress"]) == 0
    assert (tmp_path / "data" / "o.zarr").is_dir() and not (tmp_path / "o.zarr").exists()
    assert os.path.exists(src)


def test_overwriting_a_linked_store_replaces_its_target_and_leaves_nothing(tmp_path, capsys):
    """The link was renamed aside and then "removed" with rmtree, which refuses a link: a hidden .old link left,
    the user's link replaced by a folder, its target with the old result."""
    import zarr

    src = _npy(tmp_path)
    (tmp_path / "results").mkdir()
    common = ["--chunks", "8", "-q", "--no-progress"]
    assert main(["denoise", str(src), "--sigma", "0.1", "--out", str(tmp_path / "results" / "o.zarr"), *common]) == 0
    (tmp_path / "o.zarr").symlink_to(tmp_path / "results" / "o.zarr")
    before = zarr.open_array(str(tmp_path / "results" / "o.zarr"), mode="r")[:]
    assert main(["denoise", str(src), "--sigma", "0.3", "--out", str(tmp_path / "o.zarr"), "--overwrite",
                 *common]) == 0
    assert (tmp_path / "o.zarr").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "o.zarr", "results"]
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["o.zarr"]
    assert not np.array_equal(zarr.open_array(str(tmp_path / "results" / "o.zarr"), mode="r")[:], before)


def test_a_tilde_the_shell_left_is_the_home_folder(tmp_path, capsys, monkeypatch):
    """zsh leaves --out=~/x as it is (so does any shell, quoted): nlref made a folder named '~' (train) or
    refused its missing folder (denoise)."""
    src = _png(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert main(["denoise", str(src), "--sigma", "20", "--search-size", "5", "--out=~/o.png", "-q"]) == 0
    assert (home / "o.png").is_file() and not (tmp_path / "~").exists()


def test_a_file_name_starting_with_a_dash_is_explained(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["denoise", str(_png(tmp_path)), "--out", "-o.png"])
    assert stop.value.code == 2
    assert "--out=-name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["denoise", "-noisy.png"])
    assert "./-noisy.png" in capsys.readouterr().err
