"""Harness for integration tests: the real llama-pool binary, driven over
its control socket and its CLI, with the stand-in llama-server (or a real
one when LLAMA_SERVER is set).

Every wait is a bounded poll (wait_for); every process a test starts is
killed at teardown, whatever the test's outcome: the daemon, and any
llama-server whose command line names the test's own temp dir.
"""
import http.client
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.abspath(os.environ.get("LLAMA_POOL_BUILD", os.path.join(ROOT, "build")))
LLAMA_POOL = os.path.join(BUILD, "llama-pool")
FAKE_SERVER = os.path.join(BUILD, "fake-llama-server")
REAL_SERVER = os.environ.get("LLAMA_SERVER")
REAL_MODEL = os.environ.get("LLAMA_POOL_TEST_MODEL")
REAL = bool(REAL_SERVER and REAL_MODEL)
if not REAL:
    REAL_SERVER = None

# Sanitizer builds are slower; give every bound some room.
SLOW = 3.0 if "asan" in BUILD else 1.0


def fake_only(reason="needs the stand-in's test knobs"):
    return pytest.mark.skipif(REAL, reason=reason)


def wait_for(cond, timeout=10.0, interval=0.01, what="condition"):
    """Poll COND until it returns something truthy; fail after TIMEOUT s."""
    deadline = time.monotonic() + timeout * SLOW
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except (OSError, http.client.HTTPException, ValueError, IndexError, KeyError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout * SLOW:.1f}s waiting for {what}; last: {last!r}")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _root_id(pid="self"):
    st = os.stat(f"/proc/{pid}/root")
    return st.st_dev, st.st_ino


def same_root(pid):
    """Whether PID sees the same / as we do. A run in a chroot (scripts/
    check-fresh) and one outside can have the same temp dir names; neither
    may take the other's processes for its own."""
    try:
        return _root_id(pid) == _root_id()
    except OSError:
        return False


def pids_with_arg(needle):
    """PIDs whose command line contains NEEDLE (the test's temp dir)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if needle.encode() in cmd and pid_alive(int(d)) and same_root(int(d)):
            found.append(int(d))
    return found


def port_span():
    """Where tests pick ports: below the kernel's ephemeral range, where
    connect() takes client ports (one could take a port checked free before
    the daemon binds it), or above it, else 20000-60000."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return 20000, 60000
    if lo - 20000 >= 4000:
        return 20000, lo
    if 65536 - (hi + 1) >= 4000:
        return hi + 1, 65536
    return 20000, 60000


def free_port_block(n, avoid=()):
    """A base port with N consecutive free ports, picked at random so that
    tests (and leftovers of other runs) do not collide, and sharing no port
    with the [start, end) ranges in AVOID."""
    span_lo, span_hi = port_span()
    for _ in range(200):
        base = random.randrange(span_lo, span_hi - n)
        if any(base < end and start < base + n for start, end in avoid):
            continue
        ok = True
        for p in range(base, base + n):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                ok = False
            finally:
                s.close()
            if not ok:
                break
        if ok:
            return base
    raise RuntimeError("no free port block")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


NGINX = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx") or None


def nginx_start(where, http_conf, port, error_log):
    """nginx in the foreground, its pid and temp files in WHERE, HTTP_CONF in
    its http block, in a process group of its own (so that nginx_stop reaches
    its workers even if the master is gone); returned once 127.0.0.1:PORT
    answers."""
    t = where
    conf = os.path.join(t, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
daemon off;
pid {t}/nginx.pid;
error_log {error_log} warn;
events {{ }}
http {{
    access_log off;
    client_body_temp_path {t}/nginx-body;
    proxy_temp_path {t}/nginx-proxy;
    fastcgi_temp_path {t}/nginx-fastcgi;
    uwsgi_temp_path {t}/nginx-uwsgi;
    scgi_temp_path {t}/nginx-scgi;
{http_conf}
}}
""")
    proc = subprocess.Popen([NGINX, "-c", conf, "-p", str(t)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def up():
        if proc.poll() is not None:
            try:
                with open(error_log, errors="replace") as f:
                    log = f.read()
            except OSError:
                log = ""
            raise AssertionError(f"nginx exited with {proc.returncode}:\n{log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    wait_for(up, what="nginx listening")
    return proc


def nginx_stop(proc):
    """SIGTERM (the master stops its workers; a SIGKILLed master would leave
    them serving), then SIGKILL to whatever is left in its group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


def write_gguf(path):
    """A minimal GGUF v3 file: magic, version, no tensors, no metadata. The
    stand-in only checks the magic."""
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    return path


class Pool:
    """One llama-pool daemon on a config written into a temp dir."""

    def __init__(self, tmp_path):
        self.dir = str(tmp_path)
        self.conf = os.path.join(self.dir, "pool.conf")
        self.sock = os.path.join(self.dir, "control.sock")
        self.log_dir = os.path.join(self.dir, "logs")
        self.state_dir = os.path.join(self.dir, "state")
        self.stderr_path = os.path.join(self.dir, "daemon.log")
        self.proc = None
        self.port_base = free_port_block(20)
        # Outside the children's ports: the daemon refuses a listen port
        # inside port_range (exit 1 at start).
        self.listen_port = free_port_block(1, avoid=[(self.port_base, self.port_base + 20)])

    # ---- config ----
    def model_file(self, name="m"):
        if REAL:
            return REAL_MODEL
        return write_gguf(os.path.join(self.dir, f"{name}.gguf"))

    def config(self, models, pool_extra="", port_count=20):
        """MODELS: {name: {"env": {...}, "args": "...", other keys...}}"""
        keys = {
            "listen": f"127.0.0.1:{self.listen_port}",
            "control_socket": self.sock,
            "llama_server": REAL_SERVER or FAKE_SERVER,
            "port_range": f"{self.port_base}-{self.port_base + port_count - 1}",
            "log_dir": self.log_dir,
            # Usage counts (usage.json): the test's own, never /var/lib.
            "state_dir": self.state_dir,
            "stop_timeout": "5s",
            "health_interval": "1s",
            # As pool.conf.example: no 8 GiB host prompt cache per child
            # (and none in each child's memory estimate).
            "default_args": "-cram 0",
        }
        for line in pool_extra.splitlines():   # "key = value" lines override
            if "=" in line:
                k, v = line.split("=", 1)
                keys[k.strip()] = v.strip()
        lines = ["[pool]"] + [f"{k} = {v}" for k, v in keys.items()]
        for name, m in models.items():
            m = dict(m)
            env = m.pop("env", {})
            lines.append(f"[model {name}]")
            lines.append(f"path = {m.pop('path', None) or self.model_file(name)}")
            args = m.pop("args", "-c 256 -np 2")
            if REAL:
                args += " -t 1 --no-warmup"
            lines.append(f"args = {args}")
            # The test's dir in every child's environment marks it as ours.
            env = {"FAKE_LOAD_MS": "100", "LLAMA_POOL_TEST_DIR": self.dir, **env}
            lines.append("env = " + " ".join(f"{k}={v}" for k, v in env.items()))
            for k, v in m.items():
                lines.append(f"{k} = {v}")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        return self.conf

    # ---- daemon ----
    def start(self, expect_ready=True, env=None, preexec=None, binary=LLAMA_POOL):
        """ENV: more variables for the daemon (not its children: they get a
        clean environment and their model's env). PREEXEC: run in the
        daemon's process before exec (e.g. to put it in a cgroup). BINARY:
        the llama-pool to run (a copy a test replaces, for an upgrade)."""
        self.stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen([binary, "serve", "-c", self.conf],
                                     stdin=subprocess.DEVNULL, stdout=self.stderr,
                                     stderr=self.stderr, cwd=self.dir,
                                     env={**os.environ, **(env or {})}, preexec_fn=preexec)
        if expect_ready:
            def up():
                if self.proc.poll() is not None:
                    raise AssertionError(f"llama-pool exited with {self.proc.returncode}:\n{self.daemon_log()}")
                return self.get("/pool/status")[0] == 200
            wait_for(up, what="the daemon's control socket")
        return self

    def daemon_log(self):
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def request(self, method, path, body=None, headers=None, timeout=10):
        conn = UnixHTTPConnection(self.sock, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            return r.status, data
        finally:
            conn.close()

    def get(self, path):
        return self.request("GET", path)

    def status(self, model=None):
        code, body = self.get("/pool/status" + (f"?model={model}" if model else ""))
        assert code == 200, body
        return json.loads(body)

    def model(self, name):
        for m in self.status()["models"]:
            if m["name"] == name:
                return m
        raise KeyError(name)

    def instances(self, name):
        return self.model(name)["instances"]

    def ready_instances(self, name):
        return [i for i in self.instances(name) if i["state"] == "ready"]

    def cli(self, *args, timeout=60, check=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_POOL_")}
        r = subprocess.run([LLAMA_POOL, *args, "-s", self.sock], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout * SLOW)
        if check is not None:
            assert r.returncode == check, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
        return r

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout=20):
        return self.proc.wait(timeout=timeout * SLOW)

    def children(self):
        """Live processes started for this test (they carry its dir)."""
        return [p for p in pids_with_arg(self.dir) if self.proc is None or p != self.proc.pid]

    def child_pids_from_env(self):
        """Live processes whose environment names this test's dir."""
        found = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = f.read()
            except OSError:
                continue
            if (f"LLAMA_POOL_TEST_DIR={self.dir}".encode() in env.split(b"\0") and pid_alive(int(d))
                    and same_root(int(d))):
                found.append(int(d))
        return found

    def cleanup(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in set(self.children()) | set(self.child_pids_from_env()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if getattr(self, "stderr", None):
            self.stderr.close()


def call_failed(request):
    """Whether the test's body (not its setup or teardown) failed: a
    fixture then prints what explains it before cleaning up."""
    rep = getattr(request.node, "rep_call", None)
    return rep is not None and rep.failed


@pytest.fixture
def pool(tmp_path, request):
    p = Pool(tmp_path)
    yield p
    if call_failed(request):
        print("---- daemon log ----")
        print(p.daemon_log()[-6000:])
    p.cleanup()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def pytest_report_header(config):
    mode = f"real llama-server {REAL_SERVER} with {REAL_MODEL}" if REAL else f"stand-in {FAKE_SERVER}"
    return f"llama-pool: {LLAMA_POOL}; children: {mode}"
