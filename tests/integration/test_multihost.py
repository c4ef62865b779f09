"""Several pools, one address: nginx in front of two llama-pool daemons on
127.0.0.2 and 127.0.0.3, with the config of docs/multi-host.md (read from
the page itself, only the addresses replaced)."""
import http.client
import json
import os
import re
import socket

import pytest
from conftest import NGINX, ROOT, Pool, call_failed, fake_only, free_port_block, nginx_start, nginx_stop
from test_proxy import CHAT, post

DOC = os.path.join(ROOT, "docs", "multi-host.md")
HOSTS = ("127.0.0.2", "127.0.0.3")


def loopback_bindable():
    for a in HOSTS:
        s = socket.socket()
        try:
            s.bind((a, 0))
        except OSError:
            return False
        finally:
            s.close()
    return True


pytestmark = [
    pytest.mark.skipif(not NGINX, reason="needs nginx (scripts/setup installs nginx-light)"),
    pytest.mark.skipif(not loopback_bindable(),
                       reason="needs to bind 127.0.0.2 and 127.0.0.3 (Linux routes all of 127/8 to lo)"),
    fake_only("starts many models on two pools"),
]

MODELS = [f"m{i:02d}" for i in range(16)]


def doc_config():
    """The nginx block of docs/multi-host.md that holds the upstream."""
    with open(DOC) as f:
        text = f.read()
    for block in re.findall(r"```nginx\n(.*?)```", text, re.S):
        if "upstream llama_pools" in block:
            return block
    raise AssertionError("docs/multi-host.md has no nginx block with upstream llama_pools")


class Site:
    """Two pools and nginx in front, as docs/multi-host.md."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.pools = []
        self.nginx = None
        self.error_log = tmp_path / "nginx-error.log"

    def pool(self, name, host, models, pool_extra=""):
        d = self.dir / name
        d.mkdir()
        p = Pool(d)
        self.pools.append(p)
        p.host = host
        p.config({m: {"env": {"FAKE_LOAD_MS": "20"}, **models.get(m, {})} for m in MODELS},
                 pool_extra=f"listen = {host}:{p.listen_port}\n{pool_extra}")
        return p

    def start(self):
        for p in self.pools:
            p.start()
        self.port = free_port_block(1)
        conf = doc_config()
        swaps = [("10.0.0.11:8080", f"{self.pools[0].host}:{self.pools[0].listen_port}"),
                 ("10.0.0.12:8080", f"{self.pools[1].host}:{self.pools[1].listen_port}"),
                 ("listen 80;", f"listen 127.0.0.1:{self.port};")]
        for old, new in swaps:
            assert old in conf, f"docs/multi-host.md's config has no {old!r}"
            conf = conf.replace(old, new)
        self.max_fails = int(re.search(r"max_fails=(\d+)", conf).group(1))
        self.nginx = nginx_start(self.dir, conf, self.port, self.error_log)
        return self

    def nginx_log(self):
        try:
            return self.error_log.read_text(errors="replace")
        except OSError:
            return ""

    def ask(self, model, x_model=True, stream=False):
        headers = {"X-Model": model} if x_model else {}
        return post(self.port, "/v1/chat/completions", {**CHAT, "model": model, "stream": stream},
                    headers=headers)

    def cleanup(self):
        if self.nginx:
            nginx_stop(self.nginx)
        for p in self.pools:
            p.cleanup()


def answers(pool):
    """{(model, status): count} from the pool's /metrics (over its socket,
    which still answers when its TCP side is what a test is looking at)."""
    code, body = pool.get("/metrics")
    assert code == 200
    out = {}
    for m in re.finditer(r'^llama_pool_requests_total\{model="([^"]+)",status="(\d+)"\} (\S+)$',
                         body.decode(), re.M):
        out[(m.group(1), int(m.group(2)))] = int(float(m.group(3)))
    return out


def health(pool):
    conn = http.client.HTTPConnection(pool.host, pool.listen_port, timeout=5)
    try:
        conn.request("GET", "/health")
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


@pytest.fixture
def site(tmp_path, request):
    s = Site(tmp_path)
    yield s
    if call_failed(request):
        for p in s.pools:
            print(f"---- {p.host} daemon log ----")
            print(p.daemon_log()[-3000:])
        print("---- nginx error log ----")
        print(s.nginx_log()[-3000:])
    s.cleanup()


def test_one_model_always_reaches_one_pool_and_models_spread_over_the_pools(site):
    a = site.pool("a", HOSTS[0], {})
    b = site.pool("b", HOSTS[1], {})
    site.start()
    for m in MODELS:
        for _ in range(3):
            status, _, body = site.ask(m)
            assert status == 200, body
    ca, cb = answers(a), answers(b)
    owner = {}
    for m in MODELS:
        pair = (ca.get((m, 200), 0), cb.get((m, 200), 0))
        assert sorted(pair) == [0, 3], f"{m}: served {pair[0]} times by a, {pair[1]} by b"
        owner[m] = "a" if pair[0] else "b"
    assert set(owner.values()) == {"a", "b"}, f"all 16 models hashed to one pool: {owner}"
    # Without X-Model, one client (one address) stays on one pool.
    for _ in range(4):
        assert site.ask("m00", x_model=False)[0] == 200
    ca2, cb2 = answers(a), answers(b)
    more = (ca2.get(("m00", 200), 0) - ca.get(("m00", 200), 0),
            cb2.get(("m00", 200), 0) - cb.get(("m00", 200), 0))
    assert sorted(more) == [0, 4], f"without X-Model: {more[0]} on a, {more[1]} on b"
    assert "[error]" not in site.nginx_log() and "[warn]" not in site.nginx_log()


@pytest.mark.parametrize("refusal", [429, 503])
def test_a_pool_that_refuses_is_passed_over_and_the_client_gets_200(site, refusal):
    if refusal == 429:
        # No waiting at all: a request for a model not yet running gets 429.
        a = site.pool("a", HOSTS[0], {}, pool_extra="max_queue = 0")
    else:
        # Every model alone is larger than a's whole budget: 503 at once.
        a = site.pool("a", HOSTS[0], {m: {"memory": "1G"} for m in MODELS},
                      pool_extra="memory_budget = 64M")
    b = site.pool("b", HOSTS[1], {})
    site.start()
    for i, m in enumerate(MODELS):
        stream = i % 2 == 1
        status, headers, body = site.ask(m, stream=stream)
        assert status == 200, body
        if stream:
            assert body.rstrip().endswith(b"data: [DONE]"), body
    ca, cb = answers(a), answers(b)
    refused = sum(n for (m, s), n in ca.items() if s == refusal)
    assert not any(s == 200 for (m, s) in ca), f"a served something: {ca}"
    assert sum(n for (m, s), n in cb.items() if s == 200) == len(MODELS)
    # Some model hashed to a and was refused there, then served by b. nginx
    # counts a refusal as a failed attempt: after max_fails of them it
    # leaves a alone for fail_timeout, and sends nothing more there.
    assert 1 <= refused <= site.max_fails, f"a refused {refused} (max_fails {site.max_fails})"
    if refused == site.max_fails:
        assert "upstream server temporarily disabled" in site.nginx_log()


def test_a_dead_pool_is_passed_over(site):
    a = site.pool("a", HOSTS[0], {})
    b = site.pool("b", HOSTS[1], {})
    site.start()
    assert site.ask("m00")[0] == 200
    dead, alive = (a, b) if answers(a).get(("m00", 200)) else (b, a)
    dead.proc.kill()
    dead.proc.wait()
    for m in MODELS:
        for _ in range(2):
            status, _, body = site.ask(m)
            assert status == 200, body
    served = answers(alive)
    assert sum(n for (m, s), n in served.items() if s == 200) == 2 * len(MODELS)
    log = site.nginx_log()
    assert "connect() failed (111: Connection refused)" in log
    # Passive health: after max_fails refused connections nginx stops trying.
    assert log.count("connect() failed (111") == site.max_fails, log
    assert "upstream server temporarily disabled" in log
    # What an outside checker sees on each pool's own address.
    assert health(alive) == (200, {"status": "ok"})
    with pytest.raises(ConnectionRefusedError):
        health(dead)


def test_a_pool_rested_for_its_refusals_is_no_fallback_when_the_other_dies(site):
    """docs/multi-host.md's "the catch": nginx counts a passed-over 429 as
    a failure; with the consistent hash, once every pool is marked failed
    nginx answers 502 itself, trying none."""
    a = site.pool("a", HOSTS[0], {}, pool_extra="max_queue = 0")
    b = site.pool("b", HOSTS[1], {})
    site.start()
    for m in MODELS:
        assert site.ask(m)[0] == 200
        if sum(n for (_, s), n in answers(a).items() if s == 429) == site.max_fails:
            break
    else:
        pytest.skip("fewer than max_fails of the 16 models hash to a")  # 137 in 65536
    b.proc.kill()
    b.proc.wait()
    before = answers(a)
    assert site.ask("m00")[0] == 502
    assert "no live upstreams" in site.nginx_log()
    assert answers(a) == before, "a was tried although it was resting"
