#!/usr/bin/env bash
# Set up (scripts/setup.sh test, plus Debian's prometheus for the observability test) and run
# every check: ruff, mypy, then the test tiers (unit, integration, e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if ! command -v prometheus >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
        || echo "test.sh: could not install prometheus; the live Prometheus test will skip" >&2
fi
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
mypy pdserve
python -m pytest -q -ra "$@"
