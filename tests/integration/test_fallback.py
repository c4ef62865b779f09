"""Fallback upstream (issue #13 part 4): a request this pool cannot serve
(the model can never fit, its queue is full, it failed, or it is not
configured here with fallback_unknown) goes to another server, here a
second llama-pool daemon with the stand-in, and its answer comes back with
X-Llama-Pool-Served-By: fallback."""
import http.client
import json
import re
import socket
import threading
import time

import pytest

from conftest import REAL, Pool, call_failed, fake_only, free_port_block, wait_for

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
POOL_KEY = "pool-secret"        # the pool's own api key: never sent on
FALLBACK_KEY = "fallback-secret"

pytestmark = fake_only("needs the stand-in's knobs (load time, crashes, slow tokens)")


def post(port, body, headers=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def metric(pool, name_and_labels):
    code, body = pool.get("/metrics")
    assert code == 200
    for line in body.decode().splitlines():
        if line.startswith(name_and_labels + " "):
            return float(line.split()[-1])
    return None


@pytest.fixture
def fallback(tmp_path, pool, request):
    """A second daemon, the fallback: tiny (fast) and "elsewhere", which the
    pool under test does not have. Its ports are apart from the pool's."""
    fb_dir = tmp_path / "fallback"
    fb_dir.mkdir()
    fb = Pool(fb_dir)
    taken = [(pool.port_base, pool.port_base + 20), (pool.listen_port, pool.listen_port + 1)]
    fb.port_base = free_port_block(20, avoid=taken)
    fb.listen_port = free_port_block(1, avoid=taken + [(fb.port_base, fb.port_base + 20)])
    yield fb
    if call_failed(request):
        print("---- fallback daemon log ----")
        print(fb.daemon_log()[-4000:])
    fb.cleanup()


def start_fallback(fb, tiny_env=None, pool_extra=""):
    fb.config({"tiny": {"env": tiny_env or {}}, "elsewhere": {}}, pool_extra=pool_extra)
    fb.start()
    return f"http://127.0.0.1:{fb.listen_port}"


def served_by_fallback(status, headers, body):
    assert status == 200, body
    assert headers.get("X-Llama-Pool-Served-By") == "fallback", headers
    assert json.loads(body)["choices"]


def test_a_model_that_can_never_fit_goes_to_the_fallback(pool, fallback):
    url = start_fallback(fallback)
    pool.config({"tiny": {"memory": "2G"}}, pool_extra=f"memory_budget = 1G\nfallback = {url}")
    pool.start()
    served_by_fallback(*post(pool.listen_port, {**CHAT, "model": "tiny"}))
    assert not pool.instances("tiny"), "nothing is started here"
    assert fallback.ready_instances("tiny"), "the fallback served it"
    assert re.search(r"tiny: POST /v1/chat/completions: not served here \(it does not fit the "
                     r"memory budget\): sent to the fallback " + re.escape(url), pool.daemon_log())
    assert metric(pool, 'llama_pool_fallback_total{model="tiny",reason="never_fits"}') == 1


def test_a_full_queue_sends_the_next_request_to_the_fallback(pool, fallback):
    url = start_fallback(fallback)
    pool.config({"tiny": {"args": "-c 256 -np 1", "env": {"FAKE_TOKEN_MS": "300"}}},
                pool_extra=f"max_queue = 0\nfallback = {url}")
    pool.start()
    pool.cli("start", "tiny", check=0)
    slow = []
    t = threading.Thread(target=lambda: slow.append(post(pool.listen_port, {**CHAT, "model": "tiny"})))
    t.start()
    try:
        wait_for(lambda: pool.instances("tiny")[0]["in_flight"] == 1, what="the one slot taken")
        served_by_fallback(*post(pool.listen_port, {**CHAT, "model": "tiny"}))
    finally:
        t.join(30)
    status, headers, _ = slow[0]
    assert status == 200 and "X-Llama-Pool-Served-By" not in headers, "served here"
    assert metric(pool, 'llama_pool_fallback_total{model="tiny",reason="queue_full"}') == 1


def test_a_model_that_fails_to_start_and_then_is_failed_goes_to_the_fallback(pool, fallback):
    url = start_fallback(fallback)
    pool.config({"tiny": {"env": {"FAKE_CRASH_AT_LOAD": "1"}}},
                pool_extra=f"max_restarts = 1\nfallback = {url}")
    pool.start()
    # The start it waits for fails: the fallback answers, not a 502.
    served_by_fallback(*post(pool.listen_port, {**CHAT, "model": "tiny"}))
    assert metric(pool, 'llama_pool_fallback_total{model="tiny",reason="start_failed"}') == 1

    def failed():
        _, body = pool.get("/v1/models")
        return [m for m in json.loads(body)["data"] if m["id"] == "tiny"][0]["status"] == "failed"
    wait_for(failed, timeout=20, what="tiny failed (crash loop)")
    served_by_fallback(*post(pool.listen_port, {**CHAT, "model": "tiny"}))
    assert metric(pool, 'llama_pool_fallback_total{model="tiny",reason="failed"}') == 1


def test_an_unknown_model_goes_to_the_fallback_with_fallback_unknown(pool, fallback):
    url = start_fallback(fallback)
    pool.config({"tiny": {}}, pool_extra=f"fallback = {url}\nfallback_unknown = yes")
    pool.start()
    served_by_fallback(*post(pool.listen_port, {**CHAT, "model": "elsewhere"}))
    assert fallback.ready_instances("elsewhere")
    assert metric(pool, 'llama_pool_fallback_total{model="",reason="unknown"}') == 1
    # A model the fallback does not know either: its 404, relayed.
    status, headers, body = post(pool.listen_port, {**CHAT, "model": "nowhere"})
    assert status == 404 and headers.get("X-Llama-Pool-Served-By") == "fallback", body


def test_an_unknown_model_is_404_here_without_fallback_unknown(pool, fallback):
    url = start_fallback(fallback)
    pool.config({"tiny": {}}, pool_extra=f"fallback = {url}")
    pool.start()
    status, headers, body = post(pool.listen_port, {**CHAT, "model": "elsewhere"})
    assert status == 404 and "X-Llama-Pool-Served-By" not in headers
    assert "known models: tiny" in json.loads(body)["error"]["message"]
    assert not fallback.instances("elsewhere")


def test_a_stream_through_the_fallback_arrives_event_by_event(pool, fallback):
    url = start_fallback(fallback, tiny_env={"FAKE_TOKEN_MS": "150"})
    pool.config({"tiny": {"memory": "2G"}}, pool_extra=f"memory_budget = 1G\nfallback = {url}")
    pool.start()
    body = json.dumps({**CHAT, "model": "tiny", "stream": True, "max_tokens": 8}).encode()
    s = socket.create_connection(("127.0.0.1", pool.listen_port), timeout=30)
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        arrivals, data = [], b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            arrivals += [time.monotonic()] * chunk.count(b"data: ")
    finally:
        s.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 200"), head
    assert "X-Llama-Pool-Served-By: fallback" in head
    assert "text/event-stream" in head
    assert b"data: [DONE]" in data
    # 8 tokens at 150 ms: had the answer been gathered first, every event
    # would arrive at once.
    assert len(arrivals) >= 8
    assert arrivals[-1] - arrivals[0] > 0.6, arrivals


def test_the_clients_key_is_not_forwarded_and_fallback_key_is(pool, fallback):
    # The fallback would take the pool's key too: only the proxy's dropping
    # it makes the first answer a 401.
    url = start_fallback(fallback, pool_extra=f"api_keys = {FALLBACK_KEY}, {POOL_KEY}")
    auth = {"Authorization": f"Bearer {POOL_KEY}"}
    pool.config({"tiny": {"memory": "2G"}},
                pool_extra=f"memory_budget = 1G\napi_keys = {POOL_KEY}\nfallback = {url}")
    pool.start()
    status, headers, body = post(pool.listen_port, {**CHAT, "model": "tiny"}, auth)
    assert status == 401 and headers.get("X-Llama-Pool-Served-By") == "fallback", body
    status, _, _ = post(pool.listen_port, {**CHAT, "model": "tiny"},
                        {"X-Api-Key": POOL_KEY})
    assert status == 401

    pool.signal(15)
    pool.wait_exit()
    pool.config({"tiny": {"memory": "2G"}},
                pool_extra=f"memory_budget = 1G\napi_keys = {POOL_KEY}\nfallback = {url}\n"
                           f"fallback_key = {FALLBACK_KEY}")
    pool.start()
    served_by_fallback(*post(pool.listen_port, {**CHAT, "model": "tiny"}, auth))


def test_an_unreachable_fallback_is_502_naming_it_and_why(pool):
    dead = free_port_block(1, avoid=[(pool.port_base, pool.port_base + 20),
                                     (pool.listen_port, pool.listen_port + 1)])
    url = f"http://127.0.0.1:{dead}"
    pool.config({"tiny": {"memory": "2G"}}, pool_extra=f"memory_budget = 1G\nfallback = {url}")
    pool.start()
    status, headers, body = post(pool.listen_port, {**CHAT, "model": "tiny"})
    assert status == 502, body
    msg = json.loads(body)["error"]["message"]
    assert url in msg and "does not fit the memory budget" in msg and "refused" in msg, msg


def test_a_model_with_fallback_empty_is_answered_here(pool, fallback):
    url = start_fallback(fallback)
    pool.config({"tiny": {"memory": "2G", "fallback": ""}},
                pool_extra=f"memory_budget = 1G\nfallback = {url}")
    pool.start()
    status, headers, body = post(pool.listen_port, {**CHAT, "model": "tiny"})
    assert status == 503 and "X-Llama-Pool-Served-By" not in headers, body
