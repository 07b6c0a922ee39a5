#!/usr/bin/env bash
# Installs llama.cpp for `clawrl-tui bench --against-llama-cpp`: llama-cpp-python 0.3.36 built
# from source (PyPI ships no CPU wheel; the build compiles llama.cpp for this CPU) in a virtual
# environment at target/llama-cpp (or $1). Needs python3 with venv, cmake and a C++ compiler.
# Measured: 188 s on a 2-core AMD EPYC (2026-11-27), 238 s on a 2-core Intel Xeon (2026-12-07).
#
# Then it evaluates a 64-token batch on the default model (when it is installed): on the Intel
# Xeon of 2026-12-07 (a VM that lists amx_tile) the native build's AMX path segfaulted on every
# batch of more than one token. If the check fails, llama.cpp is rebuilt for this CPU's
# instruction sets without AMX, and the script says so.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-target/llama-cpp}"
model="${CLAWRL_DATA_DIR:-$HOME/.local/share/clawrl-tui}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
start=$(date +%s)
python3 -m venv "$venv"

# $1: CMake arguments; $2...: pip options (a rebuild forces the reinstall of llama.cpp alone).
build() {
  CMAKE_ARGS="$1" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$venv/bin/pip" install --quiet \
    --no-cache-dir --disable-pip-version-check "${@:2}" llama-cpp-python==0.3.36 numpy
}

batch_works() {
  [ -f "$model" ] || { echo "($model not installed: the batch check is skipped)"; return 0; }
  "$venv/bin/python" - "$model" <<'EOF' >/dev/null 2>&1
import sys, llama_cpp
m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
m.eval(list(range(100, 164)))
EOF
}

build ""
if ! batch_works; then
  flags=$(grep -m1 '^flags' /proc/cpuinfo)
  args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 \
    avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
    if grep -qw "${pair%%:*}" <<<"$flags"; then args="$args -DGGML_${pair##*:}=ON"; fi
  done
  echo "llama.cpp's native build failed a 64-token batch; rebuilding without AMX ($args)"
  build "$args" --force-reinstall --no-deps
  batch_works || { echo "llama.cpp still fails a 64-token batch" >&2; exit 1; }
fi
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
echo "installed in $venv in $(( $(date +%s) - start )) s"
