#!/usr/bin/env bash
# Creates .venv with a CPU build of torch and torchvitals (its CUDA backend is compiled
# too when nvcc is on PATH). Extra arguments name optional extras, e.g. "test".
set -euo pipefail
cd "$(dirname "$0")/.."
extras="report${1:+,$1}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to the CPU wheel here; CUDA users install their torch first (README).
.venv/bin/python -m pip install --quiet "torch==2.13.0" ".[${extras}]"
