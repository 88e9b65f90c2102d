"""What the commands share: the error a user's mistake raises, and small helpers of output."""

from __future__ import annotations

import sys
import time
from pathlib import Path


class CommandError(Exception):
    """A problem with the files or options of a command: reported as one line, without a traceback."""


class _Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives (as KeyboardInterrupt is for SIGINT)."""


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def _count(n, word):
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


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


def stack_note(params):
    """What the search does along the first axis of a volume or video (three or more spatial axes), for the
    parameter line: "" for an image.

    The sizes alone, ``patch (3, 5, 5), search (5, 21, 21)``, left a video's user to work out that the
    first number is frames, and a clip of two frames, whose window is clipped to one frame, said nothing
    of being denoised frame by frame.
    """
    patch, search = params["patch_size"], params["search_size"]
    if len(search) < 3:
        return ""
    if all(width == 1 for width in search[:-2]):
        return "; each frame or slice searched alone (a window 1 wide along the first axis)"
    if len(search) > 3:
        return (f"; the {len(search) - 2} leading axes: windows {search[:-2]}, patches {patch[:-2]}, reflected at "
                "their ends")
    return (f"; the first axis (frames or slices): a window of {search[0]} around each, "
            f"{'2-D patches' if patch[0] == 1 else f'patches {patch[0]} deep'}, reflected at its ends")


def _stamp(path):
    """(size, modification time in ns, inode) of a file, or None: tells whether it was rewritten."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class _Output:
    """Whether the report lines are shown: off with ``--quiet``, and after a reader closed the pipe."""

    quiet = False


def say(*parts, **kwargs):
    """Print one report line on stdout, unless ``--quiet``; a closed pipe (``| head -1``) stops the lines, never
    the work: stdout is pointed at the null device (as Python's docs advise for SIGPIPE) and the run goes on."""
    if _Output.quiet:
        return
    try:
        print(*parts, **kwargs, flush=True)
    except BrokenPipeError:
        _Output.quiet = True
        silence_stdout()


def silence_stdout():
    """Point the stdout file descriptor at the null device, so that no later flush fails on a closed pipe."""
    import os

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def flag_names(message, flags):
    """A library message about Python parameters, reworded with the flags the user typed (``patch_size`` ->
    ``--patch-size``)."""
    import re

    for name, flag in sorted(flags.items(), key=lambda kv: -len(kv[0])):
        message = re.sub(rf"(?<![\w-]){re.escape(name)}=", f"{flag} ", message)   # patch_size=4 -> --patch-size 4
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag, message)
        message = message.replace(f"{flag} ({flag})", flag)                     # size (--size) -> --size
    return message


def _argument(text, convert, kind, allowed, rule):
    """argparse type helper: ``convert(text)`` if it parses and passes ``allowed``; else the argparse error."""
    import argparse

    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
    if not allowed(value):
        raise argparse.ArgumentTypeError(f"{text} {rule}")
    return value


def path_arg(text):
    """argparse type of a file or folder flag: a leading ``~`` is the home folder, as the shell would make it.

    The shell expands ``~`` only at the start of a word: zsh leaves ``--out=~/runs`` as it is, as
    every shell leaves a quoted ``"~/runs"``, and nlref made a folder named ``~`` in the current
    one. A file or folder really named ``~`` is still ``./~``.
    """
    import os

    return os.path.expanduser(text)


def seed_arg(text):
    """argparse type of ``--seed``: an int >= 0 (NumPy's generators take no negative seed)."""
    return _argument(text, int, "an int", lambda v: v >= 0, "is negative; a seed is an int >= 0")


def grey_levels_arg(text):
    """argparse type of a noise level in grey levels: a finite number in [0, 255] (NaN fails the comparison)."""
    return _argument(text, float, "a number", lambda v: 0 <= v <= 255,
                     "is not a noise level in grey levels: allowed 0 to 255")


def machine_failure_line(command, err, after=""):
    """The one line of a failure of the machine during the work: the OSError, and for a full disk what to do.

    ``after``: what the command left (``nlref train``: the checkpoint to continue from).
    """
    import errno

    line = f"nlref {command}: error: {err}"
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        line += "; the disk is full: free some space there, or write elsewhere, then run the command again"
    return line + (f"; {after}" if after else "")


def refuse_existing(out, overwrite):
    """One rule for every command's ``--out``: an existing one is replaced only with ``--overwrite``."""
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CommandError(f"--out {str(out)!r} already exists; add --overwrite to replace it, or choose another name")


def writable_folder(folder, flag, given):
    """Make ``folder`` (and its parents) and write a test file there, before the work.

    A path under a file or in a place that cannot be written is the user's mistake: one line naming ``flag`` and
    the path ``given`` (not an OSError about a temporary name, after the work, as a failure of the machine).
    """
    from nlref._files import folder_problem

    problem = folder_problem(folder)
    if problem:
        raise CommandError(f"{flag} {str(given)!r}: {problem}")
