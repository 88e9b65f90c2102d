"""Files written whole or not at all: every output nlref writes goes through here.

A file is written under a temporary name in its own folder, flushed to disk, given the
permissions a plain ``open`` would give it, then renamed over its final name in one step
(``os.replace``). An error or an interruption at any point leaves the final name as it was
(the previous file, or none) and removes the temporary file: nothing half-written is left
where a reader would look. A failure of the machine (a full disk) stays an ``OSError``, told
from a user's mistake (a folder that cannot be written) by :func:`machine_failure`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

__all__ = ["replaced_atomically", "write_atomically", "sync_folder", "folder_problem", "WriteError", "machine_failure",
           "absolute", "writing_target", "numba_kernel"]

#: The errors that are the machine's, not the user's: no space, no quota left, an input/output error.
MACHINE_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EIO") if hasattr(errno, name))


def machine_failure(err):
    """Whether the OSError ``err`` is a failure of the machine (a full disk, a quota, an I/O error)."""
    return isinstance(err, OSError) and err.errno in MACHINE_ERRNOS


class WriteError(OSError):
    """Writing ``filename`` failed (``errno`` and ``strerror`` are the system's); the file was left as it was.

    Its message names the file (or folder) the caller asked for, not the hidden temporary name the
    system saw.
    """

    def __str__(self):
        return f"cannot write {self.filename!r}: {self.strerror}"


def absolute(path):
    """``path`` made absolute against the current folder, its ``..`` kept for the system to resolve.

    ``os.path.abspath`` drops ``link/..`` as text, which is not where the system goes when ``link``
    is a symbolic link to a folder elsewhere: ``link/../out.zarr`` is beside the link's target.
    """
    return os.path.join(os.getcwd(), os.fspath(path))


def writing_target(path):
    """Where writing ``path`` lands: the file a symbolic link points to (as ``open`` writes through it), else ``path``.

    Renaming a new file over the link itself would replace the link by a file and leave its target
    with the old contents.
    """
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def replaced_atomically(path):
    """Yield a temporary path next to ``path``; when the block ends without error, rename it over ``path``.

    The temporary name is hidden (it starts with a dot) and ends with ``path``'s suffix, so a
    writer that picks its format from the name (an image library, ``savefig``) sees the
    right one. The caller writes the whole file there inside the block; the file is then
    synced to disk before the rename. On any exception, ``KeyboardInterrupt`` included, the
    temporary file is removed and the exception goes on; an ``OSError`` (a full disk) goes on
    as a :class:`WriteError` naming ``path``. A symbolic link ``path`` is written through
    (:func:`writing_target`).
    """
    asked = Path(path)
    path = writing_target(asked)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    except OSError as err:
        raise WriteError(err.errno, err.strerror or str(err), str(asked)) from err
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give it the usual mode
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(err.errno, err.strerror or str(err), str(asked)) from err
        raise
    sync_folder(path.parent)


def sync_folder(folder):
    """Flush ``folder``'s entries to disk (``fsync`` of the folder), after a rename into it.

    Syncing the file makes its bytes durable, not its new name: after a power cut right after
    ``os.replace``, a file system may come back with the old name or none (POSIX leaves it to the
    folder's own ``fsync``). The rename has happened either way, so a folder that cannot be
    opened or synced (Windows, some network file systems) is left as it is, without an error.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path, write):
    """``write(f)`` into a binary file object that becomes ``path`` whole, or not at all (see :func:`replaced_atomically`)."""
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        write(f)


def folder_problem(folder):
    """Make ``folder`` (and its parents) and write a file there atomically; what went wrong, or None.

    A path under a file is named as such (the OSError said only "Not a directory" or "File
    exists"); any other failure is its OSError's reason. The callers wrap it in their own error
    (``nlref train``'s ``OutDirError``, a command's one-line error naming its flag). A failure of
    the machine (:func:`machine_failure`: a full disk) is not the user's mistake: its OSError is
    raised. Either way the folders made here are removed again.
    """
    folder = Path(folder)
    above = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if above is not None and not above.is_dir():
        return f"{str(above)!r} is a file, not a folder"
    made = [p for p in (folder, *folder.parents) if not p.exists() and not p.is_symlink()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a name of its own: a fixed ".write-test" replaced and deleted a user's file of that name
        fd, probe = tempfile.mkstemp(prefix=".nlref-write-test-", dir=folder)
        os.close(fd)
        try:
            write_atomically(probe, lambda f: f.write(b"ok"))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    except OSError as err:
        for p in made:  # deepest first: a failed check leaves no empty folders behind
            with contextlib.suppress(OSError):
                p.rmdir()
        if machine_failure(err):
            raise WriteError(err.errno, err.strerror or str(err), str(folder)) from err
        return f"the folder {str(folder)!r} cannot be made or written ({err.strerror or err})"
    return None


_cache_warned = []


def _cache_warning(reason):
    """Warn once per process that Numba's on-disk cache of nlref's kernels is not written."""
    if _cache_warned:
        return
    _cache_warned.append(reason)
    import warnings

    warnings.warn(f"Numba cannot keep nlref's compiled kernels on disk ({reason}): they work, but are compiled "
                  "again in every new process (seconds); point the environment variable NUMBA_CACHE_DIR at a "
                  "writable folder with free space", UserWarning, stacklevel=3)


def numba_kernel(numba, fn, options):
    """``numba.njit(**options)(fn)``, whose on-disk cache (``cache=True``) cannot fail the computation.

    The cache is a speed-up only. Numba refused to compile a function whose folder and the user's
    cache folder are both read-only (an installed package, a container's HOME): "RuntimeError:
    cannot cache function '_box': no locator available", an internal error of ``nlref denoise``;
    and a full disk where the cache is written failed the first call with "No space left on
    device", whatever the output's disk. Both now compile without writing the cache, with one
    warning per process (numba 0.68: ``CacheImpl.__init__`` raises the first, ``Cache.save_overload``
    lets the second through, in ``numba/core/caching.py``).
    """
    try:
        dispatcher = numba.njit(**options)(fn)
    except RuntimeError as err:
        if not options.get("cache") or "no locator available" not in str(err):
            raise
        _cache_warning("no folder to write it in: nlref's own folder and the user's cache folder are read-only")
        return numba.njit(**{**options, "cache": False})(fn)
    cache = getattr(dispatcher, "_cache", None)
    save = getattr(cache, "save_overload", None)
    if save is not None:
        def save_overload(sig, data):
            try:
                save(sig, data)
            except OSError as err:  # a full disk, a folder made read-only since: the kernel is compiled all the same
                _cache_warning(f"{err.strerror or err} in {getattr(cache, 'cache_path', 'its cache folder')}")

        cache.save_overload = save_overload
    return dispatcher
