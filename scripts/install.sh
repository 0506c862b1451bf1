#!/usr/bin/env bash
# Installs dist-optim into the current Python environment.
#   bash scripts/install.sh          # the package and what the main job needs
#   bash scripts/install.sh dev      # ... plus the test tools, DeepSpeed and accelerate
# torch is installed first and explicitly, so that pip never resolves an unpinned torch (which on
# PyPI is a multi-GB CUDA build). Without a GPU we take the CPU build: from a local wheel cache
# when one is configured, else from PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${DIST_OPTIM_TORCH_VERSION:-2.13.0}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if "$PY" -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 6))' 2>/dev/null; then
    echo "install.sh: using installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "torch==${TORCH_VERSION}"
else
    # CPU build: local wheels first (no network), then PyTorch's CPU index.
    pip_install --no-index "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
        || pip_install "torch==${TORCH_VERSION}+cpu" --index-url https://download.pytorch.org/whl/cpu
fi

extras=""
if [ "${1:-}" = "dev" ]; then
    extras="[dev]"
    # DeepSpeed ships as a source distribution whose build imports torch: build it against the torch
    # installed above, never in an isolated environment (which would fetch a CUDA torch).
    pip_install --no-build-isolation "deepspeed==${DIST_OPTIM_DEEPSPEED_VERSION:-0.19.8}"
fi
pip_install -e ".${extras}"
