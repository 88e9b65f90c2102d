import subprocess
import sys

import numpy as np
import pytest
from skimage import io

import nlref
from nlref.cli import main


def test_demo_quick_writes_figures_and_table(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
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
    assert main(["denoise", "--search-size", "5", "--out", str(tmp_path / "c.png")]) == 0
    assert "PSNR" in capsys.readouterr().out


def test_denoise_bad_arguments(tmp_path, capsys):
    assert main(["denoise", "--patch-size", "4", "--out", str(tmp_path / "x.png")]) == 2
    assert "patch_size=4" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="is not a file"):
        main(["denoise", str(tmp_path / "missing.png")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["denoise", "--search-size", "3", "--out", str(tmp_path / "no" / "such" / "x.png")])


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "nlref.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout
