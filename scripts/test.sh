#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the default test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -k config` or `bash scripts/test.sh -m slow` for the long tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
# tests/test_console.py opens evaluate's report.html in headless Chromium (Debian's package). Install it where it is
# missing and apt can (root, or passwordless sudo); without it that one test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo -n"; fi
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "scripts/test.sh: could not install chromium with apt-get; the report's browser test will skip" >&2
fi
export RAY_USAGE_STATS_ENABLED=0
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest -q "$@"
