#!/usr/bin/env bash
# Found by scripts/fuzz (http target). A model whose llama_server cannot be
# run: the first request gets 502; the second makes the daemon recurse
# (router_run → do_start → pool_model_add → instance_start → begin_start:
# the spawn fails → set_state(FAILED) → pool_hook → router_run → …) until
# the stack overflows: SIGSEGV.
# Exit 0 when the daemon survives both requests, 1 when it dies.
set -u
. "$(dirname "$0")/daemon.bash"
repro_serve "llama_server = /nonexistent/llama-server"
for i in 1 2; do
  code=$(repro_chat 5)
  echo "request $i: HTTP $code"
done
sleep 0.3
if kill -0 "$pid" 2>/dev/null; then echo "daemon alive: fixed"; exit 0; fi
wait "$pid"; rc=$?
echo "daemon died with status $rc after $(grep -c 'cannot start' "$tmp/log") 'cannot start' lines: bug present"
exit 1
