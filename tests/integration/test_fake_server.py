"""The stand-in llama-server itself (tests/fake-llama-server.c), started
directly: its prompt cache and prompt cost, which scripts/bench-affinity
measures the pool's prefix affinity on when no real llama-server is given."""
import http.client
import json
import os
import re
import socket
import subprocess
import time

import pytest

from conftest import FAKE_SERVER, ROOT, fake_only, wait_for, write_gguf

pytestmark = fake_only("tests the stand-in's own knobs")

# About 1,700 bytes: some 430 of the stand-in's 4-byte tokens.
SYSTEM = "You are a helpful assistant. " * 60


class Fake:
    """One stand-in on a free port, with ENV as its whole environment (so no
    LLAMA_API_KEY or FAKE_* of ours reaches it)."""

    def __init__(self, where, env, metrics=True):
        os.makedirs(where, exist_ok=True)
        self.log_path = os.path.join(where, "fake.log")
        self.log = open(self.log_path, "wb")
        model = write_gguf(os.path.join(where, "m.gguf"))
        # -cram 0 as the pool passes it: the stand-in's cache stays on.
        self.proc = subprocess.Popen(
            [FAKE_SERVER, "-m", model, "--port", "0", "-c", "8192", "-np", "2",
             *(["--metrics"] if metrics else []), "-cram", "0"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            env={"FAKE_LOAD_MS": "0", **env})
        self.port = wait_for(self._listening, what="the stand-in's 'listening on' line")

    def log_text(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def _listening(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"the stand-in exited with {self.proc.returncode}:\n{self.log_text()}")
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log_text())
        return int(m.group(1)) if m else None

    def complete(self, path, body):
        """Streams one request: (seconds to the first token, the last event
        with JSON, which carries usage and timings)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            t0 = time.perf_counter()
            conn.request("POST", path, body=json.dumps({**body, "stream": True}),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200, r.read()
            first, last, buf = None, None, b""
            while chunk := r.read1(65536):
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    data = event.decode().removeprefix("data: ")
                    if data == "[DONE]":
                        continue
                    last = json.loads(data)
                    choice = (last.get("choices") or [{}])[0]
                    token = (choice.get("delta") or {}).get("content") or choice.get("text")
                    if token and first is None:
                        first = time.perf_counter() - t0
            return first, last
        finally:
            conn.close()

    def cache_n(self, prompt):
        """timings.cache_n of a /v1/completions request for PROMPT."""
        _, last = self.complete("/v1/completions", {"prompt": prompt, "max_tokens": 2})
        return last["timings"]["cache_n"]

    def get(self, path, timeout=10):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read().decode()
        finally:
            conn.close()

    def metric(self, name):
        text = self.get("/metrics")[1]
        return float(re.search(rf"^llamacpp:{name} (\S+)$", text, re.M).group(1))

    def slots_busy(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/slots")
            return [s["is_processing"] for s in json.loads(conn.getresponse().read())]
        finally:
            conn.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


@pytest.fixture
def fake(tmp_path):
    """start(env) -> a running Fake; every one started is killed at teardown."""
    started = []

    def start(env=None, metrics=True):
        f = Fake(os.path.join(tmp_path, f"fake{len(started)}"), env or {}, metrics)
        started.append(f)
        return f

    yield start
    for f in started:
        f.stop()


def test_the_same_prompt_twice_comes_from_the_cache_the_second_time(fake):
    f = fake()
    body = {"prompt": SYSTEM + "first question", "max_tokens": 2}
    _, first = f.complete("/v1/completions", body)
    _, again = f.complete("/v1/completions", body)
    n = first["usage"]["prompt_tokens"]
    assert n > 400
    assert (first["timings"]["cache_n"], first["timings"]["prompt_n"]) == (0, n)
    # As llama-server: the last token is evaluated again (its logits are needed).
    assert (again["timings"]["cache_n"], again["timings"]["prompt_n"]) == (n - 1, 1)
    assert again["usage"]["prompt_tokens"] == n
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": n - 1}
    assert f.metric("prompt_tokens_total") == n + 1     # evaluated tokens only


def test_a_conversations_next_turn_reuses_the_turn_before(fake):
    f = fake()
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first"}]
    turn2 = turn1 + [{"role": "assistant", "content": " tok0 tok1"},
                     {"role": "user", "content": "second"}]
    _, a = f.complete("/v1/chat/completions", {"messages": turn1, "max_tokens": 2})
    _, b = f.complete("/v1/chat/completions", {"messages": turn2, "max_tokens": 2})
    n1 = a["usage"]["prompt_tokens"]
    # All of turn 1 but its closing "]" (a byte, so at most 2 tokens short).
    assert n1 - 2 <= b["timings"]["cache_n"] <= n1
    assert b["timings"]["prompt_n"] == b["usage"]["prompt_tokens"] - b["timings"]["cache_n"]


def test_an_unrelated_prompt_gets_nothing_from_the_cache(fake):
    f = fake()
    assert f.cache_n(SYSTEM + "question") == 0
    assert f.cache_n("Translate into French: the cat sat on the mat. " * 30) == 0


def test_the_least_recently_used_prompt_is_dropped_first(fake):
    f = fake({"FAKE_PROMPT_CACHE": "2"})
    a, b, c = ("A. " + SYSTEM), ("B. " + SYSTEM), ("C. " + SYSTEM)
    assert f.cache_n(a) == 0
    assert f.cache_n(b) == 0
    assert f.cache_n(a) > 0     # a is now the more recently used of the two
    assert f.cache_n(c) == 0    # … so c replaces b
    assert f.cache_n(a) > 0
    assert f.cache_n(b) == 0


def test_prompt_cache_0_turns_the_cache_off(fake):
    f = fake({"FAKE_PROMPT_CACHE": "0"})
    assert f.cache_n(SYSTEM) == 0
    assert f.cache_n(SYSTEM) == 0


def test_an_uncached_prompt_takes_longer_to_its_first_token_than_a_cached_one(fake):
    f = fake({"FAKE_PROMPT_MS_PER_TOKEN": "1"})    # ~430 tokens: ~0.43 s uncached
    body = {"prompt": SYSTEM + "question", "max_tokens": 2}
    slow, first = f.complete("/v1/completions", body)
    fast, again = f.complete("/v1/completions", body)
    assert again["timings"]["prompt_n"] == 1
    assert slow > 3 * fast, (slow, fast)
    # The cost is slept, so the measured prompt time is never below it.
    assert first["timings"]["prompt_ms"] >= first["timings"]["prompt_n"] * 1.0


def test_a_client_that_leaves_during_the_prompt_cancels_its_task(fake):
    f = fake({"FAKE_PROMPT_MS_PER_TOKEN": "50"})   # ~430 tokens: ~20 s of prompt
    messages = [{"role": "user", "content": SYSTEM}]
    n_prompt = (len(json.dumps(messages)) + 3) // 4
    body = json.dumps({"messages": messages, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", f.port), timeout=10)
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"data:" not in got:      # the role chunk: the slot has started
            chunk = s.recv(65536)
            assert chunk, "the stream ended early"
            got += chunk
        assert b"tok0" not in got
    finally:
        s.close()
    wait_for(lambda: "cancel task" in f.log_text(), timeout=5, what="the task cancelled")
    wait_for(lambda: not any(f.slots_busy()), timeout=5, what="the slot freed")
    # Released holding the prompt alone: not one token was generated.
    assert f"stop processing: n_tokens = {n_prompt}," in f.log_text()


# llama-server b9749's /metrics after one completion (tests/data: captured
# with --metrics -c 256 -np 2, prompt of 18 tokens, 8 generated).
REAL_METRICS = os.path.join(ROOT, "tests", "data", "llama-server-b9749-metrics.txt")


def test_metrics_has_llama_server_b9749s_families_in_its_order(fake):
    f = fake()
    _, last = f.complete("/v1/completions", {"prompt": "hello there", "max_tokens": 8})
    status, text = f.get("/metrics")
    assert status == 200
    with open(REAL_METRICS) as real:
        want = [line for line in real.read().splitlines() if line.startswith("#")]
    assert [line for line in text.splitlines() if line.startswith("#")] == want
    # As llama-server: the slot held the prompt and every token but the last.
    assert f.metric("n_tokens_max") == last["usage"]["prompt_tokens"] + 8 - 1
    assert f.metric("tokens_predicted_total") == 8


def test_metrics_is_501_without_the_flag_and_on_with_a_true_env(fake):
    status, text = fake(metrics=False).get("/metrics")
    assert status == 501
    assert json.loads(text)["error"]["type"] == "not_supported_error"
    assert fake({"LLAMA_ARG_ENDPOINT_METRICS": "1"}, metrics=False).get("/metrics")[0] == 200
    assert fake({"LLAMA_ARG_ENDPOINT_METRICS": "enabled"}, metrics=False).get("/metrics")[0] == 200
    # llama.cpp's is_truthy: anything but on/enabled/true/1 leaves it off.
    assert fake({"LLAMA_ARG_ENDPOINT_METRICS": "yes"}, metrics=False).get("/metrics")[0] == 501


def test_metrics_hang_never_answers_metrics_and_nothing_else_changes(fake):
    f = fake({"FAKE_METRICS_HANG": "1"})
    with pytest.raises(TimeoutError):
        f.get("/metrics", timeout=0.5)
    assert f.get("/health")[0] == 200
