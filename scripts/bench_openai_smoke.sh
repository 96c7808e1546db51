#!/usr/bin/env bash
# examples/bench_kv_cache.py against a real OpenAI server (vLLM's api_server, CPU build,
# with PegaFlow): cold and warm-reset passes, then a restarted server's warm-fresh pass,
# each warm pass required to hit. Usage: scripts/bench_openai_smoke.sh MODEL_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1
port_of() { python -c "from pegaflow.server import free_port; print(free_port())"; }
pf_port=$(port_of)
api_port=$(port_of)
log_dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

pegaflow-server --addr "127.0.0.1:$pf_port" --pool-size 256mb --metrics-addr "" \
  > "$log_dir/server.log" 2>&1 &
pids+=($!)

start_api() {
  # vLLM 0.26 seeds block hashes per process unless PYTHONHASHSEED is set.
  VLLM_SERVER_DEV_MODE=1 PYTHONHASHSEED=0 python -m vllm.entrypoints.openai.api_server \
    --model "$model" --dtype float32 --max-model-len 512 --port "$api_port" \
    --enforce-eager --kv-cache-memory-bytes 268435456 --enable-prompt-tokens-details \
    --kv-transfer-config "{\"kv_connector\":\"PegaKVConnector\",\"kv_role\":\"kv_both\",
      \"kv_connector_module_path\":\"pegaflow.connector\",
      \"kv_connector_extra_config\":{\"endpoint\":\"127.0.0.1:$pf_port\"}}" \
    > "$log_dir/api-$1.log" 2>&1 &
  api_pid=$!
  pids+=("$api_pid")
  for _ in $(seq 1 300); do
    if python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$api_port/health', timeout=2)" \
      2> /dev/null; then return 0; fi
    if ! kill -0 "$api_pid" 2>/dev/null; then break; fi
    sleep 1
  done
  tail -40 "$log_dir/api-$1.log"
  echo "vLLM's OpenAI server did not come up" >&2
  return 1
}

bench() {
  python examples/bench_kv_cache.py --openai-url "http://127.0.0.1:$api_port" \
    --prompts 2 --prompt-tokens 300 --vocab-size 500 --expect-hits --openai-passes "$1"
}

start_api first
bench cold,warm-reset
kill "$api_pid"
wait "$api_pid" 2>/dev/null || true
start_api second
bench warm-fresh
