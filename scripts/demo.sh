#!/usr/bin/env bash
# Set-up from nothing, then the demo: train, record, detect events, write the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/torchvitals demo --out runs/demo
