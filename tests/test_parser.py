"""Completion parsing: the reference `parse` on the cases seen in the field (k2.md §6.4, §9), and the
streaming parser against it on generated completions split at random points, as text, bytes and ids."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi.tokenizer.bpe import train_tokenizer
from kimi.tokenizer.chat import render
from kimi.tokenizer.parser import MARKERS, ParsedCompletion, StreamParser, ToolCall, call_name, parse

SHAKESPEARE = Path(__file__).parents[2] / "shared/data/tinyshakespeare.txt"
SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
_CACHE = {}


def tokenizer():
    if "tok" not in _CACHE:
        d = tempfile.mkdtemp()
        corpus = Path(d) / "corpus.txt"
        text = SHAKESPEARE.read_text()[:100_000] if SHAKESPEARE.exists() else "To be, or not to be. " * 2000
        corpus.write_text(text + '{"city": "Paris"} functions.get_weather:0 <think> </think>\n' * 100)
        _CACHE["tok"] = train_tokenizer([str(corpus)], 768, d)
    return _CACHE["tok"]


def call(index, call_id, name, arguments, error=None):
    return ToolCall(index, call_id, name, arguments, error is None, error)


@pytest.mark.parametrize("text, expected", [
    ("Hello there.", ParsedCompletion("", "Hello there.", [])),
    ("<think>plan</think>Answer", ParsedCompletion("plan", "Answer", [])),
    ("<think>cut off mid-thou", ParsedCompletion("cut off mid-thou", "", [])),
    ("a <think>not reasoning</think> b", ParsedCompletion("", "a not reasoning b", [])),
    ("Let me check.\n" + SB + CB + "functions.get_weather:0" + AB + '{"city": "Paris"}' + CE + SE,
     ParsedCompletion("", "Let me check.\n", [call(0, "functions.get_weather:0", "get_weather", '{"city": "Paris"}')])),
    # K2-Thinking omitting </think>: the tool section ends the reasoning
    ("<think>need weather" + SB + CB + "functions.get_weather:0" + AB + "{}" + CE + SE,
     ParsedCompletion("need weather", "", [call(0, "functions.get_weather:0", "get_weather", "{}")])),
    # hyphens and dots in names, no `functions.` prefix, whitespace around id and arguments
    (SB + CB + " functions.get-weather.v2:3 " + AB + ' {"a": 1}\n ' + CE + CB + "search:1" + AB + "{}" + CE + SE,
     ParsedCompletion("", "", [call(0, "functions.get-weather.v2:3", "get-weather.v2", '{"a": 1}'),
                               call(1, "search:1", "search", "{}")])),
    # singular section markers
    ("<|tool_call_section_begin|>" + CB + "functions.f:0" + AB + "{}" + CE + "<|tool_call_section_end|>done",
     ParsedCompletion("", "done", [call(0, "functions.f:0", "f", "{}")])),
    # back-to-back calls with a missing <|tool_call_end|>: the next call begin closes the first
    (SB + CB + "functions.a:0" + AB + '{"x": 1}' + CB + "functions.b:1" + AB + '{"y": 2}' + CE + SE,
     ParsedCompletion("", "", [call(0, "functions.a:0", "a", '{"x": 1}'), call(1, "functions.b:1", "b", '{"y": 2}')])),
    # invalid arguments are reported per call, never dropped; a double-encoded string is not an object
    (SB + CB + "functions.a:0" + AB + "{bad" + CE + CB + "functions.b:1" + AB + '"{\\"todos\\": []}"' + CE
     + CB + "functions.c:2" + AB + '{"ok": true}' + CE + SE,
     ParsedCompletion("", "", [
         call(0, "functions.a:0", "a", "{bad", "arguments of a are not valid JSON: Expecting property name enclosed in "
                                               "double quotes: line 1 column 2 (char 1)"),
         call(1, "functions.b:1", "b", '"{\\"todos\\": []}"', "arguments of b must be a JSON object, got str"),
         call(2, "functions.c:2", "c", '{"ok": true}')])),
    # text after the section, junk between calls, a stop token, a truncated final call
    ("pre" + SB + "junk" + CB + "functions.a:0" + AB + "{}" + CE + "junk" + SE + " post<|im_end|>" + SB + CB
     + "functions.b:1" + AB + '{"x": [1, 2',
     ParsedCompletion("", "pre post", [call(0, "functions.a:0", "a", "{}"), call(
         1, "functions.b:1", "b", '{"x": [1, 2', "arguments of b are not valid JSON: Expecting ',' delimiter: "
                                                 "line 1 column 12 (char 11)")])),
    # a call without a section, and a call without arguments
    (CB + "functions.f:0" + AB + "{}" + CE + CB + "functions.g:1" + CE,
     ParsedCompletion("", "", [call(0, "functions.f:0", "f", "{}"),
                               call(1, "functions.g:1", "g", "", "arguments of g are not valid JSON: Expecting value: "
                                                                 "line 1 column 1 (char 0)")])),
    (SB + CB + AB + "{}" + CE + SE, ParsedCompletion("", "", [call(0, "", "", "{}", "tool call 0 has no function name "
                                                                                  "(id '')")])),
])
def test_parse_examples(text, expected):
    assert parse(text) == expected
    stream = StreamParser()
    for ch in text:
        stream.push(ch)
    stream.finish()
    assert stream.result == expected


def test_starts_in_reasoning_and_names():
    assert parse("thinking</think>answer", starts_in_reasoning=True) == ParsedCompletion("thinking", "answer", [])
    assert parse("<think>t</think>a", starts_in_reasoning=True) == ParsedCompletion("t", "a", [])
    assert [call_name(i) for i in ["functions.web.search:12", "get_weather:0", "functions.x", "plain", "a:b:3"]] == [
        "web.search", "get_weather", "x", "plain", "a:b"]
    message = parse("<think>r</think>c" + SB + CB + "functions.f:0" + AB + '{"a": 1}' + CE + SE).as_message()
    assert message == {"role": "assistant", "content": "c", "reasoning_content": "r", "tool_calls": [
        {"id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}


def test_parse_needs_tokenizer_for_ids():
    with pytest.raises(ValueError, match="need a tokenizer"):
        parse([1, 2, 3])
    with pytest.raises(ValueError, match="without a tokenizer"):
        StreamParser().push(5)
    with pytest.raises(ValueError, match="expects text, bytes or a list"):
        parse(None)
    with pytest.raises(ValueError, match="push expects"):
        StreamParser().push(1.5)


# ---- streaming == reference ------------------------------------------------------------------------------

def collect(deltas):
    """Concatenate OpenAI-style deltas; check each call is announced once, before its arguments."""
    reasoning, content, calls = "", "", {}
    for delta in deltas:
        assert len(delta) == 1
        if "reasoning_content" in delta:
            reasoning += delta["reasoning_content"]
        elif "content" in delta:
            content += delta["content"]
        else:
            for item in delta["tool_calls"]:
                index = item["index"]
                if "id" in item:
                    assert index not in calls and index == len(calls) and item["type"] == "function"
                    calls[index] = [item["id"], item["function"]["name"], item["function"]["arguments"]]
                else:
                    assert index in calls
                    calls[index][2] += item["function"]["arguments"]
    return reasoning, content, [tuple(calls[i]) for i in range(len(calls))]


def summary(parsed):
    return parsed.reasoning, parsed.content, [(c.id, c.name, c.arguments) for c in parsed.tool_calls]


def stream(pieces, tokenizer=None, starts_in_reasoning=False):
    parser = StreamParser(tokenizer, starts_in_reasoning)
    deltas = []
    for piece in pieces:
        deltas += parser.push(piece)
    deltas += parser.finish()
    return deltas, parser.result


def split_at(seq, cuts):
    cuts = sorted({c % (len(seq) + 1) for c in cuts})
    bounds = [0, *cuts, len(seq)]
    return [seq[a:b] for a, b in zip(bounds, bounds[1:])]


safe_text = st.text(st.characters(blacklist_characters="<|>", blacklist_categories=("Cs",)), max_size=12)
fn_names = st.text(st.sampled_from(list("abc_-.:9é天")), min_size=1, max_size=8)
ws = st.sampled_from(["", " ", "\n", " \n "])


@st.composite
def completions(draw):
    """Completions shaped like K2's output, with the deviations seen in the field."""
    out = ""
    if draw(st.booleans()):
        out += "<think>" + draw(safe_text)
        if draw(st.integers(0, 3)):
            out += "</think>"
    out += draw(safe_text)
    for _ in range(draw(st.integers(0, 2))):
        out += draw(st.sampled_from([SB, "<|tool_call_section_begin|>", ""])) + draw(ws)
        for j in range(draw(st.integers(0, 3))):
            call_id = draw(st.sampled_from(["functions.{}:{}", "{}:{}", "functions.{}"])).format(draw(fn_names), j)
            args = draw(st.sampled_from([json.dumps({"k": draw(safe_text), "n": [1, {"x": None}]}, ensure_ascii=False),
                                         "{}", "{bad", '"str"', '{"a": 1', ""]))
            out += CB + draw(ws) + call_id + draw(ws) + AB + draw(ws) + args + draw(ws)
            out += draw(st.sampled_from([CE, CE, ""])) + draw(ws)
        out += draw(st.sampled_from([SE, "<|tool_call_section_end|>", ""])) + draw(safe_text)
    if draw(st.booleans()):
        out += "<|im_end|>"
    return out


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(completions(), st.lists(st.integers(0, 10_000), max_size=12), st.booleans())
def test_stream_text_equals_parse(text, cuts, starts_in_reasoning):
    expected = parse(text, starts_in_reasoning=starts_in_reasoning)
    deltas, result = stream(split_at(text, cuts), starts_in_reasoning=starts_in_reasoning)
    assert result == expected
    assert collect(deltas) == summary(expected)
    # no delta carries any part of a marker (the generated free text has no '<', '|' or '>')
    for delta in deltas:
        for piece in [delta.get("reasoning_content", ""), delta.get("content", "")]:
            assert not set(piece) & set("<|>")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(completions(), st.lists(st.integers(0, 10_000), max_size=12))
def test_stream_bytes_and_ids_equal_parse(text, cuts):
    tok = tokenizer()
    data = text.encode()
    deltas, result = stream(split_at(data, cuts))
    assert result == parse(data) == parse(text)
    assert collect(deltas) == summary(result)
    # the model emits markers as control ids; other special names in free text (e.g. "[EOS]") stay text
    ids = tok.encode(text, allow_special=set(MARKERS) & set(tok.special_tokens))
    deltas, result = stream(ids, tok)  # one id at a time, as sampled
    assert result == parse(ids, tok) == parse(text)
    assert collect(deltas) == summary(result)
    deltas, result = stream(split_at(ids, cuts), tok)  # several ids per step (speculative decoding)
    assert collect(deltas) == summary(result) == summary(parse(text))


noise = st.lists(st.sampled_from(MARKERS) | st.text(max_size=6) | st.sampled_from(["<", "<|", "<|tool_", "</th", " "]),
                 max_size=25).map("".join)


@settings(max_examples=250, deadline=None)
@given(noise, st.lists(st.integers(0, 10_000), max_size=10), st.booleans())
def test_arbitrary_text_never_raises_and_streams_equal(text, cuts, starts_in_reasoning):
    expected = parse(text, starts_in_reasoning=starts_in_reasoning)
    deltas, result = stream(split_at(text, cuts), starts_in_reasoning=starts_in_reasoning)
    assert result == expected and collect(deltas) == summary(expected)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 10_000), max_size=10))
def test_arbitrary_bytes_never_raise(data, cuts):
    deltas, result = stream(split_at(data, cuts))
    assert result == parse(data) and collect(deltas) == summary(result)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_arbitrary_token_ids_never_raise(data):
    tok = tokenizer()
    specials = sorted(tok.id_to_special)
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1) | st.sampled_from(specials), max_size=60))
    deltas, result = stream(ids, tok)
    assert result == parse(ids, tok) and collect(deltas) == summary(result)


# ---- what the renderer writes, the parser reads back -------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(safe_text, safe_text, st.lists(st.tuples(fn_names, st.dictionaries(safe_text, safe_text, max_size=3)),
                                      min_size=1, max_size=3))
def test_rendered_assistant_turn_parses_back(reasoning, content, calls):
    tool_calls = [{"id": f"functions.{name}:{i}", "type": "function",
                   "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                  for i, (name, args) in enumerate(calls)]
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "reasoning_content": reasoning, "content": content, "tool_calls": tool_calls}]
    prompt = render(messages, add_generation_prompt=False)
    completion = prompt[prompt.rindex("<|im_assistant|>assistant<|im_middle|>") + 38:]
    parsed = parse(completion)
    assert (parsed.reasoning, parsed.content) == (reasoning, content)
    assert [c.as_openai() for c in parsed.tool_calls] == tool_calls and all(c.valid for c in parsed.tool_calls)
