#!/usr/bin/env bash
# Install into .venv (see setup.sh) and run the offline CPU test suite plus the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
# The triton extra too: the Triton kernels' tests run through Triton's CPU interpreter.
XMC_DST_EXTRAS=test,triton bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
