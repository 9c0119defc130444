"""The bridge's side of a graceful shutdown: streams still open at the drain deadline end in-band.

uvicorn, on SIGTERM, stops accepting and waits ``timeout_graceful_shutdown`` for open responses,
then cancels them: a stream cut that way just stops, and the client cannot tell it from a network
fault. So the CLI arms a :class:`Drain` when uvicorn starts shutting down; at ``--drain-seconds``
every open stream is told to stop and sends an error chunk and ``data: [DONE]``, and uvicorn's own
timeout comes :data:`GRACE_SECONDS` later, for those last writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

GRACE_SECONDS = 2.0


class Drain:
    """The drain deadline; streams register a ``stop`` callback that runs when it passes."""

    def __init__(self) -> None:
        self.expired = False
        self._stops: set[Callable[[], None]] = set()

    def start(self, seconds: float) -> None:
        """Shutdown began: run every stop callback ``seconds`` from now (on the running loop)."""
        asyncio.get_running_loop().call_later(seconds, self._expire)

    def _expire(self) -> None:
        self.expired = True
        for stop in list(self._stops):
            stop()

    def add(self, stop: Callable[[], None]) -> None:
        """Call ``stop`` at the deadline (at once if it has passed), unless discarded before."""
        if self.expired:
            stop()
        self._stops.add(stop)

    def discard(self, stop: Callable[[], None]) -> None:
        self._stops.discard(stop)
