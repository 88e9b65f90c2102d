"""``nlref denoise`` on one image file, in memory (a chunked run goes to :mod:`nlref.cli.store`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from nlref.cli._common import (CommandError, _timed, _warned, flag_names, grey_levels_arg, path_arg, refuse_existing,
                               say, seed_arg, stack_note, writable_folder)
from nlref.cli._formats import _PNG_COLOURS, _refuse_unreadable_video, _refuse_wide_colour_png
from nlref.cli.store import FLAGS, _chunk_size, _is_chunked, run_denoise_chunked

#: What each output format can hold: (name, dtypes, channel counts; None: anything, 0: no channel axis).
_WRITERS = {
    ".png": ("PNG", ("uint8", "uint16"), (0, 2, 3, 4)),  # uint16: grey only (_check_output)
    ".tif": ("TIFF", None, None),
    ".tiff": ("TIFF", None, None),
    ".jpg": ("JPEG", ("uint8",), (0, 3)),
    ".jpeg": ("JPEG", ("uint8",), (0, 3)),
    ".bmp": ("BMP", ("uint8",), (0, 3)),
    ".webp": ("WebP", ("uint8",), (3, 4)),       # Pillow writes grey as RGB and grey + alpha as RGBA
}
_JPEG = (".jpg", ".jpeg")


def _read_image(path):
    """Read an image file: (the array, whether its last axis holds samples: grey + alpha, RGB, RGBA).

    Any failure becomes one CommandError line naming the file and the problem. A TIFF says which
    axis holds samples (:func:`_read_tiff`); the other formats' reader gives (H, W), (H, W, C) or,
    for an animation (GIF, APNG), (frames, H, W, C), one frame as (1, H, W, C), taken as (H, W, C).
    """
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
    arrays = {".npy": "a NumPy", ".h5": "an HDF5", ".hdf5": "an HDF5"}.get(path.suffix.lower())
    if arrays:  # read by the chunked route only (it said "not an image in a format the reader knows")
        raise CommandError(f"IMAGE {str(path)!r} is {arrays} file, which nlref denoise reads chunk by chunk into a "
                           "Zarr store: add --chunks N (or give an --out ending in .zarr)")
    _refuse_wide_colour_png(path)
    _refuse_unreadable_video(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            image, samples = _read_tiff(path)
        else:
            with warnings.catch_warnings():  # imageio's plugins, tried one by one on a file no plugin reads
                warnings.simplefilter("ignore", DeprecationWarning)
                image = np.asarray(io.imread(path))
            _refuse_cmyk(path)
            if image.ndim == 4 and image.shape[0] == 1:  # one frame of a GIF or APNG: an image
                image = image[0]
            samples = image.ndim == 4 or (image.ndim == 3 and image.shape[-1] <= 4)
    except PermissionError:
        raise CommandError(f"cannot read IMAGE {str(path)!r}: permission denied") from None
    except _ColourModel:
        raise
    except Exception as err:  # imageio's plugins raise OSError, ValueError, struct.error, SyntaxError ...
        reason = ("the image data is truncated (an incomplete copy or download?)" if "truncated" in str(err).lower()
                  else "it is not an image in a format the reader knows (PNG, JPEG, TIFF, BMP, GIF, WebP, ...), "
                       "or it is damaged")
        raise CommandError(f"cannot read IMAGE {str(path)!r}: {reason}") from None
    if image.dtype.kind not in "uif" or image.size == 0:
        raise CommandError(f"cannot denoise IMAGE {str(path)!r}: it holds {image.size} values of dtype {image.dtype}")
    return image, samples


_PNG_TYPES = {2: 4, 3: 2, 4: 6}                            # channels -> PNG colour type


class _ColourModel(CommandError):
    """A file whose values are not grey or RGB (CMYK, palette indices, CIELAB, white-is-zero)."""


#: TIFF photometric interpretations whose values are not grey (0 black) or RGB: refused.
_MODELS = {"PALETTE": "indices into a colour table", "SEPARATED": "CMYK", "MINISWHITE": "grey with 0 as white",
           "CIELAB": "CIELAB colours", "ICCLAB": "CIELAB colours", "ITULAB": "CIELAB colours"}


def _refuse_cmyk(path):
    """A CMYK JPEG (or another file Pillow opens as CMYK) reads as 4 channels, which were taken for RGBA:
    C, M, Y denoised and written as R, G, B, K kept as alpha."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            mode = opened.mode
    except Exception:  # noqa: BLE001 -- a format imageio reads without Pillow: not CMYK as far as Pillow can tell
        return
    if mode == "CMYK":
        raise _ColourModel(f"IMAGE {str(path)!r} is a CMYK image, which nlref denoise would denoise and write back "
                           "as RGBA values: convert it to RGB first")


def _read_tiff(path):
    """A TIFF's first series, with its samples (RGB, RGBA) on the last axis and its pages kept as pages;
    and whether it has samples.

    ``skimage.io.imread`` moves the pages of a 3- or 4-page grey stack to the last axis, where
    they read as RGB or RGBA: a volume was denoised and written as one colour image. The
    series' axes say which axis holds samples ("S"); any other axis is a volume's.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        photometric = getattr(series.keyframe.photometric, "name", str(series.keyframe.photometric))
        if photometric in _MODELS:
            raise _ColourModel(f"IMAGE {str(path)!r} is a TIFF of photometric {photometric} ({_MODELS[photometric]}), "
                               "which nlref denoise would denoise and write back as grey or RGB values: convert it "
                               "to grey or RGB first")
        image, axes = np.asarray(series.asarray()), series.axes
    return (np.moveaxis(image, axes.index("S"), -1), True) if "S" in axes else (image, False)

def _layout(image, samples):
    """How an image as read is denoised: (description, the array to denoise, channel_axis, alpha or None).

    ``samples``: whether the last axis holds samples (:func:`_read_image`); the axes before it are
    the image's (H, W) or a stack's (frames or slices, H, W): an RGB stack is a colour video, its
    colours are never a spatial axis.
    """
    if not samples:
        return ("grey", image, None, None) if image.ndim == 2 else \
            (f"{image.ndim}-D, denoised as a volume", image, None, None)
    n = image.shape[-1]
    stack = f", a stack of {image.shape[0]} frames or slices" if image.ndim > 3 else ""
    if n == 1:
        return f"grey (one channel){stack}", image[..., 0], None, None
    if n == 2:
        return f"grey + alpha{stack}: the grey channel is denoised, alpha kept as it is", image[..., :1], -1, \
            image[..., 1:]
    if n == 4:
        return f"colour + alpha (RGBA){stack}: the colour channels are denoised, alpha kept as it is", \
            image[..., :3], -1, image[..., 3:]
    return f"{'colour (RGB)' if n == 3 else f'{n} channels'}{stack}", image, -1, None


def _check_output(out, *, image_path, dtype, shape, samples):
    """Everything about ``--out`` that can be checked before the work: folder, extension, what the format holds.

    ``shape``: the result's; ``samples``: whether its last axis holds samples (grey + alpha, RGB, RGBA).
    """
    if out.is_dir():
        raise CommandError(f"--out {str(out)!r} is a folder; give a file name such as {str(out / 'denoised.png')!r}")
    from nlref._files import writing_target

    folder = writing_target(out).parent  # a link is written through: its target's folder
    if not folder.is_dir():
        raise CommandError(f"the folder of --out ({str(folder)!r}) does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise CommandError(f"the folder of --out ({str(folder)!r}) is not writable")
    writable_folder(folder, "--out", str(out))  # what os.access cannot see: a full disk (raised: exit 1), before the work
    suffix = out.suffix.lower()
    if suffix not in _WRITERS:
        raise CommandError(f"--out {str(out)!r}: the extension {suffix or '(none)'!r} names no image format nlref "
                           f"writes; use one of {', '.join(_WRITERS)}")
    if image_path is not None and out.exists() and out.samefile(image_path):
        raise CommandError(f"--out {str(out)!r} is IMAGE itself: it would overwrite the input; choose another name")
    name, dtypes, channels = _WRITERS[suffix]
    n, spatial = (shape[-1], len(shape) - 1) if samples else (0, len(shape))
    if dtypes is not None and str(dtype) not in dtypes:
        raise CommandError(f"--out {str(out)!r}: {name} cannot hold {dtype} values (it holds {', '.join(dtypes)}); "
                           "use .tif")
    if suffix == ".png" and str(dtype) == "uint16" and spatial == 2 and n in (2, 3, 4):
        raise CommandError(f"--out {str(out)!r}: PNG as nlref writes it (with Pillow) holds 16 bits for grey only, "
                           f"not for {_PNG_COLOURS[_PNG_TYPES[n]]}; use .tif")
    if channels is not None and (spatial != 2 or n not in channels):
        held = {0: "grey", 2: "grey + alpha", 3: "RGB", 4: "RGBA"}
        kind = held.get(n, f"{n}-channel")
        what = (kind if spatial == 2 else f"a stack of {shape[0]} {kind} images" if samples
                else f"a volume of {shape[0]} slices" if spatial == 3 else f"a {spatial}-D array")
        instead = ".tif" if suffix == ".png" or spatial != 2 or n not in held else ".png or .tif"
        raise CommandError(f"--out {str(out)!r}: {name} cannot hold {what} (it holds "
                           f"{', '.join(held[c] for c in channels)}); use {instead}")


def _write_image(out, image, *, samples):
    """Write the image whole or not at all (:func:`nlref._files.replaced_atomically`).

    ``samples``: whether the last axis holds an image's samples (grey + alpha, RGB, RGBA); a
    TIFF is written with the photometric tag that says so, minisblack otherwise (a volume of 3
    slices written as RGB planes would read back as one colour image).
    """
    from nlref._files import replaced_atomically, write_atomically

    if out.suffix.lower() not in (".tif", ".tiff"):
        # encoded in memory (by imageio, as skimage.io.imsave does), then written by us: imageio's plugin
        # wrote to the file itself and closed it again when collected, and on a full disk that second close
        # printed "Exception ignored in: PluginV3.__del__" with a traceback after the error line
        import imageio.v3 as iio

        encoded = iio.imwrite("<bytes>", image, extension=out.suffix.lower())
        write_atomically(out, lambda f: f.write(encoded))
        return
    with replaced_atomically(out) as tmp:
        import tifffile

        n = image.shape[-1] if samples else 0
        extra = ["unassalpha"] if n in (2, 4) else ["unspecified"] * (n - 1) if n > 4 else []
        options = dict(planarconfig="contig", extrasamples=extra) if extra else {}
        tifffile.imwrite(tmp, image, photometric="rgb" if n in (3, 4) else "minisblack", **options)


def run_denoise(args):
    """``nlref denoise``: read, check everything, then denoise and write the result atomically."""
    import nlref
    from nlref.nlmeans.api import check_limits

    if args.image is not None:  # the bundled image's noise: nothing to do with an IMAGE
        given = [flag for flag, value in (("--noise", args.noise), ("--seed", args.seed)) if value is not None]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise CommandError(f"{' and '.join(given)} {verb} only to the bundled camera image (no IMAGE given), "
                               f"to which {'they add' if len(given) > 1 else 'it adds'} noise; IMAGE {args.image!r} "
                               f"is denoised as it is: drop {' and '.join(given)}")
    if _is_chunked(args):  # a Zarr store or TIFF stack, streamed chunk by chunk into a Zarr store
        return run_denoise_chunked(args)
    if args.scheduler is not None:
        raise CommandError("--scheduler applies only to a chunked run (--chunks, or a .zarr input or output)")
    if args.image is None:
        noise, seed = 20.0 if args.noise is None else args.noise, 0 if args.seed is None else args.seed
        from skimage import data

        clean = data.camera()
        image = np.clip(np.round(clean + noise * np.random.default_rng(seed).standard_normal(clean.shape)),
                        0, 255).astype(np.uint8)
        path, samples = None, False
        say(f"no IMAGE given: the bundled camera image with Gaussian noise of {noise} grey levels")
    else:
        path = Path(args.image)
        image, samples = _read_image(path)
        clean = None
    what, work, channel_axis, alpha = _layout(image, samples)
    result_shape = work.shape if alpha is None else work.shape[:-1] + (work.shape[-1] + alpha.shape[-1],)
    out = Path(args.out)
    _check_output(out, image_path=path, dtype=image.dtype, shape=result_shape, samples=channel_axis is not None)
    refuse_existing(out, args.overwrite)
    say(f"read {'the camera image' if path is None else path.name}: {tuple(image.shape)} {image.dtype}, {what}")
    shown = set()
    try:
        params = _warned(lambda: nlref.resolve_parameters(
            work, sigma=args.sigma, h=args.h, patch_size=args.patch_size, search_size=args.search_size,
            channel_axis=channel_axis, aggregation=args.aggregation), shown)
        # the limits nl_means would refuse after the report lines (an internal error, exit 1, it said)
        check_limits(work, params, channel_axis=channel_axis, aggregation=args.aggregation, method=args.method)
    except (ValueError, TypeError) as err:  # the values the user typed: the message names their flags
        raise CommandError(flag_names(str(err), FLAGS)) from None
    say(f"sigma {params['sigma']:.3g} ({params['sigma_source']}), h {params['h']:.3g}, "
        f"patch {params['patch_size']}, search {params['search_size']}, {args.aggregation}-wise{stack_note(params)}")
    if path is not None and path.suffix.lower() in _JPEG and args.sigma is None:
        say("note: JPEG compression removes part of the noise, so this estimate is unreliable and mostly low; "
            "if you know the noise level, pass it with --sigma (in grey levels for 8-bit files)")
    progress = not args.no_progress and sys.stderr.isatty()
    result, seconds = _timed(lambda: _warned(lambda: nlref.nl_means(
        work, sigma=args.sigma, h=args.h, patch_size=args.patch_size, search_size=args.search_size,
        channel_axis=channel_axis, aggregation=args.aggregation, method=args.method, progress=progress), shown))
    if alpha is not None:
        result = np.concatenate([result, alpha], axis=-1)
    _write_image(out, result, samples=channel_axis is not None)
    line = f"denoised {tuple(image.shape)} {image.dtype} in {seconds:.2f} s -> {out}"
    if path is None:
        line += f" (PSNR {nlref.psnr(clean, image):.2f} -> {nlref.psnr(clean, result):.2f} dB)"
    say(line)


def _size(text):
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int or comma-separated ints (e.g. 7 or 3,7,7)") from None
    return parts[0] if len(parts) == 1 else tuple(parts)


_DENOISE = """\
sigma and h are in the units of the image's values: grey levels (0..255) for 8-bit
files, 0..65535 for 16-bit ones. Without --sigma the noise level is estimated. JPEG
input: compression removes part of the noise, so the estimate is unreliable and mostly
reads low (8.3 where 20 grey levels were added to the colour astronaut image saved at
quality 75; see docs/nlmeans.md): pass the noise level with --sigma when you know it,
e.g. --sigma 20. Alpha channels (grey + alpha, RGBA) are kept as they are; the
grey or colour channels are denoised. The output is written only after the work is
done, through a temporary file, so a failed or interrupted run never leaves half a file."""


def add_parser(sub, fmt):
    """The ``nlref denoise`` subcommand."""
    den = sub.add_parser("denoise", help="NL-means denoise an image file", description=_DENOISE, formatter_class=fmt)
    den.add_argument("image", nargs="?", metavar="IMAGE", type=path_arg,
                     help="image file: PNG, TIFF, JPEG, BMP, ... (default: the bundled camera image, with added noise)")
    den.add_argument("--sigma", type=float,
                     help="noise std in the image's units (0..255 for 8-bit files) (default: estimated; reads low "
                          "on JPEG files)")
    den.add_argument("--h", type=float,
                     help="filter strength, in the image's units (default: from the preset for sigma)")
    den.add_argument("--patch-size", type=_size,
                     help="odd patch width, or comma-separated per axis (default: from the preset for sigma)")
    den.add_argument("--search-size", type=_size,
                     help="odd search width, or comma-separated per axis (default: from the preset for sigma)")
    den.add_argument("--aggregation", choices=("pixel", "patch"), default="pixel",
                     help="pixel-wise or patch-wise estimates (default: %(default)s)")
    den.add_argument("--method", choices=("fast", "naive"), default="fast",
                     help="the offset loop, or the definition for small images (default: %(default)s)")
    den.add_argument("--noise", type=grey_levels_arg,
                     help="noise added to the bundled image when no IMAGE is given, in grey levels (default: "
                          "20.0)")
    den.add_argument("--seed", type=seed_arg, help="seed of that noise, an int >= 0 (default: 0)")
    den.add_argument("--out", default="denoised.png", type=path_arg,
                     help="output file; its extension picks the format: .png, .tif, .jpg, .bmp, .webp "
                          "(default: %(default)s)")
    den.add_argument("--overwrite", action="store_true",
                     help="replace an existing --out (default: off, an existing --out is refused)")
    den.add_argument("--no-progress", action="store_true",
                     help="no progress bar (default: a bar when stderr is a terminal, none otherwise)")
    den.add_argument("--chunks", type=_chunk_size, help="Dask chunk size, or comma-separated per spatial axis: "
                     "stream a Zarr store, TIFF stack, HDF5 or .npy file chunk by chunk into the Zarr store --out "
                     "(see docs/dask.md) (default: off, the image is denoised in memory)")
    den.add_argument("--scheduler", help="address of a dask.distributed scheduler for a chunked run (default: local "
                     "threads)")
    return den
