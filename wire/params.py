"""Generation and model parameters: the one place where defaults and bounds live.

Per-message ``params`` (:class:`GenerationParams`) override a model's stored
parameters, which override :data:`DEFAULTS`. Resolution happens once, in
:meth:`SamplingParams.resolve`; no other layer invents a default.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

MaxTokens = Annotated[int, Meta(ge=1, le=32768)]
Temperature = Annotated[float, Meta(ge=0.0, le=5.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=0, le=1000)]
Seed = Annotated[int, Meta(ge=0, le=2**32 - 1)]
StopList = Annotated[list[Annotated[str, Meta(min_length=1, max_length=64)]], Meta(max_length=8)]
#: GBNF text (llama.cpp grammar); the engine compiles it before the reply starts.
Grammar = Annotated[str, Meta(min_length=1, max_length=1 << 16)]
#: A JSON Schema object, converted to a grammar by llama-cpp-python's converter.
JsonSchema = dict[str, Any]
ContextSize = Annotated[int, Meta(ge=64, le=1 << 20)]
BatchSize = Annotated[int, Meta(ge=1, le=1 << 16)]
#: Layers offloaded to a GPU, llama.cpp's count (the output layer is one; more than the model has: all).
#: ``-1`` is "auto" (:data:`GPU_LAYERS_AUTO`).
GpuLayers = Annotated[int, Meta(ge=-1, le=10_000)]
#: ``n_gpu_layers`` "auto": as many layers as fit in the free VRAM the GPU backend reports (Ollama's rule;
#: all of them when they fit), 0 when llama.cpp has no GPU backend or no device. engine.memory.plan_load
#: decides at each load. (llama.cpp itself reads -1 as "all": lamabus never passes it -1.)
GPU_LAYERS_AUTO = -1
Threads = Annotated[int, Meta(ge=1, le=512)]
SeqMax = Annotated[int, Meta(ge=1, le=64)]
#: llama.cpp's flash attention: ``auto`` lets llama.cpp decide (on for CPU); see docs/operations.md for the trade-off.
FlashAttention = Literal["auto", "on", "off"]


def _physical_cores() -> int:
    # os.cpu_count() counts hyper-threads and ignores affinity; prefer what we may run on.
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    siblings = _smt_siblings()
    return max(1, available // siblings)


def _smt_siblings() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") as f:
            text = f.read().strip()
    except OSError:
        return 1
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi) - int(lo) + 1 if hi else 1
    return max(1, count)


class Defaults(msgspec.Struct, frozen=True):
    """Seed values (DESIGN.md "Defaults"); threads: the seed's 4, or fewer cores.

    ``n_gpu_layers``: the seed's 1 offloaded only llama.cpp's output layer (2.6 x slower than all layers
    on an H200, issue 22); the default is "auto" (:data:`GPU_LAYERS_AUTO`): every layer that fits in free
    VRAM, none on a CPU build. A model's ``gpuLayers`` overrides it, and so does the service's
    ``gpu_layers`` setting (bus/config.py) for models that set none.
    """

    max_tokens: int = 500
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 40
    stop: tuple[str, ...] = ("\n\n",)
    seed: int | None = None
    n_ctx: int = 2048
    n_batch: int = 512
    n_gpu_layers: int = GPU_LAYERS_AUTO
    n_threads: int = min(4, _physical_cores())
    n_seq_max: int = 8
    flash_attention: FlashAttention = "auto"


DEFAULTS = Defaults()


class GenerationParams(msgspec.Struct, frozen=True, rename="camel", forbid_unknown_fields=True, omit_defaults=True):
    """Optional per-message or per-model overrides; ``None`` means "not set here".

    ``grammar`` and ``json_schema`` constrain the reply's content (not a thinking block);
    they are one setting: a layer that sets either replaces both of a lower layer's.
    """

    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    stop: StopList | None = None
    seed: Seed | None = None
    grammar: Grammar | None = None
    json_schema: JsonSchema | None = None

    def __post_init__(self) -> None:
        # Raised while decoding too, where msgspec turns it into a ValidationError (bad_request).
        if self.grammar is not None and self.json_schema is not None:
            raise ValueError("give grammar or jsonSchema, not both")

    def over(self, base: "GenerationParams | None") -> "GenerationParams":
        """These overrides laid over ``base`` (fields set here win)."""
        if base is None:
            return self
        merged = {f: getattr(self, f) if getattr(self, f) is not None else getattr(base, f) for f in self.__struct_fields__}
        if self.grammar is not None or self.json_schema is not None:
            merged["grammar"], merged["json_schema"] = self.grammar, self.json_schema
        return GenerationParams(**merged)


class SamplingParams(msgspec.Struct, frozen=True, rename="camel"):
    """Fully resolved sampling parameters, as the engine receives them."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None
    grammar: str | None = None
    json_schema: JsonSchema | None = None

    @classmethod
    def resolve(cls, *layers: GenerationParams | None, defaults: Defaults = DEFAULTS) -> "SamplingParams":
        """Resolve layers, most specific first, over ``defaults``.

        Under a grammar or schema the default stop sequences do not apply: the grammar says
        where the reply ends, and a stop inside it would cut a reply that must parse.
        """
        merged = GenerationParams()
        for layer in reversed(layers):
            if layer is not None:
                merged = layer.over(merged)
        constrained = merged.grammar is not None or merged.json_schema is not None
        if merged.stop is not None:
            stop = tuple(merged.stop)
        else:
            stop = () if constrained else defaults.stop
        return cls(
            max_tokens=merged.max_tokens if merged.max_tokens is not None else defaults.max_tokens,
            temperature=merged.temperature if merged.temperature is not None else defaults.temperature,
            top_p=merged.top_p if merged.top_p is not None else defaults.top_p,
            top_k=merged.top_k if merged.top_k is not None else defaults.top_k,
            stop=stop,
            seed=merged.seed if merged.seed is not None else defaults.seed,
            grammar=merged.grammar,
            json_schema=merged.json_schema,
        )


class ModelParams(msgspec.Struct, frozen=True, rename="camel", forbid_unknown_fields=True, omit_defaults=True):
    """Load-time overrides for a model (the seed's init config); ``None`` = default."""

    context_size: ContextSize | None = None
    batch_size: BatchSize | None = None
    gpu_layers: GpuLayers | None = None
    threads: Threads | None = None
    parallel: SeqMax | None = None
    flash_attention: FlashAttention | None = None
