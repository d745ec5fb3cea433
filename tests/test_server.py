"""The server end to end: the official `openai` client against a live `kimi serve` on 127.0.0.1 (demo model, random
weights, float32 on CPU). What a random model cannot do by itself (meaningful tool calls) is covered with crafted
completions in test_server_stream.py and with constrained decoding in the structured tests below."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.test_server_helpers import demo_engine, live_server

USER = [{"role": "user", "content": "Write a function that adds two numbers."}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}},
         {"type": "function", "function": {
             "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
                                           "required": ["a"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = demo_engine(tmp_path_factory.mktemp("serve"))
    with live_server(engine) as (url, state):
        yield url, state
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _visible(message) -> str:
    return (getattr(message, "reasoning_content", None) or "") + (message.content or "")


def _collect(stream):
    """A chat stream -> (chunks, per-choice dict of content / reasoning / finish)."""
    chunks, out = list(stream), {}
    for ch in chunks:
        for c in ch.choices:
            o = out.setdefault(c.index, {"content": "", "reasoning": "", "finish": None, "roles": [], "logprobs": []})
            d = c.delta
            o["content"] += d.content or ""
            o["reasoning"] += getattr(d, "reasoning_content", None) or ""
            if d.role:
                o["roles"].append(d.role)
            if c.finish_reason:
                o["finish"] = c.finish_reason
            if c.logprobs and c.logprobs.content:
                o["logprobs"] += c.logprobs.content
    return chunks, out


def test_plain_chat_and_usage(client, server):
    r = client.chat.completions.create(model="demo", messages=USER, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    c = r.choices[0]
    assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
    count = httpx.post(server[0] + "/tokenize", json={"messages": USER}).json()["count"]
    assert r.usage.prompt_tokens == count
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]


def test_stream_equals_whole_for_a_seed(client):
    kw = dict(model="demo", messages=USER, max_tokens=12, temperature=1.0, seed=7, n=2)
    whole = client.chat.completions.create(**kw)
    chunks, out = _collect(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len(whole.choices) == 2 and sorted(out) == [0, 1]
    for c in whole.choices:
        o = out[c.index]
        assert o["roles"] == ["assistant"]
        assert o["content"] == (c.message.content or "")
        assert o["reasoning"] == (getattr(c.message, "reasoning_content", None) or "")
        assert o["finish"] == c.finish_reason
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in whole.choices]


def test_logprobs(client):
    r = client.chat.completions.create(model="demo", messages=USER, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens
    for it in items:
        assert len(it.top_logprobs) == 3
        tops = [t.logprob for t in it.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert it.token == it.top_logprobs[0].token and it.logprob == pytest.approx(tops[0])  # greedy = argmax
        assert bytes(it.bytes).decode("utf-8", "replace") == it.token
    _, out = _collect(client.chat.completions.create(model="demo", messages=USER, max_tokens=6, temperature=0,
                                                     logprobs=True, top_logprobs=3, stream=True))
    assert [x.token for x in out[0]["logprobs"]] == [x.token for x in items]


def test_stop_string_cuts_visible_text(client):
    base = client.chat.completions.create(model="demo", messages=USER, max_tokens=40, temperature=0)
    text = _visible(base.choices[0].message)
    assert len(text) >= 12, "the demo model should write some text greedily"
    stop = text[len(text) // 2: len(text) // 2 + 3]
    r = client.chat.completions.create(model="demo", messages=USER, max_tokens=40, temperature=0, stop=[stop])
    assert _visible(r.choices[0].message) == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    _, out = _collect(client.chat.completions.create(model="demo", messages=USER, max_tokens=40, temperature=0,
                                                     stop=stop, stream=True))
    assert out[0]["reasoning"] + out[0]["content"] == text[:text.index(stop)]


def test_partial_assistant_prefix(client, server):
    prefix = "def add(a, b):"
    msgs = USER + [{"role": "assistant", "content": prefix, "partial": True}]
    r = client.chat.completions.create(model="demo", messages=msgs, max_tokens=4, temperature=0)
    base = httpx.post(server[0] + "/tokenize", json={"messages": USER, "add_generation_prompt": False}).json()
    pre = httpx.post(server[0] + "/tokenize", json={"prompt": "<|im_assistant|>assistant<|im_middle|>" + prefix})
    assert r.usage.prompt_tokens == base["count"] + pre.json()["count"]
    assert not (r.choices[0].message.content or "").startswith(prefix)


def test_multi_turn_tool_history_is_canonicalised(client, server):
    msgs = [{"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_abc", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"}]
    r = client.chat.completions.create(model="demo", messages=msgs, tools=TOOLS, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    ids = httpx.post(server[0] + "/tokenize", json={"messages": msgs}).json()["tokens"]
    text = httpx.post(server[0] + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "functions.get_weather:0" in text and "## Return of functions.get_weather:0\nsunny" in text
    assert "call_abc" not in text


def test_errors_have_openai_shape(client, server):
    url = server[0]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=USER)
    assert e.value.body["param"] == "model" and e.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.body["param"] == "messages.0.role" and "'user'" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=USER, max_tokens=100_000)
    assert "512" in e.value.body["message"] and "100000" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=USER, tool_choice="required")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=USER, temperature=-1)
    r = httpx.post(url + "/v1/chat/completions", content=b'{"messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "x": "y" * (2 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "some_future_field": 1})
    assert r.status_code == 200  # unknown fields are accepted and ignored
    r = httpx.post(url + "/detokenize", json={"tokens": [10 ** 9]})
    assert r.status_code == 400


def test_completions(client):
    kw = dict(model="demo", prompt="def add(a, b):", max_tokens=6, temperature=0)
    r = client.completions.create(**kw, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text.startswith("def add(a, b):")
    assert len(c.logprobs.tokens) == r.usage.completion_tokens == len(c.logprobs.token_logprobs)
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    plain = client.completions.create(**kw)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(**kw, stream=True) if ch.choices)
    assert streamed == plain.choices[0].text == c.text[len("def add(a, b):"):]
    ids = client.completions.create(model="demo", prompt=[5, 6, 7], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_completion_stream_sends_one_event_per_token(server):
    # An event per token even when its text is held back (here: byte tokens of an unfinished UTF-8 character), so
    # a client sees the token cadence, as vLLM streams it; the text still adds up to the whole response's.
    body = {"model": "demo", "prompt": [5, 6, 7], "max_tokens": 48, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    whole = httpx.post(server[0] + "/v1/completions", json=body, timeout=120).json()
    events = []
    with httpx.stream("POST", server[0] + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events += [c["text"] for c in json.loads(line[6:])["choices"]]
    assert len(events) == whole["usage"]["completion_tokens"] == 48
    assert "".join(events) == whole["choices"][0]["text"]
    assert "" in events  # the case is exercised: some token's text was held back


def test_health_metrics_and_loading(server, tmp_path):
    from fastapi.testclient import TestClient

    from kimi.server.app import ServerState, build_app

    url, state = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    for name in ("kimi:requests_total", "kimi:time_to_first_token_seconds_bucket", "kimi:inter_token_latency_seconds",
                 "kimi:num_requests_running", "kimi:num_requests_waiting", "kimi:cache_blocks_used",
                 "kimi:state_slots_used", "kimi:prefix_cache_hit_rate", "kimi:generation_tokens_total"):
        assert name in text
    loading = TestClient(build_app(ServerState("demo")))
    r = loading.get("/health")
    assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
    assert loading.post("/v1/chat/completions", json={"messages": USER}).status_code == 503


def test_api_key_and_cors(server):
    from fastapi.testclient import TestClient

    from kimi.server.app import ServerState, build_app

    state = ServerState("demo", api_key="s3cret")
    state.set_engine(server[1].engine.engine)
    c = TestClient(build_app(state, cors_origins=["http://example.org"]))
    assert c.get("/health").status_code == 200
    assert c.get("/").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = c.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/metrics").status_code == 401
    r = c.options("/v1/models", headers={"Origin": "http://example.org", "Access-Control-Request-Method": "GET"})
    assert r.headers.get("access-control-allow-origin") == "http://example.org"
    plain = TestClient(build_app(server[1]))
    r = plain.options("/v1/models", headers={"Origin": "http://example.org", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers  # CORS is off by default


def test_overload_answers_503(server):
    from fastapi.testclient import TestClient

    from kimi.server.app import ServerState, build_app

    state = ServerState("demo", max_waiting=0)
    state.set_engine(server[1].engine.engine)
    c = TestClient(build_app(state))
    cap = state.engine.max_in_flight  # max_num_seqs (8) + 0 waiting
    r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, "n": cap + 1})
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable_error"
    assert c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, "n": cap}).status_code == 200
    assert state.engine.in_flight == 0


def test_disconnect_mid_stream_frees_the_request(server):
    url, state = server
    eng = state.engine.engine
    with httpx.stream("POST", url + "/v1/chat/completions",
                      json={"messages": USER, "max_tokens": 400, "stream": True, "ignore_eos": True}) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
            if got >= 3:
                break
    deadline = time.time() + 10
    while time.time() < deadline:
        s = eng.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["state_slots_used"] == 0 and s["blocks_used"] == 0:
            break
        time.sleep(0.05)
    assert s["running"] == 0 and s["state_slots_used"] == 0 and s["blocks_used"] == 0, s
    assert state.engine.in_flight == 0
    assert any(o == "abort" for (_, o) in state.metrics.requests)


def test_chat_page_with_an_api_key(server):
    # With --api-key the page itself stays public (static, no secrets; a browser cannot send a bearer header when it
    # navigates), and every API call it makes carries the key typed into its settings panel. A real headless
    # browser, skipped where none is installed (as in test_chat_page.py).
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_chat_page import _browser

    with live_server(server[1].engine.engine, api_key="s3cret") as (url, state):
        browser = _browser()
        try:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: "invalid API key" in b.find_element(By.ID, "status").text)
            assert not browser.find_elements(By.CSS_SELECTOR, "#model option")
            browser.find_element(By.ID, "api_key").send_keys("s3cret" + Keys.TAB)  # "change" reloads the models
            wait.until(lambda b: b.find_element(By.ID, "status").text == "ready")
            browser.find_element(By.ID, "max_tokens").clear()
            browser.find_element(By.ID, "max_tokens").send_keys("4")
            browser.find_element(By.ID, "input").send_keys("hello")
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: b.find_elements(By.XPATH, "//div[contains(text(),'4 completion tokens')]"))
            assert not browser.find_elements(By.CSS_SELECTOR, ".error")
            assert sum(n for (endpoint, _), n in state.metrics.requests.items() if endpoint == "chat") == 1
        finally:
            browser.quit()


def test_json_schema_output(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    import jsonschema

    r = client.chat.completions.create(model="demo", messages=USER, max_tokens=60, temperature=1.0, seed=1,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "person", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"  # the schema bounds every string and number: the grammar must end
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model="demo", messages=USER, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_constrained_tool_calls_stream_and_whole(client, choice):
    kw = dict(model="demo", messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=1.0, seed=3,
              parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw)
    c = whole.choices[0]
    # bounded argument schemas: the grammar must close the section; a forced named function ends with "stop", as
    # OpenAI's API does, "required" with "tool_calls"
    want = "stop" if isinstance(choice, dict) else "tool_calls"
    assert c.finish_reason == want, c
    assert len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.id == f"functions.{call.function.name}:{call.id.rsplit(':', 1)[1]}"
    if isinstance(choice, dict):
        assert call.function.name == "add"
    json.loads(call.function.arguments)
    calls, finish = {}, []
    for ch in client.chat.completions.create(**kw, stream=True):
        for d in ch.choices:
            finish += [d.finish_reason] if d.finish_reason else []
            for tc in d.delta.tool_calls or ():
                x = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
                x["arguments"] += tc.function.arguments or ""
    assert [(x["id"], x["name"], x["arguments"]) for x in calls.values()] == \
        [(t.id, t.function.name, t.function.arguments) for t in c.message.tool_calls or ()]
    assert finish == [want]
