"""Incremental detokenization with stop strings.

A streamed token may end in the middle of a UTF-8 character, or in the middle of a stop string
that the next token completes; emitting it at once would show the client text that must later be
retracted. :class:`TextStream` therefore holds back (a) a trailing replacement character and (b)
any suffix that is a prefix of some stop string, and emits it once the ambiguity resolves.
Stop strings are matched here, on text, so every backend supports them.
"""

from __future__ import annotations

from collections.abc import Sequence

from lambdascale.serve.backend import TextCodec


class TextStream:
    """Turns generated token ids into text deltas; ``push`` reports when a stop string matched."""

    def __init__(self, codec: TextCodec, stops: Sequence[str] = (), min_tokens: int = 0) -> None:
        self._codec = codec
        self._stops = tuple(stops)
        self._min_tokens = min_tokens  # stop strings match only once this many tokens exist (vLLM's rule)
        self._longest = max((len(s) for s in self._stops), default=0)
        self.ids: list[int] = []
        self.text = ""
        self._sent = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that is now safe to send (possibly empty).

        After a stop string matched, :attr:`stopped` is True, :attr:`text` ends just before it and
        the caller must end the sequence.
        """
        self.ids.append(token_id)
        text = self._codec.decode(self.ids)
        if self._stops and len(self.ids) >= self._min_tokens:
            start = max(0, self._sent - self._longest)
            hits = [i for i in (text.find(s, start) for s in self._stops) if i >= 0]
            if hits:
                cut = min(hits)
                self.text = text[:cut]
                self.stopped = True
                delta = self.text[self._sent:] if cut >= self._sent else ""
                self._sent = max(self._sent, cut)
                return delta
        self.text = text
        safe = len(text)
        while safe > self._sent and text[safe - 1] == "\ufffd":
            safe -= 1
        for s in self._stops:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe = min(safe, len(text[:safe]) - k)
                    break
        safe = max(safe, self._sent)
        delta = text[self._sent:safe]
        self._sent = safe
        return delta

    def flush(self) -> str:
        """Text held back when the sequence ends without a stop string (it can no longer match)."""
        delta = self.text[self._sent:]
        self._sent = len(self.text)
        return delta
