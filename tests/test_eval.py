"""`kimi eval toolverse`: the metrics on scripted backends (a perfect one, a silent one, a corrupting one), the
grammar check on raw completions, and bad input. The engine backend itself is exercised by test_builtin.py."""

import json

import pytest

from kimi.data.synth import episode
from kimi.data.tools import dump
from kimi.eval import toolverse as E


class Oracle:
    """Answers every request with the gold assistant turn (optionally corrupted by `edit`)."""

    name = "oracle"

    def __init__(self, episodes, edit=None):
        self.by_user = {(dump(ep.tools), next(m["content"] for m in ep.messages if m["role"] == "user")): ep
                        for ep in episodes}
        self.edit = edit

    def complete(self, requests):
        out = []
        for messages, tools in requests:
            ep = self.by_user[(dump(tools), next(m["content"] for m in messages if m["role"] == "user"))]
            k = sum(m["role"] == "assistant" for m in messages)
            gold = [m for m in ep.messages if m["role"] == "assistant"][k]
            calls = [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in gold.get("tool_calls") or []]
            c = E.Completion(gold.get("content") or "", calls, True)
            out.append(self.edit(c) if self.edit else c)
        return out


class Silent:
    name = "silent"

    def complete(self, requests):
        return [E.Completion("I am not sure.", [], True) for _ in requests]


def _episodes(split="iid", n=40):
    return [episode(split, i) for i in range(n)]


def test_oracle_scores_perfectly():
    eps = _episodes()
    tf, cl = E.teacher_forced(Oracle(eps), eps), E.closed_loop(Oracle(eps), eps)
    m = E.summarize(sum(tf.values(), E.Counter()), sum(cl.values(), E.Counter()))
    for key in ("success", "parse", "json", "schema", "tool", "args", "id", "call_acc", "call_precision",
                "call_recall", "answer_em", "slot", "cl_parse", "cl_json", "cl_schema", "calls_over_gold"):
        assert m[key] == 1.0, (key, m)
    assert m["episodes"] == 40


def test_silent_model_fails_every_call_episode():
    eps = _episodes()
    res = E.evaluate(Silent(), ["iid"], 40)
    fams = res["iid"]["families"]
    assert res["iid"]["all"]["success"] < 0.2
    for fam, m in fams.items():
        if fam != "no_call":
            assert m["success"] == 0.0, fam
    assert res["iid"]["all"]["call_recall"] == 0.0 and res["iid"]["all"]["call_precision"] is None


def test_wrong_arguments_are_caught():
    def bump(c):
        calls = []
        for i, n, a in c.calls:
            args = json.loads(a)
            k = next(iter(args))
            args[k] = args[k] + "x" if isinstance(args[k], str) else args[k] + 1
            calls.append((i, n, dump(args)))
        return E.Completion(c.content, calls, True)

    eps = _episodes()
    tf = sum(E.teacher_forced(Oracle(eps, bump), eps).values(), E.Counter())
    m = E.summarize(tf, None)
    assert m["tool"] == 1.0 and m["args"] == 0.0 and m["id"] == 1.0
    cl = sum(E.closed_loop(Oracle(eps, bump), eps).values(), E.Counter())
    assert cl["success"] <= sum(ep.family == "no_call" for ep in eps)


def test_grammar_check():
    ok = "<think></think>Sure.<|tool_calls_section_begin|><|tool_call_begin|>functions.calc:0" \
         "<|tool_call_argument_begin|>{\"expr\":\"1 + 2\"}<|tool_call_end|><|tool_calls_section_end|>"
    assert E._GRAMMAR.fullmatch(ok)
    assert E._GRAMMAR.fullmatch("<think></think>Hello!")
    assert not E._GRAMMAR.fullmatch(ok.replace("<|tool_call_end|>", ""))
    assert not E._GRAMMAR.fullmatch("<|tool_calls_section_begin|><|tool_calls_section_end|>")


def test_bad_input():
    with pytest.raises(ValueError, match="unknown evaluation split"):
        E.evaluate(Silent(), ["train"], 5)
    with pytest.raises(ValueError, match="mode"):
        E.evaluate(Silent(), ["iid"], 5, mode="open")
    with pytest.raises(ValueError, match=">= 1"):
        E.evaluate(Silent(), ["iid"], 0)


def test_table_and_json_line():
    res = E.evaluate(Silent(), ["iid", "relevance"], 10)
    text = E.table(res)
    assert "iid" in text and "relevance" in text and "no_call" in text
    json.dumps(res)


def test_invalid_arguments_end_the_episode_without_crashing():
    def truncate(c):
        return E.Completion(c.content, [(i, n, a[:-2]) for i, n, a in c.calls], True)

    eps = _episodes()
    cl = sum(E.closed_loop(Oracle(eps, truncate), eps).values(), E.Counter())
    assert cl["episodes"] == len(eps)
    assert cl["success"] == sum(ep.family == "no_call" for ep in eps)
    assert cl["json"] == 0 and cl["calls"] > 0
