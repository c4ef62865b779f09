"""GET /metrics: Prometheus text with llama_pool_ names, counting what happened."""
import re
import urllib.request

from conftest import fake_only, wait_for
from test_proxy import CHAT, get, one_slow_slot, post, take_the_slot


def scrape(pool):
    status, headers, body = get(pool.listen_port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in body.decode().splitlines():
        if line.startswith("#") or not line:
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def test_metrics_count_starts_requests_and_statuses(pool):
    pool.config({"tiny": {"args": "-c 256 -np 2"}})
    pool.start()
    before = scrape(pool)
    assert before['llama_pool_starts_total{model="tiny"}'] == 0
    for _ in range(3):
        assert post(pool.listen_port, "/v1/chat/completions", {**CHAT, "model": "tiny"})[0] == 200
    assert post(pool.listen_port, "/v1/chat/completions", b'{"model":"tiny","messages":3}')[0] in (400, 500)
    # The slot count comes from the child's /props, fetched as it becomes ready.
    wait_for(lambda: pool.ready_instances("tiny")[0]["slots"] == 2, what="slots from /props")
    m = scrape(pool)
    assert m['llama_pool_starts_total{model="tiny"}'] == 1
    assert m['llama_pool_load_seconds_count{model="tiny"}'] == 1
    assert m['llama_pool_requests_total{model="tiny",status="200"}'] == 3
    assert m['llama_pool_request_duration_seconds_count'] == 4
    assert m['llama_pool_request_duration_seconds_bucket{le="+Inf"}'] == 4
    # all four reached the instance and got its answer head
    assert m['llama_pool_upstream_first_byte_seconds_count'] == 4
    assert 0 < m['llama_pool_upstream_first_byte_seconds_sum'] <= m['llama_pool_request_duration_seconds_sum']
    assert m['llama_pool_queue_wait_seconds_count{model="tiny"}'] == 4
    inst = pool.ready_instances("tiny")[0]["id"]
    assert m[f'llama_pool_instance_state{{model="tiny",instance="{inst}",state="ready"}}'] == 1
    assert m[f'llama_pool_instance_state{{model="tiny",instance="{inst}",state="stopped"}}'] == 0
    assert m[f'llama_pool_instance_slots{{model="tiny",instance="{inst}"}}'] == 2
    assert m[f'llama_pool_instance_memory_bytes{{model="tiny",instance="{inst}"}}'] > 0
    assert m[f'llama_pool_instance_charged_bytes{{model="tiny",instance="{inst}"}}'] > 0
    assert m["llama_pool_memory_budget_bytes"] > 0
    assert m['llama_pool_evictions_total{model="tiny",reason="crash"}'] == 0


@fake_only("needs slow generation")
def test_metrics_count_queue_rejections(pool):
    one_slow_slot(pool, 200, pool_extra="max_queue = 0")
    t = take_the_slot(pool)
    assert post(pool.listen_port, "/v1/chat/completions", {**CHAT, "model": "tiny"})[0] == 429
    t.join(30)
    m = scrape(pool)
    assert m['llama_pool_requests_total{model="tiny",status="429"}'] == 1
    assert m['llama_pool_requests_total{model="tiny",status="200"}'] == 1
