"""The assistant's Runtime port: load and pin with the models runtime, generate with the engine."""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from engine.types import GenerateRequest, GenerationResult, TokenChunk
from wire.params import SamplingParams
from handlers.models_runtime import ModelsRuntime
from handlers.ports import ModelRef


class EngineLike(Protocol):
    def generate_stream(self, handle: str, request: GenerateRequest) -> AsyncIterator[TokenChunk | GenerationResult]: ...

    async def cancel(self, request_id: str) -> bool: ...

    async def check_sampling(self, handle: str, sampling: SamplingParams) -> None: ...


class EngineRuntime:
    """The assistant's Runtime port: the models runtime loads and pins, the engine generates."""

    def __init__(self, models: ModelsRuntime, engine: EngineLike) -> None:
        self.models = models
        self.engine = engine

    async def generate_stream(self, model: ModelRef, request: GenerateRequest) -> AsyncIterator[TokenChunk | GenerationResult]:
        async with self.models.use(model) as loaded:
            async for item in self.engine.generate_stream(loaded.handle, request):
                yield item

    async def check(self, model: ModelRef, sampling: SamplingParams) -> None:
        if sampling.grammar is None and sampling.json_schema is None:
            return  # nothing to compile: no need to load the model for it
        async with self.models.use(model) as loaded:
            await self.engine.check_sampling(loaded.handle, sampling)

    async def cancel(self, request_id: str) -> bool:
        return await self.engine.cancel(request_id)
