"""The chunked routes as deployed: a scheduler and a worker started as their own processes, in another folder.

``dask scheduler`` and ``dask worker`` run as separate processes, the worker
in a folder of its own (as on another machine); the ``nlref denoise`` command
runs in the client's folder with relative paths, and the result, read back,
must equal the in-memory call bit for bit. Ctrl-C (SIGINT) on a threaded and
on a distributed run must leave nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

import nlref  # noqa: E402
from nlref.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KWARGS = dict(sigma=10.0, patch_size=3, search_size=5)
FLAGS = ["--sigma", "10", "--patch-size", "3", "--search-size", "5", "--chunks", "6,20,18", "--no-progress"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _dask_command(*args):
    script = Path(sys.executable).with_name("dask")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "dask", *args]


def _stop(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """The address of a scheduler with one single-threaded worker, each its own process, each in its own folder."""
    home = tmp_path_factory.mktemp("scheduler")
    elsewhere = tmp_path_factory.mktemp("worker")
    file = home / "scheduler.json"
    processes = []
    try:
        processes.append(subprocess.Popen(
            _dask_command("scheduler", "--port", "0", "--no-dashboard", "--scheduler-file", str(file)),
            cwd=home, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        end = time.monotonic() + 60
        while not file.exists() or not file.read_text().strip():
            if time.monotonic() > end or processes[0].poll() is not None:
                pytest.fail("dask scheduler did not start")
            time.sleep(0.1)
        processes.append(subprocess.Popen(
            _dask_command("worker", "--scheduler-file", str(file), "--nworkers", "1", "--nthreads", "1",
                          "--no-dashboard", "--local-directory", str(elsewhere)),
            cwd=elsewhere, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = json.loads(file.read_text())["address"]
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
            assert client.run(os.getcwd) == {w: str(elsewhere) for w in client.scheduler_info()["workers"]}
        yield address
    finally:
        for process in reversed(processes):
            _stop(process)


def _volume(shape=(12, 40, 36), seed=3):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    clean = 100 + 60 * np.sin(4 * x + 3 * y) * np.cos(2 * z)
    return np.clip(np.round(clean + 10 * rng.standard_normal(shape)), 0, 255).astype(np.uint8)


def _write(kind, volume, name):
    """``volume`` written as ``name`` in the current folder (relative path), in the format ``kind``."""
    if kind == "zarr":
        zarr.create_array(name, shape=volume.shape, chunks=(6, 20, 18), dtype=volume.dtype)[...] = volume
    elif kind == "tiff":
        tifffile = pytest.importorskip("tifffile")
        tifffile.imwrite(name, volume, tile=(16, 16))
    elif kind == "hdf5":
        h5py = pytest.importorskip("h5py")
        with h5py.File(name, "w") as f:
            f.create_dataset("volume", data=volume, chunks=(6, 20, 18))
    else:
        np.save(name, volume)


SOURCES = [("zarr", "in.zarr"), ("tiff", "in.tif"), ("hdf5", "in.h5"), ("memmap", "in.npy")]


@pytest.mark.parametrize("kind,name", SOURCES)
def test_cli_relative_paths_on_a_cluster_equal_in_memory(scheduler, tmp_path, monkeypatch, capsys, kind, name):
    """Relative paths, a worker in another folder: the stored result equals nl_means bit for bit (not fill values)."""
    monkeypatch.chdir(tmp_path)
    volume = _volume()
    _write(kind, volume, name)
    assert main(["denoise", name, "--out", "out.zarr", "--scheduler", scheduler, *FLAGS]) == 0, capsys.readouterr()
    result = zarr.open_array("out.zarr", mode="r")[...]
    expected = nlref.nl_means(volume, workers=1, **KWARGS)
    assert np.abs(expected.astype(int) - volume).max() > 0  # the check could fail: denoising changed the volume
    np.testing.assert_array_equal(result, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "out.zarr"])


def test_cli_estimated_noise_on_a_cluster(scheduler, tmp_path, monkeypatch, capsys):
    """The exact median's passes run on the cluster too: the same estimate and result as in memory."""
    monkeypatch.chdir(tmp_path)
    volume = _volume(seed=4)
    _write("zarr", volume, "in.zarr")
    assert main(["denoise", "in.zarr", "--out", "out.zarr", "--scheduler", scheduler, "--no-progress"]) == 0
    out = capsys.readouterr().out
    params = nlref.resolve_parameters(volume)
    assert f"sigma {params['sigma']:.3g} (estimated)" in out
    np.testing.assert_array_equal(zarr.open_array("out.zarr", mode="r")[...], nlref.nl_means(volume, workers=1))


def test_store_route_with_h5py_dataset_on_a_worker(scheduler, tmp_path, monkeypatch):
    """An open h5py.Dataset given to nl_means_store runs on a worker process (its opener travels, not the file)."""
    h5py = pytest.importorskip("h5py")
    monkeypatch.chdir(tmp_path)
    volume = _volume(seed=5).astype(np.float32) / 255
    with h5py.File("in.h5", "w") as f:
        f.create_dataset("a/volume", data=volume)
    with h5py.File("in.h5", "r") as f, distributed.Client(scheduler) as client:
        lazy = nlref.nl_means_store(f["a/volume"], chunks=(6, 20, 18), sigma=0.04, patch_size=3, search_size=5)
        result = client.compute(lazy).result()
    np.testing.assert_array_equal(result, nlref.nl_means(volume, workers=1, sigma=0.04, patch_size=3,
                                                         search_size=5))


def test_store_route_reads_what_a_file_open_for_writing_holds(tmp_path, monkeypatch):
    """A dataset written in a file still open for writing: the worker process opens the file by name, and what HDF5
    held in this process's cache was not in it. With file locking off (HDF5_USE_FILE_LOCKING=FALSE, common on
    cluster file systems) the worker read the zeros written first and the run denoised them, without an error."""
    h5py = pytest.importorskip("h5py")
    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "FALSE")  # before the worker starts: it inherits the setting
    monkeypatch.chdir(tmp_path)
    volume = _volume(seed=6).astype(np.float32) / 255
    options = dict(sigma=0.04, patch_size=3, search_size=5)
    with h5py.File("in.h5", "w") as f, distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                                                dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        dataset = f.create_dataset("volume", data=np.zeros_like(volume), chunks=(6, 20, 18))
        f.flush()
        dataset[...] = volume  # after the last flush: in this process's HDF5 cache
        lazy = nlref.nl_means_store(dataset, chunks=(6, 20, 18), **options)
        result = client.compute(lazy).result()
    np.testing.assert_array_equal(result, nlref.nl_means(volume, workers=1, **options))


def test_cluster_example_streams_into_a_store(scheduler, tmp_path, monkeypatch, capsys):
    """examples/dask_cluster.py on the cluster: the result goes into --out (relative), equal to nl_means in memory."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dask_cluster", ROOT / "examples" / "dask_cluster.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)
    example.main(["--scheduler", scheduler, "--shape", "8,40,36", "--chunks", "8,20,18", "--out", "den.zarr"])
    assert "PSNR" in capsys.readouterr().out
    _, noisy = example.synthetic((8, 40, 36), (8, 20, 18), 0.1)
    expected = nlref.nl_means(noisy.compute(scheduler="sync"), sigma=0.1, patch_size=3, search_size=5, workers=1)
    np.testing.assert_array_equal(zarr.open_array("den.zarr", mode="r")[...], expected)
    with pytest.raises(SystemExit):  # an existing --out is refused, not overwritten
        example.main(["--scheduler", scheduler, "--out", "den.zarr"])


def _interrupt(tmp_path, extra):
    """Run the command in a process of its own, send SIGINT once it has written a chunk; its status and stderr."""
    volume = _volume((24, 64, 64), seed=6)
    zarr.create_array(str(tmp_path / "in.zarr"), shape=volume.shape, chunks=(6, 16, 16), dtype="u1")[...] = volume
    command = [sys.executable, "-c", "import sys; from nlref.cli import main; sys.exit(main())", "denoise", "in.zarr",
               "--out", "out.zarr", "--sigma", "10", "--patch-size", "5", "--search-size", "15", "--no-progress",
               *extra]
    process = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        end = time.monotonic() + 90
        while not any(p.name != "zarr.json" for partial in tmp_path.glob(".out.zarr.partial-*")
                      for p in partial.rglob("*") if p.is_file()):
            if time.monotonic() > end or process.poll() is not None:
                status = process.poll()
                pytest.fail(f"the run wrote no chunk: {status} {process.stderr.read() if status is not None else ''}")
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=90)
    finally:
        _stop(process)
    return process.returncode, err


@pytest.mark.parametrize("where", ["threads", "cluster"])
def test_ctrl_c_leaves_nothing_behind(scheduler, tmp_path, where):
    """SIGINT while chunks are being written: exit 130, no --out and no hidden partial store, also after a while."""
    rc, err = _interrupt(tmp_path, ["--scheduler", scheduler] if where == "cluster" else [])
    assert rc == 130, err
    assert "stopped by SIGINT; nothing was written" in err
    time.sleep(1.0)  # a task that was still running would have written by now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]
