#!/usr/bin/env bash
# Brings vLLM 0.26.0 (the newest vLLM whose torch pin, 2.11, matches the lent GPU
# machine's) to a machine without internet, in pieces small enough for one transfer.
#
#   scripts/stage_vllm_gpu.sh prepare        # here: download, split into target/vllm026/carry/N
#   scripts/stage_vllm_gpu.sh receive N      # there, once per piece, N = 0, 1, ...
#   scripts/stage_vllm_gpu.sh install DIR    # there, after the last piece: vLLM into DIR
#
# Each piece travels with one command (the device tool's `carry`), one command after the
# other while the machine stays up (files outside the working tree survive until it is
# given back). Then: PYTHONPATH=DIR VLLM_USE_FLASHINFER_SAMPLER=0 python ...
# Downloads stay under target/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_WHEEL=vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
VLLM_SHA256=adb1e4c9
DEPS_LIST=${PEGAFLOW_VLLM_DEPS_LIST:-../shared/bench/vllm026-device-wheels.txt}
STAGE=/tmp/pegaflow-vllm-stage
PIECE_MB=55

prepare() {
  local out=target/vllm026
  mkdir -p "$out/deps"
  [ -f "$out/$VLLM_WHEEL" ] || python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi abi3 \
    --platform manylinux_2_28_x86_64 vllm==0.26.0 -d "$out"
  local platforms=()
  for v in 5 17 24 26 27 28 29 30 31 32 33 34 35; do
    platforms+=(--platform "manylinux_2_${v}_x86_64")
  done
  # One name==version per wheel of the list (cp312, manylinux x86_64).
  mapfile -t specs < <(sed -E 's/^([A-Za-z0-9_.]+)-([^-]+)-.*/\1==\2/' "$DEPS_LIST")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" \
    --platform manylinux2014_x86_64 --platform any "${specs[@]}" -d "$out/deps"
  rm -rf "$out/carry"
  mkdir -p "$out/carry/0"
  cp "$out"/deps/*.whl "$out/carry/0/"
  local parts
  parts=$(mktemp -d)
  split -b "${PIECE_MB}M" -d -a 2 "$out/$VLLM_WHEEL" "$parts/vllm.whl.part"
  local n=1
  for part in "$parts"/vllm.whl.part*; do
    mkdir -p "$out/carry/$n"
    mv "$part" "$out/carry/$n/"
    n=$((n + 1))
  done
  rmdir "$parts"
  echo "pieces: target/vllm026/carry/0 .. $((n - 1)) (carry one per command, in order)"
}

receive() {
  mkdir -p "$STAGE"
  cp "target/vllm026/carry/$1/"* "$STAGE/"
  du -sh "$STAGE"
}

install() {
  local dir=$1
  cat "$STAGE"/vllm.whl.part* >"$STAGE/$VLLM_WHEEL"
  sha256sum "$STAGE/$VLLM_WHEEL" | grep -q "^$VLLM_SHA256" || {
    echo "reassembled $VLLM_WHEEL does not match sha256 $VLLM_SHA256..." >&2
    exit 1
  }
  rm -f "$STAGE"/vllm.whl.part*
  python -m pip install -q --no-index --no-deps --target "$dir" "$STAGE"/*.whl
  PYTHONPATH=$dir python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
}

case "${1:-}" in
prepare) prepare ;;
receive) receive "$2" ;;
install) install "$2" ;;
*)
  echo "usage: $0 prepare | receive N | install DIR" >&2
  exit 2
  ;;
esac
