"""Layer: cowd (shared by every layer of the daemon).  The exception tree, grouped by what the
caller must do (STYLE.md):

- :class:`ProtocolError`: a peer broke the protocol; drop the connection.
- :class:`RequestError`: one request failed; answer it with ``errno`` and go on.
- :class:`CorruptionError`: an image is inconsistent; mark it corrupt and go read-only.
- :class:`UsageError`: the command line asks for something impossible (a bad value, an
  unknown name, an output that exists); print one line, exit 2.
- :class:`CommandFailed`: the command is well formed but cannot be done now (an image or
  device missing or in use, no daemon, a kernel feature absent); print one line, exit 1.

``formats.errors.FormatError`` is the format library's own tree; the CLI prints it as one line
too.  Anything else is a bug and may show a traceback.
"""

from __future__ import annotations


class CowdError(Exception):
    """Base of cowd's deliberate errors."""

    # The CLI's exit status for this error (README: 1 an image or I/O problem, 2 bad usage).
    exit_status = 1


class ProtocolError(CowdError):
    """The peer broke the protocol: drop the connection."""


class RequestError(CowdError):
    """One request failed: reply with ``errno`` and carry on."""

    def __init__(self, errno: int, message: str):
        super().__init__(message)
        self.errno = errno


class DiskError(RequestError):
    """A request to a disk failed; ``errno`` is what the frontend answers with.  Defined here,
    not in cowd/disk/api.py (which exports it), so that what raises it without touching a
    disk (the kernel shim's control calls) does not import the disk stack: the CLI's attach
    imports those, and under TCG every module is seconds."""


class CorruptionError(CowdError):
    """An image is inconsistent: stop writing it."""


class UsageError(CowdError):
    """Bad command-line use: one line on stderr, exit status 2."""

    exit_status = 2


class CommandFailed(CowdError):
    """A well-formed command that the system or an image's state refuses (in use, no
    daemon, missing file, kernel support absent): one line on stderr, exit status 1."""
