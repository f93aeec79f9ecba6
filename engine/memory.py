"""Memory prediction before a load, against memory really available. No llama.

Prediction (bytes):

* weights: the tensor data size from the GGUF header (llama.cpp mmaps it; the
  pages become resident as soon as the first decode touches them),
* KV cache: ``n_layer x (n_ctx x n_seq) x (n_embd_k_gqa + n_embd_v_gqa) x 2``
  (f16 K and V, every sequence gets its own ``n_ctx`` cells),
* compute buffer: the logits/output buffer (``n_vocab x n_seq x 4``) plus the
  scratch for one micro-batch (activations, attention scores over the context),
  plus a fixed overhead for the runtime itself.

With ``n`` GPU layers (llama.cpp's count: the output layer is one, then the last ``n - 1``
repeating blocks; the input embedding always stays on the CPU) the weights of those layers and
their share of the KV cache go to VRAM, plus a compute buffer for one micro-batch and
:data:`GPU_OVERHEAD`; the rest stays in RAM. :func:`plan_load` picks the layers ("auto": as many
as fit in the free VRAM the probe reports, Ollama's rule) and refuses, with ``out_of_memory``
naming RAM or VRAM, what cannot fit.

Availability: the smaller of ``MemAvailable`` (/proc/meminfo) and the cgroup
limit minus usage (v2 ``memory.max``/``memory.current``, v1
``memory.limit_in_bytes``/``memory.usage_in_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec

from engine.gguf import ModelInfo
from engine.gpu import GpuProbe
from engine.types import ModelConfig
from wire.errors import ErrorCode, LamaError
from wire.params import GPU_LAYERS_AUTO

RUNTIME_OVERHEAD = 96 << 20  # Python + llama.cpp runtime of one worker process
HEADROOM = 64 << 20  # never plan to use the last bytes
# cuBLAS workspace, CUDA graphs, allocator slack: what a GPU load takes beyond its buffers. The CUDA
# context itself is already out of the probe's free figure (the probe held one while it measured).
GPU_OVERHEAD = 256 << 20


class MemoryPrediction(msgspec.Struct, frozen=True, rename="camel"):
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    total_bytes: int  # RAM + VRAM
    # Added with issue 22: where it goes.
    ram_bytes: int = 0
    vram_bytes: int = 0
    vram_weights_bytes: int = 0
    vram_kv_cache_bytes: int = 0
    gpu_layers: int = 0  # llama.cpp's count: the output layer, then repeating blocks from the last


class MemoryAvailable(msgspec.Struct, frozen=True, rename="camel"):
    bytes: int
    source: str


def offloadable_layers(info: ModelInfo) -> int:
    """Layers llama.cpp can put on a GPU: every repeating block and the output layer."""
    return (info.block_count or len(info.layer_bytes)) + 1


def predict_memory(info: ModelInfo, config: ModelConfig, n_gpu_layers: int = 0) -> MemoryPrediction:
    """RAM and VRAM for ``config`` with ``n_gpu_layers`` on the GPU (0: all in RAM; a negative count
    or one past the end: every layer)."""
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
    n_all = offloadable_layers(info)
    ngl = n_all if n_gpu_layers < 0 else min(n_gpu_layers, n_all)
    vram_w = vram_kv = vram_c = 0
    if ngl > 0:
        blocks = ngl - 1  # the output layer goes first, then blocks from the last one down
        per_layer = info.layer_bytes or (weights // n_all,) * (n_all - 1)
        vram_w = info.output_bytes or weights // n_all
        vram_w += sum(per_layer[len(per_layer) - blocks:]) if blocks else 0
        vram_kv = kv * blocks // n_layer if n_layer else 0
        vram_c = scratch + GPU_OVERHEAD  # the logits stay in a host buffer
    vram = vram_w + vram_kv + vram_c
    ram = (weights - vram_w) + (kv - vram_kv) + compute
    return MemoryPrediction(weights, kv, compute + vram_c, ram + vram, ram_bytes=ram, vram_bytes=vram,
                            vram_weights_bytes=vram_w, vram_kv_cache_bytes=vram_kv, gpu_layers=ngl)


def fit_gpu_layers(info: ModelInfo, config: ModelConfig, free_vram: int) -> int:
    """The most layers whose prediction fits in ``free_vram`` (with :data:`HEADROOM`); 0 when none does."""
    for n in range(offloadable_layers(info), 0, -1):
        if predict_memory(info, config, n).vram_bytes + HEADROOM <= free_vram:
            return n
    return 0


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
    """The prediction's RAM part fits in what is available (predictions from before issue 22 have all in RAM)."""
    ram = prediction.ram_bytes if prediction.ram_bytes or prediction.vram_bytes else prediction.total_bytes
    return ram + HEADROOM <= available.bytes


class LoadPlan(msgspec.Struct, frozen=True):
    """What :func:`plan_load` decided: the config to load (its ``n_gpu_layers`` a count, never "auto";
    ``n_seq_max`` maybe halved), its prediction, and why fewer layers than all go to the GPU."""

    config: ModelConfig
    prediction: MemoryPrediction
    requested_gpu_layers: int
    note: str | None = None


def _vram_compute(p: MemoryPrediction) -> int:
    return p.vram_bytes - p.vram_weights_bytes - p.vram_kv_cache_bytes


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def plan_load(info: ModelInfo, config: ModelConfig, available: MemoryAvailable, gpu: GpuProbe | None) -> LoadPlan:
    """Choose GPU layers and sequences for ``config``; raise ``out_of_memory`` naming RAM or VRAM.

    ``config.n_gpu_layers``: ``-1`` (auto) takes as many layers as fit in ``gpu``'s free memory, a count
    asks for that many (past the end: all) and is refused when they cannot fit; ``gpu`` None or without
    devices: every layer stays on the CPU and ``note`` says why. Fewer parallel sequences come before a
    refusal: a model that serves one conversation at a time beats one that does not load (most of the
    KV cache is per sequence)."""
    requested = config.n_gpu_layers
    n_all = offloadable_layers(info)
    note: str | None = None
    free = gpu.free_bytes if gpu is not None and gpu.devices else 0
    if requested == 0:
        note = "n_gpu_layers is 0"
    elif gpu is None or not gpu.devices:
        note = (gpu.reason if gpu is not None else None) or "no GPU device; using CPU"

    def layers_for(cfg: ModelConfig) -> int:
        if requested == 0 or not free:
            return 0
        if requested == GPU_LAYERS_AUTO:
            return fit_gpu_layers(info, cfg, free)
        return n_all if requested < 0 else min(requested, n_all)

    while True:
        ngl = layers_for(config)
        prediction = predict_memory(info, config, ngl)
        vram_ok = ngl == 0 or prediction.vram_bytes + HEADROOM <= free
        if (vram_ok and fits(prediction, available)) or config.n_seq_max <= 1:
            break
        config = msgspec.structs.replace(config, n_seq_max=config.n_seq_max // 2)
    path = config.model_path
    if not vram_ok:
        assert gpu is not None
        most = fit_gpu_layers(info, config, free)
        raise LamaError(
            ErrorCode.OUT_OF_MEMORY,
            f"{path} with {ngl} of {n_all} layers on the GPU needs about {_mib(prediction.vram_bytes)} of VRAM "
            f"(weights {_mib(prediction.vram_weights_bytes)}, KV cache {_mib(prediction.vram_kv_cache_bytes)}, "
            f"compute {_mib(_vram_compute(prediction))})"
            f" but {gpu.names} has only {_mib(free)} of VRAM free; lower gpuLayers (at most {most} fit) or set it "
            f"to auto (-1), or lower contextSize or parallel",
            needed_vram=prediction.vram_bytes, available_vram=free, gpu_layers_that_fit=most,
        )
    if not fits(prediction, available):
        raise LamaError(
            ErrorCode.OUT_OF_MEMORY,
            f"{path} needs about {_mib(prediction.ram_bytes)} of RAM "
            f"(weights {_mib(prediction.weights_bytes - prediction.vram_weights_bytes)}, KV cache "
            f"{_mib(prediction.kv_cache_bytes - prediction.vram_kv_cache_bytes)}, compute "
            f"{_mib(prediction.compute_bytes - _vram_compute(prediction))}) but only {_mib(available.bytes)} are available ({available.source}); lower contextSize or parallel",
            needed=prediction.ram_bytes,
            available=available.bytes,
        )
    if requested != 0 and gpu is not None and gpu.devices and ngl < n_all:
        one = predict_memory(info, config, 1).vram_bytes
        note = (f"{ngl} of {n_all} layers fit in the {_mib(free)} of VRAM free on {gpu.names}"
                f" (the first layer alone needs about {_mib(one)})" if requested == GPU_LAYERS_AUTO
                else f"{ngl} of {n_all} layers asked for")
    return LoadPlan(msgspec.structs.replace(config, n_gpu_layers=ngl), prediction, requested, note)
