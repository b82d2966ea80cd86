"""Incremental detokenization for streaming, and stop strings that may span tokens.

Byte-level BPE (ours, GPT-2's, SmolLM2's) can split one character's UTF-8 bytes over several
tokens, so decoding token by token would print U+FFFD halves. For byte-level tokenizers each token
is mapped once to its bytes, and a stream's bytes go through Python's incremental UTF-8 decoder,
which holds back an incomplete character until its last byte arrives (and replaces only bytes that
can never be valid). Other tokenizers (SentencePiece with byte fallback, ...) use the usual
offset method: decode a short window of recent tokens and emit what was added, holding back while
the window ends in U+FFFD.

`StopMatcher` finds stop strings in the growing text and holds back any tail that could still
become one, so streamed text never contains (a piece of) a stop string.
"""

from __future__ import annotations

import codecs
from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ printable-character table, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _is_byte_level(tokenizer) -> bool:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return False
    state = json.loads(decoder.__getstate__())
    kinds = (
        [d.get("type") for d in state.get("decoders", [])]
        if state.get("type") == "Sequence"
        else [state.get("type")]
    )
    return kinds == ["ByteLevel"]


class TokenBytes:
    """Each token id's bytes (b"" for special tokens), or None when the tokenizer is not byte-level."""

    def __init__(self, tokenizer):
        self.table: list[bytes] | None = None
        self.special: set[int] = set(tokenizer.all_special_ids)
        if not _is_byte_level(tokenizer):
            return
        inv = _byte_decoder()
        added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
        table: list[bytes] = []
        for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            if i in added:
                table.append(b"" if added[i].special else added[i].content.encode("utf-8"))
                if added[i].special:
                    self.special.add(i)
            elif tok is None:
                table.append(b"")
            else:
                try:
                    table.append(bytes(inv[c] for c in tok))
                except KeyError:
                    return  # a token outside the byte alphabet: not plain byte-level, use the fallback
        self.table = table


class IncrementalDetokenizer:
    """Text of a growing token stream, in pieces that never end inside a character."""

    def __init__(self, tokenizer, token_bytes: TokenBytes, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.table = token_bytes.table
        self.special = token_bytes.special
        self.skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._prefix = 0  # fallback: window start
        self._read = 0  # fallback: tokens whose text was emitted

    def push(self, token: int) -> str:
        """Add one token; return the text that is now complete (may be "")."""
        if self.table is not None:
            if 0 <= token < len(self.table):
                if token in self.special and not self.skip_special:
                    return self._utf8.decode(self._special_text(token).encode("utf-8"))
                return self._utf8.decode(self.table[token])
            return ""
        if self.skip_special and token in self.special:
            return ""
        self._ids.append(token)
        decode = self.tokenizer.decode
        opts = {"skip_special_tokens": self.skip_special, "clean_up_tokenization_spaces": False}
        before = decode(self._ids[self._prefix : self._read], **opts)
        after = decode(self._ids[self._prefix :], **opts)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is still held back at the end of the stream (an incomplete character becomes U+FFFD)."""
        if self.table is not None:
            return self._utf8.decode(b"", final=True)
        if self._read < len(self._ids):
            opts = {"skip_special_tokens": self.skip_special, "clean_up_tokenization_spaces": False}
            before = self.tokenizer.decode(self._ids[self._prefix : self._read], **opts)
            after = self.tokenizer.decode(self._ids[self._prefix :], **opts)
            self._read = len(self._ids)
            return after[len(before) :]
        return ""

    def _special_text(self, token: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(token) or ""


class StopMatcher:
    """Cut the text at the first stop string; hold back a tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)

    def find(self, text: str, new_from: int) -> tuple[int, str] | None:
        """(position, stop string) of the earliest stop string that ends after `new_from`."""
        if not self.stops:
            return None
        start = max(0, new_from - self.longest + 1)
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def safe_length(self, text: str) -> int:
        """How much of `text` can be emitted: all but a tail that is a proper prefix of a stop string."""
        if not self.stops:
            return len(text)
        for k in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return len(text) - k
        return len(text)
