#!/usr/bin/env bash
# Found by scripts/fuzz (http target). An operator start (POST
# /pool/models/M/start, `llama-pool start M`) or GET /pool/server?model=M that
# is refused for memory reads M's estimate through pool_admit →
# pool_model_estimate, which sets m->est_known without telling the
# scheduler; router_forward then skips model_info() (it sends the estimate
# only while !m->est_known), so the scheduler plans with a 0-byte estimate
# and starts M on the next request, far past the budget.
# Exit 0 when the request is refused (503) and nothing starts, 1 when M
# starts over the budget.
set -u
build=${LLAMA_POOL_BUILD:-build}
root=$(cd "$(dirname "$0")/../../.." && pwd)
bin=$root/$build/llama-pool
tmp=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; sleep 0.5; rm -rf "$tmp"' EXIT
printf 'GGUF\003\0\0\0' > "$tmp/m.gguf"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$tmp/pool.conf" <<CONF
[pool]
listen = 127.0.0.1:$port
control_socket = $tmp/c.sock
llama_server = $root/$build/fake-llama-server
memory_budget = 1M
memory_reserve = 0
log_dir = $tmp/logs

[model tiny]
path = $tmp/m.gguf
memory = 1G
CONF
"$bin" serve -c "$tmp/pool.conf" > "$tmp/log" 2>&1 &
pid=$!
for _ in $(seq 50); do [ -S "$tmp/c.sock" ] && break; sleep 0.1; done
echo "operator start: HTTP $(curl -s -o /dev/null -w '%{http_code}' --unix-socket "$tmp/c.sock" -X POST http://x/pool/models/tiny/start)"
code=$(curl -s -m 10 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1/chat/completions" \
       -d '{"model":"tiny","messages":[{"role":"user","content":"x"}]}')
echo "request: HTTP $code"
used=$(curl -s --unix-socket "$tmp/c.sock" http://x/pool/status |
       python3 -c 'import json,sys; d=json.load(sys.stdin)["memory"]; print(d["used"], "of", d["budget"])')
echo "memory used: $used bytes"
if [ "$code" = 503 ]; then echo "refused: fixed"; exit 0; fi
echo "tiny started past the budget: bug present"
exit 1
