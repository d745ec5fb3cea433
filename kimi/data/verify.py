"""The verifier: toolverse's stand-in for K2's LLM judge (../shared/reference/synthetic.md §A3, §A5).

The data are correct by construction, so any failure here is a generator bug, and `kimi data synth` stops on it.
For one episode it checks, from the messages alone and a fresh world rebuilt from the seed:
  * every declaration is a known variant of its tool (held-out variants exactly in the `renamed` split);
  * ids are `functions.{name}:{idx}` with one conversation-wide counter, and every call gets its result;
  * arguments are canonical JSON and schema-valid; re-executing every call gives the recorded result;
  * each user turn's required calls were made, no call was made where none is expected, its final answer
    contains every answer slot, and no call is repeated;
  * the final database state equals the gold state;
  * the conversation renders through the one chat renderer and every assistant turn parses back to the
    same content and calls (the renderer/parser round trip the server relies on).
"""

from __future__ import annotations

import json

from kimi.data.episode import Episode
from kimi.data.evolution import NAMES, spelling_ok
from kimi.data.schema import check_arguments
from kimi.data.tools import TOOLS, dump, execute
from kimi.tokenizer.chat import render
from kimi.tokenizer.parser import parse

MAX_CHARS = 4000  # rendered conversation; keeps CPU-tier episodes around 500-1000 tokens
_OPEN = "<|im_assistant|>assistant<|im_middle|>"


class VerificationError(ValueError):
    pass


def _fail(ep: Episode, what: str):
    raise VerificationError(f"toolverse {ep.split}#{ep.index} ({ep.family}/{ep.intent}): {what}")


def _check_declarations(ep: Episode) -> dict:
    held_out = ep.split == "renamed"
    decls = {}
    for spec in ep.tools:
        fn = spec["function"]
        b = ep.bindings.get(fn["name"])
        if b is None or fn["name"] not in NAMES[b.tool]:
            _fail(ep, f"declared tool {fn['name']!r} has no binding to a known tool")
        if (NAMES[b.tool].index(fn["name"]) == len(NAMES[b.tool]) - 1) != held_out:
            _fail(ep, f"tool name {fn['name']!r} is {'not ' if held_out else ''}a held-out variant")
        props = fn["parameters"]["properties"]
        if [b.params[p] for p in props] != [p.name for p in TOOLS[b.tool].params]:
            _fail(ep, f"{fn['name']}: parameters {list(props)} do not match {b.tool}")
        for shown, canonical in b.params.items():
            if not spelling_ok(b.tool, fn["name"], canonical, shown, held_out, ep.version != "toolverse-1"):
                _fail(ep, f"{fn['name']}: parameter {shown!r} is not a valid spelling of {canonical!r}")
        decls[fn["name"]] = fn
    if len(decls) != len(ep.tools):
        _fail(ep, "two declarations share a name")
    return decls


def _check_round_trip(ep: Episode) -> None:
    text = render(ep.messages, tools=ep.tools, add_generation_prompt=False)
    if len(text) > MAX_CHARS:
        _fail(ep, f"rendered conversation is {len(text)} characters, over {MAX_CHARS}")
    bodies = [part.split("<|im_end|>", 1)[0] for part in text.split(_OPEN)[1:]]
    assistants = [m for m in ep.messages if m["role"] == "assistant"]
    if len(bodies) != len(assistants):
        _fail(ep, f"rendered {len(bodies)} assistant turns, the conversation has {len(assistants)}")
    for body, m in zip(bodies, assistants):
        p = parse(body)
        calls = [(c.id, c.arguments) for c in p.tool_calls]
        want = [(c["id"], c["function"]["arguments"]) for c in m.get("tool_calls") or []]
        if calls != want or p.content != (m.get("content") or "") or not all(c.valid for c in p.tool_calls):
            _fail(ep, f"assistant turn does not survive render -> parse: {body[:120]!r}")


def verify(ep: Episode) -> None:
    """Raise VerificationError naming the first thing wrong with `ep`."""
    decls = _check_declarations(ep)
    world = ep.world()
    counter, pending, seen = 0, [], set()
    turn_no, made, turns = -1, [], ep.turns

    def close_turn(end):  # the turn's messages end before index `end`
        if turn_no < 0:
            return
        turn = turns[turn_no]
        if not turn.expects_call and made:
            _fail(ep, f"turn {turn_no}: calls made where none is expected")
        missing = [c for c in turn.required if c not in made]
        if missing:
            _fail(ep, f"turn {turn_no}: required calls not made: {missing}")
        last = ep.messages[end - 1] if end else None
        if last is None or last["role"] != "assistant" or last.get("tool_calls"):
            _fail(ep, f"turn {turn_no} does not end with an assistant answer")
        for slot in turn.slots:
            if slot not in last["content"]:
                _fail(ep, f"turn {turn_no}: answer {last['content']!r} lacks slot {slot!r}")

    for i, m in enumerate(ep.messages):
        role = m["role"]
        if pending and role != "tool":
            _fail(ep, f"message {i}: calls {[c[0] for c in pending]} got no result")
        if role == "user":
            close_turn(i)
            turn_no += 1
            made = []
            if turn_no >= len(turns) or turns[turn_no].user != m["content"]:
                _fail(ep, f"message {i}: user turn does not match the gold turns")
        elif role == "assistant":
            for c in m.get("tool_calls") or []:
                name, raw = c["function"]["name"], c["function"]["arguments"]
                if c["id"] != f"functions.{name}:{counter}":
                    _fail(ep, f"message {i}: id {c['id']!r}, expected functions.{name}:{counter}")
                counter += 1
                if name not in decls:
                    _fail(ep, f"message {i}: call to undeclared tool {name!r}")
                args = json.loads(raw)
                if dump(args) != raw:
                    _fail(ep, f"message {i}: arguments are not canonical JSON: {raw!r}")
                problem = check_arguments(args, decls[name]["parameters"])
                if problem:
                    _fail(ep, f"message {i}: {name}: {problem}")
                b = ep.bindings[name]
                canonical = {b.params[k]: v for k, v in args.items()}
                key = (b.tool, dump(canonical))
                if key in seen:
                    _fail(ep, f"message {i}: repeated call {key}")
                seen.add(key)
                made.append(key)
                pending.append((c["id"], name, dump(execute(world, b.tool, canonical))))
        elif role == "tool":
            if not pending:
                _fail(ep, f"message {i}: tool result without a pending call")
            call_id, name, result = pending.pop(0)
            if m["tool_call_id"] != call_id or m.get("name", name) != name:
                _fail(ep, f"message {i}: result for {m['tool_call_id']!r}, expected {call_id!r}")
            if m["content"] != result:
                _fail(ep, f"message {i}: recorded result {m['content']} but re-execution gives {result}")
    if pending:
        _fail(ep, "conversation ends with calls that got no result")
    close_turn(len(ep.messages))
    if turn_no != len(turns) - 1:
        _fail(ep, f"{len(turns)} gold turns but {turn_no + 1} user messages")
    if world.tables != ep.final_state:
        _fail(ep, "final database state differs from the gold state")
    _check_round_trip(ep)
