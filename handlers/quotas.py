"""Quotas, so that one author cannot hold the machine (issue 20, section 4).

Four limits, each an operator setting (bus/config.py, ``quota_*``; docs/operations.md, "Quotas"):

* ``max_tokens``: a cap on a request's ``maxTokens``. Policy ``clamp`` lowers a request above it to
  the cap; ``refuse`` answers ``max_tokens_exceeded``. Only what the author asked for is refused: a
  model's stored ``maxTokens`` above the cap (the operator's own setting) is clamped under either policy.
* ``prompt_chars``: a cap on what the author sends, in characters (Unicode code points, as Python's
  ``len``): a chat message's text, or the sum of an ``llm.generate`` request's message contents or its
  raw prompt. Characters, not tokens, because the check runs before any model is loaded. Above it:
  ``prompt_too_large``.
* ``messages_per_minute``: messages (chat messages and ``llm.generate`` requests together) an author
  may have accepted in any sliding 60 s window. Beyond it: ``rate_limited``, retryable, with
  ``retryAfterMs``, the exact wait until the window has room again.
* ``running_per_author``: an author's requests accepted and not yet settled (waiting in a topic or
  generating, or an ``llm.generate`` running). Beyond it: ``too_many_running``, retryable.

0 switches a limit off. Everything here is synchronous and reads one injected clock: a decision and
its bookkeeping happen in one call with no await between them, so on one event loop they are exact
however many tasks ask at once. Memory is bounded: an author is forgotten once idle (nothing running,
nothing in the window), and at most ``max_authors`` are kept (beyond that the least recently active
idle author is forgotten early, which only ever gives that author a fresh window).

Redelivery (the topic path): a message JetStream delivers again was, unless this process refused it,
accepted on an earlier delivery, possibly by a process that has since died. It is never refused on
a later delivery, and is counted in the window once. One this process refused is refused again with
the same broker de-duplication id, so its author sees the refusal once.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import msgspec

from wire.errors import ErrorCode, LamaError

Quota = Literal["max_tokens", "prompt", "rate", "running"]
Path = Literal["topic", "llm"]
QUOTAS: tuple[Quota, ...] = ("max_tokens", "prompt", "rate", "running")
PATHS: tuple[Path, ...] = ("topic", "llm")

#: Refusals remembered for a redelivery of the refused message (about 200 bytes each).
MAX_REFUSALS_REMEMBERED = 10_000


class QuotaSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The limits; 0 switches one off. The service's come from bus/config.py's ``quota_*`` settings,
    where their defaults live; here every limit is off unless given."""

    max_tokens: int = 0
    max_tokens_policy: Literal["clamp", "refuse"] = "clamp"
    prompt_chars: int = 0
    messages_per_minute: int = 0
    running_per_author: int = 0
    #: Authors tracked at once (bounded memory; see the module docstring).
    max_authors: int = 100_000
    #: The rate window in seconds (a minute; a setting only so that tests need not wait one).
    window: float = 60.0


class QuotaRefused(LamaError):
    """A refusal by a quota; ``dedup_id`` is the same for every delivery of one refused message."""

    def __init__(self, code: ErrorCode, message: str, *, quota: Quota, dedup_id: str, **details: object) -> None:
        super().__init__(code, message, **details)
        self.quota = quota
        self.dedup_id = dedup_id


@dataclass(eq=False, slots=True)
class _Author:
    #: (accepted at, request id) of the requests accepted in the window, oldest first.
    window: collections.deque[tuple[float, str]] = field(default_factory=collections.deque)
    running: int = 0
    last: float = 0.0


class Ticket:
    """One accepted request's place in its author's running count; ``release`` it once settled (idempotent)."""

    __slots__ = ("_quotas", "_author", "_key", "_released")

    def __init__(self, quotas: "Quotas", key: str, author: _Author | None) -> None:
        self._quotas = quotas
        self._key = key
        self._author = author
        self._released = author is None

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        assert self._author is not None
        self._quotas._release(self._key, self._author)


class Quotas:
    """The quota state of one service, shared by the topic assistant and the ``llm`` API."""

    def __init__(self, settings: QuotaSettings | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or QuotaSettings()
        self.clock = clock
        self._authors: collections.OrderedDict[str, _Author] = collections.OrderedDict()  # least recently active first
        self._refused: collections.OrderedDict[str, QuotaRefused] = collections.OrderedDict()
        self._serial = 0
        #: (path, quota) -> refusals; path -> requests whose maxTokens was lowered to the cap.
        self.refusals: collections.Counter[tuple[str, str]] = collections.Counter()
        self.clamped: collections.Counter[str] = collections.Counter()
        #: Authors forgotten early (``max_authors``) while their window still held requests.
        self.evicted = 0

    # ------------------------------------------------------------------ deciding

    def admit(self, author_id: str, request_id: str, *, prompt_chars: int, asked_max_tokens: int | None,
              path: Path, redelivered: bool = False) -> Ticket:
        """Admit one request, or raise :class:`QuotaRefused`. The returned ticket holds the author's
        running place until it is released. ``asked_max_tokens``: the request's own ``maxTokens``."""
        s = self.settings
        now = self.clock()
        if redelivered:
            earlier = self._refused.get(request_id)
            if earlier is not None:
                raise earlier  # refused before: the same event again, dropped by the broker as a copy
            # Accepted on an earlier delivery (maybe by a process that died since): admitted, counted once.
            author = self._author(author_id, now)
            if s.messages_per_minute:
                self._expire(author, now)
                if not any(rid == request_id for _, rid in author.window):
                    author.window.append((now, request_id))
            return self._take(author_id, author)
        if s.prompt_chars and prompt_chars > s.prompt_chars:
            raise self._refuse(path, "prompt", request_id, ErrorCode.PROMPT_TOO_LARGE,
                               f"the prompt has {prompt_chars} characters; this service takes at most {s.prompt_chars}",
                               chars=prompt_chars, limit=s.prompt_chars)
        if (s.max_tokens and s.max_tokens_policy == "refuse" and asked_max_tokens is not None
                and asked_max_tokens > s.max_tokens):
            raise self._refuse(path, "max_tokens", request_id, ErrorCode.MAX_TOKENS_EXCEEDED,
                               f"maxTokens {asked_max_tokens} is above this service's cap of {s.max_tokens}",
                               maxTokens=asked_max_tokens, limit=s.max_tokens, field="$.params.maxTokens")
        author = self._author(author_id, now)
        if s.messages_per_minute:
            self._expire(author, now)
            window = author.window
            if len(window) >= s.messages_per_minute:
                # Room comes when enough of the oldest have left the window for it to hold one more.
                leaving = window[len(window) - s.messages_per_minute][0]
                wait_ms = max(1, math.ceil((leaving + s.window - now) * 1000.0))
                raise self._refuse(path, "rate", request_id, ErrorCode.RATE_LIMITED,
                                   f"author {author_id!r} sent {len(window)} messages in the last "
                                   f"{s.window:g} s (at most {s.messages_per_minute}); try again in {wait_ms} ms",
                                   retryable=True, retryAfterMs=wait_ms, limit=s.messages_per_minute,
                                   windowMs=round(s.window * 1000))
        if s.running_per_author and author.running >= s.running_per_author:
            raise self._refuse(path, "running", request_id, ErrorCode.TOO_MANY_RUNNING,
                               f"author {author_id!r} has {author.running} requests waiting or running "
                               f"(at most {s.running_per_author}); try again when one has finished",
                               retryable=True, running=author.running, limit=s.running_per_author)
        if s.messages_per_minute:
            author.window.append((now, request_id))
        # Accepted now: a later redelivery of this id is this acceptance's, not an earlier refusal's.
        self._refused.pop(request_id, None)
        return self._take(author_id, author)

    def cap(self, max_tokens: int, path: Path) -> int:
        """``max_tokens`` as the cap allows (counted when it was lowered)."""
        cap = self.settings.max_tokens
        if cap and max_tokens > cap:
            self.clamped[path] += 1
            return cap
        return max_tokens

    # ------------------------------------------------------------------ bookkeeping

    def _refuse(self, path: Path, quota: Quota, request_id: str, code: ErrorCode, message: str,
                **details: object) -> QuotaRefused:
        self._serial += 1
        refusal = QuotaRefused(code, message, quota=quota, dedup_id=f"{request_id}.quota.{quota}.{self._serial}",
                               **details)
        self.refusals[(path, quota)] += 1
        if path == "topic":  # only a topic message comes again as a redelivery
            refused = self._refused
            refused[request_id] = refusal
            refused.move_to_end(request_id)
            while len(refused) > MAX_REFUSALS_REMEMBERED:
                refused.popitem(last=False)
        return refusal

    def _author(self, author_id: str, now: float) -> _Author:
        self._prune(now)
        author = self._authors.get(author_id)
        if author is None:
            author = self._authors[author_id] = _Author()
            self._bound(keep=author_id)
        else:
            self._authors.move_to_end(author_id)
        author.last = now
        return author

    def _take(self, author_id: str, author: _Author) -> Ticket:
        author.running += 1
        return Ticket(self, author_id, author)

    def _release(self, author_id: str, author: _Author) -> None:
        author.running -= 1
        now = self.clock()
        author.last = now
        if self._authors.get(author_id) is author:
            self._authors.move_to_end(author_id)

    def _expire(self, author: _Author, now: float) -> None:
        window, horizon = author.window, now - self.settings.window
        while window and window[0][0] <= horizon:
            window.popleft()

    def _idle(self, author: _Author, now: float) -> bool:
        if author.running:
            return False
        self._expire(author, now)
        return not author.window

    def _prune(self, now: float) -> None:
        """Forget idle authors from the least recently active end. Bounded work per call: an author
        still running there is moved to the other end, and the walk stops at the first one active
        within the window (every later one was active more recently)."""
        authors = self._authors
        for _ in range(16):
            if not authors:
                return
            key, author = next(iter(authors.items()))
            if self._idle(author, now):
                del authors[key]
            elif author.running:
                authors.move_to_end(key)
            else:
                return

    def _bound(self, keep: str) -> None:
        """At most ``max_authors``: forget the least recently active authors that run nothing (never ``keep``,
        the one being admitted). Only when every author kept runs something may there be more."""
        authors, limit = self._authors, self.settings.max_authors
        scanned = 0
        while len(authors) > limit and scanned < len(authors):
            key, author = next(iter(authors.items()))
            scanned += 1
            if author.running or key == keep:
                authors.move_to_end(key)  # its tickets still point at it; never forgotten while it runs
                continue
            if author.window:
                self.evicted += 1
            del authors[key]

    # ------------------------------------------------------------------ reading

    def running(self, author_id: str) -> int:
        author = self._authors.get(author_id)
        return author.running if author is not None else 0

    def stats(self) -> dict[str, object]:
        """What diagnostics and metrics read: the settings, authors tracked, refusals and clamps."""
        s = self.settings
        return {
            "settings": {"maxTokens": s.max_tokens, "maxTokensPolicy": s.max_tokens_policy,
                         "promptChars": s.prompt_chars, "messagesPerMinute": s.messages_per_minute,
                         "runningPerAuthor": s.running_per_author},
            "authors": len(self._authors),
            "running": sum(a.running for a in self._authors.values()),
            "refusals": {f"{p}.{q}": n for (p, q), n in sorted(self.refusals.items())},
            "clamped": dict(sorted(self.clamped.items())),
            "evicted": self.evicted,
        }
