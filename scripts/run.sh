#!/usr/bin/env bash
# Set up and run the main job: the PD cluster on the embedded default model (127.0.0.1:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec pdserve up "$@"
