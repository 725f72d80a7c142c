"""Layer: cowd (the composition root).  One daemon process serves many disks.

Theory of operation: :func:`run_daemon` owns a nursery for long-lived tasks (control
connections, NBD connections, the FUSE workers) and, inside it, an ``AsyncExitStack``.  It
first takes the run directory (the pid file's lock, cowd/rundir.py) and cleans up after a dead
predecessor, then builds the shared parts once — the :class:`~cowd.disk.ImagePool` (each
parent image opened once and shared by every overlay on it) and the
:class:`~cowd.remap.RemapCache` — opens and primes one :class:`~cowd.disk.Disk` per image
given on the command line, and starts the frontends (NBD listeners) and the control socket.
Disks attached later (``cowd attach``: FUSE file + loop device) come and go through the
:class:`~cowd.attach.attacher.Attacher`, which mounts the FUSE directory at the first attach.  Every
part registers its own teardown on the exit stack, so a failure half-way through start-up
unwinds what was built, and the order of teardown is the reverse of building: loop devices
are detached, then the FUSE directory is unmounted and drained, then the disks are closed, then
the socket and the pid file go.

Two kinds of daemon: ``cowd serve`` runs until SIGINT/SIGTERM; ``cowd daemon`` (what ``cowd
attach`` starts in the background) also exits when it serves nothing — after the detach of
its last disk, after a failed first attach, or when no disk arrives within STARTUP_IDLE_S.

Shutdown (a signal, or idle): stop taking control requests (remove the socket), wait for an
attach or detach in progress, stop accepting NBD connections, give in-flight requests
DRAIN_TIMEOUT_S to finish, then unwind the stack: flush and close every disk (data before
metadata, as formats/ documents) and exit 0.  The signal receiver is installed before anything
is opened and removed after the last disk is closed, so a second signal during the drain or
the flush is logged, never fatal; the final close is shielded, so a caller that cancels
``run_daemon`` still gets its disks flushed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from formats.opener import OpenPolicy

from . import control
from .attach.attacher import EXIT_AFTER_REPLY_S, STARTUP_IDLE_S, Attacher
from .attach.stale import cleanup_stale
from .disk import Disk, ImagePool
from .disk.remote import FETCHER
from .errors import UsageError
from .frontends.fuse.protocol import FuseOptions
from .remap import RemapCache
from .rundir import RunDir, check_socket_folder, take_run_dir
from .sysmem import OOM_SCORE_ADJ_MIN, protect_from_oom_killer, set_io_flusher
from .workers.host import WorkerPool

if TYPE_CHECKING:
    from .frontends.nbd.tls import TlsConfig

log = logging.getLogger("cowd.daemon")

DRAIN_TIMEOUT_S = 10.0
DEFAULT_TCP_HOST = "127.0.0.1"


@dataclass
class DaemonConfig:
    images: list[str]
    nbd: list[str] = field(default_factory=list)  # "unix:PATH" or "tcp:HOST:PORT"
    run_dir: str = control.DEFAULT_RUN_DIR
    readonly: bool = False
    cache_entries: int = 1 << 18  # ~450 B each when full: ~115 MiB for 16 GiB of 64 KiB clusters
    cache_max_age_s: float = 600.0
    readahead_clusters: int = 16
    prime: bool = True
    # Boot-trace priming (cowd/disk/boottrace.py): record the base's first touches, prefetch
    # from the trace a disk of the same base left.
    boot_trace: bool = True
    exit_when_idle: bool = False  # the background daemon `cowd attach` starts
    pid_wait_s: float = 1.0  # how long to wait for a previous owner of the run dir
    # What the files the served images name may reach (formats/opener.py): confined to each
    # top image's folder unless the user allowed more.
    policy: OpenPolicy = field(default_factory=OpenPolicy)
    # Worker processes serving NBD connections (cowd/workers/); 0: the daemon serves them.
    workers: int = 0
    # TLS on the NBD listeners (cowd serve --tls ...); None: off.
    tls: TlsConfig | None = None
    # The FUSE mount answers the kernel's FUSE-over-io_uring offer (--fuse-io-uring).
    fuse_io_uring: bool = False
    # What became of PR_SET_IO_FLUSHER (cowd/sysmem.py), set by run_daemon.
    io_flusher: str = "not asked"
    oom_protection: str = "not asked"  # oom_score_adj OOM_SCORE_ADJ_MIN (sysmem.py)


@dataclass
class Daemon:
    config: DaemonConfig
    pool: ImagePool
    cache: RemapCache
    disks: dict[str, Disk] = field(default_factory=dict)  # NBD export name -> disk
    started: float = field(default_factory=time.monotonic)
    nbd: Any = None  # the NbdServer, once started
    workers: WorkerPool | None = None
    attacher: Attacher | None = None
    cleanup: list[str] = field(default_factory=list)  # what start-up cleaned up
    request_stop: Callable[[], None] = lambda: None
    nursery: trio.Nursery | None = None  # where disks' boot-trace prefetches run

    def name_taken(self, name: str) -> bool:
        return name in self.disks or (self.attacher is not None
                                      and name in self.attacher.attachments)

    def export_name(self, path: str) -> str:
        name = os.path.basename(path)
        if self.name_taken(name):
            raise UsageError(f"{path}: another served image is also called {name!r}")
        return name

    async def open_disk(self, path: str, readonly: bool, boot_trace: bool = True) -> Disk:
        disk = await Disk.open(path, pool=self.pool, cache=self.cache,
                               readonly=self.config.readonly or readonly,
                               readahead_clusters=self.config.readahead_clusters,
                               policy=self.config.policy,
                               boot_trace=self.config.boot_trace and boot_trace)
        # The prefetch first: priming reads metadata, the trace's reads are the guest's data.
        if self.nursery is not None:
            disk.trace.start(self.nursery)
        if self.config.prime:
            try:
                await disk.prime()
            except BaseException:
                await disk.close()
                raise
        return disk

    async def add_disk(self, path: str) -> Disk:
        name = self.export_name(path)
        disk = await self.open_disk(path, False)
        self.disks[name] = disk
        return disk

    def serves_nothing(self) -> bool:
        return not self.disks and not (self.attacher and self.attacher.attachments)

    def after_change(self) -> bool:
        """Called after every attach or detach: a daemon that exits when idle stops taking
        attaches now and exits once the reply is out.  True if it will exit."""
        if not (self.config.exit_when_idle and self.serves_nothing()):
            return False
        if self.attacher is not None:
            self.attacher.accepting = False
        log.info("serving nothing: exiting")
        self.request_stop()
        return True

    async def ping(self, _req: dict[str, Any]) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"pid": os.getpid(), "run_dir": self.config.run_dir,
                "exit_when_idle": self.config.exit_when_idle, "cleanup": self.cleanup}

    async def list_disks(self, req: dict[str, Any]) -> dict[str, Any]:
        attached = (await self.attacher.list_disks(req))["attached"] if self.attacher else []
        exported = [{"name": n, "image": d.path, "device": None, "frontend": "nbd-export",
                     "readonly": d.readonly, "size": d.size, "remap": d.counters.as_dict(),
                     "ops": d.stats()["ops"]} for n, d in self.disks.items()]
        return {"pid": os.getpid(), "disks": attached + exported}

    async def stats(self, _req: dict[str, Any]) -> dict[str, Any]:
        # First: the workers' stats bring their boot-trace first touches to the disks, and so
        # do the kernel's TOUCH records still on the kmod channels.
        workers = await self.workers.stats() if self.workers is not None else None
        if self.attacher is not None:
            for a in list(self.attacher.attachments.values()):
                if a.kmod is not None:
                    await a.kmod.drain()
        disks = {name: {**d.stats(), "frontend": "nbd-export"} for name, d in self.disks.items()}
        fuse = None
        if self.attacher is not None:
            for name, a in self.attacher.attachments.items():
                disks[name] = {**a.disk.stats(), "frontend": a.frontend, "device": a.device}
                if a.kmod is not None:
                    disks[name]["kmod"] = a.kmod.stats()
                if a.nbd is not None:
                    disks[name]["nbd"] = a.nbd.stats()
            if self.attacher.fuse is not None:
                fuse = self.attacher.fuse.stats()
        nbd = dict(self.nbd.counters) if self.nbd is not None else None
        await trio.lowlevel.checkpoint()
        if workers is not None:
            nbd = _sum_worker_stats(workers, disks)
        device_server = self.attacher.nbd_server if self.attacher is not None else None
        if device_server is not None:  # --via nbd devices the daemon serves itself
            nbd = {k: v + (nbd or {}).get(k, 0) for k, v in device_server.counters.items()}
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "cache": self.cache.stats(),
            "nbd": nbd,
            "io_flusher": self.config.io_flusher,
            "oom_protection": self.config.oom_protection,
            "fuse": fuse,
            "disks": disks,
            "workers": workers,
            "remote": {"bases": FETCHER.stats(), **FETCHER.counters},
        }

    async def close(self) -> None:
        """Flush and close every disk; one failing does not leave the others open."""
        first: BaseException | None = None
        for name, disk in list(self.disks.items()):
            try:
                await disk.close()
            except Exception as e:
                log.error("%s: closing failed: %s", name, e)
                first = first or e
        self.disks.clear()
        if first is not None:
            raise first

    async def close_shielded(self) -> None:
        """``close`` even when the caller is cancelled: the flush must not be skipped."""
        with trio.CancelScope(shield=True):
            await self.close()


def _sum_worker_stats(workers: list[dict[str, Any]],
                      disks: dict[str, dict[str, Any]]) -> dict[str, int]:
    """The NBD counters of every worker, summed; and each disk's worker counters (local
    reads and writes, misses, what was forwarded), summed over the workers into
    ``disks[name]["workers"]``.  Returns the NBD counters."""
    nbd: dict[str, int] = {}
    for w in workers:
        doc = w.get("worker") or {}
        for k, v in doc.get("nbd", {}).items():
            nbd[k] = nbd.get(k, 0) + v
        for d in doc.get("disks", {}).values():
            into = disks.get(d.get("name"))
            if into is None:
                continue
            total = into.setdefault("workers", {})
            for k, v in d.items():
                if isinstance(v, int):
                    total[k] = total.get(k, 0) + v
    return nbd


def parse_address(spec: str) -> tuple[str, str, int]:
    """'unix:/path' -> ('unix', path, 0); 'tcp:HOST:PORT' -> ('tcp', host, port).  The host
    defaults to loopback ('tcp:PORT' or 'tcp::PORT'): serving beyond this machine has to be
    asked for by name."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, 0
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if port.isdigit() and 0 < int(port) < 65536:
            return "tcp", host or DEFAULT_TCP_HOST, int(port)
    raise UsageError(f"--nbd: expected unix:PATH or tcp:[HOST:]PORT, got {spec!r}")


async def run_daemon(config: DaemonConfig,
                     task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGINT/SIGTERM (or until the caller cancels), then drain and close.

    Signals are caught from the start to the very end: the first one during start-up abandons
    it (whatever was opened is closed again), the first one while serving starts the drain,
    and any later one is only logged, so a second SIGTERM cannot kill the daemon half-way
    through flushing.
    """
    addresses = [parse_address(s) for s in config.nbd]  # fail early, before opening anything
    # First, while this is the only thread: the threads trio starts later inherit the flag.
    # (Said once serving starts: a start-up error stays one line.)
    # And out of the OOM killer's choice, which the workers it starts inherit.
    config = dataclasses.replace(config, io_flusher=set_io_flusher(),
                                 oom_protection=protect_from_oom_killer())
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as outer:
            stop = trio.Event()
            run_scope = trio.CancelScope()
            serving = [False]

            async def watch_signals() -> None:
                async for signum in signals:
                    if stop.is_set():
                        log.info("signal %d: already shutting down", signum)
                        continue
                    stop.set()
                    if serving[0]:
                        log.info("signal %d: draining", signum)
                    else:
                        log.info("signal %d: abandoning start-up", signum)
                        run_scope.cancel()

            outer.start_soon(watch_signals)
            # Caught here and re-raised below: escaping the nursery, a start-up error (a
            # missing image, a socket in use) would become an ExceptionGroup, which the CLI
            # cannot turn into its one-line message.
            error: Exception | None = None
            try:
                with run_scope:
                    await _serve(config, addresses, stop, serving, task_status)
            except Exception as e:
                error = e
            outer.cancel_scope.cancel()
        if error is not None:
            raise error


async def _serve(config: DaemonConfig, addresses: list[tuple[str, str, int]], stop: trio.Event,
                 serving: list[bool], task_status: trio.TaskStatus[Daemon]) -> None:
    # The exit stack sits inside the nursery of long-lived tasks, so its teardown (the FUSE
    # frontend's drain above all) runs while the frontends' tasks are still alive.  An error
    # is caught inside the nursery and re-raised outside it, unwrapped (see run_daemon).
    error: Exception | None = None
    async with trio.open_nursery() as services:
        FETCHER.serve_in(services)  # remote bases: background fetches (cowd/disk/remote.py)
        try:
            await _serve_in(services, config, addresses, stop, serving, task_status)
        except Exception as e:
            error = e
        services.cancel_scope.cancel()
    if error is not None:
        raise error


async def _serve_in(services: trio.Nursery, config: DaemonConfig,
                    addresses: list[tuple[str, str, int]], stop: trio.Event,
                    serving: list[bool], task_status: trio.TaskStatus[Daemon]) -> None:
    from .frontends.nbd.server import NbdServer, open_nbd_listeners, peer_name

    run = RunDir.at(config.run_dir)
    ctl_path = run.control
    async with contextlib.AsyncExitStack() as stack:
        pid = await take_run_dir(run, config.pid_wait_s)
        stack.callback(pid.release)  # runs last
        done = await cleanup_stale(run, keep_kmod=True)
        for kind, addr, _ in addresses:
            if kind == "unix":
                check_socket_folder(addr)  # first: a missing folder is an error, not made
                control.clear_stale_socket(addr)
        pool = ImagePool()
        cache = RemapCache(max_entries=config.cache_entries, max_age_s=config.cache_max_age_s)
        daemon = Daemon(config, pool, cache, cleanup=done.lines(run),
                        request_stop=lambda: services.start_soon(_stop_soon, stop),
                        nursery=services)
        for line in daemon.cleanup:
            log.info("cleaned up after a dead daemon: %s", line)
        stack.push_async_callback(daemon.close_shielded)  # runs late: flush and close disks
        # Before any image is opened: credentials that cannot be loaded are a one-line error.
        nbd = NbdServer(daemon.disks, tls=config.tls)
        stack.callback(nbd.close)
        daemon.nbd = nbd
        attacher = Attacher(run, stack, services, daemon.open_disk, daemon.name_taken,
                            daemon.after_change,
                            fuse_options=FuseOptions(io_uring=config.fuse_io_uring))
        daemon.attacher = attacher
        for line in await attacher.take_over(done.state):
            log.info("after a dead daemon: %s", line)
            daemon.cleanup.append(line)
        for path in config.images:
            await daemon.add_disk(path)
        nbd.check_authz_exports()

        # Workers first: the NBD socket appears only once they can serve.
        workers: WorkerPool | None = None
        if config.workers > 0:
            workers = WorkerPool(config.workers, services, tls=config.tls)
            daemon.workers = workers
            # `cowd serve` listens once its workers can serve.  The daemon `cowd attach`
            # starts answers its control socket at once and starts its workers when an
            # attach first needs them (--via fuse or nbd; a kmod attach never does: no idle
            # processes beside the kernel's data path, and none slowing its start).
            if not config.exit_when_idle:
                await workers.start()
            for name, disk in daemon.disks.items():
                workers.add_disk(name, disk)
            attacher.workers = workers  # --via nbd's devices are served by them too
            # Over io_uring the workers serve the FUSE mount's ring queues (ring.py).
            attacher.fuse_options = dataclasses.replace(
                attacher.fuse_options or FuseOptions(), uring_workers=config.workers)
        ctl = await control.open_control_listener(ctl_path)
        stack.callback(_unlink_quiet, ctl_path)
        listeners = await open_nbd_listeners(addresses)
        for kind, addr, _ in addresses:
            if kind == "unix":
                stack.callback(_unlink_quiet, addr)

        async def hand_off(stream: trio.SocketStream) -> None:
            assert workers is not None
            workers.hand_off(stream, peer_name(stream))
            await trio.lowlevel.checkpoint()
        handlers: dict[str, control.Handler] = {
            "stats": daemon.stats, "ping": daemon.ping, "list": daemon.list_disks,
            "attach": attacher.attach, "detach": attacher.detach}

        # The control server and the accept loops run in scopes of their own, so shutdown
        # can stop them (which closes the listeners) while connections drain.  Closing a
        # listener under a task blocked in accept() would instead make that task fail with
        # ClosedResourceError.
        controlling = trio.CancelScope()
        accepting = trio.CancelScope()

        async def control_loop(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                               ) -> None:
            with controlling:
                await control.serve_control(ctl, handlers, task_status=task_status)

        async def accept_loop() -> None:
            with accepting:
                await trio.serve_listeners(nbd.handle if workers is None else hand_off, listeners,
                                           handler_nursery=services)

        try:
            await services.start(control_loop)
            if listeners:
                services.start_soon(accept_loop)
            if config.exit_when_idle and not config.images:
                services.start_soon(_exit_if_idle, daemon, STARTUP_IDLE_S)
            what = ", ".join(daemon.disks) or "no disks yet"
            log.info("serving %s%s; control socket %s", what,
                     f" on {', '.join(config.nbd)}" if config.nbd else "", ctl_path)
            for what, state, risk in (
                    ("PR_SET_IO_FLUSHER", config.io_flusher, "writeback through this "
                     "daemon's devices may deadlock under heavy memory pressure"),
                    (f"oom_score_adj {OOM_SCORE_ADJ_MIN}", config.oom_protection, "the OOM "
                     "killer may end this daemon with its devices' requests in hand")):
                if state == "set" or os.geteuid() != 0:
                    log.debug("%s: %s", what, state)
                else:
                    log.warning("%s %s: %s", what, state, risk)
            serving[0] = True
            task_status.started(daemon)
            await stop.wait()
        finally:
            # New clients see no daemon (and start another); no attach begins from now on.
            controlling.cancel()
            _unlink_quiet(ctl_path)
            attacher.accepting = False
            accepting.cancel()
        await attacher.quiesce()
        await nbd.shutdown(DRAIN_TIMEOUT_S)
        if workers is not None:
            await workers.stats()  # their last boot-trace first touches, before they go
            await workers.stop()
    log.info("stopped")


async def _stop_soon(stop: trio.Event) -> None:
    # Let the reply that caused the exit reach its client first.
    await trio.sleep(EXIT_AFTER_REPLY_S)
    stop.set()


async def _exit_if_idle(daemon: Daemon, after_s: float) -> None:
    await trio.sleep(after_s)
    if daemon.attacher is not None:
        async with daemon.attacher.op_lock:
            if daemon.serves_nothing() and daemon.attacher.accepting:
                log.info("no disk attached within %g s", after_s)
                daemon.after_change()


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
