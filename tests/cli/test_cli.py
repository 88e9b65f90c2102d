import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage import io

import nlref
from nlref.cli import main


DEMO_FIGURES = {}  # file name -> what a reader sees of the figure (filled by demo_run)
DEMO_PROBLEMS = {}  # file name -> what the figure misses of the figure standard (tests/figcheck.py)


def _what_a_reader_sees(fig):
    """A figure's title and, per axis that draws something, its title, axis labels and images."""
    panels = [dict(title=ax.get_title(), xlabel=ax.get_xlabel(), ylabel=ax.get_ylabel(), images=len(ax.images),
                   lines=len(ax.lines), colorbar=ax.get_label() == "<colorbar>")
              for ax in fig.axes if ax.images or ax.lines or ax.collections]
    return dict(title=fig.get_suptitle(), panels=panels)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``nlref demo --quick`` run once for the module: (its folder, what it printed); what each saved figure
    shows is recorded in ``DEMO_FIGURES``."""
    import contextlib
    import io as text_io

    from nlref.cli import walk

    folder, printed = tmp_path_factory.mktemp("demo"), text_io.StringIO()
    save = walk._save

    def recording_save(fig, path):
        from tests.figcheck import figure_problems

        DEMO_FIGURES[Path(path).name] = _what_a_reader_sees(fig)
        DEMO_PROBLEMS[Path(path).name] = figure_problems(fig)
        save(fig, path)

    with contextlib.redirect_stdout(printed), pytest.MonkeyPatch.context() as patch:
        patch.setattr(walk, "_save", recording_save)
        assert main(["demo", "--quick", "--out", str(folder)]) == 0
    return folder, printed.getvalue()


def test_every_demo_figure_has_a_title_and_labels(demo_run):
    """Every figure the demo writes says what it shows: a title over it, a title on each picture, axis labels
    on each plot; ``averaging_images.png`` and ``nlmeans_astronaut.png`` had no figure title."""
    from nlref.cli import walk

    assert sorted(DEMO_FIGURES) == sorted(walk.FIGURES)
    for name, seen in DEMO_FIGURES.items():
        plots = [panel for panel in seen["panels"] if not panel["colorbar"]]
        single = plots[0]["title"] if len(plots) == 1 else ""
        assert (seen["title"] or single).strip(), f"{name} has no figure title"
        for panel in seen["panels"]:
            if panel["colorbar"]:
                assert panel["ylabel"] or panel["xlabel"], f"{name}: a colour bar without a label"
            elif panel["images"]:
                assert panel["title"].strip(), f"{name}: a picture without a title"
            elif panel["lines"]:
                assert panel["xlabel"] and panel["ylabel"], f"{name}: a plot without axis labels"


def test_every_demo_figure_meets_the_figure_standard(demo_run):
    """Titles, axis labels, colour bars and legends where needed, no text off the figure (tests/figcheck.py)."""
    from nlref.cli import walk

    assert sorted(DEMO_PROBLEMS) == sorted(walk.FIGURES)
    assert {name: problems for name, problems in DEMO_PROBLEMS.items() if problems} == {}


def test_demo_quick_writes_figures_and_table(demo_run):
    tmp_path, out = demo_run
    for name in ("averaging_curve", "averaging_images", "nlmeans_camera", "nlmeans_weights", "nlmeans_astronaut",
                 "nonlocal_attention", "training_curves", "training_attention"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    checks = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in nlref.nn.nonlocal_op.MODES]
    assert [c[0] for c in checks] == list(nlref.nn.nonlocal_op.MODES)
    assert all(c[-1] == "passed" and float(c[1]) <= 1e-6 for c in checks)
    assert "z == x exactly: True" in out
    line = next(line for line in out.splitlines() if "attention == NL-means weights" in line)
    assert float(line.split("max difference ")[1].rstrip(")")) < 1e-10
    rows = [line for line in out.splitlines() if "camera" in line and not line.startswith("nlref")]
    psnr = {line[:26].strip(): float(line.split()[-2]) for line in rows}
    assert psnr["NL-means, pixel-wise"] > psnr["noisy (one copy)"] + 4
    assert psnr["NL-means, patch-wise"] > psnr["noisy (one copy)"] + 4
    assert psnr["mean of 16 noisy copies"] > psnr["noisy (one copy)"] + 11  # 10 log10(16) = 12 dB
    assert psnr["mean of 16 noisy copies"] > psnr["mean of 4 noisy copies"] + 5  # 10 log10(4) = 6 dB
    # the training step: both networks trained (tiny in --quick mode, so no accuracy gap is expected)
    assert "training on the two-sprite task (3 brightness kinds" in out and "additive ceiling 0.667" in out
    trained = {line[:26].strip(): line.split()[-2:] for line in out.splitlines()
               if line.startswith(("C2D ", "NL C2D "))}
    assert sorted(trained) == ["C2D", "NL C2D"]
    for accuracy, clips_per_second in trained.values():
        assert 0 <= float(accuracy) <= 1 and float(clips_per_second) > 0
    line = next(line for line in out.splitlines() if line.startswith("attention of a sprite-1 query"))
    assert 0 <= float(line.split("cells: ")[1].split()[0]) <= 1 and "(uniform 0.094)" in line
    assert "the mean over the 32 validation clips" in line and "training_attention.png draws clip" in line


def test_denoise_a_user_file(tmp_path, capsys):
    clean = (nlref.data.camera()[100:164, 200:264] * 255).round().astype(np.uint8)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 15, clean.shape), 0, 255).round().astype(np.uint8)
    src, dst = tmp_path / "noisy.png", tmp_path / "clean.png"
    io.imsave(src, noisy, check_contrast=False)
    assert main(["denoise", str(src), "--sigma", "15", "--out", str(dst)]) == 0
    result = io.imread(dst)
    assert result.shape == noisy.shape and result.dtype == np.uint8
    assert nlref.psnr(clean, result) > nlref.psnr(clean, noisy) + 3
    assert "patch (3, 3)" in capsys.readouterr().out


def test_denoise_colour_with_alpha(tmp_path):
    rgba = np.dstack([(nlref.data.astronaut()[:40, :40] * 255).astype(np.uint8), np.full((40, 40), 200, np.uint8)])
    src, dst = tmp_path / "rgba.png", tmp_path / "out.png"
    io.imsave(src, rgba, check_contrast=False)
    assert main(["denoise", str(src), "--sigma", "10", "--out", str(dst)]) == 0
    out = io.imread(dst)
    assert out.shape == (40, 40, 4)
    np.testing.assert_array_equal(out[..., 3], 200)


def test_denoise_default_image_reports_psnr(tmp_path, capsys):
    """Without IMAGE: the bundled camera image with 20 grey levels of noise (seed 0); the PSNRs printed are those of
    that noisy image and of the file written, both against the clean camera image, and denoising gains."""
    from skimage import data

    assert main(["denoise", "--search-size", "5", "--out", str(tmp_path / "c.png")]) == 0
    printed = capsys.readouterr().out.split("(PSNR ")[1].split(" dB)")[0]
    before, after = (float(v) for v in printed.split(" -> "))
    clean = data.camera()
    noisy = np.clip(np.round(clean + 20.0 * np.random.default_rng(0).standard_normal(clean.shape)), 0, 255)
    assert before == round(nlref.psnr(clean, noisy.astype(np.uint8)), 2)
    assert after == round(nlref.psnr(clean, io.imread(tmp_path / "c.png")), 2)
    assert after > before + 3


def test_denoise_bad_arguments(tmp_path, capsys):
    assert main(["denoise", "--patch-size", "4", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "error: --patch-size 4: sizes are full odd widths" in err and "patch_size" not in err  # the flag typed
    assert list(tmp_path.iterdir()) == []
    # a typo that would have run a million offsets on the 512 x 512 camera (about an hour): refused at once
    assert main(["denoise", "--search-size", "100001", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "error: --search-size 100001 makes 10,000,200,001 offsets, more than the 1,046,529 that already reach " \
           "every sample of the 512x512 image" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def _console_script():
    """The installed ``nlref`` script: next to this Python (a virtual environment's bin/ or Scripts/), else on PATH."""
    here = Path(sys.executable).parent / ("nlref.exe" if os.name == "nt" else "nlref")
    found = str(here) if here.is_file() else shutil.which("nlref")
    if found is None:
        pytest.skip("the nlref console script is not installed here (pip install -e . installs it)")
    return found


def test_console_script_is_installed():
    """The ``nlref`` command that ``pip install`` puts on PATH (not ``python -m``) runs this nlref's command line."""
    script = _console_script()
    result = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"nlref {nlref.__version__}", result.stderr
    result = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: nlref ")
    assert all(f"nlref {command}" in result.stdout for command in ("demo", "denoise", "train")), result.stdout


# ---- issue 18: nothing a newcomer does loses work or shows a traceback ----

def _noisy_grey(n=48, sigma=15, seed=0):
    clean = (nlref.data.camera()[100:100 + n, 200:200 + n] * 255).round().astype(np.uint8)
    noisy = np.clip(clean + np.random.default_rng(seed).normal(0, sigma, clean.shape), 0, 255).round().astype(np.uint8)
    return clean, noisy


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if NL-means runs: the checks must come before the work."""
    def refuse(*args, **kwargs):
        raise AssertionError("nl_means ran although the command should have stopped before the work")
    monkeypatch.setattr(nlref, "nl_means", refuse)


def _one_line_error(capsys, *fragments):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and "pip install" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _png_bytes(tmp_path):
    _, noisy = _noisy_grey(16)
    io.imsave(tmp_path / "ok.png", noisy, check_contrast=False)
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "ok.png").unlink()
    return data


@pytest.mark.parametrize("name, content, problem", [
    ("notes.png", b"this is a text file, not a picture\n", "not an image in a format the reader knows"),
    ("empty.png", b"", "the file is empty"),
    ("half.png", "truncate", "truncated"),
    ("data.foo", b"\x00\x01\x02", "not an image in a format the reader knows"),
    ("scan.jpg", b"\xff\xd8\xff\xe0 a JPEG header, then nothing", "the image data is truncated"),
])
def test_unreadable_image_is_one_line_naming_the_file(tmp_path, capsys, no_work, name, content, problem):
    src = tmp_path / name
    src.write_bytes(_png_bytes(tmp_path)[:150] if content == "truncate" else content)
    out = tmp_path / "out.png"
    assert main(["denoise", str(src), "--out", str(out)]) == 2
    _one_line_error(capsys, "nlref denoise: error:", str(src), problem)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_missing_image_and_folder_as_image(tmp_path, capsys, no_work):
    assert main(["denoise", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o.png")]) == 2
    _one_line_error(capsys, "missing.png' does not exist")
    assert main(["denoise", str(tmp_path), "--out", str(tmp_path / "o.png")]) == 2
    _one_line_error(capsys, "is a folder, not an image file")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_image_from_the_console_has_no_traceback(tmp_path):
    """The installed command as a user runs it: one line on stderr, exit status 2."""
    (tmp_path / "notes.png").write_text("hello\n")
    result = subprocess.run([_console_script(), "denoise", str(tmp_path / "notes.png"),
                             "--out", str(tmp_path / "o.png")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"nlref denoise: error: cannot read IMAGE '{tmp_path / 'notes.png'}': it is not an image in a format the "
        "reader knows (PNG, JPEG, TIFF, BMP, GIF, WebP, ...), or it is damaged"]
    assert not (tmp_path / "o.png").exists()


def test_grey_plus_alpha_is_denoised_in_its_grey_channel(tmp_path, capsys):
    clean, noisy = _noisy_grey(64, sigma=20)
    alpha = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    src, dst = tmp_path / "la.png", tmp_path / "out.png"
    io.imsave(src, np.dstack([noisy, alpha]), check_contrast=False)
    assert main(["denoise", str(src), "--out", str(dst)]) == 0          # no --sigma: estimated from the grey
    out = capsys.readouterr().out
    assert "(64, 64, 2) uint8, grey + alpha" in out
    sigma = float(out.split("sigma ")[1].split()[0])
    assert sigma == pytest.approx(nlref.estimate_sigma(noisy), rel=5e-3) and 12 < sigma < 30
    result = io.imread(dst)
    assert result.shape == (64, 64, 2) and result.dtype == np.uint8
    np.testing.assert_array_equal(result[..., 1], alpha)
    assert nlref.psnr(clean, result[..., 0]) > nlref.psnr(clean, noisy) + 3


def test_rgba_reports_its_shape_and_estimates_sigma_from_the_colour(tmp_path, capsys):
    rgb = (nlref.data.astronaut()[:48, :48] * 255).round()
    noisy = np.clip(rgb + np.random.default_rng(1).normal(0, 15, rgb.shape), 0, 255).round().astype(np.uint8)
    alpha = np.zeros((48, 48), np.uint8)                                  # fully transparent: a sigma of 0 if mixed in
    src, dst = tmp_path / "rgba.png", tmp_path / "out.png"
    io.imsave(src, np.dstack([noisy, alpha]), check_contrast=False)
    assert main(["denoise", str(src), "--out", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "(48, 48, 4) uint8, colour + alpha (RGBA)" in out and "denoised (48, 48, 4) uint8" in out
    sigma = float(out.split("sigma ")[1].split()[0])
    assert sigma == pytest.approx(nlref.estimate_sigma(noisy, channel_axis=-1), rel=5e-3)
    result = io.imread(dst)
    assert result.shape == (48, 48, 4)
    np.testing.assert_array_equal(result[..., 3], 0)
    assert nlref.psnr(rgb.astype(np.uint8), result[..., :3]) > nlref.psnr(rgb.astype(np.uint8), noisy) + 3


@pytest.mark.parametrize("out_name, image, fragment", [
    ("out.xyz", "grey", "the extension '.xyz' names no image format"),
    ("out", "grey", "the extension '(none)' names no image format"),
    ("no/such/folder/out.png", "grey", "does not exist; create it first"),
    ("sub", "grey", "is a folder; give a file name"),
    ("out.jpg", "rgba", "JPEG cannot hold RGBA"),
    ("out.bmp", "rgba", "BMP cannot hold RGBA"),
    ("out.jpg", "uint16", "JPEG cannot hold uint16 values"),
    ("out.png", "float32", "PNG cannot hold float32 values"),
    ("out.webp", "grey", "WebP cannot hold grey"),
])
def test_output_is_checked_before_the_work(tmp_path, capsys, no_work, out_name, image, fragment):
    _, noisy = _noisy_grey(16)
    arrays = {"grey": noisy, "rgba": np.dstack([noisy] * 4), "uint16": noisy.astype(np.uint16) * 200,
              "float32": noisy.astype(np.float32) / 255}
    src = tmp_path / ("in.tif" if image in ("float32", "uint16") else "in.png")
    io.imsave(src, arrays[image], check_contrast=False)
    (tmp_path / "sub").mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["denoise", str(src), "--out", str(tmp_path / out_name)]) == 2
    _one_line_error(capsys, "nlref denoise: error:", fragment)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_output_must_not_be_the_input(tmp_path, capsys, no_work):
    _, noisy = _noisy_grey(16)
    src = tmp_path / "photo.png"
    io.imsave(src, noisy, check_contrast=False)
    before = src.read_bytes()
    assert main(["denoise", str(src), "--out", str(tmp_path / "." / "photo.png")]) == 2
    _one_line_error(capsys, "is IMAGE itself: it would overwrite the input")
    assert src.read_bytes() == before


@pytest.mark.parametrize("suffix", [".tif", ".jpg", ".bmp", ".webp"])
def test_every_accepted_extension_is_written_in_its_format(tmp_path, suffix):
    _, grey = _noisy_grey(32)
    noisy = np.dstack([grey, grey[::-1], grey[:, ::-1]])
    src, dst = tmp_path / "in.png", tmp_path / f"out{suffix}"
    io.imsave(src, noisy, check_contrast=False)
    assert main(["denoise", str(src), "--sigma", "15", "--search-size", "5", "--out", str(dst)]) == 0
    magic = {".tif": (b"II*\x00", b"MM\x00*"), ".jpg": (b"\xff\xd8\xff",), ".bmp": (b"BM",), ".webp": (b"RIFF",)}
    assert dst.read_bytes().startswith(magic[suffix])
    assert io.imread(dst).shape == noisy.shape
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.png", dst.name])   # no temporary left


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_failed_write_leaves_the_old_output_and_no_temporary(tmp_path, capsys, monkeypatch, suffix):
    import errno

    import nlref._files as files

    _, noisy = _noisy_grey(16)
    src, dst = tmp_path / "in.png", tmp_path / f"out{suffix}"
    io.imsave(src, noisy, check_contrast=False)
    dst.write_bytes(b"yesterday's result")

    calls, fsync = [], os.fsync

    def full(fd):  # the file written, the disk full when its blocks are allocated (as ext4 and XFS report it)
        calls.append(fd)
        if len(calls) == 1:  # the folder's check before the work: the disk had room then
            return fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    assert main(["denoise", str(src), "--sigma", "15", "--search-size", "3", "--out", str(dst), "--overwrite"]) == 1
    _one_line_error(capsys, f"nlref denoise: error: cannot write {str(dst)!r}: No space left on device; the disk is "
                            "full: free some space there, or write elsewhere")
    assert dst.read_bytes() == b"yesterday's result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", dst.name]


def test_ctrl_c_during_denoise_writes_nothing(tmp_path, capsys, monkeypatch):
    _, noisy = _noisy_grey(16)
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    io.imsave(src, noisy, check_contrast=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nlref, "nl_means", interrupted)
    assert main(["denoise", str(src), "--sigma", "15", "--out", str(dst)]) == 130
    _one_line_error(capsys, "nlref denoise: stopped by SIGINT; nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_jpeg_input_notes_the_low_estimate(tmp_path, capsys):
    """The help's and the note's claim, measured: the noise estimated from a JPEG of an image with 15 grey levels
    of noise reads low; given the level, there is no note."""
    _, noisy = _noisy_grey(32)
    src = tmp_path / "photo.jpg"
    io.imsave(src, noisy, check_contrast=False)
    assert main(["denoise", str(src), "--search-size", "5", "--out", str(tmp_path / "o.png")]) == 0
    out = capsys.readouterr().out
    assert "note: JPEG compression removes part of the noise" in out
    assert float(out.split("sigma ")[1].split()[0]) < 0.9 * nlref.estimate_sigma(noisy)   # reads low
    assert main(["denoise", str(src), "--sigma", "15", "--search-size", "5", "--out", str(tmp_path / "p.png")]) == 0
    assert "JPEG" not in capsys.readouterr().out                      # the noise level was given: no note
    text = " ".join(_help(["denoise"]).split())
    assert "JPEG" in text and "reads low" in text and "--sigma 20" in text


def test_units_mixup_on_the_command_line_is_one_warning_line(tmp_path, capsys):
    _, noisy = _noisy_grey(32)
    src = tmp_path / "in.png"
    io.imsave(src, noisy, check_contrast=False)
    assert main(["denoise", str(src), "--sigma", "0.06", "--search-size", "3", "--out", str(tmp_path / "o.png")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nlref denoise: warning: sigma=0.06 is less than half a unit")
    assert "UserWarning" not in err


@pytest.mark.parametrize("flag, tty, shown", [([], False, False), ([], True, True), (["--no-progress"], True, False)])
def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, flag, tty, shown):
    seen = []
    real = nlref.nl_means

    def spy(*args, **kwargs):
        seen.append(kwargs["progress"])
        return real(*args, **{**kwargs, "progress": False})

    monkeypatch.setattr(nlref, "nl_means", spy)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    assert main(["denoise", "--search-size", "3", "--out", str(tmp_path / "o.png"), *flag]) == 0
    assert seen == [shown]


def test_piped_denoise_prints_no_progress_frames(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nlref.cli", "denoise", "--search-size", "5",
                             "--out", str(tmp_path / "o.png")], capture_output=True, text=True)
    assert result.returncode == 0
    assert "\r" not in result.stderr + result.stdout and "offset" not in result.stderr


# ---- the command line as a whole ----

def _help(words):
    import contextlib
    import io as text_io

    buffer = text_io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code == 0
    return buffer.getvalue()


def _option_entries(text):
    """The option entries of a help text as printed: each ``  --flag ...`` line with its continuation lines."""
    entries = []
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif line.startswith("    ") and entries and not entries[-1].endswith("\n"):
            entries[-1] += " " + line.strip()
        elif entries:
            entries[-1] += "\n"  # a blank line or a group's title ends the entry
    return [" ".join(entry.split()) for entry in entries]


def test_every_flag_of_every_command_shows_its_default():
    """In the help as a user reads it: the commands nlref --help lists, and in each one's help every option (but
    --help) says its default."""
    import re

    top = _help([])
    commands = re.findall(r"^    (\w+)\s", top.split("positional arguments:")[1], re.M)
    assert commands == ["demo", "denoise", "train", "course"]
    for name in commands:
        entries = _option_entries(_help([name]))
        assert len(entries) >= 4 and entries[0].startswith("-h, --help"), entries
        for entry in entries[1:]:
            assert "default" in entry, f"nlref {name}: {entry}"   # "(default: ...)", or "no default"


def test_version_and_plain_description(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"nlref {nlref.__version__}"
    text = _help([])
    assert "``" not in text and ":func:" not in text
    assert "nlref demo" in text and "nlref denoise" in text and "nlref train" in text



def test_the_demo_writes_exactly_the_figures_it_guards(demo_run):
    """nlref demo refuses to replace walk.FIGURES without --overwrite: the list must be what it writes."""
    from nlref.cli.walk import FIGURES

    folder, _ = demo_run
    assert sorted(p.name for p in folder.iterdir()) == sorted(FIGURES)


def test_the_demo_never_replaces_files_without_overwrite(tmp_path, capsys, monkeypatch):
    """A file of the user's named like a demo figure was replaced without a word; --out naming a file gave a raw
    "[Errno 17] File exists"; --out '' wrote into the current folder."""
    import nlref.cli.walk as walk

    monkeypatch.setattr(walk, "run_demo", lambda *a, **k: pytest.fail("the walk ran"))
    (tmp_path / "averaging_curve.png").write_text("precious")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds averaging_curve.png: add --overwrite" in err
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--quick", "--out", str(tmp_path / "file")]) == 2
    assert "--out " in (err := capsys.readouterr().err) and "exists and is not a folder" in err
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--out", ""]) == 2
    assert "--out must name a folder" in capsys.readouterr().err
    assert (tmp_path / "averaging_curve.png").read_text() == "precious"


def test_demo_help_says_what_the_demo_runs(demo_run):
    """Each part of the walk that the help names is shown by the demo's run: a figure or lines of its tables."""
    import re

    folder, printed = demo_run
    text = re.sub(r"-\s+", "-", " ".join(_help(["demo"]).split()))   # the help as read, wherever it wraps
    lines = printed.splitlines()
    shown = {
        "averaging noisy copies": [(folder / "averaging_curve.png").is_file(),
                                   any(line.startswith("mean of 16 noisy copies") for line in lines)],
        "NL-means pixel-wise and patch-wise on the grey camera image": [
            any(line.startswith("NL-means, pixel-wise") and " camera " in line for line in lines),
            any(line.startswith("NL-means, patch-wise") and " camera " in line for line in lines)],
        "and in colour": [any(line.startswith("NL-means, pixel-wise") and " astronaut " in line for line in lines)],
        "the weights of three pixels": [(folder / "nlmeans_weights.png").is_file()],
        "a float64 gradient check of every pairwise function": [
            [line.split()[0] for line in lines if line.endswith("passed")] == list(nlref.nn.nonlocal_op.MODES)],
        "the identity at the start": ["z == x exactly: True" in printed],
        "an embedded-Gaussian block whose attention equals NL-means weights": [
            "attention == NL-means weights" in printed],
        "a short training run of a C2D network with and without a non-local block on the two-sprite task": [
            "training on the two-sprite task" in printed,
            sorted(line[:26].strip() for line in lines if line.startswith(("C2D ", "NL C2D "))) == ["C2D", "NL C2D"]],
        "with its curves": [(folder / "training_curves.png").is_file()],
        "where the trained block attends": [(folder / "training_attention.png").is_file(),
                                             "attention of a sprite-1 query" in printed],
    }
    for part, evidence in shown.items():
        assert part in text, f"the help no longer says {part!r}"
        assert all(evidence), f"the help says {part!r}; the demo's run does not show it"


def test_bad_size_is_an_argparse_message(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["denoise", "--patch-size", "seven"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'seven' is not an int or comma-separated ints" in err and "Traceback" not in err


@pytest.mark.parametrize("shape, photometric, planar, shown", [
    ((3, 16, 16), "minisblack", None, "3-D, denoised as a volume"),
    ((4, 16, 16), "minisblack", None, "3-D, denoised as a volume"),
    ((2, 3, 16, 16), "minisblack", None, "4-D, denoised as a volume"),
    ((16, 16, 3), "rgb", "contig", "colour (RGB)"),
    ((3, 16, 16), "rgb", "separate", "colour (RGB)"),
    # before: the colours of an RGB stack were a fourth spatial axis (patches mixed R, G and B), written back as
    # grey pages; narrow grey volumes were read as RGB (3 columns) or lost their last axis (1 column)
    ((2, 16, 16, 3), "rgb", "contig", "colour (RGB), a stack of 2 frames or slices"),
    ((2, 16, 16, 4), "rgb", "contig", "colour + alpha (RGBA), a stack of 2 frames or slices"),
    ((12, 14, 3), "minisblack", None, "3-D, denoised as a volume"),
    ((12, 14, 1), "minisblack", None, "3-D, denoised as a volume"),
])
def test_tiff_pages_stay_pages_and_samples_stay_samples(tmp_path, capsys, shape, photometric, planar, shown):
    """A stack of 3 or 4 grey pages was read as RGB or RGBA (skimage moves such pages to the last axis),
    denoised as one colour image and written as one: the volume was lost without a word."""
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    data = np.clip(np.round(120 + 20 * rng.standard_normal(shape)), 0, 255).astype(np.uint8)
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    alpha = shape[-1] == 4 and photometric == "rgb"
    tifffile.imwrite(src, data, photometric=photometric, **({"planarconfig": planar} if planar else {}),
                     **({"extrasamples": ["unassalpha"]} if alpha else {}))
    assert main(["denoise", str(src), "--sigma", "20", "--search-size", "5", "--out", str(dst)]) == 0
    assert shown in capsys.readouterr().out
    with tifffile.TiffFile(dst) as tif:
        series = tif.series[0]
        out, axes, written = series.asarray(), series.axes, tif.pages[0].photometric.name
    colour = photometric == "rgb"
    expected = np.moveaxis(data, 0, -1) if planar == "separate" else data
    assert out.shape == expected.shape and ("S" in axes) == colour and written == ("RGB" if colour else "MINISBLACK")
    denoised = expected[..., :3] if alpha else expected
    reference = nlref.nl_means(denoised, sigma=20, search_size=5, channel_axis=-1 if colour else None)
    np.testing.assert_array_equal(out[..., :3] if alpha else out, reference)
    if alpha:
        np.testing.assert_array_equal(out[..., 3], data[..., 3])


def test_grey_and_alpha_tiff_round_trips(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    data = (np.random.default_rng(1).random((16, 16, 2)) * 255).astype(np.uint8)
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(src, data, photometric="minisblack", planarconfig="contig", extrasamples=["unassalpha"])
    assert main(["denoise", str(src), "--sigma", "20", "--search-size", "5", "--out", str(dst)]) == 0
    out = tifffile.imread(dst)
    assert out.shape == (16, 16, 2) and np.array_equal(out[..., 1], data[..., 1])   # alpha kept as it was


def test_a_volume_to_png_is_refused_naming_the_slices(tmp_path, capsys):
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((5, 16, 16), np.uint8), photometric="minisblack")
    assert main(["denoise", str(tmp_path / "v.tif"), "--sigma", "5", "--out", str(tmp_path / "v.png")]) == 2
    assert "PNG cannot hold a volume of 5 slices (it holds grey, grey + alpha, RGB, RGBA); use .tif" in \
        capsys.readouterr().err


@pytest.mark.parametrize("extra, limit, fragment", [
    (["--method", "naive"], None, "--method 'naive' would make 57,600 patch comparisons (limit 50,000"),
    ([], 2**16, "KiB of working memory here (--patch-size (3, 3), --search-size (15, 15), pixel-wise"),
])
def test_a_request_above_nl_means_limits_is_one_line_before_the_work(tmp_path, capsys, monkeypatch, no_work, extra,
                                                                     limit, fragment):
    """Before: nl_means refused it after the report lines, and the command called its ValueError an internal
    error, a bug in nlref (exit status 1)."""
    from nlref.nlmeans import api

    if limit is not None:
        monkeypatch.setattr(api, "available_memory", lambda: limit)
    monkeypatch.setattr(api, "NAIVE_COMPARISON_LIMIT", 50_000)
    _, noisy = _noisy_grey(16)
    src = tmp_path / "in.png"
    io.imsave(src, noisy, check_contrast=False)
    argv = ["denoise", str(src), "--sigma", "15", "--search-size", "15", "--out", str(tmp_path / "o.png")]
    assert main(argv + extra) == 2
    _one_line_error(capsys, "nlref denoise: error:", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def _png_by_hand(path, array):
    """A PNG written byte by byte (no filter, one IDAT chunk), whatever the bit depth and channels."""
    import struct
    import zlib

    height, width = array.shape[:2]
    colour_type = {2: 0, 3: {2: 4, 3: 2, 4: 6}.get(array.shape[-1])}[array.ndim]
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    raw = b"".join(b"\x00" + big_endian[row].tobytes() for row in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8 * array.dtype.itemsize, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels, what", [(2, "grey + alpha"), (3, "RGB"), (4, "RGBA")])
def test_a_16_bit_colour_png_is_refused_not_read_as_8_bits(tmp_path, capsys, no_work, channels, what):
    """Before: read as uint8 (Pillow keeps the high byte only; grey + alpha even came back as RGBA), denoised and
    written as 8 bits without a word. OpenCV reads such a file as uint16."""
    values = (np.random.default_rng(channels).random((16, 16, channels)) * 65535).astype(np.uint16)
    src = tmp_path / "deep.png"
    _png_by_hand(src, values)
    assert main(["denoise", str(src), "--sigma", "500", "--out", str(tmp_path / "o.tif")]) == 2
    _one_line_error(capsys, f"'{src}' is a 16-bit {what} PNG", "reads only as 8 bits", "16-bit TIFF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.png"]


def test_16_bit_grey_and_8_bit_colour_pngs_are_read_whole(tmp_path):
    rng = np.random.default_rng(0)
    for name, values in (("grey16.png", (rng.random((16, 16)) * 65535).astype(np.uint16)),
                         ("rgb8.png", (rng.random((16, 16, 3)) * 255).astype(np.uint8))):
        _png_by_hand(tmp_path / name, values)
        out = tmp_path / f"{name}.tif"
        assert main(["denoise", str(tmp_path / name), "--sigma", "1", "--h", "1e-3", "--out", str(out)]) == 0
        np.testing.assert_array_equal(io.imread(out), values)  # an h this small keeps every value


@pytest.mark.parametrize("samples, photometric, what", [(2, "minisblack", "grey + alpha"), (3, "rgb", "RGB"),
                                                        (4, "rgb", "RGBA")])
def test_16_bit_colour_to_png_is_refused_before_the_work(tmp_path, capsys, no_work, samples, photometric, what):
    """Before: accepted, denoised, then Pillow's TypeError ('Cannot handle this data type') after the work,
    reported as a bug in nlref (exit status 1)."""
    tifffile = pytest.importorskip("tifffile")
    values = (np.random.default_rng(samples).random((16, 16, samples)) * 65535).astype(np.uint16)
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, values, photometric=photometric, planarconfig="contig",
                     **({"extrasamples": ["unassalpha"]} if samples in (2, 4) else {}))
    assert main(["denoise", str(src), "--sigma", "500", "--out", str(tmp_path / "o.png")]) == 2
    _one_line_error(capsys, "--out", "holds 16 bits for grey only", f"not for {what}; use .tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_gif_frames_are_colour_images_not_a_volume(tmp_path, capsys):
    """The reader gives a GIF as (frames, H, W, 3), one frame too. Before: a 4-D volume whose colours were a
    spatial axis, written as grey pages; a one-frame GIF could not be written as PNG ('a 4-D array')."""
    imageio = pytest.importorskip("imageio.v3")
    rng = np.random.default_rng(0)
    frames = np.clip(np.round(120 + 20 * rng.standard_normal((3, 20, 24, 3))), 0, 255).astype(np.uint8)
    for name, written in (("one.gif", frames[:1]), ("three.gif", frames)):
        imageio.imwrite(tmp_path / name, written, loop=0)
    as_read = io.imread(tmp_path / "three.gif")
    assert as_read.shape == (3, 20, 24, 3) and io.imread(tmp_path / "one.gif").shape == (1, 20, 24, 3)

    assert main(["denoise", str(tmp_path / "one.gif"), "--sigma", "20", "--search-size", "5",
                 "--out", str(tmp_path / "one.png")]) == 0
    assert "read one.gif: (20, 24, 3) uint8, colour (RGB)" in capsys.readouterr().out
    np.testing.assert_array_equal(io.imread(tmp_path / "one.png"), nlref.nl_means(
        io.imread(tmp_path / "one.gif")[0], sigma=20, search_size=5, channel_axis=-1))

    tifffile = pytest.importorskip("tifffile")
    assert main(["denoise", str(tmp_path / "three.gif"), "--sigma", "20", "--search-size", "5",
                 "--out", str(tmp_path / "three.tif")]) == 0
    assert "colour (RGB), a stack of 3 frames or slices" in capsys.readouterr().out
    with tifffile.TiffFile(tmp_path / "three.tif") as tif:
        out, axes = tif.series[0].asarray(), tif.series[0].axes
    assert axes.endswith("YXS") and tif.pages[0].photometric.name == "RGB"
    np.testing.assert_array_equal(out, nlref.nl_means(as_read, sigma=20, search_size=5, channel_axis=-1))
    assert main(["denoise", str(tmp_path / "three.gif"), "--sigma", "20", "--out", str(tmp_path / "three.png")]) == 2
    assert "PNG cannot hold a stack of 3 RGB images" in capsys.readouterr().err


@pytest.mark.parametrize("name, photometric, what", [
    ("in.tif", "palette", "photometric PALETTE (indices into a colour table)"),
    ("in.tif", "miniswhite", "photometric MINISWHITE (grey with 0 as white)"),
    ("in.tif", "cielab", "photometric CIELAB (CIELAB colours)"),
    ("in.tif", "separated", "photometric SEPARATED (CMYK)"),
    ("in.jpg", "CMYK", "is a CMYK image"),
])
def test_values_that_are_not_grey_or_rgb_are_refused(tmp_path, capsys, no_work, name, photometric, what):
    """Before: palette indices were denoised as grey levels and written as grey, white-is-zero grey was written
    back inverted (minisblack), CIELAB written as RGB, and CMYK (TIFF or JPEG) taken for RGBA: C, M, Y written
    as R, G, B and K kept as alpha."""
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    src = tmp_path / name
    if photometric == "CMYK":
        from PIL import Image

        Image.fromarray((rng.random((16, 16, 4)) * 255).astype(np.uint8), mode="CMYK").save(src)
    else:
        samples = {"cielab": 3, "separated": 4}.get(photometric)
        values = (rng.random((16, 16, samples) if samples else (16, 16)) * 255).astype(np.uint8)
        colormap = {"colormap": np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1))} if photometric == "palette" \
            else {}
        tifffile.imwrite(src, values, photometric=photometric, **colormap)
    assert main(["denoise", str(src), "--sigma", "10", "--out", str(tmp_path / "o.tif")]) == 2
    _one_line_error(capsys, f"IMAGE '{src}'", what, "convert it to")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("name, written_as, fourcc, kind", [
    ("clip.mp4", "clip.mp4", "mp4v", "MP4"),
    ("clip.avi", "clip.avi", "MJPG", "AVI"),
    ("frames", "frames.avi", "MJPG", "AVI"),      # no extension: the header says it
    ("clip.mov", "clip.mp4", "mp4v", "MP4"),      # the header, not the name
])
def test_a_video_file_without_a_video_plugin_names_what_to_install(tmp_path, capsys, monkeypatch, no_work, name,
                                                                    written_as, fourcc, kind):
    """An MP4 or AVI (written by OpenCV) when imageio has no video plugin (PyAV, imageio-ffmpeg). Before: "it is
    not an image in a format the reader knows (PNG, JPEG, TIFF, BMP, GIF, WebP, ...), or it is damaged"."""
    cv2 = pytest.importorskip("cv2")
    import nlref.cli as cli

    # the module of the check, where there is one (none before it was written)
    monkeypatch.setattr(getattr(cli, "_formats", cli), "_video_plugin", lambda: False, raising=False)  # as here, where neither is installed
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)
    writer = cv2.VideoWriter(str(tmp_path / written_as), cv2.VideoWriter_fourcc(*fourcc), 10, (48, 32))
    for frame in frames:
        writer.write(frame)
    writer.release()
    src = tmp_path / name
    (tmp_path / written_as).rename(src)
    assert src.stat().st_size > 0
    assert main(["denoise", str(src), "--out", str(tmp_path / "o.tif")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"nlref denoise: error: IMAGE {str(src)!r} is a video file ({kind}), which the reader (imageio) "
                     "reads only with a video plugin, and none is installed: pip install av (or imageio-ffmpeg); or "
                     "save its frames as an animated GIF, a multi-page TIFF or a .npy of (frames, H, W, 3) and "
                     "denoise that"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_the_parameter_line_says_what_the_search_does_along_the_frames(tmp_path, capsys):
    """A video's report said ``patch (3, 5, 5), search (5, 21, 21)`` and left the reader to work out that the
    first number is frames; a clip of two frames (its window clipped to one frame) said nothing of being
    denoised frame by frame. In memory and chunked alike."""
    tifffile = pytest.importorskip("tifffile")
    clip = np.round(255 * nlref.data.video(4, 24)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "clip.tif", clip, photometric="minisblack")  # 4 pages, not planar RGBA
    tifffile.imwrite(tmp_path / "two.tif", clip[:2], photometric="minisblack")
    np.save(tmp_path / "clip.npy", np.stack([clip] * 3, axis=-1))
    runs = [("clip.tif", "a.tif", [], "; the first axis (frames or slices): a window of 3 around each, patches 3 "
                                      "deep, reflected at its ends"),
            ("clip.tif", "b.tif", ["--patch-size", "1,5,5"], "a window of 3 around each, 2-D patches"),
            ("two.tif", "c.tif", [], "; each frame or slice searched alone (a window 1 wide along the first axis)"),
            ("clip.npy", "d.zarr", ["--chunks", "2,24,24"], "; the first axis (frames or slices): a window of 3 "
                                                            "around each, patches 3 deep")]
    for source, out, flags, expected in runs:
        assert main(["denoise", str(tmp_path / source), "--sigma", "20", *flags, "--out", str(tmp_path / out)]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sigma "))
        assert expected in line, line
    image = np.round(255 * nlref.data.camera()[:24, :24]).astype(np.uint8)
    io.imsave(tmp_path / "grey.png", image, check_contrast=False)
    assert main(["denoise", str(tmp_path / "grey.png"), "--sigma", "20", "--out", str(tmp_path / "e.png")]) == 0
    assert "frames" not in capsys.readouterr().out
