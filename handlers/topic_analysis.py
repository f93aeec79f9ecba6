"""Topic analysis (issue 13 part 2): a title, keywords, a summary and the language of a topic,
asked of the topic's own model in the background.

When: after a topic's first reply, then again once ``every`` more replies are in (counted
from the last analysis, or from the last attempt when that failed: a failure waits for the
next ``every`` replies, it is never retried in a loop). Not at all when the service's
setting or the topic's own switch says so.

Priority: an analysis starts only once its model has had no user message accepted and
unfinished for ``idle_delay`` (the assistant tells the analyser as messages come and go,
through the :class:`handlers.assistant.Background` port), runs one at a time per model, and is
cancelled the moment a user message for that model is accepted: the engine drops it at
its next decode step, so the user's message finds the model as if it were idle. The
preempted analysis waits for the next idle moment. ``bench/bench_analysis.py`` measures
what a user's first token pays for it.

How: the conversation as the topic's model sees it (its system prompt and history, so
the engine reuses the topic's cached prompt) plus one instruction, under a JSON schema,
so the answer always parses; the answer is then checked against the limits the schema
cannot say (two sentences, distinct keywords). The result is recorded in the registry
(``record_analysis``: a ``topic.analysed`` registry event, so a rebuild reproduces it)
and published as ``topic.analysed`` on the topic's ``evt`` subject.
"""

from __future__ import annotations

import collections
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import anyio
import msgspec
from anyio.abc import TaskGroup

from engine.types import ChatTurn, GenerateRequest, GenerationResult, TokenChunk
from handlers.ports import ModelRef, Publisher, Runtime
from wire.errors import ErrorCode, LamaError
from wire.messages import TopicAnalysed
from wire.params import GenerationParams, SamplingParams
from wire.records import TopicAnalysis

log = logging.getLogger("lamabus.analysis")

TITLE_MAX = 60
KEYWORDS_MIN, KEYWORDS_MAX = 3, 7
KEYWORD_MAX = 40
SUMMARY_MAX = 300
#: BCP 47 as models write it: a language, then optionally a script and a region (``en``, ``zh-Hans-CN``).
LANGUAGE_PATTERN = r"^[a-z]{2,3}(-[A-Z][a-z]{3})?(-([A-Z]{2}|[0-9]{3}))?$"
_LANGUAGE_RE = re.compile(LANGUAGE_PATTERN)

#: The answer's shape; the engine turns it into a grammar, so whatever the model writes parses.
SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": TITLE_MAX},
        "keywords": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": KEYWORD_MAX},
                     "minItems": KEYWORDS_MIN, "maxItems": KEYWORDS_MAX},
        "summary": {"type": "string", "minLength": 1, "maxLength": SUMMARY_MAX},
        "language": {"type": "string", "pattern": LANGUAGE_PATTERN},
    },
    "required": ["title", "keywords", "summary", "language"],
    "additionalProperties": False,
}

INSTRUCTION = (
    "Describe the conversation above as JSON with these fields: \"title\" (a short title, at most "
    f"{TITLE_MAX} characters), \"keywords\" ({KEYWORDS_MIN} to {KEYWORDS_MAX} different keywords), "
    "\"summary\" (at most two sentences) and \"language\" (the conversation's language as a BCP 47 tag, "
    "such as en, fr or pt-BR)."
)

ANALYSIS_TEMPERATURE = 0.7

#: Outcomes counted per model (``lamabus_topic_analyses_total{outcome}``).
OUTCOMES = ("completed", "failed", "invalid", "preempted")


class AnalysisSettings(msgspec.Struct, frozen=True, kw_only=True):
    #: Replies between two analyses of a topic (the first comes after its first reply).
    every: int = 10
    #: Tokens the answer may take; the schema's limits keep a finished answer well under it.
    max_tokens: int = 400
    #: This node's name, on every topic.analysed.
    node_id: str | None = None
    #: Seconds a model must have been idle before an analysis starts on it.
    idle_delay: float = 1.0


class TopicState(NamedTuple):
    """What the analyser needs to know of a topic, read from the registry's view."""

    reply_count: int
    last_reply_id: str | None
    analysed_reply_count: int | None
    """``reply_count`` of the topic's latest analysis (None: never analysed)."""
    enabled: bool
    """The topic's own switch."""


class AnalysisStore(Protocol):
    """The registry, as the analyser uses it."""

    def topic_state(self, topic: str) -> TopicState | None: ...

    async def resolve_model(self, topic: str) -> ModelRef:
        """The topic's model (bound, else the active one)."""

    async def history(self, topic: str) -> Sequence[ChatTurn]:
        """The conversation, oldest first, as the assistant hands it to the engine."""

    async def record_analysis(self, topic: str, analysis: TopicAnalysis) -> TopicAnalysis | None:
        """Append the analysis to the topic's stream: the analysis as recorded (with the registry's time),
        or None when the topic has one as recent already or was switched off meanwhile."""


class InvalidAnalysis(ValueError):
    """The model's answer parsed but breaks a limit the schema cannot state."""


class _Answer(msgspec.Struct, frozen=True):
    title: str
    keywords: list[str]
    summary: str
    language: str


_answer_decoder = msgspec.json.Decoder(_Answer)
_SENTENCE_END = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s+")


def parse_answer(text: str) -> _Answer:
    """The model's JSON, held to the limits: a title of 1..60 characters, 3..7 distinct keywords,
    at most two sentences of summary (cut there), a BCP 47 language tag. ``InvalidAnalysis`` if not."""
    try:
        answer = _answer_decoder.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidAnalysis(f"the answer is not the schema's JSON: {exc}") from None
    title = " ".join(answer.title.split())
    if not 1 <= len(title) <= TITLE_MAX:
        raise InvalidAnalysis(f"title of {len(title)} characters")
    keywords: list[str] = []
    for k in answer.keywords:
        k = " ".join(k.split())
        if k and k.casefold() not in (seen.casefold() for seen in keywords):
            keywords.append(k)
    if not KEYWORDS_MIN <= len(keywords) <= KEYWORDS_MAX:
        raise InvalidAnalysis(f"{len(keywords)} distinct keywords ({answer.keywords!r})")
    summary = " ".join(_SENTENCE_END.split(" ".join(answer.summary.split()))[:2])
    if not summary:
        raise InvalidAnalysis("an empty summary")
    if not _LANGUAGE_RE.match(answer.language):
        raise InvalidAnalysis(f"language {answer.language!r} is not a BCP 47 tag")
    return _Answer(title=title, keywords=keywords, summary=summary, language=answer.language)


def is_due(state: TopicState, every: int, attempted: int | None) -> bool:
    """After the first reply; then once ``every`` replies came after the last analysis or attempt."""
    if not state.enabled or state.reply_count < 1 or state.last_reply_id is None:
        return False
    last = max(state.analysed_reply_count or 0, attempted or 0)
    if state.analysed_reply_count is None and attempted is None:
        return True
    return state.reply_count - last >= every


def analysis_request(topic: str, model: ModelRef, history: Sequence[ChatTurn], system_prompt: str,
                     max_tokens: int) -> GenerateRequest:
    """The conversation as the assistant sends it, plus the instruction, under the schema. The
    ``conversation`` is the topic's, so the engine finds the topic's prompt cached in its slot."""
    turns = (ChatTurn("system", model.system_prompt or system_prompt), *history, ChatTurn("user", INSTRUCTION))
    # Sampled, with a fixed seed: greedy decoding makes a small model repeat one keyword (the bundled
    # one: 3 of 5 test conversations usable greedy, 13 of 15 at 0.7), and the seed keeps it repeatable.
    sampling = SamplingParams.resolve(GenerationParams(json_schema=SCHEMA, temperature=ANALYSIS_TEMPERATURE,
                                                       seed=0, max_tokens=max_tokens))
    return GenerateRequest(request_id=f"analysis.{topic}.{uuid.uuid4().hex[:12]}", sampling=sampling,
                           messages=turns, conversation=topic)


class _Preempted(Exception):
    pass


class TopicAnalyser:
    """The assistant's :class:`~handlers.assistant.Background`: analyses topics while their models
    are idle. Use as an async context manager.

    ``on_outcome(model_id, outcome)``: told each analysis's end (metrics), ``outcome`` in :data:`OUTCOMES`.
    """

    def __init__(self, store: AnalysisStore, runtime: Runtime, publisher: Publisher,
                 settings: AnalysisSettings | None = None, *, system_prompt: str = "You are a helpful assistant.",
                 on_outcome: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.runtime = runtime
        self.publisher = publisher
        self.settings = settings or AnalysisSettings()
        self.system_prompt = system_prompt
        self.on_outcome = on_outcome or (lambda model_id, outcome: None)
        self.clock = clock
        self.counters: collections.Counter[str] = collections.Counter()
        self._demand: collections.Counter[str] = collections.Counter()  # user messages accepted, unfinished
        self._pending: dict[str, dict[str, None]] = {}  # model -> topics due, oldest first
        self._attempted: dict[str, int] = {}  # topic -> reply count of the last failed attempt
        self._running: dict[str, tuple[str, anyio.CancelScope]] = {}  # model -> (topic, its scope)
        self.idle = anyio.Event()  # set whenever nothing runs or waits (tests and the bench wait on it)
        self.idle.set()
        self.started = anyio.Event()  # set when an analysis starts generating; replaced after
        self.finished = anyio.Event()  # set when an analysis ends (any outcome); replaced after
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> "TopicAnalyser":
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> bool | None:
        tg, self._tg = self._tg, None
        if tg is None:
            return None
        tg.cancel_scope.cancel()
        return await tg.__aexit__(*exc_info)

    # -- the assistant's Background port ---------------------------------------

    def user_waiting(self, model_id: str) -> None:
        self._demand[model_id] += 1
        running = self._running.get(model_id)
        if running is not None:
            running[1].cancel()  # the engine drops it at its next step; it runs again when idle

    def user_done(self, model_id: str) -> None:
        self._demand[model_id] -= 1
        if self._demand[model_id] <= 0:
            del self._demand[model_id]
            self._kick(model_id)

    def replied(self, topic: str, model_id: str, reply_id: str) -> None:
        state = self.store.topic_state(topic)
        if state is None or not is_due(state, self.settings.every, self._attempted.get(topic)):
            return
        self._pending.setdefault(model_id, {})[topic] = None
        self.idle = anyio.Event() if self.idle.is_set() else self.idle
        self._kick(model_id)

    # -- scheduling ---------------------------------------------------------------

    def _kick(self, model_id: str) -> None:
        if self._tg is None or model_id in self._running or self._demand.get(model_id, 0) > 0:
            return
        if self._pending.get(model_id):
            self._running[model_id] = ("", anyio.CancelScope())  # taken, before the task starts
            self._tg.start_soon(self._drain, model_id)

    async def _drain(self, model_id: str) -> None:
        try:
            pending = self._pending.get(model_id, {})
            # Bounded: each turn takes one topic off; a preempted one goes back only while users wait,
            # which ends the loop.
            while pending and self._demand.get(model_id, 0) == 0:
                # The model must stay idle a moment first: in a stream of messages the gaps between two
                # are milliseconds long, and an analysis started there would only be cancelled again
                # (each start costs the next message a prompt evaluation step).
                quiet = anyio.CancelScope()
                self._running[model_id] = ("", quiet)
                with quiet:
                    await anyio.sleep(self.settings.idle_delay)
                if quiet.cancelled_caught or self._demand.get(model_id, 0) > 0:
                    # A user's message came (and may have gone again, while this task was not looking:
                    # the loop's condition decides, so that no idle moment is lost).
                    continue
                topic = next(iter(pending))
                del pending[topic]
                scope = anyio.CancelScope()
                self._running[model_id] = (topic, scope)
                outcome = await self._analyse(model_id, topic, scope)
                if outcome == "preempted":
                    pending[topic] = None
                if outcome is not None:
                    self.counters[outcome] += 1
                    self.on_outcome(model_id, outcome)
                    finished, self.finished = self.finished, anyio.Event()
                    finished.set()
            if not pending:
                self._pending.pop(model_id, None)
        finally:
            self._running.pop(model_id, None)
            if not self._running and not any(self._pending.values()):
                self.idle.set()

    async def _analyse(self, model_id: str, topic: str, scope: anyio.CancelScope) -> str | None:
        """One analysis; its outcome, or None when there was nothing to do (switched off, done elsewhere)."""
        state = self.store.topic_state(topic)
        if state is None or not is_due(state, self.settings.every, self._attempted.get(topic)):
            return None
        assert state.last_reply_id is not None
        result: GenerationResult | None = None
        try:
            with scope:
                model = await self.store.resolve_model(topic)
                if model.model_id != model_id and self._demand.get(model.model_id, 0) > 0:
                    # The topic's model is another one (the reply came from a model the message asked
                    # for), and that one is busy: it waits for that model's idle moment instead.
                    self._pending.setdefault(model.model_id, {})[topic] = None
                    return None
                history = await self.store.history(topic)
                request = analysis_request(topic, model, history, self.system_prompt, self.settings.max_tokens)
                result = await self._generate(model, request)
            if scope.cancelled_caught or result is None or result.cancelled:
                raise _Preempted
            answer = parse_answer(result.text)
        except _Preempted:
            return "preempted"
        except InvalidAnalysis as exc:
            self._attempted[topic] = state.reply_count
            log.warning("analysis of topic %s by %s was unusable (%s); next after %d more replies",
                        topic, model_id, exc, self.settings.every)
            return "invalid"
        except Exception as exc:  # LamaError from the engine, or a bug: counted, never retried in a loop
            self._attempted[topic] = state.reply_count
            if isinstance(exc, LamaError):
                log.warning("analysis of topic %s by %s failed: %s", topic, model_id, exc)
            else:
                log.exception("analysis of topic %s by %s failed", topic, model_id)
            return "failed"
        analysis = TopicAnalysis(title=answer.title, keywords=tuple(answer.keywords), summary=answer.summary,
                                 language=answer.language, based_on_message_id=state.last_reply_id,
                                 model_id=model.model_id, reply_count=state.reply_count,
                                 analysed_at=int(self.clock() * 1000))
        try:
            recorded = await self.store.record_analysis(topic, analysis)
            if recorded is not None:
                await self.publisher.event(analysed_event(topic, recorded, self.settings.node_id),
                                           dedup_id=f"{topic}.analysed.{recorded.based_on_message_id}")
        except Exception as exc:
            self._attempted[topic] = state.reply_count
            log.warning("analysis of topic %s could not be recorded or published: %s", topic, exc)
            return "failed"
        return "completed"

    async def _generate(self, model: ModelRef, request: GenerateRequest) -> GenerationResult | None:
        result: GenerationResult | None = None
        started = False
        async for item in self.runtime.generate_stream(model, request):
            if not started:
                started = True
                self.started.set()
                self.started = anyio.Event()
            if not isinstance(item, TokenChunk):
                result = item
        if result is None:
            raise LamaError(ErrorCode.INTERNAL, "the engine ended a stream without a result")
        return result

    def running(self) -> dict[str, str]:
        """model -> the topic being analysed now."""
        return {m: t for m, (t, _) in self._running.items() if t}

    def stats(self) -> dict[str, object]:
        return {"running": self.running(), "pending": {m: list(t) for m, t in self._pending.items() if t},
                "counters": dict(self.counters)}


def analysed_event(topic: str, analysis: TopicAnalysis, node_id: str | None = None) -> TopicAnalysed:
    return TopicAnalysed(topic=topic, based_on_message_id=analysis.based_on_message_id, model_id=analysis.model_id,
                         title=analysis.title, keywords=list(analysis.keywords), summary=analysis.summary,
                         language=analysis.language, reply_count=analysis.reply_count,
                         analysed_at=analysis.analysed_at, node_id=node_id)
