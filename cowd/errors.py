"""Layer: cowd (shared by every layer of the daemon).  The exception tree, grouped by what the
caller must do (STYLE.md):

- :class:`ProtocolError`: a peer broke the protocol; drop the connection.
- :class:`RequestError`: one request failed; answer it with ``errno`` and go on.
- :class:`CorruptionError`: an image is inconsistent; mark it corrupt and go read-only.
- :class:`UsageError`: the user asked for something impossible; print one line, exit non-zero.

``formats.errors.FormatError`` is the format library's own tree; the CLI prints it as one line
too.  Anything else is a bug and may show a traceback.
"""

from __future__ import annotations


class CowdError(Exception):
    """Base of cowd's deliberate errors."""


class ProtocolError(CowdError):
    """The peer broke the protocol: drop the connection."""


class RequestError(CowdError):
    """One request failed: reply with ``errno`` and carry on."""

    def __init__(self, errno: int, message: str):
        super().__init__(message)
        self.errno = errno


class CorruptionError(CowdError):
    """An image is inconsistent: stop writing it."""


class UsageError(CowdError):
    """Bad command-line use or environment: one line on stderr, exit status 2."""
