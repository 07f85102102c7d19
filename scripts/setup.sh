#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh machine: a virtual environment in .venv with qwen2audio and
# its test dependencies. torch is pinned to the CPU build 2.13.0 first, so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
