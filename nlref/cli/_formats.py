"""Files ``nlref denoise`` refuses before its reader sees them, by their header: a 16-bit colour PNG (read as 8
bits), and a video file without a video plugin of imageio (recognised by its header or extension, so that the
missing plugin is said as such: the reader only said it knows no such format)."""

from __future__ import annotations

from nlref.cli._common import CommandError

#: Video containers, by extension; imageio reads them only through a plugin that is not one of its dependencies.
_VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ogv", ".3gp")
#: ISO media brands (bytes 8-12 of an MP4, MOV or 3GP file) of video files; HEIC and AVIF images are ISO media too.
_VIDEO_BRANDS = (b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"M4V ", b"qt  ", b"avc1", b"dash",
                 b"3gp4", b"3gp5", b"3gp6")


def _video_container(path):
    """The kind of video file ``path`` is ("MP4", "AVI", ...), by its first bytes or its extension; None if not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        head = b""
    if head[4:8] == b"ftyp" and head[8:12] in _VIDEO_BRANDS:
        return "QuickTime" if head[8:12] == b"qt  " else "MP4"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    suffix = path.suffix.lower()
    return suffix[1:].upper() if suffix in _VIDEO_SUFFIXES else None


def _video_plugin():
    """Whether a video plugin of imageio is installed (PyAV or imageio-ffmpeg)."""
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("av", "imageio_ffmpeg"))


def _refuse_unreadable_video(path):
    """A video file without a video plugin of imageio: one line saying what to install (or convert to).

    The reader tried every plugin it has and the message was "not an image in a format the reader
    knows ..., or it is damaged": about an intact MP4, and with nothing said of the missing plugin.
    """
    kind = _video_container(path)
    if kind is not None and not _video_plugin():
        raise CommandError(f"IMAGE {str(path)!r} is a video file ({kind}), which the reader (imageio) reads only "
                           "with a video plugin, and none is installed: pip install av (or imageio-ffmpeg); or save "
                           "its frames as an animated GIF, a multi-page TIFF or a .npy of (frames, H, W, 3) and "
                           "denoise that")


_PNG_COLOURS = {4: "grey + alpha", 2: "RGB", 6: "RGBA"}  # PNG colour types (0: grey, 3: palette, 8-bit)


def _refuse_wide_colour_png(path):
    """Refuse a 16-bit PNG with colour or alpha: the reader (Pillow) gives it as 8 bits, the low byte lost.

    The header says it (bit depth and colour type of the IHDR chunk, bytes 24 and 25); a 16-bit grey PNG
    is read whole. Whatever the file's name: the header is read, not the extension.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return  # the reader says what is wrong
    if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[24] == 16 \
            and head[25] in _PNG_COLOURS:
        raise CommandError(f"IMAGE {str(path)!r} is a 16-bit {_PNG_COLOURS[head[25]]} PNG, which the image reader "
                           "(Pillow) reads only as 8 bits, the low byte of every value lost: convert it to a 16-bit "
                           "TIFF first (e.g. magick in.png out.tif) and denoise that")
