"""PSNR per frame of a denoised video: nlref's presets, nlref with 2-D patches, one frame at a time,
OpenCV's ``fastNlMeansDenoisingMulti`` and scikit-image's 3-D ``denoise_nl_means``.

The clip is ``nlref.data.video(8, 128)`` (a window panning across camera, 2 rows and 3 columns a
frame) in uint8 with Gaussian noise of 20 grey levels (seed 0), the same clip with a scene cut
(frames 4 to 7 from another part of camera), and a still clip (one frame eight times). Last, a
colour clip panning across astronaut, against OpenCV's ``fastNlMeansDenoisingColoredMulti``. It
shows what the temporal search buys in the middle of a clip and what the reflection at its two
ends costs (docs/nlmeans.md, section 9).

OpenCV denoises frame ``i`` from the ``T`` frames centred on it, which must all exist: the middle
frames get ``T = 5``, frames 1 and 6 ``T = 3``, frames 0 and 7 ``fastNlMeansDenoising`` (one frame),
as an OpenCV user shortens the window at the ends. OpenCV's and scikit-image's h are the best of a
sweep (mean PSNR over the frames); nlref's h is its preset's.

    python benchmarks/video_frames.py                # about two minutes on 2 cores
    python benchmarks/video_frames.py --part short   # only the clips of 1 to 4 frames, 20 s
"""

from __future__ import annotations

import numpy as np

import nlref

SIGMA = 20  # grey levels


def psnr_per_frame(clean, result):
    return [nlref.psnr(clean[i], result[i], data_range=255) for i in range(len(clean))]


def opencv_clip(noisy, h, t=5, s=21):
    import cv2

    frames = [np.ascontiguousarray(f) for f in noisy]
    out = []
    for i in range(len(frames)):
        reach = min(2, i, len(frames) - 1 - i)  # the centred window that fits: T = 2 reach + 1
        if reach == 0:
            out.append(cv2.fastNlMeansDenoising(frames[i], None, h, t, s))
        else:
            out.append(cv2.fastNlMeansDenoisingMulti(frames, i, 2 * reach + 1, None, h, t, s))
    return np.stack(out)


def best(clean, run, values):
    scores = [(float(np.mean(psnr_per_frame(clean, run(v)))), v) for v in values]
    return max(scores)[1]


def rows_for(clean, noisy):
    rows = [("noisy", noisy)]
    rows.append(("nlref, preset (patch 3x5x5, search 5x21x21)", nlref.nl_means(noisy, sigma=SIGMA)))
    rows.append(("nlref, patch 1x5x5 (one frame), search 5x21x21",
                 nlref.nl_means(noisy, sigma=SIGMA, patch_size=(1, 5, 5))))
    rows.append(("nlref, each frame alone (2-D preset)", np.stack([nlref.nl_means(f, sigma=SIGMA) for f in noisy])))
    import importlib.util

    if importlib.util.find_spec("cv2") is not None:
        h = best(clean, lambda v: opencv_clip(noisy, v), (8, 10, 12, 14, 16, 18, 20, 24))
        rows.append((f"OpenCV Multi, template 5, search 21, T = 5 (1, 3 at the ends), h {h}", opencv_clip(noisy, h)))
        rows.append((f"nlref at OpenCV's settings (h {h}, sigma 0, patch 1x5x5, search 5x21x21)",
                     nlref.nl_means(noisy, h=h, sigma=0, patch_size=(1, 5, 5), search_size=(5, 21, 21))))
    from skimage.restoration import denoise_nl_means

    def skimage_run(factor):
        out = denoise_nl_means(noisy / 255.0, patch_size=3, patch_distance=5, h=factor * SIGMA / 255,
                               sigma=SIGMA / 255, fast_mode=True)
        return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)

    factor = best(clean, skimage_run, (0.2, 0.3, 0.4, 0.6, 0.8))
    rows.append((f"scikit-image 3-D, patch 3x3x3, patch_distance 5, h {factor} sigma", skimage_run(factor)))
    return rows


def table(title, clean, noisy):
    print(f"\n{title}\n")
    print("| method | " + " | ".join(f"frame {i}" for i in range(len(clean))) + " | mean |")
    print("|---|" + "---|" * (len(clean) + 1))
    for name, result in rows_for(clean, noisy):
        values = psnr_per_frame(clean, result)
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {np.mean(values):.2f} |", flush=True)


def opencv_colour_clip(noisy, h, t=3, s=21):
    import cv2

    frames = [np.ascontiguousarray(f[..., ::-1]) for f in noisy]  # OpenCV's colour order is BGR
    out = []
    for i in range(len(frames)):
        reach = min(2, i, len(frames) - 1 - i)
        if reach == 0:
            out.append(cv2.fastNlMeansDenoisingColored(frames[i], None, h, h, t, s))
        else:
            out.append(cv2.fastNlMeansDenoisingColoredMulti(frames, i, 2 * reach + 1, None, h, h, t, s))
    return np.stack(out)[..., ::-1]


def colour_table():
    import importlib.util

    astronaut = np.round(255 * nlref.data.astronaut()).astype(np.uint8)
    clean = np.stack([astronaut[100 + 2 * t: 228 + 2 * t, 150 + 3 * t: 278 + 3 * t] for t in range(8)])
    rng = np.random.default_rng(0)
    noisy = np.clip(np.round(clean + SIGMA * rng.standard_normal(clean.shape)), 0, 255).astype(np.uint8)
    rows = [("noisy", noisy),
            ("nlref, preset (patch 3x3x3, search 5x21x21)", nlref.nl_means(noisy, sigma=SIGMA, channel_axis=-1)),
            ("nlref, patch 1x3x3 (one frame), search 5x21x21",
             nlref.nl_means(noisy, sigma=SIGMA, channel_axis=-1, patch_size=(1, 3, 3))),
            ("nlref, each frame alone (2-D preset)",
             np.stack([nlref.nl_means(f, sigma=SIGMA, channel_axis=-1) for f in noisy]))]
    if importlib.util.find_spec("cv2") is not None:
        h = best(clean, lambda v: opencv_colour_clip(noisy, v), (12, 15, 18, 21, 25))
        rows.append((f"OpenCV ColoredMulti, template 3, search 21, T = 5 (1, 3 at the ends), h = hColor = {h}",
                     opencv_colour_clip(noisy, h)))
    print("\ncolour clip (astronaut, 8 x 128 x 128 x 3, the same pan), noise 20 grey levels: PSNR (dB) per frame\n")
    print("| method | " + " | ".join(f"frame {i}" for i in range(len(clean))) + " | mean |")
    print("|---|" + "---|" * (len(clean) + 1))
    for name, result in rows:
        values = psnr_per_frame(clean, result)
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {np.mean(values):.2f} |", flush=True)


def short_clips():
    """Clips of 1 to 4 frames (the first frames of the grey clip): where every frame is near an end."""
    clean = np.round(255 * nlref.data.video(4, 128)).astype(np.uint8)
    rng = np.random.default_rng(1)
    noisy = np.clip(np.round(clean + SIGMA * rng.standard_normal(clean.shape)), 0, 255).astype(np.uint8)
    print("\nshort clips (the first T frames of the grey clip, noise 20): PSNR (dB) per frame\n")
    print("| T | preset: patch, search | preset | patch_size=(1, 5, 5), search (2T - 1 at most 5) x 21 x 21 | "
          "each frame alone |")
    print("|---|---|---|---|---|")
    for frames in (1, 2, 3, 4):
        clip, cleans = noisy[:frames], clean[:frames]
        p = nlref.resolve_parameters(clip, sigma=SIGMA)
        window = min(5, 2 * frames - 1)
        runs = [nlref.nl_means(clip, sigma=SIGMA),
                nlref.nl_means(clip, sigma=SIGMA, patch_size=(1, 5, 5), search_size=(window, 21, 21)),
                np.stack([nlref.nl_means(f, sigma=SIGMA) for f in clip])]
        cells = [" ".join(f"{v:.2f}" for v in psnr_per_frame(cleans, r)) for r in runs]
        print(f"| {frames} | {'x'.join(map(str, p['patch_size']))}, {'x'.join(map(str, p['search_size']))} | "
              + " | ".join(cells) + " |", flush=True)


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "short"), default="all",
                        help="all tables, or only the clips of 1 to 4 frames (default: all)")
    if parser.parse_args().part == "short":
        short_clips()
        return
    clean = np.round(255 * nlref.data.video(8, 128)).astype(np.uint8)
    rng = np.random.default_rng(0)
    noisy = np.clip(np.round(clean + SIGMA * rng.standard_normal(clean.shape)), 0, 255).astype(np.uint8)
    table("panning clip, 8 x 128 x 128, noise 20 grey levels: PSNR (dB) per frame", clean, noisy)
    camera = np.round(255 * nlref.data.camera()).astype(np.uint8)
    other = np.stack([camera[300 + 2 * t: 428 + 2 * t, 20 + 3 * t: 148 + 3 * t] for t in range(4)])
    cut = np.concatenate([clean[:4], other])
    noisy_cut = np.clip(np.round(cut + SIGMA * rng.standard_normal(cut.shape)), 0, 255).astype(np.uint8)
    table("the same with a scene cut after frame 3", cut, noisy_cut)
    still = np.repeat(clean[3:4], len(clean), axis=0)
    noisy_still = np.clip(np.round(still + SIGMA * rng.standard_normal(still.shape)), 0, 255).astype(np.uint8)
    print("\na still clip (frame 3 eight times), preset:",
          " ".join(f"{v:.2f}" for v in psnr_per_frame(still, nlref.nl_means(noisy_still, sigma=SIGMA))),
          f"; the mean of the 8 noisy frames: {nlref.psnr(still[0], noisy_still.mean(axis=0), data_range=255):.2f}",
          f"; frame 3 alone (2-D preset): {nlref.psnr(still[0], nlref.nl_means(noisy_still[3], sigma=SIGMA)):.2f}")
    print("\nthe cut clip in two parts, each denoised alone (preset):",
          " ".join(f"{v:.2f}" for v in psnr_per_frame(cut, np.concatenate(
              [nlref.nl_means(noisy_cut[:4], sigma=SIGMA), nlref.nl_means(noisy_cut[4:], sigma=SIGMA)]))))
    colour_table()
    short_clips()


if __name__ == "__main__":
    main()
