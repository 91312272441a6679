#!/usr/bin/env bash
# Create .venv and install pdserve into it. Usage: scripts/setup.sh [EXTRAS]   (e.g. "test")
# CPU torch is pinned first (torch==2.13.0, a local CPU build) so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q torch==2.13.0
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
python -m pip install -q -e "$spec"
