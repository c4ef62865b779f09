"""/pool/status for pools of many models: the summary (counts by state,
only the models with instances), the full status paged with offset and
limit, and `llama-pool status` choosing a summary past 200 models."""
import http.client
import json
import os
import re

import pytest

from conftest import wait_for, write_gguf

MODEL_STATES = {"stopped", "starting", "ready", "stopping", "failed"}


def stub_models_dir(pool, n):
    """N stub GGUFs in a models_dir of the test's own: m000 … m(N-1)."""
    d = os.path.join(pool.dir, "models")
    os.mkdir(d)
    for i in range(n):
        write_gguf(os.path.join(d, f"m{i:03d}.gguf"))
    return d


def get_json(pool, path, expect=200):
    code, body = pool.get(path)
    assert code == expect, (path, code, body)
    return json.loads(body)


def broken_gguf(pool):
    path = os.path.join(pool.dir, "broken.gguf")
    with open(path, "wb") as f:
        f.write(b"not a gguf file at all")
    return path


def test_summary_counts_every_model_and_lists_only_those_with_instances(pool):
    models = {f"idle{i}": {} for i in range(6)}
    models.update({"a": {}, "b": {"instances": 2}, "bad": {"path": broken_gguf(pool)}})
    pool.config(models, pool_extra="max_restarts = 0\nrestart_window = 1m\nadmin_key = k")
    pool.start()
    pool.cli("start", "a", check=0)
    pool.cli("start", "b", "-n", "2", check=0)
    pool.cli("start", "bad", "--no-wait")
    wait_for(lambda: pool.model("bad")["state"] == "failed", timeout=20, what="bad marked failed")

    s = get_json(pool, "/pool/status?summary=1")
    full = pool.status()
    assert s["summary"] is True
    assert s["total"] == full["total"] == 9
    assert s["counts"]["models"] == {"ready": 2, "failed": 1, "stopped": 6, "starting": 0, "stopping": 0}
    assert s["counts"]["instances"] == {"ready": 3, "failed": 1, "starting": 0, "stopping": 0, "stopped": 0}
    # The pool-wide parts are those of the full status.
    assert s["memory"].keys() == full["memory"].keys()
    assert s["memory"]["used"] == full["memory"]["used"]
    assert [d["uuid"] for d in s["devices"]] == [d["uuid"] for d in full["devices"]]
    assert s["queue"] == full["queue"]
    # Only the models with instances, in config order, each as in the full status.
    assert [m["name"] for m in s["models"]] == ["a", "b", "bad"]
    by_name = {m["name"]: m for m in full["models"]}
    for m in s["models"]:
        assert m.keys() == by_name[m["name"]].keys()
        assert [i["id"] for i in m["instances"]] == [i["id"] for i in by_name[m["name"]]["instances"]]
        assert m["state"] == by_name[m["name"]]["state"]
    assert "summary" not in full and "counts" not in full

    # The TCP listener serves the same summary (with the admin key).
    conn = http.client.HTTPConnection("127.0.0.1", pool.listen_port, timeout=10)
    try:
        conn.request("GET", "/pool/status?summary=1", headers={"Authorization": "Bearer k"})
        r = conn.getresponse()
        tcp = json.loads(r.read())
    finally:
        conn.close()
    assert r.status == 200
    assert tcp["counts"] == s["counts"] and [m["name"] for m in tcp["models"]] == ["a", "b", "bad"]

    # Stopped again: out of the summary's list, back in its stopped count.
    pool.cli("stop", "a", check=0)
    wait_for(lambda: [m["name"] for m in get_json(pool, "/pool/status?summary=1")["models"]] == ["b", "bad"],
             what="a gone from the summary")
    assert get_json(pool, "/pool/status?summary=1")["counts"]["models"]["stopped"] == 7


def test_full_status_pages_in_config_order_with_total(pool):
    names = [f"p{i:02d}" for i in range(25)]
    pool.config({n: {} for n in names})
    pool.start()
    everything = pool.status()
    assert [m["name"] for m in everything["models"]] == names
    assert everything["total"] == 25 and "offset" not in everything and "limit" not in everything

    got = []
    for offset in range(0, 30, 10):
        page = get_json(pool, f"/pool/status?offset={offset}&limit=10")
        assert (page["total"], page["offset"], page["limit"]) == (25, offset, 10)
        assert page["memory"].keys() == everything["memory"].keys()
        got += page["models"]
    assert [m["name"] for m in got] == names
    assert got[3] == {**everything["models"][3]}      # the same shape and values

    past = get_json(pool, "/pool/status?offset=25&limit=10")
    assert past["models"] == [] and past["total"] == 25
    only_limit = get_json(pool, "/pool/status?limit=3")
    assert [m["name"] for m in only_limit["models"]] == names[:3] and only_limit["offset"] == 0
    only_offset = get_json(pool, "/pool/status?offset=23")
    assert [m["name"] for m in only_offset["models"]] == names[23:] and only_offset["limit"] == 1000
    # model= still picks one.
    one = get_json(pool, "/pool/status?model=p07")
    assert [m["name"] for m in one["models"]] == ["p07"] and one["total"] == 25


@pytest.mark.parametrize("query,says", [
    ("offset=-1", "offset must be a whole number"),
    ("offset=ten", "offset must be a whole number"),
    ("offset=", "offset must be a whole number"),
    ("limit=0", "limit must be a whole number from 1 to 1000"),
    ("limit=1001", "limit must be a whole number from 1 to 1000"),
    ("limit=2.5", "limit must be a whole number from 1 to 1000"),
    ("summary=perhaps", "summary must be 1 or 0"),
    ("summary=1&limit=10", "takes no offset or limit"),
    ("model=p1&offset=0", "model= names one model"),
])
def test_bad_status_parameters_are_a_400_with_a_json_error(pool, query, says):
    pool.config({"p1": {}})
    pool.start()
    body = get_json(pool, f"/pool/status?{query}", expect=400)
    assert body["error"]["code"] == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert says in body["error"]["message"]


def test_cli_status_summarises_300_models_and_all_lists_them(pool):
    d = stub_models_dir(pool, 300)
    pool.config({}, pool_extra=f"models_dir = {d}")
    pool.start()
    pool.cli("start", "m123", check=0)

    out = pool.cli("status", check=0).stdout
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "INSTANCE", "STATE"]
    rows = [l.split() for l in lines[1:] if re.match(r"m\d{3} ", l)]
    assert [r[:3] for r in rows] == [["m123", "m123#1", "ready"]]
    assert "300 models: 1 ready, 299 stopped · instances: 1 ready" in out
    assert "299 models without instances not listed: `llama-pool status --all` lists every model" in out

    out = pool.cli("status", "--all", check=0).stdout
    listed = [l.split()[0] for l in out.splitlines()[1:] if re.match(r"m\d{3} ", l)]
    assert listed == [f"m{i:03d}" for i in range(300)]
    assert "m123#1" in out and "not listed" not in out

    # --json stays the full status in one answer; --summary --json the summary.
    full = json.loads(pool.cli("status", "--json", check=0).stdout)
    assert len(full["models"]) == 300 and "summary" not in full
    summ = json.loads(pool.cli("status", "--json", "--summary", check=0).stdout)
    assert summ["summary"] is True and [m["name"] for m in summ["models"]] == ["m123"]
    paged = json.loads(pool.cli("status", "--json", "--all", check=0).stdout)
    assert [m["name"] for m in paged["models"]] == [m["name"] for m in full["models"]]
    assert "offset" not in paged and paged["total"] == 300

    # One model by name, as before; the switches are for the whole pool.
    out = pool.cli("status", "m005", check=0).stdout
    assert [l.split()[:3] for l in out.splitlines()[1:2]] == [["m005", "-", "stopped"]]
    assert pool.cli("status", "--all", "m005", check=2).stderr.startswith("llama-pool status:")
    assert pool.cli("status", "--summary", "--all", check=2).stderr.startswith("llama-pool status:")


def test_cli_status_lists_every_model_of_a_small_pool_unless_asked_for_a_summary(pool):
    pool.config({"tiny": {}, "other": {}})
    pool.start()
    pool.cli("start", "tiny", check=0)
    out = pool.cli("status", check=0).stdout
    assert any(l.split()[:3] == ["other", "-", "stopped"] for l in out.splitlines())
    assert "not listed" not in out
    out = pool.cli("status", "--summary", check=0).stdout
    assert not any(l.startswith("other") for l in out.splitlines())
    assert "2 models: 1 ready, 1 stopped · instances: 1 ready" in out
    assert "1 model without instances not listed" in out
