"""A cgroup per child (src/cgroup.h, docs/systemd.md).

Most tests run the daemon against a fake cgroup tree: plain directories and
files in the test's temp dir, named by LLAMA_POOL_CGROUP_ROOT. The daemon
writes there what it would write into a delegated cgroup v2; the test reads
it back, and plays the kernel's part (memory.current, memory.events,
memory.peak) where needed. cgroup.kill kills nothing there: stops still
work through the process group.

The last test needs the real thing: a cgroup v2 with the memory controller
that this test may create a cgroup under (LLAMA_POOL_TEST_CGROUP=DIR, else
the cgroup2 mount's root when it is writable and hands memory down). It is
skipped, with the reason, elsewhere (a hybrid host, cgroup v1, no root)."""
import os
import signal
import uuid

import pytest

from conftest import fake_only, pid_alive, wait_for
from test_events import events  # noqa: F401  (the fixture)
from test_proxy import CHAT, post

MIB = 1 << 20


def fake_tree(pool, controllers="cpu memory pids"):
    root = os.path.join(pool.dir, "cgroup")
    os.mkdir(root)
    with open(os.path.join(root, "cgroup.controllers"), "w") as f:
        f.write(controllers + "\n")
    return root


def read(root, *path):
    with open(os.path.join(root, *path)) as f:
        return f.read()


def write(root, *path_and_text):
    *path, text = path_and_text
    with open(os.path.join(root, *path), "w") as f:
        f.write(text)


def start_fake(pool, models, pool_extra=""):
    root = fake_tree(pool)
    pool.config(models, pool_extra=pool_extra)
    pool.start(env={"LLAMA_POOL_CGROUP_ROOT": root})
    return root


def ready_instance(pool, model):
    pool.cli("start", model, check=0)
    return wait_for(lambda: (pool.ready_instances(model) or [None])[0], what=f"{model} ready")


def test_without_delegation_one_line_says_why_and_children_keep_the_process_group(pool):
    pool.config({"tiny": {}})
    pool.start()
    st = pool.status()["cgroup"]
    lines = [l for l in pool.daemon_log().splitlines() if " cgroups: " in l]
    assert len(lines) == 1, lines
    if st["enabled"]:
        pytest.skip(f"cgroups are delegated here ({st['path']}): nothing falls back")
    assert st["path"] is None and st["reason"]
    assert f"cgroups: not in use ({st['reason']}): children share the daemon's cgroup; " \
           "stops use the process group" in lines[0]
    inst = ready_instance(pool, "tiny")
    assert inst["cgroup"] is None and inst["cgroup_memory"] is None and inst["memory_max"] is None
    pool.cli("stop", "tiny", check=0)
    wait_for(lambda: not pid_alive(inst["pid"]), what="the child gone")


@fake_only("memory = SIZE makes the charge exact only for the stand-in's estimate")
def test_each_instance_runs_in_its_cgroup_with_memory_max_its_charge_plus_a_margin(pool):
    root = start_fake(pool, {"tiny": {"memory": "64M", "memory_hard_limit": "yes"},
                             "free": {"memory": "64M"}})
    # The daemon moved into the leaf, then handed the controllers down.
    assert read(root, "supervisor", "cgroup.procs") == str(pool.proc.pid)
    assert read(root, "cgroup.subtree_control") == "+memory +pids"
    assert pool.status()["cgroup"] == {"enabled": True, "path": root, "reason": None}

    tiny = ready_instance(pool, "tiny")
    # The child wrote its own pid, before exec.
    assert read(root, "tiny-1", "cgroup.procs") == str(tiny["pid"])
    # 64 MiB charged + the minimum margin, 256 MiB.
    assert read(root, "tiny-1", "memory.max") == str(320 * MIB)
    assert read(root, "tiny-1", "memory.swap.max") == "0"
    assert read(root, "tiny-1", "memory.oom.group") == "1"
    assert tiny["cgroup"] == "tiny-1" and tiny["memory_max"] == 320 * MIB
    assert "tiny#1: started pid %d on port %d in cgroup tiny-1 (memory.max 320 MiB)" % (
        tiny["pid"], tiny["port"]) in pool.daemon_log()

    # Without memory_hard_limit: a cgroup still, unlimited.
    free = ready_instance(pool, "free")
    assert read(root, "free-1", "memory.max") == "max"
    assert read(root, "free-1", "cgroup.procs") == str(free["pid"])
    assert free["cgroup"] == "free-1" and free["memory_max"] is None

    # memory.current is read beside PSS (on each /health check and sample).
    write(root, "tiny-1", "memory.current", str(123 * MIB))
    wait_for(lambda: pool.instances("tiny")[0]["cgroup_memory"] == 123 * MIB, what="memory.current read")
    assert pool.instances("tiny")[0]["memory"] > 0           # PSS, measured as before
    out = pool.cli("status", check=0).stdout
    assert "· 123 MiB" in out, out
    assert f"cgroups: an instance each under {root}" in out, out
    code, body = pool.request("GET", "/metrics")
    assert code == 200
    assert b'llama_pool_instance_cgroup_memory_bytes{model="tiny",instance="tiny#1"} %d' % (123 * MIB) in body


@fake_only()
def test_a_stop_writes_cgroup_kill_after_sigterm(pool):
    root = start_fake(pool, {"tiny": {}})
    inst = ready_instance(pool, "tiny")
    assert not os.path.exists(os.path.join(root, "tiny-1", "cgroup.kill"))
    pool.cli("stop", "tiny", check=0)
    wait_for(lambda: not pid_alive(inst["pid"]), what="the child gone")
    # SIGTERM first (a clean exit 0); then the sweep of the cgroup.
    assert "tiny#1: stopped (exited with status 0)" in pool.daemon_log()
    wait_for(lambda: os.path.exists(os.path.join(root, "tiny-1", "cgroup.kill")), what="cgroup.kill")
    assert read(root, "tiny-1", "cgroup.kill") == "1"


@fake_only()
def test_a_child_that_ignores_sigterm_is_killed_through_its_cgroup_too(pool):
    root = start_fake(pool, {"tiny": {"env": {"FAKE_IGNORE_SIGTERM": "1"}}}, pool_extra="stop_timeout = 300ms")
    inst = ready_instance(pool, "tiny")
    pool.cli("stop", "tiny", check=0)
    wait_for(lambda: not pid_alive(inst["pid"]), what="the child killed")
    log = pool.daemon_log()
    assert "still running 0 s after SIGTERM; sending SIGKILL" in log
    assert "tiny#1: stopped (killed by signal 9 (Killed))" in log
    assert read(root, "tiny-1", "cgroup.kill") == "1"


@fake_only()
def test_an_oom_kill_is_reported_with_the_memory_it_reached(pool, events):
    root = start_fake(pool, {"tiny": {"memory": "64M", "memory_hard_limit": "yes"}},
                      pool_extra="max_restarts = 0")
    inst = ready_instance(pool, "tiny")
    ev = events()
    # The kernel's part: the OOM killer ended it at 400 MiB.
    write(root, "tiny-1", "memory.events", "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 1\n")
    write(root, "tiny-1", "memory.peak", str(400 * MIB))
    os.kill(inst["pid"], signal.SIGKILL)

    why = "killed by the OOM killer at 400 MiB (memory.max 320 MiB)"
    failed = wait_for(lambda: [i for i in pool.instances("tiny") if i["state"] == "failed"],
                      what="the instance failed")[0]
    assert failed["last_error"].startswith(why), failed
    assert failed["oom_kills"] == 1
    lines = [l for l in pool.daemon_log().splitlines() if why in l]
    assert any(" tiny#1: " + why in l for l in lines), lines
    assert pool.model("tiny")["last_error"].startswith(why)
    assert f"tiny: {why}" in pool.cli("status", check=0).stdout
    _, d = ev.until(lambda t, d: t == "instance" and d["state"] in ("failed", "starting") and
                    d.get("error"), "the exit")
    assert d["error"].startswith(why) and d["oom_kill"] is True and d["oom_at"] == 400 * MIB


@fake_only()
def test_a_plain_sigkill_is_not_an_oom_kill(pool):
    root = start_fake(pool, {"tiny": {}}, pool_extra="max_restarts = 0")
    inst = ready_instance(pool, "tiny")
    write(root, "tiny-1", "memory.events", "oom 0\noom_kill 0\n")
    os.kill(inst["pid"], signal.SIGKILL)
    failed = wait_for(lambda: [i for i in pool.instances("tiny") if i["state"] == "failed"],
                      what="the instance failed")[0]
    assert failed["last_error"].startswith("killed by signal 9 (Killed)"), failed
    assert failed["oom_kills"] == 0


def test_a_bad_memory_hard_limit_is_refused_with_its_line(pool):
    pool.config({"tiny": {"memory_hard_limit": "sometimes"}})
    r = pool.cli("check", "-c", pool.conf)
    assert r.returncode == 1
    assert 'memory_hard_limit: "sometimes" is not yes or no' in r.stderr
    assert f"{pool.conf}:" in r.stderr


# ---------- the real thing ----------

def delegated_parent():
    """A cgroup v2 directory this test may make a cgroup in, with memory
    handed down to it: (dir, None), or (None, why not)."""
    given = os.environ.get("LLAMA_POOL_TEST_CGROUP")
    if given:
        candidates = [given]
    else:
        mounts = []
        try:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    pre, _, post = line.partition(" - ")
                    if post.split()[:1] == ["cgroup2"]:
                        mounts.append(pre.split()[4])
        except OSError as e:
            return None, f"cannot read /proc/self/mountinfo: {e}"
        if not mounts:
            return None, "no cgroup v2 here (cgroup v1 only)"
        candidates = mounts
    why = []
    for d in candidates:
        try:
            ctl = read(d, "cgroup.controllers").split()
            sub = read(d, "cgroup.subtree_control").split()
        except OSError as e:
            why.append(f"{d}: {e}")
            continue
        if "memory" not in ctl:
            why.append(f"{d} has controllers {' '.join(ctl) or 'none'}: no memory"
                       + (" (memory is on cgroup v1: a hybrid layout)" if os.path.isdir("/sys/fs/cgroup/memory") else ""))
        elif "memory" not in sub:
            why.append(f"{d} does not hand memory down (cgroup.subtree_control: {' '.join(sub) or 'empty'})")
        elif not os.access(d, os.W_OK):
            why.append(f"{d} is not writable (not delegated to uid {os.getuid()})")
        else:
            return d, None
    return None, "cgroup v2 memory controller not delegated here: " + "; ".join(why) + \
        " (set LLAMA_POOL_TEST_CGROUP to a delegated cgroup that hands memory down)"


@fake_only("the stand-in grows on request (FAKE_MEMORY_PER_REQUEST)")
def test_a_child_past_its_memory_max_is_killed_by_the_oom_killer(pool):
    parent, why = delegated_parent()
    if not parent:
        pytest.skip(why)
    d = os.path.join(parent, "llama-pool-test-" + uuid.uuid4().hex[:8])
    os.mkdir(d)
    try:
        pool.config({"tiny": {"memory": "64M", "memory_hard_limit": "yes",
                              "env": {"FAKE_MEMORY_PER_REQUEST": "64M"}}},
                    pool_extra="max_restarts = 0")

        def into_d():   # the daemon starts in D: a cgroup of its own
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write("0")
        pool.start(preexec=into_d)
        st = pool.status()["cgroup"]
        assert st["enabled"], st
        inst = ready_instance(pool, "tiny")
        assert read(d, "tiny-1", "memory.max").strip() == str(320 * MIB)
        # Each request touches 64 MiB more: the sixth passes 320 MiB.
        for _ in range(12):
            status, _, _ = post(pool.listen_port, "/v1/chat/completions", {**CHAT, "model": "tiny"})
            if status != 200:
                break
        failed = wait_for(lambda: [i for i in pool.instances("tiny") if i["state"] == "failed"],
                          what="the OOM kill")[0]
        assert failed["last_error"].startswith("killed by the OOM killer at "), failed
        mib = int(failed["last_error"].split(" at ")[1].split()[0])
        assert 300 <= mib <= 330, failed["last_error"]
        assert not pid_alive(inst["pid"])
    finally:
        pool.cleanup()
        for sub in ("tiny-1", "supervisor", ""):
            try:
                os.rmdir(os.path.join(d, sub) if sub else d)
            except OSError:
                pass


@fake_only("memory = SIZE makes the charge exact only for the stand-in's estimate")
def test_an_upgrade_in_place_keeps_each_child_in_its_cgroup(pool):
    root = start_fake(pool, {"tiny": {"memory": "64M", "memory_hard_limit": "yes"}})
    tiny = ready_instance(pool, "tiny")
    write(root, "tiny-1", "memory.current", str(99 * MIB))
    wait_for(lambda: pool.instances("tiny")[0]["cgroup_memory"] == 99 * MIB, what="memory.current read")
    r = pool.cli("upgrade", check=0)
    assert f"kept tiny#1: pid {tiny['pid']}" in r.stdout, r.stdout
    after = pool.instances("tiny")[0]
    assert after["pid"] == tiny["pid"]
    assert after["cgroup"] == "tiny-1" and after["memory_max"] == 320 * MIB
    assert after["cgroup_memory"] == 99 * MIB
    # Still the same tree: no supervisor/supervisor, no second child directory.
    assert not os.path.exists(os.path.join(root, "supervisor", "supervisor"))
    assert read(root, "supervisor", "cgroup.procs") == str(pool.proc.pid)
    # An OOM kill after the upgrade is still told as one.
    write(root, "tiny-1", "memory.events", "oom 1\noom_kill 1\n")
    write(root, "tiny-1", "memory.peak", str(330 * MIB))
    os.kill(tiny["pid"], signal.SIGKILL)
    wait_for(lambda: "killed by the OOM killer at 330 MiB" in (pool.instances("tiny")[0]["last_error"] or ""),
             what="the OOM kill in status")
