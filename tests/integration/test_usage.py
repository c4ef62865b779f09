"""Usage that lasts (#12): per-model counts in state_dir/usage.json, kept
across restarts, a corrupt file set aside, preload = popular N, GET
/pool/usage and `status --usage`."""
import http.client
import json
import os
import signal
import time

from conftest import fake_only, wait_for

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def chat(pool, model):
    conn = http.client.HTTPConnection("127.0.0.1", pool.listen_port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps({**CHAT, "model": model}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def usage(pool, all_models=False):
    code, body = pool.get("/pool/usage" + ("?all=1" if all_models else ""))
    assert code == 200, body
    return json.loads(body)


def by_name(doc):
    return {m["name"]: m for m in doc["models"]}


def usage_file(pool):
    return os.path.join(pool.state_dir, "usage.json")


def read_usage_file(pool):
    with open(usage_file(pool)) as f:
        return json.load(f)


def write_usage_file(pool, models):
    os.makedirs(pool.state_dir, exist_ok=True)
    with open(usage_file(pool), "w") as f:
        json.dump({"version": 1, "models": models}, f)


def stop(pool):
    pool.signal(signal.SIGTERM)
    assert pool.wait_exit() == 0


def test_requests_and_tokens_are_counted_and_kept_across_a_restart(pool):
    pool.config({"tiny": {}, "other": {}})
    pool.start()
    before = int(time.time())
    for _ in range(3):
        assert chat(pool, "tiny") == 200
    assert chat(pool, "other") == 200
    doc = usage(pool)
    assert doc["state_file"] == usage_file(pool)
    assert [m["name"] for m in doc["models"]] == ["tiny", "other"]      # most used first
    tiny = by_name(doc)["tiny"]
    assert tiny["requests"] == 3 and tiny["loads"] == 1
    assert tiny["prompt_tokens"] > 0 and tiny["generated_tokens"] > 0
    assert tiny["load_seconds"] > 0
    assert before <= tiny["last_used_unix"] <= time.time() + 1
    assert tiny["last_used"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(tiny["last_used_unix"]))
    assert by_name(doc)["other"]["requests"] == 1

    stop(pool)
    assert read_usage_file(pool)["models"]["tiny"]["requests"] == 3
    pool.start()
    again = by_name(usage(pool))
    for name in ("tiny", "other"):
        for key in ("requests", "prompt_tokens", "generated_tokens", "loads", "last_used"):
            assert again[name][key] == by_name(doc)[name][key], (name, key)
    assert chat(pool, "tiny") == 200
    assert by_name(usage(pool))["tiny"]["requests"] == 4
    assert "read the usage of 2 models from " + usage_file(pool) in pool.daemon_log()


def test_counts_reach_the_file_within_the_save_interval(pool):
    # Without a clean stop, at most the last 10 s of counts are lost.
    pool.config({"tiny": {}})
    pool.start()
    assert chat(pool, "tiny") == 200
    wait_for(lambda: read_usage_file(pool)["models"]["tiny"]["requests"] == 1, timeout=15,
             interval=0.2, what="the periodic save")
    pool.proc.kill()
    pool.proc.wait()
    pool.cleanup()          # its children, killed with it
    pool.start()
    assert by_name(usage(pool))["tiny"]["requests"] == 1


def test_a_corrupt_file_is_set_aside_with_a_warning(pool):
    pool.config({"tiny": {}}, pool_extra="preload = popular 1")
    os.makedirs(pool.state_dir)
    with open(usage_file(pool), "w") as f:
        f.write('{"version": 1, "models": {"tiny": {"requests": ')
    pool.start()
    log = pool.daemon_log()
    warning = [line for line in log.splitlines() if "set aside as" in line]
    assert len(warning) == 1 and " warn " in warning[0] and "not valid JSON" in warning[0], log
    aside = [n for n in os.listdir(pool.state_dir) if n.startswith("usage.json.corrupt-")]
    assert len(aside) == 1 and aside[0] in warning[0]
    with open(os.path.join(pool.state_dir, aside[0])) as f:
        assert f.read() == '{"version": 1, "models": {"tiny": {"requests": '   # kept as it was
    assert usage(pool)["models"] == []
    assert "preload = popular 1: no configured model has been used yet; nothing to preload" in log
    assert not pool.instances("tiny")
    assert chat(pool, "tiny") == 200                # running, counting afresh
    assert by_name(usage(pool))["tiny"]["requests"] == 1
    stop(pool)
    assert read_usage_file(pool)["models"]["tiny"]["requests"] == 1


def test_a_state_dir_that_cannot_be_made_counts_in_memory(pool):
    blocker = os.path.join(pool.dir, "a-file")
    open(blocker, "w").close()
    pool.config({"tiny": {}}, pool_extra=f"state_dir = {blocker}/state")
    pool.start()
    assert f"cannot create state_dir {blocker}/state: Not a directory" in pool.daemon_log()
    assert chat(pool, "tiny") == 200
    doc = usage(pool)
    assert doc["state_file"] is None and by_name(doc)["tiny"]["requests"] == 1
    r = pool.cli("status", "--usage", check=0)
    assert "kept in memory only" in r.stdout
    stop(pool)


def test_preload_popular_starts_the_most_used_models_at_startup(pool):
    now = int(time.time())
    write_usage_file(pool, {"a": {"requests": 2, "last_used": now},
                            "b": {"requests": 5, "last_used": now - 60},
                            "gone": {"requests": 50, "last_used": now}})    # no longer configured
    pool.config({"a": {}, "b": {}, "c": {}}, pool_extra="preload = popular 1")
    pool.start()
    wait_for(lambda: pool.ready_instances("b"), what="b, the most used model, preloaded")
    assert not pool.instances("a") and not pool.instances("c")
    assert "b: preloaded, the #1 most used model (5 requests)" in pool.daemon_log()


@fake_only("charges each model its configured memory while it starts")
def test_preload_popular_skips_a_model_that_does_not_fit_and_evicts_nothing(pool):
    # keep (instances 1-1) takes 600M of the 1G budget while it starts; big,
    # the most used, needs 600M more: skipped, keep untouched; small fits.
    now = int(time.time())
    write_usage_file(pool, {"big": {"requests": 9, "last_used": now},
                            "small": {"requests": 3, "last_used": now},
                            "third": {"requests": 1, "last_used": now}})
    pool.config({"keep": {"instances": "1-1", "memory": "600M"}, "big": {"memory": "600M"},
                 "small": {"memory": "10M"}, "third": {"memory": "10M"}},
                pool_extra="memory_budget = 1G\npreload = popular 2")
    pool.start()
    wait_for(lambda: pool.ready_instances("small") and pool.ready_instances("keep"),
             what="keep (its minimum) and small (popular) ready")
    assert not pool.instances("big") and not pool.instances("third")
    log = pool.daemon_log()
    skipped = [line for line in log.splitlines() if "big: not preloaded" in line]
    assert len(skipped) == 1 and " info " in skipped[0] and "1.0 GiB budget" in skipped[0], log
    assert "small: preloaded, the #2 most used model (3 requests)" in log
    assert "stopping it" not in log                 # no eviction for it
    assert pool.ready_instances("keep")[0]["restarts"] == 0


def test_status_usage_lists_the_configured_models_most_used_first(pool):
    pool.config({"tiny": {}, "other": {}, "idle": {}})
    pool.start()
    r = pool.cli("status", "--usage", check=0)
    assert "no model has been used yet" in r.stdout
    for _ in range(2):
        assert chat(pool, "other") == 200
    assert chat(pool, "tiny") == 200
    r = pool.cli("status", "--usage", check=0)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "REQUESTS", "PROMPT", "TOK", "GENERATED", "TOK", "LOADS",
                                "AVG", "LOAD", "LAST", "USED"]
    assert lines[1].split()[0:2] == ["other", "2"] and lines[2].split()[0:2] == ["tiny", "1"]
    assert lines[1].split()[4] == "1" and lines[1].split()[5].endswith("s")   # one load, its time
    assert lines[1].endswith(" ago")
    assert not any(line.startswith("idle") for line in lines)         # never used: no row
    assert f"kept in {usage_file(pool)}" in r.stdout
    j = json.loads(pool.cli("status", "--usage", "--json", check=0).stdout)
    assert [m["name"] for m in j["models"]] == ["other", "tiny"]
    assert pool.cli("status", "--usage", "tiny").returncode == 2
    assert pool.cli("status", "--usage", "--summary").returncode == 2

    # A model removed from pool.conf keeps its record, listed with --all only.
    pool.config({"tiny": {}, "idle": {}})
    pool.cli("reload", check=0)
    r = pool.cli("status", "--usage", check=0)
    assert not any(line.startswith("other") for line in r.stdout.splitlines())
    assert "1 model no longer in pool.conf not listed: `llama-pool status --usage --all` lists it" in r.stdout
    r = pool.cli("status", "--usage", "--all", check=0)
    assert any(line.startswith("other (not in pool.conf)") for line in r.stdout.splitlines())
    doc = usage(pool, all_models=True)
    assert by_name(doc)["other"]["configured"] is False and doc["not_configured"] == 1


def test_pool_usage_over_tcp_needs_the_admin_key(pool):
    pool.config({"tiny": {}}, pool_extra="admin_key = s3cret")
    pool.start()

    def tcp_get(headers):
        conn = http.client.HTTPConnection("127.0.0.1", pool.listen_port, timeout=10)
        try:
            conn.request("GET", "/pool/usage", headers=headers)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    assert tcp_get({})[0] == 401
    assert tcp_get({"Authorization": "Bearer wrong"})[0] == 401
    code, body = tcp_get({"Authorization": "Bearer s3cret"})
    assert code == 200 and json.loads(body)["models"] == []


def test_a_new_state_dir_waits_for_a_restart(pool):
    pool.config({"tiny": {}})
    pool.start()
    elsewhere = os.path.join(pool.dir, "elsewhere")
    pool.config({"tiny": {}}, pool_extra=f"state_dir = {elsewhere}")
    pool.cli("reload", check=0)
    assert ("reload: a state_dir change takes effect at the next restart (usage is kept in "
            f"{usage_file(pool)} until then)") in pool.daemon_log()
    assert chat(pool, "tiny") == 200
    stop(pool)
    assert read_usage_file(pool)["models"]["tiny"]["requests"] == 1
    assert not os.path.exists(elsewhere)
