#!/usr/bin/env bash
# `make serve`: the model server and the HTTP bridge side by side; Ctrl-C stops both.
# Every flag has a GLMSERVE_* environment variable (see README); extra flags for each process can
# be passed with MODEL_SERVER_ARGS / BRIDGE_ARGS.
set -u
cd "$(dirname "$0")/.."
BIN=.venv/bin
GRPC_PORT=${GLMSERVE_PORT:-50051}

# Each line is labelled with its process; $! stays the process itself (not the labeller).
label() { sed -u "s/^/[$1] /"; }
$BIN/model-server --port "$GRPC_PORT" ${MODEL_SERVER_ARGS:-} > >(label model-server) 2>&1 &
server=$!
$BIN/http-bridge --backend "127.0.0.1:$GRPC_PORT" ${BRIDGE_ARGS:-} > >(label http-bridge) 2>&1 &
bridge=$!

stop() {
  trap - INT TERM
  kill -TERM "$server" "$bridge" 2>/dev/null
  wait "$server" "$bridge" 2>/dev/null
  exit 0
}
trap stop INT TERM
echo "glmserve: gRPC on 127.0.0.1:$GRPC_PORT, OpenAI API + chat page on http://127.0.0.1:${GLMSERVE_BRIDGE_PORT:-8000}/ (Ctrl-C stops both)"
# If either process dies, stop the other one too.
wait -n "$server" "$bridge"
stop
