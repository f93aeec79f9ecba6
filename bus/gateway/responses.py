"""lamabus's replies (``llm.result``, ``llm.token``, ``models.list``) as OpenAI response objects.

``reasoning_content`` (llama.cpp's name) carries the thinking channel: whole in a message,
chunk by chunk in a stream's deltas. ``usage`` carries ``prompt_tokens_details.cached_tokens``
(prompt tokens the engine's KV cache already held). ``timings`` is llama-server's extension,
filled from lamabus's timing.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from wire.api import LlmResult, LlmToken
from wire.records import LLM

_encoder = msgspec.json.Encoder()

#: lamabus's finish reasons -> OpenAI's. A generation cancelled by someone else (``llm.cancel``) ended
#: without error: ``stop``.
_FINISH = {"stop": "stop", "stop_sequence": "stop", "length": "length", "cancelled": "stop"}


def finish_reason(result: LlmResult) -> str:
    return _FINISH.get(result.finish_reason, "stop")


def usage(result: LlmResult) -> dict[str, Any]:
    u = result.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def timings(result: LlmResult) -> dict[str, Any]:
    t = result.timing
    return {"predicted_n": result.tokens, "predicted_ms": t.elapsed_time, "predicted_per_second": t.tokens_per_second,
            "prompt_n": result.usage.prompt_tokens, "cache_n": result.usage.cached_tokens,
            "ttft_ms": t.time_to_first_token, "queue_ms": t.queue_time}


def now() -> int:
    return int(time.time())


def chat_completion(rid: str, model: str, created: int, result: LlmResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.text}
    if result.thinking:
        message["reasoning_content"] = result.thinking
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(result)}],
            "usage": usage(result), "timings": timings(result)}


def text_completion(rid: str, model: str, created: int, result: LlmResult) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish_reason(result)}],
            "usage": usage(result), "timings": timings(result)}


class ChunkWriter:
    """The ``data:`` payloads of one stream, chat (``chat.completion.chunk``) or text (``text_completion``)."""

    def __init__(self, rid: str, model: str, created: int, *, chat: bool, include_usage: bool) -> None:
        self.chat = chat
        self.include_usage = include_usage
        self._head: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                      "created": created, "model": model}
        # A token's chunk is the same JSON around its text each time: made once, the text spliced in (the
        # per-token cost of the gateway is most of what it adds to a stream).
        self._around: dict[str, tuple[bytes, bytes]] = {}
        for channel in ("content", "thinking"):
            marker = "\x00"
            if chat:
                key = "content" if channel == "content" else "reasoning_content"
                choice: dict[str, Any] = {"index": 0, "delta": {key: marker}, "logprobs": None, "finish_reason": None}
            else:
                choice = {"index": 0, "text": marker, "logprobs": None, "finish_reason": None}
            before, after = self._chunk(choice).rsplit(_encoder.encode(marker), 1)
            self._around[channel] = (before, after)

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        chunk = {**self._head, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None  # OpenAI's shape: null on every chunk but the last
        return _encoder.encode(chunk)

    def first(self) -> bytes | None:
        """The role-only opening delta OpenAI sends (chat only)."""
        if not self.chat:
            return None
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})

    def token(self, token: LlmToken) -> bytes:
        """One token's chunk. Text completions have no thinking field: a thinking token's text is left out."""
        if not self.chat and token.channel != "content":
            before, after = self._around["content"]
            return before + b'""' + after
        before, after = self._around[token.channel]
        return before + _encoder.encode(token.text) + after

    def last(self, result: LlmResult) -> list[bytes]:
        """The chunk with ``finish_reason``, then (with ``include_usage``) the usage chunk with no choices."""
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason(result)}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason(result)}
        out = [self._chunk(choice)]
        if self.include_usage:
            out.append(_encoder.encode({**self._head, "choices": [], "usage": usage(result),
                                        "timings": timings(result)}))
        return out


def model_object(m: LLM, *, loaded: bool, active: bool) -> dict[str, Any]:
    """One ``/v1/models`` entry; ``owned_by`` and the lamabus fields say what it is."""
    return {"id": m.id, "object": "model", "created": m.created // 1000, "owned_by": m.provider or "lamabus",
            "name": m.name, "active": active, "loaded": loaded,
            "meta": {"architecture": m.architecture, "quantization": m.quantization,
                     "context_length": m.context_length, "size": m.size, "parameter_count": m.parameter_count}}
