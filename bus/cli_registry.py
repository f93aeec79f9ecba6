"""Admin commands that talk to a running lamabus over its request/reply API."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import anyio
import msgspec

from bus.config import Settings


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=True) + "\n")


async def _call(settings: Settings, endpoint: str, payload: Any = None, timeout: float = 30.0) -> Any:
    from bus.cli import client_url
    from bus.client import LamabusClient

    async with LamabusClient.connect(client_url(settings), prefix=settings.prefix) as client:
        return await client.request(endpoint, payload, timeout=timeout)


def _diagnostics(args: argparse.Namespace, settings: Settings) -> int:
    _print_json(anyio.run(_call, settings, "diagnostics"))
    return 0


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
             common: Callable[[argparse.ArgumentParser], None]) -> None:
    diag = sub.add_parser("diagnostics", help="what the running service holds and how it is doing (JSON)")
    common(diag)
    diag.set_defaults(run=_diagnostics)
