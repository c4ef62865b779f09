"""Life under systemd: sd_notify READY/STATUS/WATCHDOG/STOPPING through a
fake $NOTIFY_SOCKET, and a unit file that systemd-analyze accepts."""
import os
import shutil
import signal
import socket
import struct
import subprocess

import pytest

from conftest import BUILD, LLAMA_POOL, wait_for


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.05)
    yield path, s
    s.close()


def drain(sock, into):
    try:
        while True:
            into.append(sock.recv(4096).decode())
    except (socket.timeout, BlockingIOError):
        pass
    return into


def test_sd_notify_ready_status_watchdog_stopping(pool, notify_socket):
    path, sock = notify_socket
    pool.config({"tiny": {"instances": "1-1"}})   # min 1: preloaded at start
    os.environ["NOTIFY_SOCKET"] = path
    os.environ["WATCHDOG_USEC"] = "400000"
    try:
        pool.start()
    finally:
        del os.environ["NOTIFY_SOCKET"]
        del os.environ["WATCHDOG_USEC"]
    msgs = []
    wait_for(lambda: any("READY=1" in m for m in drain(sock, msgs)), what="READY=1")
    wait_for(lambda: any("STATUS=1 instance ready" in m for m in drain(sock, msgs)),
             what="STATUS naming the ready instance")
    wait_for(lambda: any("WATCHDOG=1" in m for m in drain(sock, msgs)), what="WATCHDOG=1 pings")
    status = [m for m in msgs if "STATUS=" in m][-1]
    assert " of " in status, status         # "… 12 MiB of 22 GiB"
    pool.signal(signal.SIGTERM)
    assert pool.wait_exit() == 0
    drain(sock, msgs)
    assert any("STOPPING=1" in m for m in msgs)


def test_reload_notifies_reloading_then_ready(pool, notify_socket):
    path, sock = notify_socket
    pool.config({"a": {}})
    os.environ["NOTIFY_SOCKET"] = path
    try:
        pool.start()
    finally:
        del os.environ["NOTIFY_SOCKET"]
    msgs = []
    wait_for(lambda: any("READY=1" in m for m in drain(sock, msgs)), what="READY=1")
    msgs.clear()
    pool.cli("reload", check=0)
    wait_for(lambda: len(drain(sock, msgs)) >= 2, what="two notifications")
    assert "RELOADING=1" in msgs[0]
    assert any("READY=1" in m for m in msgs[1:])


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_unit_file_verifies(tmp_path):
    unit = os.path.join(BUILD, "llama-pool.service")
    text = open(unit).read()
    # Point it at the binary we just built so verify can find it.
    bindir = os.path.dirname(text.split("ExecStart=")[1].split()[0])
    local = tmp_path / "llama-pool.service"
    local.write_text(text.replace(bindir + "/llama-pool", LLAMA_POOL))
    r = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr
    for key in ("Type=notify", "KillMode=mixed", "ExecReload=", "RuntimeDirectory=llama-pool",
                "User=llama-pool", "NoNewPrivileges=yes", "WatchdogSec="):
        assert key in text


def test_upgrade_notifies_reloading_then_ready_from_the_main_pid(pool, notify_socket):
    """systemd takes notifications from MAINPID only (NotifyAccess=main):
    the new image's READY=1 must come from the same pid."""
    path, sock = notify_socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    pool.config({"a": {}})
    pool.start(env={"NOTIFY_SOCKET": path})
    msgs = []

    def recv_all():
        try:
            while True:
                data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
                pid = None
                for level, kind, cdata in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                        pid = struct.unpack("iII", cdata[:12])[0]
                msgs.append((pid, data.decode()))
        except (socket.timeout, BlockingIOError):
            pass
        return msgs

    wait_for(lambda: any("READY=1" in m for _, m in recv_all()), what="READY=1")
    msgs.clear()
    pool.cli("upgrade", check=0)
    wait_for(lambda: any("READY=1" in m for _, m in recv_all()), what="READY=1 after the upgrade")
    assert "RELOADING=1" in msgs[0][1], msgs
    assert all(pid == pool.proc.pid for pid, _ in msgs), msgs
