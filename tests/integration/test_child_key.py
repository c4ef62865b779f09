"""Children behind the pool: each llama-server child requires an API key
that only the pool knows (LLAMA_API_KEY in its environment, never in argv),
so nobody reaches a model on a child's port without going through the
pool's own keys. /pool/server hands the key, and a URL through the pool,
to PM2-era code."""
import json
import os

import pytest

from conftest import REAL, fake_only, wait_for
from test_proxy import CHAT, get, post

POOL_KEY = "pool-secret-1"
ADMIN_KEY = "admin-secret-1"


def chat(port, headers=None, model="tiny"):
    return post(port, "/v1/chat/completions", {**CHAT, "model": model}, headers)


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def ready(pool, name="tiny", n=1):
    pool.cli("start", name, check=0)
    return wait_for(lambda: len(pool.ready_instances(name)) >= n and pool.ready_instances(name),
                    what=f"{n} ready instance(s) of {name}")


def server_info(pool, name="tiny"):
    """/pool/server over the control socket."""
    code, body = pool.get(f"/pool/server?model={name}")
    assert code == 200, body
    return json.loads(body)


def environ_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return [e.decode(errors="replace") for e in f.read().split(b"\0") if e]


def cmdline_of(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode(errors="replace")


# (a)
def test_child_port_refuses_a_request_without_the_key(pool):
    pool.config({"tiny": {}})
    pool.start()
    port = ready(pool)[0]["port"]
    status, headers, body = chat(port)
    assert status == 401, body
    assert json.loads(body)["error"]["type"] == "authentication_error"
    # /health stays public: it is how the pool sees the child ready.
    assert get(port, "/health")[0] == 200


# (b)
@pytest.mark.parametrize("pool_keys", [False, True], ids=["no-api_keys", "api_keys"])
def test_requests_through_the_pool_reach_the_locked_child(pool, pool_keys):
    pool.config({"tiny": {}}, pool_extra=f"api_keys = {POOL_KEY}" if pool_keys else "")
    pool.start()
    port = ready(pool)[0]["port"]
    client = bearer(POOL_KEY) if pool_keys else {}
    status, _, body = chat(pool.listen_port, client)
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    # The pool's X-Api-Key form works too, and streaming.
    if pool_keys:
        assert chat(pool.listen_port, {"X-Api-Key": POOL_KEY})[0] == 200
        assert chat(pool.listen_port)[0] == 401
    status, _, body = post(pool.listen_port, "/v1/chat/completions",
                           {**CHAT, "model": "tiny", "stream": True}, client)
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]"), body
    # ... while the child itself, asked the same, refuses.
    assert chat(port, client)[0] == 401


# (c)
def test_key_is_in_the_childs_environment_not_its_command_line(pool, monkeypatch):
    pool.config({"tiny": {"instances": "2"}})
    # A key in the daemon's own environment must not reach the children.
    monkeypatch.setenv("LLAMA_API_KEY", "daemon-environment-key")
    pool.start()
    monkeypatch.delenv("LLAMA_API_KEY")
    pool.cli("start", "tiny", "-n", "2", check=0)
    insts = wait_for(lambda: len(pool.ready_instances("tiny")) == 2 and pool.ready_instances("tiny"),
                     what="two ready instances")
    keys = []
    for inst in insts:
        env = [e for e in environ_of(inst["pid"]) if e.startswith("LLAMA_API_KEY=")]
        assert len(env) == 1, env
        key = env[0].split("=", 1)[1]
        assert len(key) >= 32 and key != "daemon-environment-key"
        assert key not in cmdline_of(inst["pid"])
        assert "--api-key" not in cmdline_of(inst["pid"]).split("\0")
        assert chat(inst["port"], bearer(key))[0] == 200
        keys.append(key)
    assert keys[0] != keys[1], "each child has its own key"
    # A restarted child gets a fresh key.
    old_pids = {i["pid"] for i in insts}
    pool.cli("restart", "tiny", check=0)

    def restarted():
        new = [i for i in pool.ready_instances("tiny") if i["pid"] not in old_pids]
        return len(new) == 2 and new
    after = wait_for(restarted, what="two restarted ready instances")
    new_keys = {e.split("=", 1)[1] for i in after for e in environ_of(i["pid"])
                if e.startswith("LLAMA_API_KEY=")}
    assert len(new_keys) == 2 and not new_keys & set(keys)
    # The key is nowhere in what the pool tells or logs.
    code, body = pool.get("/pool/status")
    assert not any(k.encode() in body for k in new_keys)
    assert not any(k in pool.daemon_log() for k in new_keys)


# (d)
def test_pool_server_answers_port_key_and_a_url_through_the_pool(pool):
    pool.config({"tiny": {}}, pool_extra=f"admin_key = {ADMIN_KEY}\napi_keys = {POOL_KEY}")
    pool.start()
    status, _, body = get(pool.listen_port, "/pool/server?model=tiny", bearer(ADMIN_KEY))
    assert status == 200, body
    info = json.loads(body)
    inst = pool.ready_instances("tiny")[0]
    assert info["model"] == "tiny" and info["port"] == inst["port"]
    assert info["url"] == f"http://127.0.0.1:{pool.listen_port}/upstream/tiny"
    assert f"LLAMA_API_KEY={info['api_key']}" in environ_of(inst["pid"])

    # Old code's fetch(url + "/v1/chat/completions"): through the pool, with its keys.
    path = info["url"].split(str(pool.listen_port), 1)[1] + "/v1/chat/completions"
    assert post(pool.listen_port, path, {**CHAT, "model": "tiny"}, bearer(POOL_KEY))[0] == 200
    assert post(pool.listen_port, path, {**CHAT, "model": "tiny"})[0] == 401
    # Old code that used the port: with the key it works, without it does not.
    assert chat(info["port"], bearer(info["api_key"]))[0] == 200
    assert chat(info["port"], {"X-Api-Key": info["api_key"]})[0] == 200
    assert chat(info["port"])[0] == 401
    assert chat(info["port"], bearer(POOL_KEY))[0] == 401

    # Over the control socket there is no Host: the url is the configured listen.
    assert server_info(pool)["url"] == f"http://127.0.0.1:{pool.listen_port}/upstream/tiny"


def test_pool_server_url_of_a_wildcard_listen_is_loopback(pool):
    pool.config({"tiny": {}}, pool_extra=f"listen = 0.0.0.0:{pool.listen_port}")
    pool.start()
    info = server_info(pool)
    assert info["url"] == f"http://127.0.0.1:{pool.listen_port}/upstream/tiny"
    assert chat(info["port"], bearer(info["api_key"]))[0] == 200


# (e)
@fake_only("needs the stand-in's FAKE_LOG_AUTH")
def test_clients_pool_key_is_not_forwarded_to_the_child(pool):
    pool.config({"tiny": {"env": {"FAKE_LOG_AUTH": "1"}}}, pool_extra=f"api_keys = {POOL_KEY}")
    pool.start()
    ready(pool)
    key = server_info(pool)["api_key"]
    headers = {**bearer(POOL_KEY), "X-Api-Key": POOL_KEY}
    assert chat(pool.listen_port, headers)[0] == 200
    assert get(pool.listen_port, "/upstream/tiny/slots", {"X-Api-Key": POOL_KEY})[0] == 200

    def logged():
        code, body = pool.get("/pool/models/tiny/logs?lines=1000")
        assert code == 200
        text = body.decode()
        lines = [l for l in text.splitlines() if "log_auth" in l and ("POST /v1/chat" in l or "GET /slots" in l)]
        return len(lines) >= 2 and (text, lines)
    text, lines = wait_for(logged, what="the child's log of both requests")
    for line in lines:
        assert f'authorization="Bearer {key}" x-api-key=""' in line, line
    assert POOL_KEY not in text


# (f)
@pytest.mark.parametrize("where", ["args", "env"])
def test_operators_own_child_key_is_used(pool, where):
    if where == "args":
        model = {"args": "-c 256 -np 2 --api-key mykey,otherkey"}
    else:
        model = {"env": {"LLAMA_API_KEY": "mykey,otherkey"}}
    pool.config({"tiny": model}, pool_extra=f"api_keys = {POOL_KEY}")
    pool.start()
    inst = ready(pool)[0]
    info = server_info(pool)
    assert info["api_key"] == "mykey"
    env = [e for e in environ_of(inst["pid"]) if e.startswith("LLAMA_API_KEY=")]
    assert env == ([] if where == "args" else ["LLAMA_API_KEY=mykey,otherkey"])
    assert chat(pool.listen_port, bearer(POOL_KEY))[0] == 200
    assert chat(inst["port"], bearer("otherkey"))[0] == 200
    assert chat(inst["port"])[0] == 401


# (g)
@pytest.mark.parametrize("where", ["ours", "args"])
def test_slots_still_come_from_props(pool, where):
    args = "-c 256 -np 3" + (" --api-key mykey" if where == "args" else "")
    pool.config({"tiny": {"args": args}})
    pool.start()
    ready(pool)
    wait_for(lambda: pool.ready_instances("tiny")[0]["slots"] == 3, what="slots = 3 from /props")
    port = pool.ready_instances("tiny")[0]["port"]
    assert get(port, "/props")[0] == 401   # /props itself needs the key
