"""The ``nlref`` command: ``nlref demo`` (the teaching walk) and ``nlref denoise``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def _save(fig, path):
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def run_demo(out_dir, *, quick=False, seed=0):
    """The teaching walk so far: averaging copies, then NL-means, with figures and a table."""
    import nlref
    from nlref import viz

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sigma = 20 / 255
    camera = nlref.data.camera()
    astro = nlref.data.astronaut()
    if quick:
        camera, astro = camera[96:224, 160:288], astro[30:158, 180:308]
    rows = []

    # 1. averaging N noisy copies: the variance falls as sigma^2 / N
    counts = [1, 2, 4, 8, 16, 32, 64]
    variances = nlref.averaging_curve(camera, sigma, counts, seed=seed)
    _save(viz.averaging_plot(counts, variances, sigma), out / "averaging_curve.png")
    copies = nlref.noisy_copies(camera, sigma, 16, seed=seed)
    shown = [copies[0], nlref.average(copies[:4]), nlref.average(copies)]
    _save(viz.image_grid([camera] + shown, ["clean", "1 noisy copy", "mean of 4", "mean of 16"]),
          out / "averaging_images.png")
    for n, var in zip(counts, variances):
        if n in (4, 16):
            rows.append((f"mean of {n} noisy copies", "camera", 10 * np.log10(1 / var), None))

    # 2. NL-means on one noisy copy: pixel-wise and patch-wise
    noisy = nlref.add_gaussian_noise(camera, sigma, seed=seed)
    pixel, t_pixel = _timed(lambda: nlref.nl_means(noisy, sigma=sigma))
    patch, t_patch = _timed(lambda: nlref.nl_means(noisy, sigma=sigma, aggregation="patch"))
    estimated = nlref.estimate_sigma(noisy)
    rows += [
        ("noisy (one copy)", "camera", nlref.psnr(camera, noisy), None),
        ("NL-means, pixel-wise", "camera", nlref.psnr(camera, pixel), t_pixel),
        ("NL-means, patch-wise", "camera", nlref.psnr(camera, patch), t_patch),
    ]
    _save(viz.image_grid([noisy, pixel, patch, 0.5 + 2 * (noisy - pixel)],
                         ["noisy", "NL-means pixel-wise", "NL-means patch-wise", "method noise (x2)"]),
          out / "nlmeans_camera.png")

    # 3. the weights of a few pixels: the first picture of attention
    crop = noisy[160:288, 200:328] if not quick else noisy
    positions = [(40, 40), (64, 90), (100, 30)]
    params = nlref.resolve_parameters(crop, sigma=sigma, search_size=31)
    maps = [nlref.nl_means_weights(crop, p, sigma=sigma, search_size=31, patch_size=params["patch_size"])
            for p in positions]
    _save(viz.weights_plot(crop, positions, maps, search_size=(31, 31)), out / "nlmeans_weights.png")

    # 4. colour
    noisy_rgb = nlref.add_gaussian_noise(astro, sigma, seed=seed)
    rgb, t_rgb = _timed(lambda: nlref.nl_means(noisy_rgb, sigma=sigma, channel_axis=-1))
    rows += [
        ("noisy (one copy)", "astronaut", nlref.psnr(astro, noisy_rgb), None),
        ("NL-means, pixel-wise", "astronaut", nlref.psnr(astro, rgb), t_rgb),
    ]
    _save(viz.image_grid([astro, noisy_rgb, rgb], ["clean", "noisy", "NL-means"]), out / "nlmeans_astronaut.png")

    size = "x".join(map(str, camera.shape))
    print(f"nlref demo: sigma = 20/255, camera {size}, estimated sigma {estimated * 255:.1f}/255")
    print(f"{'step':<26} {'image':<10} {'PSNR dB':>8} {'time s':>7}")
    for name, image, value, seconds in rows:
        timing = "-" if seconds is None else f"{seconds:.2f}"
        print(f"{name:<26} {image:<10} {value:8.2f} {timing:>7}")
    print(f"figures written to {out.resolve()}")
    return rows


def run_denoise(args):
    import nlref

    if args.image is None:
        from skimage import data

        clean = data.camera()
        image = np.clip(np.round(clean + args.noise * np.random.default_rng(args.seed).standard_normal(clean.shape)),
                        0, 255).astype(np.uint8)
        print(f"no IMAGE given: the bundled camera image with Gaussian noise of {args.noise} grey levels")
    else:
        from skimage import io

        path = Path(args.image)
        if not path.is_file():
            raise SystemExit(f"nlref denoise: IMAGE {str(path)!r} is not a file")
        image = io.imread(path)
        clean = None
    channel_axis = -1 if image.ndim == 3 and image.shape[-1] in (3, 4) else None
    alpha = None
    if channel_axis is not None and image.shape[-1] == 4:
        image, alpha = image[..., :3], image[..., 3:]
    params = nlref.resolve_parameters(image, sigma=args.sigma, h=args.h, patch_size=args.patch_size,
                                      search_size=args.search_size, channel_axis=channel_axis,
                                      aggregation=args.aggregation)
    print(f"sigma {params['sigma']:.3g} ({params['sigma_source']}), h {params['h']:.3g}, "
          f"patch {params['patch_size']}, search {params['search_size']}, {args.aggregation}-wise")
    result, seconds = _timed(lambda: nlref.nl_means(
        image, sigma=args.sigma, h=args.h, patch_size=args.patch_size, search_size=args.search_size,
        channel_axis=channel_axis, aggregation=args.aggregation, method=args.method, progress=True))
    if alpha is not None:
        result = np.concatenate([result, alpha], axis=-1)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise SystemExit(f"nlref denoise: the folder of --out ({out.parent}) does not exist")
    from skimage import io

    io.imsave(out, result, check_contrast=False)
    line = f"denoised {image.shape} {image.dtype} in {seconds:.2f} s -> {out}"
    if args.image is None:
        line += f" (PSNR {nlref.psnr(clean, image):.2f} -> {nlref.psnr(clean, result):.2f} dB)"
    print(line)


def _size(text):
    parts = [int(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def build_parser():
    parser = argparse.ArgumentParser(prog="nlref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the teaching walk (averaging, NL-means) and write its figures")
    demo.add_argument("--out", default="nlref-demo", help="folder for the figures (default: ./nlref-demo)")
    demo.add_argument("--quick", action="store_true", help="128x128 crops (a few seconds; used by the tests)")
    demo.add_argument("--seed", type=int, default=0)

    den = sub.add_parser("denoise", help="NL-means denoise an image file")
    den.add_argument("image", nargs="?", help="image file (default: the bundled camera image, with added noise)")
    den.add_argument("--sigma", type=float, help="noise std in the image's units (0..255 for 8-bit); default: estimated")
    den.add_argument("--h", type=float, help="filter strength; default from the preset for sigma")
    den.add_argument("--patch-size", type=_size, help="odd patch width, or comma-separated per axis")
    den.add_argument("--search-size", type=_size, help="odd search width, or comma-separated per axis")
    den.add_argument("--aggregation", choices=("pixel", "patch"), default="pixel")
    den.add_argument("--method", choices=("fast", "naive"), default="fast")
    den.add_argument("--noise", type=float, default=20.0, help="noise added to the default image (grey levels)")
    den.add_argument("--seed", type=int, default=0)
    den.add_argument("--out", default="denoised.png", help="output file (default: denoised.png)")
    return parser


def main(argv=None):
    import matplotlib

    matplotlib.use("Agg")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            run_demo(args.out, quick=args.quick, seed=args.seed)
        else:
            run_denoise(args)
    except (ValueError, TypeError) as err:
        print(f"nlref {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
