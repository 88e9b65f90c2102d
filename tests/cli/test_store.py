"""``nlref denoise`` on stores, as users run it: one read per pass, complete output or none, clear flag errors."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

import nlref
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


def _memory(psutil, available):
    """psutil.virtual_memory as on a machine with ``available`` bytes free (the other fields as they are)."""
    real = psutil.virtual_memory
    return lambda: real()._replace(available=available)


def test_cli_refuses_chunks_whose_task_exceeds_the_available_memory(tmp_path, monkeypatch, capsys):
    """A chunk whose task needs more memory than the machine has is refused naming --chunks, before any read.

    The only limit was a fixed 4 GiB per chunk (nlref.nlmeans.WORKING_MEMORY_LIMIT), whatever the machine:
    the run started, and was killed for memory. Here the machine says it has 64 KiB."""
    psutil = pytest.importorskip("psutil")
    from nlref.nlmeans import store

    source = _zarr_input(tmp_path, _volume())
    reads = []
    real = store.read_block
    monkeypatch.setattr(store, "read_block", lambda s, key: reads.append(key) or real(s, key))
    monkeypatch.setattr(psutil, "virtual_memory", _memory(psutil, 2**16))
    assert main(["denoise", source, "--out", str(tmp_path / "out.zarr"), "--chunks", "16", "--sigma", "10",
                 "--patch-size", "3", "--search-size", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"--chunks: one chunk's task needs about 0\.\d+ GiB of working memory, more than the 0\.00 GiB "
                     r"this machine has available; use smaller --chunks", err), err
    assert reads == [] and not (tmp_path / "out.zarr").exists()


def test_cli_runs_as_many_threads_as_the_memory_holds(tmp_path, monkeypatch, capsys):
    """Every local thread holds one chunk's task: with memory for one task, the run takes one thread (and says
    so) instead of one per core, which a per-chunk limit let through at cores x the memory."""
    psutil = pytest.importorskip("psutil")
    zarr = pytest.importorskip("zarr")
    import concurrent.futures

    from nlref.nlmeans import store
    from nlref.nlmeans.fast import working_memory

    volume = _volume()
    source = _zarr_input(tmp_path, volume)
    kwargs = dict(sigma=10, h=8, patch_size=3, search_size=5)
    need = working_memory((12, 16, 16), 1, (3, 3, 3), (5, 5, 5), "pixel", 4, 1)  # the largest chunk's task
    monkeypatch.setattr(psutil, "virtual_memory", _memory(psutil, need * 3 // 2))
    monkeypatch.setattr("nlref.cli.store.os.cpu_count", lambda: 4)
    pools = []
    real_pool = concurrent.futures.ThreadPoolExecutor

    class Pool(real_pool):  # records the threads of the pool the command makes
        def __init__(self, max_workers=None, *args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == "nlref.cli.store":
                pools.append(max_workers)
            super().__init__(max_workers, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", Pool)
    out = tmp_path / "out.zarr"
    assert main(["denoise", source, "--out", str(out), "--chunks", "16", "--sigma", "10", "--h", "8",
                 "--patch-size", "3", "--search-size", "5", "--no-progress"]) == 0
    assert pools == [1]
    assert re.search(r"running 1 of 4 threads: each chunk's task needs about \d+ MiB", capsys.readouterr().out)
    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[...], nlref.nl_means(volume, **kwargs))
    assert store.check_chunk_memory(store.Opener.zarr(source), chunks=16, patch_size=3, search_size=5) == need


@pytest.mark.parametrize("shape,grid", [((1024, 1000), "4 chunks of (512, 512)"),
                                        ((600, 520, 3), "4 chunks of (512, 512, 3)"),
                                        ((130, 64, 64), "3 chunks of (64, 64, 64)"),
                                        ((40, 50), "1 chunk of (40, 50)")])
def test_cli_default_chunks_hold_about_64_cubed_samples(tmp_path, capsys, shape, grid):
    """A file without a chunk grid (.npy, TIFF) and no --chunks: about 64^3 samples a chunk. 64 per axis made
    a 1024 x 1000 image 256 tasks of 64 x 64 (a 4096 x 4096 one 4,096, 4.5 times as slow as 512 x 512)."""
    zarr = pytest.importorskip("zarr")
    image = np.random.default_rng(1).integers(0, 255, shape).astype(np.uint8)
    np.save(tmp_path / "a.npy", image)
    out = tmp_path / "out.zarr"
    assert main(["denoise", str(tmp_path / "a.npy"), "--out", str(out), "--sigma", "10", "--h", "8",
                 "--patch-size", "3", "--search-size", "3", "--no-progress"]) == 0
    assert f"in {grid}" in capsys.readouterr().out
    axis = -1 if len(shape) == 3 and shape[-1] == 3 else None
    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[...],
                                  nlref.nl_means(image, sigma=10, h=8, patch_size=3, search_size=3, channel_axis=axis))


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


# ---- a Zarr store or TIFF stack streamed into a Zarr store (from tests/nlmeans/test_dask.py) ----


def _smooth_volume(shape=(12, 40, 36), seed=8):
    """A smooth uint8 volume (a sine ramp) with noise of 0.15 x 60 grey levels."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    image = 100 + 60 * (0.5 + 0.3 * np.sin(6 * sum(axes)) + 0.15 * rng.standard_normal(shape))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


@pytest.fixture
def synchronous():
    """Dask's synchronous scheduler: tasks in order, in this thread (a Ctrl-C in a task stops the run there)."""
    dask = pytest.importorskip("dask")
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.mark.usefixtures("synchronous")
def test_cli_streams_a_zarr_store(tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    volume = _smooth_volume()
    source = zarr.create_array(str(tmp_path / "big.zarr"), shape=volume.shape, chunks=(5, 16, 16), dtype="u1")
    source[...] = volume
    out = tmp_path / "clean.zarr"
    assert main(["denoise", str(tmp_path / "big.zarr"), "--sigma", "10", "--chunks", "6,20,18",
                 "--out", str(out)]) == 0
    written = zarr.open_array(str(out), mode="r")
    assert written.chunks == (6, 20, 18) and written.dtype == np.uint8
    np.testing.assert_array_equal(written[...], nlref.nl_means(volume, sigma=10, workers=1))
    assert "denoised (12, 40, 36) uint8" in capsys.readouterr().out
    # an existing output is never overwritten
    assert main(["denoise", str(tmp_path / "big.zarr"), "--sigma", "10", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.usefixtures("synchronous")
@pytest.mark.parametrize("aggregation", ["pixel", "patch"])
def test_cli_streams_a_tiff_stack_with_estimated_noise(tmp_path, capsys, aggregation):
    tifffile = pytest.importorskip("tifffile")
    zarr = pytest.importorskip("zarr")
    volume = _smooth_volume(seed=9)
    tifffile.imwrite(tmp_path / "stack.tif", volume)
    out = tmp_path / "clean.zarr"
    assert main(["denoise", str(tmp_path / "stack.tif"), "--chunks", "16", "--aggregation", aggregation,
                 "--out", str(out)]) == 0
    expected = nlref.nl_means(volume, aggregation=aggregation, workers=1)
    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[...], expected)
    assert "(estimated)" in capsys.readouterr().out


@pytest.mark.usefixtures("synchronous")
def test_cli_chunked_errors(tmp_path, capsys):
    (tmp_path / "plain.txt").write_text("not an image")
    assert main(["denoise", str(tmp_path / "plain.txt"), "--chunks", "8", "--out", str(tmp_path / "o.zarr")]) == 2
    assert "Zarr store" in capsys.readouterr().err
    assert main(["denoise", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "o.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.usefixtures("synchronous")
def test_cli_on_a_distributed_scheduler(tmp_path, capsys):
    """--scheduler: a TIFF stack read on worker processes (only its path travels), the noise estimated there."""
    tifffile = pytest.importorskip("tifffile")
    zarr = pytest.importorskip("zarr")
    distributed = pytest.importorskip("distributed")
    volume = _smooth_volume(seed=10)
    tifffile.imwrite(tmp_path / "stack.tif", volume)
    out = tmp_path / "clean.zarr"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as c:
        assert main(["denoise", str(tmp_path / "stack.tif"), "--chunks", "8,16,16", "--scheduler", c.scheduler_address,
                     "--out", str(out)]) == 0
    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[...], nlref.nl_means(volume, workers=1))
    assert "(estimated)" in capsys.readouterr().out


@pytest.mark.parametrize("terminal, flags, bar", [(False, [], False), (True, [], True),
                                                  (True, ["--no-progress"], False)])
@pytest.mark.usefixtures("synchronous")
def test_cli_chunked_progress_bar_follows_the_single_image_rule(tmp_path, capsys, monkeypatch, terminal, flags, bar):
    """A bar on stderr when stderr is a terminal, none with --no-progress or in a pipe (as for one image)."""
    zarr = pytest.importorskip("zarr")
    volume = _smooth_volume()
    zarr.create_array(str(tmp_path / "big.zarr"), shape=volume.shape, chunks=(6, 20, 18), dtype="u1")[...] = volume
    monkeypatch.setattr("sys.stderr.isatty", lambda: terminal)
    assert main(["denoise", str(tmp_path / "big.zarr"), "--sigma", "10", *flags,
                 "--out", str(tmp_path / "clean.zarr")]) == 0
    captured = capsys.readouterr()
    assert ("Completed" in captured.err) == bar and "Completed" not in captured.out


@pytest.mark.usefixtures("synchronous")
def test_cli_interrupted_run_leaves_no_output(tmp_path, capsys, monkeypatch):
    """A run stopped half way (Ctrl-C in the third chunk) leaves neither --out nor a partial store behind."""
    zarr = pytest.importorskip("zarr")
    from nlref.nlmeans import store

    volume = _smooth_volume()
    zarr.create_array(str(tmp_path / "big.zarr"), shape=volume.shape, chunks=(6, 20, 18), dtype="u1")[...] = volume
    calls = []
    real = store.denoise_with_halo

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "denoise_with_halo", interrupted)
    assert main(["denoise", str(tmp_path / "big.zarr"), "--sigma", "10", "--out", str(tmp_path / "clean.zarr")]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.zarr"]


@pytest.mark.parametrize("make, extra, message", [
    (lambda p: np.save(p, np.array([object()] * 4).reshape(2, 2), allow_pickle=True), [],
     "not a NumPy array file a chunked run can map (Array can't be memory-mapped"),
    (lambda p: p.write_bytes(b"\x93NUMPY garbage garbage"), [], "not a NumPy array file a chunked run can map"),
    (lambda p: np.save(p, _volume((2, 16, 16))), ["--scheduler", "notanaddress"],
     "--scheduler 'notanaddress': not a scheduler address such as tcp://HOST:8786"),
])
def test_unreadable_npy_and_bad_scheduler_are_the_users_mistakes(tmp_path, capsys, make, extra, message):
    """Each was reported as an "internal error ... a bug in nlref"."""
    pytest.importorskip("zarr")
    pytest.importorskip("distributed")
    src = tmp_path / "in.npy"
    make(src)
    assert main(["denoise", str(src), "--out", str(tmp_path / "o.zarr"), "--chunks", "8", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "internal error" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["in.npy"]


def test_cli_reads_the_one_array_of_a_zarr_group(tmp_path, capsys, synchronous):
    """A Zarr group holding one array (here in a subgroup) is read as that array, as an HDF5 file's one dataset
    is; it raised NodeTypeValidationError, reported as an internal error."""
    zarr = pytest.importorskip("zarr")
    volume = _volume((6, 20, 18))
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_group("raw").create_array("volume", shape=volume.shape, chunks=(3, 10, 9), dtype=volume.dtype)[...] = volume
    assert main(["denoise", str(tmp_path / "g.zarr"), "--sigma", "10", "--out", str(tmp_path / "o.zarr"),
                 "--no-progress"]) == 0
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "o.zarr"), mode="r")[...],
                                  nlref.nl_means(volume, sigma=10))
    capsys.readouterr()


def _zarr_group_of_two(p):
    zarr = pytest.importorskip("zarr")
    group = zarr.open_group(str(p), mode="w")
    for name in ("a", "b"):
        group.create_array(name, shape=(4, 16, 16), dtype="uint8")


@pytest.mark.parametrize("name, make, message", [
    ("g.zarr", _zarr_group_of_two, "a chunked run reads a Zarr group holding one array; this one holds 2 (a, b)"),
    ("folder.zarr", lambda p: p.mkdir(), "a folder that is not a Zarr store a chunked run can read"),
    ("in.tif", lambda p: p.write_bytes(b"not a tiff at all"), "not a TIFF file a chunked run can read"),
    ("in.h5", lambda p: p.write_bytes(b"not an hdf5 file"), "not an HDF5 file a chunked run can read"),
])
def test_cli_unreadable_chunked_inputs_are_named(tmp_path, capsys, name, make, message):
    """Each was an "internal error ... a bug in nlref" (a Zarr group, a damaged TIFF) or an error line that did not
    say which file or what was wrong with it (a folder that is no Zarr store, a damaged HDF5 file)."""
    pytest.importorskip("zarr")
    if name.endswith(".h5"):
        pytest.importorskip("h5py")
    make(tmp_path / name)
    assert main(["denoise", str(tmp_path / name), "--sigma", "10", "--out", str(tmp_path / "o.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and f"IMAGE {str(tmp_path / name)!r}" in err
    assert "internal error" not in err and not (tmp_path / "o.zarr").exists()


def test_cli_unreachable_scheduler_names_the_flag(tmp_path, capsys):
    """Nothing listening at --scheduler: the connection's timeout said neither which flag nor what to do."""
    dask = pytest.importorskip("dask")
    pytest.importorskip("distributed")
    source = _zarr_input(tmp_path, _volume((4, 16, 16)))
    with dask.config.set({"distributed.comm.timeouts.connect": "0.5s"}):
        assert main(["denoise", source, "--sigma", "10", "--out", str(tmp_path / "o.zarr"),
                     "--scheduler", "tcp://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "--scheduler 'tcp://127.0.0.1:1': no scheduler could be reached there" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]


@pytest.mark.parametrize("scheduler", ["notanaddress", "tcp://127.0.0.1:1"])
def test_cli_bad_scheduler_leaves_this_process_on_its_own_scheduler(tmp_path, capsys, scheduler):
    """The client that failed to start had made itself Dask's default: the caller's next compute (main() called
    from a notebook, the next test) asked for a distributed client that was gone ("no Client active")."""
    dask = pytest.importorskip("dask")
    pytest.importorskip("distributed")
    source = _zarr_input(tmp_path, _volume((4, 16, 16)))
    with dask.config.set({"distributed.comm.timeouts.connect": "0.5s"}):
        assert main(["denoise", source, "--sigma", "10", "--out", str(tmp_path / "o.zarr"),
                     "--scheduler", scheduler]) == 2
    capsys.readouterr()
    assert dask.config.get("scheduler", None) is None


def test_cli_never_replaces_a_folder_holding_the_input(tmp_path, capsys):
    """IMAGE inside --out: with --overwrite the old --out was removed after the run, and the input with it (the
    group's other arrays too). --out inside IMAGE wrote the result into the input store."""
    zarr = pytest.importorskip("zarr")
    volume = _volume((4, 16, 16))
    group = zarr.open_group(str(tmp_path / "data.zarr"), mode="w")
    group.create_array("raw", shape=volume.shape, dtype=volume.dtype)[...] = volume
    group.create_array("labels", shape=volume.shape, dtype=volume.dtype)[...] = 1
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert main(["denoise", str(tmp_path / "data.zarr" / "raw"), "--sigma", "10", "--out",
                 str(tmp_path / "data.zarr"), "--overwrite"]) == 2
    assert "holds IMAGE" in capsys.readouterr().err
    assert main(["denoise", str(tmp_path / "data.zarr" / "raw"), "--sigma", "10", "--out",
                 str(tmp_path / "data.zarr" / "raw" / "clean.zarr")]) == 2
    assert "lies inside IMAGE" in capsys.readouterr().err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "data.zarr"), path="raw", mode="r")[...], volume)


@pytest.mark.parametrize("name", ["in.npy", "in.h5", "in.hdf5"])
def test_an_array_file_without_chunks_points_to_the_chunked_route(tmp_path, capsys, name):
    """It said "not an image in a format the reader knows (PNG, JPEG, ...), or it is damaged"."""
    (tmp_path / name).write_bytes(b"\x93NUMPY not read")
    assert main(["denoise", str(tmp_path / name), "--sigma", "10", "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reads chunk by chunk into a Zarr store: add --chunks N" in err
