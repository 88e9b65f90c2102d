"""Calibrate nlref's h / sigma factors for the preset table (IPOL 2011 sizes).

For every row of IPOL's grey and colour tables and both aggregations, denoise
several bundled images at a noise level inside that row's sigma bracket, sweep
h = factor * sigma and report the factor with the best mean PSNR. The result
is what ``nlref.nlmeans.presets.H_FACTORS`` holds; docs/nlmeans.md shows the
table this script prints.

For three or more spatial axes (volumes, videos) the search window holds more
candidates, so the best h is smaller. The second part sweeps a multiplier on the
2-D factor on nlref's volume and video at three noise levels each and reports
the multiplier with the best mean PSNR over all six (``presets.LEADING_AXES_H_SCALE``).

    python benchmarks/calibrate_presets.py             # both parts, about 8 minutes on 2 cores
    python benchmarks/calibrate_presets.py --part 3d   # only the volume/video multiplier
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from skimage import data

import nlref
from _args import seed_arg, whole
from nlref.nlmeans import presets

GREY = {"camera": data.camera, "moon": data.moon, "coins": data.coins, "brick": data.brick}
COLOUR = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea}
# one noise level inside each bracket, 0..255 scale
GREY_SIGMAS = (10, 20, 35, 60, 90)
COLOUR_SIGMAS = (15, 40, 70)
FACTORS = np.round(np.arange(0.30, 1.31, 0.05), 2)
MULTIPLIERS = np.round(np.arange(0.40, 1.01, 0.05), 2)
#: The smallest crop: the largest search window of the tables (35 x 35).
MIN_CROP = 35
# (name, clean signal, noise levels on the 0..255 scale)
SIGNALS_3D = (("volume 48x64x64", nlref.data.volume, (10, 25, 40)),
              ("video 8x128x128", nlref.data.video, (10, 20, 35)))


def crops(loaders, size):
    out = {}
    for name, load in loaders.items():
        img = load().astype(np.float32) / 255.0
        r0, c0 = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        out[name] = img[r0 : r0 + size, c0 : c0 + size]
    return out


def sweep(images, sigma255, colour, aggregation, seed):
    sigma = sigma255 / 255.0
    noisy = {k: nlref.add_gaussian_noise(v, sigma, seed=seed + i) for i, (k, v) in enumerate(images.items())}
    channel_axis = -1 if colour else None
    scores = []
    for f in FACTORS:
        psnrs = [
            nlref.psnr(images[k], nlref.nl_means(noisy[k], sigma=sigma, h=float(f) * sigma,
                                                 channel_axis=channel_axis, aggregation=aggregation))
            for k in images
        ]
        scores.append(float(np.mean(psnrs)))
    best = int(np.argmax(scores))
    return FACTORS[best], scores[best], scores


def calibrate_2d(args):
    print(f"crops {args.size}x{args.size}; factors {FACTORS[0]}..{FACTORS[-1]} step 0.05; mean PSNR over images")
    print("| table | aggregation | sigma | patch | search | IPOL factor | best factor | PSNR at best | PSNR at IPOL factor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for colour, loaders, sigmas, table in ((False, GREY, GREY_SIGMAS, presets.IPOL_GREY),
                                           (True, COLOUR, COLOUR_SIGMAS, presets.IPOL_COLOUR)):
        images = crops(loaders, args.size)
        for sigma255, row in zip(sigmas, table):
            for aggregation in ("pixel", "patch"):
                best, score, scores = sweep(images, sigma255, colour, aggregation, args.seed)
                at_ipol = scores[int(np.argmin(np.abs(FACTORS - row.ipol_factor)))]
                print(f"| {'colour' if colour else 'grey'} | {aggregation} | {sigma255} | {row.patch} | {row.search} "
                      f"| {row.ipol_factor:.2f} | {best:.2f} | {score:.2f} | {at_ipol:.2f} |", flush=True)


def calibrate_3d(args):
    print(f"\nvolumes and videos: h = multiplier x (2-D preset h); multipliers {MULTIPLIERS[0]}..{MULTIPLIERS[-1]}")
    print("| aggregation | signal | sigma | patch | search | best multiplier | PSNR at best | PSNR at 1.00 |")
    print("|---|---|---|---|---|---|---|---|")
    for aggregation in ("pixel", "patch"):
        table = []
        for name, load, sigmas in SIGNALS_3D:
            clean = load()
            for i, sigma255 in enumerate(sigmas):
                sigma = sigma255 / 255.0
                noisy = nlref.add_gaussian_noise(clean, sigma, seed=args.seed + i)
                params = nlref.resolve_parameters(noisy, sigma=sigma, aggregation=aggregation)
                h_2d = params["h"] / presets.LEADING_AXES_H_SCALE[aggregation]
                scores = [nlref.psnr(clean, nlref.nl_means(noisy, sigma=sigma, h=float(m) * h_2d, aggregation=aggregation))
                          for m in MULTIPLIERS]
                table.append(scores)
                best = int(np.argmax(scores))
                print(f"| {aggregation} | {name} | {sigma255} | {params['patch_size']} | {params['search_size']} "
                      f"| {MULTIPLIERS[best]:.2f} | {scores[best]:.2f} | {scores[-1]:.2f} |", flush=True)
        mean = np.mean(table, axis=0)
        best = int(np.argmax(mean))
        print(f"| {aggregation} | **mean of the six** | | | | **{MULTIPLIERS[best]:.2f}** | {mean[best]:.2f} | {mean[-1]:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=whole(MIN_CROP), default=256, help="central crop size (default 256)")
    parser.add_argument("--seed", type=seed_arg, default=0)
    parser.add_argument("--part", choices=("2d", "3d", "all"), default="all")
    args = parser.parse_args()
    smallest = min(min(load().shape[:2]) for load in (*GREY.values(), *COLOUR.values()))
    if args.size > smallest:  # a larger crop was cut short (or wrapped) without a word
        parser.error(f"--size must be at most {smallest}, the smallest image's side, got {args.size}")
    t0 = time.perf_counter()
    if args.part in ("2d", "all"):
        calibrate_2d(args)
    if args.part in ("3d", "all"):
        calibrate_3d(args)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
