#!/usr/bin/env bash
# The GPU check, for a machine with a GPU and no internet: the device-independent model tests
# (a Qwen3 forward pass against its float64 reference, cached decoding, LoRA gradients against
# finite differences, one RL and one OPD step) on the GPU, then prefill/decode speed on the GPU
# against this machine's CPU in one invocation, a training step's time, and one chat request
# through the OpenAI-compatible server, all on a random-weight model of Qwen3-0.6B's shape.
#
#   scripts/gpu-check.sh BIN OUT [DEVICE]
#
# BIN holds binaries built elsewhere with `--features wgpu` (or cuda): clawrl-tui, and the
# test binaries qwen3_tiny and train_math (cargo test --release --features wgpu --no-run;
# copied from target/release/deps without their hash). DEVICE: wgpu (default) or cuda.
# Needs python3 with numpy, and the Qwen3 tokenizer in target/test-assets/qwen3-tokenizer.
# CLAWRL_GPU_CHECK_SHAPE=tiny runs the same steps on a tiny model (a dry run on a CPU).
set -uo pipefail
bin=$(realpath "$1")
out=$(realpath "$2")
dev=${3:-wgpu}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export CLAWRL_TEST_DEVICE=$dev RUST_LOG=warn
# A data and config directory of its own: nothing of the user's is read or written.
export XDG_DATA_HOME=$(mktemp -d) XDG_CONFIG_HOME=$(mktemp -d)
status=0
step() { echo; echo "== $*"; }

step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step "model tests on $dev"
for t in qwen3_tiny train_math; do
  "$bin/$t" --test-threads 1 2>&1 | tee "$out/$t.log" | grep -E '^test |test result|panicked|device' || status=1
done

if grep -q AdapterUnavailable "$out"/qwen3_tiny.log; then
  echo "no $dev adapter: is the Vulkan loader (libvulkan1) and the driver's ICD installed?"; exit 1
fi

step "random Qwen3-0.6B-shaped model"
model=/tmp/clawrl-gpu-check-model
python3 scripts/random-model.py "$model" --shape "${CLAWRL_GPU_CHECK_SHAPE:-qwen3-0.6b}" --tokenizer target/test-assets/qwen3-tokenizer || exit 1

step "prefill and decode: CPU ($(nproc) threads) vs $dev"
"$bin/clawrl-tui" --model "$model" bench --variants "f32:dense@cpu,f32:dense@$dev,f16:dense@$dev" \
  --prompt-tokens 256 --decode-tokens 32 --runs 2 2>&1 | tee "$out/bench.log" || status=1

step "training step and adapter serving on $dev"
"$bin/clawrl-tui" --model "$model" --device "$dev" bench --train --parts-only 2>&1 \
  | tee "$out/bench-train.log" || status=1

step "one chat request through the server on $dev"
CLAWRL__JUDGE__BACKEND=off "$bin/clawrl-tui" --model "$model" --device "$dev" \
  serve --headless --port 30555 >"$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 120); do curl -sf localhost:30555/health >/dev/null && break; sleep 1; done
curl -sS --fail-with-body -m 120 localhost:30555/v1/chat/completions -H 'content-type: application/json' \
  -d '{"model":"clawrl-gpu-check-model","messages":[{"role":"user","content":"Say hi."}],"max_tokens":16,"temperature":0}' \
  | tee "$out/chat.json" | head -c 600 || status=1
echo
kill $server; wait $server 2>/dev/null
tail -5 "$out/serve.log"
exit $status
