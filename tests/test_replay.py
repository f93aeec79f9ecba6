"""``lamabus replay`` / bus/replay/command.py against a real nats-server, with records written by hand."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timedelta, timezone

import anyio
import nats
import pytest

from bus.cli.main import main
from bus.node.intake import ensure_topics_stream
from bus.node.publisher import MSG_ID
from bus.replay.command import (
    AnalysedEntry,
    CancelledEntry,
    CompletedEntry,
    FailedEntry,
    MessageEntry,
    RejectedEntry,
    ReplyEntry,
    StartedEntry,
    UnreadableEntry,
    format_entry,
    parse_since,
    records,
    replay,
)
from bus.subjects import Subjects
from wire.errors import ErrorBody, ErrorCode, LamaError
from wire.messages import (
    ChatMessage,
    GenerationCancelled,
    GenerationCompleted,
    GenerationFailed,
    GenerationStarted,
    MessageRejected,
    Timing,
    TopicAnalysed,
    Usage,
    encode,
)

AI = "ai-person"
MODEL = "smollm2-135m-instruct"
S = Subjects()


def user_msg(mid: str, topic: str = "demo", text: str = "hello", reply_to: str | None = None,
             author: str = "alice") -> ChatMessage:
    return ChatMessage(id=mid, topic=topic, author_id=author, text=text, sent_at=datetime.now(timezone.utc),
                       reply_to=reply_to)


def ai_reply(rid: str, to: str, topic: str = "demo", text: str = "Hi there.") -> ChatMessage:
    return ChatMessage(id=rid, topic=topic, author_id=AI, text=text, sent_at=datetime.now(timezone.utc),
                       reply_to=to, model_id=MODEL)


def started(to: str, topic: str = "demo") -> GenerationStarted:
    return GenerationStarted(request_id=to, topic=topic, author_id=AI, model_id=MODEL)


def completed(rid: str, to: str, topic: str = "demo", text: str = "Hi there.") -> GenerationCompleted:
    return GenerationCompleted(
        request_id=to, message_id=rid, topic=topic, author_id=AI, model_id=MODEL, text=text, thinking="", tokens=3,
        finish_reason="stop",
        timing=Timing(start_time=1.0, end_time=41.0, elapsed_time=40.0, tokens_per_second=75.0,
                      time_to_first_token=12.5, queue_time=2.0),
        usage=Usage(prompt_tokens=20, completion_tokens=3, total_tokens=23, cached_tokens=8))


@pytest.fixture
async def js(nats_url):
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_topics_stream(js, S, duplicate_window=120)
    try:
        yield js
    finally:
        await nc.close()


async def put(js, obj, *, msg_id: str | None = None, topic: str = "demo") -> int:
    subject = S.msg(topic) if isinstance(obj, (ChatMessage, bytes)) else S.evt(topic)
    data = obj if isinstance(obj, bytes) else encode(obj)
    ack = await js.publish(subject, data, headers={MSG_ID: msg_id} if msg_id else None)
    return ack.seq


async def collect(js, topic: str = "demo", **kw) -> list:
    async with contextlib.aclosing(replay(js, topic, **kw)) as entries:
        return [e async for e in entries]


async def test_conversation_joins_replies_with_their_completion(js):
    await put(js, user_msg("m1", text="What is 2+2?"))
    await put(js, user_msg("o1", topic="other"), topic="other")  # another topic: not shown
    await put(js, started("m1"))
    await put(js, ai_reply("r1", "m1", text="4"))
    await put(js, completed("r1", "m1", text="4"))
    await put(js, user_msg("m2"))
    await put(js, GenerationFailed(request_id="m2", topic="demo",
                                   error=ErrorBody(ErrorCode.MODEL_NOT_FOUND, "model 'x' not found")))
    await put(js, user_msg("m3"))
    await put(js, GenerationCancelled(request_id="m3", topic="demo", author_id=AI, text="Partial", tokens=2))
    await put(js, b'{"type":"chat.message","id":"bad1","topic":"demo"}', topic="demo")
    await put(js, MessageRejected(topic="demo", error=ErrorBody(ErrorCode.BAD_REQUEST, "missing authorId"),
                                  message_id="bad1"))
    await put(js, TopicAnalysed(topic="demo", based_on_message_id="r1", model_id=MODEL, title="Small sums",
                                keywords=["math", "addition", "numbers"], summary="Alice asks what 2+2 is.",
                                language="en", reply_count=1, analysed_at=1))
    entries = await collect(js)
    kinds = [type(e) for e in entries]
    assert kinds == [MessageEntry, StartedEntry, ReplyEntry, MessageEntry, FailedEntry, MessageEntry, CancelledEntry,
                     UnreadableEntry, RejectedEntry, AnalysedEntry]
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    reply = entries[2]
    assert reply.message.id == "r1" and reply.reply_to == "m1" and reply.text == "4" and reply.model_id == MODEL
    assert reply.completed is not None and reply.completed.usage.cached_tokens == 8
    assert reply.seq == entries[1].seq + 1  # the reply sits where its chat.message is in the log
    assert entries[7].subject == "lama.topic.demo.msg" and "authorId" in entries[7].error
    text = "\n".join(filter(None, map(format_entry, entries)))
    assert "alice [m1]: What is 2+2?" in text
    assert f"AI {MODEL} [re m1]: 4" in text
    assert "75.0 tok/s" in text and "first token 12 ms" in text and "prompt 20 (cached 8), completion 3" in text
    assert "! failed [re m2]: model_not_found" in text
    assert "~ cancelled [re m3] after 2 tokens: 'Partial'" in text
    assert "! rejected message bad1: bad_request: missing authorId" in text
    assert "? unreadable record on lama.topic.demo.msg" in text
    assert ("= analysed after r1 (smollm2-135m-instruct, en): 'Small sums'; keywords math, addition, numbers; "
            "Alice asks what 2+2 is.") in text


async def test_republished_copies_are_shown_once_but_counted_as_records(js):
    await put(js, user_msg("m1"), msg_id="m1")
    await put(js, user_msg("m1"), msg_id="m1")  # dropped by the broker's duplicate window
    await put(js, ai_reply("r1", "m1"), msg_id="r1")
    await put(js, completed("r1", "m1"), msg_id="r1.completed")
    # Re-published after the window (no header here): stored again.
    await put(js, ai_reply("r1", "m1"))
    await put(js, completed("r1", "m1"))
    raw = [r async for r in records(js, "demo")]
    assert [type(r.event).__name__ for r in raw] == ["ChatMessage", "ChatMessage", "GenerationCompleted",
                                                     "ChatMessage", "GenerationCompleted"]
    entries = await collect(js)
    assert [type(e) for e in entries] == [MessageEntry, ReplyEntry]


async def test_start_positions_and_ends(js):
    s1 = await put(js, user_msg("m1"))
    await put(js, ai_reply("r1", "m1"))
    s3 = await put(js, completed("r1", "m1"))
    s4 = await put(js, user_msg("m2"))
    assert [e.seq for e in await collect(js, from_seq=s4)] == [s4]
    # Starting between a reply and its completion: the reply is rebuilt from the completion.
    (rebuilt, m2) = await collect(js, from_seq=s3)
    assert isinstance(rebuilt, ReplyEntry) and rebuilt.message is None and rebuilt.text == "Hi there."
    assert rebuilt.reply_id == "r1" and m2.message.id == "m2"
    assert await collect(js, from_seq=s4 + 1) == []
    assert [e.seq for e in await collect(js, since=datetime.now(timezone.utc) - timedelta(hours=1))][0] == s1
    assert await collect(js, since=datetime.now(timezone.utc) + timedelta(hours=1)) == []
    assert await collect(js, "empty-topic") == []


async def test_a_reply_without_completion_is_shown_when_the_log_ends(js):
    await put(js, user_msg("m1"))
    await put(js, started("m1"))
    await put(js, ai_reply("r1", "m1"))
    await put(js, user_msg("m2"))
    await put(js, user_msg("h1", reply_to="m1", author="bob"))  # a person replying: not held back
    entries = await collect(js)
    assert [type(e) for e in entries] == [MessageEntry, StartedEntry, ReplyEntry, MessageEntry, MessageEntry]
    assert entries[2].completed is None
    assert "no generation.completed" in format_entry(entries[2])


async def test_bad_requests(js, nats_url):
    with pytest.raises(LamaError) as info:
        await collect(js, "has.dot")
    assert info.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(LamaError) as info:
        await collect(js, from_seq=0)
    assert info.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(LamaError) as info:
        await collect(js, prefix="nobody")
    assert info.value.code == ErrorCode.NOT_FOUND and "LAMA_TOPICS_NOBODY" in info.value.message


async def test_follow_holds_a_reply_until_its_completion_then_keeps_going(js):
    await put(js, user_msg("m1"))
    got: list = []
    async with contextlib.aclosing(replay(js, "demo", follow=True, settle=0.2)) as entries:
        it = aiter(entries)
        with anyio.fail_after(10):
            got.append(await anext(it))
            assert got[-1].message.id == "m1"
            await put(js, ai_reply("r1", "m1"))
            await put(js, user_msg("m2"))
            await put(js, completed("r1", "m1"))
            got.append(await anext(it))
            got.append(await anext(it))
            assert isinstance(got[1], ReplyEntry) and got[1].completed is not None
            assert got[2].message.id == "m2"
            # No completion for a while: the reply is shown without it, and a late one after it.
            await put(js, started("m3"))
            await put(js, ai_reply("r3", "m3"))
            got.append(await anext(it))
            got.append(await anext(it))
            assert isinstance(got[3], StartedEntry)
            assert isinstance(got[4], ReplyEntry) and got[4].completed is None
            await put(js, completed("r3", "m3"))
            late = await anext(it)
            assert isinstance(late, CompletedEntry) and late.event.message_id == "r3"
    # The ephemeral consumer is gone with the reader; the service's durable one was never touched.
    names = [c.name async for c in _consumers(js)]
    assert names == []


async def _consumers(js):
    for info in await js.consumers_info(S.stream_name):
        yield info


@pytest.mark.slow
async def test_follow_survives_a_broker_restart(js, nats_server):
    await put(js, user_msg("m1"))
    async with contextlib.aclosing(replay(js, "demo", follow=True, settle=0.3)) as entries:
        it = aiter(entries)
        with anyio.fail_after(30):
            assert (await anext(it)).message.id == "m1"
            await nats_server.kill()
            await nats_server.start()  # the same port and store
            await put(js, user_msg("m2"))
            assert (await anext(it)).message.id == "m2"


def test_parse_since():
    now = datetime(2026, 1, 31, 12, 0, tzinfo=timezone.utc)
    assert parse_since("15m", now=now) == now - timedelta(minutes=15)
    assert parse_since("2h", now=now) == now - timedelta(hours=2)
    assert parse_since("1.5d", now=now) == now - timedelta(hours=36)
    assert parse_since("2026-01-31T10:00:00Z") == datetime(2026, 1, 31, 10, tzinfo=timezone.utc)
    assert parse_since("2026-01-31T10:00:00+02:00") == datetime(2026, 1, 31, 8, tzinfo=timezone.utc)
    with pytest.raises(LamaError) as info:
        parse_since("yesterday")
    assert info.value.code == ErrorCode.BAD_REQUEST


async def test_cli_prints_json_lines_and_text(js, nats_url, capsys):
    await put(js, user_msg("m1", text="Hi"))
    await put(js, ai_reply("r1", "m1", text="Hello!"))
    await put(js, completed("r1", "m1", text="Hello!"))
    rc = await anyio.to_thread.run_sync(main, ["replay", "demo", "--nats-url", nats_url, "--json"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    rows = [json.loads(line) for line in out]
    assert [r["kind"] for r in rows] == ["message", "reply"]
    assert rows[1]["message"]["replyTo"] == "m1" and rows[1]["completed"]["usage"]["promptTokens"] == 20
    assert rows[1]["completed"]["timing"]["tokensPerSecond"] == 75.0
    rc = await anyio.to_thread.run_sync(main, ["replay", "demo", "--nats-url", nats_url, "--from-seq", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "alice" not in out and f"AI {MODEL} [re m1]: Hello!" in out
    rc = await anyio.to_thread.run_sync(main, ["replay", "demo", "--nats-url", nats_url, "--since", "never"])
    assert rc == 1 and "error [bad_request]" in capsys.readouterr().err
