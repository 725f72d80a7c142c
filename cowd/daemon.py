"""Layer: cowd (the composition root).  One daemon process serves many disks.

Theory of operation: :func:`run_daemon` owns the nursery and an ``AsyncExitStack``.  It builds
the shared parts once — the :class:`~cowd.disk.ImagePool` (each parent image opened once and
shared by every overlay on it) and the :class:`~cowd.remap.RemapCache` — then opens one
:class:`~cowd.disk.Disk` per image, primes each, and starts the frontends (NBD listeners) and
the control socket.  Every part registers its own teardown on the exit stack, so a failure
half-way through start-up unwinds what was built.

Shutdown (SIGINT/SIGTERM): stop accepting, give in-flight requests DRAIN_TIMEOUT_S to finish,
then flush and close every disk (data before metadata, as formats/ documents) and exit 0.
The signal receiver is installed before anything is opened and removed after the last disk is
closed, so a second signal during the drain or the flush is logged, never fatal; the final
close is shielded, so a caller that cancels ``run_daemon`` still gets its disks flushed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from . import control
from .disk import Disk, ImagePool
from .errors import UsageError
from .remap import RemapCache

log = logging.getLogger("cowd.daemon")

DRAIN_TIMEOUT_S = 10.0


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


@dataclass
class Daemon:
    config: DaemonConfig
    pool: ImagePool
    cache: RemapCache
    disks: dict[str, Disk] = field(default_factory=dict)  # export name -> disk
    started: float = field(default_factory=time.monotonic)
    nbd: Any = None  # the NbdServer, once started

    def export_name(self, path: str) -> str:
        name = os.path.basename(path)
        if name in self.disks:
            raise UsageError(f"{path}: another served image is also called {name!r}")
        return name

    async def add_disk(self, path: str) -> Disk:
        name = self.export_name(path)
        disk = await Disk.open(path, pool=self.pool, cache=self.cache,
                               readonly=self.config.readonly,
                               readahead_clusters=self.config.readahead_clusters)
        self.disks[name] = disk
        if self.config.prime:
            await disk.prime()
        return disk

    async def stats(self, _req: dict[str, Any]) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "cache": self.cache.stats(),
            "nbd": dict(self.nbd.counters) if self.nbd is not None else None,
            "disks": {name: d.stats() for name, d in self.disks.items()},
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


def parse_address(spec: str) -> tuple[str, str, int]:
    """'unix:/path' -> ('unix', path, 0); 'tcp:HOST:PORT' -> ('tcp', host, port)."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, 0
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host and port.isdigit() and 0 < int(port) < 65536:
            return "tcp", host, int(port)
    raise UsageError(f"--nbd: expected unix:PATH or tcp:HOST:PORT, got {spec!r}")


async def run_daemon(config: DaemonConfig,
                     task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGINT/SIGTERM (or until the caller cancels), then drain and close.

    Signals are caught from the start to the very end: the first one during start-up abandons
    it (whatever was opened is closed again), the first one while serving starts the drain,
    and any later one is only logged, so a second SIGTERM cannot kill the daemon half-way
    through flushing.
    """
    addresses = [parse_address(s) for s in config.nbd]  # fail early, before opening anything
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
    from .nbd import NbdServer, open_nbd_listeners

    ctl_path = control.control_path(config.run_dir)
    control.clear_stale_socket(ctl_path)
    for kind, addr, _ in addresses:
        if kind == "unix":
            control.clear_stale_socket(addr)
    async with contextlib.AsyncExitStack() as stack:
        pool = ImagePool()
        cache = RemapCache(max_entries=config.cache_entries, max_age_s=config.cache_max_age_s)
        daemon = Daemon(config, pool, cache)
        stack.push_async_callback(daemon.close_shielded)  # runs last: flush and close disks
        for path in config.images:
            await daemon.add_disk(path)

        ctl = await control.open_control_listener(ctl_path)
        stack.callback(_unlink_quiet, ctl_path)
        listeners = await open_nbd_listeners(addresses)
        for kind, addr, _ in addresses:
            if kind == "unix":
                stack.callback(_unlink_quiet, addr)
        nbd = NbdServer(daemon.disks)
        daemon.nbd = nbd
        handlers: dict[str, control.Handler] = {"stats": daemon.stats}

        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve_control, ctl, handlers)
            # The accept loops run in a scope of their own and hand connections to the outer
            # nursery, so shutdown can stop accepting (which closes the listeners) while the
            # connections drain.  Closing a listener under a task blocked in accept() would
            # instead make that task fail with ClosedResourceError.
            accepting = trio.CancelScope()

            async def accept_loop() -> None:
                with accepting:
                    await trio.serve_listeners(nbd.handle, listeners, handler_nursery=nursery)

            nursery.start_soon(accept_loop)
            log.info("serving %s on %s", ", ".join(daemon.disks), ", ".join(config.nbd))
            serving[0] = True
            task_status.started(daemon)
            await stop.wait()
            accepting.cancel()
            await nbd.shutdown(DRAIN_TIMEOUT_S)
            nursery.cancel_scope.cancel()


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
