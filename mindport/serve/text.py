"""Token events to reply text: incremental detokenization, stop ids skipped, stop strings cut.

A reply's text is ``decode(prompt + reply ids)`` after ``decode(prompt)``
(:class:`mindport.tokenizer.StreamDecoder`, as ``mindport generate`` prints it); ids beyond the
tokenizer's vocabulary (a model vocabulary padded past it) have no text. A stop string ends
the reply before it: the text that could still become the start of a stop string is held back until
the next token settles it, so no piece of a stop string is ever sent.
"""
from __future__ import annotations

from typing import Sequence

from mindport.tokenizer import StreamDecoder, Tokenizer


class StopStrings:
    """Text pieces in, text pieces out, ending before the first occurrence of any stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.pending = ""  # received, not yet released: a suffix that may begin a stop string
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text that is final once ``piece`` arrived; sets ``stopped`` when a stop string completed."""
        if self.stopped:
            return ""
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            out, self.pending = self.pending[:min(found)], ""
            return out
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(self.pending) + 1))
                    if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        """What is held back, once the reply ended without completing a stop string."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class ReplyText:
    """The text deltas of a reply's token ids, arriving one at a time."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop_ids: Sequence[int],
                 stop_strings: Sequence[str]):
        self.decoder = StreamDecoder(tokenizer, prompt_ids)
        self.vocab_size = tokenizer.vocab_size
        self.stop_ids = set(stop_ids)
        self.stop_strings = StopStrings(stop_strings)

    @property
    def stopped(self) -> bool:
        """A stop string completed: the reply is over (the server cancels the request)."""
        return self.stop_strings.stopped

    def push(self, token: int) -> str:
        if self.stopped or token in self.stop_ids or token >= self.vocab_size:
            return ""  # a model vocabulary padded beyond the tokenizer's: those ids have no text
        return self.stop_strings.push(self.decoder.push(token))

    def flush(self) -> str:
        """The rest once the reply ended: held-back bytes of the last character and of a would-be stop string."""
        if self.stopped:
            return ""
        return self.stop_strings.push(self.decoder.flush()) + self.stop_strings.flush()
