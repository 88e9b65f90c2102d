"""Writers on a full disk, a read-only folder, behind symbolic links (nlref._files and its callers).

The failures are simulated where the suite runs (no root, no mount): an ``OSError`` with the
errno the system gives (ENOSPC, EROFS) raised at the moment it comes. The same cases were run on
real tmpfs mounts (a full one, a read-only one) when these tests were written.
"""

import errno
import importlib.util
import os
import stat
import sys
import warnings

import numpy as np
import pytest

import nlref._files as files
import nlref.train as T  # imported before a test patches nlref._files.write_atomically, which it binds
from nlref._files import folder_problem, write_atomically


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")


@pytest.mark.parametrize("where", ["mkstemp", "write"])
def test_a_failed_write_names_the_file_asked_for_not_the_temporary(tmp_path, monkeypatch, where):
    """The error said "[Errno 28] No space left on device" (or named the hidden temporary file): which file?"""
    path = tmp_path / "checkpoint.npz"
    if where == "mkstemp":
        monkeypatch.setattr(files.tempfile, "mkstemp", _full)
    with pytest.raises(OSError) as caught:
        write_atomically(path, _full)
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert str(caught.value) == f"cannot write {str(path)!r}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_the_folder_check_is_raised_and_leaves_no_folder(tmp_path, monkeypatch):
    """A full disk is the machine's failure, not a folder the user cannot write: it was returned as a user's
    problem (exit 2 on the command line), and the folders made for the check were left behind."""
    monkeypatch.setattr(files, "write_atomically", _full)
    with pytest.raises(OSError) as caught:
        folder_problem(tmp_path / "runs" / "a")
    assert caught.value.errno == errno.ENOSPC and repr(str(tmp_path / "runs" / "a")) in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder_is_the_users_problem_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "write_atomically", _read_only)
    problem = folder_problem(tmp_path / "runs" / "a")
    assert "Read-only file system" in problem
    assert list(tmp_path.iterdir()) == []


def test_a_write_through_a_link_replaces_its_target_and_keeps_the_link(tmp_path):
    """The link was replaced by a file, its target left with the old contents."""
    (tmp_path / "results").mkdir()
    target = tmp_path / "results" / "out.png"
    target.write_bytes(b"old")
    link = tmp_path / "out.png"
    link.symlink_to(target)
    write_atomically(link, lambda f: f.write(b"new"))
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "results"]
    assert [p.name for p in target.parent.iterdir()] == ["out.png"]


def test_a_checkpoint_on_a_disk_full_after_epoch_1_is_still_resumable(tmp_path, monkeypatch):
    """Epoch 2's checkpoint fails half-written: epoch 1's stays, no temporary file, and resuming ends with the
    bits of a run that never failed."""
    from tests.helpers import TINY, tiny_run

    real, calls = T.write_atomically, []

    def fills_at_epoch_2(path, write):
        if path.name == T.CHECKPOINT:
            calls.append(path)
            if len(calls) == 2:
                def half(f):
                    f.write(b"PK\x03\x04 half a zip")
                    _full()
                return real(path, half)
        return real(path, write)

    monkeypatch.setattr(T, "write_atomically", fills_at_epoch_2)
    with pytest.raises(OSError, match="No space left on device"):
        tiny_run(tmp_path / "run", epochs=2)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.npz", "metrics.csv", "metrics.json"]
    assert T.load_checkpoint(tmp_path / "run" / T.CHECKPOINT)[0]["epoch"] == 1
    monkeypatch.setattr(T, "write_atomically", real)
    T.train(T.TrainConfig(**{**TINY, "epochs": 2}), tmp_path / "run", resume=True, progress=False, log=None)
    tiny_run(tmp_path / "straight", epochs=2)
    with np.load(tmp_path / "run" / T.CHECKPOINT) as a, np.load(tmp_path / "straight" / T.CHECKPOINT) as b:
        assert sorted(a.files) == sorted(b.files)
        assert all(np.array_equal(a[k], b[k]) for k in a.files if k != "meta")


def test_the_student_edition_has_the_mode_of_a_folder_made_by_mkdir(tmp_path):
    """mkdtemp's 0700 went with the staging folder into place: a teacher's edition nobody else could read."""
    pytest.importorskip("nbformat")
    from nlref.course import write_student_edition

    write_student_edition(tmp_path / "student")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "student").stat().st_mode) == 0o777 & ~mask


def test_the_student_edition_through_a_link_replaces_its_target(tmp_path):
    pytest.importorskip("nbformat")
    from nlref.course import write_student_edition

    (tmp_path / "real").mkdir()
    write_student_edition(tmp_path / "real" / "student")
    (tmp_path / "student").symlink_to(tmp_path / "real" / "student")
    (tmp_path / "real" / "student" / "stale.txt").write_text("from before")
    write_student_edition(tmp_path / "student", overwrite=True)
    assert (tmp_path / "student").is_symlink()
    assert not (tmp_path / "real" / "student" / "stale.txt").exists()
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["student"]


def test_an_opener_keeps_the_dotdot_after_a_link(tmp_path, monkeypatch):
    """os.path.abspath dropped "link/.." as text: the store beside the link was read, not the one beside its
    target, where the system (and ls) goes."""
    zarr = pytest.importorskip("zarr")
    from nlref.nlmeans.store import Opener

    (tmp_path / "data" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data" / "deep")
    zarr.create_array(str(tmp_path / "data" / "x.zarr"), shape=(4, 4), chunks=(4, 4), dtype="f4")[:] = 1
    zarr.create_array(str(tmp_path / "x.zarr"), shape=(6, 6), chunks=(6, 6), dtype="f4")[:] = 2  # the wrong one
    monkeypatch.chdir(tmp_path)
    opener = Opener.zarr("link/../x.zarr")
    assert opener.shape == (4, 4) and os.path.samefile(opener.path, tmp_path / "data" / "x.zarr")


def _fast_numba_copy():
    """A fresh copy of nlref.nlmeans.fast_numba (its kernels not yet handed to Numba), beside the original."""
    import nlref.nlmeans.fast_numba as original

    spec = importlib.util.spec_from_file_location("nlref.nlmeans._fast_numba_copy", original.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _box_axis_works(module):
    out = np.zeros(8)
    module._box_axis(np.arange(10.0), out, 8, 3, 1)
    return np.array_equal(out, 3 * np.arange(8.0) + 3)


def _compiled_copy_warnings():
    """Compile a fresh copy of the NL-means kernels, check one of them computes, and return the warnings' texts."""
    module = _fast_numba_copy()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module.compile_kernels()
            assert _box_axis_works(module)
    finally:
        sys.modules.pop("nlref.nlmeans._fast_numba_copy", None)
    return [str(w.message) for w in caught]


def test_kernels_compile_where_numba_has_no_folder_for_its_cache(monkeypatch):
    """A read-only install and a read-only HOME: "RuntimeError: cannot cache function '_box': no locator
    available", an internal error of nlref denoise. Now compiled without the cache, with one warning."""
    caching = pytest.importorskip("numba.core.caching")
    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])  # what Numba finds there: no folder at all
    monkeypatch.setattr(files, "_cache_warned", [])
    assert any("NUMBA_CACHE_DIR" in message for message in _compiled_copy_warnings())


def test_kernels_run_when_their_cache_cannot_be_written(tmp_path, monkeypatch):
    """A full disk where Numba writes its cache failed the first call with ENOSPC, whatever the output's disk."""
    caching = pytest.importorskip("numba.core.caching")
    import numba.core.config

    monkeypatch.setattr(numba.core.config, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(caching.IndexDataCacheFile, "_open_for_write", _full)
    monkeypatch.setattr(files, "_cache_warned", [])
    assert any("No space left on device" in message for message in _compiled_copy_warnings())
