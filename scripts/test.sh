#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the default test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -k config` or `bash scripts/test.sh -m slow` for the long tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest -q "$@"
