"""Turn a stream of token bytes into text, honouring stop strings across token boundaries.

Text that could still be the start of a stop string is held back until it is either ruled out
(then emitted) or completed (then the stream ends and the stop string is never emitted).
Incomplete UTF-8 sequences are also held back until their last byte arrives.
"""

from __future__ import annotations

import codecs


class StopMatcher:
    def __init__(self, stops: list[str] | tuple[str, ...] = ()) -> None:
        self.stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text, once stopped

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; return the text now safe to emit ('' when all is held back).

        After a stop string is completed `stopped` is True and later feeds return ''.
        """
        if self.stopped:
            return ""
        self._held += self._decoder.decode(data)
        if not self.stops:
            out, self._held = self._held, ""
            return out
        found = self._first_stop(self._held)
        if found is not None:
            cut, self.matched = found
            self.stopped = True
            out, self._held = self._held[:cut], ""
            return out
        keep = self._partial_suffix(self._held)
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(out) :]
        return out

    def flush(self) -> str:
        """End of stream (not by a stop string): release everything still held."""
        if self.stopped:
            return ""
        out = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return out

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """Where the earliest stop string starts in `text`, and which one it is."""
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
