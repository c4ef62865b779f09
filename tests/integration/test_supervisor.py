"""The supervisor: start/status/stop through the CLI, crashes and backoff,
crash loops, hung health checks, port conflicts, failed loads, shutdown,
kill -9, reload. Each test names the behaviour it checks."""
import json
import os
import select
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from conftest import LLAMA_POOL, REAL, SLOW, fake_only, pid_alive, wait_for


def health_of(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return r.status


def test_start_status_stop_through_the_cli(pool):
    pool.config({"tiny": {}, "other": {}})
    pool.start()

    r = pool.cli("start", "tiny", check=0)
    assert "tiny: ready" in r.stdout
    inst = pool.ready_instances("tiny")
    assert len(inst) == 1
    assert inst[0]["id"] == "tiny#1"
    assert health_of(inst[0]["port"]) == 200
    assert pool.port_base <= inst[0]["port"] < pool.port_base + 20

    table = pool.cli("status", check=0).stdout
    header = table.splitlines()[0].split()
    assert header[:6] == ["MODEL", "INSTANCE", "STATE", "PID", "PORT", "UPTIME"]
    row = next(l for l in table.splitlines() if "tiny#1" in l).split()
    assert row[2] == "ready" and row[3] == str(inst[0]["pid"]) and row[4] == str(inst[0]["port"])
    assert any(l.split()[:3] == ["other", "-", "stopped"] for l in table.splitlines())

    js = json.loads(pool.cli("status", "--json", check=0).stdout)
    assert {"memory", "queue", "models"} <= js.keys()
    m = next(m for m in js["models"] if m["name"] == "tiny")
    for k in ("name", "aliases", "state", "pinned", "memory_estimate", "waiting", "last_error", "instances"):
        assert k in m
    for k in ("id", "state", "pid", "port", "uptime_s", "restarts", "memory", "slots", "in_flight", "last_used_s_ago"):
        assert k in m["instances"][0]

    pid = inst[0]["pid"]
    r = pool.cli("stop", "tiny", check=0)
    assert "tiny: stopped" in r.stdout
    assert not pid_alive(pid)
    assert pool.model("tiny")["state"] == "stopped"


def test_slots_come_from_props(pool):
    pool.config({"tiny": {"args": "-c 256 -np 3"}})
    pool.start()
    pool.cli("start", "tiny", check=0)
    wait_for(lambda: pool.ready_instances("tiny")[0]["slots"] == 3, what="slots = 3 from /props")


def test_start_several_instances(pool):
    pool.config({"tiny": {"instances": "1-3"}})
    pool.start()
    # min 1 preloads at startup
    wait_for(lambda: len(pool.ready_instances("tiny")) == 1, what="preloaded instance")
    pool.cli("start", "tiny", "-n", "3", check=0)
    inst = pool.ready_instances("tiny")
    assert sorted(i["id"] for i in inst) == ["tiny#1", "tiny#2", "tiny#3"]
    assert len({i["port"] for i in inst}) == 3
    r = pool.cli("start", "tiny", "-n", "4")
    assert r.returncode == 1 and "at most 3" in r.stderr


def test_crash_is_restarted_with_backoff(pool):
    pool.config({"tiny": {}})
    pool.start()
    pool.cli("start", "tiny", check=0)
    first = pool.ready_instances("tiny")[0]

    t0 = time.monotonic()
    os.kill(first["pid"], signal.SIGKILL)   # a crash no runtime can intercept (the OOM killer's)
    second = wait_for(lambda: [i for i in pool.ready_instances("tiny") if i["pid"] != first["pid"]],
                      what="a restarted instance")[0]
    assert time.monotonic() - t0 >= 0.9, "restarted before the 1 s backoff"
    assert second["restarts"] == 1
    assert "killed by signal 9" in pool.daemon_log()

    t1 = time.monotonic()
    os.kill(second["pid"], signal.SIGKILL)
    wait_for(lambda: pool.ready_instances("tiny") and pool.ready_instances("tiny")[0]["pid"] != second["pid"],
             what="the second restart")
    assert time.monotonic() - t1 >= 1.9, "the second backoff should be 2 s"
    assert pool.ready_instances("tiny")[0]["restarts"] == 2


def broken_model(pool):
    """A file whose load fails: garbage after the magic for a real server,
    no magic at all for the stand-in."""
    bad = os.path.join(pool.dir, "broken.gguf")
    with open(bad, "wb") as f:
        f.write(b"GGUF" + b"\xff" * 64 if REAL else b"not a gguf file at all")
    return bad


def test_crash_loop_marks_the_model_failed_with_reason(pool):
    pool.config({"bad": {"path": broken_model(pool)}},
                pool_extra="max_restarts = 2\nrestart_window = 1m")
    pool.start()
    pool.cli("start", "bad", "--no-wait", check=0)
    m = wait_for(lambda: (lambda m: m if m["state"] == "failed" else None)(pool.model("bad")),
                 timeout=20, what="model marked failed")
    assert "exited with status 1 while loading" in m["last_error"]
    assert "model loading error" in m["last_error"]
    assert "marked failed" in m["last_error"]
    # failed means no more restarts: no process of this test stays up
    wait_for(lambda: not pool.child_pids_from_env(), what="no child left")
    assert "failed" in pool.cli("status", check=0).stdout


@fake_only("needs FAKE_CRASH_AFTER")
def test_a_crash_with_a_request_in_flight_still_marks_the_model_failed(pool):
    """The request the crash dropped is sent again and waits: the model's
    failure must end that wait, not start the model again (a start queued
    for the waiter before the model was marked failed used to run)."""
    pool.config({"tiny": {"env": {"FAKE_CRASH_AFTER": "0", "FAKE_TOKEN_MS": "20"}}},
                pool_extra="max_restarts = 0")
    pool.start()
    first = pool.cli("start", "tiny", check=0) and pool.ready_instances("tiny")[0]["pid"]
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 20}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{pool.listen_port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30 * SLOW) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    assert status in (502, 503), status
    m = wait_for(lambda: (lambda m: m if m["state"] == "failed" else None)(pool.model("tiny")),
                 what="model marked failed")
    assert "marked failed" in m["last_error"]
    # No restart: the one child it had is the only one it ever started.
    assert not pid_alive(first)
    assert pool.daemon_log().count("tiny#1: started pid") == 1, pool.daemon_log()
    assert not [i for i in pool.instances("tiny") if i["pid"]]


def test_hung_health_is_restarted(pool):
    # A frozen process (SIGSTOP) answers nothing: /health times out.
    pool.config({"tiny": {}}, pool_extra="health_interval = 200ms\nstop_timeout = 500ms")
    pool.start()
    pool.cli("start", "tiny", check=0)
    first = pool.ready_instances("tiny")[0]
    os.kill(first["pid"], signal.SIGSTOP)
    wait_for(lambda: any(i["pid"] not in (None, first["pid"]) for i in pool.instances("tiny")),
             timeout=20, what="a new pid after /health hung")
    assert not pid_alive(first["pid"])
    assert "not answering /health" in pool.daemon_log()


@fake_only("needs the stand-in to bind late")
def test_port_taken_by_another_process_moves_to_the_next_port(pool):
    pool.config({"tiny": {"env": {"FAKE_BIND_DELAY_MS": "1500"}}})
    pool.start()
    pool.cli("start", "tiny", "--no-wait", check=0)
    inst = wait_for(lambda: [i for i in pool.instances("tiny") if i["port"]], what="a port")[0]
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", inst["port"]))
    squatter.listen(1)
    try:
        ready = wait_for(lambda: pool.ready_instances("tiny"), timeout=20, what="ready on another port")[0]
        assert ready["port"] != inst["port"]
        assert ready["restarts"] == 0, "a port conflict is not a crash"
        assert f"port {inst['port']} is taken" in pool.daemon_log()
    finally:
        squatter.close()


def test_failed_load_shows_the_log_tail(pool):
    pool.config({"broken": {"path": broken_model(pool)}})
    pool.start()
    r = pool.cli("start", "broken")
    assert r.returncode == 1
    assert "broken: failed to start" in r.stderr
    assert "while loading" in r.stderr
    assert "last lines of its log" in r.stderr
    assert "model loading error" in r.stderr or "failed to load model" in r.stderr


def test_sigterm_stops_every_child_and_exits_0(pool):
    pool.config({"a": {}, "b": {}})
    pool.start()
    pool.cli("start", "a", check=0)
    pool.cli("start", "b", check=0)
    pids = [i["pid"] for m in ("a", "b") for i in pool.instances(m)]
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    pool.signal(signal.SIGTERM)
    assert pool.wait_exit() == 0
    assert not any(pid_alive(p) for p in pids)
    assert not pool.child_pids_from_env()


def test_kill_9_of_the_daemon_leaves_no_child(pool):
    pool.config({"a": {}, "b": {}})
    pool.start()
    pool.cli("start", "a", check=0)
    pool.cli("start", "b", check=0)
    pids = [i["pid"] for m in ("a", "b") for i in pool.instances(m)]
    pool.proc.kill()
    pool.proc.wait()
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=2 / SLOW, what="children gone within 2 s")


@pytest.mark.parametrize("how", ["ignores SIGTERM", "frozen"])
def test_stop_escalates_to_sigkill_after_stop_timeout(pool, how):
    if how == "ignores SIGTERM" and REAL:
        pytest.skip("needs the stand-in's FAKE_IGNORE_SIGTERM")
    pool.config({"stubborn": {"env": {"FAKE_IGNORE_SIGTERM": "1"} if how == "ignores SIGTERM" else {}}},
                pool_extra="stop_timeout = 500ms")
    pool.start()
    pool.cli("start", "stubborn", check=0)
    pid = pool.ready_instances("stubborn")[0]["pid"]
    if how == "frozen":
        os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    pool.cli("stop", "stubborn", check=0)
    assert time.monotonic() - t0 >= 0.45
    assert not pid_alive(pid)
    assert "sending SIGKILL" in pool.daemon_log()


def test_reload_keeps_unchanged_instances(pool):
    pool.config({"keep": {}, "change": {}, "drop": {}})
    pool.start()
    for m in ("keep", "change", "drop"):
        pool.cli("start", m, check=0)
    keep = pool.ready_instances("keep")[0]["pid"]
    change = pool.ready_instances("change")[0]["pid"]
    drop = pool.ready_instances("drop")[0]["pid"]

    pool.config({"keep": {}, "change": {"args": "-c 512 -np 2"}, "added": {}})
    r = pool.cli("reload", check=0)
    assert "added: added" in r.stdout and "removed: drop" in r.stdout and "changed: change" in r.stdout

    wait_for(lambda: not pid_alive(drop), what="the removed model's child to stop")
    new_change = wait_for(lambda: [i for i in pool.ready_instances("change") if i["pid"] != change],
                          what="the changed model restarted")[0]
    assert new_change["pid"] != change
    assert pool.ready_instances("keep")[0]["pid"] == keep
    names = [m["name"] for m in pool.status()["models"]]
    assert names == ["keep", "change", "added"]


def test_sighup_reloads_too(pool):
    pool.config({"a": {}})
    pool.start()
    pool.config({"a": {}, "b": {}})
    pool.signal(signal.SIGHUP)
    wait_for(lambda: [m["name"] for m in pool.status()["models"]] == ["a", "b"], what="b after SIGHUP")


def test_bad_reload_keeps_the_running_config(pool):
    pool.config({"a": {}})
    pool.start()
    pool.cli("start", "a", check=0)
    pid = pool.ready_instances("a")[0]["pid"]
    with open(pool.conf, "a") as f:
        f.write("intances = 3\n")
    r = pool.cli("reload")
    assert r.returncode == 1
    assert "pool.conf:" in r.stderr and "unknown key" in r.stderr
    assert pool.proc.poll() is None
    assert pool.ready_instances("a")[0]["pid"] == pid


def test_bad_config_refuses_to_serve_with_file_and_line(pool):
    pool.config({"a": {}})
    with open(pool.conf, "a") as f:
        f.write("[model b]\npath = /nonexistent/b.gguf\n")
    pool.start(expect_ready=False)
    assert pool.wait_exit() == 1
    log = pool.daemon_log()
    assert "pool.conf:" in log and "/nonexistent/b.gguf" in log


def test_check_prints_each_models_argv(pool):
    pool.config({"a": {"args": "-c 256 -np 2 --alias 'my model'"}})
    r = pool.cli("check", "-c", pool.conf, check=0)
    assert "-m " + pool.model_file("a") in r.stdout or "-m" in r.stdout
    assert "--host 127.0.0.1" in r.stdout
    assert "'my model'" in r.stdout


def test_logs_tail_and_follow(pool):
    pool.config({"tiny": {}})
    pool.start()
    pool.cli("start", "tiny", check=0)
    r = pool.cli("logs", "tiny", "-n", "200", check=0)
    assert "tiny#1" in r.stdout
    assert "started pid" in r.stdout
    assert os.path.exists(os.path.join(pool.log_dir, "tiny.log"))

    import subprocess
    from conftest import LLAMA_POOL
    follow = subprocess.Popen([LLAMA_POOL, "logs", "tiny", "-f", "-n", "0", "-s", pool.sock],
                              stdout=subprocess.PIPE, text=True)
    try:
        pool.cli("restart", "tiny", check=0)
        # A bounded wait for the first followed line, not a readline that
        # hangs the suite if it never comes.
        import select
        ready, _, _ = select.select([follow.stdout], [], [], 10 * SLOW)
        assert ready, "no followed log line within the bound"
        line = follow.stdout.readline()
        assert "tiny#1" in line
    finally:
        follow.kill()
        follow.wait()


def test_model_env_reaches_the_child_but_not_router_port(pool, monkeypatch):
    pool.config({"tiny": {"env": {"OMP_NUM_THREADS": "3"}}})
    # The daemon's own environment has it; the child must not.
    os.environ["LLAMA_SERVER_ROUTER_PORT"] = "1"
    try:
        pool.start()
    finally:
        del os.environ["LLAMA_SERVER_ROUTER_PORT"]
    pool.cli("start", "tiny", check=0)
    pid = pool.ready_instances("tiny")[0]["pid"]
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = f.read().split(b"\0")
    assert b"OMP_NUM_THREADS=3" in env
    assert not any(e.startswith(b"LLAMA_SERVER_ROUTER_PORT=") for e in env)
    # Only stdin/out/err (and what the server opens itself) — none of ours.
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass    # closed since the listing (a health probe's connection)
    assert not any(pool.sock in l or "daemon.log" in l for l in links)


def test_cli_without_daemon_says_so(pool):
    pool.config({"a": {}})
    r = pool.cli("status")
    assert r.returncode == 3
    assert "not running" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unknown_model_is_one_clear_line(pool):
    pool.config({"alpha": {}, "beta": {}})
    pool.start()
    r = pool.cli("start", "gamma")
    assert r.returncode == 4
    assert 'model "gamma" not found' in r.stderr and "alpha" in r.stderr and "beta" in r.stderr


@fake_only()
def test_start_timeout_counts_from_last_progress(pool):
    # Loads for 30 s in silence: start_timeout (1 s) ends it.
    pool.config({"slow": {"env": {"FAKE_LOAD_MS": "30000", "FAKE_QUIET_LOAD": "1"}}},
                pool_extra="start_timeout = 1s")
    pool.start()
    r = pool.cli("start", "slow", timeout=20)
    assert r.returncode == 1
    assert "start_timeout" in r.stderr


def test_control_api_over_tcp_needs_admin_key(pool):
    pool.config({"a": {}}, pool_extra="admin_key = s3cret")
    pool.start()
    url = f"http://127.0.0.1:{pool.listen_port}/pool/status"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=5)
    assert e.value.code == 401
    req = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.loads(r.read())["models"][0]["name"] == "a"


def test_model_logs_rotate_by_size_and_follow_goes_on(pool):
    """log_max_size = 2K, log_keep = 2: tiny.log is renamed tiny.log.1 (and
    .1 to .2, the oldest dropped) once it passes 2 KiB; `logs -f` (from
    memory) keeps going across the rotations."""
    import select
    import subprocess
    from conftest import LLAMA_POOL
    pool.config({"tiny": {}}, pool_extra="log_max_size = 2K\nlog_keep = 2")
    pool.start()
    follow = subprocess.Popen([LLAMA_POOL, "logs", "tiny", "-f", "-n", "0", "-s", pool.sock],
                              stdout=subprocess.PIPE)
    try:
        base = os.path.join(pool.log_dir, "tiny.log")
        # Each restart writes a few hundred bytes (llama-pool's events and the
        # stand-in's start-up lines): enough of them rotate more than twice.
        for _ in range(12):
            pool.cli("restart", "tiny", check=0)
            wait_for(lambda: pool.ready_instances("tiny"), timeout=10, what="tiny ready")
        wait_for(lambda: os.path.exists(base + ".2"), timeout=10, what="a second rotation")
        assert os.path.exists(base + ".1")
        assert not os.path.exists(base + ".3")       # log_keep = 2
        for p in (base + ".1", base + ".2"):
            size = os.path.getsize(p)
            assert 2048 <= size < 2048 + 8192, (p, size)   # rotated once past the limit
        assert "tiny: log rotated at" in pool.daemon_log()
        # The follower goes on after the rotations: what it has shown so far
        # is read away, then a new start must show up.
        fd = follow.stdout.fileno()
        while select.select([fd], [], [], 0.3)[0] and os.read(fd, 65536):
            pass
        pool.cli("restart", "tiny", check=0)
        seen = b""
        deadline = time.monotonic() + 10 * SLOW
        while b"started pid" not in seen and time.monotonic() < deadline:
            if select.select([fd], [], [], 1)[0]:
                seen += os.read(fd, 65536)
        assert b"started pid" in seen
        assert follow.poll() is None                  # still following
    finally:
        follow.kill()
        follow.wait()


@fake_only("a wrapper script in front of the stand-in")
def test_child_output_lines_survive_long_lines_and_split_writes(pool):
    """A line far longer than one read comes through whole, in pieces of at
    most 4 KiB (what one log line holds), none lost; a line written in
    two parts, apart in time, is one line; the child's own lines after them
    (readiness among them) are read as usual."""
    from conftest import FAKE_SERVER
    wrapper = os.path.join(pool.dir, "child.sh")
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\n"
                "head -c 200000 /dev/zero | tr '\\0' x >&2; echo >&2\n"
                "printf 'first half, ' >&2; sleep 0.2; echo 'second half' >&2\n"
                f"exec {FAKE_SERVER} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    pool.config({"tiny": {}}, pool_extra=f"llama_server = {wrapper}")
    pool.start()
    pool.cli("start", "tiny")
    wait_for(lambda: pool.ready_instances("tiny"), what="tiny ready after the wrapper's lines")
    with open(os.path.join(pool.log_dir, "tiny.log")) as f:
        lines = f.read().splitlines()
    xs = [l.split("tiny#1: ", 1)[1] for l in lines if "tiny#1: x" in l]
    assert set("".join(xs)) == {"x"} and len("".join(xs)) == 200000, [len(x) for x in xs]
    assert all(len(x) <= 4096 for x in xs)
    assert any(l.endswith("tiny#1: first half, second half") for l in lines), lines[-20:]
    assert any("model loaded" in l for l in lines)


def test_a_log_follow_ends_with_a_line_when_the_daemon_stops(pool):
    """Not cut when the last connections are closed: told, and ended properly."""
    pool.config({"tiny": {}})
    pool.start()
    pool.cli("start", "tiny", check=0)
    follow = subprocess.Popen([LLAMA_POOL, "logs", "tiny", "-f", "-s", pool.sock], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([follow.stdout], [], [], 10 * SLOW)
        assert ready and follow.stdout.readline(), "logs -f printed nothing"
        pool.signal(signal.SIGTERM)
        out, err = follow.communicate(timeout=20 * SLOW)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert out.rstrip().endswith("[llama-pool] the daemon is stopping"), out[-300:]
    assert follow.returncode == 0, err
    assert pool.wait_exit() == 0
