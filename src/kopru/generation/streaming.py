"""Streaming text: token ids to text one token at a time (never splitting a character), and stop strings that
may span tokens."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Token ids in, text out, one token at a time, such that the pieces concatenate to the decoded whole.

    A byte-level BPE can split one character (Turkish "ş" is two UTF-8 bytes) across tokens: text is held back
    while its decoding ends in the replacement character. A few prompt tokens are decoded as left context, since
    SentencePiece-style tokenizers decode a leading word differently at the start of a text.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end is emitted as decoded)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and (final or not text.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""


class StopStringMatcher:
    """Accumulates text, cuts it at the first stop string (which may span tokens), and holds back only the tail
    that could still turn into one."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = list(stop)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.sent = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """-> (text safe to emit now, whether a stop string was found)"""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            return self._emit(len(self.text)), True
        hold = 0
        for size in range(min(self.longest - 1, len(self.text)), 0, -1):
            if any(s.startswith(self.text[-size:]) for s in self.stop):
                hold = size
                break
        return self._emit(len(self.text) - hold), False

    def finish(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return piece
