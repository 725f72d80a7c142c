"""Layer: cowd disk, below :mod:`cowd.disk.disk` and the parts it makes.  What a
:class:`~cowd.disk.disk.Disk` hands the parts that do one of its jobs in a module of their
own (:mod:`cowd.disk.mapping`, :mod:`cowd.disk.lending`): :class:`DiskHooks`, the disk's
state and steps they share with it, named here instead of read from its private attributes.

The hooks are the disk's own: a check raises the disk's :class:`~cowd.disk.api.DiskError`,
``translate`` marks the disk corrupt or its flushes failed as it does for its own requests,
and ``ops`` is the dict behind ``Disk.stats()["ops"]``.  Trio-thread only, like the disk.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from formats.remote import NotCached

from .api import DiskError
from .chain import Chain, PlanState, Segment
from .locks import GranuleLocks


@dataclass(frozen=True, slots=True)
class DiskHooks:
    """One disk's state and steps, for its parts; see the module docstring."""

    chain: Chain
    locks: GranuleLocks  # the range lock over the top layer's granules
    ops: dict[str, int]  # the disk's request counters
    # Not read-only and not marked corrupt.
    writable: Callable[[], bool]
    # The request checks: the disk is open; (offset, length[, limit]) is a valid read or
    # write (a write also needs a writable disk).
    check_open: Callable[[], None]
    check_read: Callable[[int, int, int | None], None]
    check_write: Callable[[int, int], None]
    # A library or OS error as the DiskError to raise (marking the disk as it must).
    translate: Callable[[Exception], DiskError]
    # (offset, end) -> the top granules [first, end) the bytes touch.
    granules: Callable[[int, int], tuple[int, int]]
    # (offset, end, call, *args, refill=True): ``call(*args)``, with no await, changes the
    # top layer's mapping of the clusters [offset, end) touches; their cache entries are
    # invalidated before and refilled after (or left to the next lookup).  Returns the
    # resolver calls made.
    change_mapping: Callable[..., int]
    # (start, end, req): the chain's plan of [start, end), waiting for busy layers and
    # fetching a remote layer's missing metadata.
    plan_fetching: Callable[[int, int, PlanState], Awaitable[list[Segment]]]
    # Fetch a remote layer's missing blocks (EIO past the deadline).
    fetch: Callable[[NotCached], Awaitable[None]]


__all__ = ["DiskHooks"]
