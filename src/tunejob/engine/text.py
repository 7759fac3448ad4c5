"""An answer's text: where OpenAI's `stop` strings end it, and how much of it a stream may send.

A stop string ends the answer where it begins (the string itself is not part of the answer), at
the token that completes it: the token that does may carry text past it, which is dropped too.
A stream must never send text that a stop string later takes back, so it holds back the longest
tail that could still grow into one ("\\nUs" while "\\nUser:" is a stop string), and sends it once
the next token shows that it does not.
"""

from __future__ import annotations

import functools
import re


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def stopped(tokenizer, tokens: list[int], stops: tuple[str, ...]) -> bool:
    """Whether the last token completes a stop string. Only the tail is decoded: a stop string of
    L characters lies within the last 4L + 4 tokens (a character is 1 to 4 byte-level tokens), so a
    long answer costs the same per token as a short one."""
    if not stops:
        return False
    window = 4 * max(len(s) for s in stops) + 4
    return first_stop(tokenizer.decode(tokens[-window:], skip_special_tokens=True), stops) is not None


def visible_tokens(tokenizer, tokens: list[int], cut: int) -> int:
    """How many of `tokens` begin before character `cut` of their text (the ones that carry some of
    the answer, whose logprobs it reports). Decodes from the end: the stop string spans few tokens."""
    k = len(tokens)
    while k > 0 and len(tokenizer.decode(tokens[: k - 1], skip_special_tokens=True)) >= cut:
        k -= 1
    return k


class TextStream:
    """The text a stream sends for one answer's tokens, as they come.

    Decoding restarts after each newline (as transformers' TextStreamer does), so a long answer
    costs the same per token as a short one; the last characters before the restart are kept
    (`carry`) so that a stop string across a newline is still seen. Half a character is held back
    until its next token, except at the end: the streamed text must be the non-streamed content,
    which keeps a last, cut-off character as U+FFFD."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self.keep = max((len(s) - 1 for s in self.stops), default=0)
        self.start = 0  # the token the current segment's decoding starts from
        self.carry = ""  # the end of earlier segments, for stop strings across a newline
        self.sent = 0  # characters of carry + segment sent so far
        self.clear = 0  # tokens whose text is all sent (nothing held back): their logprobs can go

    def new_text(self, tokenizer, tokens: list[int], final: bool) -> str:
        segment = tokenizer.decode(tokens[self.start:], skip_special_tokens=True)
        if segment.endswith("\ufffd") and not final:
            return ""
        window = self.carry + segment
        cut = first_stop(window, self.stops)
        ready = cut if cut is not None else len(window) - (0 if final else held_back(window, self.stops))
        delta = window[self.sent:ready] if ready > self.sent else ""
        self.sent = max(self.sent, ready)
        if delta and cut is None and self.sent == len(window):  # every token so far shows some sent text
            self.clear = len(tokens)
        if window.endswith("\n") and cut is None:
            kept = window[len(window) - self.keep:] if self.keep else ""
            self.sent -= len(window) - len(kept)
            self.carry, self.start = kept, len(tokens)
        return delta


def token_bytes(tokenizer, token: int) -> bytes:
    """A token's own bytes, which OpenAI's logprobs report so that a character split across tokens
    can be put back together (its text alone would read U+FFFD). Byte-level BPE (GPT-2, Llama 3,
    SmolLM) spells each byte as one printable character; SentencePiece spells a fallback byte <0xE2>."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if piece is not None and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        return bytes([int(piece[3:5], 16)])
    decoder = type(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)).__name__
    if piece is not None and decoder == "ByteLevel" and token not in tokenizer.all_special_ids:
        table = _unicode_to_byte()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return tokenizer.decode([token]).encode()


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}
