#!/usr/bin/env bash
# Load on a fresh server with the default configuration (judge and training on): CLIENTS
# streaming clients (default 32) for SECONDS (default 300), then the lost-turn check and the
# versions trained meanwhile. THINK (default 0) is each client's mean pause between a reply and
# its next message. The figures in docs/RELIABILITY.md come from this script.
#   scripts/load.sh [CLIENTS] [SECONDS] [THINK]
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CLAWRL_BIN:-target/release/clawrl-tui}"
data=$(mktemp -d)
key=load-test-key
# A fresh store and log, the models already installed.
ln -s "$("$bin" info | sed -n 's/^data dir: *//p')/models" "$data/models"
CLAWRL_DATA_DIR="$data" "$bin" serve --headless --port 0 --api-key "$key" 2> "$data/stderr" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
until port=$(grep -o 'http://127.0.0.1:[0-9]*' "$data/stderr" | head -1 | cut -d: -f3) && [ -n "$port" ]; do
  kill -0 $pid 2>/dev/null || { cat "$data/stderr" >&2; exit 1; }
  sleep 0.2
done
url="http://127.0.0.1:$port"
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/health")" = 200 ]; do sleep 0.5; done
# The judge's model loads after the server's: measure memory from when both are in.
for _ in $(seq 360); do grep -q "judge model ready" "$data"/logs/* 2>/dev/null && break; sleep 0.5; done
model=$(curl -s -H "Authorization: Bearer $key" "$url/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
python3 tests/clients/load.py "$url/v1" "$key" "$model" --clients "${1:-32}" --seconds "${2:-300}" \
  --think "${3:-0}" \
  --pid "$pid" --out "$data/load.json"
"$bin" export --store "$data/clawrl.sqlite" > "$data/export.jsonl"
python3 - "$data" <<'PY'
import json, sys
d = sys.argv[1]
acked = json.load(open(f"{d}/load.json"))["acknowledged"]
stored = {json.loads(l)["response_id"] for l in open(f"{d}/export.jsonl")}
lost = [a for a in acked if a not in stored]
print(f"acknowledged turns: {len(acked)}, in the store: {len(acked) - len(lost)}, lost: {len(lost)}")
PY
curl -s -H "Authorization: Bearer $key" "$url/admin/status" > "$data/status.json"
python3 - "$data/status.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"versions: {s['versions']}, live v{s['live_version']}, trainer updates {s['trainer'].get('updates')}, judge backlog {s['judge_pending']}")
PY
echo "server errors logged: $(grep -c " ERROR " "$data"/logs/* || true); data in $data"
