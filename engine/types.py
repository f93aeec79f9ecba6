"""What goes into and comes out of the engine. Pure data; no llama imports."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from wire.messages import Channel, FinishReason, Timing, Usage
from wire.params import (
    DEFAULTS,
    BatchSize,
    ContextSize,
    FlashAttention,
    GpuLayers,
    ModelParams,
    SamplingParams,
    SeqMax,
    Threads,
)


class ModelConfig(msgspec.Struct, frozen=True, rename="camel"):
    """A fully resolved load configuration. Two equal configs share one loaded model."""

    model_path: str
    # The bounds are wire/params.py's (ModelParams); the engine checks them by a msgspec round trip.
    n_ctx: ContextSize = DEFAULTS.n_ctx  # per sequence: each of n_seq_max conversations gets n_ctx cells
    n_batch: BatchSize = DEFAULTS.n_batch
    n_gpu_layers: GpuLayers = DEFAULTS.n_gpu_layers
    n_threads: Threads = DEFAULTS.n_threads
    n_seq_max: SeqMax = DEFAULTS.n_seq_max
    flash_attention: FlashAttention = DEFAULTS.flash_attention

    @classmethod
    def resolve(cls, model_path: str, *layers: ModelParams | None) -> "ModelConfig":
        """Resolve load parameters, most specific layer first, over DEFAULTS."""

        def pick(field: str, default: Any) -> Any:
            for layer in layers:
                if layer is not None and getattr(layer, field) is not None:
                    return getattr(layer, field)
            return default

        return cls(
            model_path=model_path,
            n_ctx=pick("context_size", DEFAULTS.n_ctx),
            n_batch=pick("batch_size", DEFAULTS.n_batch),
            n_gpu_layers=pick("gpu_layers", DEFAULTS.n_gpu_layers),
            n_threads=pick("threads", DEFAULTS.n_threads),
            n_seq_max=pick("parallel", DEFAULTS.n_seq_max),
            flash_attention=pick("flash_attention", DEFAULTS.flash_attention),
        )


class KvCacheConfig(msgspec.Struct, frozen=True):
    """Where a worker keeps the KV states of sequences that lost their slot (engine/kv_cache.py).

    ``ram_bytes``: per loaded model, in host memory (0: off). ``disk_bytes``: under ``disk_dir``
    (0 or no directory: off), for the whole directory, least recently used files first (each worker
    keeps it as it sees the directory). ``model_sha256``: the model file's hash, part of the disk key
    (the engine fills it in per model).
    """

    ram_bytes: int = 0
    disk_bytes: int = 0
    disk_dir: str | None = None
    model_sha256: str | None = None

    @property
    def enabled(self) -> bool:
        return self.ram_bytes > 0 or (self.disk_bytes > 0 and self.disk_dir is not None)


class ChatTurn(msgspec.Struct, frozen=True):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(msgspec.Struct, frozen=True):
    """One generation.

    ``messages`` is the conversation oldest-first; the engine renders it with the
    model's chat template and, when it does not fit in ``n_ctx - max_tokens``,
    drops the oldest non-system turns (and truncates a single over-long turn).
    ``prompt`` instead of ``messages`` is raw completion with no template.
    ``conversation`` names a KV-cache slot to reuse across turns (a topic id).
    """

    request_id: str
    sampling: SamplingParams
    messages: tuple[ChatTurn, ...] = ()
    prompt: str | None = None
    conversation: str | None = None
    # Added with issue 7: keep generating through end-of-generation tokens (benchmarks).
    ignore_eos: bool = False


class TokenChunk(msgspec.Struct, frozen=True):
    text: str
    channel: Channel = "content"


class GenerationResult(msgspec.Struct, frozen=True):
    """The seed's response structure. ``cancelled`` results carry the partial text."""

    text: str
    thinking: str
    tokens: int
    finish_reason: FinishReason | Literal["cancelled"]
    timing: Timing
    usage: Usage

    @property
    def cancelled(self) -> bool:
        return self.finish_reason == "cancelled"
