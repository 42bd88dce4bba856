#!/usr/bin/env bash
# make serve: demo model -> archive -> TorchServe in the background -> one prediction.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY=$VENV/bin/python
INFERENCE=http://127.0.0.1:8080
MODEL=dlrm
WAIT_S=${SERVE_WAIT_S:-180}

say() { echo "serve: $*"; }
die() { echo "serve: $*" >&2; exit 1; }

[ -x "$PY" ] || make setup
bash scripts/ensure_java.sh

# 1. The model: train the demo model when artifacts/ holds none.
if [ ! -f artifacts/dlrm.json ] || [ ! -f artifacts/dlrm.safetensors ]; then
  say "artifacts/ is empty: training the demo model (a few minutes on 2 cores)"
  $VENV/bin/dlrm-serve train --out artifacts
fi

# 2. Refuse to start twice: TorchServe's ports must be free.
busy=()
for port in 8080 8081 8082 7070 7071; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then busy+=("$port"); fi
done
if [ ${#busy[@]} -gt 0 ]; then
  if [ -f key_file.json ] && curl -s -o /dev/null -w '%{http_code}' "$INFERENCE/ping" \
       -H "Authorization: Bearer $("$PY" -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')" \
       | grep -q 200; then
    die "TorchServe is already running on 127.0.0.1:${busy[*]} (started from $(pwd)). Run 'make stop' first, or use it as it is."
  fi
  die "ports ${busy[*]} on 127.0.0.1 are in use (TorchServe from another folder, or another program). Stop it first ('make stop' stops one started here)."
fi

# 3. The archive.
./build_mar.sh

# 4. TorchServe, detached from this shell: its own session, no inherited pipes.
mkdir -p logs
rm -f key_file.json
say "starting TorchServe (config.properties, model_store/); output in logs/torchserve.out"
setsid "$VENV/bin/torchserve" --start --ncs --ts-config config.properties --model-store model_store \
  --log-config log4j2.xml >logs/torchserve.out 2>&1 </dev/null &

# 5. Wait until the model answers a prediction.
SAMPLE='{"dense": [1, 5, 0, 16, 1382, 4, 15, 2, 181, 1, 2, null, 2], "sparse": ["68fd1e64", "80e26c9b", "fb936136", "7b4723c4", "25c83c98", "7e0ccccf", "de7995b8", "1f89b562", "a73ee510", "a8cd5504", "b2cb9c98", "37c9c164", "2824a5f6", "1adce6ef", "8ba8b39a", "891b62e7", "e5ba7672", "f54016b9", "21ddcdc9", "b1252a9d", "07b5194c", null, "3a171ecb", "c5c50484", "e8b83407", "9727dd16"]}'
deadline=$((SECONDS + WAIT_S))
key=
answer=
while [ $SECONDS -lt $deadline ]; do
  if [ -z "$key" ] && [ -f key_file.json ]; then
    key=$("$PY" -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])' 2>/dev/null || true)
  fi
  if [ -n "$key" ]; then
    answer=$(curl -s -H "Authorization: Bearer $key" -H "Content-Type: application/json" \
      --data-binary "$SAMPLE" "$INFERENCE/predictions/$MODEL" || true)
    case "$answer" in *'"predictions"'*) break ;; esac
  fi
  sleep 1
done
case "$answer" in
  *'"predictions"'*) ;;
  *)
    echo "--- logs/torchserve.out ---" >&2; tail -n 20 logs/torchserve.out >&2 || true
    echo "--- logs/model_log.log ---" >&2; tail -n 20 logs/model_log.log >&2 || true
    die "TorchServe did not answer a prediction within ${WAIT_S}s (last answer: ${answer:-none}); see logs/. 'make stop' stops it."
    ;;
esac

cat <<EOF

TorchServe is serving '$MODEL' on 127.0.0.1 (REST 8080, management 8081, metrics 8082, gRPC 7070/7071).

Sample prediction: $answer

It came from:
  curl -H "Authorization: Bearer $key" -H "Content-Type: application/json" \\
    --data-binary '$SAMPLE' \\
    $INFERENCE/predictions/$MODEL

Keys are in key_file.json (inference, management; they expire after 60 minutes,
the API key issues new ones). Metrics: curl http://127.0.0.1:8082/metrics
'make stop' stops the server.
EOF
