"""Chat templates and history fitting. Pure Python (jinja2), no llama.

The template comes from the GGUF metadata (``tokenizer.chat_template``) and is
rendered with jinja2 in a sandbox the way llama.cpp / transformers do
(``messages``, ``bos_token``, ``eos_token``, ``add_generation_prompt``,
``raise_exception``, ``strftime_now``). A model without a template, or with one
jinja2 cannot compile, falls back to ChatML.

:func:`fit_messages` makes a conversation fit a token budget: drop the oldest
non-system turns, then cut the middle out of the longest remaining turn.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from engine.types import ChatTurn
from wire.errors import ErrorCode, LamaError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRUNCATION_MARK = " … "


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.bos_token = bos_token
        self.eos_token = eos_token
        self.fallback_reason: str | None = None
        env = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        if not source:
            self.fallback_reason = "the model has no chat template; using ChatML"
            source = CHATML_TEMPLATE
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            self.fallback_reason = f"the model's chat template does not compile ({exc}); using ChatML"
            self._template = env.from_string(CHATML_TEMPLATE)
        self.source = source if self.fallback_reason is None else CHATML_TEMPLATE

    def render(self, turns: Sequence[ChatTurn], *, add_generation_prompt: bool = True) -> str:
        import jinja2

        def raise_exception(message: str) -> None:
            raise LamaError(ErrorCode.BAD_REQUEST, f"chat template rejected the messages: {message}", field="messages")

        try:
            return self._template.render(
                messages=[{"role": t.role, "content": t.content} for t in turns],
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
                raise_exception=raise_exception,
                strftime_now=lambda fmt: datetime.now().strftime(fmt),
            )
        except LamaError:
            raise
        except jinja2.TemplateError as exc:
            raise LamaError(ErrorCode.BAD_REQUEST, f"chat template failed to render: {exc}", field="messages") from None

    def starts_in_thinking(self, prompt: str) -> bool:
        """Templates of reasoning models (e.g. DeepSeek-R1) open ``<think>`` in the generation prompt."""
        tail = prompt.rstrip()
        return tail.endswith("<think>")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class Fitted:
    __slots__ = ("tokens", "text", "dropped_turns", "truncated")

    def __init__(self, tokens: list[int], text: str, dropped_turns: int, truncated: bool) -> None:
        self.tokens = tokens
        self.text = text
        self.dropped_turns = dropped_turns
        self.truncated = truncated


def fit_messages(
    turns: Sequence[ChatTurn],
    budget: int,
    *,
    render: Callable[[Sequence[ChatTurn]], str],
    tokenize: Callable[[str], list[int]],
    detokenize: Callable[[list[int]], str],
) -> Fitted:
    """Render ``turns`` into at most ``budget`` tokens.

    1. Drop the oldest non-system turns while more than one non-system turn remains.
    2. Cut the middle out of the longest remaining turn (head and tail kept) until it fits.
    3. If even an empty turn does not fit (the template alone is too long): context_overflow.
    """
    if not turns:
        raise LamaError(ErrorCode.BAD_REQUEST, "messages is empty", field="messages")
    turns = list(turns)
    dropped = 0
    text = render(turns)
    tokens = tokenize(text)
    while len(tokens) > budget:
        idx = next((i for i, t in enumerate(turns) if t.role != "system"), None)
        non_system = sum(1 for t in turns if t.role != "system")
        if idx is None or non_system <= 1:
            break
        del turns[idx]
        dropped += 1
        text = render(turns)
        tokens = tokenize(text)
    truncated = False
    for _ in range(8):  # tokenization at the cut may shift by a token or two; converge quickly
        if len(tokens) <= budget:
            return Fitted(tokens, text, dropped, truncated)
        over = len(tokens) - budget
        i = max(range(len(turns)), key=lambda k: len(turns[k].content))
        content_tokens = tokenize(turns[i].content)
        mark = len(tokenize(TRUNCATION_MARK))
        keep = len(content_tokens) - over - mark - 2
        if keep <= 0:
            if not content_tokens:
                break
            new_content = ""
        else:
            head = keep - keep // 2
            tail = keep // 2
            new_content = (
                detokenize(content_tokens[:head]) + TRUNCATION_MARK + (detokenize(content_tokens[-tail:]) if tail else "")
            )
        turns[i] = ChatTurn(turns[i].role, new_content)
        truncated = True
        text = render(turns)
        tokens = tokenize(text)
    if len(tokens) <= budget:
        return Fitted(tokens, text, dropped, truncated)
    raise LamaError(
        ErrorCode.CONTEXT_OVERFLOW,
        f"the prompt needs {len(tokens)} tokens even after dropping and truncating turns; "
        f"only {budget} fit (context size minus maxTokens)",
        prompt_tokens=len(tokens),
        budget=budget,
    )
