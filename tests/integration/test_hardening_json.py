"""Every JSON body the daemon writes is valid UTF-8 that parses, and
/metrics is valid UTF-8 in the Prometheus text format, whatever bytes came
in: request targets, query strings, bodies, a child's log lines, pool.conf.

Requests with raw non-ASCII bytes in the target go over a plain socket:
http.client refuses to send them.
"""
import http.client
import json
import os
import re
import socket
import stat

from conftest import fake_only, wait_for

FFFD = "\ufffd"


def raw_http(pool, data, tcp=True, timeout=10):
    """Send DATA (bytes, a whole request with Connection: close) and return
    (status, headers dict, body bytes)."""
    if tcp:
        s = socket.create_connection(("127.0.0.1", pool.listen_port), timeout=timeout)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(pool.sock)
    try:
        s.sendall(data)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    finally:
        s.close()
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.decode("latin-1").strip().lower()] = v.decode("latin-1").strip()
    if "content-length" in headers:
        body = body[:int(headers["content-length"])]
    return status, headers, body


def tcp_request(pool, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", pool.listen_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def json_body(body):
    """BODY must be UTF-8 and parse as JSON; returns the value."""
    text = body.decode("utf-8")          # raises on any invalid byte
    return json.loads(text)


def error_message(body):
    doc = json_body(body)
    return doc["error"]["message"]


def start_plain(pool, models=None, pool_extra=""):
    pool.config(models or {"tiny": {}}, pool_extra=pool_extra)
    pool.start()
    wait_for(lambda: tcp_request(pool, "GET", "/health")[0] == 200, what="the TCP listener")
    return pool


def test_status_for_an_invalid_utf8_model_name_is_valid_json(pool):
    start_plain(pool)
    code, body = pool.get("/pool/status?model=%ff")
    assert code == 404
    msg = error_message(body)
    assert f'model "{FFFD}" not found' in msg
    assert "tiny" in msg
    # the same name through the PM2 shim
    code, body = pool.get("/pool/server?model=%ff%fe")
    assert code == 404
    assert f'"{FFFD}{FFFD}"' in error_message(body)


def test_invalid_utf8_in_a_request_body_is_a_valid_json_error(pool):
    start_plain(pool)
    # jansson refuses ill-formed UTF-8 in JSON: a 400 whose message names
    # the byte it could not read, and must not carry it back raw
    code, body = tcp_request(pool, "POST", "/v1/chat/completions",
                             body=b'{"model":"\xff\xfe","messages":[]}',
                             headers={"Content-Type": "application/json"})
    assert code == 400
    assert error_message(body).startswith("invalid JSON")
    # control characters and quotes in an unknown name come back escaped
    name = 'no\x01such\n"model"\x7f\\'
    code, body = tcp_request(pool, "POST", "/v1/chat/completions",
                             body=json.dumps({"model": name, "messages": []}).encode(),
                             headers={"Content-Type": "application/json"})
    assert code == 404
    assert f'model "{name}" not found' in error_message(body)


def test_upstream_with_odd_bytes_in_the_model_name_is_valid_json(pool):
    start_plain(pool)
    code, body = tcp_request(pool, "GET", "/upstream/%ff%fe/x")
    assert code == 404
    assert "not found" in error_message(body)
    # raw bytes in the target, as a careless client sends them
    code, _, body = raw_http(pool, b"GET /upstream/\xff\xfe/x HTTP/1.1\r\nHost: x\r\n"
                                   b"Connection: close\r\n\r\n")
    assert code == 404
    assert f'model "{FFFD}{FFFD}" not found' in error_message(body)
    # and on the control socket, for the admin paths
    code, _, body = raw_http(pool, b"POST /pool/models/\xc3\x28/start HTTP/1.1\r\nHost: x\r\n"
                                   b"Content-Length: 0\r\nConnection: close\r\n\r\n", tcp=False)
    assert code == 404
    assert f'model "{FFFD}(" not found' in error_message(body)


LABELS = r'(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*\})?'
SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*' + LABELS + r' [-+0-9.eEInfa]+$')


def test_metrics_is_utf8_prometheus_text(pool):
    start_plain(pool, {"tiny": {"instances": "1-1"},
                       "модель": {"instances": "1-1", "aliases": "Org/Модель-7B"}})
    wait_for(lambda: len(pool.ready_instances("модель")) == 1 and len(pool.ready_instances("tiny")) == 1,
             timeout=20, what="both preloaded instances ready")
    code, body = tcp_request(pool, "GET", "/metrics")
    assert code == 200
    text = body.decode("utf-8")
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        assert SAMPLE.match(line), f"not a Prometheus sample: {line!r}"
    assert 'llama_pool_instance_state{model="модель",instance="модель#1",state="ready"} 1' in text
    # the status and model list carry the name and alias whole
    st = pool.status()
    assert [m["aliases"] for m in st["models"] if m["name"] == "модель"] == [["Org/Модель-7B"]]
    code, body = tcp_request(pool, "GET", "/v1/models")
    assert code == 200
    assert "модель" in [m["id"] for m in json_body(body)["data"]]


@fake_only("uses a stand-in that prints bytes that are not UTF-8")
def test_a_child_log_line_that_is_not_utf8_stays_in_the_json(pool):
    script = os.path.join(pool.dir, "bad-server.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\nprintf 'loading model\\nerror: cannot open \\377\\376 weights\\n' >&2\nexit 1\n")
    os.chmod(script, os.stat(script).st_mode | stat.S_IXUSR)
    start_plain(pool, {"bad": {}}, pool_extra=f"llama_server = {script}")

    # the progress stream: one JSON object a line, each valid UTF-8
    code, body = pool.request("POST", "/pool/models/bad/start?wait=1", timeout=30)
    assert code == 200
    events = [json_body(line) for line in body.splitlines() if line.strip()]
    failed = [e for e in events if e.get("event") == "failed"]
    assert failed, events
    assert f"cannot open {FFFD}{FFFD} weights" in failed[0]["error"]
    assert any(f"{FFFD}{FFFD}" in line for line in failed[0]["log"])

    # the status keeps the instance's error (json_string() used to drop it)
    code, body = pool.get("/pool/status?model=bad")
    assert code == 200
    insts = json_body(body)["models"][0]["instances"]
    assert any(f"cannot open {FFFD}{FFFD} weights" in i["last_error"] for i in insts), insts


def test_refused_reload_lists_errors_about_bytes_that_are_not_utf8(pool):
    start_plain(pool)
    with open(pool.conf, "ab") as f:
        f.write(b"[model bad\xff]\npath = m.gguf\n")
    code, body = pool.request("POST", "/pool/reload")
    assert code == 400
    doc = json_body(body)
    errors = doc["errors"]
    assert any(f'invalid model name "bad{FFFD}": it is not valid UTF-8' in e for e in errors), errors
    # the daemon kept running on the old config
    assert pool.get("/pool/status")[0] == 200


def test_check_rejects_dev_zero_and_a_fifo_quickly(pool, tmp_path):
    fifo = str(tmp_path / "fifo.conf")
    os.mkfifo(fifo)
    for path, why in (("/dev/zero", "it is a character device, not a regular file"),
                      (fifo, "it is a FIFO, not a regular file")):
        r = pool.cli("check", "-c", path, timeout=10)
        assert r.returncode != 0
        assert f"{path}: cannot read: {why}" in r.stderr
