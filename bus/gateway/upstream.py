"""The gateway's side of the bus: a thin client of ``<prefix>.api.*`` and nothing else.

It holds one ``llm`` handle per model (``llm.initialize`` through the queue group, so any
node of a cluster may take it), streams with ``llm.generate_stream`` on the node that
holds the handle (``<prefix>.api.node.<nodeId>.*``: the handle names it), and cancels
with ``llm.cancel`` there. While a stream runs it asks that node every
:data:`NODE_WATCH_INTERVAL` whether it still answers (``models.list`` on its own
subjects): a node that is gone (no responders, or :data:`NODE_WATCH_MISSES` unanswered
asks) ends the stream with ``not_found`` naming the node, so a client never waits on a
dead node. A stream that fails that way before its first token is tried once more on a
fresh handle, which lands on a live node.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from typing import Any, AsyncIterator

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from bus.client import LamabusClient, raise_for_error
from wire.api import (
    ChatTurnIn,
    LlmCancel,
    LlmFailed,
    LlmGenerateStream,
    LlmHandle,
    LlmInitialize,
    LlmRelease,
    LlmResult,
    LlmToken,
    ModelListReply,
    ModelRemove,
    ModelReply,
    ModelsList,
)
from wire.decoding import decode_untrusted
from wire.errors import ErrorCode, LamaError
from wire.messages import encode
from wire.params import GenerationParams

log = logging.getLogger("lamabus.openai")

NODE_WATCH_INTERVAL = 1.0
"""Seconds between two asks of whether the node generating a stream still answers."""
NODE_WATCH_MISSES = 3
"""Unanswered asks in a row after which that node counts as gone (a machine that vanished without a FIN)."""
GENERATE_TIMEOUT = 900.0
"""Seconds one generation may take in all (the bus request's own timeout)."""
INITIALIZE_TIMEOUT = 300.0
"""Seconds a model load may take (``llm.initialize`` of a model not loaded yet)."""
CALL_TIMEOUT = 30.0

StreamItem = LlmToken | LlmResult | LlmFailed
_stream_decoder = msgspec.json.Decoder(StreamItem)
_result_decoder = msgspec.json.Decoder(LlmResult)


class Generation(msgspec.Struct):
    """One generation asked for: what to run, and the id it runs under (``llm.cancel``'s ``requestId``)."""

    request_id: str
    model_id: str
    params: GenerationParams
    messages: list[ChatTurnIn] | None = None
    prompt: str | None = None
    author_id: str | None = None  # whom the service's per-author quotas count it against


class Upstream:
    """``async with Upstream(nc, prefix) as up``: handles are released on exit."""

    def __init__(self, nc: Client, prefix: str = "lama") -> None:
        self.nc = nc
        self.client = LamabusClient(nc, prefix=prefix)
        self.subjects = self.client.subjects
        self._handles: dict[str, LlmHandle] = {}
        self._active: collections.Counter[str] = collections.Counter()  # model id -> generations running
        self._last_used: dict[str, float] = {}  # model id -> when its last generation ended (monotonic)
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> "Upstream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        handles, self._handles = list(self._handles.values()), {}
        for h in handles:
            try:
                await self.client.call(LlmRelease(handle=h.handle), timeout=5)
            except Exception as exc:  # the node may be gone; its handles went with it
                log.debug("could not release %s: %s", h.handle, exc)
        for task in list(self._background):
            await asyncio.wait({task}, timeout=5)

    # ------------------------------------------------------------------ registry

    async def models(self) -> ModelListReply:
        return await self._call(ModelsList())

    async def remove_model(self, model_id: str) -> ModelReply:
        reply = await self._call(ModelRemove(model_id=model_id), timeout=120)
        self._handles.pop(model_id, None)
        return reply

    async def active_model(self) -> str | None:
        """The registry's active model, which a request that names none gets."""
        return (await self.models()).active_model_id

    async def _call(self, request: Any, *, node: str | None = None, timeout: float = CALL_TIMEOUT) -> Any:
        try:
            return await self.client.call(request, node=node, timeout=timeout)
        except NoRespondersError:
            raise LamaError(ErrorCode.TIMEOUT, "no lamabus service answers on the bus") from None
        except NatsTimeoutError:
            raise LamaError(ErrorCode.TIMEOUT, f"lamabus did not answer within {timeout:g} s") from None

    # ------------------------------------------------------------------ handles

    async def handle(self, model_id: str) -> LlmHandle:
        """This gateway's handle on ``model_id`` (loading the model on some node the first time)."""
        if (h := self._handles.get(model_id)) is not None:
            return h
        lock = self._locks.setdefault(model_id, asyncio.Lock())
        async with lock:
            if (h := self._handles.get(model_id)) is None:
                h = await self._call(LlmInitialize(model_id=model_id), timeout=INITIALIZE_TIMEOUT)
                self._handles[model_id] = h
                log.info("model %s: handle on node %s", model_id, h.node or "-")
            return h

    async def release_idle(self, idle: float) -> list[str]:
        """Release the handles of models no generation used for ``idle`` seconds (their models may then be
        unloaded, as the service's ``keep_alive`` does for its own); returns their model ids."""
        now = time.monotonic()
        gone = [m for m in self._handles if not self._active[m] and now - self._last_used.get(m, now) >= idle]
        for model_id in gone:
            h = self._handles.pop(model_id)  # popped first: a request from now on makes a new handle
            try:
                await self.client.call(LlmRelease(handle=h.handle), timeout=10)
            except Exception as exc:  # its node may be gone, and the handle with it
                log.debug("could not release %s: %s", h.handle, exc)
            log.info("model %s: handle on node %s released after %g s idle", model_id, h.node or "-", idle)
        return gone

    async def keep_alive(self, idle: float) -> None:
        """Release idle handles every ``idle / 4`` seconds (at most every 30) until cancelled."""
        while True:
            await asyncio.sleep(min(30.0, idle / 4))
            await self.release_idle(idle)

    def forget(self, handle: LlmHandle) -> None:
        """Drop a handle whose node is gone (or that was released): the next request makes a new one."""
        if self._handles.get(handle.model_id or "") is handle:
            del self._handles[handle.model_id or ""]

    # ------------------------------------------------------------------ generation

    async def stream(self, gen: Generation) -> AsyncIterator[LlmToken | LlmResult]:
        """Tokens in order, then the :class:`LlmResult`; a failure raises :class:`LamaError`.

        Leaving the iteration early (the HTTP client went away) cancels the generation on its node."""
        self._active[gen.model_id] += 1  # before the handle is taken: release_idle leaves it alone
        try:
            async with contextlib.aclosing(self._attempts(gen)) as items:
                async for item in items:
                    yield item
        finally:
            self._active[gen.model_id] -= 1
            self._last_used[gen.model_id] = time.monotonic()

    async def _attempts(self, gen: Generation) -> AsyncIterator[LlmToken | LlmResult]:
        for attempt in (0, 1):
            handle = await self.handle(gen.model_id)
            yielded = False
            try:
                async with contextlib.aclosing(self._stream_on(handle, gen)) as items:
                    async for item in items:
                        yielded = True
                        yield item
                return
            except LamaError as exc:
                if _handle_gone(exc, handle):
                    self.forget(handle)
                    if not yielded and attempt == 0:
                        log.info("node of %s is gone; %s goes to another", handle.handle, gen.request_id)
                        continue
                raise

    async def _stream_on(self, h: LlmHandle, gen: Generation) -> AsyncIterator[LlmToken | LlmResult]:
        node = h.node or _node_of(h.handle)
        api = self.subjects.api if node is None else self.subjects.node_api(node)
        inbox = self.nc.new_inbox()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def on_chunk(msg: Msg) -> None:
            queue.put_nowait(("chunk", msg.data))

        # Subscribed before the request goes out on the same connection: the server sees the SUB first.
        sub = await self.nc.subscribe(inbox, cb=on_chunk)
        request = LlmGenerateStream(handle=h.handle, messages=gen.messages, prompt=gen.prompt, params=gen.params,
                                    request_id=gen.request_id, subject=inbox, author_id=gen.author_id)
        tasks = [asyncio.create_task(self._request(f"{api}.llm.generate_stream", request, queue))]
        if node is not None:
            tasks.append(asyncio.create_task(self._watch(node, queue)))
        finished = False
        try:
            expected = 0
            replied: LlmResult | None = None
            while True:
                if replied is not None:
                    # The reply came; the result published before it is on its way through the inbox.
                    try:
                        kind, value = await asyncio.wait_for(queue.get(), timeout=5)
                    except TimeoutError:
                        finished = True
                        yield replied
                        return
                else:
                    kind, value = await queue.get()
                if kind == "chunk":
                    item = decode_untrusted(_stream_decoder, value)
                    if isinstance(item, LlmToken):
                        if item.request_id != gen.request_id:
                            continue
                        if item.seq != expected:
                            raise LamaError(ErrorCode.INTERNAL, f"chunk {item.seq} of {gen.request_id} came "
                                            f"when {expected} was due")
                        expected += 1
                        yield item
                    elif isinstance(item, LlmResult):
                        finished = True
                        yield item
                        return
                    else:
                        finished = True
                        raise LamaError.from_body(item.error)
                elif kind == "reply":
                    replied = value
                elif kind == "error":
                    finished = True
                    raise value
        finally:
            for task in tasks:
                task.cancel()
            if not finished:
                # The consumer left early: stop the generation there. Its own task, so that the caller's
                # cancellation cannot cut the cancel short.
                self._spawn(self._cancel(node, gen.request_id))
            self._spawn(sub.unsubscribe())

    async def _request(self, subject: str, request: LlmGenerateStream, queue: asyncio.Queue[tuple[str, Any]]) -> None:
        try:
            msg = await self.nc.request(subject, encode(request), timeout=GENERATE_TIMEOUT)
            raise_for_error(msg)
            queue.put_nowait(("reply", decode_untrusted(_result_decoder, msg.data)))
        except asyncio.CancelledError:
            raise
        except LamaError as exc:
            queue.put_nowait(("error", exc))
        except NoRespondersError:
            node = subject.split(".llm.")[0].rsplit(".", 1)[-1] if ".node." in subject else None
            queue.put_nowait(("error", LamaError(ErrorCode.NOT_FOUND, f"node {node} is not serving", node=node)
                              if node else LamaError(ErrorCode.TIMEOUT, "no lamabus service answers on the bus")))
        except NatsTimeoutError:
            queue.put_nowait(("error", LamaError(ErrorCode.TIMEOUT, f"no result within {GENERATE_TIMEOUT:g} s")))
        except Exception as exc:  # the connection closed under us, ...: the stream must end, not hang
            queue.put_nowait(("error", LamaError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")))

    async def _watch(self, node: str, queue: asyncio.Queue[tuple[str, Any]]) -> None:
        missed = 0
        while True:
            await asyncio.sleep(NODE_WATCH_INTERVAL)
            try:
                await self.client.call(ModelsList(), node=node, timeout=NODE_WATCH_INTERVAL * 2)
                missed = 0
            except LamaError as exc:
                if exc.code is ErrorCode.NOT_FOUND and exc.details.get("node") == node:
                    break
                missed = 0  # it answered, with an error: it is there
            except (NatsTimeoutError, TimeoutError):
                missed += 1
                if missed >= NODE_WATCH_MISSES:
                    break
            except asyncio.CancelledError:
                raise
            except Exception:  # our own connection is reconnecting: not the node's fault
                missed = 0
        queue.put_nowait(("error", LamaError(ErrorCode.NOT_FOUND, f"node {node} stopped while it generated; "
                                             "the generation is lost with it", node=node)))

    async def _cancel(self, node: str | None, request_id: str) -> None:
        try:
            await self.client.call(LlmCancel(request_id=request_id), node=node, timeout=5)
        except Exception as exc:  # finished meanwhile (not_found), or the node is gone: nothing to stop
            log.debug("cancel of %s: %s", request_id, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _handle_gone(exc: LamaError, h: LlmHandle) -> bool:
    """Whether ``exc`` says the handle is gone (its node stopped, or it was released)."""
    if exc.code is not ErrorCode.NOT_FOUND:
        return False
    return exc.details.get("node") is not None or exc.details.get("handle") == h.handle


def _node_of(handle: str) -> str | None:
    """The node a handle names (``<nodeId>:<opaque>``; docs/api.md), or None for a handle of a single node."""
    node, sep, _ = handle.partition(":")
    return node if sep and node else None


def new_request_id(kind: str) -> str:
    """``chatcmpl-<hex>`` / ``cmpl-<hex>``: the response id, and the generation's id on the bus."""
    return f"{kind}-{uuid.uuid4().hex}"

