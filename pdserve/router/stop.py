"""Stop strings over a growing text, and how much of the text is safe to stream.

The router owns stop strings (nodes only know stop token ids). Text is released to the client
only up to the longest suffix that could still be the start of a stop string, so a stop string
split across tokens never leaks: with stop "\\nUser:" and output "...\\nUs", the "\\nUs" is held back
until the next token shows whether it completes the stop string.
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.max_len = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, new_from: int) -> int | None:
        """Start of the earliest stop string in ``text`` that ends at or after ``new_from``."""
        if not self.stops:
            return None
        start = max(0, new_from - self.max_len + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def releasable(self, text: str) -> int:
        """How many leading characters of ``text`` cannot be part of a future stop string match."""
        held = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return len(text) - held
