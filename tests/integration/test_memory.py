"""Memory-aware scheduling end to end: a budget for three models out of ten,
a random workload, and a sampler that reads every child's PSS each 50 ms."""
import json
import random
import threading
import time

from conftest import REAL, fake_only, wait_for
from test_proxy import CHAT, get, post

MIB = 1 << 20


def pss_of(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@fake_only("the stand-in allocates a known amount (FAKE_MEMORY)")
def test_ten_models_budget_for_three_never_over_budget(pool):
    # Each child touches 48 MiB; `memory = 60M` is what the pool charges
    # before it has measured one. Budget: room for three, not four.
    budget = 3 * 60 * MIB + 20 * MIB
    models = {f"m{i}": {"args": "-c 256 -np 2 -cram 0", "memory": "60M",
                        "env": {"FAKE_MEMORY": "48M", "FAKE_TOKEN_MS": "5", "FAKE_LOAD_MS": "50"}}
              for i in range(10)}
    pool.config(models, pool_extra=f"memory_budget = {budget // MIB}M\nqueue_timeout = 60s\nmax_queue = 100")
    pool.start()
    assert pool.status()["memory"]["budget"] == budget

    stop = threading.Event()
    peak = {"sum": 0}

    def sampler():
        while not stop.is_set():
            total = sum(pss_of(pid) for pid in pool.child_pids_from_env())
            peak["sum"] = max(peak["sum"], total)
            time.sleep(0.05)

    failures = []
    done = {"n": 0}
    rng = random.Random(42)
    lock = threading.Lock()

    def client(seed):
        r = random.Random(seed)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            # Zipf-ish: a few models are hot, the rest come and go.
            model = f"m{min(int(r.paretovariate(1.2)) - 1, 9)}"
            status, _, body = post(pool.listen_port, "/v1/chat/completions",
                                   {**CHAT, "model": model, "max_tokens": 3}, timeout=90)
            with lock:
                done["n"] += 1
                if status != 200:
                    failures.append((model, status, body[:200]))

    t_sampler = threading.Thread(target=sampler)
    t_sampler.start()
    clients = [threading.Thread(target=client, args=(rng.random(),)) for _ in range(4)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(120)
    stop.set()
    t_sampler.join()

    assert not failures, failures[:5]
    assert done["n"] > 50
    assert peak["sum"] <= budget, f"children's PSS peaked at {peak['sum'] / MIB:.0f} MiB over {budget / MIB:.0f} MiB"
    metrics = get(pool.listen_port, "/metrics")[2].decode()
    evictions = sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
                    if l.startswith("llama_pool_evictions_total") and 'reason="lru"' in l)
    assert evictions > 0, "the workload never needed an eviction: the test proves nothing"
    running = [m for m in pool.status()["models"] if m["instances"]]
    assert len(running) <= 3


def test_a_model_that_can_never_fit_gets_503_with_numbers(pool):
    pool.config({"big": {"memory": "2G"}}, pool_extra="memory_budget = 1G")
    pool.start()
    status, _, body = post(pool.listen_port, "/v1/chat/completions", {**CHAT, "model": "big"})
    assert status == 503
    msg = json.loads(body)["error"]["message"]
    assert "2.0 GiB" in msg and "1.0 GiB" in msg
    assert not pool.instances("big")


@fake_only("needs the stand-in's load time")
def test_idle_instances_are_stopped_after_idle_timeout(pool):
    pool.config({"a": {"idle_timeout": "500ms"}, "p": {"idle_timeout": "500ms", "pin": "yes"}})
    pool.start()
    for m in ("a", "p"):
        assert post(pool.listen_port, "/v1/chat/completions", {**CHAT, "model": m})[0] == 200
    wait_for(lambda: not [i for i in pool.instances("a") if i["pid"]], timeout=10, what="a stopped for idleness")
    assert pool.ready_instances("p"), "a pinned model is never stopped for idleness"
    assert "idle_timeout passed" in pool.daemon_log()


@fake_only("the stand-in allocates a known amount (FAKE_MEMORY)")
def test_operator_start_that_would_pass_the_budget_is_refused(pool):
    # small really uses ~90 MiB (its measured PSS replaces the 100M estimate)
    pool.config({"small": {"memory": "100M", "env": {"FAKE_MEMORY": "90M"}}, "big": {"memory": "300M"}},
                pool_extra="memory_budget = 350M")
    pool.start()
    pool.cli("start", "small", check=0)
    r = pool.cli("start", "big")
    assert r.returncode == 1
    assert "big needs 300 MiB more" in r.stderr and "350 MiB budget" in r.stderr
    assert not pool.instances("big")
    assert pool.status()["memory"]["used"] <= 350 * MIB
