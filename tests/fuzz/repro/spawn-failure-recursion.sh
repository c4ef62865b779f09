#!/usr/bin/env bash
# Found by scripts/fuzz (http target). A model whose llama_server cannot be
# run: the first request gets 502; the second makes the daemon recurse
# (router_run → do_start → pool_model_add → instance_start → begin_start:
# the spawn fails → set_state(FAILED) → pool_hook → router_run → …) until
# the stack overflows: SIGSEGV.
# Exit 0 when the daemon survives both requests, 1 when it dies.
set -u
build=${LLAMA_POOL_BUILD:-build}
bin=$(cd "$(dirname "$0")/../../.." && pwd)/$build/llama-pool
tmp=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; sleep 0.3; rm -rf "$tmp"' EXIT
printf 'GGUF\003\0\0\0' > "$tmp/m.gguf"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$tmp/pool.conf" <<CONF
[pool]
listen = 127.0.0.1:$port
control_socket = $tmp/c.sock
llama_server = /nonexistent/llama-server
log_dir = $tmp/logs

[model tiny]
path = $tmp/m.gguf
memory = 1G
CONF
"$bin" serve -c "$tmp/pool.conf" > "$tmp/log" 2>&1 &
pid=$!
for _ in $(seq 50); do [ -S "$tmp/c.sock" ] && break; sleep 0.1; done
for i in 1 2; do
  code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1/chat/completions" \
         -d '{"model":"tiny","messages":[{"role":"user","content":"x"}]}')
  echo "request $i: HTTP $code"
done
sleep 0.3
if kill -0 "$pid" 2>/dev/null; then echo "daemon alive: fixed"; exit 0; fi
wait "$pid"; rc=$?
echo "daemon died with status $rc after $(grep -c 'cannot start' "$tmp/log") 'cannot start' lines: bug present"
exit 1
