#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine and run the whole suite (lint + tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test
venv="${LASTLAYER_VENV:-.venv}"
"$venv/bin/ruff" check src tests scripts benchmarks harness examples
"$venv/bin/ruff" format --check src tests scripts benchmarks harness examples
"$venv/bin/python" -m pytest -q "$@"
