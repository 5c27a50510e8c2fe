#!/usr/bin/env bash
# bench scale's issue-6 burst with HTTP in the path: a gateway on 6 local agents (the config in
# bench/configs/issue6-gateway.yaml), 2 instances of MODEL, then `lambdascale bench serve --trace
# burst:48`: the autoscaler scales the model out to all 6 nodes while the burst waits, through the
# same serving core bench scale drives.
#
#   bench/burst_gateway.sh MODELS_DIR [MODEL] [OUT_JSON]
#
# MODELS_DIR holds MODEL (default synthetic-qwen2-0.5b, imported as docs/BENCHMARKS.md says).
set -euo pipefail
cd "$(dirname "$0")/.."
models=${1:?usage: bench/burst_gateway.sh MODELS_DIR [MODEL] [OUT_JSON]}
model=${2:-synthetic-qwen2-0.5b}
out=${3:-burst-gateway.json}
port=${PORT:-8137}
url="http://127.0.0.1:$port"
ls=.venv/bin/lambdascale
work=$(mktemp -d)
trap 'kill -INT $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
$ls serve --config bench/configs/issue6-gateway.yaml --models-dir "$models" --port "$port" \
    --registry-path "$work/registry.sqlite" > "$work/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do curl -sf "$url/health" > /dev/null && break; sleep 1; done
curl -sf "$url/health" > /dev/null || { cat "$work/serve.log"; exit 1; }
# 2 holders; 48 requests at 8 per instance ask the autoscaler for all 6 nodes in one decision
$ls deploy "$model" --min-instances 2 --max-instances 6 --target-concurrency 8 --keep-alive-s 600 --url "$url"
for _ in $(seq 1 900); do
  n=$(curl -sf "$url/admin/status" | python3 -c "import json,sys; print(sum(1 for i in json.load(sys.stdin)['instances'] if i['state'] == 'full'))")
  [ "$n" -ge 2 ] && break; sleep 1
done
$ls bench serve --url "$url" --model "$model" --trace burst:48 --max-output-tokens 8 --out "$out"
grep -E "scale-out of|pipeline .* (serving|dissolved)" "$work/serve.log" || true
