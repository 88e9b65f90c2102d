"""``nlref denoise`` on stores, as users run it: one read per pass, complete output or none, clear flag errors."""

from __future__ import annotations

import numpy as np
import pytest

from nlref.cli import main


def _volume(shape=(12, 40, 36), seed=8):
    rng = np.random.default_rng(seed)
    return np.clip(np.round(120 + 25 * rng.standard_normal(shape)), 0, 255).astype(np.uint8)


def _zarr_input(tmp_path, volume, name="in.zarr"):
    zarr = pytest.importorskip("zarr")
    zarr.create_array(str(tmp_path / name), shape=volume.shape, chunks=(6, 20, 18), dtype=volume.dtype)[...] = volume
    return str(tmp_path / name)


@pytest.mark.parametrize("given,passes", [(["--sigma", "10", "--h", "8", "--patch-size", "3", "--search-size", "5"], 2),
                                          (["--sigma", "10"], 2)])
def test_cli_reads_the_data_once_per_pass(tmp_path, monkeypatch, capsys, given, passes):
    """Given the parameters: one pass to check and resolve them, one to denoise (the parameters are not resolved
    again: that was one more full read)."""
    pytest.importorskip("dask")
    from dask.callbacks import Callback

    from nlref.nlmeans import store

    volume = _volume().astype(np.float32)  # a float image: its finiteness and peak take a pass
    source = _zarr_input(tmp_path, volume)
    computes, reads = [], []
    real = store.read_block
    monkeypatch.setattr(store, "read_block", lambda s, key: reads.append(key) or real(s, key))

    class Passes(Callback):
        def _start(self, dsk):
            computes.append(len(dsk))

    with Passes():
        assert main(["denoise", source, "--out", str(tmp_path / "out.zarr"), "--no-progress", *given]) == 0
    assert len(computes) == passes, computes
    assert len(reads) == 2 * 8  # 8 chunks, each read once per pass
    capsys.readouterr()


def test_cli_all_zero_volume_gives_a_complete_store(tmp_path, capsys):
    """A result equal to the fill value everywhere is still written chunk by chunk (and so told from a lost run)."""
    zarr = pytest.importorskip("zarr")
    source = _zarr_input(tmp_path, np.zeros((12, 40, 36), np.uint8))
    assert main(["denoise", source, "--out", str(tmp_path / "out.zarr"), "--h", "5", "--patch-size", "3",
                 "--search-size", "5", "--no-progress"]) == 0
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    assert out.nchunks_initialized == out.nchunks == 8 and not out[...].any()
    capsys.readouterr()


def test_cli_refuses_a_result_missing_chunks(tmp_path, capsys, monkeypatch):
    """Chunks written elsewhere (a worker in another folder, a store that skips fill-value chunks): exit 1, no --out."""
    zarr = pytest.importorskip("zarr")
    source = _zarr_input(tmp_path, np.zeros((12, 40, 36), np.uint8))
    real = zarr.create_array

    def skipping(*args, config=None, **kwargs):  # fill-value chunks are not written: a store that looks empty
        return real(*args, config=dict(config or {}, write_empty_chunks=False), **kwargs)

    monkeypatch.setattr(zarr, "create_array", skipping)
    assert main(["denoise", source, "--out", str(tmp_path / "out.zarr"), "--h", "5", "--patch-size", "3",
                 "--search-size", "5", "--no-progress"]) == 1
    assert "holds 0 of its 8 chunks" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]


@pytest.mark.parametrize("bad", ["0", "-4", "8,x", "2.5"])
def test_cli_chunks_errors_name_the_flag(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as stop:
        main(["denoise", "in.zarr", "--out", str(tmp_path / "out.zarr"), "--chunks", bad])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--chunks takes a positive int or comma-separated positive ints" in err and "odd" not in err


def test_cli_chunks_per_axis_count_is_checked(tmp_path, capsys):
    source = _zarr_input(tmp_path, _volume())
    assert main(["denoise", source, "--out", str(tmp_path / "out.zarr"), "--chunks", "6,20", "--sigma", "10"]) == 2
    err = capsys.readouterr().err
    # the store route's check (one place), in the flag's name
    assert "--chunks must be a positive int or one positive int per spatial axis (3" in err and "odd" not in err
    assert "chunks=" not in err and not (tmp_path / "out.zarr").exists()


def test_cli_hdf5_with_several_datasets_is_refused(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    pytest.importorskip("zarr")
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["a"] = np.zeros((4, 4))
        f["b"] = np.zeros((4, 4))
    assert main(["denoise", str(tmp_path / "two.h5"), "--out", str(tmp_path / "out.zarr"), "--sigma", "1"]) == 2
    assert "one dataset; this one holds 2 (a, b)" in capsys.readouterr().err
