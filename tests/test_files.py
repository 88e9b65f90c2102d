"""Outputs are written whole or not at all (nlref._files), by every writer that uses it."""

import os
import stat

import matplotlib
import pytest

from nlref._files import replaced_atomically, write_atomically

matplotlib.use("Agg")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_write_replaces_the_file_with_the_usual_mode(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    write_atomically(path, lambda f: f.write(b"new contents"))
    assert path.read_bytes() == b"new contents"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()   # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_the_new_name_is_synced_with_its_folder(tmp_path, monkeypatch):
    """The file's bytes were synced, not the rename: a power cut right after could lose the new name."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        info = os.fstat(fd)
        synced.append(("folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomically(tmp_path / "out.bin", lambda f: f.write(b"new"))
    assert synced == [("file", (tmp_path / "out.bin").stat().st_ino), ("folder", tmp_path.stat().st_ino)]


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "out.bin"
    path.write_bytes(b"yesterday's result")

    def half_write(f):
        f.write(b"half")
        raise error

    with pytest.raises(type(error)):
        write_atomically(path, half_write)
    assert path.read_bytes() == b"yesterday's result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError), replaced_atomically(tmp_path / "new.png") as tmp:
        tmp.write_bytes(b"partial")
        raise ValueError("the writer failed")
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_name_keeps_the_suffix_and_is_hidden(tmp_path):
    with replaced_atomically(tmp_path / "figure.png") as tmp:   # writers that read the format from the name
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".figure.png.")
        tmp.write_bytes(b"x")
    assert (tmp_path / "figure.png").read_bytes() == b"x"


def test_a_demo_figure_that_fails_to_save_leaves_the_old_one_and_is_closed(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from nlref.cli.walk import _save

    path = tmp_path / "averaging_curve.png"
    fig, ax = plt.subplots()
    ax.set_title("first")
    _save(fig, path)
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG") and not plt.fignum_exists(fig.number)

    fig, ax = plt.subplots()

    def broken_savefig(fname, **kwargs):
        open(fname, "wb").write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(fig, "savefig", broken_savefig)
    with pytest.raises(KeyboardInterrupt):
        _save(fig, path)
    assert path.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["averaging_curve.png"]
    assert not plt.fignum_exists(fig.number)


def test_the_folder_check_never_touches_a_users_file(tmp_path):
    """folder_problem wrote and deleted a file named ``.write-test``: a user's file of that name in an --out
    folder (nlref train, denoise, demo) was replaced and removed. It now writes a name of its own."""
    from nlref._files import folder_problem

    (tmp_path / ".write-test").write_bytes(b"the user's notes")
    assert folder_problem(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".write-test"]
    assert (tmp_path / ".write-test").read_bytes() == b"the user's notes"
