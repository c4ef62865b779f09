"""request_timeout: a generation past its time limit is cut, and the client
gets what was generated. A stream ends with a last chunk of its endpoint's
shape (finish_reason "length") and [DONE]; a plain request comes back as
JSON with the text so far. With the stand-in, and with a real llama-server
when LLAMA_SERVER and LLAMA_POOL_TEST_MODEL are set (the tests marked
fake_only need the stand-in's knobs)."""
import http.client
import json
import re
import time

import pytest

from conftest import REAL, SLOW, fake_only, wait_for
from test_events import Events

LIMIT_MS = 600
# Far more tokens than fit in LIMIT_MS: FAKE_TOKEN_MS below, or a real
# model writing into a big context.
MANY = 4000
PROMPT = {"model": "tiny", "prompt": "Once upon a time", "n_predict": MANY, "ignore_eos": True}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": MANY, "ignore_eos": True}
if REAL:
    # A random-weights model's free text can trip llama-server's output
    # parser mid-stream (an error event); words only keep it running.
    WORDS = {"grammar": "root ::= [a-z]+ ([ ] [a-z]+)*", "seed": 1}
    PROMPT.update(WORDS)
    CHAT.update(WORDS)
BODIES = {"/v1/chat/completions": CHAT, "/v1/completions": {**PROMPT, "max_tokens": MANY},
          "/completion": PROMPT}


def model_args():
    # A real model must be able to run past the limit: a big context, one slot.
    return "-c 8192 -np 1"


def slow_env(token_ms=20, **more):
    return {"FAKE_TOKEN_MS": str(token_ms), **{k: str(v) for k, v in more.items()}}


def post(port, path, body, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout * SLOW)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def timed_post(port, path, body):
    t0 = time.monotonic()
    code, headers, data = post(port, path, body)
    return code, headers, data, time.monotonic() - t0


def events(data):
    """The data of each event of an SSE body; asserts that it is well framed
    (events end with a blank line, each has one data line)."""
    text = data.decode()
    assert text.endswith("\n\n"), f"the stream does not end at an event boundary: {text[-200:]!r}"
    out = []
    for ev in text.split("\n\n")[:-1]:
        lines = [ln for ln in ev.split("\n") if not ln.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), f"bad event {ev!r}"
        out.append(lines[0][6:])
    return out


def start_pool(pool, models, pool_extra=""):
    pool.config(models, pool_extra=pool_extra)
    pool.start()
    for name in models:
        pool.cli("start", name, check=0)
    return pool


def metric(pool, name_and_labels):
    code, _, body = get_metrics(pool)
    for line in body.decode().splitlines():
        if line.startswith(name_and_labels + " "):
            return float(line.split()[-1])
    return 0.0


def get_metrics(pool):
    conn = http.client.HTTPConnection("127.0.0.1", pool.listen_port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def generated_text(path, evs):
    """The text of a stream's events."""
    text = ""
    for d in evs:
        if d == "[DONE]":
            continue
        o = json.loads(d)
        if path == "/v1/chat/completions":
            for c in o["choices"]:
                text += c["delta"].get("content") or ""
        elif path == "/v1/completions":
            text += o["choices"][0]["text"]
        else:
            text += o["content"]
    return text


def assert_cut_stream(path, data):
    evs = events(data)
    if path == "/completion":
        assert evs[-1] != "[DONE]", "a native stream has no [DONE]"
        last = json.loads(evs[-1])
        assert last["stop"] is True and last["stop_type"] == "limit", last
        assert last["content"] == ""
    else:
        assert evs[-1] == "[DONE]"
        last = json.loads(evs[-2])
        choice = last["choices"][0]
        assert choice["finish_reason"] == "length", last
        if path == "/v1/chat/completions":
            assert last["object"] == "chat.completion.chunk" and choice["delta"] == {}
            first = json.loads(evs[0])
            assert last["id"] == first["id"] and last["model"] == first["model"]
        else:
            assert last["object"] == "text_completion" and choice["text"] == ""
    text = generated_text(path, evs)
    assert text, "no token came before the cut"
    return text


def assert_cut_plain(path, data):
    o = json.loads(data)
    if path == "/v1/chat/completions":
        assert o["object"] == "chat.completion"
        c = o["choices"][0]
        assert c["finish_reason"] == "length" and c["message"]["role"] == "assistant"
        text = c["message"]["content"]
        assert o["usage"]["completion_tokens"] >= 1
    elif path == "/v1/completions":
        assert o["object"] == "text_completion"
        c = o["choices"][0]
        assert c["finish_reason"] == "length"
        text = c["text"]
        assert o["usage"]["completion_tokens"] >= 1
    else:
        assert o["stop"] is True and o["stop_type"] == "limit"
        text = o["content"]
    assert text, "no text so far in the cut answer"
    assert o.get("id") or path == "/completion"
    return o, text


def slots_free(pool, name="tiny"):
    """Every slot of NAME's instance idle, by the child's own /slots."""
    code, body = pool.request("GET", f"/upstream/{name}/slots")
    return code == 200 and all(not s["is_processing"] for s in json.loads(body))


# ---- streams ----

@pytest.mark.parametrize("path", list(BODIES))
def test_a_stream_past_the_limit_ends_with_a_length_chunk_and_done(pool, path):
    start_pool(pool, {"tiny": {"args": model_args(), "env": slow_env(),
                               "request_timeout": f"{LIMIT_MS}ms"}})
    code, headers, data, took = timed_post(pool.listen_port, path, {**BODIES[path], "stream": True})
    assert code == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert_cut_stream(path, data)
    assert LIMIT_MS / 1000 * 0.9 <= took < LIMIT_MS / 1000 + 2 * SLOW
    wait_for(lambda: slots_free(pool), what="the slot freed after the cut")
    assert "cut at request_timeout" in pool.daemon_log()


# ---- plain requests ----

@pytest.mark.parametrize("path", list(BODIES))
def test_a_plain_request_past_the_limit_gets_the_text_so_far(pool, path):
    start_pool(pool, {"tiny": {"args": model_args(), "env": slow_env(),
                               "request_timeout": f"{LIMIT_MS}ms"}})
    code, headers, data, took = timed_post(pool.listen_port, path, BODIES[path])
    assert code == 200, data
    assert headers["Content-Type"].startswith("application/json")
    assert_cut_plain(path, data)
    assert LIMIT_MS / 1000 * 0.9 <= took < LIMIT_MS / 1000 + 2 * SLOW
    wait_for(lambda: slots_free(pool), what="the slot freed after the cut")


# ---- what is left alone ----

@fake_only("byte-identical answers need FAKE_DETERMINISTIC")
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", list(BODIES))
def test_an_answer_within_the_limit_is_byte_identical_to_one_without_a_limit(pool, path, stream):
    start_pool(pool, {"tiny": {"args": model_args(),
                               "env": slow_env(token_ms=5, FAKE_DETERMINISTIC=1, FAKE_NEWLINE_EVERY=3),
                               "request_timeout": "30s"}})
    body = {**BODIES[path], "stream": stream}
    body["n_predict" if path == "/completion" else "max_tokens"] = 10
    limited = post(pool.listen_port, path, body)
    pool.config({"tiny": {"args": model_args(),
                          "env": slow_env(token_ms=5, FAKE_DETERMINISTIC=1, FAKE_NEWLINE_EVERY=3)}})
    pool.cli("reload", check=0)
    wait_for(lambda: "request_timeout" not in open(pool.conf).read(), what="the new config")
    free = post(pool.listen_port, path, body)
    assert limited[0] == free[0] == 200
    assert limited[1]["Content-Type"] == free[1]["Content-Type"]
    assert limited[2] == free[2]
    assert metric(pool, 'llama_pool_requests_total{model="tiny",status="timeout"}') == 0


@fake_only()
def test_zero_means_no_limit(pool):
    start_pool(pool, {"tiny": {"args": model_args(), "env": slow_env(), "request_timeout": "0"}},
               pool_extra="request_timeout = 200ms")
    code, _, data, took = timed_post(pool.listen_port, "/v1/chat/completions", {**CHAT, "max_tokens": 40})
    assert code == 200
    o = json.loads(data)
    assert o["choices"][0]["finish_reason"] == "length"   # its max_tokens, not a cut
    assert o["usage"]["completion_tokens"] == 40 and took >= 0.8


@fake_only()
def test_a_model_value_overrides_the_pool_one(pool):
    start_pool(pool, {"short": {"args": model_args(), "env": slow_env(), "request_timeout": "300ms"},
                      "long": {"args": model_args(), "env": slow_env()}},
               pool_extra="request_timeout = 30s")
    _, _, short, took_short = timed_post(pool.listen_port, "/v1/chat/completions",
                                         {**CHAT, "model": "short", "max_tokens": 60})
    _, _, long_, took_long = timed_post(pool.listen_port, "/v1/chat/completions",
                                        {**CHAT, "model": "long", "max_tokens": 60})
    short_o, long_o = json.loads(short), json.loads(long_)
    assert short_o["usage"]["completion_tokens"] < 60 and took_short < 1.0 * SLOW
    assert long_o["usage"]["completion_tokens"] == 60 and took_long >= 1.1


# ---- the outcome, counted; the instance, free again ----

@fake_only("the stand-in's slot count")
def test_a_cut_is_counted_as_a_timeout_and_the_instance_serves_the_next_request(pool):
    start_pool(pool, {"tiny": {"args": "-c 8192 -np 1", "env": slow_env(),
                               "request_timeout": f"{LIMIT_MS}ms"}})
    code, _, data = post(pool.listen_port, "/v1/chat/completions", {**CHAT, "stream": True})
    assert code == 200 and events(data)[-1] == "[DONE]"
    code, _, data = post(pool.listen_port, "/v1/chat/completions", CHAT)
    assert code == 200 and json.loads(data)["choices"][0]["finish_reason"] == "length"
    assert metric(pool, 'llama_pool_requests_total{model="tiny",status="timeout"}') == 2
    # the one slot is free: a short request is served at once, whole
    code, _, data, took = timed_post(pool.listen_port, "/v1/chat/completions", {**CHAT, "max_tokens": 3})
    assert code == 200 and json.loads(data)["usage"]["completion_tokens"] == 3 and took < 0.5 * SLOW
    assert metric(pool, 'llama_pool_requests_total{model="tiny",status="200"}') == 1
    wait_for(lambda: slots_free(pool), what="the slot free")
    log = pool.daemon_log()
    assert re.search(r"tiny: POST /v1/chat/completions: cut at request_timeout \(0\.6 s\) after "
                     r"[0-9.]+ s on tiny#\d+", log), log[-2000:]
    # /pool/events: a new subscriber gets the recent requests, the cut ones
    # with their outcome
    ev = Events(pool)
    try:
        _, d = ev.until(lambda t, d: t == "request" and d.get("outcome") == "timeout", "a cut request", n=10)
        assert d["status"] == 200 and d["instance"].startswith("tiny#")
    finally:
        ev.close()


@fake_only()
def test_a_reload_changes_the_limit_for_new_requests(pool):
    start_pool(pool, {"tiny": {"args": model_args(), "env": slow_env(), "request_timeout": "30s"}})
    body = {**CHAT, "max_tokens": 40}
    _, _, data = post(pool.listen_port, "/v1/chat/completions", body)
    assert json.loads(data)["usage"]["completion_tokens"] == 40
    pool.config({"tiny": {"args": model_args(), "env": slow_env(), "request_timeout": "200ms"}})
    pool.cli("reload", check=0)
    _, _, data, took = timed_post(pool.listen_port, "/v1/chat/completions", body)
    o = json.loads(data)
    assert o["choices"][0]["finish_reason"] == "length" and o["usage"]["completion_tokens"] < 40
    assert took < 0.6 * SLOW
    assert len(pool.ready_instances("tiny")) == 1 and pool.instances("tiny")[0]["restarts"] == 0


@fake_only()
def test_the_stand_in_stops_at_t_max_predict_ms_only_at_a_newline(pool):
    """llama-server's rule, which is why the pool cuts by itself: past
    t_max_predict_ms a generation stops at its next token with a newline."""
    start_pool(pool, {"nl": {"args": model_args(), "env": slow_env(token_ms=10, FAKE_NEWLINE_EVERY=20)},
                      "flat": {"args": model_args(), "env": slow_env(token_ms=10)}})
    body = {**PROMPT, "n_predict": 60, "t_max_predict_ms": 50}
    code, _, data = post(pool.listen_port, "/completion", {**body, "model": "nl"})
    o = json.loads(data)
    assert o["stop_type"] == "limit" and o["tokens_predicted"] == 20 and o["has_new_line"] is True
    code, _, data = post(pool.listen_port, "/completion", {**body, "model": "flat"})
    o = json.loads(data)
    assert o["tokens_predicted"] == 60      # no newline: the limit never applies


def test_check_accepts_request_timeout_and_names_a_bad_value(pool):
    conf = pool.config({"tiny": {"request_timeout": "2s"}}, pool_extra="request_timeout = 90s")
    r = pool.cli("check", "-c", conf)
    assert r.returncode == 0, r.stdout + r.stderr
    pool.config({"tiny": {"request_timeout": "soon"}})
    r = pool.cli("check", "-c", conf)
    assert r.returncode != 0
    line = next(i for i, l in enumerate(open(conf).read().splitlines(), 1) if l.startswith("request_timeout"))
    assert re.search(rf"pool\.conf:{line}: .*request_timeout", r.stdout + r.stderr), r.stdout + r.stderr
