"""Streaming text post-processing for generated tokens. Pure Python, no llama.

Generated token pieces are bytes; they pass through, in order:

1. an incremental UTF-8 decoder (a multi-byte character split across tokens is
   held until complete),
2. :class:`ThinkSplitter`: text inside ``<think>...</think>`` goes to the
   ``thinking`` channel, the rest to ``content``; a tag split across tokens is
   held back until it is known whether it is a tag,
3. :class:`StopMatcher` on the content channel only: text that could still be
   the start of a stop sequence is held back; a complete stop sequence ends the
   generation and neither it nor anything after it is emitted.

Invariant: the concatenation of everything emitted on a channel equals the
final text of that channel (:attr:`TextPipeline.content` / ``thinking``).
"""

from __future__ import annotations

import codecs
from typing import Literal

Channel = Literal["content", "thinking"]
Piece = tuple[Channel, str]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def _held_suffix(text: str, patterns: tuple[str, ...]) -> int:
    """Length of the longest proper suffix of ``text`` that is a prefix of some pattern."""
    best = 0
    for p in patterns:
        k = min(len(p) - 1, len(text))
        while k > best:
            if text.endswith(p[:k]):
                best = k
                break
            k -= 1
    return best


class ThinkSplitter:
    """Route text between ``<think>`` tags to ``thinking``; everything else to ``content``."""

    def __init__(self, *, start_in_thinking: bool = False) -> None:
        self.thinking = start_in_thinking
        self._held = ""
        self._strip_content = False  # drop whitespace right after </think>

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        buf = self._held + text
        while True:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            idx = buf.find(tag)
            if idx < 0:
                break
            self._emit(out, buf[:idx])
            buf = buf[idx + len(tag) :]
            self.thinking = not self.thinking
            if not self.thinking:
                self._strip_content = True
        hold = _held_suffix(buf, (THINK_CLOSE if self.thinking else THINK_OPEN,))
        self._held = buf[len(buf) - hold :] if hold else ""
        self._emit(out, buf[: len(buf) - hold])
        return out

    def flush(self) -> list[Piece]:
        out: list[Piece] = []
        self._emit(out, self._held)
        self._held = ""
        return out

    def _emit(self, out: list[Piece], text: str) -> None:
        if not text:
            return
        if self.thinking:
            out.append(("thinking", text))
            return
        if self._strip_content:
            text = text.lstrip()
            if not text:
                return
            self._strip_content = False
        out.append(("content", text))


class StopMatcher:
    """Find stop sequences in streamed text, holding back possible stop prefixes."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped: str | None = None

    def feed(self, text: str) -> str:
        """Return the text that is safe to emit; sets :attr:`stopped` on a match."""
        if self.stopped is not None:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        first = -1
        for s in self.stops:
            idx = buf.find(s)
            if idx >= 0 and (first < 0 or idx < first):
                first, self.stopped = idx, s
        if first >= 0:
            self._held = ""
            return buf[:first]
        hold = _held_suffix(buf, self.stops)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped is not None else held


class TextPipeline:
    """bytes pieces -> (channel, text) pieces, with stop detection on the content channel."""

    def __init__(self, stops: tuple[str, ...] | list[str] = (), *, start_in_thinking: bool = False) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._think = ThinkSplitter(start_in_thinking=start_in_thinking)
        self._stop = StopMatcher(stops)
        self._content: list[str] = []
        self._thinking: list[str] = []
        self._content_begun = False

    @property
    def stopped(self) -> str | None:
        """The stop sequence that ended the content, if any."""
        return self._stop.stopped

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def thinking(self) -> str:
        return "".join(self._thinking)

    @property
    def in_thinking(self) -> bool:
        return self._think.thinking

    def takes_grammar(self, piece: bytes) -> bool:
        """Whether a grammar on the reply's content judges the next generated token, ``piece``.

        A thinking block passes unconstrained: tokens inside one (its closing tag included)
        and, while the content has not begun, a token that opens one or whitespace after one
        (the content drops it). The first token judged begins the content; from then on every
        token is judged, so a content that begins like a tag is the grammar's to allow.
        """
        if self._think.thinking:
            return False
        if not self._content_begun:
            text = piece.decode("utf-8", errors="replace").lstrip()
            if text.startswith(THINK_OPEN) or (self._think._strip_content and not text):
                return False
            self._content_begun = True
        return True

    def feed(self, data: bytes) -> list[Piece]:
        return self._route(self._think.feed(self._utf8.decode(data)))

    def finish(self) -> list[Piece]:
        """Flush everything held back (an unfinished UTF-8 char, a partial tag or stop prefix)."""
        pieces = self._think.feed(self._utf8.decode(b"", final=True)) + self._think.flush()
        out = self._route(pieces)
        tail = self._stop.flush()
        if tail:
            self._content.append(tail)
            out.append(("content", tail))
        return out

    def _route(self, pieces: list[Piece]) -> list[Piece]:
        out: list[Piece] = []
        for channel, text in pieces:
            if channel == "thinking":
                if self._stop.stopped is None:
                    self._thinking.append(text)
                    out.append((channel, text))
                continue
            safe = self._stop.feed(text)
            if safe:
                self._content.append(safe)
                out.append(("content", safe))
        return out
