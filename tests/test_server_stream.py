"""Chat response assembly on crafted completions (a random-weight model never writes a sensible tool call): the real
tokenizer, parser and ChoiceState, fed token ids one at a time as the engine would, against whole-text expectations."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kimi.server.serving_chat import ChatPlan, ChoiceState
from kimi.server.stream import StopFilter
from kimi.tokenizer.tokenizer import Tokenizer
from tests.test_server import TOOLS

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@dataclass
class Out:  # the fields of kimi.engine.engine.CompletionOutput that ChoiceState reads
    token_ids: list
    finish_reason: str | None
    logprobs: list | None = None
    text: str | None = None


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from kimi.demo import ensure_demo_model

    return Tokenizer.from_pretrained(ensure_demo_model(tmp_path_factory.mktemp("tok") / "demo"))


def plan(choice="auto", parallel=True, stops=()):
    return ChatPlan([1], [], 1, 100, False, SCHEMAS, choice, parallel, tuple(stops), False, False, False)


def run(tok, text, p, finish="stop", chunk=1):
    """Feed `text` (control tokens spelt out) token by token; -> (state, streamed deltas)."""
    ids = tok.encode(text, allow_special=True)
    st, deltas = ChoiceState(0, p, tok), []
    for k in range(chunk, len(ids) + chunk, chunk):
        done = k >= len(ids)
        d, _ = st.update(Out(ids[:k], finish if done else None))
        deltas += d
    return st, deltas


def merged(deltas):
    content, reasoning, calls, invalid = "", "", {}, []
    for d in deltas:
        content += d.get("content", "")
        reasoning += d.get("reasoning_content", "")
        for tc in d.get("tool_calls", ()):
            c = calls.setdefault(tc["index"], {"id": tc.get("id"), "name": tc["function"].get("name"), "arguments": ""})
            c["arguments"] += tc["function"].get("arguments", "")
        invalid += d.get("invalid_tool_calls", [])
    return content, reasoning, list(calls.values()), invalid


CALL = "<|tool_call_begin|>functions.{}:{}<|tool_call_argument_begin|>{}<|tool_call_end|>"


@pytest.mark.parametrize("chunk", [1, 3])
def test_parallel_calls_with_reasoning(tok, chunk):
    text = ("<think>let me look</think>Checking."
            "<|tool_calls_section_begin|>" + CALL.format("get_weather", 0, '{"city": "Paris", "days": 2}')
            + CALL.format("add", 1, '{"a": 3}') + "<|tool_calls_section_end|><|im_end|>")
    st, deltas = run(tok, text, plan(), chunk=chunk)
    msg = st.message()
    assert msg["reasoning_content"] == "let me look" and msg["content"] == "Checking."
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == [
        ("functions.get_weather:0", "get_weather", '{"city": "Paris", "days": 2}'),
        ("functions.add:1", "add", '{"a": 3}')]
    assert st.finish_reason == "tool_calls" and "invalid_tool_calls" not in msg
    content, reasoning, calls, invalid = merged(deltas)
    assert (content, reasoning) == (msg["content"], msg["reasoning_content"])
    assert [(c["id"], c["name"], c["arguments"]) for c in calls] == \
        [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]
    first = [d for d in deltas if "tool_calls" in d][0]["tool_calls"][0]
    assert first["id"] == "functions.get_weather:0" and first["function"] == {"name": "get_weather", "arguments": ""}


@pytest.mark.parametrize("args, reason", [
    ('{"city": "Paris"', "not valid JSON"),
    ('{"city": "Paris", "days": 99}', "days"),
    ('{"city": "Paris", "days": 1, "extra": true}', "extra"),
    ('[1, 2]', "JSON object"),
])
def test_invalid_arguments_are_reported_not_passed_on(tok, args, reason):
    text = "<|tool_calls_section_begin|>" + CALL.format("get_weather", 0, args) + "<|tool_calls_section_end|>"
    st, deltas = run(tok, text, plan())
    msg = st.message()
    assert "tool_calls" not in msg and st.finish_reason == "stop"
    (bad,) = msg["invalid_tool_calls"]
    assert bad["name"] == "get_weather" and bad["arguments"] == args and reason in bad["error"]
    assert merged(deltas)[3] == msg["invalid_tool_calls"]


def test_unknown_function_truncated_call_and_tool_choice_none(tok):
    st, _ = run(tok, "<|tool_calls_section_begin|>" + CALL.format("rm_rf", 0, "{}"), plan())
    assert "unknown function 'rm_rf'" in st.message()["invalid_tool_calls"][0]["error"]
    st, _ = run(tok, '<|tool_calls_section_begin|><|tool_call_begin|>functions.add:0<|tool_call_argument_begin|>{"a":',
                plan(), finish="length")
    assert st.finish_reason == "length" and "not valid JSON" in st.message()["invalid_tool_calls"][0]["error"]
    st, _ = run(tok, "<|tool_calls_section_begin|>" + CALL.format("add", 0, '{"a": 1}'), plan("none"))
    assert "tool_choice is 'none'" in st.message()["invalid_tool_calls"][0]["error"]


def test_parallel_false_keeps_the_first_call(tok):
    text = ("<|tool_calls_section_begin|>" + CALL.format("add", 0, '{"a": 1}') + CALL.format("add", 1, '{"a": 2}')
            + "<|tool_calls_section_end|>")
    msg = run(tok, text, plan(parallel=False))[0].message()
    assert [c["function"]["arguments"] for c in msg["tool_calls"]] == ['{"a": 1}']
    assert "parallel_tool_calls is false" in msg["invalid_tool_calls"][0]["error"]


@pytest.mark.parametrize("choice, want", [("auto", "tool_calls"), ("required", "tool_calls"), ("named", "stop")])
def test_finish_reason_after_a_call_follows_openai(tok, choice, want):
    # OpenAI: "tool_calls" when the model called under auto / required, "stop" when a named function was forced
    text = "<|tool_calls_section_begin|>" + CALL.format("add", 0, '{"a": 1}') + "<|tool_calls_section_end|><|im_end|>"
    st, _ = run(tok, text, plan(choice))
    assert st.message()["tool_calls"][0]["function"]["name"] == "add"
    assert st.finish_reason == want
    assert run(tok, "no call<|im_end|>", plan(choice))[0].finish_reason == "stop"
    assert run(tok, text, plan(choice), finish="length")[0].finish_reason == "length"


def test_non_canonical_call_id_is_rewritten(tok):
    bare = "<|tool_call_begin|>add<|tool_call_argument_begin|>{\"a\": 1}<|tool_call_end|>"
    msg = run(tok, "<|tool_calls_section_begin|>" + bare, plan())[0].message()
    assert msg["tool_calls"][0]["id"] == "functions.add:0"


def test_stop_filter_matches_a_whole_text_cut():
    import random

    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        stops = tuple({"".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))})
        f, out, pos = StopFilter(stops), [], 0
        while pos < len(text):
            k = rng.randint(1, 5)
            out += f.push(rng.choice(["content", "reasoning_content"]), text[pos:pos + k])
            pos += k
        out += f.flush()
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        assert "".join(t for _, t in out) == (text[:min(hits)] if hits else text), (text, stops)
