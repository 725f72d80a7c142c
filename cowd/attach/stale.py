"""Layer: cowd attach.  Clean-up after a dead daemon: its loop devices, its dead FUSE mount,
its kernel-shim devices, its claimed /dev/nbdN and its control socket.

Invariants: the caller owns the pid file, so no live daemon serves the run dir.  What cowd
touches: a loop device only if its backing file is the FUSE file of the attachment (sysfs
``backing_file`` and the backing file's device and inode from LOOP_GET_STATUS64); a mount only
if it is the ``fuse.cowd`` mount at RUN/fuse; a process only through its own control
socket.  After a daemon died (SIGKILL, OOM) its FUSE mount is dead (the kernel answers
ENOTCONN): :func:`cleanup_stale`, run with the pid lock held, detaches the loop devices whose
backing file lies in that dead mount — before unmounting it, since a loop device's
``backing_file`` no longer names the directory once its mount is detached — then lazily
unmounts it and removes the stale socket.  A stale loop device still in use (a file system on it
still mounted) is detached anyway: the kernel then only marks it auto-clear, and it goes away
when that file system is unmounted; its I/O fails meanwhile, as it already did.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import control
from ..errors import CommandFailed, RequestError, UsageError
from ..frontends.fuse.mount import mount_is_dead, mounts_at, unmount_stale
from ..frontends.kmod.module import remove_device
from ..frontends.loop import is_busy, loops_backed_under, losetup_detach
from ..frontends.nbd.attach import clear_stale, device_index
from ..rundir import RunDir, lexists, read_state

# How long a dead daemon's FUSE mount may take to answer the probe before it counts as live.
DEAD_MOUNT_PROBE_S = 10.0

log = logging.getLogger("cowd.attach")


@dataclass
class Cleanup:
    """What :func:`cleanup_stale` did."""

    loops: list[tuple[str, str, bool]] = field(default_factory=list)  # (device, name, was busy)
    kmod: list[tuple[str, str, str]] = field(default_factory=list)  # (device, image, outcome)
    nbd: list[tuple[str, str, str]] = field(default_factory=list)  # (device, image, outcome)
    unmounted: int = 0
    socket_removed: bool = False
    state: list[dict[str, Any]] = field(default_factory=list)  # the dead daemon's records

    def __bool__(self) -> bool:
        return bool(self.loops or self.kmod or self.nbd or self.unmounted
                    or self.socket_removed)

    def lines(self, run: RunDir) -> list[str]:
        out = []
        for dev, name, busy in self.loops:
            image = next((e.get("image") for e in self.state if e.get("name") == name), None)
            what = f"{dev} ({image or name})"
            if busy:
                out.append(f"detached {what}; it is still in use (a mounted file system?) and "
                           "goes away when that is unmounted")
            else:
                out.append(f"detached {what}")
        for dev, image, outcome in self.kmod + self.nbd:
            out.append(f"{outcome} {dev} ({image})")
        if self.unmounted:
            out.append(f"unmounted the dead FUSE mount {run.fuse_dir}")
        if self.socket_removed:
            out.append(f"removed the stale control socket {run.control}")
        return out


def _remove_stale_kmod(done: Cleanup) -> None:
    for rec in done.state:
        index = rec.get("index")
        if rec.get("frontend") != "kmod" or not isinstance(index, int):
            continue
        dev = f"/dev/cowd{index}"
        if not os.path.exists(dev):
            continue
        try:
            remove_device(index)
            outcome = "removed"
        except (UsageError, CommandFailed, RequestError) as e:
            outcome = f"could not remove ({e}):"
        done.kmod.append((dev, str(rec.get("image")), outcome))


def _clear_stale_nbd(done: Cleanup) -> None:
    """NBD_CLEAR_SOCK on the dead daemon's /dev/nbdN that are still claimed by its dead
    thread (held open by something else); the others the kernel released already."""
    for rec in done.state:
        device, tid = rec.get("device"), rec.get("tid")
        if rec.get("frontend") != "nbd" or not isinstance(device, str):
            continue
        index = device_index(device)
        if index is None:
            continue
        outcome = clear_stale(index, tid if isinstance(tid, int) else None)
        if outcome is not None:
            log.info("stale: %s %s", outcome, device)
            done.nbd.append((device, str(rec.get("image")), outcome))


async def cleanup_stale(run: RunDir, keep_kmod: bool = False) -> Cleanup:
    """Undo what a dead daemon left in ``run``.  The caller owns the pid file (so no live
    daemon serves ``run``); anything that does not look like a dead cowd's is refused.
    Kernel-shim devices are removed unless in use, or, with ``keep_kmod`` (a new daemon
    starting, which takes them over), left alone."""
    done = Cleanup(state=read_state(run))
    if not keep_kmod:
        _remove_stale_kmod(done)
    _clear_stale_nbd(done)
    fuse_dir = run.fuse_dir
    await trio.lowlevel.checkpoint()
    mounts = mounts_at(fuse_dir)
    if mounts:
        fstype, source = mounts[-1]
        if fstype != "fuse.cowd":
            raise CommandFailed(f"{fuse_dir}: something else is mounted here (type={fstype}); "
                             "not touching it")
        if not await mount_is_dead(fuse_dir, DEAD_MOUNT_PROBE_S):
            raise CommandFailed(f"{fuse_dir}: a live cowd FUSE mount that no daemon of this run "
                             f"dir owns (source={source}); not touching it")
        # Loop devices first: once the mount is detached, their backing_file no longer
        # names this directory and they could not be told from anyone else's.
        for info in await trio.to_thread.run_sync(loops_backed_under, fuse_dir):
            busy = await trio.to_thread.run_sync(is_busy, info.device)
            await losetup_detach(info.device)
            name = info.backing_file[len(fuse_dir) + 1:]
            log.info("stale: detached %s (%s)%s", info.device, name,
                     ", still in use: auto-clear" if busy else "")
            done.loops.append((info.device, name, busy))
        while await unmount_stale(fuse_dir):
            done.unmounted += 1
            log.info("stale: unmounted the dead FUSE mount %s", fuse_dir)
        with contextlib.suppress(OSError):
            if not mounts_at(fuse_dir):
                os.rmdir(fuse_dir)
    if lexists(run.control):
        control.clear_stale_socket(run.control)  # refuses a live one
        done.socket_removed = True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(run.state)
    return done


def matches(done: Cleanup, req: dict[str, Any]) -> bool:
    """Whether a cleanup detached what a detach request names."""
    for dev, name, _busy in done.loops:
        rec = next((e for e in done.state if e.get("name") == name), {})
        if "rdev" in req:
            with contextlib.suppress(OSError):
                if os.stat(dev).st_rdev == req["rdev"]:
                    return True
            if rec.get("device") == req["target"]:
                return True
        image = rec.get("image")
        if "image" in req and isinstance(image, str) and \
                os.path.realpath(image) == req["image"]:
            return True
        if req["target"] in (name, dev):
            return True
    for dev, image, _outcome in done.kmod + done.nbd:
        if req["target"] == dev or req.get("image") == os.path.realpath(image):
            return True
    return False


__all__ = [
    "Cleanup",
    "cleanup_stale",
    "matches",
]
