"""The web page at / and /ui/, in a real browser (headless Chromium through
Selenium), against a daemon with the stand-in."""
import os
import shutil
import socket

import pytest
from conftest import NGINX, fake_only, free_port_block, nginx_start, nginx_stop, wait_for
from test_proxy import CHAT, post

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover
    webdriver = None

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


def localhost_resolves():
    try:
        socket.getaddrinfo("localhost", 80)
        return True
    except OSError:
        return False


needs_browser = pytest.mark.skipif(
    not (webdriver and CHROMIUM and CHROMEDRIVER and localhost_resolves()),
    reason="needs chromium, chromium-driver and python3-selenium, and localhost to resolve "
           "(scripts/setup installs them and adds localhost to /etc/hosts)")

KEY = "admin-secret"


@pytest.fixture
def browser(tmp_path):
    o = webdriver.ChromeOptions()
    o.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,1000", f"--user-data-dir={tmp_path}/chromium"):
        o.add_argument(a)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER) if hasattr(webdriver, "ChromeService") \
        else webdriver.chrome.service.Service(executable_path=CHROMEDRIVER)
    d = webdriver.Chrome(options=o, service=service)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def until(d, cond, what, timeout=15):
    return WebDriverWait(d, timeout, poll_frequency=0.05).until(lambda _: cond(), message=what)


def row_state(d, model):
    """The state badge of MODEL's row in the models table, or None. (The
    table is redrawn as events come: read it in one go, in the page.)"""
    return d.execute_script(
        "const tr = [...document.querySelectorAll('#models tr.model')]"
        ".find(t => t.dataset.model === arguments[0]);"
        "return tr ? tr.querySelector('.state').textContent : null;", model)


def press(d, model, op):
    """Clicks MODEL's OP button (a real click event, in the page)."""
    assert d.execute_script(
        "const tr = [...document.querySelectorAll('#models tr.model')]"
        ".find(t => t.dataset.model === arguments[0]);"
        "if (!tr) return false; tr.querySelector(`button[data-op=${arguments[1]}]`).click(); return true;",
        model, op)


def three_models(pool):
    """One ready, one starting (for a long while), one stopped."""
    pool.config({"chat": {"instances": "1-2"},
                 "coder": {"env": {"FAKE_LOAD_MS": "600000"}},
                 "embed": {}}, pool_extra=f"admin_key = {KEY}")
    pool.start()
    wait_for(lambda: pool.ready_instances("chat"), what="chat ready")
    pool.cli("start", "coder", "--no-wait", check=0)


def enter_key(d):
    until(d, lambda: d.find_element(By.ID, "keyform").is_displayed(), "the admin key form")
    d.find_element(By.ID, "key").send_keys(KEY)
    d.find_element(By.CSS_SELECTOR, "#keyform button").click()


@needs_browser
@fake_only("needs a model that takes minutes to load")
def test_the_page_shows_the_pool_live_and_its_buttons_work(pool, browser):
    d = browser
    three_models(pool)
    d.get(f"http://127.0.0.1:{pool.listen_port}/")
    enter_key(d)                            # /pool/* over TCP wants admin_key
    until(d, lambda: row_state(d, "chat") == "ready", "chat ready in the table")
    until(d, lambda: row_state(d, "coder") == "starting", "coder starting")
    assert row_state(d, "embed") == "stopped"
    assert "chat#1" in d.find_element(By.ID, "models").text
    # A request shows up in the recent requests, live (over /pool/events).
    assert post(pool.listen_port, "/v1/chat/completions", {**CHAT, "model": "chat"})[0] == 200
    until(d, lambda: "POST /v1/chat/completions" in d.find_element(By.ID, "requests").text,
          "the request in the table")
    # The log view follows the selected model.
    until(d, lambda: "ready on port" in d.find_element(By.ID, "log").text, "chat's log")
    shot = os.path.join(pool.dir, "web.png")
    d.save_screenshot(shot)
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Stop: the button calls /pool/models/chat/stop; the row follows.
    press(d, "chat", "stop")
    until(d, lambda: row_state(d, "chat") == "stopped", "chat stopped in the table")
    assert pool.model("chat")["state"] == "stopped"
    # The key lives in sessionStorage: a reload of the page needs no form.
    d.refresh()
    until(d, lambda: row_state(d, "embed") == "stopped", "the table after a reload")
    assert not d.find_element(By.ID, "keyform").is_displayed()


@needs_browser
def test_the_page_says_why_without_admin_key(pool, browser):
    pool.config({"tiny": {}})
    pool.start()
    browser.get(f"http://127.0.0.1:{pool.listen_port}/ui/")
    until(browser, lambda: "set admin_key in pool.conf" in browser.find_element(By.ID, "msg").text,
          "the reason in the page")




@needs_browser
@fake_only("needs a model that takes minutes to load")
@pytest.mark.skipif(not NGINX, reason="needs nginx (scripts/setup installs nginx-light)")
def test_the_page_works_behind_nginx_under_a_prefix(pool, browser, tmp_path):
    three_models(pool)
    port = free_port_block(1)
    # As docs/nginx.md's "The web page under a prefix".
    ng = nginx_start(tmp_path, f"""
    server {{
        listen 127.0.0.1:{port};
        location /llama/ {{
            proxy_pass http://127.0.0.1:{pool.listen_port}/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
""", port, tmp_path / "nginx-error.log")
    try:
        d = browser
        d.get(f"http://127.0.0.1:{port}/llama/")
        enter_key(d)
        until(d, lambda: row_state(d, "chat") == "ready", "chat ready, through nginx")
        assert post(pool.listen_port, "/v1/chat/completions", {**CHAT, "model": "chat"})[0] == 200
        until(d, lambda: "POST /v1/chat/completions" in d.find_element(By.ID, "requests").text,
              "events through nginx")
        d.get(f"http://127.0.0.1:{port}/llama/ui/")
        until(d, lambda: row_state(d, "coder") == "starting", "the table at /llama/ui/")
    finally:
        nginx_stop(ng)
