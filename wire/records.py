"""The records the registry keeps and the API returns: one definition, shared by every layer.

:class:`LLM` is the seed's model record, :class:`TopicInfo` a topic room and
who answers there now, :class:`CatalogEntry` a model lamabus knows how to get.
They live in ``wire`` because they go on the wire as they are (camelCase):
storage projects into them, handlers return them, the API sends them.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from wire.params import GenerationParams, ModelParams

GENERATION_FIELDS = GenerationParams.__struct_fields__  # max_tokens, temperature, ..., seed, grammar, json_schema
LOAD_FIELDS = ModelParams.__struct_fields__  # context_size, batch_size, gpu_layers, threads, parallel, flash_attention


class LLM(msgspec.Struct, frozen=True, rename="camel"):
    """The seed's ``LLM`` record, every field of it, as ``lama.api.models.list/get`` return it.

    Times: ``created``/``modified``/``lastInitialized`` are epoch milliseconds
    (0 = never), ``createdAt``/``lastUsed`` ISO-8601 strings (``lastUsed`` is
    null until first use). Parameter fields are the model's stored overrides;
    null means "the default in ``wire.params.DEFAULTS``". Field names equal
    those of ``GenerationParams``/``ModelParams`` so the two convert 1:1.
    Fields after ``model_path`` are lamabus additions.
    """

    id: str
    name: str
    model_type: Literal["local", "cloud"]
    filename: str
    person_id: str
    deleted: bool
    active: bool
    creator: str
    created: int
    modified: int
    created_at: str
    last_used: str | None
    usage_count: int
    size: int
    capabilities: tuple[str, ...]
    last_initialized: int
    # the seed's model parameters
    temperature: float | None = None
    batch_size: int | None = None
    threads: int | None = None
    max_tokens: int | None = None
    context_size: int | None = None
    mirostat: int | None = None  # in the seed's record; llama.cpp's mirostat is not exposed here, so always null
    top_k: int | None = None
    top_p: float | None = None
    # the seed's optional properties
    architecture: str | None = None
    context_length: int | None = None
    quantization: str | None = None
    checksum: str | None = None
    provider: str | None = None
    model_loaded: bool = False
    model_path: str = ""
    # lamabus additions
    parameter_count: int | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    gpu_layers: int | None = None
    parallel: int | None = None
    flash_attention: str | None = None
    version: int = 0
    """The model stream's version: the ``expected_version`` for an update."""
    last_error: str | None = None
    """``code: message`` of the last failed load, cleared by a successful one."""
    system_prompt: str | None = None
    """What this model's conversations start with; null: the topic's or the service default."""

    def generation_params(self) -> GenerationParams:
        values = {f: getattr(self, f) for f in GENERATION_FIELDS}
        if values["stop"] is not None:
            values["stop"] = list(values["stop"])
        return GenerationParams(**values)

    def model_params(self) -> ModelParams:
        return ModelParams(**{f: getattr(self, f) for f in LOAD_FIELDS})


class TopicAnalysis(msgspec.Struct, frozen=True, rename="camel"):
    """The latest ``topic.analysed`` of a topic, as ``topics.get/list`` return it (``analysis``)."""

    title: str
    keywords: tuple[str, ...]
    summary: str
    language: str
    based_on_message_id: str
    model_id: str
    reply_count: int
    analysed_at: int
    """Epoch milliseconds."""


class TopicInfo(msgspec.Struct, frozen=True, rename="camel"):
    """A topic as ``lama.api.topics.get/list`` return it: the room plus who answers there now."""

    id: str
    name: str | None
    bound_model_id: str | None
    model_id: str | None
    """The model that answers here now: the bound one, else the active one (null: none)."""
    person_id: str | None
    created_by: str | None
    created: int
    modified: int
    message_count: int
    reply_count: int
    version: int
    system_prompt: str | None = None
    """The topic's own system prompt (null: the model's, else the service default)."""
    analysis: TopicAnalysis | None = None
    """What the topic is about (title, keywords, summary, language); null until its first analysis."""
    analysis_enabled: bool = True
    """False: this topic is never analysed (the service-wide switch is the ``analysis`` setting)."""


class CatalogEntry(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    id: str
    name: str
    filename: str
    architecture: str
    quantization: str
    parameters_count: int
    context_length: int
    approx_size: str
    download_url: str | None = None
    """None for the bundled model, which ships in a Python package instead."""
    size: int | None = None
    """Exact bytes, only where known."""
    sha256: str | None = None
    """Only where known; a pull then refuses any other file."""
    capabilities: tuple[str, ...] = ("chat", "inference")
    generation: GenerationParams | None = None
    """Stored on the model when pulled."""
    load: ModelParams | None = None
    source: str = "huggingface"
    aliases: tuple[str, ...] = ()
    note: str | None = None
