#!/usr/bin/env bash
# One-command install into ./.venv (CPU torch; use your own CUDA torch if you have a GPU).
#   bash install.sh            # plugin + Qt + test tools
# Environment: PYTHON (default python3), TORCH_SPEC (default: torch==2.13.0 where a local
# wheel directory provides it, else torch).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# torch first and pinned, so no other requirement can pull a different (CUDA) build.
.venv/bin/python -m pip install -q "${find_links[@]}" "$TORCH_SPEC"
torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==${torch_version}" > .venv/torch-constraint.txt
.venv/bin/python -m pip install -q "${find_links[@]}" -c .venv/torch-constraint.txt -e ".[dev,parity]"
echo "napari-sam installed in $(pwd)/.venv"
