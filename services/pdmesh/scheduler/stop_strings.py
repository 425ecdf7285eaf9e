"""Ends a stream before the first stop string, across chunk boundaries.

Text that could be the start of a stop string is held back until the next delta shows whether
it is; the client never sees any part of a stop string.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text safe to emit now; after a match, the text before it (and stopped becomes True)."""
        if not self.stop or self.stopped:
            return "" if self.stopped else delta
        text = self._held + delta
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """At the end of the stream: what was held back was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
