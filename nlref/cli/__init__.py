"""The ``nlref`` command: ``nlref demo`` (the teaching walk), ``nlref denoise``, ``nlref train`` and ``nlref course``.

One module per command (:mod:`.demo` with its walk in :mod:`.walk`, :mod:`.denoise`,
:mod:`.store` for a chunked run, :mod:`.train`, :mod:`.course`); :mod:`._common` holds
the error a user's mistake raises and the output helpers. A user's mistake is one line
naming the flag or file and what is wrong (exit status 2), checked before the work
where it can be; a failure of the machine (a full disk, a diverged training) is one line
(exit status 1); anything else is a bug in nlref, said so with where to report it (exit
status 1; ``--traceback`` or ``NLREF_TRACEBACK=1`` shows the traceback). Ctrl-C and
SIGTERM stop with one line (exit status 130 / 143).
"""

from __future__ import annotations

import argparse
import os
import sys

from nlref.cli import course as _course
from nlref.cli import demo as _demo
from nlref.cli import denoise as _denoise
from nlref.cli import train as _train
from nlref.cli._common import CommandError, _Output, _Terminated, machine_failure_line, silence_stdout
from nlref.cli.denoise import run_denoise
from nlref.cli.store import run_denoise_chunked
from nlref.cli.train import run_train
from nlref.cli.walk import run_demo

__all__ = ["CommandError", "build_parser", "main", "run_demo", "run_denoise", "run_denoise_chunked", "run_train"]


_DESCRIPTION = """\
nlref: non-local means denoising and the non-local neural block, a readable reference.
  nlref demo      the teaching walk, with figures and tables
  nlref denoise   NL-means on an image file
  nlref train     train a small non-local network on the two-sprite clips or the two-shape images
  nlref course    write the student edition of the course's notebooks (solutions taken out)
Run 'nlref COMMAND --help' for the options of a command."""


def _global_flags(parser, default):
    parser.add_argument("--quiet", "-q", action="store_true", default=default,
                        help="no report lines on stdout; errors and warnings still go to stderr (default: off)")
    parser.add_argument("--traceback", action="store_true", default=default,
                        help="on a bug in nlref, show the Python traceback (also NLREF_TRACEBACK=1) (default: off)")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose two errors about a word starting with '-' say how to give such a file name."""

    def error(self, message):
        import re

        flag = re.match(r"argument (--out|--student|--notebooks): expected one argument$", message)
        stray = re.match(r"unrecognized arguments: (-\S*)", message)
        if flag or stray:  # a value or IMAGE starting with '-' reads as a flag to argparse
            name = "-name" if flag else stray.group(1)
            message += (f" (a file name that starts with '-' is written ./{name}" +
                        (f", or {flag.group(1)}=-name)" if flag else ")"))
        super().error(message)


def build_parser():
    from nlref import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="nlref", description=_DESCRIPTION, formatter_class=fmt, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"nlref {__version__}")
    _global_flags(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (_demo, _denoise, _train, _course):
        # after the command too (nlref denoise x.png --quiet); SUPPRESS keeps a flag given before it
        _global_flags(module.add_parser(sub, fmt), argparse.SUPPRESS)
    for action in sub.choices.values():
        action.allow_abbrev = False
    return parser


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


_RUN = {"demo": _demo.run, "denoise": run_denoise, "train": run_train, "course": _course.run}


def main(argv=None):
    """Run the ``nlref`` command; returns the exit status (0; 2 for a user's mistake; 1 for a failure of the
    machine during the work, or a bug in nlref; 130 / 143 when stopped by SIGINT / SIGTERM)."""
    import signal
    import threading

    import matplotlib

    matplotlib.use("Agg")
    args = build_parser().parse_args(argv)
    _Output.quiet = args.quiet
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        _RUN[args.command](args)
    except CommandError as err:
        print(f"nlref {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (OSError, FloatingPointError) as err:  # the machine (a full disk, a lost worker) or a diverged training
        after = _train._train_failed(args) if args.command == "train" and isinstance(err, OSError) else ""
        print(machine_failure_line(args.command, err, after), file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminated) as err:
        signum = err.args[0] if isinstance(err, _Terminated) else signal.SIGINT
        signame = signal.Signals(signum).name
        if args.command == "train":
            print(_train._train_interrupted(args, signame), file=sys.stderr)
        elif args.command in ("denoise", "course"):
            print(f"nlref {args.command}: stopped by {signame}; nothing was written", file=sys.stderr)
        else:
            print(f"nlref demo: stopped by {signame}; the figures written so far are in {args.out}", file=sys.stderr)
        return 128 + signum
    except Exception as err:  # noqa: BLE001 -- not the user's mistake: a bug, said so
        if args.traceback or os.environ.get("NLREF_TRACEBACK", "") not in ("", "0"):
            import traceback

            traceback.print_exc()
        print(f"nlref {args.command}: internal error ({type(err).__name__}: {err}): this is a bug in nlref, not a "
              f"mistake of yours; please report it to nlref's issue tracker with the command you ran and the traceback "
              f"(run it again with --traceback, or NLREF_TRACEBACK=1)", file=sys.stderr)
        return 1
    finally:
        if main_thread and previous is not None:  # None: a handler set outside Python, which cannot be restored
            signal.signal(signal.SIGTERM, previous)
        try:
            sys.stdout.flush()
        except BrokenPipeError:  # the reader is gone: the work is done and written, nothing more to say
            silence_stdout()
    return 0


if __name__ == "__main__":
    sys.exit(main())
