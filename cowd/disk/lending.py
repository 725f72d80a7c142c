"""Layer: cowd disk, beside :mod:`cowd.disk.disk`.  Lending clusters of a disk's top layer
to an outside writer (the kernel shim's allocation pool): :class:`Lending`, which a
:class:`~cowd.disk.disk.Disk` makes and shows as ``disk.lending``.

The codec does the lending (formats/qcow2/lend.py: a writable qcow2 overlay without a data
file; its crash-safety order is there).  This module does what the disk adds around it: the
disk's checks and errno, the layers' locks, and the remap cache.  ``lend`` reserves clusters
(their refcounts set, not synced: the codec's step 1) and returns them as :class:`LentRun`
s of the top file; the outside writer writes each lent cluster whole and reports it; ``adopt``
records each :class:`Adoption` in the image (an allocation like the disk's own, durable at
the next flush) and changes the top layer's mapping as a write does (cache entries
invalidated before, refilled after, ``mapping_generation`` bumped); ``adopt_units`` does the
same for whole subclusters of an extended-L2 overlay that the outside writer wrote at their
place in the guest cluster's own host cluster or in a lent one (or says it refused them:
the codec's "Subclusters"); ``give_back`` frees the
:class:`FileRange` s lent and never adopted, once the outside writer can no longer write
them.

Trio-thread only.  Adoption holds the granule range lock only when something else holds the
disk: with no lock held, a batch of adoptions is one synchronous step.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, TypeVar

import trio

from formats.errors import FormatError
from formats.qcow2 import Lender, Qcow2Image, Units, lend_problem

from .api import DiskError
from .chain import ChainFile
from .hooks import DiskHooks

_T = TypeVar("_T")  # what one adoption returns (Lending._each)


class LentRun(NamedTuple):
    """Lent clusters, contiguous in ``file`` (the top layer's): ``length`` bytes from
    ``file_offset``."""

    file: ChainFile
    file_offset: int
    length: int


class Adoption(NamedTuple):
    """The outside writer wrote guest bytes [guest_offset, guest_offset + length) whole into
    lent clusters from ``file_offset`` of the top file onwards."""

    guest_offset: int
    length: int
    file_offset: int


class FileRange(NamedTuple):
    """``length`` bytes from ``file_offset`` of the top file (clusters to give back)."""

    file_offset: int
    length: int


class Lending:
    """The top layer's clusters lent to an outside writer; see the module docstring.
    Made by the disk, with its :class:`~cowd.disk.hooks.DiskHooks`."""

    def __init__(self, hooks: DiskHooks):
        self._hooks = hooks
        self.chain = hooks.chain
        self._top = hooks.chain.top
        self._lender: Lender | None = None  # made at the first lend

    def problem(self) -> str | None:
        """Why this disk cannot lend clusters of its top layer to an outside writer, or
        None (formats/qcow2/lend.py: a writable qcow2 overlay without a data file)."""
        if not self._hooks.writable():
            return "the disk is read-only"
        return lend_problem(self._top.image)

    def _get_lender(self) -> Lender:
        if self._lender is None:
            why = self.problem()
            if why is not None:
                raise DiskError(errno.EOPNOTSUPP,
                                f"{self.chain.path}: cannot lend clusters ({why})")
            image = self._top.image
            assert isinstance(image, Qcow2Image)
            self._lender = Lender(image)
        return self._lender

    @property
    def lent_clusters(self) -> int:
        """Clusters lent and not yet adopted or given back."""
        return self._lender.lent if self._lender is not None else 0

    async def lend(self, clusters: int) -> list[LentRun]:
        """Reserve ``clusters`` free clusters of the top layer for an outside writer (their
        refcounts set, durable at the next sync: formats/qcow2/lend.py, step 1).  Returns
        the runs, each contiguous in the file."""
        self._hooks.check_write(0, 0)
        lender = self._get_lender()
        top = self._top
        try:
            async with self.chain.exclusive([top], will_await=False):
                runs = lender.lend(clusters)
        except (FormatError, OSError, ValueError) as e:
            raise self._hooks.translate(e) from e
        self._hooks.ops["lent"] += clusters
        return [LentRun(top.image.file, off, n) for off, n in runs]

    async def adopt(self, runs: Sequence[Adoption]) -> None:
        """Each run: top-layer clusters [guest_offset, guest_offset + length) now live at
        ``file_offset`` onwards of the top file, where the outside writer wrote them whole
        (lent clusters; the last one may run past the disk's end).  Like an allocation:
        durable at the next flush.  The runs of one call name distinct clusters; with no
        lock held they are adopted inline, in one step."""
        lender = self._get_lender()
        await self._each(runs, lambda _i, run: self._adopt_run(lender, run))

    async def _each(self, runs: Sequence[Adoption], one: Callable[[int, Adoption], _T]
                    ) -> list[_T]:
        """``one(index, run)`` for each run, results in the runs' order: inline, in one step, for
        the runs nothing holds; then those a writer or flush holds, one at a time under the
        lock."""
        for run in runs:
            self._hooks.check_write(run.guest_offset, 0)
        out: dict[int, _T] = {}
        busy: list[int] = []
        try:
            for i, run in enumerate(runs):
                if self.chain.locked_any() or self._hooks.locks.any_held(*self._run_granules(run)):
                    busy.append(i)
                else:
                    out[i] = one(i, run)
            for i in busy:
                async with self._hooks.locks.hold(*self._run_granules(runs[i])), \
                        self.chain.exclusive(will_await=False):
                    out[i] = one(i, runs[i])
        except (FormatError, OSError, ValueError) as e:
            raise self._hooks.translate(e) from e
        if not busy:
            await trio.lowlevel.checkpoint()
        return [out[i] for i in range(len(runs))]

    def unit_size(self) -> int:
        """The subcluster an outside writer may write and have adopted with
        :meth:`adopt_units` (extended L2), or 0: none (whole clusters only)."""
        if self.problem() is not None:
            return 0
        image = self._top.image
        unit = image.copy_up_size
        return unit if 0 < unit < image.cluster_size else 0

    async def adopt_units(self, runs: Sequence[Adoption], may_take_lent: Sequence[bool]
                          ) -> list[Units]:
        """Each run: whole subclusters of one guest cluster that the outside writer wrote at
        ``file_offset``, their place in a host cluster (formats/qcow2/lend.py,
        "Subclusters"); ``may_take_lent[i]``: run i's host cluster is lent to this writer,
        so it may become the guest cluster's.  Each becomes allocated there (durable at the
        next flush, like ``adopt``) or is refused (nothing changed; the writer does the write
        another way).  With no lock held they are adopted inline, in one step."""
        if len(may_take_lent) != len(runs):
            raise ValueError("adopt_units: one may_take_lent per run")
        lender = self._get_lender()
        return await self._each(
            runs, lambda i, run: self._adopt_units_run(lender, run, may_take_lent[i]))

    def _adopt_units_run(self, lender: Lender, run: Adoption, take: bool) -> Units:
        got: list[Units] = []
        # Not refilled: the worker that wrote them keeps its own remaps (host.py), and the
        # refill (a walk of the granule's subclusters) was most of a batch's cost.
        self._hooks.change_mapping(
            run.guest_offset, self._run_end(run),
            lambda: got.append(lender.adopt_units(run.guest_offset, run.length,
                                                  run.file_offset, take)), refill=False)
        if got[0] is not Units.REFUSED:
            self._hooks.ops["adopted_units"] += 1
        return got[0]

    def _run_end(self, run: Adoption) -> int:
        return min(run.guest_offset + run.length, self._top.size)

    def _run_granules(self, run: Adoption) -> tuple[int, int]:
        return self._hooks.granules(run.guest_offset, self._run_end(run))

    def _adopt_run(self, lender: Lender, run: Adoption) -> None:
        self._hooks.change_mapping(run.guest_offset, self._run_end(run), lender.adopt,
                             run.guest_offset, run.length, run.file_offset)
        self._hooks.ops["adopted"] += run.length // max(1, self._top.image.cluster_size)

    async def give_back(self, runs: Iterable[FileRange]) -> int:
        """Clusters of ``runs`` lent and never adopted are free again; only once the
        outside writer can no longer write them.  Returns how many."""
        self._hooks.check_open()
        lender = self._get_lender()
        before = lender.lent
        try:
            async with self.chain.exclusive([self._top], will_await=False):
                lender.give_back(runs)
        except (FormatError, OSError, ValueError) as e:
            raise self._hooks.translate(e) from e
        self._hooks.ops["given_back"] += before - lender.lent
        return before - lender.lent


__all__ = ["Adoption", "FileRange", "Lending", "LentRun"]
