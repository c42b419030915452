#!/usr/bin/env bash
# Peer systems for benchmarks/peers.py (optional). omikuji, napkinXC and scikit-learn go in the project's venv
# (the `peers` extra); PECOS (libpecos) pins numpy<2, which the project's pyarrow cannot load, so it gets a venv of
# its own, .venv-pecos, with only what XR-Linear needs (its torch/transformers dependencies serve XR-Transformer,
# which the benchmark does not run, and would pull a multi-GB CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/pip install -q -e '.[peers,bench]'
if [ ! -x .venv-pecos/bin/python ]; then
  python3 -m venv .venv-pecos
fi
.venv-pecos/bin/pip install -q "numpy<2" "scipy<1.14" "scikit-learn<1.6"
.venv-pecos/bin/pip install -q --no-deps libpecos
.venv-pecos/bin/python -c "from pecos.xmc.xlinear.model import XLinearModel"
echo "peers ready: .venv (omikuji, napkinxc), .venv-pecos (PECOS XR-Linear)"
