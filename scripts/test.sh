#!/usr/bin/env bash
# Set up (scripts/setup.sh test) and run every check: ruff, mypy, then the test tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
mypy pdserve
python -m pytest -q -ra "$@"
