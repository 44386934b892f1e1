#!/usr/bin/env bash
# Set-up from nothing, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest -q -p no:cacheprovider tests
