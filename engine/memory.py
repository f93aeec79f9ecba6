"""Memory prediction before a load, against memory really available. No llama.

Prediction (bytes):

* weights: the tensor data size from the GGUF header (llama.cpp mmaps it; the
  pages become resident as soon as the first decode touches them),
* KV cache: ``n_layer x (n_ctx x n_seq) x (n_embd_k_gqa + n_embd_v_gqa) x 2``
  (f16 K and V, every sequence gets its own ``n_ctx`` cells),
* compute buffer: the logits/output buffer (``n_vocab x n_seq x 4``) plus the
  scratch for one micro-batch (activations, attention scores over the context),
  plus a fixed overhead for the runtime itself.

Availability: the smaller of ``MemAvailable`` (/proc/meminfo) and the cgroup
limit minus usage (v2 ``memory.max``/``memory.current``, v1
``memory.limit_in_bytes``/``memory.usage_in_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec

from engine.gguf import ModelInfo
from engine.types import ModelConfig

RUNTIME_OVERHEAD = 96 << 20  # Python + llama.cpp runtime of one worker process
HEADROOM = 64 << 20  # never plan to use the last bytes


class MemoryPrediction(msgspec.Struct, frozen=True, rename="camel"):
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    total_bytes: int


class MemoryAvailable(msgspec.Struct, frozen=True, rename="camel"):
    bytes: int
    source: str


def predict_memory(info: ModelInfo, config: ModelConfig) -> MemoryPrediction:
    n_layer = info.block_count or 0
    n_embd = info.embedding_length or 0
    n_head = info.head_count or 1
    k = info.n_embd_k_gqa or n_embd
    v = info.n_embd_v_gqa or n_embd
    cells = config.n_ctx * config.n_seq_max
    kv = n_layer * cells * (k + v) * 2
    n_vocab = info.vocab_size or 32000
    n_ubatch = min(config.n_batch, 512)
    outputs = n_vocab * max(config.n_seq_max, 1) * 4
    # one ubatch: logits for its outputs, ~8 activations of width n_embd (ffn is wider), KQ scores
    scratch = n_ubatch * (n_vocab + 12 * n_embd + n_head * min(config.n_ctx, 4096)) * 4
    compute = outputs + scratch + RUNTIME_OVERHEAD
    weights = info.tensor_data_bytes
    return MemoryPrediction(weights, kv, compute, weights + kv + compute)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str] | None:
    """Limit minus usage of the tightest memory cgroup we are in (v2 or v1), if any has a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    found: list[tuple[int, str]] = []
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        rel = rel.strip().lstrip("/")
        if hier == "0" and controllers == "":  # v2 (unified)
            for base in (root, root / "unified"):
                for d in (base / rel, base):
                    limit = _read_int(d / "memory.max")
                    usage = _read_int(d / "memory.current")
                    if limit is not None and usage is not None:
                        found.append((max(0, limit - usage), f"cgroup v2 {d}"))
                        break
        elif "memory" in controllers.split(","):  # v1
            for d in (root / "memory" / rel, root / "memory"):
                limit = _read_int(d / "memory.limit_in_bytes")
                usage = _read_int(d / "memory.usage_in_bytes")
                if limit is not None and usage is not None and limit < (1 << 60):
                    found.append((max(0, limit - usage), f"cgroup v1 {d}"))
                    break
    return min(found) if found else None


def available_memory() -> MemoryAvailable:
    """What a new worker may use now: min(MemAvailable, cgroup limit - usage)."""
    candidates: list[tuple[int, str]] = []
    mem = _meminfo_available()
    if mem is not None:
        candidates.append((mem, "MemAvailable"))
    cg = _cgroup_available()
    if cg is not None:
        candidates.append(cg)
    if not candidates:
        return MemoryAvailable(1 << 62, "unknown (no /proc/meminfo, no cgroup limit)")
    b, src = min(candidates)
    return MemoryAvailable(b, src)


MemoryProbe = Callable[[], MemoryAvailable]


def fits(prediction: MemoryPrediction, available: MemoryAvailable) -> bool:
    return prediction.total_bytes + HEADROOM <= available.bytes
