"""Stopping a background asyncio task within a bound, even one whose cancel was swallowed.

A cancel can be lost: Python 3.11's ``asyncio.wait_for`` returns the result of an inner future that completes
in the same loop step as the cancel instead of raising it, and nats-py waits with it (requests, connects) or
drops a ``CancelledError`` outright in places. A task whose loop looks at nothing but its cancel then runs on
for ever, and a ``task.cancel(); await task`` waits with it (CI hung 300 s on exactly that in
storage/jetstream.py). anyio's cancel scopes deliver a cancel again until the task leaves them; a task made
with ``asyncio.create_task`` has nothing like it, hence this. Here, rather than in bus/, because storage is
the lowest layer that needs it (bus/ uses it too).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Any

#: How often a task that runs on is cancelled again (seconds).
RECANCEL_INTERVAL = 0.25


async def stop_task(task: asyncio.Task[Any], *, timeout: float, what: str, log: logging.Logger) -> bool:
    """Cancel ``task`` and wait at most ``timeout`` seconds for it to end; True when it did.

    It is cancelled again every :data:`RECANCEL_INTERVAL` while it runs, so one swallowed cancel costs that
    long, not for ever. A task still running at the deadline is left behind, with a warning that names
    ``what`` and shows where it was. What it ended with, other than its cancel, is logged at debug level
    (and so retrieved: asyncio does not warn about it).
    """
    deadline = time.monotonic() + timeout
    while not task.done() and (left := deadline - time.monotonic()) > 0:
        task.cancel()
        await asyncio.wait({task}, timeout=min(RECANCEL_INTERVAL, left))
    if not task.done():
        where = io.StringIO()
        task.print_stack(file=where)
        log.warning("%s did not stop within %.0f s of its cancel; left behind. %s", what, timeout, where.getvalue())
        return False
    if not task.cancelled() and task.exception() is not None:
        log.debug("%s ended with %r", what, task.exception())
    return True
