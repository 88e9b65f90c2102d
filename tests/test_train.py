"""The training loop: exact resume, atomic checkpoints, clear errors, metrics files (the CLI: tests/cli/test_train.py)."""

import json
import os

import numpy as np
import pytest

import nlref.backend as B
from nlref import train as T
from nlref.cli import main
from nlref.train import CheckpointError, TrainConfig, load_checkpoint, train
from tests.helpers import TINY, folder_bytes, tiny_run


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
    full = tiny_run(tmp_path / "full", optimizer=optimizer, lr=lr)
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
    first = tiny_run(tmp_path, epochs=1)
    again = train(TrainConfig(**{**TINY, "epochs": 1}), tmp_path, resume=True, progress=False, log=None)
    for key, value in first["model"].state_dict().items():
        np.testing.assert_array_equal(value, again["model"].state_dict()[key])


def test_resume_without_checkpoint_is_an_error_naming_the_folder(tmp_path):
    """Issue 18: it used to start from scratch without a word."""
    for folder in (tmp_path, tmp_path / "never-made"):
        with pytest.raises(CheckpointError, match=rf"nothing to resume in '{folder}': it holds no checkpoint.npz"):
            train(TrainConfig(**{**TINY, "epochs": 1}), folder, resume=True, progress=False, log=None)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    tiny_run(tmp_path, epochs=1)
    before = (tmp_path / "checkpoint.npz").read_bytes()
    with pytest.raises(CheckpointError, match=r"different configuration \(mode: checkpoint 'embedded_gaussian', "
                                              r"requested 'dot_product'\)"):
        train(TrainConfig(**{**TINY, "epochs": 1, "mode": "dot_product"}), tmp_path, resume=True,
              progress=False, log=None)
    assert (tmp_path / "checkpoint.npz").read_bytes() == before


def test_truncated_or_corrupted_checkpoints_are_refused(tmp_path):
    tiny_run(tmp_path, epochs=1)
    path = tmp_path / "checkpoint.npz"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated") as error:
        train(TrainConfig(**{**TINY, "epochs": 1}), tmp_path, resume=True, progress=False, log=None)
    assert "allow_pickle" not in str(error.value) and "start the run over" in str(error.value)
    # one flipped bit inside a stored array: zip's CRC or nlref's checksum catches it
    arrays = dict(np.load(_write(tmp_path / "ok.npz", good)))
    key = "model/fc.weight"
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] += 1.0
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match="checksum; it cannot be resumed: restore it from a copy"):
        load_checkpoint(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="corrupted or truncated") as error:
        load_checkpoint(tmp_path / "junk.npz")
    assert "allow_pickle" not in str(error.value)                  # NumPy's advice, which must not be passed on
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not an nlref checkpoint"):
        load_checkpoint(tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.npz")


def test_hand_made_checkpoints_are_refused_with_what_they_lack(tmp_path):
    """A hand-made .npz with nlref's format tag but not all of its metadata raised KeyError ('sha256'); an array
    key without its slots raised ValueError from an unpacking."""
    tiny_run(tmp_path, epochs=1)
    arrays = dict(np.load(tmp_path / "checkpoint.npz"))
    meta = json.loads(arrays["meta"].tobytes().decode())
    load_checkpoint(tmp_path / "checkpoint.npz")  # the file nlref wrote is read

    def saved(name, meta, **extra):
        np.savez(tmp_path / name, **{**arrays, **extra, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)})
        return tmp_path / name

    for key in ("sha256", "optim_steps", "config", "epoch", "history"):
        with pytest.raises(CheckpointError, match=f"is not one nlref wrote: its metadata lacks {key}; it cannot"):
            load_checkpoint(saved("lacks.npz", {k: v for k, v in meta.items() if k != key}))
    for stray in ("optim/m", "extra"):
        with pytest.raises(CheckpointError, match="neither model/NAME nor optim/SLOT/NAME"):
            load_checkpoint(saved("stray.npz", meta, **{stray: np.zeros(2)}))


def _write(path, data):
    path.write_bytes(data)
    return path


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(_Stop):
        train(TrainConfig(**{**TINY, "epochs": 2}), tmp_path, progress=False, log=None, callback=_stop_after(1))
    path = tmp_path / "checkpoint.npz"
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(T.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        train(TrainConfig(**{**TINY, "epochs": 2}), tmp_path, resume=True, progress=False, log=None)
    assert path.read_bytes() == before
    assert load_checkpoint(path)[0]["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz", "metrics.csv", "metrics.json"]


def test_unwritable_out_dir_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot be written"):
        train(TrainConfig(**TINY), blocker / "run", progress=False, log=None)


def test_metrics_files(tmp_path):
    result = tiny_run(tmp_path, epochs=2)
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



@pytest.mark.parametrize("args, kwargs, message", [
    (({"epochs": 1},), {}, "config must be a TrainConfig .* got dict"),
    (("c2d",), {}, "config must be a TrainConfig .* got str"),
    ((None,), dict(xp="numpy"), "xp must be an array library module .* got 'numpy'"),
    ((None,), dict(log="quiet"), "log must be a callable or None, got str"),
    ((None,), dict(callback=3), "callback must be a callable or None, got int"),
    ((None,), dict(resume="no"), "resume must be True or False, got 'no'"),
    ((None,), dict(overwrite=1), "overwrite must be True or False, got 1"),
])
def test_arguments_of_the_wrong_type_are_refused_before_any_work(tmp_path, args, kwargs, message):
    """train({...}) and train(xp="numpy") raised AttributeError from deep inside; a log or callback that cannot
    be called failed only after the first epoch had run and its checkpoint had been written."""
    with pytest.raises(TypeError, match=message):
        train(*args, tmp_path / "run", progress=False, **kwargs)
    assert not (tmp_path / "run").exists()


def test_a_data_set_larger_than_the_memory_is_refused_before_any_work(tmp_path, monkeypatch):
    """size=1000 asked for 160 GB of clips and the process was killed while making them."""
    config = TrainConfig(**{**TINY, "size": 1000})
    need = T.data_bytes(config)
    assert need == (config.n_train + config.n_val) * config.frames * 1000**2 * 4
    pairs = TrainConfig(**{**TINY, "task": "pairs2d", "size": 24})
    assert T.data_bytes(pairs) == (TINY["n_train"] + TINY["n_val"]) * 24**2 * 4
    monkeypatch.setattr(T, "_physical_memory", lambda: need - 1)
    with pytest.raises(ValueError, match=r"the data set alone would take .* GB .* lower size, n_train or n_val"):
        train(config, tmp_path / "new", progress=False, log=None)
    assert not (tmp_path / "new").exists()
    tiny_run(tmp_path / "old", epochs=1)
    before = folder_bytes(tmp_path / "old")
    with pytest.raises(ValueError, match="the data set alone"):  # --overwrite: the finished run is kept
        train(config, tmp_path / "old", overwrite=True, progress=False, log=None)
    assert folder_bytes(tmp_path / "old") == before
    monkeypatch.setattr(T, "_physical_memory", lambda: need)  # fits: not refused
    T.check_memory(config)
    monkeypatch.setattr(T, "_physical_memory", lambda: None)  # the system does not say: not refused
    T.check_memory(config)
    monkeypatch.undo()
    assert T._physical_memory() > 2**28  # this machine's, as the system says


def test_progress_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="progress must be True or False, got 'no'"):
        train(None, tmp_path / "run", progress="no", log=None)
    assert not (tmp_path / "run").exists()


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


# ---- issue 18: a run is never lost, by accident or by interruption ----


def test_overwrite_starts_over(tmp_path, capsys):
    tiny_run(tmp_path, epochs=2)
    again = train(TrainConfig(**{**TINY, "epochs": 1, "seed": 3}), tmp_path, overwrite=True, progress=False, log=None)
    meta = load_checkpoint(tmp_path / "checkpoint.npz")[0]
    assert meta["epoch"] == 1 and meta["config"]["seed"] == 3
    assert len(json.loads((tmp_path / "metrics.json").read_text())) == 1
    fresh = tiny_run(tmp_path / "fresh", epochs=1, seed=3)                    # the same run in an empty folder
    losses = [{k: row[k] for k in ("train_loss", "val_loss")} for row in again["history"]]
    assert losses == [{k: row[k] for k in ("train_loss", "val_loss")} for row in fresh["history"]]
    a, b = again["model"].state_dict(), fresh["model"].state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="pass one of them"):
        train(TrainConfig(**TINY), tmp_path, resume=True, overwrite=True, progress=False, log=None)
    with pytest.raises(SystemExit):                                 # argparse: not allowed together
        main(["train", "--resume", "--overwrite", "--out", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err


def test_metrics_catch_up_with_the_checkpoint_on_resume(tmp_path):
    """A run stopped between its checkpoint and its metrics (a power cut) gets them back on --resume."""
    tiny_run(tmp_path, epochs=2)
    full = (tmp_path / "metrics.json").read_text()
    (tmp_path / "metrics.json").write_text(json.dumps(json.loads(full)[:1]))
    (tmp_path / "metrics.csv").write_text("epoch\n1\n")
    train(TrainConfig(**{**TINY, "epochs": 2}), tmp_path, resume=True, progress=False, log=None)
    assert (tmp_path / "metrics.json").read_text() == full
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3


def test_signals_are_held_while_a_checkpoint_is_written():
    import signal

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with T._signals_held():
            signal.raise_signal(signal.SIGINT)
            reached.append("the rest of the block ran")
    assert reached == ["the rest of the block ran"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# every field TrainConfig.validate documents, with a value it must refuse (naming the field)
_BAD_FIELDS = [
    ("milestones", (0.5, 1.5)), ("milestones", (0.0,)), ("milestones", 0.5), ("milestones", (float("nan"),)),
    ("warmup", -1), ("warmup", 2.5), ("momentum", 1.0), ("momentum", -0.1), ("dropout", 1.0),
    ("dropout", -0.5), ("nonlocal_blocks", 99), ("nonlocal_blocks", 1.5), ("nonlocal_blocks", True),
    ("noise", 1.5), ("weight_decay", -1e-4), ("lr", float("inf")), ("lr", 0.0), ("seed", -1), ("seed", 1.0),
    ("sub_sample", "yes"), ("bn_layer", 1), ("scale", None), ("widths", (4, 6)), ("widths", (4, 0, 8)),
    ("blocks", (1, 2, 2.0)), ("kinds", 1), ("kinds", 9), ("channels", 2), ("frames", 7), ("frames", 4),
    ("size", 8), ("n_val", 0), ("extent", "everywhere"), ("pool", "middle"), ("relation", "colour"),
    ("dtype", "float16"), ("pool", "before"),   # with sub_sample=False below: a subsampling placed and turned off
]


@pytest.mark.parametrize("field, value", _BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in _BAD_FIELDS])
def test_validate_checks_every_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        TrainConfig(**{**TINY, field: value, **({"sub_sample": False} if field == "pool" else {})}).validate()


def test_validate_accepts_the_edges():
    TrainConfig(**{**TINY, "milestones": (), "warmup": 0, "momentum": 0.0, "dropout": 0.0, "noise": 0.0,
                       "nonlocal_blocks": 0, "sub_sample": False, "widths": [4, 6, 8], "seed": 0}).validate()
    TrainConfig(**{**TINY, "nonlocal_blocks": 4, "milestones": [0.5], "warmup": 3, "optimizer": "sgd",
                       "momentum": 0.99}).validate()


@pytest.mark.parametrize("field, value", [("milestones", (1.5,)), ("warmup", -1), ("momentum", 1.5),
                                          ("dropout", 1.0), ("nonlocal_blocks", 9)])
def test_overwrite_deletes_nothing_when_the_new_configuration_is_bad(tmp_path, field, value):
    tiny_run(tmp_path, epochs=1)
    before = folder_bytes(tmp_path)
    with pytest.raises(ValueError, match=field):
        train(TrainConfig(**{**TINY, "optimizer": "sgd", field: value}), tmp_path, overwrite=True,
              progress=False, log=None)
    assert folder_bytes(tmp_path) == before


def test_overwrite_keeps_the_old_run_until_the_new_one_writes(tmp_path, monkeypatch):
    tiny_run(tmp_path, epochs=1)
    before = folder_bytes(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("stopped inside the first epoch")

    monkeypatch.setattr(T.F, "softmax_cross_entropy_forward", broken)
    with pytest.raises(RuntimeError, match="first epoch"):
        train(TrainConfig(**{**TINY, "seed": 5}), tmp_path, overwrite=True, progress=False, log=None)
    assert folder_bytes(tmp_path) == before                         # the old run, untouched and consistent
    monkeypatch.undo()
    train(TrainConfig(**{**TINY, "epochs": 1, "seed": 5}), tmp_path, overwrite=True, progress=False, log=None)
    assert load_checkpoint(tmp_path / "checkpoint.npz")[0]["config"]["seed"] == 5
    assert folder_bytes(tmp_path) != before


# ---- issue 30: the 2-D task (two shapes far apart, same kind?) ----

PAIRS = dict(TINY, task="pairs2d", size=16, margin=3, kinds=2, nonlocal_blocks=1, blocks=(1, 2, 2))


def test_pairs2d_trains_the_image_network_and_resumes_bit_identically(tmp_path):
    full = train(TrainConfig(**PAIRS), tmp_path / "full", progress=False, log=None)
    assert type(full["model"]).__name__ == "ImageResNet" and full["model"].slots == [("res2", 0)]
    assert full["model"].local_receptive_field == 7 and "res2.nl0.theta.weight" in full["model"].params
    with pytest.raises(_Stop):
        train(TrainConfig(**PAIRS), tmp_path / "cut", progress=False, log=None, callback=_stop_after(1))
    resumed = train(TrainConfig(**PAIRS), tmp_path / "cut", resume=True, progress=False, log=None)
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    fresh = T.build_model(TrainConfig(**PAIRS)).state_dict()
    assert any(not np.array_equal(a[k], fresh[k]) for k in a)
    # the checkpoint records the task: resuming it as the sprite task is refused
    with pytest.raises(CheckpointError, match="task: checkpoint 'pairs2d', requested 'sprites'"):
        train(TrainConfig(**{**PAIRS, "task": "sprites"}), tmp_path / "cut", resume=True, progress=False, log=None)


def test_pairs2d_data_are_the_pair_images():
    train_set, val_set = T.build_data(TrainConfig(**PAIRS))
    assert train_set.image.shape == (48, 1, 16, 16) and len(val_set) == 24
    # each shape at least `margin` pixels from the centre lines
    origin = train_set.meta["origin"]
    assert np.all((origin + 5 <= 8 - 3) | (origin >= 8 + 3))


@pytest.mark.parametrize("change, match", [
    ({"task": "images"}, r"task must be one of \('sprites', 'pairs2d'\) \(--task\)"),
    ({"model": "i3d"}, r"model must be one of \('c2d',\) with task='pairs2d' \(--model, --task\)"),
    ({"model": "transformer"}, r"model must be one of \('c2d',\)"),
    ({"margin": -1}, "margin must be an integer >= 0"),
    ({"margin": 4}, r"size \(--size\) // 2 must be at least 5 \+ margin \(--margin\) = 9"),
    ({"margin": 2}, r"margin \(--margin\) 2 is too small.*receptive field \(7 pixels.*2 \* margin \+ 1 = 5"),
    ({"margin": 3, "size": 24, "blocks": (2, 2, 2)}, r"receptive field \(11 pixels.*at least 5"),
    ({"nonlocal_blocks": 2}, r"nonlocal_blocks \(--nonlocal\) must be at most blocks\[0\] = 1"),
])
def test_pairs2d_configuration_errors_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**PAIRS, **change}).validate()


def test_image_receptive_field_is_the_network_s():
    for blocks in (1, 2, 3):
        assert T.image_receptive_field(blocks) == 3 + 4 * blocks
        config = TrainConfig(**{**PAIRS, "blocks": (blocks, 2, 2), "nonlocal_blocks": 0})
        assert T.image_receptive_field(blocks) == T.build_model(config).local_receptive_field




# ---- probe of training, resume and the command line (December 2026) ----

def test_numpy_scalars_in_the_configuration_are_saved_and_resumed(tmp_path):
    """validate() takes np.int64 and np.float32 fields, but the checkpoint's JSON did not: the run raised
    TypeError ('Object of type int64 is not JSON serializable') after its first epoch, and saved nothing."""
    config = TrainConfig(**{**TINY, "epochs": 1, "seed": np.int64(2), "widths": (np.int64(4), 6, 8),
                            "lr": np.float32(1e-3)})
    first = train(config, tmp_path, progress=False, log=None)
    saved = load_checkpoint(tmp_path / "checkpoint.npz")[0]["config"]
    assert saved["seed"] == 2 and type(saved["seed"]) is int and saved["widths"] == [4, 6, 8]
    assert saved["lr"] == float(np.float32(1e-3))
    again = train(config, tmp_path, resume=True, progress=False, log=None)
    for key, value in first["model"].state_dict().items():
        np.testing.assert_array_equal(value, again["model"].state_dict()[key])


def test_checkpoints_of_another_version_are_named(tmp_path):
    """A checkpoint written by another nlref: a newer format tag was called "no nlref metadata", and a configuration
    field this nlref does not know, or an epoch that is not an int, reached the user as an internal error."""
    tiny_run(tmp_path, epochs=1)
    arrays = dict(np.load(tmp_path / "checkpoint.npz"))
    meta = json.loads(arrays["meta"].tobytes().decode())

    def saved(**changes):
        changed = {**meta, **changes}
        np.savez(tmp_path / "other.npz", **{**arrays, "meta": np.frombuffer(json.dumps(changed).encode(), np.uint8)})
        return tmp_path / "other.npz"

    with pytest.raises(CheckpointError, match=r"written by another version of nlref in the format "
                                              r"'nlref-checkpoint-2'; this nlref \(.*\) reads 'nlref-checkpoint-1'"):
        load_checkpoint(saved(format="nlref-checkpoint-2"))
    with pytest.raises(CheckpointError, match=r"fields this nlref does not know \(new_field\)"):
        load_checkpoint(saved(config={**meta["config"], "new_field": 3}))
    with pytest.raises(CheckpointError, match="is a list, not a mapping"):
        load_checkpoint(saved(config=[1, 2]))
    for change in ({"epoch": "1"}, {"optim_steps": -1}, {"epoch": True}):
        with pytest.raises(CheckpointError, match="must be integers >= 0"):
            load_checkpoint(saved(**change))
    with pytest.raises(CheckpointError, match=r"one row per epoch done \(1\), got \[\]"):
        load_checkpoint(saved(history=[]))
    with pytest.raises(CheckpointError, match="not an nlref checkpoint"):
        load_checkpoint(saved(format="something-else"))


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    """Two runs into one out_dir (two terminals, the same --out) replaced each other's checkpoint and metrics every
    epoch, and both ended without a word: one run was lost. The folder is locked while a run writes there."""
    refused = []

    def second_run(epoch, row, model):
        if epoch == 1:
            with pytest.raises(T.OutDirError, match=r"is in use: another training run is writing there now"):
                train(TrainConfig(**{**TINY, "epochs": 1, "seed": 9}), tmp_path, overwrite=True, progress=False,
                      log=None)
            refused.append(epoch)

    first = train(TrainConfig(**{**TINY, "epochs": 2}), tmp_path, progress=False, log=None, callback=second_run)
    assert refused == [1]
    meta = load_checkpoint(tmp_path / "checkpoint.npz")[0]
    assert meta["config"]["seed"] == 0 and meta["history"] == first["history"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == first["history"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz", "metrics.csv", "metrics.json"]
    # the lock ends with the run: the folder takes the next one
    train(TrainConfig(**{**TINY, "epochs": 2}), tmp_path, resume=True, progress=False, log=None)


@pytest.mark.parametrize("changes", [dict(mode="dot_product"), dict(mode="concatenation", nonlocal_blocks=2),
                                     dict(task="pairs2d", size=24, kinds=4, mode="dot_product")])
def test_scale_with_a_mode_without_softmax_is_refused_by_validate(changes):
    """scale=True with the dot-product or concatenation mode passed validate and failed when the network was
    built, which ``nlref train`` reported as an internal error of nlref."""
    config = TrainConfig(**{**TINY, "scale": True, **changes})
    with pytest.raises(ValueError, match=r"^scale applies to the softmax modes .* not mode '(dot_product|concat)"):
        config.validate()


@pytest.mark.parametrize("changes", [dict(mode="dot_product", nonlocal_blocks=0),
                                     dict(mode="concatenation", model="transformer"),
                                     dict(mode="gaussian"), dict(mode="embedded_gaussian")])
def test_scale_is_accepted_where_it_builds(changes):
    """Where no block is built (no block, or the transformer) scale has nothing to refuse, and the softmax modes take it."""
    T.build_model(TrainConfig(**{**TINY, "scale": True, **changes}).validate())


def test_the_returned_model_is_in_eval_mode_also_when_a_finished_run_is_resumed(tmp_path):
    """Resuming a finished run returned its network in training mode (batch statistics, dropout on), so it
    predicted other logits on the same clips than the network the run itself returned."""
    first = tiny_run(tmp_path, epochs=1)
    again = train(TrainConfig(**{**TINY, "epochs": 1}), tmp_path, resume=True, progress=False, log=None)
    assert not first["model"].training and not again["model"].training
    clips = T.build_data(first["config"])[1].video[:8]
    np.testing.assert_array_equal(again["model"].forward(clips), first["model"].forward(clips))
    assert again["config"] == first["config"] and again["history"] == first["history"]


def test_evaluate_refuses_what_it_cannot_measure():
    """evaluate(batch_size=-1) returned a loss and an accuracy of 0.0 without looking at a clip; batch_size=0,
    an empty split and a tuple failed with messages about range(), a division by zero and a missing attribute."""
    from nlref.data.sprites import SpriteClips

    config = TrainConfig(**TINY)
    net, val = T.build_model(config), T.build_data(config)[1]
    for bad in (-1, 0, 2.5, True, None):
        with pytest.raises(ValueError, match=rf"^batch_size must be an integer >= 1, got {bad!r}$"):
            T.evaluate(net, val, batch_size=bad)
    with pytest.raises(TypeError, match=r"^clips must be a SpriteClips or PairImages .* got tuple$"):
        T.evaluate(net, (val.video, val.labels))
    for video, labels, counts in ((val.video[:0], val.labels[:0], "0 examples and 0 labels"),
                                  (val.video, val.labels[:5], f"{len(val)} examples and 5 labels")):
        with pytest.raises(ValueError, match=f"^clips must hold at least one example .* got {counts}$"):
            T.evaluate(net, SpriteClips(video, labels))
    whole = T.evaluate(net, val)
    assert T.evaluate(net, val, batch_size=np.int64(7)) == pytest.approx(whole, rel=1e-6)
    assert T.evaluate(net, SpriteClips(val.video, val.labels), batch_size=1) == pytest.approx(whole, rel=1e-6)


def test_the_documented_way_to_use_a_trained_network(tmp_path, monkeypatch):
    """docs/training.md's "Using the trained network" snippet, run on a tiny run: it gives the last epoch's
    validation loss and accuracy and the logits of the network train() returned."""
    import contextlib
    import io
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    code = re.search(r"\*\*Using the trained network\.\*\*.*?```python\n(.*?)```", page, re.S).group(1)
    result = tiny_run(tmp_path / "run1", epochs=2)
    monkeypatch.chdir(tmp_path)
    scope, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, scope)
    last = result["history"][-1]
    assert printed.getvalue().strip() == str((last["val_loss"], last["val_accuracy"]))
    np.testing.assert_array_equal(scope["logits"], result["model"].forward(scope["val"].video[:4]))
    assert not scope["net"].training


# --------------------------------------------------------------------------- extending a run (resume with more epochs)
def _same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _weights(path):
    meta, state, _ = load_checkpoint(path)
    model = T.build_model(TrainConfig.from_dict(meta["config"]))
    model.load_state_dict(state)
    return model


def test_extending_a_finished_run_equals_the_run_on_its_schedule_and_keeps_the_finished_one(tmp_path):
    """`--resume --epochs N+k` was refused (epochs differed from the checkpoint's). It extends the run now: the
    schedule stays that of N epochs, so the result equals, to the bit, the uninterrupted run of N+k epochs with
    schedule_epochs=N (and not the run of N+k epochs, whose milestones fall later); the N-epoch checkpoint is kept."""
    tiny_run(tmp_path / "ext", epochs=1)
    finished = (tmp_path / "ext" / "checkpoint.npz").read_bytes()
    extended = train(TrainConfig(**{**TINY, "epochs": 3}), tmp_path / "ext", resume=True, progress=False, log=None)
    straight = tiny_run(tmp_path / "straight", epochs=3, schedule_epochs=1)
    assert _same_weights(extended["model"], straight["model"])
    assert _same_weights(_weights(tmp_path / "ext" / "checkpoint.npz"), straight["model"])
    assert not _same_weights(extended["model"], tiny_run(None, epochs=3)["model"])  # the schedule matters here
    assert extended["config"].schedule_epochs == 1 and extended["config"].epochs == 3
    # the learning rates of the epochs: 1 epoch of 3 steps has its milestones at steps 1 and 2 (0.6 x 3, 0.85 x 3)
    assert [row["lr"] for row in extended["history"]] == [1e-3, 1e-5, 1e-5]
    assert json.loads((tmp_path / "ext" / "metrics.json").read_text()) == extended["history"]
    assert (tmp_path / "ext" / "checkpoint-epoch1.npz").read_bytes() == finished
    assert sorted(p.name for p in (tmp_path / "ext").iterdir()) == [
        "checkpoint-epoch1.npz", "checkpoint.npz", "metrics.csv", "metrics.json"]
    # the extended run resumes as itself, without restating its schedule
    again = train(TrainConfig(**{**TINY, "epochs": 3}), tmp_path / "ext", resume=True, progress=False, log=None)
    assert _same_weights(again["model"], straight["model"])


def test_extending_an_interrupted_run_keeps_its_schedule(tmp_path):
    with pytest.raises(_Stop):
        train(TrainConfig(**TINY), tmp_path, progress=False, log=None, callback=_stop_after(1))
    lines = []
    extended = train(TrainConfig(**{**TINY, "epochs": 4}), tmp_path, resume=True, progress=False, log=lines.append)
    assert _same_weights(extended["model"], tiny_run(None, epochs=4, schedule_epochs=TINY["epochs"])["model"])
    assert "the learning-rate schedule stays that of 3 epochs" in lines[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz", "metrics.csv", "metrics.json"]


@pytest.mark.parametrize("changes, match", [
    ({"epochs": 1}, r"holds 2 epochs already, more than epochs=1 \(--epochs\): give epochs >= 2"),
    ({"epochs": 4, "schedule_epochs": 4}, r"its 2 epochs followed the learning-rate schedule of 2 epochs, and a "
                                          r"resumed run keeps it: leave schedule_epochs \(--schedule-epochs\) out"),
    ({"epochs": 4, "lr": 2e-3}, r"different configuration \(lr: checkpoint 0.001, requested 0.002\); resume with "
                                r"the options the run was started with \(only epochs may change\)"),
])
def test_resume_refuses_what_would_not_continue_the_run(tmp_path, changes, match):
    tiny_run(tmp_path, epochs=2)
    before = folder_bytes(tmp_path)
    with pytest.raises(CheckpointError, match=match):
        train(TrainConfig(**{**TINY, **changes}), tmp_path, resume=True, progress=False, log=None)
    assert folder_bytes(tmp_path) == before


def test_a_schedule_restated_on_resume_is_accepted(tmp_path):
    tiny_run(tmp_path, epochs=1)
    a = train(TrainConfig(**{**TINY, "epochs": 2, "schedule_epochs": 1}), tmp_path, resume=True, progress=False,
              log=None)
    assert _same_weights(a["model"], tiny_run(None, epochs=2, schedule_epochs=1)["model"])


def test_a_kept_checkpoint_of_other_bytes_is_never_replaced(tmp_path):
    tiny_run(tmp_path, epochs=1)
    (tmp_path / "checkpoint-epoch1.npz").write_bytes(b"the user's")
    before = folder_bytes(tmp_path)
    with pytest.raises(T.OutDirError, match="checkpoint-epoch1.npz' exists and is not the checkpoint of this finished"):
        train(TrainConfig(**{**TINY, "epochs": 2}), tmp_path, resume=True, progress=False, log=None)
    assert folder_bytes(tmp_path) == before


def test_schedule_epochs_is_saved_only_where_it_is_set(tmp_path):
    """A checkpoint of a run on its own schedule holds no schedule_epochs, so that nlref before the field (which
    refuses fields it does not know) still resumes it; an extended run's holds it, and that nlref refuses it."""
    tiny_run(tmp_path, epochs=1)
    assert "schedule_epochs" not in load_checkpoint(tmp_path / "checkpoint.npz")[0]["config"]
    train(TrainConfig(**{**TINY, "epochs": 2}), tmp_path, resume=True, progress=False, log=None)
    assert load_checkpoint(tmp_path / "checkpoint.npz")[0]["config"]["schedule_epochs"] == 1


def test_a_checkpoint_written_before_schedule_epochs_existed_resumes_and_extends(tmp_path):
    """Checkpoints of nlref before this field hold no schedule_epochs: their schedule is their epochs."""
    tiny_run(tmp_path, epochs=1)
    path = tmp_path / "checkpoint.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(arrays["meta"].tobytes())
    meta["config"].pop("schedule_epochs", None)
    assert set(meta["config"]) == set(json.loads(json.dumps(TrainConfig().as_dict()))) - {"schedule_epochs"}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    extended = train(TrainConfig(**{**TINY, "epochs": 2}), tmp_path, resume=True, progress=False, log=None)
    assert _same_weights(extended["model"], tiny_run(None, epochs=2, schedule_epochs=1)["model"])


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2", float("nan")])
def test_schedule_epochs_is_none_or_a_positive_integer(value):
    with pytest.raises(ValueError, match=r"schedule_epochs must be a positive integer \(or None: that of epochs\)"):
        TrainConfig(**{**TINY, "schedule_epochs": value}).validate()


def test_the_thread_count_does_not_change_a_bit_of_training(tmp_path):
    """docs/training.md: on one machine and installation, 1 and 2 threads (BLAS, OpenMP, Numba) train the same
    weights. Each run is a fresh process, since the thread counts are read when the libraries load."""
    import subprocess
    import sys

    code = ("import sys; from nlref.train import TrainConfig, train; from tests.helpers import TINY; "
            "train(TrainConfig(**{**TINY, 'epochs': 2}), sys.argv[1], progress=False, log=None)")
    for threads in (1, 2):
        env = {**os.environ, **{name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                                "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / str(threads))], env=env,
                              capture_output=True, text=True, timeout=300, cwd=root)
        assert done.returncode == 0, done.stderr
    one, two = (load_checkpoint(tmp_path / str(t) / "checkpoint.npz")[1] for t in (1, 2))
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)


@pytest.mark.parametrize("out_dir, error, message", [
    ("", ValueError, r"out_dir must name a folder for the run \(or be None: nothing written\), got ''"),
    (5, TypeError, "out_dir must be a folder's path \\(a str or Path\\) or None, got int"),
    (b"run", TypeError, "out_dir must be a folder's path .* got bytes"),
])
def test_an_out_dir_that_names_no_folder_is_refused(tmp_path, monkeypatch, out_dir, error, message):
    """train(config, "") wrote the run into the current folder (Path("") is "."), where --out '' is refused."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        train(TrainConfig(**{**TINY, "epochs": 1}), out_dir, progress=False, log=None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("d", [5, None, [("epochs", 3)]])
def test_from_dict_refuses_what_is_no_mapping(d):
    """It failed with "'int' object is not iterable", or called a list of pairs "unknown configuration keys"."""
    with pytest.raises(TypeError, match="d must be a mapping of TrainConfig's field names to values"):
        TrainConfig.from_dict(d)
