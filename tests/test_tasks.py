"""storage/tasks.py ``stop_task``: a bounded stop for an asyncio task, whatever the task does with its cancel."""

from __future__ import annotations

import asyncio
import logging

import anyio
import pytest

from storage import tasks
from storage.tasks import stop_task
from tests.stubborn import SwallowsCancels

log = logging.getLogger("tests.tasks")


async def test_a_task_that_takes_its_cancel_stops_at_once(caplog: pytest.LogCaptureFixture):
    loop = SwallowsCancels(swallowed=0)
    task = asyncio.create_task(loop.swallow_cancels())
    await loop.running.wait()
    with anyio.fail_after(10):
        assert await stop_task(task, timeout=5.0, what="a willing loop", log=log)
    assert task.cancelled() and loop.cancels == 1
    assert not [r for r in caplog.records if r.name == log.name]


async def test_a_swallowed_cancel_costs_one_recancel_interval_not_the_timeout(caplog: pytest.LogCaptureFixture):
    loop = SwallowsCancels(swallowed=2)
    task = asyncio.create_task(loop.swallow_cancels())
    await loop.running.wait()
    with anyio.fail_after(10):  # the timeout given is far longer: ending within it at all is what is checked
        assert await stop_task(task, timeout=60.0, what="a loop that lost two cancels", log=log)
    assert task.cancelled() and loop.cancels == 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_task_that_never_stops_is_left_behind_at_the_timeout_with_its_stack(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tasks, "RECANCEL_INTERVAL", 0.05)
    loop = SwallowsCancels()
    task = asyncio.create_task(loop.swallow_cancels())
    await loop.running.wait()
    try:
        with anyio.fail_after(10):
            assert not await stop_task(task, timeout=0.5, what="the stubborn loop", log=log)
        assert not task.done() and loop.cancels > 1
        [warning] = [r for r in caplog.records if r.name == log.name]
        message = warning.getMessage()
        assert "the stubborn loop did not stop within" in message and "swallow_cancels" in message
    finally:
        loop.release.set()
        with anyio.fail_after(10):
            await task


async def test_what_a_task_ended_with_is_logged_at_debug_and_retrieved(caplog: pytest.LogCaptureFixture):
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    caplog.set_level(logging.DEBUG, logger=log.name)
    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)  # let it start, so the cancel lands inside its sleep
    with anyio.fail_after(10):
        assert await stop_task(task, timeout=5.0, what="a failing loop", log=log)
    assert isinstance(task.exception(), RuntimeError)
    [record] = [r for r in caplog.records if r.name == log.name]
    assert record.levelno == logging.DEBUG
    assert "a failing loop ended with RuntimeError('cleanup failed')" in record.getMessage()


async def test_an_outer_cancel_of_the_stopper_is_not_swallowed():
    loop = SwallowsCancels()
    task = asyncio.create_task(loop.swallow_cancels())
    await loop.running.wait()
    stopper = asyncio.create_task(stop_task(task, timeout=60.0, what="the stubborn loop", log=log))
    try:
        await asyncio.sleep(0.1)
        stopper.cancel()
        with anyio.fail_after(10), pytest.raises(asyncio.CancelledError):
            await stopper
    finally:
        loop.release.set()
        with anyio.fail_after(10):
            await task
