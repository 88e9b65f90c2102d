"""The ``nlref`` command: ``nlref demo`` (the teaching walk), ``nlref denoise`` and ``nlref train``.

Every problem with the user's files or options is reported as one line naming the
file or option and what is wrong (exit status 2), checked before the work where it
can be; Ctrl-C and SIGTERM stop with one line (exit status 130 / 143).
"""

from __future__ import annotations

import argparse
import math
import os
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
    _save(viz.image_grid([noisy, pixel, patch, noisy - pixel],
                         ["noisy", "NL-means pixel-wise", "NL-means patch-wise", "method noise: noisy - pixel-wise"],
                         limits=[None, None, None, (-3 * sigma, 3 * sigma)],
                         colorbars=[None, None, None, "noisy - denoised (grey level, 0..1 scale)"],
                         title="NL-means on the camera image (noise sigma = 20/255); the method noise should look "
                               "like noise"),
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
    fig = viz.attention_plot(small, attention[0], queries, query_shape=(32, 32), key_shape=(32, 32),
                             titles=[f"attention of {q} ({name})" for q, name in zip(queries, ("sky", "grass", "coat"))])
    fig.suptitle("embedded-Gaussian block with NL-means weights on the 32x32 camera image", fontsize=10)
    _save(fig, out / "nonlocal_attention.png")
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
                                       f"(red circle), validation clip {i}, sprite 2 brighter: {mass[i]:.2f} on "
                                       f"sprite 2's cells (mean over all {len(val)} clips {np.mean(mass):.2f})"),
          out / "training_attention.png")
    ceiling = additive_ceiling(config.kinds)
    lines = [f"training on the two-sprite task ({config.kinds} brightness kinds, {config.n_train} clips x "
             f"{config.epochs} epochs, {config.n_val} validation clips; additive ceiling {ceiling:.3f})",
             f"{'network':<26} {'val accuracy':>12} {'clips/s':>8}"]
    for label, r in runs.items():
        lines.append(f"{label:<26} {r['val_accuracy']:12.3f} {r['clips_per_second']:8.0f}")
    lines.append(f"attention of a sprite-1 query on sprite 2's cells: {float(np.mean(mass)):.3f} "
                 f"(uniform {duration / np.prod(k_shape):.3f}), the mean over the {len(val)} validation clips; "
                 f"training_attention.png draws clip {i}, where it is {float(mass[i]):.3f}")
    return lines


class CommandError(Exception):
    """A problem with the files or options of a command: reported as one line, without a traceback."""


class _Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives (as KeyboardInterrupt is for SIGINT)."""


#: What each output format can hold: (name, dtypes, channel counts; None: anything, 0: no channel axis).
_WRITERS = {
    ".png": ("PNG", ("uint8", "uint16"), (0, 2, 3, 4)),
    ".tif": ("TIFF", None, None),
    ".tiff": ("TIFF", None, None),
    ".jpg": ("JPEG", ("uint8",), (0, 3)),
    ".jpeg": ("JPEG", ("uint8",), (0, 3)),
    ".bmp": ("BMP", ("uint8",), (0, 3)),
    ".webp": ("WebP", ("uint8",), (3, 4)),       # Pillow writes grey as RGB and grey + alpha as RGBA
}
_JPEG = (".jpg", ".jpeg")


def _count(n, word):
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _read_image(path):
    """Read an image file; any failure becomes one CommandError line naming the file and the problem."""
    import warnings

    from skimage import io

    if not path.exists():
        raise CommandError(f"IMAGE {str(path)!r} does not exist")
    if path.is_dir():
        raise CommandError(f"IMAGE {str(path)!r} is a folder, not an image file")
    if not path.is_file():
        raise CommandError(f"IMAGE {str(path)!r} is not a regular file")
    if path.stat().st_size == 0:
        raise CommandError(f"cannot read IMAGE {str(path)!r}: the file is empty")
    try:
        with warnings.catch_warnings():  # imageio's plugins, tried one by one on a file no plugin reads
            warnings.simplefilter("ignore", DeprecationWarning)
            image = np.asarray(io.imread(path))
    except PermissionError:
        raise CommandError(f"cannot read IMAGE {str(path)!r}: permission denied") from None
    except Exception as err:  # imageio's plugins raise OSError, ValueError, struct.error, SyntaxError ...
        reason = ("the image data is truncated (an incomplete copy or download?)" if "truncated" in str(err).lower()
                  else "it is not an image in a format the reader knows (PNG, JPEG, TIFF, BMP, GIF, WebP, ...), "
                       "or it is damaged")
        raise CommandError(f"cannot read IMAGE {str(path)!r}: {reason}") from None
    if image.dtype.kind not in "uif" or image.size == 0:
        raise CommandError(f"cannot denoise IMAGE {str(path)!r}: it holds {image.size} values of dtype {image.dtype}")
    return image


def _layout(image):
    """How an image as read is denoised: (description, the array to denoise, channel_axis, alpha or None)."""
    if image.ndim == 3 and image.shape[-1] == 1:
        return "grey (one channel)", image[..., 0], None, None
    if image.ndim == 3 and image.shape[-1] == 2:
        return "grey + alpha: the grey channel is denoised, alpha kept as it is", image[..., :1], -1, image[..., 1:]
    if image.ndim == 3 and image.shape[-1] == 3:
        return "colour (RGB)", image, -1, None
    if image.ndim == 3 and image.shape[-1] == 4:
        return "colour + alpha (RGBA): the colour channels are denoised, alpha kept as it is", image[..., :3], -1, \
            image[..., 3:]
    if image.ndim == 2:
        return "grey", image, None, None
    return f"{image.ndim}-D, denoised as a volume", image, None, None


def _check_output(out, *, image_path, dtype, shape):
    """Everything about ``--out`` that can be checked before the work: folder, extension, what the format holds."""
    if out.is_dir():
        raise CommandError(f"--out {str(out)!r} is a folder; give a file name such as {str(out / 'denoised.png')!r}")
    folder = out.parent
    if not folder.is_dir():
        raise CommandError(f"the folder of --out ({str(folder)!r}) does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise CommandError(f"the folder of --out ({str(folder)!r}) is not writable")
    suffix = out.suffix.lower()
    if suffix not in _WRITERS:
        raise CommandError(f"--out {str(out)!r}: the extension {suffix or '(none)'!r} names no image format nlref "
                           f"writes; use one of {', '.join(_WRITERS)}")
    if image_path is not None and out.exists() and out.samefile(image_path):
        raise CommandError(f"--out {str(out)!r} is IMAGE itself: it would overwrite the input; choose another name")
    name, dtypes, channels = _WRITERS[suffix]
    n = 0 if len(shape) == 2 else shape[-1]
    if dtypes is not None and str(dtype) not in dtypes:
        raise CommandError(f"--out {str(out)!r}: {name} cannot hold {dtype} values (it holds {', '.join(dtypes)}); "
                           "use .tif")
    if channels is not None and (len(shape) not in (2, 3) or n not in channels):
        held = {0: "grey", 2: "grey + alpha", 3: "RGB", 4: "RGBA"}
        what = f"a {len(shape)}-D array" if len(shape) not in (2, 3) else held.get(n, f"{n} channels")
        raise CommandError(f"--out {str(out)!r}: {name} cannot hold {what} (it holds "
                           f"{', '.join(held[c] for c in channels)}); use .png or .tif")


def _write_image(out, image):
    """Write through a temporary file in the same folder, renamed into place: never a half-written file."""
    import tempfile

    from skimage import io

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        io.imsave(tmp, image, check_contrast=False)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                   # mkstemp makes 0600; give it the usual mode
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _warned(f, shown):
    """Run ``f``, printing each warning not in ``shown`` as one line on stderr (not Python's two-line form)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = f()
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        if message not in shown:
            shown.add(message)
            print(f"nlref denoise: warning: {message}", file=sys.stderr)
    return result


def run_denoise(args):
    """``nlref denoise``: read, check everything, then denoise and write the result atomically."""
    import nlref

    if _is_chunked(args):  # a Zarr store or TIFF stack, streamed chunk by chunk into a Zarr store
        return run_denoise_chunked(args)
    if args.image is None:
        from skimage import data

        clean = data.camera()
        image = np.clip(np.round(clean + args.noise * np.random.default_rng(args.seed).standard_normal(clean.shape)),
                        0, 255).astype(np.uint8)
        path = None
        print(f"no IMAGE given: the bundled camera image with Gaussian noise of {args.noise} grey levels")
    else:
        path = Path(args.image)
        image = _read_image(path)
        clean = None
    what, work, channel_axis, alpha = _layout(image)
    result_shape = image.shape[:2] if image.ndim == 3 and image.shape[-1] == 1 else image.shape
    out = Path(args.out)
    _check_output(out, image_path=path, dtype=image.dtype, shape=result_shape)
    print(f"read {'the camera image' if path is None else path.name}: {tuple(image.shape)} {image.dtype}, {what}")
    shown = set()
    params = _warned(lambda: nlref.resolve_parameters(
        work, sigma=args.sigma, h=args.h, patch_size=args.patch_size, search_size=args.search_size,
        channel_axis=channel_axis, aggregation=args.aggregation), shown)
    print(f"sigma {params['sigma']:.3g} ({params['sigma_source']}), h {params['h']:.3g}, "
          f"patch {params['patch_size']}, search {params['search_size']}, {args.aggregation}-wise")
    if path is not None and path.suffix.lower() in _JPEG and args.sigma is None:
        print("note: JPEG compression removes part of the noise, so this estimate is unreliable and mostly low; "
              "if you know the noise level, pass it with --sigma (in grey levels for 8-bit files)")
    progress = not args.no_progress and sys.stderr.isatty()
    result, seconds = _timed(lambda: _warned(lambda: nlref.nl_means(
        work, sigma=args.sigma, h=args.h, patch_size=args.patch_size, search_size=args.search_size,
        channel_axis=channel_axis, aggregation=args.aggregation, method=args.method, progress=progress), shown))
    if alpha is not None:
        result = np.concatenate([result, alpha], axis=-1)
    _write_image(out, result)
    line = f"denoised {tuple(image.shape)} {image.dtype} in {seconds:.2f} s -> {out}"
    if path is None:
        line += f" (PSNR {nlref.psnr(clean, image):.2f} -> {nlref.psnr(clean, result):.2f} dB)"
    print(line)


def _train_command(args):
    """The ``nlref train`` command line that continues the run of ``args`` (``--resume``, no ``--overwrite``)."""
    import shlex

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    words = ["nlref", "train"]
    for action in sub.choices["train"]._actions:
        if not action.option_strings or action.dest in ("help", "resume", "overwrite"):
            continue
        value = getattr(args, action.dest)
        if isinstance(action, argparse._StoreTrueAction):
            words += [action.option_strings[0]] if value else []
        elif value != action.default or action.dest == "out":
            words += [action.option_strings[0], str(value)]
    return shlex.join(words + ["--resume"])


def _stamp(path):
    """(size, modification time in ns, inode) of a file, or None: tells whether it was rewritten."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _train_interrupted(args, signame):
    """One line: the epoch whose checkpoint is intact, and the command that continues from it."""
    from nlref.train import CHECKPOINT, CheckpointError, load_checkpoint

    path = Path(args.out) / CHECKPOINT
    try:
        epoch = load_checkpoint(path)[0]["epoch"] if path.is_file() else 0
    except CheckpointError:
        epoch = None
    previous = getattr(args, "previous_checkpoint", None)
    if previous is not None and _stamp(path) == previous:
        return (f"nlref train: stopped by {signame} before the new run's first epoch was complete; nothing of it "
                f"was saved, and {args.out} still holds the previous run (--overwrite replaces it only when the "
                f"first epoch is written): run the same command again to start over")
    if epoch is None:
        return f"nlref train: stopped by {signame}; the checkpoint {path} cannot be read"
    if epoch == 0:
        return (f"nlref train: stopped by {signame} before the first epoch was complete; nothing was saved: "
                f"run the same command again to start")
    return (f"nlref train: stopped by {signame} after epoch {epoch} of {args.epochs} (checkpoint {path} is "
            f"complete); to continue: {_train_command(args)}")


def _is_chunked(args):
    """Stream with Dask when the input is a Zarr store, or a Zarr output or chunks are asked for."""
    image = None if args.image is None else str(args.image).rstrip("/")
    zarr_dir = image is not None and Path(image).is_dir() and any(
        (Path(image) / name).exists() for name in ("zarr.json", ".zarray", ".zgroup"))
    return (image is not None and (image.endswith(".zarr") or zarr_dir)
            or str(args.out).rstrip("/").endswith(".zarr") or args.chunks is not None)


def _open_chunked(path):
    """An opener of the array in a Zarr store, TIFF stack, HDF5 file or .npy file (reads the metadata only)."""
    from nlref.nlmeans.store import Opener, as_source

    if path.is_dir():
        return Opener.zarr(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return Opener.tiff(path)
    if suffix == ".npy":  # a memory map of the file: each task reads its chunk, never the whole
        return as_source(np.load(path, mmap_mode="r"))
    if suffix in (".h5", ".hdf5"):
        try:
            import h5py
        except ImportError as err:
            raise ValueError(f"IMAGE {str(path)!r}: reading HDF5 needs h5py: pip install h5py ({err})") from err
        with h5py.File(path, "r") as f:
            names = []
            f.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
        if len(names) != 1:
            raise ValueError(f"IMAGE {str(path)!r}: a chunked run reads an HDF5 file holding one dataset; this one "
                             f"holds {len(names)} ({', '.join(names[:5])})")
        return Opener.hdf5(path, names[0])
    raise ValueError(f"IMAGE {str(path)!r}: a chunked run reads a Zarr store (a folder), a TIFF stack (.tif, .tiff), "
                     f"an HDF5 file (.h5, .hdf5) or a NumPy file (.npy)")


def _running(names, dask_worker=None):
    """The tasks of the graph layers ``names`` a worker still runs (run on the worker; a cancelled task runs on).

    A name is matched within the key: the optimiser fuses layers into keys that join their names.
    """
    states = ("executing", "long-running", "cancelled", "resumed")
    return [str(k) for k, task in dask_worker.state.tasks.items()
            if task.state in states and any(name in str(k) for name in names)]


def _wait_for_running_tasks(client, keys, timeout=60.0):
    """Wait (at most ``timeout`` s) until no worker runs a task of ``keys``: cancelling does not stop a running task."""
    names = sorted({k[0] if isinstance(k, tuple) else str(k) for k in keys})
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if not any(client.run(_running, names).values()):
                return
        except Exception:  # noqa: BLE001 -- a lost connection: nothing more to wait for from here
            return
        time.sleep(0.1)


def run_denoise_chunked(args):
    """``nlref denoise big.zarr --chunks 64 --out clean.zarr``: chunk by chunk, never the whole volume.

    The input (a Zarr store, a TIFF stack, an HDF5 file with one dataset or a
    .npy file) is read by :func:`nlref.nlmeans.store.denoise_store`: one task
    per chunk of ``--chunks`` (default: the store's own chunks; 64 per axis
    otherwise), each opening the file by its absolute path and reading its
    chunk and halo (exact: equal to the in-memory result), on the local
    threads or on the cluster at ``--scheduler``. The result is written chunk
    by chunk into a hidden Zarr store beside ``--out``, checked to hold every
    chunk, and renamed to ``--out``, so an interrupted or failed run leaves no
    ``--out``; once the tasks still running have finished, the hidden store
    is removed. A last axis of length 3 is taken as colour channels.
    """
    try:
        import dask
        import zarr
    except ImportError as err:
        raise ValueError(f"a chunked run needs the dask extra: pip install 'nlref[dask]' ({err})") from err
    import shutil
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from nlref.nlmeans.store import close_opened, denoise_store, resolve_parameters_store

    if args.image is None:
        raise ValueError("a chunked run (--chunks, or a .zarr input or output) needs IMAGE: a Zarr store, TIFF stack, "
                         "HDF5 or .npy file")
    # absolute here, where the paths are parsed: a worker of a cluster runs in another folder
    source, out = Path(os.path.abspath(args.image)), Path(os.path.abspath(str(args.out).rstrip("/")))
    if not source.exists():
        raise ValueError(f"IMAGE {args.image!r} does not exist")
    if out.suffix != ".zarr":
        raise ValueError(f"--out must name a Zarr store (ending in .zarr) for a chunked run; got {args.out!r}")
    if out.exists():
        raise ValueError(f"--out {args.out!r} already exists; remove it or choose another name")
    if not out.parent.exists():
        raise ValueError(f"the folder of --out ({out.parent}) does not exist")
    if args.method != "fast":
        raise ValueError("a chunked run uses --method fast")
    image = _open_chunked(source)
    channel_axis = -1 if len(image.shape) >= 3 and image.shape[-1] == 3 else None
    chunks = args.chunks if args.chunks is not None else (None if image.chunks is not None else 64)
    if chunks is not None:
        spatial = len(image.shape) - (channel_axis is not None)
        sizes = (chunks,) * spatial if isinstance(chunks, int) else tuple(chunks)
        if len(sizes) != spatial:
            raise ValueError(f"--chunks must be one positive int, or one per spatial axis ({spatial}, image shape "
                             f"{image.shape}); got {','.join(map(str, sizes))}")
        chunks = sizes

    client = None
    if args.scheduler is not None:
        from distributed import Client

        client = Client(args.scheduler)
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    pool, future, graph_keys = None, None, ()
    try:
        kwargs = dict(chunks=chunks, channel_axis=channel_axis, aggregation=args.aggregation)
        t0 = time.perf_counter()
        params = _warned(lambda: resolve_parameters_store(image, sigma=args.sigma, h=args.h,
                                                          patch_size=args.patch_size, search_size=args.search_size,
                                                          **kwargs), set())
        print(f"sigma {params['sigma']:.3g} ({params['sigma_source']}), h {params['h']:.3g}, "
              f"patch {params['patch_size']}, search {params['search_size']}, {args.aggregation}-wise "
              f"(resolved for the whole array in {time.perf_counter() - t0:.1f} s)")
        lazy = denoise_store(image, params, **kwargs)  # the parameters just resolved: no further pass
        print(f"{args.image}: {image.shape} {image.dtype} in {lazy.npartitions} chunks of {lazy.chunksize}")
        # every chunk written, also one equal to the fill value, so that a complete store can be told from one
        # whose writes went elsewhere
        target = zarr.create_array(str(partial), shape=lazy.shape, chunks=lazy.chunksize, dtype=lazy.dtype,
                                   config={"write_empty_chunks": True})
        store = lazy.store(target, lock=False, compute=False)
        graph_keys = tuple(dict(store.__dask_graph__()))
        show = not args.no_progress and sys.stderr.isatty()  # as for a single image: a bar on a terminal only
        t0 = time.perf_counter()
        if client is not None:
            future = client.compute(store)
            if show:
                from contextlib import redirect_stdout

                from distributed import progress

                with redirect_stdout(sys.stderr):
                    progress(future)
            future.result()
        else:
            from contextlib import nullcontext

            from dask.diagnostics import ProgressBar

            pool = ThreadPoolExecutor(os.cpu_count() or 1)  # ours: its running tasks are waited for on the way out
            with ProgressBar(out=sys.stderr) if show else nullcontext():
                dask.compute(store, scheduler="threads", pool=pool)
        seconds = time.perf_counter() - t0
        written = zarr.open_array(str(partial), mode="r").nchunks_initialized
        if written != target.nchunks:
            raise OSError(f"the result holds {written} of its {target.nchunks} chunks: the workers wrote elsewhere "
                          f"or failed; nothing was written to --out")
        os.rename(partial, out)  # a folder: fails rather than replace an --out made meanwhile
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # tasks still running finish before the clean-up
        if client is not None:
            if future is not None:
                client.cancel(future, force=True)  # the tasks waiting are dropped; those running still finish
                _wait_for_running_tasks(client, graph_keys)
            client.close()
        close_opened()
        shutil.rmtree(partial, ignore_errors=True)
    voxels = math.prod(image.shape) / (3 if channel_axis is not None else 1)
    print(f"denoised {image.shape} {np.dtype(image.dtype)} in {seconds:.1f} s ({voxels / seconds:,.0f} voxels/s) "
          f"-> {args.out}")


def run_train(args):
    """``nlref train``: the options map one to one onto :class:`nlref.train.TrainConfig`."""
    from nlref.backend import retain_freed_memory
    from nlref.train import CHECKPOINT, RUN_FILES, TrainConfig, train

    xp = None
    if args.backend == "cupy":
        try:
            import cupy as xp
        except ImportError as err:
            raise ValueError(f"--backend cupy needs CuPy with a CUDA device ({err})") from err
    fields = {"task": args.task, "margin": args.margin, "model": args.model, "nonlocal_blocks": args.nonlocal_blocks,
              "stage": args.stage, "mode": args.mode, "extent": args.extent, "sub_sample": not args.no_sub_sample,
              "bn_layer": not args.no_bn, "scale": args.scale, "pool": args.pool, "dropout": args.dropout,
              "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": args.optimizer,
              "n_train": args.n_train, "n_val": args.n_val, "seed": args.seed, "relation": args.relation,
              "kinds": args.kinds, "size": args.size, "dtype": args.dtype, "embed_dim": args.embed_dim,
              "depth": args.depth, "num_heads": args.heads, "mlp_dim": args.mlp_dim}
    if args.lr is not None:
        fields["lr"] = args.lr
    elif args.optimizer == "sgd":
        fields["lr"] = 0.1
    config = TrainConfig(**fields).validate()
    out = Path(args.out)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if args.resume and not (out / CHECKPOINT).is_file():
        raise CommandError(f"--resume: there is no run to resume in {str(out)!r} (no {CHECKPOINT} there); "
                           "start a new run without --resume")
    if existing and not (args.resume or args.overwrite):
        raise CommandError(f"--out {str(out)!r} already holds a training run ({', '.join(existing)}): add --resume "
                           "to continue it, --overwrite to start it over (replacing those files), or choose another "
                           "--out")
    # the checkpoint --overwrite will replace when the new run's first epoch is written: an
    # interruption before that leaves this previous run, which the message must not offer to resume
    args.previous_checkpoint = _stamp(out / CHECKPOINT) if args.overwrite else None
    retain_freed_memory()  # this process is ours: reuse freed memory rather than page-fault it back in
    steps = " and ".join(f"{m:.0%}" for m in config.milestones)
    data = (f"two-shape images of {config.size}x{config.size} (margin {config.margin})" if config.task == "pairs2d"
            else f"clips of {config.frames}x{config.size}x{config.size}")
    if config.task == "pairs2d":
        network = f"2-D residual network with {_count(config.nonlocal_blocks, 'non-local block')} ({config.mode})"
    elif config.model != "transformer":
        network = (f"{config.model} with {_count(config.nonlocal_blocks, 'non-local block')} ({config.mode}, "
                   f"{config.extent})")
    else:
        network = (f"transformer ({_count(config.depth, 'block')} of {config.embed_dim} channels, "
                   f"{_count(config.num_heads, 'head')})")
    print(f"nlref train: {network}, {_count(config.epochs, 'epoch')}, {config.optimizer} lr "
          f"{config.lr:.12g} (x0.1 after {steps} of the steps), {config.n_train} {data} -> {args.out}", flush=True)
    result = train(config, args.out, xp=xp, resume=args.resume, overwrite=args.overwrite,
                   progress=not args.no_progress and sys.stderr.isatty(), log=lambda line: print(line, flush=True))
    print(f"val accuracy {result['val_accuracy']:.3f} after {_count(len(result['history']), 'epoch')}; "
          f"{result['seconds']:.0f} s of training at {result['clips_per_second']:.0f} clips/s")
    return result


def _chunk_size(text):
    """--chunks: a positive int, or comma-separated positive ints (one per spatial axis)."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if not parts or any(p < 1 for p in parts):
        raise argparse.ArgumentTypeError(f"--chunks takes a positive int or comma-separated positive ints, one per "
                                         f"spatial axis (e.g. 64 or 16,128,128); got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _size(text):
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an odd int or comma-separated odd ints (e.g. 7 or 3,7,7)")
    return parts[0] if len(parts) == 1 else tuple(parts)


_DESCRIPTION = """\
nlref: non-local means denoising and the non-local neural block, a readable reference.
  nlref demo      the teaching walk, with figures and tables
  nlref denoise   NL-means on an image file
  nlref train     train a small non-local network on the two-sprite clips or the two-shape images
Run 'nlref COMMAND --help' for the options of a command."""

_DEMO = """\
The teaching walk, on the bundled images: averaging noisy copies (the variance falls as
1/N); NL-means pixel-wise and patch-wise on the grey camera image and in colour, with the
weights of three pixels; the non-local block (a float64 gradient check of every pairwise
function, the identity at the start, an embedded-Gaussian block whose attention equals
NL-means weights); and a short training run of a C2D network with and without a
non-local block on the two-sprite task (under a minute on 2 cores), with its curves and
where the trained block attends. Writes the figures to OUT and prints tables of PSNR,
time and accuracy."""

_DENOISE = """\
sigma and h are in the units of the image's values: grey levels (0..255) for 8-bit
files, 0..65535 for 16-bit ones. Without --sigma the noise level is estimated. JPEG
input: compression removes part of the noise, so the estimate is unreliable and mostly
reads low (8.3 where 20 grey levels were added to the colour astronaut image saved at
quality 75; see docs/nlmeans.md): pass the noise level with --sigma when you know it,
e.g. --sigma 20. Alpha channels (grey + alpha, RGBA) are kept as they are; the
grey or colour channels are denoised. The output is written only after the work is
done, through a temporary file, so a failed or interrupted run never leaves half a file."""

_TRAIN = """\
--task pairs2d trains a 2-D residual network (--model c2d, width and depth the first
stage's) on the two-shape images of nlref.data.pairs2d instead of the sprite clips;
--stage, --extent and the transformer's options do not apply to it.
Writes OUT/checkpoint.npz, metrics.json and metrics.csv after every epoch (atomically).
An OUT that already holds a run is refused unless --resume (continue it) or --overwrite
(start it over). Ctrl-C or SIGTERM stops the run cleanly: the last complete
checkpoint stays valid, and the command that continues it is printed."""


def build_parser():
    from nlref import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="nlref", description=_DESCRIPTION, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"nlref {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the teaching walk: averaging, NL-means, the non-local block, a short training",
                          description=_DEMO, formatter_class=fmt)
    demo.add_argument("--out", default="nlref-demo", help="folder for the figures (default: %(default)s)")
    demo.add_argument("--quick", action="store_true",
                      help="128x128 crops and a tiny network (a few seconds; used by the tests) (default: off)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the noise and the networks (default: %(default)s)")

    den = sub.add_parser("denoise", help="NL-means denoise an image file", description=_DENOISE, formatter_class=fmt)
    den.add_argument("image", nargs="?", metavar="IMAGE",
                     help="image file: PNG, TIFF, JPEG, BMP, ... (default: the bundled camera image, with added noise)")
    den.add_argument("--sigma", type=float,
                     help="noise std in the image's units (0..255 for 8-bit files) (default: estimated; reads low "
                          "on JPEG files)")
    den.add_argument("--h", type=float, help="filter strength, in the image's units (default: from the preset for sigma)")
    den.add_argument("--patch-size", type=_size,
                     help="odd patch width, or comma-separated per axis (default: from the preset for sigma)")
    den.add_argument("--search-size", type=_size,
                     help="odd search width, or comma-separated per axis (default: from the preset for sigma)")
    den.add_argument("--aggregation", choices=("pixel", "patch"), default="pixel",
                     help="pixel-wise or patch-wise estimates (default: %(default)s)")
    den.add_argument("--method", choices=("fast", "naive"), default="fast",
                     help="the offset loop, or the definition for small images (default: %(default)s)")
    den.add_argument("--noise", type=float, default=20.0,
                     help="noise added to the bundled image when no IMAGE is given, in grey levels (default: "
                          "%(default)s)")
    den.add_argument("--seed", type=int, default=0, help="seed of that noise (default: %(default)s)")
    den.add_argument("--out", default="denoised.png",
                     help="output file; its extension picks the format: .png, .tif, .jpg, .bmp, .webp "
                          "(default: %(default)s)")
    den.add_argument("--no-progress", action="store_true",
                     help="no progress bar (default: a bar when stderr is a terminal, none otherwise)")
    den.add_argument("--chunks", type=_chunk_size, help="Dask chunk size, or comma-separated per spatial axis: "
                     "stream a Zarr store, TIFF stack, HDF5 or .npy file chunk by chunk into the Zarr store --out "
                     "(see docs/dask.md) (default: off, the image is denoised in memory)")
    den.add_argument("--scheduler", help="address of a dask.distributed scheduler for a chunked run (default: local "
                     "threads)")

    from nlref.data.sprites import RELATIONS
    from nlref.nn.models import EXTENTS, MODELS, STAGES
    from nlref.nn.nonlocal_op import MODES
    from nlref.train import OPTIMISERS, TASKS, TrainConfig

    d = TrainConfig()
    tr = sub.add_parser("train", help="train a small (non-local) network on the sprite clips or the two-shape images",
                        description=_TRAIN, formatter_class=fmt)
    dflt = " (default: %(default)s)"
    tr.add_argument("--task", choices=TASKS, default=d.task,
                    help="the two-sprite clips, or the two-shape images (a 2-D network)" + dflt)
    tr.add_argument("--model", choices=MODELS, default=d.model,
                    help="network: 2-D or inflated 3-D convs, or a space-time transformer" + dflt)
    tr.add_argument("--embed-dim", type=int, default=d.embed_dim, help="transformer: token channels" + dflt)
    tr.add_argument("--depth", type=int, default=d.depth, help="transformer: blocks" + dflt)
    tr.add_argument("--heads", type=int, default=d.num_heads, help="transformer: attention heads" + dflt)
    tr.add_argument("--mlp-dim", type=int, default=d.mlp_dim, help="transformer: MLP width" + dflt)
    tr.add_argument("--nonlocal", dest="nonlocal_blocks", type=int, default=d.nonlocal_blocks,
                    help="number of non-local blocks, 0 for the baseline" + dflt)
    tr.add_argument("--stage", choices=STAGES, default=d.stage, help="stage of a single block" + dflt)
    tr.add_argument("--mode", choices=MODES, default=d.mode, help="pairwise function of the blocks" + dflt)
    tr.add_argument("--extent", choices=EXTENTS, default=d.extent, help="what a block attends over" + dflt)
    tr.add_argument("--no-sub-sample", action="store_true",
                    help="no max-pooling of the keys and values (default: off, they are pooled)")
    tr.add_argument("--no-bn", action="store_true",
                    help="no BN after W_z, W_z starts at 0 instead (default: off, BN with gamma 0)")
    tr.add_argument("--scale", action="store_true", help="1/sqrt(d) on the softmax logits (default: off)")
    tr.add_argument("--pool", choices=("after", "before"), default=d.pool,
                    help="max-pool after phi and g, or x before them" + dflt)
    tr.add_argument("--dropout", type=float, default=d.dropout,
                    help="dropout probability before the classifier" + dflt)
    tr.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training clips" + dflt)
    tr.add_argument("--batch-size", type=int, default=d.batch_size, help="clips per step" + dflt)
    tr.add_argument("--optimizer", choices=OPTIMISERS, default=d.optimizer, help="optimiser" + dflt)
    tr.add_argument("--lr", type=float,
                    help=f"base learning rate, x0.1 after 60%% and 85%% of the steps (default: {d.lr:g} for adam, "
                         "0.1 for sgd)")
    tr.add_argument("--n-train", type=int, default=d.n_train, help="training clips" + dflt)
    tr.add_argument("--n-val", type=int, default=d.n_val, help="validation clips" + dflt)
    tr.add_argument("--relation", choices=RELATIONS, default=d.relation,
                    help="what the two sprites are compared on" + dflt)
    tr.add_argument("--kinds", type=int, default=d.kinds, help="kinds of sprite (brightness levels)" + dflt)
    tr.add_argument("--size", type=int, default=d.size, help="frame height and width" + dflt)
    tr.add_argument("--margin", type=int, default=d.margin,
                    help="pairs2d: pixels each shape keeps from the centre lines" + dflt)
    tr.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype, help="floating-point type" + dflt)
    tr.add_argument("--seed", type=int, default=d.seed, help="seed of the data, weights and shuffles" + dflt)
    tr.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="array library" + dflt)
    tr.add_argument("--out", default="nlref-train", help="folder for checkpoint and metrics" + dflt)
    again = tr.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in OUT from its checkpoint (default: off)")
    again.add_argument("--overwrite", action="store_true",
                       help="start over in an OUT that holds a run, replacing its checkpoint and metrics "
                            "when the first epoch is written (default: off)")
    tr.add_argument("--no-progress", action="store_true",
                    help="no progress bar (default: a bar when stderr is a terminal, none otherwise)")
    from nlref import course
    course.add_parser(sub, fmt)
    return parser


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def main(argv=None):
    """Run the ``nlref`` command; returns the exit status (0; 1 for a failure during the work; 2 for bad
    input; 130 / 143 when stopped by SIGINT / SIGTERM)."""
    import signal
    import threading

    import matplotlib

    matplotlib.use("Agg")
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        if args.command == "demo":
            run_demo(args.out, quick=args.quick, seed=args.seed)
        elif args.command == "train":
            run_train(args)
        elif args.command == "course":
            from nlref import course
            course.run(args)
        else:
            run_denoise(args)
    except (CommandError, ValueError, TypeError) as err:
        print(f"nlref {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (OSError, FloatingPointError) as err:
        print(f"nlref {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminated) as err:
        signum = err.args[0] if isinstance(err, _Terminated) else signal.SIGINT
        signame = signal.Signals(signum).name
        if args.command == "train":
            print(_train_interrupted(args, signame), file=sys.stderr)
        elif args.command in ("denoise", "course"):
            print(f"nlref {args.command}: stopped by {signame}; nothing was written", file=sys.stderr)
        else:
            print(f"nlref demo: stopped by {signame}; the figures written so far are in {args.out}", file=sys.stderr)
        return 128 + signum
    finally:
        if main_thread and previous is not None:  # None: a handler set outside Python, which cannot be restored
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
