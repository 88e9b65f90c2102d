"""``nlref train`` as users run it: runs, resumes, refusals, one-line errors, signals, the printed resume command."""

import json

import numpy as np
import pytest

from nlref import train as T
from nlref.cli import main
from nlref.train import TrainConfig, load_checkpoint, train
from tests.helpers import folder_bytes, tiny_run


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


def test_a_finished_run_is_never_overwritten_by_accident(tmp_path, capsys):
    tiny_run(tmp_path, epochs=1)
    before = folder_bytes(tmp_path)
    with pytest.raises(ValueError, match=r"already holds a training run \(checkpoint.npz, metrics.json, metrics.csv\)"):
        tiny_run(tmp_path, epochs=1, seed=1)
    assert folder_bytes(tmp_path) == before
    args = ["train", "--epochs", "1", "--n-train", "32", "--n-val", "16", "--batch-size", "16", "--seed", "1",
            "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"nlref train: error: --out '{tmp_path}' already holds a training run" in err
    assert "add --resume to continue it, --overwrite to start it over" in err
    assert folder_bytes(tmp_path) == before
    (tmp_path / "checkpoint.npz").unlink()                          # metrics alone are a run's record too
    assert main(args) == 2 and "(metrics.json, metrics.csv)" in capsys.readouterr().err


def test_a_data_set_larger_than_the_memory_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """--size 1000 was killed by the system while making 160 GB of clips."""
    monkeypatch.setattr(T, "_physical_memory", lambda: 8 * 2**30)
    assert main(["train", "--size", "1000", "--no-progress", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nlref train: error: the data set alone would take 160.0 GB") and err.count("\n") == 1
    assert "8.0 GiB" in err and "lower --size, --n-train or --n-val" in err
    assert not (tmp_path / "run").exists()


def test_cli_resume_without_a_run_names_the_folder(tmp_path, capsys):
    folder = tmp_path / "runA"
    assert main(["train", "--resume", "--epochs", "1", "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"nlref train: error: --resume: there is no run to resume in '{folder}' (no checkpoint.npz "
                           "there); start a new run without --resume")
    assert not folder.exists()


def test_cli_corrupted_checkpoint_says_what_to_do(tmp_path, capsys):
    tiny_run(tmp_path, epochs=1)
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(b"garbage" * 100)
    before = folder_bytes(tmp_path)
    args = ["train", "--epochs", "1", "--n-train", "48", "--n-val", "24", "--batch-size", "16", "--no-progress",
            "--resume", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is corrupted or truncated" in err and "--overwrite" in err
    assert "allow_pickle" not in err and "Traceback" not in err
    assert folder_bytes(tmp_path) == before


def test_lr_column_is_the_epochs_lr_as_the_banner_states_it(tmp_path, capsys):
    args = ["train", "--epochs", "1", "--n-train", "32", "--n-val", "16", "--batch-size", "16", "--no-progress",
            "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert ", 1 epoch, adam lr 0.001 (x0.1 after 60% and 85% of the steps)" in out
    assert "with 1 non-local block (" in out and "after 1 epoch;" in out
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[1] == "lr" and rows[1].split(",")[1] == "0.001"
    # over a longer schedule the column steps down by exact tenths, without float noise
    history = tiny_run(tmp_path / "long", epochs=5, lr=0.003)["history"]
    assert [r["lr"] for r in history] == [0.003, 0.003, 0.003, 0.0003, 3e-05]   # 3 steps an epoch: 9 and 12


def test_a_diverging_run_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T.F, "softmax_cross_entropy_forward",
                        lambda logits, y: (float("nan"), None))
    monkeypatch.setattr(T.F, "softmax_cross_entropy_backward", lambda d, cache: None)
    monkeypatch.setattr(T.VideoNet, "backward", lambda self, *a, **k: None)
    monkeypatch.setattr(T.Adam, "step", lambda self, lr: None)
    assert main(["train", "--epochs", "1", "--n-train", "32", "--n-val", "16", "--batch-size", "16",
                 "--no-progress", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the training loss became nan at epoch 1" in err and "lower lr" in err
    assert not (tmp_path / "checkpoint.npz").exists()


def _cli_config():
    return dict(n_train=32, n_val=16, batch_size=16)


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_stops_cleanly_and_the_printed_command_resumes(tmp_path, signame, code):
    """Run `nlref train` as a user does, stop it after its first epoch line, and continue with the command it
    prints: the final weights equal those of an uninterrupted run, bit for bit."""
    import shlex
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    options = ["--epochs", "5", "--n-train", "32", "--n-val", "16", "--batch-size", "16", "--out", str(out)]
    command = [sys.executable, "-m", "nlref.cli", "train", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:                                     # lines arrive as they are printed (flushed)
        if line.startswith("epoch  1/5"):
            process.send_signal(getattr(signal, signame))
            break
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr and "\r" not in stderr        # no traceback, no progress frames in a pipe
    (message,) = stderr.strip().splitlines()
    epoch = load_checkpoint(out / "checkpoint.npz")[0]["epoch"]    # valid: it loads and its checksum matches
    assert 1 <= epoch < 5
    assert message.startswith(f"nlref train: stopped by {signame} after epoch {epoch} of 5 (checkpoint ")
    assert len(json.loads((out / "metrics.json").read_text())) == epoch
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "metrics.csv", "metrics.json"]
    resume = shlex.split(message.split("to continue: ")[1])
    assert resume[:2] == ["nlref", "train"] and resume[-1] == "--resume"
    result = subprocess.run([sys.executable, "-m", "nlref.cli", *resume[1:]], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {out / 'checkpoint.npz'} after epoch {epoch}" in result.stdout
    resumed = T.build_model(TrainConfig(**{**_cli_config(), "epochs": 5}))
    resumed.load_state_dict(load_checkpoint(out / "checkpoint.npz")[1])
    full = train(TrainConfig(**{**_cli_config(), "epochs": 5}), None, progress=False, log=None)["model"]
    for key, value in full.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value, err_msg=key)


def test_interrupting_an_overwrite_before_its_first_epoch_keeps_and_names_the_old_run(tmp_path, capsys, monkeypatch):
    options = ["train", "--epochs", "1", "--n-train", "32", "--n-val", "16", "--batch-size", "16", "--no-progress",
               "--out", str(tmp_path)]
    assert main(options) == 0
    before = folder_bytes(tmp_path)
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(T.F, "softmax_cross_entropy_forward", interrupted)
    assert main([*options, "--seed", "4", "--overwrite"]) == 130
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert "before the new run's first epoch was complete" in message
    assert "still holds the previous run" in message and "--resume" not in message
    assert folder_bytes(tmp_path) == before


def test_cli_train_pairs2d(tmp_path, capsys):
    args = ["train", "--task", "pairs2d", "--margin", "3", "--kinds", "2", "--dropout", "0", "--epochs", "1",
            "--n-train", "32", "--n-val", "16", "--batch-size", "16", "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2-D residual network with 1 non-local block" in out and "two-shape images of 24x24 (margin 3)" in out
    config = load_checkpoint(tmp_path / "checkpoint.npz")[0]["config"]
    assert config["task"] == "pairs2d" and config["dropout"] == 0 and config["margin"] == 3
    assert config["kinds"] == 2 and config["size"] == 24  # typed, and the task's default where left out
    assert main(args + ["--resume"]) == 0 and "resumed from" in capsys.readouterr().out
    for bad, named in ((["--margin", "2"], "--margin"), (["--model", "i3d"], "--model"),
                       (["--nonlocal", "2"], "--nonlocal"),
                       (["--pool", "before", "--no-sub-sample"], "--pool 'before' places the subsampling, and "
                                                                 "--no-sub-sample turns it off")):
        assert main(args[:-2] + bad + ["--out", str(tmp_path / "new")]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("task", ["sprites", "pairs2d"])
def test_cli_train_options_left_out_take_the_task_defaults(tmp_path, capsys, task):
    """--size, --kinds and --dropout left out: the task's documented run (docs/training.md); typed: as typed."""
    from nlref.train import TASK_DEFAULTS, TrainConfig

    small = ["--epochs", "1", "--n-train", "16", "--n-val", "8", "--batch-size", "8", "--no-progress", "--quiet"]
    assert main(["train", "--task", task, *small, "--out", str(tmp_path / "left-out")]) == 0
    config = load_checkpoint(tmp_path / "left-out" / "checkpoint.npz")[0]["config"]
    expected = {**{k: getattr(TrainConfig(), k) for k in ("size", "kinds", "dropout")}, **TASK_DEFAULTS[task]}
    assert {k: config[k] for k in expected} == expected
    typed = {"size": 32, "kinds": 3, "dropout": 0.25}
    assert main(["train", "--task", task, *small, *[w for k, v in typed.items() for w in (f"--{k}", str(v))],
                 "--out", str(tmp_path / "typed")]) == 0
    config = load_checkpoint(tmp_path / "typed" / "checkpoint.npz")[0]["config"]
    assert {k: config[k] for k in typed} == typed


def test_cli_train_transformer(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "transformer", "--embed-dim", "8", "--depth", "1", "--heads", "2", "--mlp-dim",
            "16", "--epochs", "1", "--batch-size", "8", "--n-train", "16", "--n-val", "8",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "transformer (1 block of 8 channels, 2 heads)" in text and "val accuracy" in text
    history = json.loads((out / "metrics.json").read_text())
    assert len(history) == 1
    assert main(args + ["--resume"]) == 0           # a finished run: resuming it has nothing left to do
    assert len(json.loads((out / "metrics.json").read_text())) == 1
    capsys.readouterr()
    assert main(["train", "--model", "transformer", "--embed-dim", "10", "--heads", "4", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "--heads (4) must divide --embed-dim (10)" in capsys.readouterr().err   # the flags typed


def test_scale_with_a_mode_without_softmax_is_a_one_line_error_naming_the_flags(tmp_path, capsys):
    """``--mode dot_product --scale`` was reported as an internal error of nlref (the block refused it when built)."""
    assert main(["train", "--mode", "dot_product", "--scale", "--no-progress", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" not in err
    assert err.startswith("nlref train: error: --scale applies to the softmax modes ('gaussian', 'embedded_gaussian'), "
                          "not --mode 'dot_product': leave --scale out")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("typed", [["--extent", "time"], ["--stage", "res4"], ["--no-sub-sample"], ["--no-bn"],
                                   ["--scale"], ["--stage", "res2", "--extent", "space"],
                                   # these three had defaults on the command line, so typed ones went unseen
                                   ["--nonlocal", "2"], ["--mode", "gaussian"], ["--pool", "before"],
                                   ["--nonlocal", "0", "--mode", "dot_product"]])
def test_block_options_typed_for_the_transformer_are_refused(tmp_path, capsys, typed):
    """``--model transformer --extent time`` trained the transformer as if the option had not been typed (it has no
    non-local block), while the same options with --task pairs2d were refused."""
    tiny = ["--epochs", "1", "--n-train", "16", "--n-val", "8", "--batch-size", "8", "--no-progress"]  # were it run
    assert main(["train", "--model", "transformer", *typed, *tiny, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    flags = ", ".join(word for word in typed if word.startswith("--"))
    assert err == (f"nlref train: error: {flags}: not used by --model transformer (it has no non-local blocks); they "
                   "apply to the non-local blocks of --model c2d, i3d and i3d_3x1x1\n")
    assert not (tmp_path / "run").exists()


def test_cli_resume_with_more_epochs_extends_the_run_as_the_printed_schedule_says(tmp_path, capsys):
    """`nlref train --resume --epochs N+1` was refused ("epochs: checkpoint N, requested N+1"): PyTorch users
    train a finished run longer. It now goes on at the schedule of N epochs, says so, keeps the finished
    checkpoint, and ends with the weights of `nlref train --epochs N+1 --schedule-epochs N`."""
    common = ["--n-train", "32", "--n-val", "16", "--batch-size", "16", "--no-progress"]
    assert main(["train", "--epochs", "1", *common, "--out", str(tmp_path / "ext")]) == 0
    capsys.readouterr()
    assert main(["train", "--epochs", "2", *common, "--out", str(tmp_path / "ext"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "2 epochs, adam lr 0.001 (x0.1 after 60% and 85% of the steps of 1 epoch)" in out  # the banner too
    assert "the learning-rate schedule stays that of 1 epoch (milestones at steps 1, 1): epochs 2 to 2 start at " \
           "lr 1e-05; the finished run is kept as checkpoint-epoch1.npz" in out
    assert main(["train", "--epochs", "2", "--schedule-epochs", "1", *common, "--out", str(tmp_path / "straight")]) == 0
    assert "adam lr 0.001 (x0.1 after 60% and 85% of the steps of 1 epoch)" in capsys.readouterr().out
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.npz")[1] for name in ("ext", "straight"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (tmp_path / "ext" / "checkpoint-epoch1.npz").is_file()
    # fewer epochs than the checkpoint holds, or another schedule: one line each, nothing written
    before = folder_bytes(tmp_path / "ext")
    for extra, message in ((["--epochs", "1"], "holds 2 epochs already, more than epochs=1 (--epochs)"),
                           (["--epochs", "3", "--schedule-epochs", "3"], "leave schedule_epochs (--schedule-epochs) "
                                                                          "out or give 1, not 3")):
        assert main(["train", *extra, *common, "--out", str(tmp_path / "ext"), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert folder_bytes(tmp_path / "ext") == before
    assert main(["train", "--epochs", "2", "--schedule-epochs", "0", *common, "--out", str(tmp_path / "z")]) == 2
    assert "--schedule-epochs must be a positive integer" in capsys.readouterr().err
