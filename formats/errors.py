"""The format library's exception tree.

Every problem with an image's bytes raises a subclass of :class:`FormatError` whose message
reads ``<file>: <what is wrong> (<field>=<value>)``.  Callers group them by what they must do:

- :class:`CorruptImage`: the on-disk structures are inconsistent; the image must not be used
  for writing (the daemon marks it corrupt and goes read-only or refuses to serve it).
- :class:`UnsupportedImage`: well-formed, but uses a feature this library does not implement.
- :class:`ImageReadOnly`: a write was attempted on an image opened read-only.
- :class:`ImageIOError`: the host file failed (EIO, ENOSPC); carries ``errno``.
  :class:`SyncFailed`, its subclass, is a failed fdatasync (see there).
"""

from __future__ import annotations


class FormatError(Exception):
    """Base of every error the format library raises on purpose."""

    def __init__(self, path: str, what: str, field: str | None = None, value: object = None):
        self.path = path
        self.what = what
        self.field = field
        self.value = value
        msg = f"{path}: {what}"
        if field is not None:
            if isinstance(value, int) and not isinstance(value, bool):
                shown = hex(value) if value > 4096 else str(value)
            else:
                shown = repr(value) if isinstance(value, bytes | str) else str(value)
            msg += f" ({field}={shown})"
        super().__init__(msg)


class CorruptImage(FormatError):
    """The image's metadata is malformed or inconsistent."""


class UnsupportedImage(FormatError):
    """The image is valid but uses something this library does not support."""


class ImageReadOnly(FormatError):
    """A modification was attempted on an image opened read-only (or marked corrupt)."""


class ImageIOError(FormatError):
    """A host-file operation failed; ``errno`` says how (EIO, ENOSPC, ...)."""

    def __init__(self, path: str, what: str, errno: int):
        super().__init__(path, what, "errno", errno)
        self.errno = errno


class SyncFailed(ImageIOError):
    """fdatasync of a host file failed.  The kernel may have dropped the dirty pages it
    could not write, so a later sync can succeed without them: callers must not report
    durability again for writes made before this (qemu's file-posix does the same)."""


class BackingOutside(UnsupportedImage):
    """A backing file resolves (after ``..`` and symlinks) outside the directory tree the
    caller confined the chain to: refused unless the caller allows it."""
