"""``lamabus replay``'s output: entries as text for people or JSON lines for scripts, and ``--since``."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import msgspec

from bus.replay.fold import (
    AnalysedEntry,
    CancelledEntry,
    CompletedEntry,
    Entry,
    FailedEntry,
    MessageEntry,
    RejectedEntry,
    ReplyEntry,
    StartedEntry,
    UnreadableEntry,
)
from wire.errors import ErrorCode, LamaError
from wire.messages import GenerationCompleted

_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``--since``: an ISO 8601 time (no zone: local time) or an age like ``90s``, ``15m``, ``2h``, ``3d``, ``1w``."""
    now = now or datetime.now(timezone.utc)
    if m := _AGE_RE.match(text):
        return now - timedelta(**{_AGE_UNITS[m.group(2)]: float(m.group(1))})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise LamaError(ErrorCode.BAD_REQUEST, f"--since {text!r}: expected an ISO 8601 time "
                        "(2026-01-31T12:00:00Z) or an age (90s, 15m, 2h, 3d, 1w)", field="since") from None
    return when.astimezone(timezone.utc)  # a naive time is local time


def _stamp(entry: Entry) -> str:
    return f"#{entry.seq} {entry.time.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S}Z"


def _indent(text: str, pad: str = "    ") -> str:
    return text.replace("\n", "\n" + pad)


def _stats(completed: GenerationCompleted) -> str:
    t, u = completed.timing, completed.usage
    return (f"{completed.finish_reason} | {completed.tokens} tokens, "
            f"{t.tokens_per_second:.1f} tok/s, first token {t.time_to_first_token:.0f} ms, "
            f"total {t.elapsed_time / 1000:.2f} s, queued {t.queue_time:.0f} ms | "
            f"prompt {u.prompt_tokens} (cached {u.cached_tokens}), completion {u.completion_tokens}, "
            f"total {u.total_tokens}")


def format_entry(entry: Entry) -> str | None:
    """One entry for people to read (``None``: not shown, e.g. ``generation.started``)."""
    head = _stamp(entry)
    match entry:
        case MessageEntry(message=m):
            re_ = f" re {m.reply_to}" if m.reply_to else ""
            return f"{head}  {m.author_id} [{m.id}{re_}]: {_indent(m.text)}"
        case ReplyEntry():
            lines = [f"{head}  AI {entry.model_id or '?'} [re {entry.reply_to}]: {_indent(entry.text)}"]
            if entry.completed is not None:
                if entry.completed.thinking:
                    lines.append(f"    (thinking: {_indent(entry.completed.thinking)})")
                lines.append(f"    {_stats(entry.completed)}")
            else:
                lines.append("    (no generation.completed in the log for this reply)")
            return "\n".join(lines)
        case CompletedEntry(event=c):
            return f"{head}  stats for the reply to {c.request_id}: {_stats(c)}"
        case StartedEntry():
            return None
        case FailedEntry(event=e):
            return f"{head}  ! failed [re {e.request_id}]: {e.error.code.value}: {e.error.message}"
        case CancelledEntry(event=e):
            return f"{head}  ~ cancelled [re {e.request_id}] after {e.tokens} tokens: {_indent(e.text)!r}"
        case RejectedEntry(event=e):
            which = f" message {e.message_id}" if e.message_id else ""
            return f"{head}  ! rejected{which}: {e.error.code.value}: {e.error.message}"
        case AnalysedEntry(event=a):
            return (f"{head}  = analysed after {a.based_on_message_id} ({a.model_id}, {a.language}): {a.title!r}; "
                    f"keywords {', '.join(a.keywords)}; {_indent(a.summary)}")
        case UnreadableEntry():
            return f"{head}  ? unreadable record on {entry.subject}: {entry.error}"
    return None


_entry_encoder = msgspec.json.Encoder()


def entry_json(entry: Entry) -> str:
    """One entry as one line of JSON (camelCase, ``kind`` says which)."""
    return _entry_encoder.encode(entry).decode()
