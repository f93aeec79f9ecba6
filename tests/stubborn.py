"""A background loop whose cancels are lost: what nats-py (or 3.11's ``asyncio.wait_for``) can make of one, for
tests of a bounded stop (storage/tasks.py ``stop_task`` and the closes that use it)."""

from __future__ import annotations

import asyncio
from typing import Any


class SwallowsCancels:
    """``swallow_cancels`` runs until ``release`` is set, swallowing the first ``swallowed`` cancels (None: all);
    ``running`` is set once it runs, ``cancels`` counts the cancels it saw. Patch it in for a method: a bound
    method set on a class is not rebound, so it takes the instance's call as it comes."""

    def __init__(self, swallowed: int | None = None) -> None:
        self.swallowed = swallowed
        self.running = asyncio.Event()
        self.release = asyncio.Event()
        self.cancels = 0

    async def swallow_cancels(self, *args: Any, **kwargs: Any) -> None:
        self.running.set()
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancels += 1
                if self.swallowed is not None and self.cancels > self.swallowed:
                    raise
