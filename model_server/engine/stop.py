"""Stop strings over streamed text: hold back what might still become a stop string."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feeds text pieces in; gives back what is safe to send and whether a stop string matched.

    Text that could be the beginning of a stop string is held back until the next piece decides
    it, so a stop string split over several tokens is found and never sent.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self._stops:
            return text
        if self.stopped:
            return ""
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return buf[: min(hits)]
        hold = self._held_suffix_len(buf)
        self._pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """At the end of generation, what was held back is plain text after all."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out

    def _held_suffix_len(self, buf: str) -> int:
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if stop.startswith(buf[len(buf) - k :]):
                    best = k
                    break
        return best
