#!/usr/bin/env bash
# Old-versus-new runs on the GPU machine: two wheels installed side by side, alternated.
#
#   here:  (cd python && maturin build --release --out ../target/devab/new)
#          build the old commit's wheel the same way into target/devab/old
#          (e.g. `git archive OLD | tar -x -C /tmp/old` and CARGO_TARGET_DIR=/tmp/oldtarget)
#   there: scripts/gpu_ab.sh tests|staging|cross OUT_DIR   (carry target/devab)
#
# tests:   the GPU tests on the new wheel
# staging: scripts/bench_staging.py per layout (LAYOUTS, default "tp4k small8k llama"),
#          old, new, old, new; REPS (default 5) and POOL (default 4gb; it must hold REPS
#          requests of 512 MiB, or W-TinyLFU turns the newest blocks away and a query misses)
# cross:   scripts/bench_cuda.py --layout cross --reps 30, old, new, old, new
# Results go to OUT_DIR/{tests,staging,cross}.log; the JSON lines of staging carry the
# per-run p50s and the server's split.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=$1
out=$2
mkdir -p "$out"
for v in old new; do
  [ -d "/tmp/pf-$v" ] || python -m pip install -q --no-deps --target "/tmp/pf-$v" target/devab/$v/*.whl
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
base_path=$PATH
use() { export PYTHONPATH=/tmp/pf-$1 PATH=/tmp/pf-$1/bin:$base_path; }
case "$phase" in
tests)
  use new
  (cd python && timeout 500 python -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_connector.py 2>&1 |
    tail -15) | tee "$out/tests.log"
  ;;
staging)
  for layout in ${LAYOUTS:-tp4k small8k llama}; do
    for v in old new old new; do
      use "$v"
      echo "=== $layout $v" | tee -a "$out/staging.log"
      timeout 150 python scripts/bench_staging.py --layout "$layout" --staging-mib 512 \
        --pool-size "${POOL:-4gb}" --modes on --reps "${REPS:-5}" 2>&1 | grep '^{' | tee -a "$out/staging.log"
    done
  done
  ;;
cross)
  for v in old new old new; do
    use "$v"
    echo "=== cross $v" | tee -a "$out/cross.log"
    timeout 200 python scripts/bench_cuda.py --reps 30 --layout cross 2>&1 |
      grep -E "link limit|8B-|at once|matmul" | tee -a "$out/cross.log"
  done
  ;;
*)
  echo "usage: $0 tests|staging|cross OUT_DIR" >&2
  exit 2
  ;;
esac
