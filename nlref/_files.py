"""Files written whole or not at all: every output nlref writes goes through here.

A file is written under a temporary name in its own folder, flushed to disk, given the
permissions a plain ``open`` would give it, then renamed over its final name in one step
(``os.replace``). An error or an interruption at any point leaves the final name as it was
(the previous file, or none) and removes the temporary file: nothing half-written is left
where a reader would look.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["replaced_atomically", "write_atomically", "folder_problem"]


@contextlib.contextmanager
def replaced_atomically(path):
    """Yield a temporary path next to ``path``; when the block ends without error, rename it over ``path``.

    The temporary name is hidden (it starts with a dot) and ends with ``path``'s suffix, so a
    writer that picks its format from the name (an image library, ``savefig``) sees the
    right one. The caller writes the whole file there inside the block; the file is then
    synced to disk before the rename. On any exception, ``KeyboardInterrupt`` included, the
    temporary file is removed and the exception goes on.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomically(path, write):
    """``write(f)`` into a binary file object that becomes ``path`` whole, or not at all (see :func:`replaced_atomically`)."""
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        write(f)


def folder_problem(folder):
    """Make ``folder`` (and its parents) and write a file there atomically; what went wrong, or None.

    A path under a file is named as such (the OSError said only "Not a directory" or "File
    exists"); any other failure is its OSError's reason. The callers wrap it in their own error
    (``nlref train``'s ``OutDirError``, a command's one-line error naming its flag).
    """
    folder = Path(folder)
    above = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if above is not None and not above.is_dir():
        return f"{str(above)!r} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / ".write-test", lambda f: f.write(b"ok"))
        (folder / ".write-test").unlink()
    except OSError as err:
        return f"the folder {str(folder)!r} cannot be made or written ({err.strerror or err})"
    return None
