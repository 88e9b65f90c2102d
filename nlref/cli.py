"""The ``nlref`` command: ``nlref demo`` (the teaching walk), ``nlref denoise`` and ``nlref train``."""

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

    block_lines = _demo_block(out, nlref.data.camera(), seed=seed)
    training_lines = _demo_training(out, quick=quick, seed=seed)

    size = "x".join(map(str, camera.shape))
    print(f"nlref demo: sigma = 20/255, camera {size}, estimated sigma {estimated * 255:.1f}/255")
    print(f"{'step':<26} {'image':<10} {'PSNR dB':>8} {'time s':>7}")
    for name, image, value, seconds in rows:
        timing = "-" if seconds is None else f"{seconds:.2f}"
        print(f"{name:<26} {image:<10} {value:8.2f} {timing:>7}")
    print()
    print("\n".join(block_lines))
    print()
    print("\n".join(training_lines))
    print(f"figures written to {out.resolve()}")
    return rows


def _nlmeans_block(image, *, grid=32, radius=1, h=0.15):
    """An embedded-Gaussian block whose hand-set theta and phi compute NL-means weights.

    The input has, at each position of the image shrunk to grid x grid, the
    (2r+1)^2 values P of its neighbourhood, |P|^2 and a constant 1. With
    theta = [2 P / h^2; 1] and phi = [P; -|P|^2 / h^2] (1x1 convolutions with
    0/1 weights), theta_i . phi_j = -(|P_i - P_j|^2 - |P_i|^2) / h^2, and the
    softmax over j drops the constant |P_i|^2: the weights of NL-means with
    whole-image search windows (chapter 3 of the notebooks).
    """
    import nlref

    rows, cols = image.shape
    small = image[: rows - rows % grid, : cols - cols % grid]
    small = small.reshape(grid, rows // grid, grid, cols // grid).astype(np.float64).mean(axis=(1, 3))
    padded = np.pad(small, radius, mode="reflect")
    k = 2 * radius + 1
    patches = np.stack([padded[i:i + grid, j:j + grid] for i in range(k) for j in range(k)])
    x = np.concatenate([patches, (patches**2).sum(axis=0, keepdims=True), np.ones((1, grid, grid))])
    n = k * k
    block = nlref.NonLocalBlock(n + 2, inter_channels=n + 1, mode="embedded_gaussian", sub_sample=False,
                                dtype="float64")
    w_theta, w_phi = np.zeros((n + 1, n + 2)), np.zeros((n + 1, n + 2))
    w_theta[:n, :n] = 2 / h**2 * np.eye(n)
    w_theta[n, n + 1] = 1.0
    w_phi[:n, :n] = np.eye(n)
    w_phi[n, n] = -1 / h**2
    block.params.update({"theta.weight": w_theta, "theta.bias": np.zeros(n + 1),
                         "phi.weight": w_phi, "phi.bias": np.zeros(n + 1)})
    return block, x[None], small, patches.reshape(n, -1)


def _demo_block(out, image, *, seed=0):
    """The non-local block: gradient checks of every mode, identity at start, an attention figure."""
    import nlref
    from nlref import viz

    rng = np.random.default_rng(seed)
    lines = ["non-local block: float64 gradient check of forward + backward (centred differences)",
             f"{'mode':<20} {'max relative error':>19} {'result':>7}"]
    for mode in nlref.nn.nonlocal_op.MODES:
        block = nlref.NonLocalBlock(4, mode=mode, dims=2, dtype="float64", seed=seed)
        for name, value in block.params.items():
            block.params[name] = rng.standard_normal(value.shape)
        result = nlref.layer_gradcheck(block, rng.standard_normal((2, 4, 4, 4)))
        lines.append(f"{mode:<20} {result.max_error:19.1e} {'passed' if result.passed else 'FAILED':>7}")

    block = nlref.NonLocalBlock(64, dims=3)  # a fresh block: BN gamma = 0
    x = rng.standard_normal((2, 64, 4, 14, 14)).astype(np.float32)
    (z, seconds) = _timed(lambda: block.forward(x))
    _, seconds_back = _timed(lambda: block.backward(np.ones_like(z)))
    lines.append(f"fresh block on (2, 64, 4, 14, 14): z == x exactly: {bool(np.array_equal(z, x))}; "
                 f"forward {seconds * 1e3:.0f} ms, backward {seconds_back * 1e3:.0f} ms")

    h = 0.15
    block, x, small, patches = _nlmeans_block(image, h=h)
    _, attention = block.forward(x, return_attention=True)
    d2 = ((patches[:, :, None] - patches[:, None, :]) ** 2).sum(axis=0)  # |P_i - P_j|^2 for all pairs
    weights = np.exp(-(d2 - d2.min(axis=1, keepdims=True)) / h**2)
    gap = float(np.abs(attention[0] - weights / weights.sum(axis=1, keepdims=True)).max())
    lines.append(f"embedded-Gaussian block with hand-set theta, phi on 3x3 patches: attention == NL-means weights "
                 f"(max difference {gap:.1e})")
    queries = [(4, 28), (20, 24), (18, 6)]  # sky, grass, coat
    _save(viz.attention_plot(small, attention[0], queries, query_shape=(32, 32), key_shape=(32, 32),
                             titles=[f"attention of {q}" for q in queries]), out / "nonlocal_attention.png")
    return lines


def _demo_training(out, *, quick, seed):
    """Train the C2D baseline and the NL C2D briefly on the two-sprite task; curves and an attention figure.

    The teaching schedule of notebook 6 (3 brightness kinds, 1000 clips, 4 epochs, widths 8-16-32,
    no dropout, Adam 3e-3: well under a minute on 2 cores); ``quick`` trains a tiny network for
    the tests. Writes ``training_curves.png`` and ``training_attention.png`` (the attention of
    a query at sprite 1 of a validation clip) and returns the lines to print.
    """
    from nlref import viz
    from nlref.backend import to_numpy
    from nlref.data.sprites import additive_ceiling
    from nlref.train import TrainConfig, build_data, train

    schedule = (dict(n_train=64, n_val=32, epochs=2, batch_size=16, widths=(4, 6, 8)) if quick
                else dict(n_train=1000, n_val=300, epochs=4, widths=(8, 16, 32)))
    base = dict(kinds=3, frames=8, size=16, dropout=0.0, lr=3e-3, seed=seed, **schedule)
    runs = {label: train(TrainConfig(**base, nonlocal_blocks=blocks), progress=False, log=None)
            for label, blocks in (("C2D", 0), ("NL C2D", 1))}
    _save(viz.training_curves({label: r["history"] for label, r in runs.items()}), out / "training_curves.png")

    config, net = runs["NL C2D"]["config"], runs["NL C2D"]["model"]
    _, val = build_data(config)
    _, attention = net.eval().forward(val.video, return_attention=True)
    (layer, a), = attention.items()
    a = to_numpy(a)
    q_shape = (config.frames, config.size // 4, config.size // 4)     # res3 grid of queries
    k_shape = (config.frames, config.size // 8, config.size // 8)     # keys max-pooled by (1, 2, 2)
    meta, duration = val.meta, 3                                      # sprite_clips' default duration

    def cell(i, s, step, size):                                       # (t, row, col) of a sprite's centre
        r, c = meta["origin"][i, s] + meta["velocity"][i, s] * step + 2
        return int(meta["start"][i, s] + step), int(r // size), int(c // size)

    def index(t, y, x, shape):
        return (t * shape[1] + y) * shape[2] + x

    mass = []                                                         # sprite-1 query's weight on sprite 2's cells
    for i in range(len(val)):
        row = a[i, index(*cell(i, 0, 1, 4), q_shape)]                 # query: sprite 1's middle frame, res3 grid
        mass.append(row[[index(*cell(i, 1, k, 8), k_shape) for k in range(duration)]].sum())
    i = int(np.argmax(meta["kind"][:, 1] > meta["kind"][:, 0]))      # first clip whose sprite 2 is brighter
    query = cell(i, 0, 1, 4)
    _save(viz.spacetime_attention_plot(val.video[i], a[i, index(*query, q_shape)], query, key_shape=k_shape,
                                       query_shape=q_shape, title=f"{layer}: attention of the query at sprite 1 "
                                       f"(validation clip {i}, sprite 2 brighter)"), out / "training_attention.png")
    ceiling = additive_ceiling(config.kinds)
    lines = [f"training on the two-sprite task ({config.kinds} brightness kinds, {config.n_train} clips x "
             f"{config.epochs} epochs, {config.n_val} validation clips; additive ceiling {ceiling:.3f})",
             f"{'network':<26} {'val accuracy':>12} {'clips/s':>8}"]
    for label, r in runs.items():
        lines.append(f"{label:<26} {r['val_accuracy']:12.3f} {r['clips_per_second']:8.0f}")
    lines.append(f"attention of a sprite-1 query on sprite 2's cells: {float(np.mean(mass)):.3f} "
                 f"(uniform {duration / np.prod(k_shape):.3f})")
    return lines


def run_denoise(args):
    import nlref

    if _is_chunked(args):  # a Zarr store or TIFF stack, streamed chunk by chunk into a Zarr store
        return run_denoise_chunked(args)
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


def _is_chunked(args):
    """Stream with Dask when the input is a Zarr store, or a Zarr output or chunks are asked for."""
    image = None if args.image is None else str(args.image).rstrip("/")
    return (image is not None and (image.endswith(".zarr") or Path(image).is_dir())
            or str(args.out).rstrip("/").endswith(".zarr") or args.chunks is not None)


def _open_chunked(path):
    """A Zarr store or a TIFF stack as a lazy Dask array (nothing is read but the metadata)."""
    import dask.array as da

    path = Path(path)
    if path.is_dir():
        return da.from_zarr(str(path))
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile
        import zarr

        return da.from_zarr(zarr.open(tifffile.imread(path, aszarr=True), mode="r"))
    raise ValueError(f"IMAGE {str(path)!r}: a chunked run reads a Zarr store (a folder) or a TIFF stack (.tif, .tiff)")


def run_denoise_chunked(args):
    """``nlref denoise big.zarr --chunks 64 --out clean.zarr``: Dask, chunk by chunk, never the whole volume.

    The input (a Zarr store or a TIFF stack) is read lazily, rechunked to
    ``--chunks`` (default: the store's own chunks; 64 per axis for TIFF),
    denoised by :func:`nlref.nl_means` on its Dask path (exact: equal to the
    in-memory result) and written to the Zarr store ``--out`` one chunk at a
    time, on the local threads or on the cluster at ``--scheduler``. A last
    axis of length 3 is taken as colour channels.
    """
    try:
        import dask
        import dask.array as da
        import zarr  # noqa: F401
    except ImportError as err:
        raise ValueError(f"a chunked run needs the dask extra: pip install 'nlref[dask]' ({err})") from err
    import nlref

    if args.image is None:
        raise ValueError("a chunked run (--chunks, or a .zarr input or output) needs IMAGE: a Zarr store or TIFF stack")
    source, out = Path(args.image), Path(str(args.out).rstrip("/"))
    if not source.exists():
        raise ValueError(f"IMAGE {str(source)!r} does not exist")
    if out.suffix != ".zarr":
        raise ValueError(f"--out must name a Zarr store (ending in .zarr) for a chunked run; got {str(out)!r}")
    if out.exists():
        raise ValueError(f"--out {str(out)!r} already exists; remove it or choose another name")
    if not out.parent.exists():
        raise ValueError(f"the folder of --out ({out.parent}) does not exist")
    if args.method != "fast":
        raise ValueError("a chunked run uses --method fast")
    image = _open_chunked(source)
    channel_axis = -1 if image.ndim >= 3 and image.shape[-1] == 3 else None
    chunks = args.chunks if args.chunks is not None else (None if source.is_dir() else 64)
    if chunks is not None:
        spatial = image.ndim - (channel_axis is not None)
        sizes = (chunks,) * spatial if isinstance(chunks, int) else tuple(chunks)
        if len(sizes) != spatial or any(c < 1 for c in sizes):
            raise ValueError(f"--chunks must be a positive size, or one per spatial axis ({spatial}); got {chunks}")
        image = image.rechunk(sizes + ((3,) if channel_axis is not None else ()), method="tasks")

    client = None
    if args.scheduler is not None:
        from distributed import Client

        client = Client(args.scheduler)
    try:
        kwargs = dict(sigma=args.sigma, h=args.h, patch_size=args.patch_size, search_size=args.search_size,
                      channel_axis=channel_axis, aggregation=args.aggregation)
        t0 = time.perf_counter()
        params = nlref.resolve_parameters(image, **kwargs)
        print(f"{source}: {image.shape} {image.dtype} in {image.npartitions} chunks of {image.chunksize}")
        print(f"sigma {params['sigma']:.3g} ({params['sigma_source']}), h {params['h']:.3g}, "
              f"patch {params['patch_size']}, search {params['search_size']}, {args.aggregation}-wise "
              f"(resolved for the whole array in {time.perf_counter() - t0:.1f} s)")
        # the parameters just resolved, passed on: the noise estimate's passes are not repeated
        lazy = nlref.nl_means(image, **dict(kwargs, sigma=params["sigma"], h=params["h"],
                                            patch_size=params["patch_size"], search_size=params["search_size"]))
        store = da.to_zarr(lazy, str(out), compute=False)
        t0 = time.perf_counter()
        if client is not None:
            from distributed import progress

            future = client.compute(store)
            progress(future)
            future.result()
        else:
            from dask.diagnostics import ProgressBar

            with ProgressBar():
                dask.compute(store)
        seconds = time.perf_counter() - t0
    finally:
        if client is not None:
            client.close()
    voxels = image.size / (3 if channel_axis is not None else 1)
    print(f"denoised {image.shape} {image.dtype} in {seconds:.1f} s ({voxels / seconds:,.0f} voxels/s) -> {out}")


def run_train(args):
    """``nlref train``: the options map one to one onto :class:`nlref.train.TrainConfig`."""
    from nlref.backend import retain_freed_memory
    from nlref.train import TrainConfig, train

    xp = None
    if args.backend == "cupy":
        try:
            import cupy as xp
        except ImportError as err:
            raise ValueError(f"--backend cupy needs CuPy with a CUDA device ({err})") from err
    fields = {"model": args.model, "nonlocal_blocks": args.nonlocal_blocks, "stage": args.stage, "mode": args.mode,
              "extent": args.extent, "sub_sample": not args.no_sub_sample, "bn_layer": not args.no_bn,
              "scale": args.scale, "pool": args.pool, "epochs": args.epochs, "batch_size": args.batch_size,
              "optimizer": args.optimizer, "n_train": args.n_train, "n_val": args.n_val, "seed": args.seed,
              "relation": args.relation, "kinds": args.kinds, "size": args.size, "dtype": args.dtype}
    if args.lr is not None:
        fields["lr"] = args.lr
    elif args.optimizer == "sgd":
        fields["lr"] = 0.1
    config = TrainConfig(**fields)
    retain_freed_memory()  # this process is ours: reuse freed memory rather than page-fault it back in
    print(f"nlref train: {config.model} with {config.nonlocal_blocks} non-local block(s) "
          f"({config.mode}, {config.extent}), {config.epochs} epochs, {config.optimizer} lr {config.lr:g}, "
          f"{config.n_train} clips of {config.frames}x{config.size}x{config.size} -> {args.out}")
    result = train(config, args.out, xp=xp, resume=args.resume, progress=not args.no_progress)
    print(f"val accuracy {result['val_accuracy']:.3f} after {len(result['history'])} epochs; "
          f"{result['seconds']:.0f} s of training at {result['clips_per_second']:.0f} clips/s")
    return result


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
    den.add_argument("--chunks", type=_size, help="Dask chunk size, or comma-separated per spatial axis: stream a "
                     "Zarr store or TIFF stack chunk by chunk into the Zarr store --out (see docs/dask.md)")
    den.add_argument("--scheduler", help="address of a dask.distributed scheduler for a chunked run (default: local "
                     "threads)")

    from nlref.data.sprites import RELATIONS
    from nlref.nn.models import EXTENTS, FLAVOURS, STAGES
    from nlref.nn.nonlocal_op import MODES
    from nlref.train import OPTIMISERS, TrainConfig

    d = TrainConfig()
    tr = sub.add_parser("train", help="train a small (non-local) video network on the two-sprite task")
    tr.add_argument("--model", choices=FLAVOURS, default=d.model)
    tr.add_argument("--nonlocal", dest="nonlocal_blocks", type=int, default=d.nonlocal_blocks,
                    help="number of non-local blocks (0: the baseline; default %(default)s)")
    tr.add_argument("--stage", choices=STAGES, default=d.stage, help="stage of a single block")
    tr.add_argument("--mode", choices=MODES, default=d.mode)
    tr.add_argument("--extent", choices=EXTENTS, default=d.extent, help="what a block attends over")
    tr.add_argument("--no-sub-sample", action="store_true", help="no max-pooling of the keys and values")
    tr.add_argument("--no-bn", action="store_true", help="no BN after W_z (W_z starts at 0 instead)")
    tr.add_argument("--scale", action="store_true", help="1/sqrt(d) on the softmax logits")
    tr.add_argument("--pool", choices=("after", "before"), default=d.pool)
    tr.add_argument("--epochs", type=int, default=d.epochs)
    tr.add_argument("--batch-size", type=int, default=d.batch_size)
    tr.add_argument("--optimizer", choices=OPTIMISERS, default=d.optimizer)
    tr.add_argument("--lr", type=float, help=f"learning rate (default {d.lr:g} for adam, 0.1 for sgd)")
    tr.add_argument("--n-train", type=int, default=d.n_train)
    tr.add_argument("--n-val", type=int, default=d.n_val)
    tr.add_argument("--relation", choices=RELATIONS, default=d.relation)
    tr.add_argument("--kinds", type=int, default=d.kinds)
    tr.add_argument("--size", type=int, default=d.size, help="frame height and width")
    tr.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype)
    tr.add_argument("--seed", type=int, default=d.seed)
    tr.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    tr.add_argument("--out", default="nlref-train", help="folder for checkpoint and metrics (default: ./nlref-train)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None):
    import matplotlib

    matplotlib.use("Agg")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            run_demo(args.out, quick=args.quick, seed=args.seed)
        elif args.command == "train":
            run_train(args)
        else:
            run_denoise(args)
    except (ValueError, TypeError) as err:
        print(f"nlref {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
