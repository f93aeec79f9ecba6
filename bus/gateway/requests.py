"""OpenAI request bodies as msgspec Structs, and their mapping onto lamabus's wire (``llm.generate_stream``).

Decoding is strict the way OpenAI's own API is: an unknown field, a wrong type or a value out of
bounds is a 400 whose ``param`` is the field's path (``messages[1].role``, ``temperature``).
Fields OpenAI clients commonly send with their neutral value (``frequency_penalty: 0``,
``logprobs: false``, ``tools: []``, ``user``) are accepted; the same fields asking for
something lamabus does not do are refused by name rather than silently ignored.

What maps where (docs/openai.md has the table):

* ``messages`` -> ``messages`` (``developer`` is a ``system`` turn; text content parts are joined);
* ``max_completion_tokens`` / ``max_tokens`` -> ``params.maxTokens``; ``temperature``, ``top_p``,
  ``top_k`` (llama.cpp's extension), ``seed`` -> the same ``params``;
* ``stop`` -> ``params.stop``; absent: no stop sequence (OpenAI's meaning), not the seed's ``"\\n\\n"``;
* ``response_format`` ``json_object`` -> ``params.jsonSchema`` ``{"type": "object"}``, ``json_schema``
  -> its ``schema``; ``grammar`` (llama.cpp's extension) -> ``params.grammar``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from bus.gateway.errors import OpenAIError, bad_request, from_lama, unsupported
from wire.api import ChatTurnIn
from wire.decoding import decode_untrusted
from wire.errors import LamaError
from wire.params import Grammar, GenerationParams, MaxTokens, Seed, TopK

ModelName = Annotated[str, Meta(min_length=1, max_length=128)]
Text = Annotated[str, Meta(max_length=65536)]
StopWord = Annotated[str, Meta(min_length=1, max_length=64)]
Stop = StopWord | Annotated[list[StopWord], Meta(max_length=8)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]

#: top_p 0 means "only the most likely token"; lamabus's bound is > 0, and this is as good as 0.
_TOP_P_FLOOR = 1e-6


class _Body(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ContentPart(msgspec.Struct, frozen=True):
    """One part of a message's content. Only ``text`` parts are supported; others are refused by index."""

    type: str
    text: Text | None = None


class Message(_Body, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | Annotated[list[ContentPart], Meta(max_length=256)] | None = None
    name: Annotated[str, Meta(max_length=256)] | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None
    #: What a client sends back of an earlier reply's thinking (llama.cpp's field): dropped, as the
    #: model's template drops earlier thinking.
    reasoning_content: str | None = None


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class JsonSchemaFormat(_Body, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Body, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Body, kw_only=True):
    """What chat and text completions share."""

    model: ModelName | None = None
    """A model id of ``/v1/models``; absent: the registry's active model."""
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    grammar: Grammar | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None

    def _check_common(self) -> None:
        if self.n not in (None, 1):
            raise unsupported("n", "more than one choice (n > 1)")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise unsupported(name, "a non-zero penalty")
        if self.logit_bias:
            raise unsupported("logit_bias", "a logit bias")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _params(self, max_tokens: int | None, json_schema: dict[str, Any] | None) -> GenerationParams:
        if json_schema is not None and self.grammar is not None:
            raise bad_request("give response_format or grammar, not both", "grammar")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        top_p = None if self.top_p is None else max(self.top_p, _TOP_P_FLOOR)
        try:
            return GenerationParams(max_tokens=max_tokens, temperature=self.temperature, top_p=top_p, top_k=self.top_k,
                                    stop=stop, seed=self.seed, grammar=self.grammar, json_schema=json_schema)
        except ValueError as exc:  # GenerationParams' own check; the fields above are already in bounds
            raise bad_request(str(exc), None) from None


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1, max_length=4096)]
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None

    def check(self) -> None:
        self._check_common()
        if self.logprobs or self.top_logprobs:
            raise unsupported("logprobs", "log probabilities")
        if self.tools or self.functions:
            raise unsupported("tools" if self.tools else "functions", "tool calling")
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice", "a tool choice")
        if self.function_call not in (None, "none", "auto"):
            raise unsupported("function_call", "a function call")
        if self.modalities not in (None, ["text"]):
            raise unsupported("modalities", "output other than text")
        if self.store:
            raise unsupported("store", "storing completions")

    def turns(self) -> list[ChatTurnIn]:
        """The conversation as lamabus's chat turns."""
        turns = []
        for i, m in enumerate(self.messages):
            if m.role in ("tool", "function") or m.tool_calls or m.function_call is not None:
                field = "role" if m.role in ("tool", "function") else "tool_calls"
                raise unsupported(f"messages[{i}].{field}", "tool calling")
            role = "system" if m.role == "developer" else m.role
            turns.append(ChatTurnIn(role=role, content=_text_of(m.content, i)))  # type: ignore[arg-type]
        return turns

    def params(self) -> GenerationParams:
        json_schema: dict[str, Any] | None = None
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            json_schema = {"type": "object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise bad_request("response_format.json_schema is required when type is json_schema",
                                  "response_format.json_schema")
            # No schema: any JSON object, as OpenAI's own API treats it.
            json_schema = fmt.json_schema.schema if fmt.json_schema.schema is not None else {"type": "object"}
        elif fmt is not None and fmt.json_schema is not None:
            raise bad_request(f"response_format.json_schema is only allowed with type json_schema, not {fmt.type}",
                              "response_format.json_schema")
        return self._params(self.max_completion_tokens or self.max_tokens, json_schema)


class CompletionRequest(_Sampling, kw_only=True):
    prompt: Text | Annotated[list[Text], Meta(min_length=1, max_length=1)]
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None

    def check(self) -> None:
        self._check_common()
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "best_of > 1")
        if self.echo:
            raise unsupported("echo", "echoing the prompt")
        if self.suffix:
            raise unsupported("suffix", "a suffix (fill-in-the-middle)")
        if self.logprobs:
            raise unsupported("logprobs", "log probabilities")

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def params(self) -> GenerationParams:
        # OpenAI's default for /v1/completions is 16 tokens.
        return self._params(self.max_tokens or 16, None)


def _text_of(content: str | list[ContentPart] | None, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise unsupported(f"messages[{index}].content[{j}].type", f"content of type {part.type!r}")
        texts.append(part.text)
    if sum(len(t) for t in texts) > 65536:
        raise bad_request("message content is longer than 65536 characters", f"messages[{index}].content")
    return "\n".join(texts)


_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object", None)
    try:
        request = decode_untrusted(decoder, body)
    except LamaError as exc:
        raise from_lama(exc, wire=False) from None
    request.check()
    return request


def decode_chat(body: bytes) -> ChatCompletionRequest:
    """A chat completion request from any bytes: the request, or an :class:`OpenAIError` (400) naming the field."""
    return _decode(_chat_decoder, body)


def decode_completion(body: bytes) -> CompletionRequest:
    return _decode(_completion_decoder, body)


__all__ = ["ChatCompletionRequest", "CompletionRequest", "OpenAIError", "decode_chat", "decode_completion"]
