"""GET /pool/events and `llama-pool monit`: what happens in the pool, live."""
import json
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import LLAMA_POOL, REAL, fake_only, wait_for
from test_proxy import CHAT, post


class Events:
    """A subscriber on the control socket: reads SSE frames as they come."""

    def __init__(self, pool):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(pool.sock)
        self.s.sendall(b"GET /pool/events HTTP/1.1\r\nHost: x\r\n\r\n")
        self.buf = b""
        # The head: once it is in, this subscriber is on the daemon's list.
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        self.head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert self.head.startswith(b"HTTP/1.1 200"), self.head
        assert b"text/event-stream" in self.head

    def _fill(self):
        chunk = self.s.recv(65536)
        assert chunk, "the event stream ended"
        self.buf += chunk

    def next(self):
        """The next event: (type, data)."""
        while True:
            # chunked: the frames' text is what lies between chunk sizes;
            # events never span chunks (one write each), so look for frames
            # in the de-chunked text gathered so far.
            text = self._dechunked()
            if text is not None:
                return text
            self._fill()

    def _dechunked(self):
        while True:
            if b"\r\n" not in self.buf:
                return None
            size_line, rest = self.buf.split(b"\r\n", 1)
            size = int(size_line, 16)
            if len(rest) < size + 2:
                return None
            body, self.buf = rest[:size], rest[size + 2:]
            for frame in body.decode().split("\n\n"):
                typ, data = None, None
                for line in frame.split("\n"):
                    if line.startswith("event: "):
                        typ = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                if typ:
                    return typ, data

    def until(self, pred, what, n=200):
        """Events until one for which PRED(type, data) holds; that one."""
        seen = []
        for _ in range(n):
            ev = self.next()
            if pred(*ev):
                return ev
            seen.append(ev[0])
        raise AssertionError(f"no {what} among {seen}")

    def close(self):
        self.s.close()


@pytest.fixture
def events(pool):
    subs = []

    def open_():
        e = Events(pool)
        subs.append(e)
        return e
    yield open_
    for e in subs:
        e.close()


def test_instance_changes_and_requests_are_events(pool, events):
    pool.config({"tiny": {"instances": "0-1"}})
    pool.start()
    ev = events()
    status, _, _ = post(pool.listen_port, "/v1/chat/completions", {**CHAT, "model": "tiny", "max_tokens": 4})
    assert status == 200
    _, d = ev.until(lambda t, d: t == "instance" and d["state"] == "starting", "a start")
    assert d["model"] == "tiny" and d["instance"] == "tiny#1" and d["old"] == "stopped" and d["pid"] > 0
    ev.until(lambda t, d: t == "instance" and d["state"] == "ready", "ready")
    _, d = ev.until(lambda t, d: t == "request", "the request")
    assert d["model"] == "tiny" and d["instance"] == "tiny#1" and d["status"] == 200
    assert d["method"] == "POST" and d["path"] == "/v1/chat/completions"
    assert d["duration"] >= d["first_byte"] >= 0 and d["queued"] >= 0
    if not REAL:
        assert d["generated_tokens"] == 4 and d["prompt_tokens"] > 0 and d["tokens_per_s"] > 0
    pool.cli("stop", "tiny", check=0)
    _, d3 = ev.until(lambda t, d: t == "instance" and d["state"] == "stopping", "stopping")
    assert d3["reason"] == "asked"
    ev.until(lambda t, d: t == "instance" and d["state"] == "stopped", "stopped")
    # A new subscriber gets the recent requests first.
    ev2 = events()
    _, d2 = ev2.until(lambda t, d: t == "request", "the replayed request", n=5)
    assert d2 == d


def test_evictions_and_reloads_are_events(pool, events):
    pool.config({"tiny": {"instances": "0-1", "idle_timeout": "1s"}})
    pool.start()
    ev = events()
    assert post(pool.listen_port, "/v1/chat/completions", {**CHAT, "model": "tiny"})[0] == 200
    _, d = ev.until(lambda t, d: t == "evict", "an idle stop")
    assert d == {"model": "tiny", "instance": "tiny#1", "reason": "idle", "charged": d["charged"]}
    ev.until(lambda t, d: t == "instance" and d["state"] == "stopped", "stopped")
    pool.config({"tiny": {"instances": "0-1", "idle_timeout": "1s"}, "other": {}})
    pool.cli("reload", check=0)
    _, d = ev.until(lambda t, d: t == "reload", "the reload")
    assert d["added"] == ["other"]
    # SIGHUP is a reload too.
    pool.config({"tiny": {"instances": "0-1", "idle_timeout": "1s"}})
    pool.signal(signal.SIGHUP)
    _, d = ev.until(lambda t, d: t == "reload", "the SIGHUP reload")
    assert d["removed"] == ["other"]


@fake_only("needs fast generation to pile events up")
def test_a_subscriber_that_stops_reading_is_dropped_not_waited_for(pool, events):
    pool.config({"tiny": {"instances": "1-1", "args": "-c 256 -np 4", "env": {"FAKE_TOKEN_MS": "0"}}})
    pool.start()
    wait_for(lambda: pool.ready_instances("tiny"), what="ready")
    stuck = events()                        # subscribes, then never reads
    # Requests whose events overflow its 512 KiB (each ~350 bytes), from
    # four clients; the daemon keeps answering them at full speed.
    stop = time.monotonic() + 60

    def client():
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", pool.listen_port, timeout=10)
        body = json.dumps({**CHAT, "model": "tiny", "max_tokens": 1})
        while "dropped" not in pool.daemon_log() and time.monotonic() < stop:
            c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            assert r.status == 200
        c.close()
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "events: a subscriber that read nothing of the last" in pool.daemon_log()
    # Its stream was cut: reading what is buffered ends in EOF.
    stuck.s.settimeout(10)
    while stuck.s.recv(1 << 20):
        pass
    # And a new subscriber is served as usual.
    fresh = events()
    fresh.until(lambda t, d: t == "request", "a replayed request", n=5)


def test_monit_prints_a_line_per_event(pool):
    pool.config({"tiny": {"instances": "0-1"}})
    pool.start()
    for fmt in ([], ["--json"]):
        p = subprocess.Popen([LLAMA_POOL, "monit", *fmt, "-s", pool.sock], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            assert post(pool.listen_port, "/v1/chat/completions", {**CHAT, "model": "tiny"})[0] == 200
            lines = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                line = p.stdout.readline()
                assert line, p.stderr.read()
                lines.append(line)
                if "request" in line:
                    break
            text = "".join(lines)
            if fmt:
                got = [json.loads(x) for x in lines]
                assert got[-1]["event"] == "request" and got[-1]["status"] == 200, text
            else:
                assert "request" in lines[-1] and "POST /v1/chat/completions  200" in lines[-1], text
        finally:
            p.kill()
            p.wait()


@fake_only("needs a model that takes minutes to load")
def test_a_request_that_waited_too_long_is_an_event_without_instance(pool, events):
    pool.config({"slow": {"env": {"FAKE_LOAD_MS": "600000"}}}, pool_extra="queue_timeout = 300ms")
    pool.start()
    ev = events()
    assert post(pool.listen_port, "/v1/chat/completions", {**CHAT, "model": "slow"})[0] == 504
    _, d = ev.until(lambda t, d: t == "request", "the 504")
    assert d["status"] == 504 and d["model"] == "slow" and "instance" not in d
    assert d["queued"] >= 0.3 and "prompt_tokens" not in d and "first_byte" not in d
