"""Layer: cowd disk.  The range lock over a top layer's granules.

A write that is not a pure in-place pwrite (an allocation, write-zeroes, trim) holds the
granules it touches for its whole duration, so a second writer to the same granule waits for
the first allocation instead of allocating twice.  Trio-thread only; ``hold`` awaits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class GranuleLocks:
    """Range lock over top-layer granule indices (a map of granule -> Event, cleaned up)."""

    def __init__(self) -> None:
        self._held: dict[int, trio.Event] = {}

    def any_held(self, first: int, end: int) -> bool:
        held = self._held
        if not held:
            return False
        return any(i in held for i in range(first, end))

    def __len__(self) -> int:
        return len(self._held)

    @asynccontextmanager
    async def hold(self, first: int, end: int) -> AsyncIterator[None]:
        held = self._held
        while True:
            busy = next((held[i] for i in range(first, end) if i in held), None) if held else None
            if busy is None:
                break
            await busy.wait()
        done = trio.Event()
        for i in range(first, end):
            held[i] = done
        try:
            yield
        finally:
            for i in range(first, end):
                del held[i]
            done.set()


__all__ = ["GranuleLocks"]
