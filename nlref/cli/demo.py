"""``nlref demo``: the teaching walk of :mod:`nlref.cli.walk`, with its figures and tables."""

from __future__ import annotations

from nlref.cli._common import CommandError, path_arg, seed_arg, writable_folder

_DEMO = """\
The teaching walk, on the bundled images: averaging noisy copies (the variance falls as
1/N); NL-means pixel-wise and patch-wise on the grey camera image and in colour, with the
weights of three pixels; the non-local block (a float64 gradient check of every pairwise
function, the identity at the start, an embedded-Gaussian block whose attention equals
NL-means weights); and a short training run of a C2D network with and without a
non-local block on the two-sprite task (under a minute on 2 cores), with its curves and
where the trained block attends. Writes the figures to OUT and prints tables of PSNR,
time and accuracy."""


def add_parser(sub, fmt):
    """The ``nlref demo`` subcommand."""
    demo = sub.add_parser("demo", help="the teaching walk: averaging, NL-means, the non-local block, a short training",
                          description=_DEMO, formatter_class=fmt)
    demo.add_argument("--out", default="nlref-demo", type=path_arg, help="folder for the figures (default: %(default)s)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the figures of an earlier demo in --out (default: off, they are refused)")
    demo.add_argument("--quick", action="store_true",
                      help="128x128 crops and a tiny network (a few seconds; used by the tests) (default: off)")
    demo.add_argument("--seed", type=seed_arg, default=0,
                      help="seed of the noise and the networks, an int >= 0 (default: %(default)s)")
    return demo


def run(args):
    """Run the teaching walk into ``--out``: a folder, whose earlier figures are replaced only with ``--overwrite``."""
    from pathlib import Path

    from nlref.cli.walk import FIGURES, run_demo

    out = Path(args.out)
    if not args.out:
        raise CommandError("--out must name a folder for the figures; got ''")
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {args.out!r} exists and is not a folder; choose a folder for the figures")
    present = [name for name in FIGURES if (out / name).exists() or (out / name).is_symlink()]
    if present and not args.overwrite:
        raise CommandError(f"--out {args.out!r} already holds {', '.join(present)}: add --overwrite to replace them, "
                           "or choose another --out")
    writable_folder(out, "--out", args.out)
    run_demo(args.out, quick=args.quick, seed=args.seed)
