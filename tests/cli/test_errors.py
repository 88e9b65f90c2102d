"""The command line as a user meets it (issue 31): a user's mistake names the flag typed (exit 2), a bug in nlref
says so (exit 1), a closed pipe costs no result, one overwrite rule, no abbreviated flags."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage import io

import nlref
from nlref.cli import CommandError, build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _grey(tmp_path, name="in.png", n=24):
    path = tmp_path / name
    io.imsave(path, np.random.default_rng(0).integers(0, 256, (n, n)).astype(np.uint8), check_contrast=False)
    return path


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _bug(*args, **kwargs):
    raise ValueError("an index went wrong inside nlref")


def test_a_bug_inside_nlref_is_not_reported_as_the_users_mistake(tmp_path, capsys, monkeypatch):
    src = _grey(tmp_path)
    monkeypatch.setattr(nlref, "nl_means", _bug)
    monkeypatch.delenv("NLREF_TRACEBACK", raising=False)
    assert main(["denoise", str(src), "--sigma", "10", "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "a bug in nlref, not a mistake of yours" in err and "--traceback" in err and "ValueError" in err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("how", ["flag", "flag-first", "env"])
def test_traceback_is_shown_when_asked_for(tmp_path, capsys, monkeypatch, how):
    src = _grey(tmp_path)
    monkeypatch.setattr(nlref, "nl_means", _bug)
    argv = ["denoise", str(src), "--sigma", "10", "--out", str(tmp_path / "o.png")]
    if how == "env":
        monkeypatch.setenv("NLREF_TRACEBACK", "1")
    argv = {"flag": argv + ["--traceback"], "flag-first": ["--traceback"] + argv, "env": argv}[how]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "an index went wrong inside nlref" in err


def test_the_chunked_path_raises_the_commands_error(tmp_path):
    """Before: ValueError here, CommandError on the image path."""
    pytest.importorskip("zarr")
    args = build_parser().parse_args(["denoise", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "o.zarr")])
    with pytest.raises(CommandError, match="missing.npy' does not exist"):
        nlref.cli.run_denoise_chunked(args)
    args = build_parser().parse_args(["denoise", "--chunks", "8", "--out", str(tmp_path / "o.zarr")])
    with pytest.raises(CommandError, match="needs IMAGE"):
        nlref.cli.run_denoise_chunked(args)


def test_chunks_of_the_wrong_length_name_the_flag(tmp_path, capsys):
    pytest.importorskip("zarr")
    np.save(tmp_path / "vol.npy", np.zeros((6, 10, 10), np.float32))
    assert main(["denoise", str(tmp_path / "vol.npy"), "--chunks", "4,4", "--sigma", "1",
                 "--out", str(tmp_path / "o.zarr")]) == 2
    err = capsys.readouterr().err
    assert "error: --chunks must be a positive int or one positive int per spatial axis (3" in err
    assert not (tmp_path / "o.zarr").exists()


def test_a_closed_stdout_pipe_loses_no_result(tmp_path):
    """``nlref denoise ... | head -1``: the reader is gone before the first line; the file is written anyway."""
    src, out = _grey(tmp_path), tmp_path / "p.png"
    read, write = os.pipe()
    os.close(read)                                       # every write to stdout now fails with EPIPE
    try:
        result = subprocess.run([sys.executable, "-m", "nlref", "denoise", str(src), "--sigma", "20",
                                 "--search-size", "3", "--out", str(out)], stdout=write, stderr=subprocess.PIPE,
                                text=True, env=_env(), cwd=tmp_path)
    finally:
        os.close(write)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""                           # no "Broken pipe", no "Exception ignored"
    expected = nlref.nl_means(io.imread(src), sigma=20, search_size=3)
    np.testing.assert_array_equal(io.imread(out), expected)


def test_quiet_prints_nothing_and_still_writes(tmp_path, capsys):
    src, out = _grey(tmp_path), tmp_path / "o.png"
    assert main(["denoise", str(src), "--sigma", "20", "--search-size", "3", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "" and out.is_file()
    assert main(["denoise", str(src), "--sigma", "20", "--search-size", "3", "--out", str(tmp_path / "p.png")]) == 0
    assert "denoised (24, 24) uint8" in capsys.readouterr().out   # without --quiet, the report


@pytest.mark.parametrize("lr", ["0", "-1", "nan"])
def test_lr_zero_and_negative_get_one_rule(tmp_path, capsys, lr):
    assert main(["train", "--lr", lr, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nlref train: error: --lr must be a finite number > 0") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, flag, parameter", [
    (["--nonlocal", "-1"], "--nonlocal", "nonlocal_blocks"),
    (["--batch-size", "0"], "--batch-size", "batch_size"),
    (["--n-train", "1"], "--n-train", "n_train"),
    (["--model", "transformer", "--heads", "3"], "--heads", "num_heads"),
])
def test_train_messages_name_the_flags_typed(tmp_path, capsys, argv, flag, parameter):
    assert main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert flag in err and parameter not in err, err


def test_denoise_refuses_an_existing_out_without_overwrite(tmp_path, capsys):
    src, out = _grey(tmp_path), tmp_path / "o.png"
    out.write_bytes(b"yesterday's result")
    assert main(["denoise", str(src), "--sigma", "20", "--search-size", "3", "--out", str(out)]) == 2
    assert "already exists; add --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"yesterday's result"
    assert main(["denoise", str(src), "--sigma", "20", "--search-size", "3", "--out", str(out), "--overwrite"]) == 0
    assert io.imread(out).shape == (24, 24)


def test_chunked_denoise_overwrites_a_store_only_when_asked(tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    np.save(tmp_path / "vol.npy", np.random.default_rng(1).random((6, 10, 10)).astype(np.float32))
    out = tmp_path / "o.zarr"
    argv = ["denoise", str(tmp_path / "vol.npy"), "--chunks", "6", "--sigma", "0.1", "--search-size", "3",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    zarr.open_array(str(out), mode="r+")[...] = 7     # a mark that a new run must replace
    assert main(argv) == 2
    assert "already exists; add --overwrite" in capsys.readouterr().err
    assert (zarr.open_array(str(out), mode="r")[...] == 7).all()
    assert main([*argv, "--overwrite"]) == 0
    assert not (zarr.open_array(str(out), mode="r")[...] == 7).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr", "vol.npy"]   # no partial, no old store left
    (tmp_path / "plain").mkdir()
    assert main([*argv[:-1], str(tmp_path / "plain.zarr"), "--overwrite"]) == 0   # absent: written
    (tmp_path / "notes.zarr").mkdir()
    (tmp_path / "notes.zarr" / "mine.txt").write_text("keep")
    assert main([*argv[:-1], str(tmp_path / "notes.zarr"), "--overwrite"]) == 2
    assert "is not a Zarr store; it is never replaced" in capsys.readouterr().err
    assert (tmp_path / "notes.zarr" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("argv", [["denoise", "--sig", "20"], ["train", "--epoch", "1"], ["--quie", "demo"],
                                  ["demo", "--qui"]])
def test_abbreviated_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(argv)
    assert stop.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("extra, named", [(["--noise", "5"], "--noise applies"), (["--seed", "0"], "--seed applies"),
                                          (["--noise", "5", "--seed", "3"], "--noise and --seed apply")])
def test_flags_of_the_bundled_image_are_refused_with_an_image(tmp_path, capsys, monkeypatch, extra, named):
    src = _grey(tmp_path)
    monkeypatch.setattr(nlref, "nl_means", _bug)        # refused before the work
    assert main(["denoise", str(src), *extra, "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert f"error: {named} only to the bundled camera image" in err



@pytest.mark.parametrize("argv, message", [
    (["denoise", "--seed", "-1"], "argument --seed: -1 is negative; a seed is an int >= 0"),
    (["demo", "--quick", "--seed", "-1"], "argument --seed: -1 is negative; a seed is an int >= 0"),
    (["denoise", "--noise", "-5"], "argument --noise: -5 is not a noise level in grey levels: allowed 0 to 255"),
    (["denoise", "--noise", "nan"], "argument --noise: nan is not a noise level in grey levels"),
    (["denoise", "--noise", "1e9"], "argument --noise: 1e9 is not a noise level in grey levels"),
])
def test_seed_and_noise_of_the_bundled_image_are_checked_on_the_command_line(tmp_path, capsys, monkeypatch, argv,
                                                                            message):
    """--seed -1 was an "internal error ... a bug in nlref"; --noise -5 ran (rc 0), nan warned from NumPy."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(nlref, "nl_means", _bug)
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--out", str(tmp_path / "o")])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_scheduler_without_a_chunked_run_is_refused(tmp_path, capsys):
    src = _grey(tmp_path)
    assert main(["denoise", str(src), "--scheduler", "tcp://127.0.0.1:1", "--out", str(tmp_path / "o.png")]) == 2
    assert "--scheduler applies only to a chunked run" in capsys.readouterr().err


def test_python_dash_m_nlref_runs_the_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nlref", "--version"], capture_output=True, text=True,
                            env=_env(), cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"nlref {nlref.__version__}"


def test_the_resume_command_parses_back_to_the_same_run(tmp_path, capsys, monkeypatch):
    """The command printed when a run is stopped after an epoch is that run's own options, with --resume in place of
    --overwrite (a folder name with a space survives the shell)."""
    import nlref.train as T

    real = T.train

    def stopped_after_the_first_epoch(*args, **kwargs):
        def stop(epoch, row, model):
            if epoch == 1:
                raise KeyboardInterrupt
        return real(*args, callback=stop, **kwargs)

    monkeypatch.setattr(T, "train", stopped_after_the_first_epoch)
    argv = ["train", "--model", "i3d", "--nonlocal", "2", "--no-bn", "--epochs", "3", "--lr", "0.01", "--n-train", "16",
            "--n-val", "8", "--batch-size", "8", "--no-progress", "--out", str(tmp_path / "my run"), "--overwrite"]
    assert main(argv) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("nlref train: stopped by SIGINT after epoch 1 of 3")
    words = shlex.split(line.split("; to continue: ")[1])
    assert words[:2] == ["nlref", "train"] and words[-1] == "--resume"
    again = vars(build_parser().parse_args(words[1:]))
    expected = {**vars(build_parser().parse_args(argv)), "overwrite": False, "resume": True}
    assert again == expected


def test_course_messages_name_the_flags(tmp_path, capsys):
    (tmp_path / "ed").mkdir()
    assert main(["course", "--student", str(tmp_path / "ed")]) == 2
    err = capsys.readouterr().err
    assert "--student" in err and "add --overwrite" in err and "overwrite=True" not in err
    assert main(["course", "--student", str(tmp_path / "new"), "--notebooks", str(tmp_path / "ed")]) == 2
    err = capsys.readouterr().err
    assert "--notebooks" in err and "notebooks must" not in err


def test_every_module_of_the_cli_is_under_350_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "nlref" / "cli").glob("*.py")}
    assert {"__init__.py", "demo.py", "walk.py", "denoise.py", "store.py", "train.py", "course.py"} <= set(sizes)
    assert max(sizes.values()) < 350, sizes


@pytest.mark.parametrize("argv, message", [
    (["--task", "pairs2d", "--stage", "res3"], "--stage: not used by --task pairs2d"),
    (["--task", "pairs2d", "--heads", "2"], "--heads: not used by --task pairs2d"),
    (["--margin", "2"], "--margin applies only to --task pairs2d"),
    (["--model", "i3d", "--embed-dim", "32", "--depth", "1"], "--embed-dim, --depth: not used by --model i3d"),
])
def test_train_options_of_another_task_are_refused(tmp_path, capsys, argv, message):
    assert main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_library_message_names_each_flag_once(tmp_path, capsys):
    assert main(["train", "--task", "pairs2d", "--size", "16", "--margin", "4", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--size // 2 must be at least 5 + --margin" in err and "(--size)" not in err and "size=" not in err


def test_train_out_must_be_a_folder(tmp_path, capsys, monkeypatch):
    """--out naming a file was an "internal error ... a bug in nlref"; --out '' trained into the current folder."""
    import nlref.train

    monkeypatch.setattr(nlref.train, "train", _bug)   # refused before the work
    (tmp_path / "g32.png").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--out", "g32.png"]) == 2
    assert "--out 'g32.png' exists and is not a folder" in capsys.readouterr().err
    assert main(["train", "--epochs", "1", "--out", ""]) == 2
    assert "--out must name a folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["g32.png"]


@pytest.mark.parametrize("argv, flag", [
    (["train", "--epochs", "1", "--n-train", "16", "--n-val", "8", "--batch-size", "16", "--out"], "--out"),
    (["demo", "--quick", "--out"], "--out"),
    (["course", "--student"], "--student"),
])
def test_an_out_folder_under_a_file_is_a_one_line_error(tmp_path, capsys, argv, flag):
    """nlref train said "internal error ... a bug in nlref"; demo and course exited 1 with an OSError that named no
    flag (course: "[Errno 17] File exists: 'blocker'")."""
    (tmp_path / "blocker").write_text("x")
    target = str(tmp_path / "blocker" / "sub" / "dir")
    assert main([*argv, target]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {target!r}: {str(tmp_path / 'blocker')!r} is a file, not a folder" in err
    assert "internal error" not in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["blocker"]


def test_a_second_train_into_a_busy_out_is_refused(tmp_path, capsys):
    """Two nlref train runs with one --out both ended with exit status 0, the files of one of them lost."""
    from nlref.train import _run_lock

    tmp_path.joinpath("run").mkdir()
    with _run_lock(tmp_path / "run"):
        code = main(["train", "--epochs", "1", "--n-train", "16", "--n-val", "8", "--batch-size", "16",
                     "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "is in use: another training run is writing there now" in err and "internal error" not in err
    assert list((tmp_path / "run").iterdir()) == []
