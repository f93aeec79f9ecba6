"""The catalogue: the seed's KNOWN_MODELS, corrected, plus the bundled SmolLM2."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
from rich.progress import Progress

from handlers.catalog import KNOWN_MODELS, bundled_model_path, find_entry, list_catalog, rich_progress
from handlers.registry import Registry
from storage.store import MemoryEventStore
from tests.test_registry import Clock
from wire.identity import slugify


def test_entries_and_ids():
    ids = [e.id for e in list_catalog()]
    assert ids == ["tinyllama-1-1b", "deepseek-r1-distill-qwen-1-5b", "smollm2-135m-instruct"]
    for e in KNOWN_MODELS:
        # A pulled model gets the registry id slugify(name); it must be the catalogue id.
        assert e.id == slugify(e.name)
        assert e.download_url is None or e.download_url.endswith("/" + e.filename)
    assert find_entry("tinyllama-1.1b").id == "tinyllama-1-1b"  # the seed's ids still work
    assert find_entry(" DeepSeek-1.5B ").id == "deepseek-r1-distill-qwen-1-5b"
    assert find_entry("nothing") is None


def test_deepseek_points_at_the_r1_distill_not_the_coder_model():
    e = find_entry("deepseek-1.5b")
    assert e is not None and e.download_url is not None
    assert "deepseek-coder" not in e.download_url.lower()
    assert "DeepSeek-R1-Distill-Qwen-1.5B-GGUF" in e.download_url and e.filename.endswith("Q4_K_M.gguf")
    assert (e.architecture, e.quantization) == ("qwen2", "Q4_K_M")


def test_catalogue_encodes_in_camel_case():
    wire = msgspec.json.decode(msgspec.json.encode(list_catalog()))
    assert {"id", "name", "downloadUrl", "approxSize", "parametersCount", "contextLength"} <= set(wire[0])


def test_bundled_entry_matches_the_installed_file(model_path: Path):
    entry = find_entry("smollm2")
    assert entry is not None and bundled_model_path() == model_path
    data = model_path.read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256)


async def test_ensure_bundled_with_the_real_file(model_path: Path):
    async with Registry(MemoryEventStore(), clock=Clock()) as reg:
        m = await reg.ensure_bundled(model_path)
        entry = find_entry("smollm2")
        assert m is not None and (m.id, m.checksum, m.context_length, m.active) == (
            entry.id, entry.sha256, 8192, True)


def test_rich_progress_callback():
    with Progress(disable=True) as progress:
        update = rich_progress(progress, "pulling")
        update(50, 200)
        (task,) = progress.tasks
        assert (task.completed, task.total, task.description) == (50, 200, "pulling")
