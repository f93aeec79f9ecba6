"""The bus benchmark's results, typed: what each measure hands back (bench/bus_measures.py).

Each ``*Figures`` Struct is one measure's share of bench/results.json: its fields are
the top-level keys that measure writes, in the order they appear there, and
:func:`figures` turns it into that dict. A key only some runs have (the
llama-server figures, the engine-shaped raw loop's) is ``UNSET`` when absent, so it is
left out rather than written as null; a figure that could not be measured is None
(null), as before. bench/report.py reads the JSON, not these.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType


def figures(part: msgspec.Struct) -> dict[str, Any]:
    """``part`` as the JSON-ready dict it contributes to results.json (UNSET fields left out)."""
    return msgspec.to_builtins(part)


# -- the set-up ---------------------------------------------------------------------------------


class Machine(msgspec.Struct, kw_only=True):
    cpu: str
    logical_cpus: int | None
    usable_cpus: int
    physical_cores: int
    simd: list[str]
    memory_gb: float
    os: str
    python: str
    llama_cpp_python: str
    llama_system_info: str
    virtualised: bool
    # OpenMP's barrier spinning matters on a small, shared box; the service's workers inherit it.
    omp_wait_policy: str | None


class ModelInfo(msgspec.Struct, kw_only=True):
    file: str
    path: str
    bytes: int
    name: str | None
    architecture: str | None
    quantization: str | None


class EngineInfo(msgspec.Struct, kw_only=True):
    n_threads: int
    n_seq_max: int
    n_ctx_per_sequence: Any
    n_batch: Any
    workers: Any
    load_seconds: float | None
    memory_predicted_mb: dict[str, float]


class SetupFigures(msgspec.Struct, kw_only=True):
    model: ModelInfo
    engine: EngineInfo
    service_ready_s: float
    warmup_finish: str


# -- one stream ---------------------------------------------------------------------------------


class TtftBreakdown(msgspec.Struct, kw_only=True):
    #: publish -> generation.started received (JetStream intake, registry checks, started event)
    publish_to_started_event: float | None
    #: publish -> the engine admits the request (the above, history, worker pipe, render, tokenize)
    publish_to_engine_start: float | None
    #: the engine's own TTFT: prompt evaluation and first sample
    engine_prompt_and_first_token: float | None
    #: the rest: worker pipe -> service -> NATS -> client
    first_token_delivery: float | None


class Sample(msgspec.Struct, kw_only=True):
    tps: float | None
    ttft_ms: float
    finish: str
    tokens: int


class SingleStream(msgspec.Struct, kw_only=True):
    tokens: int
    reps: int
    tps: dict[str, float | None]
    #: bus ÷ side within each repetition, then the median (the targets use the ratio of the medians)
    bus_over_side_paired: dict[str, float | None] = {}
    ttft_ms: dict[str, float | None]
    runs_reaching_max_tokens: dict[str, int]
    bus_engine_reported_tps: float | None
    bus_ttft_breakdown_ms: TtftBreakdown
    bus_cached_prompt_tokens: float | None
    bus_prompt_tokens: float | None
    raw_prompt_tokens: float | None
    bus_token_messages_per_run: float | None
    texts_differ_from_raw: int
    cpu_ms_per_bus_token: dict[str, float | None]
    cpu_cores_busy_during_bus_runs: dict[str, float | None]
    samples: dict[str, list[Sample]]


class SingleStreamFigures(msgspec.Struct, kw_only=True):
    single_stream: SingleStream
    bus_over_direct_tps: float | None
    bus_over_raw_tps: float | None
    direct_over_raw_tps: float | None
    llama_server_one_stream_tps: float | None | UnsetType = UNSET
    bus_over_llama_server_tps: float | None | UnsetType = UNSET
    bus_over_raw_engine_context_tps: float | None | UnsetType = UNSET
    raw_engine_context_over_raw_tps: float | None | UnsetType = UNSET
    ttft_overhead_ms: float | None
    #: The part of the bus's TTFT that is not the engine's own prompt evaluation (per run, then the median).
    bus_ttft_outside_engine_ms: float | None


# -- a conversation -----------------------------------------------------------------------------


class Turn(msgspec.Struct, kw_only=True):
    turn: int
    bus_ttft_ms: float | None
    no_reuse_ttft_ms: float | None
    direct_reuse_ttft_ms: float | None
    prompt_tokens: float | None
    cached_tokens: float | None
    bus_publish_to_engine_ms: float | None
    bus_engine_ttft_ms: float | None
    llama_server_ttft_ms: float | None


class Conversation(msgspec.Struct, kw_only=True):
    turns: int
    tokens_per_turn: int
    reps: int
    per_turn: list[Turn]


class ConversationFigures(msgspec.Struct, kw_only=True):
    conversation: Conversation
    turn20_over_turn1_ttft: float | None
    turn20_over_turn1_ttft_no_reuse: float | None
    turn20_over_turn1_ttft_direct_reuse: float | None
    turn20_ttft_bus_over_direct_reuse: float | None
    llama_server_turn20_ttft_ms: float | None | UnsetType = UNSET
    turn20_ttft_over_llama_server: float | None | UnsetType = UNSET


# -- concurrent topics --------------------------------------------------------------------------


class Level(msgspec.Struct, kw_only=True):
    topics: int
    aggregate_tps: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    requests: int
    stopped_before_max_tokens: int


class RawBatched(msgspec.Struct, kw_only=True):
    sequences: int
    aggregate_tps: float | None
    prefill_s: float | None
    decode_phase_tps: float | None
    engine_n_seq_max: int
    samples: list[float]


class ConcurrencyFigures(msgspec.Struct, kw_only=True):
    concurrency: list[Level]
    raw_batched: RawBatched
    batched8_over_raw_batched8: float | None


# -- memory -------------------------------------------------------------------------------------


class RssSplit(msgspec.Struct, kw_only=True):
    service: float
    engine_workers: float


class RssFigures(msgspec.Struct, kw_only=True):
    rss_mb_1_topic: float | None
    rss_mb_8_topics: float | None
    rss_topics_measured: int
    rss_split_mb: dict[str, RssSplit | None]
    rss_processes: dict[str, int | None]


# -- the variants: flash attention off, a core left for the bus ---------------------------------


class FlashAttentionOff(msgspec.Struct, kw_only=True):
    turn1_ttft_ms: float | None
    turn20_ttft_ms: float | None
    turn20_over_turn1_ttft: float | None


class SpareCore(msgspec.Struct, kw_only=True):
    engine_threads: int
    cores: int | None
    bus_tps: float | None
    raw_tps: float | None
    bus_over_raw_tps: float | None


class FlashAttentionFigures(msgspec.Struct, kw_only=True):
    flash_attention_off: FlashAttentionOff


class SpareCoreFigures(msgspec.Struct, kw_only=True):
    spare_core: SpareCore


# -- the profile --------------------------------------------------------------------------------


class ProfileSummary(msgspec.Struct, kw_only=True):
    """py-spy's collapsed stacks, summed: [name, % of the working samples] rows."""

    samples: int
    waiting_samples: int
    self: list[list[Any]]
    inclusive: list[list[Any]]
    by_kind: list[list[Any]] | UnsetType = UNSET


class Profile(msgspec.Struct, kw_only=True):
    tool: str | UnsetType = UNSET
    seconds: float | UnsetType = UNSET
    requests: int | UnsetType = UNSET
    taken: bool
    reason: str
    service: ProfileSummary | UnsetType = UNSET
    engine_worker: ProfileSummary | UnsetType = UNSET
    errors: list[str] | UnsetType = UNSET
    service_text: list[str] | UnsetType = UNSET


class ProfileFigures(msgspec.Struct, kw_only=True):
    profile: Profile
