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
. "$(dirname "$0")/daemon.bash"
repro_serve "llama_server = $root/$build/fake-llama-server
memory_budget = 1M
memory_reserve = 0"
echo "operator start: HTTP $(curl -s -o /dev/null -w '%{http_code}' --unix-socket "$tmp/c.sock" -X POST http://x/pool/models/tiny/start)"
code=$(repro_chat 10)
echo "request: HTTP $code"
used=$(curl -s --unix-socket "$tmp/c.sock" http://x/pool/status |
       python3 -c 'import json,sys; d=json.load(sys.stdin)["memory"]; print(d["used"], "of", d["budget"])')
echo "memory used: $used bytes"
if [ "$code" = 503 ]; then echo "refused: fixed"; exit 0; fi
echo "tiny started past the budget: bug present"
exit 1
