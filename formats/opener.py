"""Layer: formats.  How a chain's files are opened: confinement decided on what was opened.

An image names other files — its backing file, a qcow2's external data file, a VHD's parent
locators — and whoever wrote the image chose those names.  When root reads an image from a
folder that another user can write, that user must not be able to make cowd read a file they
could not read themselves (``/etc/shadow``), nor open a device or a FIFO.

Theory of operation
-------------------
- The *top* image is the one the user named: it is opened as named (symlinks followed), but
  through a directory fd of the folder it was named in.  That folder, as the kernel reports
  it for the fd (``/proc/self/fd``), is the *confinement root*; holding the fd pins it, so a
  rename of the folder or of a parent folder after this point changes nothing.
- Every name an image records is opened *beneath* that fd: ``openat2`` with
  ``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`` (the kernel refuses ``..``, absolute names and
  symlinks that leave the root, atomically with the open), or, where openat2 is missing or
  refused an absolute symlink, a walk of the components with ``O_PATH | O_NOFOLLOW`` and
  ``dir_fd`` that follows each symlink itself and refuses one that leaves the root.  A name
  is resolved once; nothing is checked by name and then opened again by name.
- The fd is checked before a byte is read: ``fstat`` (a regular file; a block device only
  when the policy allows devices; never a character device, FIFO or socket) and the path
  the kernel reports for it (it must lie beneath the root).  Files are opened with
  ``O_NONBLOCK | O_NOCTTY`` so that a FIFO or a tty cannot block or take over the process
  before the check refuses it; ``O_NONBLOCK`` is cleared afterwards.
- Without confinement (``--allow-backing-outside``) names are opened as qemu opens them,
  relative to the naming image's folder, and the type check still applies.
- A remote name (``nbd://``, ``nbd+unix://``, ``http(s)://``: formats/remote/url.py) is
  opened only when the policy carries a remote configuration whose host list allows it
  (``--allow-remote-backing``), through the local cache (formats/remote/); a remote layer's
  own names must be remote too (it has no folder here).  Every other protocol is refused.

Hard links are the one way into the root that no open can tell apart: Linux's
``fs.protected_hardlinks=1`` (Debian's default) stops a user linking a file they cannot read.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .base import HostFile
from .errors import BackingOutside, ImageIOError, UnsupportedImage

if TYPE_CHECKING:
    from .remote import RemoteConfig

# openat2(2): the syscall number on every Linux architecture that has one table (x86-64,
# arm64, riscv: 437), RESOLVE_* from linux/openat2.h.
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08

# qemu accepts "protocol:" prefixes in file names (json:, nbd:, http:, ...).  cowd opens only
# local files: a recorded name with such a prefix is refused, never interpreted (a Windows
# drive letter, "C:\\", is a name, not a protocol).
PROTOCOL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
_DRIVE_RE = re.compile(r"^[A-Za-z]:[\\/]")

# A walk follows at most this many symlinks, as the kernel's own path walk does (MAXSYMLINKS).
MAX_SYMLINKS = 40

# How often an open that lost a race (a component swapped between two steps of the walk, a
# rename while openat2 ran: EAGAIN) is tried again before the name is refused.
MAX_RACE_RETRIES = 8


@dataclass(frozen=True, slots=True)
class OpenPolicy:
    """What the names inside a chain may reach: the caller's choice, never the image's.

    ``confine``: every file an image names must lie beneath the folder the top image was
    named in (``--allow-backing-outside`` turns it off).  ``allow_devices``: a named file may
    be a block device (``--allow-backing-device``); character devices, FIFOs and sockets are
    refused always.
    """

    confine: bool = True
    allow_devices: bool = False
    # vouched(dev, ino, name): the user chose ``name`` as the backing file of the image
    # whose file is (dev, ino) (``cowd create --absolute``, cowd/trust.py); such a name is
    # opened where it points, and the layer it reaches confines its own names to its folder.
    vouched: Callable[[int, int, str], bool] | None = None
    # Remote bases (formats/remote/): None refuses every remote name; otherwise the user's
    # settings, with the hosts an image may name.
    remote: RemoteConfig | None = None


class _Outside(Exception):
    """The name leaves the confinement root (the walk's internal signal)."""


class _Libc:
    """openat2 through ctypes (Python 3.11 has no wrapper); None where libc has no syscall()."""

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                    ("resolve", ctypes.c_uint64)]

    def __init__(self) -> None:
        self.syscall = ctypes.CDLL(None, use_errno=True).syscall
        self.available = True  # until the kernel says ENOSYS

    def openat2(self, dir_fd: int, name: str, flags: int, resolve: int) -> int:
        how = self.OpenHow(flags, 0, resolve)
        fd = self.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd),
                          ctypes.c_char_p(os.fsencode(name)), ctypes.byref(how),
                          ctypes.c_size_t(ctypes.sizeof(how)))
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), name)
        return int(fd)


_libc: _Libc | None = None


def _get_libc() -> _Libc:
    global _libc
    if _libc is None:
        _libc = _Libc()
    return _libc


def _fd_path(fd: int) -> str | None:
    """The path the kernel reports for an open fd (None where /proc is not mounted)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return None


def _beneath(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class Place:
    """Where a layer was found: the name to show (the naming image's folder joined with the
    recorded name, as qemu shows it) and its folder relative to the confinement root (None
    when unconfined), from which the layer's own names are resolved."""

    display_path: str
    root_dir: str | None  # the layer's folder relative to the root ("" is the root itself)
    # A layer reached through a vouched name: its own names are confined to its folder by
    # an opener of their own (None: this opener's root).
    opener: ChainOpener | None = field(default=None, compare=False)
    # A remote layer: it has no folder here, so its own names must be remote too.
    remote: bool = False

    @property
    def display_dir(self) -> str:
        return os.path.dirname(self.display_path)


class ChainOpener:
    """Opens one chain's files: the top as the user named it, the rest as :data:`OpenPolicy`
    allows.  Holds the confinement root's directory fd until :meth:`close`."""

    def __init__(self, top_path: str, policy: OpenPolicy = OpenPolicy()):
        self.policy = policy
        self.top_path = top_path
        folder = os.path.dirname(os.path.abspath(top_path))
        try:
            self._dir_fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageIOError(top_path, f"cannot open its folder: {e.strerror}",
                               e.errno or errno_mod.EIO) from None
        # The root is the folder that was opened, as the kernel names it now, not the name
        # typed (which an owner of a parent folder could re-point at any moment).
        self.root = _fd_path(self._dir_fd) or os.path.realpath(folder)
        self._subs: list[ChainOpener] = []  # re-rooted at layers reached by vouched names

    def close(self) -> None:
        for sub in self._subs:
            sub.close()
        self._subs = []
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __enter__(self) -> ChainOpener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the top image -----------------------------------------------------------------

    def top_place(self) -> Place:
        return Place(os.path.abspath(self.top_path), "" if self.policy.confine else None)

    def open_top(self, writable: bool) -> HostFile:
        """The image the user named, found in the folder this opener holds."""
        name = os.path.basename(os.path.abspath(self.top_path))
        try:
            fd = os.open(name, _flags(writable), dir_fd=self._dir_fd)
        except OSError as e:
            raise ImageIOError(self.top_path, f"cannot open: {e.strerror}",
                               e.errno or errno_mod.EIO) from None
        try:
            # The user chose the top: a block device is theirs to name, a FIFO is not.
            _check_type(fd, self.top_path, None, None, allow_devices=True)
        except BaseException:
            os.close(fd)
            raise
        return HostFile(self.top_path, writable, fd=fd)

    # ---- names recorded in images ------------------------------------------------------

    def open_named(self, owner_path: str, owner: Place, name: str, writable: bool,
                   field: str, what: str,
                   owner_id: tuple[int, int] | None = None) -> tuple[HostFile, Place] | None:
        """Open ``name`` recorded in the image at ``owner_path`` (found at ``owner``) as
        ``what`` ("backing file", "data file"); None if it does not exist.  ``owner_id``:
        the naming image's (st_dev, st_ino), for the policy's ``vouched``."""
        if owner.opener is not None and owner.opener is not self:
            return owner.opener.open_named(owner_path, owner, name, writable, field, what,
                                           owner_id)
        if PROTOCOL_RE.match(name) and not _DRIVE_RE.match(name):
            return self._open_remote(owner_path, name, writable, field, what)
        if owner.remote:
            raise UnsupportedImage(owner_path, f"{what} of a remote base names a local file",
                                   field, name)
        display = os.path.normpath(name if os.path.isabs(name)
                                   else os.path.join(owner.display_dir, name))
        if owner.root_dir is None:
            fd = self._open_anywhere(display, writable, owner_path, field, name)
            if fd is None:
                return None
            place = Place(display, None)
        else:
            rel = self._relative_name(owner.root_dir, name)
            if rel is None:
                if self._vouched(owner_id, name):
                    return self._open_vouched(display, writable, owner_path, field, name, what)
                raise self._outside(owner_path, what, field, name)
            fd = self._open_confined(rel, writable, owner_path, what, field, name)
            if fd is None:
                return None
            place = Place(display, os.path.dirname(rel), self)
        try:
            _check_type(fd, owner_path, field, name, allow_devices=self.policy.allow_devices,
                        what=what)
            if owner.root_dir is not None:
                seen = _fd_path(fd)
                if seen is not None and not _beneath(seen, self.root):
                    raise self._outside(owner_path, what, field, name)
        except BaseException:
            os.close(fd)
            raise
        return HostFile(display, writable, fd=fd), place

    def open_remote_top(self, name: str) -> HostFile:
        """A remote image the user named (``cowd create --base URL``): no host list
        applies, the user chose it."""
        return self._open_remote(name, name, False, "file", "image", user_named=True)[0]

    def _open_remote(self, owner_path: str, name: str, writable: bool, field: str,
                     what: str, user_named: bool = False) -> tuple[HostFile, Place]:
        """A remote name, as the policy allows (see the module docstring)."""
        from . import remote

        if not remote.looks_remote(name):
            raise UnsupportedImage(owner_path, f"{what} names a protocol, not a file", field,
                                   name)
        try:
            parsed = remote.parse(name)
        except remote.BadRemoteName as e:
            raise UnsupportedImage(owner_path, f"{what} is a URL cowd will not use: {e}",
                                   field, name) from None
        config = self.policy.remote
        if config is None or not (user_named or remote.allowed(parsed, config.hosts)):
            hint = ("pass --allow-remote-backing to use it" if config is None or
                    not config.hosts else f"{parsed.where} is not in the allowed hosts")
            raise UnsupportedImage(owner_path, f"{what} is a remote base ({hint})", field,
                                   name)
        if writable:
            raise UnsupportedImage(owner_path, f"{what} is remote and cannot be written",
                                   field, name)
        try:
            file = remote.open_remote(parsed, config)
        except OSError as e:
            raise ImageIOError(owner_path, f"cannot read {what} {name!r}: {e.strerror or e}",
                               e.errno or errno_mod.EIO) from None
        return file, Place(name, None, remote=True)

    def _vouched(self, owner_id: tuple[int, int] | None, name: str) -> bool:
        check = self.policy.vouched
        return (check is not None and owner_id is not None and os.path.isabs(name)
                and check(owner_id[0], owner_id[1], name))

    def _open_vouched(self, display: str, writable: bool, owner_path: str, field: str,
                      name: str, what: str) -> tuple[HostFile, Place] | None:
        """A name the user chose, opened where it points (as if typed on the command line);
        the layer found there gets an opener rooted at its own folder."""
        fd = self._open_anywhere(display, writable, owner_path, field, name)
        if fd is None:
            return None
        try:
            _check_type(fd, owner_path, field, name, allow_devices=self.policy.allow_devices,
                        what=what)
            sub = ChainOpener(display, self.policy)
        except BaseException:
            os.close(fd)
            raise
        self._subs.append(sub)
        return HostFile(display, writable, fd=fd), Place(display, "", sub)

    def _outside(self, owner_path: str, what: str, field: str, name: str) -> BackingOutside:
        return BackingOutside(owner_path, f"{what} lies outside {self.root}", field, name)

    def _relative_name(self, owner_root_dir: str, name: str) -> str | None:
        """``name`` relative to the root, or None when it plainly leaves it.  An absolute
        name is taken as written when it lies beneath the root; otherwise the real path of
        its folder (a symlinked prefix such as /var/run) is a *hint* for which name to open
        beneath the root.  The open itself decides, so a swap after this look changes
        nothing, and a hint that cannot be had (the name is being swapped) is a refusal."""
        if os.path.isabs(name):
            norm = os.path.normpath(name)
            if not _beneath(norm, self.root):
                try:
                    norm = os.path.join(os.path.realpath(os.path.dirname(norm)),
                                        os.path.basename(norm))
                except OSError:
                    return None
                if not _beneath(norm, self.root):
                    return None
            rel = os.path.relpath(norm, self.root)
        else:
            rel = os.path.normpath(os.path.join(owner_root_dir, name))
        if rel == "." or rel == ".." or rel.startswith("../"):
            return None
        return rel

    def _open_anywhere(self, path: str, writable: bool, owner_path: str, field: str,
                       name: str) -> int | None:
        try:
            return os.open(path, _flags(writable))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ImageIOError(owner_path, f"cannot open {field} {name!r}: {e.strerror}",
                               e.errno or errno_mod.EIO) from None

    def _open_confined(self, rel: str, writable: bool, owner_path: str, what: str,
                       field: str, name: str) -> int | None:
        flags = _flags(writable)
        libc = _get_libc()
        for _ in range(MAX_RACE_RETRIES):
            try:
                if libc.available:
                    try:
                        return libc.openat2(self._dir_fd, rel, flags,
                                            RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
                    except OSError as e:
                        if e.errno == errno_mod.ENOSYS:
                            libc.available = False
                        elif e.errno == errno_mod.EAGAIN:
                            continue
                        elif e.errno != errno_mod.EXDEV:
                            raise
                        # EXDEV: an escape, or an absolute symlink that may stay inside: the
                        # walk tells them apart.  ENOSYS: no openat2 on this kernel.
                return self._walk(rel, flags)
            except _Outside:
                raise self._outside(owner_path, what, field, name) from None
            except FileNotFoundError:
                return None
            except _Raced:
                continue
            except OSError as e:
                raise ImageIOError(owner_path, f"cannot open {field} {name!r}: {e.strerror}",
                                   e.errno or errno_mod.EIO) from None
        raise ImageIOError(owner_path, f"{what} kept changing while it was opened",
                           errno_mod.EAGAIN)

    def _walk(self, rel: str, flags: int) -> int:
        """Resolve ``rel`` beneath the root one component at a time, following symlinks
        here (never in the kernel), and open the last one with O_NOFOLLOW."""
        parts = [p for p in rel.split("/") if p and p != "."]
        stack: list[int] = []  # fds of the folders walked into below the root
        links = 0
        try:
            while parts:
                comp = parts.pop(0)
                cur = stack[-1] if stack else self._dir_fd
                if comp == "..":
                    if not stack:
                        raise _Outside
                    os.close(stack.pop())
                    continue
                if not parts:
                    try:
                        return os.open(comp, flags | os.O_NOFOLLOW, dir_fd=cur)
                    except OSError as e:
                        if e.errno != errno_mod.ELOOP:  # ELOOP: it is a symlink
                            raise
                pfd = os.open(comp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
                mode = os.fstat(pfd).st_mode
                if stat.S_ISLNK(mode):
                    target = os.readlink("", dir_fd=pfd)
                    os.close(pfd)
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise OSError(errno_mod.ELOOP, os.strerror(errno_mod.ELOOP), rel)
                    if os.path.isabs(target):
                        if not _beneath(os.path.normpath(target), self.root):
                            raise _Outside
                        while stack:
                            os.close(stack.pop())
                        target = os.path.relpath(os.path.normpath(target), self.root)
                    parts = [p for p in target.split("/") if p and p != "."] + parts
                elif stat.S_ISDIR(mode):
                    stack.append(pfd)
                else:
                    os.close(pfd)
                    if not parts:  # the last component turned from a symlink into a file
                        raise _Raced
                    raise OSError(errno_mod.ENOTDIR, os.strerror(errno_mod.ENOTDIR), rel)
            raise OSError(errno_mod.EISDIR, os.strerror(errno_mod.EISDIR), rel)
        finally:
            for fd in stack:
                os.close(fd)


class _Raced(Exception):
    """A component changed kind between two steps of the walk: try the whole name again."""


def _flags(writable: bool) -> int:
    return ((os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY
            | os.O_NONBLOCK)


def _check_type(fd: int, owner_path: str, field: str | None, name: str | None, *,
                allow_devices: bool, what: str = "image") -> None:
    """Refuse what is not a regular file (or an allowed block device); then make the fd
    blocking again (it was opened non-blocking only so a FIFO could not hang the open)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        pass
    elif stat.S_ISBLK(mode):
        if not allow_devices:
            raise UnsupportedImage(owner_path, f"{what} is a block device (pass "
                                   "--allow-backing-device to use it)", field, name)
    else:
        kind = ("a directory" if stat.S_ISDIR(mode) else "a character device"
                if stat.S_ISCHR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise UnsupportedImage(owner_path, f"{what} is {kind}", field, name)
    os.set_blocking(fd, True)


__all__ = ["PROTOCOL_RE", "ChainOpener", "OpenPolicy", "Place"]
