"""Upgrade in place (`llama-pool upgrade`, SIGUSR2): the daemon execs its
binary again with the same pid; children, sockets and idle connections
are kept, and a new binary that cannot take over leaves the old running."""
import http.client
import json
import os
import select
import shutil
import signal
import stat
import threading
import time

import pytest

from conftest import LLAMA_POOL, REAL, SLOW, UnixHTTPConnection, fake_only, free_port_block, wait_for


def chat(stream=False, n=8, model="tiny"):
    # /v1/completions: a real llama-server with random weights may fail a
    # chat answer's parsing (500), never a plain completion.
    return json.dumps({"model": model, "stream": stream, "max_tokens": n, "prompt": "hi"})


def model_garbled(status, body):
    """A real llama-server with random weights may refuse its own output
    ("does not match the expected ... format"): an answer from the child,
    not a request the pool lost."""
    return REAL and b"does not match the expected" in body and status in (200, 500)


class Loop:
    """Requests in a loop until stopped, on three kinds of connection: one
    kept alive across the upgrade, a new one each time, and streams."""

    def __init__(self, port):
        self.port = port
        self.ok = 0
        self.failures = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.keepalive, daemon=True),
                        threading.Thread(target=self.fresh, daemon=True),
                        threading.Thread(target=self.streams, daemon=True)]

    def note(self, what, fn):
        try:
            fn()
            self.ok += 1
        except Exception as e:                      # any failure is a lost request
            self.failures.append(f"{what}: {e!r}")

    def plain(self, conn):
        conn.request("POST", "/v1/completions", body=chat(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        body = r.read()
        if model_garbled(r.status, body):
            return
        assert r.status == 200, (r.status, body[:200])
        assert "text" in json.loads(body)["choices"][0]

    def keepalive(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stop.is_set():
            self.note("keep-alive", lambda: self.plain(conn))
        conn.close()

    def fresh(self):
        while not self.stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            self.note("new connection", lambda: self.plain(conn))
            conn.close()

    def one_stream(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("POST", "/v1/completions", body=chat(stream=True, n=20),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            raw = r.read()
            if model_garbled(r.status, raw):
                return
            body = raw.decode()
            assert r.status == 200, (r.status, body[:200])
            assert body.rstrip().endswith("data: [DONE]"), body[-200:]
        finally:
            conn.close()

    def streams(self):
        while not self.stop.is_set():
            self.note("stream", self.one_stream)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def long_stream(pool, n):
    """A stream of N tokens in a thread, under way when this returns:
    (the thread, {"status", "body"} once it has ended)."""
    result = {}

    def run():
        conn = http.client.HTTPConnection("127.0.0.1", pool.listen_port, timeout=60)
        conn.request("POST", "/v1/completions", body=chat(stream=True, n=n),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        result["status"] = r.status
        result["body"] = r.read().decode()
        conn.close()

    t = threading.Thread(target=run)
    t.start()
    wait_for(lambda: any(i["in_flight"] for i in pool.instances("tiny")), what="the stream to start")
    return t, result


def child_pids(pool, model="tiny"):
    return sorted(i["pid"] for i in pool.instances(model) if i["pid"])


def upgrades(pool):
    return pool.status()["upgrades"]


def started(pool, n=2):
    pool.cli("start", "tiny", "-n", str(n), check=0)
    return child_pids(pool)


def test_upgrade_under_load_keeps_children_and_loses_nothing(pool):
    pool.config({"tiny": {"instances": "1-2", "env": {"FAKE_TOKEN_MS": "2"}}})
    pool.start()
    before = started(pool)
    assert len(before) == 2
    st = pool.status()
    assert st["pid"] == pool.proc.pid and st["upgrades"] == 0
    with Loop(pool.listen_port) as loop:
        wait_for(lambda: loop.ok >= 20, what="requests before the upgrade")
        r = pool.cli("upgrade", check=0)
        n = loop.ok
        wait_for(lambda: loop.ok >= n + 20, what="requests after the upgrade")
    assert loop.failures == [], loop.failures[:5]
    assert "upgraded in place" in r.stdout, r.stdout
    assert r.stdout.count("kept tiny#") == 2, r.stdout
    assert pool.proc.poll() is None
    st = pool.status()
    assert st["pid"] == pool.proc.pid
    assert st["upgrades"] == 1
    assert child_pids(pool) == before
    assert all(i["state"] == "ready" for i in pool.instances("tiny"))
    # The uptime runs on from the first start, and requests were counted.
    assert st["uptime_s"] > 0
    log = pool.daemon_log()
    assert "upgrade: tiny#1: adopted pid" in log and "upgrade: tiny#2: adopted pid" in log


def test_sigusr2_upgrades_and_a_second_upgrade_works(pool):
    pool.config({"tiny": {}})
    pool.start()
    before = started(pool, 1)
    pool.signal(signal.SIGUSR2)
    wait_for(lambda: upgrades(pool) == 1, what="the SIGUSR2 upgrade")
    assert child_pids(pool) == before
    pool.cli("upgrade", check=0)
    assert upgrades(pool) == 2
    assert child_pids(pool) == before
    code, body = pool.request("POST", "/v1/completions", body=chat(),
                              headers={"Content-Type": "application/json"})
    assert code == 200 or model_garbled(code, body), body


def test_idle_keepalive_connection_is_carried_over(pool):
    pool.config({"tiny": {}})
    pool.start()
    started(pool, 1)
    conn = http.client.HTTPConnection("127.0.0.1", pool.listen_port, timeout=30)
    conn.request("GET", "/health")
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    sock_before = conn.sock
    pool.cli("upgrade", check=0)
    conn.request("POST", "/v1/completions", body=chat(), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 or REAL, r.read()
    r.read()
    assert conn.sock is sock_before          # the same TCP connection, served by the new image
    conn.close()


def run_from_copy(pool):
    """The daemon runs from a copy of its binary that the test may replace,
    with tiny#1 ready: (the copy's path, tiny's pids)."""
    pool.config({"tiny": {}})
    path = os.path.join(pool.dir, "bin", "llama-pool")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shutil.copy2(LLAMA_POOL, path)
    pool.start(binary=path)
    return path, started(pool, 1)


def replace_binary(path, content=None, source=None):
    """Install a new binary over PATH as a package manager does: a new file
    renamed over the old one (the running image keeps the old inode)."""
    tmp = path + ".new"
    if source:
        shutil.copy2(source, tmp)
    else:
        with open(tmp, "w") as f:
            f.write(content)
        os.chmod(tmp, stat.S_IRWXU)
    os.rename(tmp, path)


def test_a_new_binary_that_fails_leaves_the_old_one_running(pool):
    binary, before = run_from_copy(pool)
    replace_binary(binary, "#!/bin/sh\necho 'broken build: cannot start' >&2\nexit 3\n")
    r = pool.cli("upgrade", check=1)
    assert "broken build: cannot start" in r.stderr, r.stderr
    assert "exited with status 3" in r.stderr, r.stderr
    assert "goes on unchanged" in r.stderr
    assert pool.proc.poll() is None
    assert upgrades(pool) == 0 and child_pids(pool) == before
    code, body = pool.request("POST", "/v1/completions", body=chat(),
                              headers={"Content-Type": "application/json"})
    assert code == 200 or model_garbled(code, body), body
    # One that crashes while checking.
    replace_binary(binary, "#!/bin/sh\nkill -SEGV $$\n")
    r = pool.cli("upgrade", check=1)
    assert "killed by signal 11" in r.stderr, r.stderr
    assert child_pids(pool) == before
    # A good one again: the upgrade goes through, to the new file.
    replace_binary(binary, source=LLAMA_POOL)
    pool.cli("upgrade", check=0)
    assert upgrades(pool) == 1 and child_pids(pool) == before
    assert os.readlink(f"/proc/{pool.proc.pid}/exe") == binary


def test_a_bad_config_refuses_the_upgrade_with_file_and_line(pool):
    pool.config({"tiny": {}})
    pool.start()
    before = started(pool, 1)
    with open(pool.conf, "a") as f:
        f.write("bogus_key = 1\n")
    r = pool.cli("upgrade", check=1)
    assert f"{pool.conf}:" in r.stderr and "bogus_key" in r.stderr, r.stderr
    assert pool.proc.poll() is None and child_pids(pool) == before and upgrades(pool) == 0


def test_a_child_whose_args_changed_is_stopped_the_others_kept(pool):
    pool.config({"tiny": {}, "other": {}})
    pool.start()
    tiny = started(pool, 1)
    pool.cli("start", "other", check=0)
    other = child_pids(pool, "other")
    pool.config({"tiny": {}, "other": {"args": "-c 512 -np 2"}})
    r = pool.cli("upgrade", check=0)
    assert "kept tiny#1" in r.stdout, r.stdout
    assert "stopping other#1" in r.stdout and "command line changed" in r.stdout, r.stdout
    assert child_pids(pool) == tiny
    wait_for(lambda: not any(i["pid"] in other for i in pool.instances("other")),
             what="other#1 stopped")
    # It comes back on demand with the new args.
    code, body = pool.request("POST", "/v1/completions",
                              body=chat(model="other"),
                              headers={"Content-Type": "application/json"}, timeout=30)
    assert code == 200 or model_garbled(code, body), body


def test_a_model_removed_before_the_upgrade_has_its_child_stopped(pool):
    pool.config({"tiny": {}, "gone": {}})
    pool.start()
    pool.cli("start", "gone", check=0)
    gone = child_pids(pool, "gone")
    pool.config({"tiny": {}})
    r = pool.cli("upgrade", check=0)
    assert "stopping gone#1" in r.stdout and "no longer in pool.conf" in r.stdout, r.stdout
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split(")")[1].split()[0] != "Z"
                             for p in gone), what="the removed model's child to exit")


@fake_only("needs FAKE_TOKEN_MS to make a long stream")
def test_requests_that_outlast_the_timeout_give_the_upgrade_up(pool):
    pool.config({"tiny": {"env": {"FAKE_TOKEN_MS": "50"}}})
    pool.start()
    before = started(pool, 1)
    t, result = long_stream(pool, 80)
    r = pool.cli("upgrade", "--timeout", "1", check=1)
    assert "still under way" in r.stderr, r.stderr
    t.join(timeout=30)
    assert result.get("status") == 200 and result["body"].rstrip().endswith("[DONE]"), result
    assert upgrades(pool) == 0 and child_pids(pool) == before
    # New requests are served again (accepting resumed).
    code, body = pool.request("POST", "/v1/completions", body=chat(),
                              headers={"Content-Type": "application/json"})
    assert code == 200 or model_garbled(code, body), body
    conn = http.client.HTTPConnection("127.0.0.1", pool.listen_port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


def test_log_follows_and_monit_go_on_across_an_upgrade_and_event_streams_end_with_upgrade(pool):
    pool.config({"tiny": {}})
    pool.start()
    started(pool, 1)
    import subprocess
    follow = subprocess.Popen([LLAMA_POOL, "logs", "tiny", "-f", "-s", pool.sock], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    monit = subprocess.Popen([LLAMA_POOL, "monit", "--json", "-s", pool.sock], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        # Their first lines say they are connected: the model's log so far,
        # and the requests the daemon remembers (one is made for that).
        ready, _, _ = select.select([follow.stdout], [], [], 10 * SLOW)
        assert ready and follow.stdout.readline(), "logs -f printed nothing"
        code, body = pool.request("POST", "/v1/completions", body=chat(),
                                  headers={"Content-Type": "application/json"})
        ready, _, _ = select.select([monit.stdout], [], [], 10 * SLOW)
        assert ready and monit.stdout.readline(), "monit printed nothing"
        events = UnixHTTPConnection(pool.sock, timeout=10 * SLOW)
        events.request("GET", "/pool/events")
        ev = events.getresponse()
        assert ev.status == 200
        pool.cli("upgrade", check=0)
        # A plain event stream ends, properly, after an "upgrade" event.
        text = ev.read().decode()
        assert "event: upgrade" in text, text[-500:]
        events.close()
        # Both clients follow the new image: what happens next reaches them.
        pool.cli("stop", "tiny", check=0)
        pool.signal(signal.SIGTERM)
        assert pool.wait_exit() == 0
        out, _ = follow.communicate(timeout=10 * SLOW)
        mon, _ = monit.communicate(timeout=10 * SLOW)
    finally:
        for p in (follow, monit):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "upgrading in place" not in out, out
    # Stopped after the upgrade: only a follow that went on could print it.
    assert "tiny#1: [llama-pool] stopped" in out, out
    events_after = [json.loads(l) for l in mon.split('"event":"upgrade"', 1)[1].splitlines()[1:] if l.strip()]
    assert any(e["event"] == "instance" and e.get("state") == "stopped" for e in events_after), mon


def fds_of(pid):
    """{fd: (target, close-on-exec)} of PID."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                flags = int(next(l for l in f if l.startswith("flags:")).split()[1], 8)
        except (OSError, StopIteration):
            continue
        out[int(name)] = (target, bool(flags & 0o2000000))
    return out


def test_after_an_upgrade_every_fd_is_close_on_exec_and_none_is_left_over(pool):
    pool.config({"tiny": {}})
    pool.start()
    started(pool, 1)
    before = fds_of(pool.proc.pid)
    pool.cli("upgrade", check=0)
    pool.cli("upgrade", check=0)
    after = fds_of(pool.proc.pid)
    leaked = {fd: t for fd, t in after.items() if fd > 2 and not t[1]}
    assert leaked == {}, leaked
    assert not any("memfd:" in t for t, _ in after.values()), after
    # The same kinds of fds as before: no pipe or socket gained per upgrade.
    kinds = lambda fds: sorted(t.split(":")[0] for fd, (t, _) in fds.items() if fd > 2)
    assert len(after) <= len(before) + 1, (kinds(before), kinds(after))


def test_a_new_image_that_dies_after_the_exec_leaves_no_orphans(pool):
    """The check passes (the real binary answers it), then the image that
    takes over exits at once: the children die with it (PDEATHSIG)."""
    binary, kids = run_from_copy(pool)
    real = binary + ".real"
    shutil.copy2(LLAMA_POOL, real)
    replace_binary(binary, "#!/bin/sh\n"
                           f'if [ -n "$LLAMA_POOL_HANDOVER_CHECK" ]; then exec {real} "$@"; fi\n'
                           "echo 'new image: dying before it adopts anything' >&2\nexit 1\n")
    r = pool.cli("upgrade")
    assert r.returncode != 0
    assert "closed the connection without answering" in r.stderr, r.stderr
    assert pool.wait_exit() == 1
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and
                             open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
                             for p in kids), what="the children to die with it")
    assert "dying before it adopts anything" in pool.daemon_log()


@fake_only("needs FAKE_LOAD_MS for a slow load")
def test_a_loading_child_is_adopted_loading_and_a_minimum_is_not_started_twice(pool):
    pool.config({"slow": {"instances": "1-1", "env": {"FAKE_LOAD_MS": "1500"}}})
    pool.start()
    wait_for(lambda: [i for i in pool.instances("slow") if i["pid"]], what="slow#1 spawned")
    pid = pool.instances("slow")[0]["pid"]
    assert pool.instances("slow")[0]["state"] == "starting"
    r = pool.cli("upgrade", check=0)
    assert f"kept slow#1: pid {pid}" in r.stdout and "starting" in r.stdout, r.stdout
    wait_for(lambda: pool.instances("slow")[0]["state"] == "ready", what="slow#1 ready")
    inst = pool.instances("slow")
    assert len(inst) == 1 and inst[0]["pid"] == pid
    log = pool.daemon_log()
    assert log.count("slow#1: started pid") == 1, log


def test_usage_counts_in_memory_only_survive_an_upgrade(pool):
    pool.config({"tiny": {}}, pool_extra="state_dir =")
    pool.start()
    for _ in range(3):
        code, body = pool.request("POST", "/v1/completions", body=chat(),
                                  headers={"Content-Type": "application/json"}, timeout=30)
        assert code == 200 or model_garbled(code, body), body

    def requests():
        code, body = pool.get("/pool/usage")
        assert code == 200, body
        return {m["name"]: m["requests"] for m in json.loads(body)["models"]}

    wait_for(lambda: requests().get("tiny") == 3, what="3 requests counted")
    pool.cli("upgrade", check=0)
    assert requests().get("tiny") == 3


def test_instances_above_a_lowered_maximum_are_stopped(pool):
    pool.config({"tiny": {"instances": "0-2"}})
    pool.start()
    first, second = started(pool, 2)
    pool.config({"tiny": {"instances": "0-1"}})
    r = pool.cli("upgrade", check=0)
    assert f"kept tiny#1: pid {first}" in r.stdout, r.stdout
    assert f"stopping tiny#2: pid {second}: its model's instances maximum is lower" in r.stdout, r.stdout
    wait_for(lambda: child_pids(pool) == [first], what="tiny#2 stopped")


@fake_only("needs FAKE_TOKEN_MS to make a long stream")
def test_request_timeout_bounds_the_wait_of_an_upgrade(pool):
    pool.config({"tiny": {"env": {"FAKE_TOKEN_MS": "50"}}}, pool_extra="request_timeout = 1s")
    pool.start()
    before = started(pool, 1)
    t, result = long_stream(pool, 200)
    t0 = time.monotonic()
    pool.cli("upgrade", "--timeout", "30", check=0)
    took = time.monotonic() - t0
    t.join(timeout=30)
    # Cut at its limit (a 10 s stream), then the upgrade went on.
    assert '"finish_reason":"length"' in result["body"] and result["body"].rstrip().endswith("[DONE]"), \
        result["body"][-300:]
    assert took < 8 * SLOW, took
    assert upgrades(pool) == 1 and child_pids(pool) == before


def test_a_sigusr2_upgrade_that_fails_is_told_in_the_log_only_and_changes_nothing(pool):
    binary, before = run_from_copy(pool)
    replace_binary(binary, "#!/bin/sh\necho 'cannot run here' >&2\nexit 3\n")
    pool.signal(signal.SIGUSR2)
    wait_for(lambda: "goes on unchanged" in pool.daemon_log(), what="the failure in the log")
    line = [l for l in pool.daemon_log().splitlines() if "goes on unchanged" in l][0]
    assert "exited with status 3: cannot run here" in line, line
    assert "(SIGUSR2)" in pool.daemon_log()
    assert pool.proc.poll() is None and upgrades(pool) == 0 and child_pids(pool) == before


def test_listen_and_control_socket_stay_across_an_upgrade_that_changes_them(pool):
    pool.config({"tiny": {}})
    pool.start()
    started(pool, 1)
    old_port = pool.listen_port
    pool.listen_port = free_port_block(1, avoid=[(pool.port_base, pool.port_base + 20)])
    pool.config({"tiny": {}})               # listen moved in the file
    pool.cli("upgrade", check=0)
    assert "upgrade: listen and control_socket changes take effect at the next restart" in pool.daemon_log()
    conn = http.client.HTTPConnection("127.0.0.1", old_port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200  # still the socket clients know
    conn.close()
