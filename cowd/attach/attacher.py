"""Layer: cowd attach, the daemon's end of the control socket (the CLI's end is client.py).
:class:`Attacher` holds the attach/detach/list handlers: it opens the Disk, serves it through
the chosen frontend (the FUSE file plus a loop device, the kernel shim, or the kernel's nbd
client) and records every attachment in the run dir's state file.

Invariants: see :class:`Attacher`'s contract (one operation at a time under ``op_lock``,
shielded and bounded by deadlines; teardown detaches what this daemon made and nothing else).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import trio

from ..control import DaemonUnavailable
from ..disk import Disk
from ..errors import CommandFailed, RequestError, UsageError
from ..frontends.fuse.mount import mounts_at
from ..frontends.fuse.protocol import FuseOptions
from ..frontends.fuse.server import FuseFrontend, mount_fuse
from ..frontends.kmod import abi
from ..frontends.kmod.channel import (
    DEFAULT_DAEMON_TIMEOUT_MS,
    DEFAULT_MAX_ENTRIES,
    KmodDevice,
)
from ..frontends.kmod.module import module_problem
from ..frontends.loop import LoopInfo, is_busy, loop_info, losetup_attach, losetup_detach
from ..frontends.nbd.attach import NbdDevice, Serve, nbd_problem
from ..frontends.nbd.server import NbdServer
from ..rundir import RunDir, lexists, write_state
from ..workers import wire as W
from ..workers.host import WorkerPool

log = logging.getLogger("cowd.attach")


log = logging.getLogger("cowd.attach")


# A daemon started by attach that gets no disk this soon exits again.
STARTUP_IDLE_S = 30.0
# After its last disk is detached the daemon exits this soon (time to send the reply).
EXIT_AFTER_REPLY_S = 0.1
# After `losetup -d` the kernel closes the FUSE file asynchronously; wait this long for it.
RELEASE_TIMEOUT_S = 10.0
# A --via nbd device waits this long for a worker of a daemon still starting them (a second
# or two on a normal machine), then is served by the daemon itself.
WORKER_READY_WAIT_S = 20.0


@dataclass(eq=False)
class Attachment:
    name: str  # the file's name in the FUSE mount
    image: str  # absolute path as the user gave it
    realpath: str
    disk: Disk
    frontend: str
    file: str  # RUN/fuse/NAME
    device: str  # /dev/loopN
    rdev: int  # the device's st_rdev
    backing: tuple[int, int]  # (st_dev, st_ino) of the file the loop device reads
    readonly: bool
    attached_at: float = field(default_factory=time.time)
    kmod: KmodDevice | None = None  # frontend "kmod": /dev/cowdN and its channel
    nbd: NbdDevice | None = None  # frontend "nbd": /dev/nbdN and its DO_IT thread

    def record(self) -> dict[str, Any]:
        # size: the guest's bytes, which the device shows (also in the state file, where a
        # dead daemon's leftovers are listed from).
        rec = {"name": self.name, "image": self.image, "device": self.device,
               "frontend": self.frontend, "readonly": self.readonly, "size": self.disk.size,
               "file": self.file, "attached_at": round(self.attached_at, 3)}
        if self.kmod is not None:
            rec["index"] = self.kmod.index
        if self.nbd is not None and self.nbd.tid:
            rec["tid"] = self.nbd.tid[0]  # what sysfs shows as the device's pid
        return rec

OpenDisk = Callable[[str, bool, bool], Awaitable[Disk]]  # (image, readonly, boot_trace)


class Attacher:
    """The daemon's attach/detach/list handlers and the FUSE mount they share.

    Contract: one attach or detach runs at a time (``op_lock``), shielded from cancellation and
    bounded by deadlines, so a shutdown never interrupts one half-way; shutdown takes
    ``op_lock`` too (:meth:`quiesce`).  Teardown, registered on the daemon's exit stack, runs in
    this order: ``losetup -d`` every device (:meth:`_detach_all`), unmount the FUSE
    directory and drain it (the frontend's own close), close the Disks (:meth:`_close_all`).
    """

    def __init__(self, run: RunDir, stack: AsyncExitStack, nursery: trio.Nursery,
                 open_disk: OpenDisk, name_taken: Callable[[str], bool],
                 after_change: Callable[[], bool],
                 fuse_options: FuseOptions | None = None):
        self.run = run
        self.stack = stack
        self.nursery = nursery
        self.open_disk = open_disk
        self.name_taken = name_taken
        self.after_change = after_change  # returns True when the daemon will now exit
        self.fuse_options = fuse_options
        self.attachments: dict[str, Attachment] = {}
        self.fuse: FuseFrontend | None = None
        self.nbd_disks: dict[str, Disk] = {}  # export name -> Disk, for --via nbd
        self.nbd_server: NbdServer | None = None
        # The daemon's worker processes, when it has them: they serve --via nbd's
        # socketpairs (the daemon sets it once its pool runs).
        self.workers: WorkerPool | None = None
        self.mount_dev = 0
        self.accepting = True
        self.op_lock = trio.Lock()
        stack.push_async_callback(self._close_all)
        stack.push_async_callback(self._detach_all_kmod)  # before the disks close
        stack.push_async_callback(self._detach_all_nbd)

    # -- helpers -------------------------------------------------------------------------------

    def _name_for(self, image: str) -> str:
        name = os.path.basename(image)
        stem, ext = os.path.splitext(name)
        n = 2
        while name in self.attachments or self.name_taken(name):
            name = f"{stem}-{n}{ext}"
            n += 1
        return name

    async def _frontend(self) -> FuseFrontend:
        if self.fuse is not None:
            return self.fuse
        os.makedirs(self.run.fuse_dir, mode=0o755, exist_ok=True)
        self.stack.callback(self._remove_fuse_dir)  # after the unmount
        fe = await mount_fuse(self.stack, self.nursery, self.run.fuse_dir, {},
                              self.fuse_options)
        # Registered after the frontend's close, so it runs first: loop devices let go of
        # the files before the mount is taken down.
        self.stack.push_async_callback(self._detach_all)
        self.fuse = fe
        if self.workers is not None:
            # Each worker serves a clone of its descriptor (its buffers made before this
            # returns); first, since over io_uring the kernel holds every request (this
            # stat's too) until the workers registered their ring queues
            # (cowd/frontends/fuse/ring.py).  The daemon `cowd attach` starts has started
            # no worker yet: they start here, and answer before they are given the clone.
            await self.workers.start()
            await self.workers.serve_fuse(fe)
        st = await trio.to_thread.run_sync(os.stat, fe.mountpoint)
        self.mount_dev = st.st_dev
        return fe

    def _remove_fuse_dir(self) -> None:
        with contextlib.suppress(OSError):
            if not mounts_at(self.run.fuse_dir):
                os.rmdir(self.run.fuse_dir)

    def _save(self) -> None:
        try:
            write_state(self.run, [a.record() for a in self.attachments.values()])
        except OSError as e:
            log.warning("%s: cannot record the attached disks: %s", self.run.state, e)

    async def _ours(self, att: Attachment) -> LoopInfo | None:
        """The loop device's state if it is still the one we made, else None."""
        info = await trio.to_thread.run_sync(loop_info, att.device)
        if info is None or info.backing_file != att.file:
            return None
        if info.backing_dev and (info.backing_dev, info.backing_ino) != att.backing:
            return None
        return info

    async def _released(self, name: str, timeout_s: float) -> bool:
        """Wait until no handle on ``name`` is open (the loop device closes the FUSE file
        asynchronously after ``losetup -d``)."""
        fe = self.fuse
        assert fe is not None
        with trio.move_on_after(timeout_s):
            # Nothing signals a RELEASE to us but the count itself.
            while fe.stats()["files"].get(name, {}).get("open_handles", 0):  # noqa: ASYNC110
                await trio.sleep(0.01)
            return True
        return False

    # -- control handlers ----------------------------------------------------------------------

    async def attach(self, req: dict[str, Any]) -> dict[str, Any]:
        image = req.get("image")
        via = req.get("via", "fuse")
        readonly = bool(req.get("readonly", False))
        entries = req.get("kmod_entries", DEFAULT_MAX_ENTRIES)
        timeout_ms = req.get("kmod_timeout_ms", DEFAULT_DAEMON_TIMEOUT_MS)
        pool = req.get("kmod_pool", -1)  # -1: the default size
        boot_trace = req.get("boot_trace", True)
        if not isinstance(boot_trace, bool):
            raise UsageError(f"attach: boot_trace must be true or false "
                             f"(boot_trace={boot_trace!r})")
        for name, v, low, top in (
                ("kmod_entries", entries, abi.MIN_ENTRIES, abi.MAX_ENTRIES),
                ("kmod_timeout_ms", timeout_ms, 1, abi.MAX_TIMEOUT_MS),
                ("kmod_pool", pool, -1, abi.MAX_POOL_CLUSTERS // 2)):
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= top:
                raise UsageError(f"attach: {name} must be {low}..{top} ({name}={v!r})")
        if not isinstance(image, str) or not os.path.isabs(image):
            raise UsageError(f"attach: the image must be an absolute path (image={image!r})")
        if via not in ("fuse", "kmod", "nbd"):
            raise UsageError(f"attach: this daemon attaches through fuse, kmod or nbd "
                             f"(via={via!r})")
        async with self.op_lock:
            if not self.accepting:
                raise DaemonUnavailable("the daemon is shutting down")
            with trio.CancelScope(shield=True):
                try:
                    if via == "kmod":
                        att = await self._attach_kmod(image, readonly, max_entries=entries,
                                                      timeout_ms=timeout_ms, pool=pool,
                                                      boot_trace=boot_trace)
                    elif via == "nbd":
                        att = await self._attach_nbd(image, readonly, boot_trace)
                    else:
                        att = await self._attach(image, readonly, boot_trace)
                finally:
                    self.after_change()
        return {"attached": att.record()}

    async def _check_new(self, image: str) -> str:
        """The image's real path, if attaching it is allowed."""
        # In a thread: a path into our own FUSE mount would need this thread to answer.
        real = await trio.to_thread.run_sync(os.path.realpath, image)
        if real == self.run.fuse_dir or real.startswith(self.run.fuse_dir + "/"):
            raise CommandFailed(f"{image}: is a disk this daemon serves (its FUSE file); "
                             "attach the image itself")
        for a in self.attachments.values():
            if a.realpath == real:
                raise CommandFailed(f"{image}: already attached as {a.device}")
        return real

    async def _attach_kmod(self, image: str, readonly: bool, take_over: int = -1, *,
                           max_entries: int = DEFAULT_MAX_ENTRIES,
                           timeout_ms: int = DEFAULT_DAEMON_TIMEOUT_MS,
                           pool: int = -1, boot_trace: bool = True) -> Attachment:
        """Attach through the kernel shim: /dev/cowdN, its channel served in the daemon's
        nursery, the kernel's remap table (``max_entries`` clusters) primed; without a
        daemon its misses wait ``timeout_ms`` for a new one; ``pool`` clusters lent to the
        kernel for its allocations (-1: the default).  ``take_over``: the index of a device
        a dead daemon left, to serve again instead of creating one (it keeps the bound and
        timeout it was created with; its pool is the default one)."""
        real = await self._check_new(image)
        problem = await trio.to_thread.run_sync(module_problem)
        if problem is not None:
            raise CommandFailed(f"--via kmod: {problem}")
        name = self._name_for(image)
        disk = await self.open_disk(image, readonly, boot_trace)
        try:
            if take_over >= 0:
                kdev = KmodDevice.take_over(disk, take_over)
            else:
                kdev = KmodDevice.create(disk, max_entries=max_entries,
                                         daemon_timeout_ms=timeout_ms)
            try:
                await self.nursery.start(kdev.serve)
                await kdev.prime()
                await kdev.start_pool(None if pool < 0 else pool)  # first writes in the kernel
                if take_over < 0:
                    await kdev.rescan_partitions()
                rdev = (await trio.to_thread.run_sync(os.stat, kdev.device)).st_rdev
            except BaseException:
                with contextlib.suppress(Exception):
                    kdev.remove(force=True)
                kdev.close()
                raise
        except BaseException:
            await disk.close()
            raise
        att = Attachment(name, image, real, disk, "kmod", "", kdev.device, rdev, (0, 0),
                         disk.readonly, kmod=kdev)
        self.attachments[name] = att
        self._save()
        log.info("attached %s as %s (via kmod%s; %d remaps primed in %.3f s)", image,
                 kdev.device, ", taken over" if take_over >= 0 else "", kdev.primed_entries,
                 kdev.prime_seconds or 0.0)
        return att

    async def _attach_nbd(self, image: str, readonly: bool, boot_trace: bool = True
                          ) -> Attachment:
        """Attach through the kernel's nbd client: the Disk is an export of this attacher's
        NBD server, served over a socketpair whose other end /dev/nbdN reads."""
        real = await self._check_new(image)
        problem = await trio.to_thread.run_sync(nbd_problem)
        if problem is not None:
            raise CommandFailed(f"--via nbd: {problem}")
        name = self._name_for(image)
        disk = await self.open_disk(image, readonly, boot_trace)
        try:
            if self.nbd_server is None:
                # device=True: resident buffers made up front (writeback under pressure)
                self.nbd_server = NbdServer(self.nbd_disks, device=True)
            self.nbd_disks[name] = disk
            workers = self.workers
            serve: Serve = self.nbd_server.handle
            # The device's handshake is timed (NbdDevice.connect): a worker that is still
            # importing (a slow guest) could not answer it in time, so with none ready
            # such a device is served by the daemon itself.
            if workers is not None:
                await workers.start()  # the first attach that needs them starts them
                if await workers.wait_ready(WORKER_READY_WAIT_S):
                    workers.add_disk(name, disk, W.SCOPE_DEVICE)
                    serve = functools.partial(_hand_off, workers, f"/dev/nbd ({name})")
            try:
                ndev = await NbdDevice.connect(self.nursery, serve, name)
                try:
                    rdev = (await trio.to_thread.run_sync(os.stat, ndev.device)).st_rdev
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await ndev.disconnect()
                    raise
            except BaseException:
                del self.nbd_disks[name]
                if workers is not None:
                    with trio.CancelScope(shield=True):
                        await workers.forget_disk(disk)
                raise
        except BaseException:
            await disk.close()
            raise
        att = Attachment(name, image, real, disk, "nbd", "", ndev.device, rdev, (0, 0),
                         disk.readonly, nbd=ndev)
        self.attachments[name] = att
        self._save()
        log.info("attached %s as %s (via nbd, %d bytes, flags %#x)", image, ndev.device,
                 ndev.size_bytes, ndev.flags)
        return att

    async def take_over(self, records: list[dict[str, Any]]) -> list[str]:
        """Serve again the kernel-shim devices a dead daemon of this run dir left (their
        waiting requests resume).  Returns one line per device taken over or given up."""
        lines = []
        for rec in records:
            index, image = rec.get("index"), rec.get("image")
            if rec.get("frontend") != "kmod" or not isinstance(index, int) or \
                    not isinstance(image, str):
                continue
            dev = f"/dev/cowd{index}"
            if not lexists(dev):
                continue
            try:
                async with self.op_lock:
                    await self._attach_kmod(image, bool(rec.get("readonly")), take_over=index)
                lines.append(f"took over {dev} ({image})")
            except (UsageError, CommandFailed, RequestError, OSError) as e:
                lines.append(f"could not take over {dev} ({image}): {e}")
                log.warning("could not take over %s (%s): %s", dev, image, e)
        return lines

    async def _attach(self, image: str, readonly: bool, boot_trace: bool = True) -> Attachment:
        real = await self._check_new(image)
        name = self._name_for(image)
        disk = await self.open_disk(image, readonly, boot_trace)
        workers = self.workers
        try:
            fe = await self._frontend()
            if workers is None:
                path = fe.add_disk(name, disk)
            else:
                # The workers serve the file too: the daemon's own requests on it must keep
                # their contract (GatedDisk), and they learn its inode before it can be opened.
                served = workers.add_disk(name, disk, W.SCOPE_DEVICE, publish=False)
                path = fe.add_disk(name, workers.gated(served))
                served.fuse_ino = fe.fs.by_name[name].ino
                workers.publish(served)
            try:
                inode = fe.stats()["files"][name]["inode"]
                dev = await losetup_attach(path, disk.readonly)
                info = await trio.to_thread.run_sync(loop_info, dev)
                if info is None or info.backing_file != path or \
                        (info.backing_dev, info.backing_ino) != (self.mount_dev, inode):
                    # Not what we asked for; not ours to touch either.
                    raise CommandFailed(f"{dev}: losetup named a device that does not read "
                                     f"{path} (backing_file={info and info.backing_file})")
                if not info.dio:
                    log.warning("%s: direct I/O is off (the page cache holds a second copy)",
                                dev)
                rdev = (await trio.to_thread.run_sync(os.stat, dev)).st_rdev
            except BaseException:
                await fe.remove_disk(name, force=True)
                if workers is not None:
                    with trio.CancelScope(shield=True):
                        await workers.forget_disk(disk)
                raise
        except BaseException:
            await disk.close()
            raise
        att = Attachment(name, image, real, disk, "fuse", path, dev, rdev,
                         (info.backing_dev, info.backing_ino), disk.readonly)
        self.attachments[name] = att
        self._save()
        log.info("attached %s as %s (%s, via fuse)", image, dev, path)
        return att

    def find(self, req: dict[str, Any]) -> Attachment | None:
        """The attachment a detach request names: by device number, image path or name."""
        rdev = req.get("rdev")
        image = req.get("image")
        target = req.get("target")
        for a in self.attachments.values():
            if isinstance(rdev, int) and rdev == a.rdev:
                return a
            if isinstance(image, str) and image in (a.realpath, a.image):
                return a
            if isinstance(target, str) and target in (a.name, a.device):
                return a
        return None

    async def detach(self, req: dict[str, Any]) -> dict[str, Any]:
        async with self.op_lock:
            att = self.find(req)
            if att is None:
                raise RequestError(errno.ENOENT, f"{req.get('target')}: not attached "
                                   f"(run dir {self.run.path})")
            with trio.CancelScope(shield=True):
                await self._detach(att)
                exiting = self.after_change()
        return {"detached": att.record(), "exiting": exiting}

    async def _detach(self, att: Attachment) -> None:
        if att.kmod is not None:
            await self._detach_kmod(att, att.kmod)
            return
        if att.nbd is not None:
            await self._detach_nbd(att, att.nbd)
            return
        fe = self.fuse
        assert fe is not None
        info = await self._ours(att)
        if info is not None:
            if await trio.to_thread.run_sync(is_busy, att.device):
                raise CommandFailed(f"{att.device}: in use (a mounted file system?); "
                                 "unmount it first")
            if not att.disk.readonly:
                await att.disk.flush()
            await losetup_detach(att.device)
        else:
            log.warning("%s: no longer reads %s; not touching it", att.device, att.file)
        if not await self._released(att.name, RELEASE_TIMEOUT_S):
            log.warning("%s: still open %g s after losetup -d; removing it anyway",
                        att.file, RELEASE_TIMEOUT_S)
        await fe.remove_disk(att.name, force=True)
        if self.workers is not None:
            await self.workers.stats()  # their boot-trace first touches, before they forget
            await self.workers.forget_disk(att.disk)
        await self._forget(att)

    async def _forget(self, att: Attachment) -> None:
        """The end of every detach: drop the record, then close the disk."""
        del self.attachments[att.name]
        self._save()
        try:
            await att.disk.close()
        finally:
            log.info("detached %s (%s)", att.device, att.image)

    async def _detach_kmod(self, att: Attachment, kdev: KmodDevice) -> None:
        await kdev.stop_pool()  # the kernel's allocations recorded, its unused pool given back
        await kdev.drain()  # its last boot-trace first touches, before the disk saves them
        try:
            await trio.to_thread.run_sync(kdev.remove)  # refused while the device is open
        except BaseException:
            await kdev.start_pool()
            raise
        kdev.close()
        if not att.disk.readonly:
            await att.disk.flush()  # the kernel's writes sit in the files' page cache
        await self._forget(att)

    async def _detach_nbd(self, att: Attachment, ndev: NbdDevice) -> None:
        if await trio.to_thread.run_sync(is_busy, att.device):
            raise CommandFailed(f"{att.device}: in use (a mounted file system?); unmount it first")
        if not att.disk.readonly:
            await ndev.sync()  # the kernel's cached writes, then a FLUSH
        await ndev.disconnect()
        self.nbd_disks.pop(att.name, None)
        if self.workers is not None:
            await self.workers.stats()  # their boot-trace first touches, before they forget
            await self.workers.forget_disk(att.disk)
        await self._forget(att)

    async def _detach_all_nbd(self) -> None:
        """At shutdown, disconnect every /dev/nbdN (one still mounted too: its I/O fails from
        now on, as it would once this process is gone) before the disks close."""
        with trio.CancelScope(shield=True):
            self.accepting = False
            for att in list(self.attachments.values()):
                ndev = att.nbd
                if ndev is None:
                    continue
                try:
                    if await trio.to_thread.run_sync(is_busy, att.device):
                        log.warning("%s: still in use at shutdown; disconnecting it anyway",
                                    att.device)
                    elif not att.disk.readonly:
                        await ndev.sync()
                except OSError as e:
                    log.error("%s: %s", att.device, e)
                await ndev.disconnect()

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for a in self.attachments.values():
            d = a.disk
            e = {**a.record(), "size": d.size, "remap": d.counters.as_dict(),
                 "ops": d.stats()["ops"]}
            if a.kmod is not None:
                e["kmod"] = a.kmod.stats()
            if a.nbd is not None:
                e["nbd"] = a.nbd.stats()
            out.append(e)
        return out

    async def list_disks(self, _req: dict[str, Any]) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"attached": self.entries()}

    # -- shutdown ------------------------------------------------------------------------------

    async def quiesce(self) -> None:
        """Refuse new attaches and wait for the running one (shutdown calls this)."""
        self.accepting = False
        async with self.op_lock:
            pass

    async def _detach_all(self) -> None:
        with trio.CancelScope(shield=True):
            self.accepting = False
            for att in list(self.attachments.values()):
                if att.kmod is not None or att.nbd is not None:
                    continue  # _detach_all_kmod, _detach_all_nbd
                try:
                    info = await self._ours(att)
                    if info is None:
                        continue
                    if await trio.to_thread.run_sync(is_busy, att.device):
                        log.warning("%s: still in use at shutdown; detaching it anyway (it "
                                    "goes away when it is unmounted; its I/O fails until then)",
                                    att.device)
                    await losetup_detach(att.device)
                except (OSError, UsageError, CommandFailed) as e:
                    log.error("%s: %s", att.device, e)
            for att in list(self.attachments.values()):
                if att.frontend == "fuse" and not await self._released(att.name,
                                                                 RELEASE_TIMEOUT_S / 2):
                    break  # the frontend's close waits and aborts what stays open

    async def _detach_all_kmod(self) -> None:
        """At shutdown, remove each kernel-shim device that nothing has open; leave the others
        for a new daemon to take over (their requests wait, then fail after the kernel's
        timeout)."""
        await trio.lowlevel.checkpoint()
        self.accepting = False
        for att in list(self.attachments.values()):
            kdev = att.kmod
            if kdev is None:
                continue
            try:
                with trio.CancelScope(shield=True):  # bounded: REVOKE_TIMEOUT_S
                    await kdev.stop_pool()  # nothing the kernel allocated left unrecorded
                    await kdev.drain()  # nor a first touch it queued for the boot trace
                await trio.to_thread.run_sync(kdev.remove)
            except (UsageError, CommandFailed, RequestError) as e:
                log.warning("%s: left for a new daemon to take over (%s)", att.device, e)
            kdev.close()

    async def _close_all(self) -> None:
        with trio.CancelScope(shield=True):
            first: BaseException | None = None
            for att in list(self.attachments.values()):
                try:
                    await att.disk.close()
                except Exception as e:
                    log.error("%s: closing failed: %s", att.image, e)
                    first = first or e
            self.attachments.clear()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.run.state)
            if first is not None:
                raise first



async def _hand_off(workers: WorkerPool, peer: str, stream: trio.SocketStream) -> None:
    """Serve a --via nbd device's socketpair from a worker process."""
    workers.hand_off(stream, peer, W.SCOPE_DEVICE)
    await trio.lowlevel.checkpoint()


__all__ = [
    "EXIT_AFTER_REPLY_S",
    "STARTUP_IDLE_S",
    "Attacher",
    "Attachment",
]
