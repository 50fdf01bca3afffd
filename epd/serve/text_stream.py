"""Tokens -> text as a client may see it: stop strings never shown, unfinished UTF-8 held back.

While streaming, the tail of the text that could still become a stop string (its longest suffix that
is a prefix of one) is held back; once the tokens rule it out it is released, and if a stop string
completes, the text ends right before it. Each token's logprob is released with the text it ends in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from epd.request import TokenLogprob

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes of an unfinished UTF-8 sequence


@dataclass
class Piece:
    text: str
    logprobs: list[tuple[TokenLogprob, int]] = field(default_factory=list)  # (logprob, text offset of its token)


class TextStream:
    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.logprobs: list[Optional[TokenLogprob]] = []
        self.ends: list[int] = []  # text length after each token
        self.text = ""
        self.sent = 0  # characters released
        self.sent_tokens = 0  # tokens whose logprobs were released
        self.stopped = False  # a stop string completed: nothing more is released

    def add(self, tokens: list[int], logprobs: Optional[list[TokenLogprob]] = None) -> Piece:
        """Take new tokens; returns what may be released now."""
        if self.stopped:
            return Piece("")
        for i, tok in enumerate(tokens):
            self.tokens.append(tok)
            self.logprobs.append(logprobs[i] if logprobs else None)
            self.text = self.tokenizer.decode(self.tokens)
            self.ends.append(len(self.text.rstrip(REPLACEMENT)))
        cut = self._stop_at()
        if cut is not None:
            self.stopped = True
            return self._release(cut, stop=True)
        stable = len(self.text.rstrip(REPLACEMENT))
        return self._release(stable - self._partial_stop(stable))

    def finish(self) -> Piece:
        """The request ended without a stop string: release everything, unfinished bytes too."""
        if self.stopped:
            return Piece("")
        return self._release(len(self.text), final=True)

    def _stop_at(self) -> Optional[int]:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop(self, end: int) -> int:
        """Length of the longest suffix of text[:end] that a stop string starts with (and is not)."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, end), best, -1):
                if self.text[end - k : end] == s[:k]:
                    best = k
                    break
        return best

    def _release(self, upto: int, final: bool = False, stop: bool = False) -> Piece:
        upto = max(upto, self.sent)
        piece = Piece(self.text[self.sent : upto])
        self.sent = upto
        n = len(self.tokens)
        while self.sent_tokens < n:
            i = self.sent_tokens
            start = self.ends[i - 1] if i else 0
            # a token goes out with the text it ends in; at a stop, the tokens that began before it
            if not (final or self.ends[i] <= upto or (stop and start < upto)):
                break
            if self.logprobs[i] is not None:
                piece.logprobs.append((self.logprobs[i], start))
            self.sent_tokens += 1
        return piece

    @property
    def output(self) -> str:
        return self.text[: self.sent]
