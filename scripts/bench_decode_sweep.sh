#!/usr/bin/env bash
# Decode inter-token latency (examples/bench_kv_cache.py --decode) under several settings,
# each in a fresh engine process, one after the other on the GPU machine:
#
#   scripts/bench_decode_sweep.sh OUT_DIR 'NAME|CONNECTOR|ENV=VALUE ...' ...
#
# CONNECTOR: `none`, `pegaflow` (spawns a server with a 16 GB pool; the environment
# assignments reach it, e.g. PEGAFLOW_CUDA_SAVE_GBPS=30), or `noise:MIBxK` (no connector,
# while scripts/probe_d2h_interference.py copies K × MIB MiB per wait to the host).
# Writes OUT_DIR/NAME.out (the run's output) and one summary line per run to
# OUT_DIR/sweep.jsonl. vLLM must be importable (scripts/stage_vllm_gpu.sh says how).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
shift
mkdir -p "$out"
export VLLM_USE_FLASHINFER_SAMPLER=0
stop=/tmp/pegaflow-d2h.stop
for spec in "$@"; do
  IFS='|' read -r name connector envs <<<"$spec"
  flags=(--connector none)
  noise_pid=""
  case "$connector" in
  pegaflow) flags=(--connector pegaflow --spawn-server --pool-size 16gb) ;;
  none) ;;
  noise:*)
    shape=${connector#noise:}
    python scripts/probe_d2h_interference.py --mib "${shape%x*}" --per-sync "${shape#*x}" \
      --stop-file "$stop" >"$out/$name.noise" 2>&1 &
    noise_pid=$!
    ;;
  *)
    echo "unknown connector $connector in '$spec'" >&2
    exit 2
    ;;
  esac
  started=$(date +%s)
  # shellcheck disable=SC2086 # ENV assignments are split on purpose
  env $envs timeout 300 python examples/bench_kv_cache.py --llama-8b-dummy --prompts 10 \
    --prompt-tokens 4096 --decode "${flags[@]}" >"$out/$name.out" 2>&1
  rc=$?
  if [ -n "$noise_pid" ]; then
    touch "$stop"
    wait "$noise_pid"
    rm -f "$stop"
  fi
  summary=$(grep '^{' "$out/$name.out" | tail -1)
  python - "$name" "$rc" "$(($(date +%s) - started))" "$summary" <<'EOF' | tee -a "$out/sweep.jsonl"
import json, sys
name, rc, secs, line = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
run = json.loads(line) if line else {}
keys = ("itl_no_prefill_p50_ms", "itl_no_prefill_p99_ms", "itl_p99_ms", "server_save_gb_per_s")
print(json.dumps({"name": name, "rc": rc, "seconds": secs, **{k: run.get(k) for k in keys}}))
EOF
done
