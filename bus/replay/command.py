"""``lamabus replay``: a topic's conversation, read back from the JetStream log.

Three parts, one module each: bus/replay/reader.py reads the topic's stored
records with an ephemeral consumer (:func:`records`); bus/replay/fold.py turns
them into typed entries, joining each AI reply with its ``generation.completed``
and showing re-published copies once (pure); bus/replay/format.py prints them.
:func:`replay` here puts the reader and the fold together:

    async with contextlib.aclosing(replay(js, "demo")) as entries:
        async for entry in entries:
            print(format_entry(entry))

The CLI command (``lamabus replay <topic> [--from-seq N | --since TIME]
[--follow] [--json]``) is registered by :func:`register`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from datetime import datetime
from typing import AsyncIterator, Callable, Iterable

import anyio
from nats.js import JetStreamContext

from bus.config import Settings
from bus.replay.fold import (
    AnalysedEntry,
    CancelledEntry,
    CompletedEntry,
    Conversation,
    Entry,
    FailedEntry,
    MessageEntry,
    RejectedEntry,
    ReplyEntry,
    StartedEntry,
    UnreadableEntry,
)
from bus.replay.format import entry_json, format_entry, parse_since
from bus.replay.reader import Idle, Record, read, records
from wire.errors import ErrorCode, LamaError

# The names callers (the CLI, the tests, the soak) import from here.
__all__ = ["AnalysedEntry", "CancelledEntry", "CompletedEntry", "Entry", "FailedEntry", "MessageEntry", "Record",
           "RejectedEntry", "ReplyEntry", "StartedEntry", "UnreadableEntry", "entry_json", "format_entry", "parse_since", "records",
           "register", "replay"]


async def replay(js: JetStreamContext, topic: str, *, prefix: str = "lama", from_seq: int | None = None,
                 since: datetime | None = None, follow: bool = False, settle: float = 1.0) -> AsyncIterator[Entry]:
    """The conversation in ``topic`` as typed entries, in stream order.

    ``from_seq`` / ``since``: where to start (default: the beginning of the log).
    ``follow``: keep going as new records arrive (until cancelled or closed).
    ``settle``: seconds a following read waits for a reply's completion before
    showing the reply without it.
    """
    conversation = Conversation(topic)
    async with contextlib.aclosing(read(js, topic, prefix=prefix, from_seq=from_seq, since=since, follow=follow,
                                        idle=settle)) as items:
        async for item in items:
            for entry in conversation.flush() if isinstance(item, Idle) else conversation.take(item):
                yield entry
    for entry in conversation.flush():
        yield entry


# -- the CLI ----------------------------------------------------------------------


def _write(lines: Iterable[str]) -> None:
    for line in lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _replay_main(args: argparse.Namespace, settings: Settings, since: datetime | None) -> int:
    from bus.auth.embedded import client_login
    from bus.broker.connection import connect, redact_url

    url, credentials = client_login(settings)
    prefix = settings.prefix
    try:
        nc = await connect(url, name="lamabus-replay", reconnect_forever=args.follow, credentials=credentials)
    except LamaError:
        raise
    except Exception as exc:
        raise LamaError(ErrorCode.TIMEOUT, f"cannot reach NATS at {redact_url(url)}: "
                        f"{exc or type(exc).__name__}") from None
    try:
        async with contextlib.aclosing(replay(nc.jetstream(), args.topic, prefix=prefix, from_seq=args.from_seq,
                                              since=since, follow=args.follow)) as entries:
            async for entry in entries:
                line = entry_json(entry) if args.json else format_entry(entry)
                if line is not None:
                    _write([line])
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()
    return 0


def _run(args: argparse.Namespace, settings: Settings) -> int:

    since = parse_since(args.since) if args.since else None
    try:
        return anyio.run(_replay_main, args, settings, since)
    except BrokenPipeError:  # `lamabus replay demo | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's final flush
        return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
             common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = sub.add_parser(
        "replay", help="print a topic's conversation from the JetStream log",
        description="Print the conversation in TOPIC as JetStream stored it: messages, AI replies with model, "
                    "timing and token usage, failures, cancellations and rejections. Reads with an ephemeral "
                    "consumer; the service's own consumer is not touched.")
    common(parser)
    parser.add_argument("topic")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--from-seq", type=int, metavar="N", help="start at stream sequence N (the #N shown)")
    start.add_argument("--since", metavar="TIME",
                       help="start at a time: ISO 8601 (2026-01-31T12:00:00Z; no zone = local) or an age (15m, 2h, 3d)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new records as they come")
    parser.add_argument("--json", action="store_true", help="one JSON object per line (every entry, kind-tagged)")
    parser.set_defaults(run=_run)
