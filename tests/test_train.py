"""The training loop: exact resume, atomic checkpoints, clear errors, metrics files, the CLI."""

import json
import os

import numpy as np
import pytest

import nlref.backend as B
from nlref import train as T
from nlref.cli import main
from nlref.train import CheckpointError, TrainConfig, load_checkpoint, train

TINY = dict(n_train=48, n_val=24, batch_size=16, widths=(4, 6, 8), size=16, epochs=3)


def _run(out, **kw):
    return train(TrainConfig(**{**TINY, **kw}), out, progress=False, log=None)


class _Stop(Exception):
    pass


def _stop_after(n):
    def callback(epoch, row, model):
        if epoch == n:
            raise _Stop
    return callback


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_gives_bit_identical_weights(tmp_path, optimizer):
    lr = 0.05 if optimizer == "sgd" else 1e-3
    full = _run(tmp_path / "full", optimizer=optimizer, lr=lr)
    with pytest.raises(_Stop):
        train(TrainConfig(**TINY, optimizer=optimizer, lr=lr), tmp_path / "cut", progress=False, log=None,
              callback=_stop_after(1))
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.npz")[0]["epoch"] == 1
    resumed = train(TrainConfig(**TINY, optimizer=optimizer, lr=lr), tmp_path / "cut", resume=True,
                    progress=False, log=None)
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # the weights moved, so equality is not trivial
    fresh = T.build_model(TrainConfig(**TINY, optimizer=optimizer, lr=lr)).state_dict()
    assert any(not np.array_equal(a[k], fresh[k]) for k in a)
    for ra, rb in zip(full["history"], resumed["history"]):
        assert ra["val_loss"] == rb["val_loss"] and ra["train_loss"] == rb["train_loss"]
    assert len(json.loads((tmp_path / "cut" / "metrics.json").read_text())) == TINY["epochs"]


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    first = _run(tmp_path, epochs=1)
    again = train(TrainConfig(**{**TINY, "epochs": 1}), tmp_path, resume=True, progress=False, log=None)
    for key, value in first["model"].state_dict().items():
        np.testing.assert_array_equal(value, again["model"].state_dict()[key])


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    result = train(TrainConfig(**{**TINY, "epochs": 1}), tmp_path, resume=True, progress=False, log=None)
    assert len(result["history"]) == 1


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    _run(tmp_path, epochs=1)
    before = (tmp_path / "checkpoint.npz").read_bytes()
    with pytest.raises(CheckpointError, match=r"different configuration \(mode: checkpoint 'embedded_gaussian', "
                                              r"requested 'dot_product'\)"):
        train(TrainConfig(**{**TINY, "epochs": 1, "mode": "dot_product"}), tmp_path, resume=True,
              progress=False, log=None)
    assert (tmp_path / "checkpoint.npz").read_bytes() == before


def test_truncated_or_corrupted_checkpoints_are_refused(tmp_path):
    _run(tmp_path, epochs=1)
    path = tmp_path / "checkpoint.npz"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        train(TrainConfig(**{**TINY, "epochs": 1}), tmp_path, resume=True, progress=False, log=None)
    # one flipped bit inside a stored array: zip's CRC or nlref's checksum catches it
    arrays = dict(np.load(_write(tmp_path / "ok.npz", good)))
    key = "model/fc.weight"
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] += 1.0
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not an nlref checkpoint"):
        load_checkpoint(tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.npz")


def _write(path, data):
    path.write_bytes(data)
    return path


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _run(tmp_path, epochs=1)
    path = tmp_path / "checkpoint.npz"
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(T.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        train(TrainConfig(**{**TINY, "epochs": 2}), tmp_path, progress=False, log=None)
    assert path.read_bytes() == before
    assert load_checkpoint(path)[0]["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz", "metrics.csv", "metrics.json"]


def test_unwritable_out_dir_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot be written"):
        train(TrainConfig(**TINY), blocker / "run", progress=False, log=None)


def test_metrics_files(tmp_path):
    result = _run(tmp_path, epochs=2)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    csv_lines = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert csv_lines[0].split(",") == list(rows[0])
    assert len(csv_lines) == 3
    assert rows == result["history"]
    for r in rows:
        assert 0 <= r["val_accuracy"] <= 1 and r["clips_per_second"] > 0
    assert oct(os.stat(tmp_path / "checkpoint.npz").st_mode & 0o777) != oct(0o600)


@pytest.mark.parametrize("field, value, match", [
    ("model", "r50", "model must be one of"),
    ("mode", "cosine", "mode must be one of"),
    ("stage", "res9", "stage must be one of"),
    ("optimizer", "rmsprop", "optimizer must be one of"),
    ("epochs", 0, "epochs must be a positive integer"),
    ("batch_size", 1000, "batch_size"),
    ("lr", -1.0, "lr must be"),
    ("nonlocal_blocks", -1, "nonlocal_blocks"),
])
def test_bad_configuration(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(**{**TINY, field: value}), tmp_path, progress=False, log=None)
    assert not (tmp_path / "checkpoint.npz").exists()


def test_resume_needs_out_dir():
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        train(TrainConfig(**TINY), None, resume=True, progress=False, log=None)


def test_training_fits_a_small_set():
    """The whole loop learns: an NL net overfits 48 clips (train loss falls far below log 2)."""
    result = train(TrainConfig(**{**TINY, "epochs": 20, "lr": 3e-3, "dropout": 0.0, "widths": (8, 8, 8)}), None,
                   progress=False, log=None)
    losses = [r["train_loss"] for r in result["history"]]
    assert losses[-1] < 0.5 * losses[0]


def test_training_on_array_api_strict_matches_numpy():
    import array_api_strict as strict

    config = TrainConfig(**{**TINY, "epochs": 1, "n_train": 32, "n_val": 16, "dtype": "float64"})
    a = train(config, None, progress=False, log=None)
    b = train(config, None, xp=strict, progress=False, log=None)
    assert type(b["model"].params["fc.weight"]) is not np.ndarray
    for key, value in a["model"].state_dict().items():
        np.testing.assert_allclose(B.to_numpy(b["model"].state_dict()[key]), value, rtol=1e-9, atol=1e-12,
                                   err_msg=key)


def test_cli_train(tmp_path, capsys):
    args = ["train", "--epochs", "1", "--n-train", "32", "--n-val", "16", "--batch-size", "16",
            "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "val accuracy" in out and (tmp_path / "checkpoint.npz").exists()
    assert main(args + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(args + ["--resume", "--mode", "gaussian"]) == 2
    assert "different configuration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model", "resnet"])
