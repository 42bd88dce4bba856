#!/usr/bin/env bash
# Package an artifacts folder into a self-contained TorchServe archive.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: ./build_mar.sh [options]

Packages the artifacts (dlrm.json + dlrm.safetensors) into MODEL_STORE/NAME.mar
with torch-model-archiver, after checking that the weights' shapes agree with
the config.  The archive holds the handler, the dlrm_serve modules it imports
(nothing else of the package) and a model-config.yaml, so it loads on a
TorchServe whose Python has only torch, torchserve, numpy, pyyaml and
safetensors.  The onnxruntime archive holds the ONNX graphs and their data
instead of dlrm.safetensors.

Options:
  --artifacts DIR        artifacts folder (default: artifacts)
  --model-name NAME      model name (default: dlrm; dlrm_onnx with --backend onnxruntime)
  --version V            model version (default: 1.0)
  --backend B            torch | onnxruntime; onnxruntime needs dlrm.onnx (and
                         dlrm.one_id.onnx, dlrm.onnx.data if any) in the artifacts.
                         Default: torch when --model-name is given; otherwise both
                         archives, dlrm.mar and dlrm_onnx.mar, after running
                         'dlrm-serve export-onnx --if-needed' on the artifacts
  --model-store DIR      where the archive goes (default: model_store)
  --archive-format F     default | no-archive | zip-store (default: default);
                         no-archive writes a folder (nothing to unpack at load:
                         best for multi-GB tables), zip-store skips compression
  --device D             cpu | gpu (default: cpu).  gpu writes deviceType: gpu: on a
                         server with GPUs TorchServe gives each worker a gpu_id
                         (round-robin) and the worker runs on cuda:<gpu_id>; where
                         CUDA is not usable it runs on the CPU and logs why
                         (see docs/gpu.md).  Default workers with gpu: 1, i.e. one
                         per GPU on a one-GPU server (each worker holds its own
                         copy of the tables on its GPU); pass --workers <GPUs>
  --workers N            minWorkers = maxWorkers (default: 2; 1 with --device gpu)
  --threads N            torch/onnxruntime threads per worker; 0 = cores / workers (default: 0)
  --precision P          auto | fp32 | bf16 (default: auto): what the torch backend
                         computes in; auto = bf16 on a CPU with native bfloat16
                         (AMX or AVX512-BF16), fp32 elsewhere (docs/precision.md).
                         onnxruntime archives are fp32 (auto means fp32 there)
  --batch-size N         TorchServe dynamic batch: most requests per batch (default: 16)
  --max-batch-delay MS   TorchServe dynamic batch: longest wait to fill it, >= 1 (default: 1;
                         TorchServe reads 0 in model-config.yaml as unset and waits 100 ms;
                         0 can be set at registration: max_batch_delay=0)
  --max-rows N           most rows one request may carry (default: 8192)
  --response-timeout S   seconds a batch may take before the worker is restarted (default: 120)
  --startup-timeout S    seconds a worker may take to load the model (default: 120)
  --touch-tables         each worker reads every table page once at load, so the
                         memory-mapped tables start fully mapped (shared by all
                         workers through the page cache); off by default
  --kserve OUT           write the storage layout of KServe's TorchServe runtime
                         instead: OUT/model-store/NAME.mar (torch backend unless
                         --backend says otherwise) and OUT/config/config.properties
                         (TorchServe on 127.0.0.1:8085/8086, gRPC 7070/7071, metrics
                         on :8082, model_snapshot, enable_envvars_config=true, token
                         auth off: KServe's wrapper sends no token). Upload OUT to
                         the storageUri (see deploy/kserve/ and docs/kserve.md)
  -h, --help             this help
EOF
}

ORIG_ARGS=("$@")
cd "$(dirname "$0")"
ROOT=$(pwd)

ARTIFACTS=artifacts
MODEL_NAME=
VERSION=1.0
BACKEND=
MODEL_STORE=model_store
ARCHIVE_FORMAT=default
WORKERS=
DEVICE=cpu
THREADS=0
PRECISION=auto
BATCH_SIZE=16
MAX_BATCH_DELAY=1
MAX_ROWS=8192
RESPONSE_TIMEOUT=120
STARTUP_TIMEOUT=120
TOUCH_TABLES=false
KSERVE_OUT=

die() { echo "build_mar.sh: $*" >&2; exit 2; }
need_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
positive() { [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge "${3:-1}" ] || die "$1 must be an integer >= ${3:-1}, got '$2'"; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --artifacts) need_value "$@"; ARTIFACTS=$2; shift 2 ;;
    --model-name) need_value "$@"; MODEL_NAME=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --backend) need_value "$@"; BACKEND=$2; shift 2 ;;
    --model-store) need_value "$@"; MODEL_STORE=$2; shift 2 ;;
    --archive-format) need_value "$@"; ARCHIVE_FORMAT=$2; shift 2 ;;
    --workers) need_value "$@"; WORKERS=$2; shift 2 ;;
    --device) need_value "$@"; DEVICE=$2; shift 2 ;;
    --threads) need_value "$@"; THREADS=$2; shift 2 ;;
    --precision) need_value "$@"; PRECISION=$2; shift 2 ;;
    --batch-size) need_value "$@"; BATCH_SIZE=$2; shift 2 ;;
    --max-batch-delay) need_value "$@"; MAX_BATCH_DELAY=$2; shift 2 ;;
    --max-rows) need_value "$@"; MAX_ROWS=$2; shift 2 ;;
    --response-timeout) need_value "$@"; RESPONSE_TIMEOUT=$2; shift 2 ;;
    --startup-timeout) need_value "$@"; STARTUP_TIMEOUT=$2; shift 2 ;;
    --touch-tables) TOUCH_TABLES=true; shift ;;
    --kserve) need_value "$@"; KSERVE_OUT=$2; shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

# No --backend: torch for a named archive or a KServe layout, else both archives (below).
[ -z "$BACKEND" ] && { [ -n "$MODEL_NAME" ] || [ -n "$KSERVE_OUT" ]; } && BACKEND=torch
if [ -n "$KSERVE_OUT" ]; then
  [ "$ARCHIVE_FORMAT" = default ] || die "--kserve writes a .mar: leave --archive-format at default"
  mkdir -p "$KSERVE_OUT/model-store" "$KSERVE_OUT/config"
  MODEL_STORE="$KSERVE_OUT/model-store"
fi
case "$BACKEND" in
  "") ;;
  torch) : "${MODEL_NAME:=dlrm}" ;;
  onnxruntime) : "${MODEL_NAME:=dlrm_onnx}" ;;
  *) die "--backend must be torch or onnxruntime, got '$BACKEND'" ;;
esac
case "$DEVICE" in
  cpu) : "${WORKERS:=2}" ;;
  gpu) : "${WORKERS:=1}" ;;  # tables are copied per worker onto its GPU: one worker per GPU
  *) die "--device must be cpu or gpu, got '$DEVICE'" ;;
esac
case "$PRECISION" in
  auto|fp32|bf16) ;;
  *) die "--precision must be auto, fp32 or bf16, got '$PRECISION'" ;;
esac
[ "$BACKEND" = onnxruntime ] && [ "$PRECISION" = bf16 ] \
  && die "--precision bf16 needs --backend torch (the onnxruntime backend runs fp32)"
case "$ARCHIVE_FORMAT" in
  default|no-archive|zip-store) ;;
  *) die "--archive-format must be default, no-archive or zip-store, got '$ARCHIVE_FORMAT'" ;;
esac
[ -z "$BACKEND" ] || [[ "$MODEL_NAME" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "--model-name must be letters, digits, '_', '.', '-', got '$MODEL_NAME'"
[[ "$VERSION" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "--version must be letters, digits, '_', '.', '-', got '$VERSION'"
positive --workers "$WORKERS"
positive --threads "$THREADS" 0
positive --batch-size "$BATCH_SIZE"
positive --max-batch-delay "$MAX_BATCH_DELAY" 1
positive --max-rows "$MAX_ROWS"
positive --response-timeout "$RESPONSE_TIMEOUT"
positive --startup-timeout "$STARTUP_TIMEOUT"

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3) || die "no Python found"; fi
if [ -x .venv/bin/torch-model-archiver ]; then
  ARCHIVER=.venv/bin/torch-model-archiver
else
  ARCHIVER=$(command -v torch-model-archiver) || die "torch-model-archiver not found: run 'make setup' (or pip install torch-model-archiver==0.12.0)"
fi

[ -d "$ARTIFACTS" ] || die "artifacts folder '$ARTIFACTS' not found (make one with '.venv/bin/dlrm-serve train --out $ARTIFACTS')"
for f in dlrm.json dlrm.safetensors; do
  [ -f "$ARTIFACTS/$f" ] || die "'$ARTIFACTS/$f' is missing: an artifacts folder holds dlrm.json and dlrm.safetensors"
done
# Shapes of the weights against the config, with the library's own check.
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m dlrm_serve.cli check --artifacts "$ARTIFACTS" \
  || die "'$ARTIFACTS' failed the check above; fix or rebuild the artifacts"

if [ -z "$BACKEND" ]; then
  # Both archives: the torch one, then the ONNX graphs (exported when missing
  # or made from other weights), then the onnxruntime one; same options.
  bash "$ROOT/$(basename "$0")" "${ORIG_ARGS[@]}" --backend torch
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m dlrm_serve.cli export-onnx --artifacts "$ARTIFACTS" --if-needed \
    || die "could not export '$ARTIFACTS' to ONNX (see above)"
  exec bash "$ROOT/$(basename "$0")" "${ORIG_ARGS[@]}" --backend onnxruntime --precision fp32
fi

EXTRA=("$ARTIFACTS/dlrm.json")
SERIALIZED="$ARTIFACTS/dlrm.safetensors"
if [ "$BACKEND" = onnxruntime ]; then
  [ -f "$ARTIFACTS/dlrm.onnx" ] || die "--backend onnxruntime needs '$ARTIFACTS/dlrm.onnx' (export it first)"
  # The graph is the serialized file; no safetensors: the tables are in
  # dlrm.onnx.data, whose fingerprint the graph records at export.
  SERIALIZED="$ARTIFACTS/dlrm.onnx"
  [ -f "$ARTIFACTS/dlrm.onnx.data" ] && EXTRA+=("$ARTIFACTS/dlrm.onnx.data")
  # The one-id-per-bag graph (optional: without it every batch runs dlrm.onnx).
  [ -f "$ARTIFACTS/dlrm.one_id.onnx" ] && EXTRA+=("$ARTIFACTS/dlrm.one_id.onnx")
fi

mkdir -p "$MODEL_STORE"
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/dlrm-mar.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT

# Only the modules the handler imports (dlrm_serve.serve.packaging follows its
# imports): no launcher, client, trainer or converter in the archive.
# --extra-files copies a folder's contents; staging the package under a parent
# keeps the dlrm_serve/ folder itself in the archive.
mkdir -p "$STAGE/lib"
MODULES=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m dlrm_serve.serve.packaging handler/dlrm_handler.py "$ROOT") \
  || die "could not list the modules handler/dlrm_handler.py imports"
for rel in $MODULES; do
  mkdir -p "$STAGE/lib/$(dirname "$rel")"
  cp "$rel" "$STAGE/lib/$rel"
done
EXTRA+=("$STAGE/lib")

cat > "$STAGE/model-config.yaml" <<EOF
# TorchServe settings of this archive (written by build_mar.sh).
minWorkers: $WORKERS
maxWorkers: $WORKERS
batchSize: $BATCH_SIZE
maxBatchDelay: $MAX_BATCH_DELAY
responseTimeout: $RESPONSE_TIMEOUT
startupTimeout: $STARTUP_TIMEOUT
$([ "$DEVICE" = gpu ] && echo "deviceType: gpu")
# Read by handler/dlrm_handler.py.
dlrm:
  backend: $BACKEND
  max_rows: $MAX_ROWS
  threads: $THREADS
  touch_tables: $TOUCH_TABLES
  precision: $PRECISION
EOF

EXTRA_CSV=$(IFS=,; echo "${EXTRA[*]}")
"$ARCHIVER" \
  --model-name "$MODEL_NAME" \
  --version "$VERSION" \
  --handler handler/dlrm_handler.py \
  --serialized-file "$SERIALIZED" \
  --extra-files "$EXTRA_CSV" \
  --config-file "$STAGE/model-config.yaml" \
  --archive-format "$ARCHIVE_FORMAT" \
  --export-path "$MODEL_STORE" \
  --force

case "$ARCHIVE_FORMAT" in
  no-archive) OUT="$MODEL_STORE/$MODEL_NAME" ;;
  *) OUT="$MODEL_STORE/$MODEL_NAME.mar" ;;
esac
[ -e "$OUT" ] || die "torch-model-archiver ran but '$OUT' is not there"

if [ -n "$KSERVE_OUT" ]; then
  # KServe's TorchServe runtime starts 'torchserve --start --model-store=/mnt/models/model-store
  # --ts-config=/mnt/models/config/config.properties' next to its wrapper, which serves
  # KServe's ports 8080 (REST) and 8081 (gRPC) and forwards to the addresses below.
  cat > "$KSERVE_OUT/config/config.properties" <<EOF
# TorchServe inside KServe's TorchServe runtime (written by build_mar.sh --kserve).
# The KServe wrapper in the same container owns 8080 and 8081 and forwards to
# TorchServe on loopback; only the wrapper and the metrics port face the pod network.
inference_address=http://127.0.0.1:8085
management_address=http://127.0.0.1:8086
metrics_address=http://0.0.0.0:8082
grpc_inference_address=127.0.0.1
grpc_inference_port=7070
grpc_management_address=127.0.0.1
grpc_management_port=7071
# TS_* environment variables override keys here.  The runtime sets TS_SERVICE_ENVELOPE
# from a label KServe forces to kserve/kservev2; the InferenceService sets it to "body"
# (deploy/kserve/torchserve-runtime.yaml): the handler reads v1 and v2 bodies itself.
enable_envvars_config=true
model_store=/mnt/models/model-store
load_models=all
model_snapshot={"name":"startup.cfg","modelCount":1,"models":{"$MODEL_NAME":{"$VERSION":{"defaultVersion":true,"marName":"$MODEL_NAME.mar","minWorkers":$WORKERS,"maxWorkers":$WORKERS,"batchSize":$BATCH_SIZE,"maxBatchDelay":$MAX_BATCH_DELAY,"responseTimeout":$RESPONSE_TIMEOUT}}}}
# KServe's wrapper calls TorchServe without a token, so in-pod token auth is off.
# What protects the endpoint is the cluster: the mesh (mTLS and an
# AuthorizationPolicy) and a NetworkPolicy on the predictor pods (deploy/kserve/).
disable_token_authorization=true
enable_model_api=false
allowed_urls=(?!x)x
metrics_mode=prometheus
model_metrics_auto_detect=true
max_request_size=16777216
max_response_size=2097152
job_queue_size=128
EOF
  echo "wrote the KServe layout $KSERVE_OUT (config/config.properties, model-store/$MODEL_NAME.mar)"
fi
echo "built $OUT (model $MODEL_NAME, version $VERSION, backend $BACKEND, device $DEVICE, precision $PRECISION, $WORKERS workers, batch $BATCH_SIZE / ${MAX_BATCH_DELAY} ms)"
