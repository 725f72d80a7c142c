"""Layer: cowd attach.  Which frontend ``cowd attach --via`` uses: each frontend's own probe
(``kmod_problem``, ``nbd_problem``, ``fuse_problem``) says why it cannot work here, and
:func:`choose_frontend` takes the first that can, in :data:`FRONTENDS` order.

Invariants: a probe changes nothing on the machine (the kmod probe may load cowd's own
module, as ``--via kmod`` would), and every refusal is one UsageError line.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import CommandFailed, UsageError
from ..frontends.fuse.mount import fuse_problem
from ..frontends.kmod.module import kmod_problem
from ..frontends.nbd.attach import nbd_problem

FRONTENDS = ("kmod", "nbd", "fuse")
_PROBLEMS: dict[str, Callable[[], str | None]] = {
    "kmod": kmod_problem, "nbd": nbd_problem, "fuse": fuse_problem}


def choose_frontend(via: str) -> tuple[str, str | None]:
    """The frontend to attach through and, for ``auto``, a note saying which it took and why
    the ones before it were unavailable.  An explicit choice that cannot work, or ``auto``
    with nothing usable, is a one-line UsageError."""
    if via != "auto":
        if via not in _PROBLEMS:
            raise UsageError(f"--via: expected auto, kmod, nbd or fuse (via={via!r})")
        problem = _PROBLEMS[via]()
        if problem is not None:
            raise CommandFailed(f"--via {via}: {problem}")
        return via, None
    reasons: list[str] = []
    for name in FRONTENDS:
        problem = _PROBLEMS[name]()
        if problem is None:
            why = f" ({'; '.join(reasons)})" if reasons else ""
            return name, f"--via auto: using {name}{why}"
        reasons.append(f"{name}: {problem}")
    raise CommandFailed("--via auto: no way to attach a disk on this machine ("
                     + "; ".join(reasons) + ")")


__all__ = [
    "FRONTENDS",
    "choose_frontend",
]
