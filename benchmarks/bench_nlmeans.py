"""NL-means speed and quality: nlref next to scikit-image and OpenCV.

Every peer runs in this one process on the same noisy float32 input (seeded
Gaussian noise added to nlref's bundled test signals, values in [0, 1]):

1. **Speed** on ``camera`` 512x512 at sigma = 20/255 with fixed sizes for all
   peers (7x7 patch, 21x21 search window): nlref pixel-wise (default threads
   and one thread), nlref patch-wise, scikit-image ``denoise_nl_means`` fast
   mode and OpenCV ``fastNlMeansDenoising``; then scikit-image's slow mode on
   a 128x128 crop, next to nlref and scikit-image's fast mode on that crop.
   Each peer runs at the h with its best PSNR on a small sweep (one run per h),
   then is timed at that h: 1 warm-up, then the median of ``--repeats`` runs.
   nlref also runs with nothing but ``sigma`` (the presets choose sizes and h).
   Where Numba is installed (nlref's default engine on NumPy arrays), the nlref
   rows run again with ``NLREF_NLMEANS_ENGINE=numpy`` (what Numba buys), and a
   fresh process with an empty Numba cache times the first call (compilation).
2. **Quality** at sigma = 10, 20, 30 (/255) on ``camera`` (grey) and
   ``astronaut`` (colour): nlref from ``sigma`` alone against the peers at
   their best h.
3. **Volume** ``nlref.data.volume()`` at sigma = 0.1: nlref against
   scikit-image's 3-D ``denoise_nl_means``.
4. **Video** ``nlref.data.video()`` at sigma = 20/255: nlref on the (T, H, W)
   clip against OpenCV ``fastNlMeansDenoisingMulti`` (5-frame window) and
   scikit-image frame by frame; PSNR over the frames every method can output.

OpenCV works on uint8: the noisy image is rounded and clipped to 0..255 before
it is handed over (outside the timing), and its output is divided by 255 before
PSNR/SSIM are computed against the clean float image. OpenCV's h is in grey
levels. Without OpenCV installed its rows are skipped.

The output is Markdown, ready to paste into docs/benchmarks.md::

    python benchmarks/bench_nlmeans.py            # full run, a few minutes on 2 cores
    python benchmarks/bench_nlmeans.py --quick    # smoke test, small crops (< 30 s)
    python benchmarks/bench_nlmeans.py --repeats 9
    python benchmarks/bench_nlmeans.py --plot docs/images/nlmeans_time_vs_size.png

With ``--plot PATH`` the script runs only a size sweep instead of the tables:
nlref (pixel-wise, default threads and one thread), scikit-image's fast mode
and OpenCV, all at 7x7 patches and 21x21 search windows, timed on central
crops of ``camera`` from 64x64 to 512x512 and on a 1024x1024 mirror-tiled
camera (1 warm-up, then the median of ``--repeats`` runs). It prints the table
and saves a log-log figure of time against the number of pixels to PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import skimage
from skimage.metrics import structural_similarity
from skimage.restoration import denoise_nl_means

import nlref
from _args import figure_path, seed_arg, whole
from ceiling import copy_gbs, median_seconds
from nlref._files import replaced_atomically

# ---------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------

#: h / sigma values swept for nlref and scikit-image (h in image units).
H_FACTORS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0, 1.2)
#: h / sigma_255 values swept for OpenCV (h in grey levels, no sigma correction).
CV_FACTORS = (0.4, 0.55, 0.7, 0.8, 0.9, 1.0, 1.15, 1.3)


@dataclass(frozen=True)
class Settings:
    """Sizes, sweeps and repeat counts for one run (full or --quick)."""

    image_size: int | None  # central crop of camera/astronaut; None: the whole 512x512
    slow_crop: int  # crop for scikit-image's slow mode
    volume_shape: tuple
    video_size: int
    h_factors: tuple
    cv_factors: tuple
    repeats: int  # speed section: median of this many runs after one warm-up
    quality_repeats: int  # quality, volume and video sections
    sigmas_255: tuple = (10, 20, 30)
    seed: int = 0


def settings_from_args(args):
    if args.quick:
        return Settings(image_size=128, slow_crop=48, volume_shape=(16, 32, 32), video_size=48,
                        h_factors=(0.4, 0.6, 0.85), cv_factors=(0.7, 1.0), repeats=1, quality_repeats=1,
                        seed=args.seed)
    return Settings(image_size=None, slow_crop=128, volume_shape=(48, 64, 64), video_size=128,
                    h_factors=H_FACTORS, cv_factors=CV_FACTORS, repeats=args.repeats, quality_repeats=3,
                    seed=args.seed)


# ---------------------------------------------------------------------------
# small helpers: OpenCV, images, timing, metrics, tables
# ---------------------------------------------------------------------------


def import_cv2():
    """The cv2 module, or None when OpenCV is not installed."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def central_crop(image, size):
    """The central ``size`` x ``size`` window of the first two axes (None: no crop)."""
    if size is None:
        return image
    r0, c0 = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return np.ascontiguousarray(image[r0 : r0 + size, c0 : c0 + size, ...])


def to_uint8(image):
    """[0, 1] float -> uint8 grey levels, rounded and clipped (OpenCV's input)."""
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def time_call(fn, *, repeats, warmup=1):
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    Returns (seconds, result of the last run).
    """
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def ssim(clean, estimate, colour):
    return float(structural_similarity(clean, estimate, data_range=1.0, channel_axis=-1 if colour else None))


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_sizes(patch, search):
    def one(s):
        return "x".join(str(n) for n in s) if isinstance(s, tuple) else f"{s}x{s}"

    return f"patch {one(patch)}, search {one(search)}"


def shape_text(a):
    return "x".join(str(n) for n in a.shape)


# ---------------------------------------------------------------------------
# peers: a name, a call h -> raw output (the timed part), and an h grid
# ---------------------------------------------------------------------------


@dataclass
class Peer:
    """One denoiser, ready to run on an input it has already captured.

    ``run(h)`` is the timed call; ``finish(raw)`` turns its output into a float
    array comparable with the clean reference (outside the timing). An empty
    ``grid`` means h is not swept (``run(None)``, e.g. nlref from sigma alone).
    """

    name: str
    params: str
    threads: int
    run: Callable[[Any], Any]
    grid: Sequence[float] = ()
    finish: Callable[[Any], np.ndarray] = field(default=lambda raw: raw)
    h_text: Callable[[float], str] = field(default=lambda h: f"{h:.4f}")


@dataclass
class Result:
    name: str
    params: str
    threads: int
    h: str
    seconds: float
    estimate: np.ndarray


def best_h(peer, clean):
    """The grid value with the best PSNR (one run each) and whether it is a grid end."""
    scores = [nlref.psnr(clean, peer.finish(peer.run(h))) for h in peer.grid]
    i = int(np.argmax(scores))
    return peer.grid[i], i in (0, len(peer.grid) - 1) and len(peer.grid) > 1


def measure(peer, clean, *, repeats, warmup=1, h=None):
    """Sweep h (unless given or the peer has no grid), then time at that h."""
    edge = False
    if h is None and peer.grid:
        h, edge = best_h(peer, clean)
    seconds, raw = time_call(lambda: peer.run(h), repeats=repeats, warmup=warmup)
    if h is None:
        h_text = "from sigma"
    else:
        h_text = peer.h_text(h) + (" (grid end)" if edge else "")
    return Result(peer.name, peer.params, peer.threads, h_text, seconds, peer.finish(raw)), h


def default_workers():
    """nlref's default thread count (nl_means: the CPU count, at most 8)."""
    return min(os.cpu_count() or 1, 8)


def engine_text():
    """The engine nlref's fast method uses on NumPy arrays in this process, with Numba's version."""
    from nlref.backend import array_namespace
    from nlref.nlmeans.fast import resolve_engine

    engine = resolve_engine(array_namespace(np.zeros(1)))
    if engine == "numba":
        import numba

        return f"numba {numba.__version__}"
    return "numpy"


@contextlib.contextmanager
def nlref_engine(engine):
    """Run nlref with NLREF_NLMEANS_ENGINE = ``engine`` (None: leave the process's setting)."""
    from nlref.nlmeans.fast import ENGINE_VARIABLE

    if engine is None:
        yield
        return
    before = os.environ.get(ENGINE_VARIABLE)
    os.environ[ENGINE_VARIABLE] = engine
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENGINE_VARIABLE]
        else:
            os.environ[ENGINE_VARIABLE] = before


def numba_compile_seconds():
    """First and second call, in a fresh process with an empty Numba cache, of nl_means (grey 64x64,
    pixel-wise and patch-wise, float32): the first compiles the kernels. None without Numba."""
    if importlib.util.find_spec("numba") is None:
        return None
    code = ("import time, numpy as np, nlref\n"
            "x = nlref.add_gaussian_noise(nlref.data.camera()[:64, :64], 0.08, seed=0).astype(np.float32)\n"
            "out = []\n"
            "for _ in range(2):\n"
            "    t = time.perf_counter()\n"
            "    for a in ('pixel', 'patch'):\n"
            "        nlref.nl_means(x, sigma=0.08, patch_size=7, search_size=21, aggregation=a)\n"
            "    out.append(time.perf_counter() - t)\n"
            "print(out[0], out[1])\n")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, NLREF_NLMEANS_ENGINE="numba")
        runs = []
        for _ in range(2):  # the second process finds the kernels in the cache
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            runs.append([float(t) for t in done.stdout.split()])
    return runs[0][0], runs[0][1], runs[1][0]


def nlref_peer(noisy, sigma, *, channel_axis=None, aggregation="pixel", patch=None, search=None,
               workers=None, factors=(), name=None, finish=None, engine=None):
    """nlref.nl_means; with ``patch``/``search`` None, sizes come from the presets.

    ``engine``: "numpy" or "numba" forces that engine of the fast method (None: the default, "auto").
    """
    if patch is None:
        p = nlref.resolve_parameters(noisy, sigma=sigma, channel_axis=channel_axis, aggregation=aggregation)
        params = fmt_sizes(p["patch_size"], p["search_size"]) + " (presets)"
    else:
        params = fmt_sizes(patch, search)

    def run(h):
        with nlref_engine(engine):
            return nlref.nl_means(noisy, sigma=sigma, h=h, patch_size=patch, search_size=search,
                                  channel_axis=channel_axis, aggregation=aggregation, workers=workers)

    return Peer(
        name=name or f"nlref {aggregation}-wise",
        params=params,
        threads=workers or default_workers(),
        run=run,
        grid=tuple(f * sigma for f in factors),
        finish=finish or (lambda raw: raw),
        h_text=lambda h: f"{h:.4f} ({h / sigma:.2f} sigma)",
    )


def skimage_peer(noisy, sigma, *, patch=7, distance=10, fast_mode=True, channel_axis=None, factors=()):
    """scikit-image denoise_nl_means (``patch_distance`` is the search radius)."""

    def run(h):
        return denoise_nl_means(noisy, patch_size=patch, patch_distance=distance, h=h, sigma=sigma,
                                fast_mode=fast_mode, channel_axis=channel_axis)

    search = 2 * distance + 1
    return Peer(
        name=f"scikit-image {'fast' if fast_mode else 'slow'} mode",
        params=fmt_sizes((patch,) * (noisy.ndim - (channel_axis is not None)),
                         (search,) * (noisy.ndim - (channel_axis is not None))),
        threads=1,
        run=run,
        grid=tuple(f * sigma for f in factors),
        h_text=lambda h: f"{h:.4f} ({h / sigma:.2f} sigma)",
    )


def opencv_peer(cv2, noisy, sigma, *, colour=False, factors=()):
    """cv2.fastNlMeansDenoising(Colored) on the uint8 image, 7x7 template, 21x21 search.

    For colour, ``hColor = h`` (both swept together); the RGB image is handed
    over as BGR (OpenCV's order) and turned back.
    """
    sigma_255 = sigma * 255.0
    if colour:
        bgr = np.ascontiguousarray(to_uint8(noisy)[..., ::-1])

        def run(h):
            return cv2.fastNlMeansDenoisingColored(bgr, None, h, h, 7, 21)

        def finish(raw):
            return raw[..., ::-1].astype(np.float32) / 255.0
    else:
        grey = to_uint8(noisy)

        def run(h):
            return cv2.fastNlMeansDenoising(grey, None, h=h, templateWindowSize=7, searchWindowSize=21)

        def finish(raw):
            return raw.astype(np.float32) / 255.0

    return Peer(
        name="OpenCV fastNlMeansDenoising" + ("Colored (hColor = h)" if colour else ""),
        params=fmt_sizes(7, 21) + ", uint8 input",
        threads=cv2.getNumThreads(),
        run=run,
        grid=tuple(f * sigma_255 for f in factors),
        finish=finish,
        h_text=lambda h: f"{h:.1f} grey levels ({h / sigma_255:.2f} sigma)",
    )


# ---------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------


def load_average():
    try:
        return "{:.2f} / {:.2f} / {:.2f} (1 / 5 / 15 min)".format(*os.getloadavg())
    except (AttributeError, OSError):
        return "unknown"


def header(cv2):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cv_version = cv2.__version__ if cv2 is not None else "not installed"
    cv_threads = cv2.getNumThreads() if cv2 is not None else "-"
    lines = [
        "# NL-means benchmark: nlref, scikit-image, OpenCV",
        "",
        f"- command: `{shlex.join(['python'] + sys.argv)}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; load average at start {load_average()} "
        "(another busy process slows every timing)",
        f"- versions: nlref {nlref.__version__}, numpy {np.__version__}, scikit-image {skimage.__version__}, "
        f"opencv {cv_version}",
        f"- nlref engine of the fast method on NumPy arrays: {engine_text()} (`NLREF_NLMEANS_ENGINE`, default auto; "
        "rows marked 'NumPy engine' force the pure-NumPy one)",
        f"- threads: nlref workers = {default_workers()} by default; OpenCV cv2.getNumThreads() = {cv_threads}; "
        "scikit-image denoise_nl_means = 1 (single-threaded Cython)",
        "- dtype: float32 images in [0, 1] (OpenCV: the same noisy image rounded to uint8); "
        "seeded Gaussian noise, not clipped",
        "- h: each peer's best-PSNR h from a sweep (one run per h); nlref also from `sigma` alone (presets). "
        "'grid end' marks a best h at an end of the sweep",
    ]
    if cv2 is None:
        lines.append("- **OpenCV is not installed: its rows are skipped.**")
    return "\n".join(lines)


def result_row(r, reference_seconds, clean, colour, image_text):
    return [r.name, image_text, r.params, r.h, r.threads, f"{r.seconds:.3f}", f"{r.seconds / reference_seconds:.2f}",
            f"{nlref.psnr(clean, r.estimate):.2f}", f"{ssim(clean, r.estimate, colour):.4f}"]


def noisy_row(noisy, clean, colour, image_text):
    """The input itself, as a baseline row of the speed table (5 empty columns)."""
    return ["noisy input", image_text] + ["-"] * 5 + [f"{nlref.psnr(clean, noisy):.2f}",
                                                      f"{ssim(clean, noisy, colour):.4f}"]


def section_speed(cfg, cv2):
    """Section 1: fixed 7x7 / 21x21 on camera at sigma 20/255."""
    sigma = 20 / 255
    clean = central_crop(nlref.data.camera(), cfg.image_size)
    noisy = nlref.add_gaussian_noise(clean, sigma, seed=cfg.seed)
    f, reps = cfg.h_factors, cfg.repeats

    sk, _ = measure(skimage_peer(noisy, sigma, factors=f), clean, repeats=reps)
    px, h_px = measure(nlref_peer(noisy, sigma, patch=7, search=21, factors=f), clean, repeats=reps)
    px1, _ = measure(nlref_peer(noisy, sigma, patch=7, search=21, workers=1, factors=f, name="nlref pixel-wise"),
                     clean, repeats=reps, h=h_px)
    patch, h_patch = measure(nlref_peer(noisy, sigma, aggregation="patch", patch=7, search=21, factors=f), clean,
                             repeats=reps)
    results = [px, px1, patch, sk]
    cv = None
    if cv2 is not None:
        cv = measure(opencv_peer(cv2, noisy, sigma, factors=cfg.cv_factors), clean, repeats=reps)[0]
        results.append(cv)
    for aggregation in ("pixel", "patch"):
        peer = nlref_peer(noisy, sigma, aggregation=aggregation, name=f"nlref {aggregation}-wise, defaults")
        results.append(measure(peer, clean, repeats=reps)[0])
    if engine_text() != "numpy":  # the same calls on the pure-NumPy engine: what Numba buys
        results.append(measure(nlref_peer(noisy, sigma, patch=7, search=21, engine="numpy",
                                          name="nlref pixel-wise, NumPy engine"), clean, repeats=reps, h=h_px)[0])
        results.append(measure(nlref_peer(noisy, sigma, aggregation="patch", patch=7, search=21, engine="numpy",
                                          name="nlref patch-wise, NumPy engine"), clean, repeats=reps, h=h_patch)[0])
        for aggregation in ("pixel", "patch"):
            peer = nlref_peer(noisy, sigma, aggregation=aggregation, engine="numpy",
                              name=f"nlref {aggregation}-wise, defaults, NumPy engine")
            results.append(measure(peer, clean, repeats=reps)[0])

    image_text = shape_text(clean)
    cols = ["method", "image", "sizes", "h", "threads", "time median (s)", "time / skimage fast",
            "time / OpenCV", "PSNR (dB)", "SSIM"]
    rows = [noisy_row(noisy, clean, False, image_text)]
    rows[0][7:7] = ["-"]
    for r in results:
        row = result_row(r, sk.seconds, clean, False, image_text)
        rows.append(row[:7] + [f"{r.seconds / cv.seconds:.2f}" if cv is not None else "-"] + row[7:])
    caption = (f"## 1. Speed: camera {image_text}, sigma = 20/255, float32\n\n"
               f"Fixed sizes for every peer except the 'defaults' rows (nlref from `sigma` alone). "
               f"Time: 1 warm-up, then the median of {reps} runs (time.perf_counter). "
               "'time / skimage fast' < 1 means faster than scikit-image's fast mode. "
               "The single-thread nlref row and the NumPy-engine rows reuse the h of the same sizes above.")
    return caption + "\n\n" + markdown_table(cols, rows) + "\n\n" + section_slow(cfg, clean, noisy, sigma)


def section_slow(cfg, clean_full, noisy_full, sigma):
    """Section 1b: scikit-image's slow mode on a small crop, with nlref and fast mode there."""
    clean = central_crop(clean_full, cfg.slow_crop)
    noisy = central_crop(noisy_full, cfg.slow_crop)
    f, reps = cfg.h_factors, cfg.repeats
    fast, _ = measure(skimage_peer(noisy, sigma, factors=f), clean, repeats=reps)
    slow, _ = measure(skimage_peer(noisy, sigma, fast_mode=False, factors=f), clean, repeats=reps)
    px, _ = measure(nlref_peer(noisy, sigma, patch=7, search=21, factors=f), clean, repeats=reps)
    patch, _ = measure(nlref_peer(noisy, sigma, aggregation="patch", patch=7, search=21, factors=f), clean,
                       repeats=reps)
    others = []
    if engine_text() != "numpy":
        others.append(measure(nlref_peer(noisy, sigma, patch=7, search=21, factors=f, engine="numpy",
                                         name="nlref pixel-wise, NumPy engine"), clean, repeats=reps)[0])
    image_text = shape_text(clean)
    cols = ["method", "image", "sizes", "h", "threads", "time median (s)", "time / skimage fast",
            "time / skimage slow", "PSNR (dB)", "SSIM"]
    rows = []
    for r in (px, patch, *others, fast, slow):
        row = result_row(r, fast.seconds, clean, False, image_text)
        rows.append(row[:7] + [f"{r.seconds / slow.seconds:.3f}"] + row[7:])
    caption = (f"### 1b. scikit-image slow mode: central {image_text} crop of the same noisy camera\n\n"
               "Slow mode weighs the patch distance with a Gaussian over the patch (a different estimator). "
               f"Time: 1 warm-up, then the median of {reps} runs.")
    return caption + "\n\n" + markdown_table(cols, rows)


def section_quality(cfg, cv2):
    """Section 2: PSNR/SSIM at several noise levels, grey and colour."""
    reps = cfg.quality_repeats
    cols = ["image", "sigma (/255)", "method", "sizes", "h", "time median (s)", "PSNR (dB)", "SSIM"]
    rows = []
    for image_name, load, colour in (("camera", nlref.data.camera, False), ("astronaut", nlref.data.astronaut, True)):
        clean = central_crop(load(), cfg.image_size)
        channel_axis = -1 if colour else None
        for sigma_255 in cfg.sigmas_255:
            sigma = sigma_255 / 255
            noisy = nlref.add_gaussian_noise(clean, sigma, seed=cfg.seed)
            peers = [nlref_peer(noisy, sigma, channel_axis=channel_axis, aggregation=a,
                                name=f"nlref {a}-wise, defaults") for a in ("pixel", "patch")]
            peers.append(skimage_peer(noisy, sigma, channel_axis=channel_axis, factors=cfg.h_factors))
            if cv2 is not None:
                peers.append(opencv_peer(cv2, noisy, sigma, colour=colour, factors=cfg.cv_factors))
            label = f"{image_name} {shape_text(clean)}"
            rows.append([label, sigma_255, "noisy input", "-", "-", "-", f"{nlref.psnr(clean, noisy):.2f}",
                         f"{ssim(clean, noisy, colour):.4f}"])
            for peer in peers:
                # a sweep has already run the peer: it serves as the warm-up
                r, _ = measure(peer, clean, repeats=reps, warmup=0 if peer.grid else 1)
                rows.append([label, sigma_255, r.name, r.params, r.h, f"{r.seconds:.3f}",
                             f"{nlref.psnr(clean, r.estimate):.2f}", f"{ssim(clean, r.estimate, colour):.4f}"])
    caption = ("## 2. Quality at several noise levels\n\n"
               "nlref from `sigma` alone (presets pick sizes and h) against scikit-image (fast mode) and "
               "OpenCV, each at its best-PSNR h from a sweep (an oracle choice nlref does not get). "
               f"Time: median of {reps} runs (after a warm-up, or after the sweep). Colour: channel_axis=-1; "
               "OpenCV's colour variant denoises an 8-bit CIELAB copy (h for L, hColor for a and b).")
    return caption + "\n\n" + markdown_table(cols, rows)


def section_volume(cfg):
    """Section 3: a 3-D volume, nlref against scikit-image's N-d NL-means."""
    sigma = 0.1
    clean = nlref.data.volume(cfg.volume_shape)
    noisy = nlref.add_gaussian_noise(clean, sigma, seed=cfg.seed)
    reps = cfg.quality_repeats
    peers = [nlref_peer(noisy, sigma, aggregation=a, name=f"nlref {a}-wise, defaults") for a in ("pixel", "patch")]
    peers += [skimage_peer(noisy, sigma, patch=p, distance=d, factors=cfg.h_factors) for p, d in ((3, 2), (5, 3))]
    results = [measure(p, clean, repeats=reps, warmup=0 if p.grid else 1)[0] for p in peers]
    reference = results[-1].seconds
    cols = ["method", "volume", "sizes", "h", "threads", "time median (s)", "time / skimage (5, 3)", "PSNR (dB)"]
    rows = [["noisy input", shape_text(clean), "-", "-", "-", "-", "-", f"{nlref.psnr(clean, noisy):.2f}"]]
    rows += [[r.name, shape_text(clean), r.params, r.h, r.threads, f"{r.seconds:.3f}",
              f"{r.seconds / reference:.2f}", f"{nlref.psnr(clean, r.estimate):.2f}"] for r in results]
    caption = (f"## 3. Volume: nlref.data.volume() {shape_text(clean)}, sigma = 0.1\n\n"
               "scikit-image `denoise_nl_means` on the 3-D array (fast mode; patch_size, patch_distance) = "
               "(3, 2) and (5, 3), best h from a sweep. "
               f"Time: median of {reps} runs (after a warm-up, or after the sweep).")
    return caption + "\n\n" + markdown_table(cols, rows)


def section_video(cfg, cv2):
    """Section 4: an 8-frame clip; PSNR over the frames OpenCV's 5-frame window can output."""
    sigma = 20 / 255
    clip = nlref.data.video(frames=8, size=cfg.video_size)
    noisy = nlref.add_gaussian_noise(clip, sigma, seed=cfg.seed)
    targets = range(2, 6)  # a 5-frame window centred on t fits inside the 8 frames
    clean = clip[2:6]
    reps = cfg.quality_repeats

    def frames_2_to_5(out):
        return out[2:6]

    peers = [nlref_peer(noisy, sigma, name="nlref pixel-wise, defaults", finish=frames_2_to_5)]
    for patch in ((1, 5, 5), (3, 5, 5)):
        peers.append(nlref_peer(noisy, sigma, patch=patch, search=(5, 21, 21), factors=cfg.h_factors,
                                name="nlref pixel-wise", finish=frames_2_to_5))
    frame_by_frame = [skimage_peer(noisy[t], sigma, factors=cfg.h_factors) for t in targets]
    peers.append(Peer(
        name="scikit-image fast mode, frame by frame",
        params=frame_by_frame[0].params,
        threads=1,
        run=lambda h: np.stack([p.run(h) for p in frame_by_frame]),
        grid=frame_by_frame[0].grid,
        h_text=frame_by_frame[0].h_text,
    ))
    if cv2 is not None:
        frames_u8 = [to_uint8(f) for f in noisy]
        peers.append(Peer(
            name="OpenCV fastNlMeansDenoisingMulti, temporalWindowSize=5",
            params="template 7x7, search 21x21, uint8 input",
            threads=cv2.getNumThreads(),
            run=lambda h: [cv2.fastNlMeansDenoisingMulti(frames_u8, t, 5, None, h, 7, 21) for t in targets],
            grid=tuple(f * 20 for f in cfg.cv_factors),
            finish=lambda raw: np.stack(raw).astype(np.float32) / 255.0,
            h_text=lambda h: f"{h:.1f} grey levels ({h / 20:.2f} sigma)",
        ))
    # nlref denoises all frames of the clip; the peers only frames 2..5
    frames = [clip.shape[0] if p.name.startswith("nlref") else len(targets) for p in peers]
    results = [measure(p, clean, repeats=reps, warmup=0 if p.grid else 1)[0] for p in peers]
    cols = ["method", "sizes", "h", "threads", "frames denoised", "time median (s)", "time per denoised frame (s)",
            "PSNR frames 2-5 (dB)"]
    rows = [["noisy input", "-", "-", "-", "-", "-", "-", f"{nlref.psnr(clean, noisy[2:6]):.2f}"]]
    rows += [[r.name, r.params, r.h, r.threads, n, f"{r.seconds:.3f}", f"{r.seconds / n:.3f}",
              f"{nlref.psnr(clean, r.estimate):.2f}"] for r, n in zip(results, frames)]
    caption = (f"## 4. Video: nlref.data.video() {shape_text(clip)} (T, H, W), sigma = 20/255\n\n"
               "nlref denoises the whole clip at once (3-D patches and search windows over time); OpenCV "
               "denoises frames 2..5, each from a 5-frame window around it; scikit-image denoises frames 2..5 "
               "one at a time in 2-D. PSNR over frames 2..5 for every method. "
               f"Time: median of {reps} runs (after a warm-up, or after the sweep).")
    return caption + "\n\n" + markdown_table(cols, rows)


# ---------------------------------------------------------------------------
# --profile: where the fast method's time goes, against a memory-copy probe
# ---------------------------------------------------------------------------


def profile_section(repeats, sizes=(128, 512)):
    """The steps of one offset of the fast method (pixel-wise, grey, float32, 7x7 / 21x21, one thread).

    Each step runs alone through the fast path's own ``_Steps`` on arrays of the
    sizes it has in the loop (batches of one offset), timed as the median of
    ``repeats`` runs of 20 calls; its bytes (every array read and written once)
    over its time give GB/s, next to a memory copy (``numpy.copyto``) of the
    same length in the same run, and of 64 MiB (main memory). The steps times
    the offsets (220) predict the whole call, also timed.
    """
    from nlref.nlmeans import fast

    sigma = 20 / 255
    lines = []
    for size in sizes:
        clean = central_crop(nlref.data.camera(), size)
        noisy = nlref.add_gaussian_noise(clean, sigma, seed=0).astype(np.float32)
        geo = fast._Geometry(noisy.shape, (7, 7), (21, 21), "pixel")
        steps = fast._Steps(np, np.dtype(np.float32))
        L, K, n = geo.length, geo.reach, geo.span
        rng = np.random.default_rng(0)
        row = rng.random(L + 2 * L // 4, dtype=np.float32)
        buf = {k: np.empty(L, np.float32) for k in ("d", "b1", "b2", "w", "tmp")}
        acc, acc2 = np.zeros(n, np.float32), np.zeros(n, np.float32)
        delta = geo.deltas[len(geo.deltas) // 2]
        size_d = n + delta + 2 * K  # the squared differences of one offset (pixel-wise, weights over n + delta)
        box_axes = [(p, s) for p, s in zip(geo.patch_size, geo.strides)]
        dist = np.abs(row[:size_d]) + 0.5
        box = fast._box_all(steps, dist[None, :], box_axes, buf["b1"], buf["b2"]).copy()
        w = np.exp(-box)
        bytes_box, length = 0, size_d
        for width, step in box_axes:  # every add reads 2 and writes 1 sample; widths >= 7 start from pair sums
            out_len = length - (width - 1) * step
            if width >= 7:
                bytes_box += 3 * 4 * ((length - step) + (width // 2 + width % 2 - 1) * out_len)
            else:
                bytes_box += 3 * 4 * (width - 1) * out_len
            length = out_len
        stages = [
            ("squared difference (subtract, square)", 5 * 4 * size_d,
             lambda: steps.sqdiff_sum([(row[:size_d], row[delta : delta + size_d][None, :])],
                                      steps.view(buf["d"], 1, size_d), None)),
            ("box sum 7x7 (pair sums, 8 adds)", bytes_box,
             lambda: fast._box_all(steps, dist[None, :], box_axes, buf["b1"], buf["b2"])),
            ("weight (multiply, add, clip, exp)", 8 * 4 * box.shape[-1],
             lambda: steps.weight(box, -1.0, 0.1, -87.0, steps.view(buf["w"], 1, box.shape[-1]))),
            ("accumulate Z and the numerator (2 adds, 2 products + adds)", 6 * 3 * 4 * n,
             lambda: (steps.accumulate(acc, w[0, 0:n]), steps.accumulate(acc, w[0, 1 : n + 1]),
                      steps.accumulate_product(acc2, w[0, 0:n], row[2 : n + 2], buf["tmp"][:n]),
                      steps.accumulate_product(acc2, w[0, 1 : n + 1], row[3 : n + 3], buf["tmp"][:n]))),
        ]
        src, dst = np.ones(L, np.float32), np.empty(L, np.float32)
        copy_seconds = median_seconds(lambda: [np.copyto(dst, src) for _ in range(20)], repeats) / 20
        copy_rate = 2 * 4 * L / copy_seconds / 1e9
        big_rate = copy_gbs(4 * 2**24, repeats)
        offsets = len(geo.deltas)
        rows = []
        predicted = 0.0
        for name, nbytes, fn in stages:
            seconds = median_seconds(lambda: [fn() for _ in range(20)], repeats) / 20
            predicted += seconds * offsets
            rows.append([name, f"{seconds * 1e6:.1f}", f"{seconds * offsets * 1e3:.1f}",
                         f"{nbytes / 1e6:.2f}", f"{nbytes / seconds / 1e9:.1f}"])
        whole = median_seconds(lambda: nlref.nl_means(noisy, sigma=sigma, h=0.6 * sigma, patch_size=7,
                                                       search_size=21, workers=1), repeats)
        sk = median_seconds(lambda: denoise_nl_means(noisy, patch_size=7, patch_distance=10, h=0.6 * sigma,
                                                      sigma=sigma, fast_mode=True), repeats)
        rows.append(["sum of the steps x offsets", "-", f"{predicted * 1e3:.1f}", "-", "-"])
        rows.append(["whole nl_means call, workers=1 (measured)", "-", f"{whole * 1e3:.1f}", "-", "-"])
        rows.append(["scikit-image fast mode, same image (measured)", "-", f"{sk * 1e3:.1f}", "-", "-"])
        cols = ["step (one offset)", "time (us)", "x offsets (ms)", "bytes (MB)", "GB/s"]
        lines.append(f"### camera {size}x{size}: padded length {L:,} samples, {offsets} offsets (half window)\n\n"
                     f"Memory-copy probe in this run: {copy_rate:.1f} GB/s at {L:,} float32 samples "
                     f"(read + write), {big_rate:.1f} GB/s at 64 MiB.\n\n" + markdown_table(cols, rows))
    caption = ("## Profile: the fast method's steps for one offset\n\n"
               "Each step alone through the fast path's `_Steps` on arrays of its loop sizes (one offset per "
               f"batch), median of {repeats} runs of 20 calls; bytes count every array read and written once.")
    return caption + "\n\n" + "\n\n".join(lines)


# ---------------------------------------------------------------------------
# --plot: time against image size
# ---------------------------------------------------------------------------

SWEEP_SIZES = (64, 128, 256, 512, 1024)


def sweep_image(size):
    """Camera at ``size`` x ``size``: a central crop, or for 1024 four mirrored copies."""
    camera = nlref.data.camera()
    if size <= camera.shape[0]:
        return central_crop(camera, size)
    if size != 2 * camera.shape[0]:
        raise ValueError(f"size must be at most {camera.shape[0]} or exactly {2 * camera.shape[0]}; got {size}")
    top = np.concatenate([camera, camera[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1, :]], axis=0))


def size_sweep(cv2, *, repeats, seed, sizes=SWEEP_SIZES):
    """Median seconds per method and size at sigma = 20/255, 7x7 patches, 21x21 search.

    h is fixed (0.6 sigma for nlref and scikit-image, 0.9 sigma in grey levels for
    OpenCV, the best values of the 512x512 speed table); the time hardly depends on it.
    """
    sigma = 20 / 255
    methods = {
        f"nlref pixel-wise ({default_workers()} threads)": lambda x: nlref.nl_means(
            x, sigma=sigma, h=0.6 * sigma, patch_size=7, search_size=21),
        "nlref pixel-wise (1 thread)": lambda x: nlref.nl_means(
            x, sigma=sigma, h=0.6 * sigma, patch_size=7, search_size=21, workers=1),
        "scikit-image fast mode (1 thread)": lambda x: denoise_nl_means(
            x, patch_size=7, patch_distance=10, h=0.6 * sigma, sigma=sigma, fast_mode=True),
    }
    if cv2 is not None:
        methods[f"OpenCV fastNlMeansDenoising ({cv2.getNumThreads()} threads)"] = lambda x: (
            cv2.fastNlMeansDenoising(x, None, h=0.9 * 20, templateWindowSize=7, searchWindowSize=21))
    times = {name: [] for name in methods}
    for size in sizes:
        noisy = nlref.add_gaussian_noise(sweep_image(size), sigma, seed=seed)
        grey = to_uint8(noisy)
        for name, run in methods.items():
            x = grey if name.startswith("OpenCV") else noisy
            seconds, _ = time_call(lambda: run(x), repeats=repeats)
            times[name].append(seconds)
            print(f"  {size}x{size} {name}: {seconds:.4f} s", file=sys.stderr, flush=True)
    return sizes, times


def plot_size_sweep(sizes, times, path):
    """Log-log figure of median time against pixels, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = [s * s for s in sizes]
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for (name, seconds), marker in zip(times.items(), "osD^v"):
        ax.plot(pixels, seconds, marker=marker, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(pixels, [f"{s}x{s}" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("image size (pixels, log scale)")
    ax.set_ylabel("time, median (s, log scale)")
    ax.set_title("NL-means time against image size\n(camera, sigma = 20/255, 7x7 patches, 21x21 search, float32)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    try:
        with replaced_atomically(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def sweep_table(sizes, times):
    cols = ["method"] + [f"{s}x{s} (s)" for s in sizes]
    rows = [[name] + [f"{t:.4f}" for t in seconds] for name, seconds in times.items()]
    return markdown_table(cols, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small crops, one run, tiny sweeps: a smoke test in well under 30 s")
    parser.add_argument("--repeats", type=whole(1), default=5,
                        help="timed runs in the speed section (median, after 1 warm-up; default 5)")
    parser.add_argument("--seed", type=seed_arg, default=0, help="noise seed (default 0)")
    parser.add_argument("--plot", metavar="PATH", type=figure_path,
                        help="run only the size sweep and save its log-log figure to PATH (a .png)")
    parser.add_argument("--speed-only", action="store_true",
                        help="only section 1 (speed at 512x512 and the 128x128 crop; the peers in the same run)")
    parser.add_argument("--profile", action="store_true",
                        help="only the profile of the fast method's steps, with a memory-copy probe")
    args = parser.parse_args(argv)
    cfg = settings_from_args(args)
    cv2 = import_cv2()
    if args.plot:
        h_line = "\n- h: fixed, 0.6 sigma for nlref and scikit-image, 0.9 sigma (grey levels) for OpenCV"
        print(header(cv2).replace(
            "\n- h: each peer's best-PSNR h from a sweep (one run per h); nlref also from `sigma` alone (presets). "
            "'grid end' marks a best h at an end of the sweep", h_line), end="\n\n", flush=True)
        sizes, times = size_sweep(cv2, repeats=args.repeats, seed=args.seed,
                                  sizes=SWEEP_SIZES[:2] if args.quick else SWEEP_SIZES)
        print(sweep_table(sizes, times))
        plot_size_sweep(sizes, times, args.plot)
        return

    t0 = time.perf_counter()
    print(header(cv2), end="\n\n", flush=True)
    if args.profile:
        print(profile_section(args.repeats, sizes=(64, 128) if args.quick else (128, 512)))
        return
    print(section_speed(cfg, cv2), end="\n\n", flush=True)
    compile_times = numba_compile_seconds()
    if compile_times is not None:
        print("Numba's compile time: nl_means on a 64x64 grey image, pixel-wise then patch-wise, in a fresh "
              f"process with an empty Numba cache: first call {compile_times[0]:.1f} s, second call "
              f"{compile_times[1]:.3f} s; the first call of a second process, which loads the cached kernels: "
              f"{compile_times[2]:.2f} s.", end="\n\n", flush=True)
    if args.speed_only:
        print(f"Total benchmark time: {time.perf_counter() - t0:.0f} s")
        return
    print(section_quality(cfg, cv2), end="\n\n", flush=True)
    print(section_volume(cfg), end="\n\n", flush=True)
    print(section_video(cfg, cv2), end="\n\n", flush=True)
    print(f"Total benchmark time: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
