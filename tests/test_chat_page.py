"""The chat page at / in a real headless browser (Debian's chromium via selenium) against a live server;
skipped cleanly where selenium, chromium or chromedriver is missing. Also `kimi chat --url` in a pipe against the
same server."""

from __future__ import annotations

import argparse
import io
import shutil

import pytest

from tests.test_server_helpers import demo_engine, live_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = demo_engine(tmp_path_factory.mktemp("page"))
    with live_server(engine) as (url, state):
        yield url, state
    engine.shutdown()


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    try:
        return webdriver.Chrome(service=Service(driver_path), options=opts)
    except Exception as e:  # a browser that cannot start here is an environment problem, not a page bug
        pytest.skip(f"chromium did not start: {e}")


def test_page_streams_a_reply(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, state = server
    browser = _browser()
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "status").text == "ready")
        assert [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")] == ["demo"]
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("6")
        before = dict(state.metrics.requests)
        browser.find_element(By.ID, "input").send_keys("hello there")
        browser.find_element(By.ID, "send").click()
        wait.until(EC.presence_of_element_located((By.XPATH, "//div[contains(@class,'meta') and "
                                                             "contains(text(),'completion tokens')]")))
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "hello there"
        meta = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".assistant .meta")]
        assert any(m.startswith("finish: ") for m in meta) and any("6 completion tokens" in m for m in meta)
        assert sum(state.metrics.requests.values()) == sum(before.values()) + 1
        assert not browser.find_elements(By.CSS_SELECTOR, ".error")
        # a second turn sends the history back (the server renders both user turns)
        browser.find_element(By.ID, "input").send_keys("and again")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: len(b.find_elements(By.XPATH, "//div[contains(text(),'completion tokens')]")) == 2)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    finally:
        browser.quit()


def test_chat_cli_in_a_pipe(server):
    from kimi.chat_cli import add_chat_arguments, chat_main

    p = argparse.ArgumentParser()
    add_chat_arguments(p)
    args = p.parse_args(["--url", server[0] + "/v1", "--max-tokens", "5", "--temperature", "0"])
    out = io.StringIO()
    chat_main(args, stdin=io.StringIO("hello\n\n/reset\nsecond question\n"), stdout=out)
    text = out.getvalue()
    assert "[error]" not in text and "\x1b[" not in text  # no colour in a pipe
    assert text.count("\n") >= 2  # one reply per user line
    args = p.parse_args(["--url", "http://127.0.0.1:9/v1", "--max-tokens", "5"])
    out = io.StringIO()
    chat_main(args, stdin=io.StringIO("hello\n"), stdout=out)
    assert "[error] cannot reach" in out.getvalue()
