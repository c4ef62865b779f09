"""metrics_children: children run with --metrics, and the pool's /metrics
adds each ready child's llamacpp:* series, relabelled with model and
instance, scraped in parallel within a deadline; a scrape is no use of an
instance."""
import re
import threading
import time

from conftest import SLOW, fake_only, wait_for
from test_proxy import CHAT, get, post

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
CHILD_SAMPLE = re.compile(r'(llamacpp:\w+)\{model="([^"]*)",instance="([^"]*)"[^}]*\} (\S+)$')


def scrape(pool, timeout=10):
    """(the /metrics text, seconds it took)."""
    t0 = time.monotonic()
    status, headers, body = get(pool.listen_port, "/metrics", timeout=timeout)
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return body.decode(), time.monotonic() - t0


def families(text):
    """The families of a valid exposition, checked: each one's HELP and TYPE
    at most once, before its samples, and its samples together."""
    seen, current = [], None
    for line in text.splitlines():
        m = re.match(r"# (HELP|TYPE) (\S+)", line)
        if m:
            if m.group(2) != current:
                assert m.group(2) not in seen, f"family {m.group(2)} comes back: {line}"
                current = m.group(2)
                seen.append(current)
            continue
        if not line or line.startswith("#"):
            continue
        name = NAME.match(line).group(0)
        if current is None or not name.startswith(current):
            assert name not in seen, f"sample outside its family {current}: {line}"
            current = name
            seen.append(name)
    return seen


def child_samples(text):
    """{(name, model, instance): value} of the children's samples."""
    out = {}
    for line in text.splitlines():
        m = CHILD_SAMPLE.match(line)
        if m:
            out[m.group(1), m.group(2), m.group(3)] = float(m.group(4))
    return out


def argv_of(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")


def started(pool, *models):
    """Start each model; its ready instance's status."""
    for m in models:
        pool.cli("start", m, check=0)
    return {m: pool.ready_instances(m)[0] for m in models}


def test_two_models_children_series_come_relabelled_in_one_valid_exposition(pool):
    pool.config({"a": {}, "b": {}}, pool_extra="metrics_children = yes")
    pool.start()
    inst = started(pool, "a", "b")
    for m in ("a", "b"):
        assert "--metrics" in argv_of(inst[m]["pid"])
    assert post(pool.listen_port, "/v1/chat/completions", {**CHAT, "model": "a"})[0] == 200

    text, _ = scrape(pool)
    names = families(text)
    samples = child_samples(text)
    a, b = inst["a"]["id"], inst["b"]["id"]
    for family in ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total",
                   "llamacpp:requests_processing", "llamacpp:n_busy_slots_per_decode"):
        assert family in names
        assert text.count(f"# HELP {family} ") == 1
        assert text.count(f"# TYPE {family} ") == 1
        assert (family, "a", a) in samples and (family, "b", b) in samples
    assert samples["llamacpp:tokens_predicted_total", "a", a] >= 1    # a served one request
    assert samples["llamacpp:tokens_predicted_total", "b", b] == 0
    assert "# TYPE llamacpp:prompt_tokens_total counter" in text
    # the pool's own series are still there, and no child was skipped
    assert "llama_pool_instance_state{" in text
    assert "# llama-pool: skipped" not in text
    assert f'llama_pool_child_scrape_errors_total{{model="a"}} 0' in text.splitlines()


def test_without_metrics_children_there_are_no_child_series_and_no_flag(pool):
    pool.config({"tiny": {}})
    pool.start()
    inst = started(pool, "tiny")["tiny"]
    assert "--metrics" not in argv_of(inst["pid"])
    text, _ = scrape(pool)
    assert "llamacpp:" not in text
    assert "llama_pool_child_scrape_errors_total" not in text
    assert "llama_pool_instance_state{" in text


@fake_only("needs FAKE_METRICS_HANG")
def test_a_child_whose_metrics_hang_is_skipped_and_the_scrape_answers_within_the_timeout(pool):
    pool.config({"stuck": {"env": {"FAKE_METRICS_HANG": "1"}}, "ok": {}},
                pool_extra="metrics_children = yes")
    pool.start()
    inst = started(pool, "stuck", "ok")

    # While a scrape waits for the stuck child, the daemon answers others.
    result = {}
    t = threading.Thread(target=lambda: result.update(zip(("text", "took"), scrape(pool))))
    t.start()
    time.sleep(0.2)     # let that scrape begin: what follows must not wait for it
    t0 = time.monotonic()
    assert get(pool.listen_port, "/health")[0] == 200
    assert time.monotonic() - t0 < 0.5 * SLOW
    t.join(10)
    assert not t.is_alive()

    text, took = result["text"], result["took"]
    assert 0.9 <= took < 2.0 * SLOW, took           # the 1 s deadline, not the child
    families(text)
    samples = child_samples(text)
    assert ("llamacpp:prompt_tokens_total", "ok", inst["ok"]["id"]) in samples
    assert not [k for k in samples if k[1] == "stuck"]
    assert f"# llama-pool: skipped {inst['stuck']['id']} (model stuck): " in text
    assert 'llama_pool_child_scrape_errors_total{model="stuck"} 1' in text.splitlines()
    assert 'llama_pool_child_scrape_errors_total{model="ok"} 0' in text.splitlines()

    text, _ = scrape(pool)
    assert 'llama_pool_child_scrape_errors_total{model="stuck"} 2' in text.splitlines()
    # a hung /metrics is no failed /health: the child stays
    assert pool.ready_instances("stuck")[0]["pid"] == inst["stuck"]["pid"]


def test_scrapes_do_not_count_as_use(pool):
    pool.config({"tiny": {}}, pool_extra="metrics_children = yes\nidle_timeout = 2s")
    pool.start()
    pool.cli("start", "tiny", check=0)
    ready = time.monotonic()
    inst = pool.ready_instances("tiny")[0]

    def used_at():
        """When the scheduler last saw it used (its ready time, for one
        never asked), on our clock; None once it is not ready."""
        live = pool.ready_instances("tiny")
        return time.monotonic() - live[0]["last_used_s_ago"] if live else None

    first = used_at()
    # Scrape through the idle timeout: it stops on time all the same, and
    # its last use never moves.
    scrapes = 0
    while (at := used_at()) is not None:
        assert abs(at - first) < 0.25, "a scrape counted as use"
        text, _ = scrape(pool)
        if ("llamacpp:prompt_tokens_total", "tiny", inst["id"]) in child_samples(text):
            scrapes += 1
        assert time.monotonic() - ready < 2 + 3 * SLOW, "still running long past idle_timeout"
        time.sleep(0.1)
    assert time.monotonic() - ready > 1.5, "stopped before idle_timeout"
    assert scrapes >= 5
    wait_for(lambda: 'llama_pool_evictions_total{model="tiny",reason="idle"} 1'
             in scrape(pool)[0].splitlines(), what="the idle stop counted")


def test_a_reload_that_turns_metrics_children_on_keeps_running_children(pool):
    pool.config({"tiny": {}})
    pool.start()
    before = started(pool, "tiny")["tiny"]
    pool.config({"tiny": {}}, pool_extra="metrics_children = yes")
    r = pool.cli("reload", check=0)
    assert "changed: tiny" not in r.stdout
    # Not restarted: it has no --metrics, and is not scraped (nor skipped).
    now = pool.ready_instances("tiny")[0]
    assert now["pid"] == before["pid"]
    text, _ = scrape(pool)
    assert "llamacpp:" not in text and "# llama-pool: skipped" not in text
    # Its next start has it.
    pool.cli("restart", "tiny", check=0)
    after = wait_for(lambda: [i for i in pool.ready_instances("tiny") if i["pid"] != before["pid"]],
                     what="tiny restarted")[0]
    assert "--metrics" in argv_of(after["pid"])
    assert ("llamacpp:prompt_tokens_total", "tiny", after["id"]) in child_samples(scrape(pool)[0])
