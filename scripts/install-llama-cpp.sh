#!/usr/bin/env bash
# Installs llama.cpp for `clawrl-tui bench --against-llama-cpp`: llama-cpp-python 0.3.36 built
# from source (PyPI ships no CPU wheel; the build compiles llama.cpp for this CPU) in a virtual
# environment at target/llama-cpp (or $1). Needs python3 with venv, cmake and a C++ compiler.
# Measured: 188 s on a 2-core AMD EPYC (2026-11-27).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-target/llama-cpp}"
start=$(date +%s)
python3 -m venv "$venv"
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$venv/bin/pip" install --quiet --no-cache-dir \
  --disable-pip-version-check llama-cpp-python==0.3.36 numpy
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
echo "installed in $venv in $(( $(date +%s) - start )) s"
