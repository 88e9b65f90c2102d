"""``nlref demo``: the teaching walk of :mod:`nlref.cli.walk`, with its figures and tables."""

from __future__ import annotations

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
    demo.add_argument("--out", default="nlref-demo", help="folder for the figures (default: %(default)s)")
    demo.add_argument("--quick", action="store_true",
                      help="128x128 crops and a tiny network (a few seconds; used by the tests) (default: off)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the noise and the networks (default: %(default)s)")
    return demo


def run(args):
    """Run the teaching walk into ``--out``."""
    from nlref.cli.walk import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)
