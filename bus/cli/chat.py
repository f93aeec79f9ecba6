"""``lamabus chat``: type a line, watch the reply stream in."""

from __future__ import annotations

import argparse
import sys

import anyio

from bus.broker.connection import redact_url
from bus.client import LamabusClient
from bus.config import Settings
from wire.errors import LamaError
from wire.messages import GenerationCancelled, GenerationCompleted, GenerationStarted, GenerationToken
from wire.params import GenerationParams

_DIM, _RESET = "\033[2m", "\033[0m"


async def exchange(client: LamabusClient, args: argparse.Namespace, text: str) -> bool:
    params = None
    if args.max_tokens is not None or args.temperature is not None:
        params = GenerationParams(max_tokens=args.max_tokens, temperature=args.temperature)
    color = sys.stdout.isatty()
    out = sys.stdout
    try:
        async for item in client.ask(args.topic, text, author_id=args.author, model_id=args.model, params=params,
                                     timeout=args.timeout):
            if isinstance(item, GenerationStarted):
                if item.queue_position:
                    print(f"(queued: {item.queue_position} ahead)", file=sys.stderr)
            elif isinstance(item, GenerationToken):
                if item.channel == "thinking" and color:
                    out.write(f"{_DIM}{item.text}{_RESET}")
                else:
                    out.write(item.text)
                out.flush()
            elif isinstance(item, GenerationCompleted):
                out.write("\n")
                out.flush()
                t = item.timing
                print(f"[{item.model_id}: {item.tokens} tokens, {t.tokens_per_second:.1f} tok/s, "
                      f"first token {t.time_to_first_token:.0f} ms, {item.finish_reason}]", file=sys.stderr)
            elif isinstance(item, GenerationCancelled):
                print("\n[cancelled]", file=sys.stderr)
    except LamaError as exc:
        print(f"\nerror [{exc.code.value}]: {exc.message}", file=sys.stderr)
        return False
    return True


async def run_chat(args: argparse.Namespace, settings: Settings) -> int:
    """As the settings' login, else the local embedded broker's admin (bus/auth/embedded.py): posting in a
    topic is the chat role's, which admin includes."""
    url = settings.client_url()
    async with LamabusClient.for_settings(settings) as client:
        if args.once is not None:
            return 0 if await exchange(client, args, args.once) else 1
        print(f"chatting in {args.topic!r} on {redact_url(url)} (Ctrl-D to leave)", file=sys.stderr)
        while True:
            try:
                line = await anyio.to_thread.run_sync(input, "> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            if line.strip():
                await exchange(client, args, line)
