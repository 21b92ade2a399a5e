#!/usr/bin/env bash
# The GPU path end to end, as one short run (a few minutes) on a machine with an NVIDIA GPU. Run from the repo root:
#
#   scripts/gpu_check.sh                 # creates ~/.cache/hyperrec-gpu-venv, installs '.[gpu,loadtest,train]' into it
#   VENV=/opt/venv scripts/gpu_check.sh  # uses a prepared virtual environment as it is (no network needed)
#
# It prints nvidia-smi and what ONNX Runtime and FAISS see, publishes a synthetic bundle (`hyperrec synth-bundle`),
# serves it, checks that the log and /metrics say the ranker runs on TensorRT or CUDA and the index on the GPU,
# runs a short `hyperrec loadtest` and prints its summary, then stops the server. Any failed check exits non-zero.
#
# Settings (environment): VENV, INSTALL (1/0; default 1 for the venv this script creates, 0 for a given VENV),
# ITEMS (default 200000), DIM (64), RATE (requests/s, 200), DURATION (s, 20), SERVE_TIMEOUT (s until SERVING, 300),
# WORK (scratch directory, default a new temporary one), TORCH_INDEX_URL (where the CPU build of torch comes from;
# synth-bundle needs torch only to export its random ranker).
#
# EXPECT_DEVICE=cpu checks this script's plumbing on a machine without a GPU (e.g. VENV=.venv EXPECT_DEVICE=cpu):
# no nvidia-smi needed, and every check expects the CPU instead. It says nothing about GPU behaviour.
set -euo pipefail

ITEMS=${ITEMS:-200000}
DIM=${DIM:-64}
RATE=${RATE:-200}
DURATION=${DURATION:-20}
SERVE_TIMEOUT=${SERVE_TIMEOUT:-300}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
WORK=${WORK:-$(mktemp -d -t hyperrec-gpu-check.XXXXXX)}
MODEL=gpucheck
EXPECT_DEVICE=${EXPECT_DEVICE:-gpu}
case "$EXPECT_DEVICE" in
    gpu)
        RANKER_PROVIDERS="TensorrtExecutionProvider|CUDAExecutionProvider"
        INDEX_DEVICE=cuda
        ;;
    cpu)
        RANKER_PROVIDERS="CPUExecutionProvider"
        INDEX_DEVICE=cpu
        ;;
    *)
        echo "EXPECT_DEVICE must be gpu or cpu" >&2
        exit 2
        ;;
esac

say() { printf '\n== %s\n' "$*"; }
fail() {
    printf 'gpu_check: FAILED: %s\n' "$*" >&2
    exit 1
}

if [ ! -f pyproject.toml ] || [ ! -d hyperrec ]; then
    fail "run this from the hyperrec repository root"
fi
if [ "$EXPECT_DEVICE" = gpu ]; then
    command -v nvidia-smi >/dev/null 2>&1 || fail "nvidia-smi not found: this check needs a machine with an NVIDIA GPU"
    say "nvidia-smi"
    nvidia-smi || fail "nvidia-smi failed"
else
    say "EXPECT_DEVICE=cpu: checking the script's plumbing only, expecting the CPU everywhere"
fi

if [ -n "${VENV:-}" ]; then
    INSTALL=${INSTALL:-0}
else
    VENV="${XDG_CACHE_HOME:-$HOME/.cache}/hyperrec-gpu-venv"
    INSTALL=${INSTALL:-1}
    mkdir -p "$(dirname "$VENV")"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
[ -x "$PY" ] || fail "no python at $PY"

if [ "$INSTALL" = 1 ]; then
    say "installing into $VENV"
    "$PY" -m pip install --quiet --upgrade pip
    # synth-bundle exports its random ranker with torch; the CPU build is enough (ONNX Runtime runs the ranker).
    "$PY" -c 'import torch' 2>/dev/null ||
        "$PY" -m pip install --quiet "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
    "$PY" -m pip install --quiet -e '.[gpu,loadtest,train]'
    # The base dependencies pull in the CPU builds, which share their module names with the GPU ones.
    "$PY" -m pip uninstall --quiet -y onnxruntime faiss-cpu
    "$PY" -m pip install --quiet --force-reinstall --no-deps onnxruntime-gpu faiss-gpu-cu12
    # CUDA 12 and cuDNN 9 libraries for ONNX Runtime's CUDA execution provider (faiss-gpu-cu12 brings its own).
    "$PY" -m pip install --quiet nvidia-cuda-runtime-cu12 nvidia-cublas-cu12 nvidia-cudnn-cu12 nvidia-cufft-cu12 \
        nvidia-curand-cu12 nvidia-cuda-nvrtc-cu12
fi

# Let ONNX Runtime find the CUDA, cuDNN and TensorRT libraries that pip put into site-packages.
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for dir in "$SITE"/nvidia/*/lib "$SITE"/tensorrt_libs; do
    if [ -d "$dir" ]; then
        LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
# TensorRT builds its engines on first use; a cache makes a second run start faster.
export ORT_TENSORRT_ENGINE_CACHE_ENABLE=1 ORT_TENSORRT_CACHE_PATH="$WORK/trt-cache"
HYPERREC="$VENV/bin/hyperrec"
[ -x "$HYPERREC" ] || fail "no hyperrec in $VENV (install with INSTALL=1)"

say "what ONNX Runtime and FAISS see"
if ! "$PY" - "$EXPECT_DEVICE" <<'EOF'
import sys

import faiss
import onnxruntime as ort

providers = ort.get_available_providers()
gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
print(f"onnxruntime {ort.__version__} ({ort.get_device()}): available providers {providers}")
print(f"faiss {faiss.__version__}: GPU support {hasattr(faiss, 'StandardGpuResources')}, get_num_gpus() = {gpus}")
sys.exit(0 if sys.argv[1] == "cpu" or ("CUDAExecutionProvider" in providers and gpus > 0) else 1)
EOF
then
    fail "ONNX Runtime offers no CUDA provider or FAISS sees no GPU"
fi

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

say "synthetic bundle: $ITEMS items at $DIM dimensions (in $WORK)"
start=$SECONDS
"$HYPERREC" synth-bundle --model-repo "$WORK/repo" --model "$MODEL" --items "$ITEMS" --dim "$DIM" \
    --profiles-out "$WORK/profiles.npz" --log-level WARNING || fail "synth-bundle failed"
echo "published in $((SECONDS - start)) s"

PORT=$(free_port)
METRICS_PORT=$(free_port)
LOG="$WORK/serve.log"
say "hyperrec serve on 127.0.0.1:$PORT (metrics on $METRICS_PORT, log $LOG)"
"$HYPERREC" serve --port "$PORT" --metrics-port "$METRICS_PORT" --model-repo "$WORK/repo" --model-name "$MODEL" \
    --seed-profiles "$WORK/profiles.npz" --drain-s 0 --grace-s 2 --log-level INFO >"$LOG" 2>&1 &
SERVER_PID=$!

start=$SECONDS
if ! "$PY" - "127.0.0.1:$PORT" "$SERVER_PID" "$SERVE_TIMEOUT" <<'EOF'
import os
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target, pid, timeout_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout_s
with grpc.insecure_channel(target) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit("the server exited")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                sys.exit(0)
        except grpc.RpcError:
            pass
        time.sleep(0.5)
sys.exit(f"not SERVING after {timeout_s:.0f} s")
EOF
then
    tail -n 50 "$LOG"
    fail "the server did not become SERVING"
fi
echo "SERVING after $((SECONDS - start)) s"

say "what the log says was chosen"
grep -E "loaded with providers|FAISS index|version [0-9]+ ready" "$LOG" || true
grep -qE "ranker .* loaded with providers ($RANKER_PROVIDERS)" "$LOG" ||
    fail "the log does not show the ranker on $RANKER_PROVIDERS"
grep -qE "FAISS index .* on $INDEX_DEVICE " "$LOG" || fail "the log does not show the FAISS index on $INDEX_DEVICE"

say "hyperrec_accelerator_info on /metrics"
if ! "$PY" - "http://127.0.0.1:$METRICS_PORT/metrics" "$EXPECT_DEVICE" <<'EOF'
import re
import sys
import urllib.request

text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
on = {}
for line in text.splitlines():
    match = re.match(r"hyperrec_accelerator_info\{(.*)\} (\S+)$", line)
    if match:
        print(line)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if float(match.group(2)) == 1:
            on[labels["component"]] = labels["device"]
if sys.argv[2] == "cpu":
    ok = on.get("ranker") == "cpu" and on.get("index") == "cpu"
else:
    ok = on.get("ranker") in ("cuda", "tensorrt") and on.get("index") == "cuda"
print(f"ranker on {on.get('ranker')}, index on {on.get('index')}")
sys.exit(0 if ok else 1)
EOF
then
    fail "/metrics does not show the ranker and the index on the expected device ($EXPECT_DEVICE)"
fi

say "hyperrec loadtest: $RATE requests/s for $DURATION s (after 5 s of warm-up)"
cat >"$WORK/slo.yaml" <<'EOF'
max_error_rate: 0.01
min_achieved_ratio: 0.9
EOF
"$HYPERREC" loadtest --target "127.0.0.1:$PORT" --rate "$RATE" --duration "$DURATION" --warmup 5 \
    --users "$WORK/profiles.npz" --slo "$WORK/slo.yaml" --out "$WORK/loadtest" || fail "the load test failed its SLO"

say "stopping the server"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || fail "the server exited with status $? on SIGTERM"
SERVER_PID=""
say "gpu_check: all checks passed, expecting $EXPECT_DEVICE (results in $WORK)"
