# Sourced by the repro scripts in this directory (not run on its own): a
# llama-pool daemon on a one-model config in a temporary directory, killed
# and removed at exit.
#   repro_serve POOL_LINES   writes $tmp/pool.conf ([pool] with listen,
#                            control_socket, POOL_LINES, log_dir; [model
#                            tiny] on a stub GGUF of 1G) and starts the
#                            daemon ($pid), its log in $tmp/log; returns
#                            once its control socket $tmp/c.sock is there
#   repro_chat SECONDS       one chat request for tiny; prints its HTTP status
# Also set: $root (the checkout), $build (LLAMA_POOL_BUILD, default build),
# $bin (llama-pool), $port (the listen port).
build=${LLAMA_POOL_BUILD:-build}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
bin=$root/$build/llama-pool
tmp=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; sleep 0.5; rm -rf "$tmp"' EXIT
printf 'GGUF\003\0\0\0' > "$tmp/m.gguf"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

repro_serve() {
  cat > "$tmp/pool.conf" <<CONF
[pool]
listen = 127.0.0.1:$port
control_socket = $tmp/c.sock
$1
log_dir = $tmp/logs

[model tiny]
path = $tmp/m.gguf
memory = 1G
CONF
  "$bin" serve -c "$tmp/pool.conf" > "$tmp/log" 2>&1 &
  pid=$!
  for _ in $(seq 50); do [ -S "$tmp/c.sock" ] && break; sleep 0.1; done
}

repro_chat() {
  curl -s -m "$1" -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1/chat/completions" \
       -d '{"model":"tiny","messages":[{"role":"user","content":"x"}]}'
}
