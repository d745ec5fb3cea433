"""Structured-output guides standalone, against the demo tokenizer: every path through the allowed tokens must end in
output that parses (kimi.tokenizer.parser) and validates (jsonschema, an independent checker). Paths are random walks
over the mask, so a mask that lets one wrong token through is found quickly; the walks also check that the mask is
never empty before the guide says it is finished."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from kimi.server.structured import GuideFactory, json_grammar, tool_call_grammar, validate_arguments
from kimi.tokenizer.parser import parse
from kimi.tokenizer.tokenizer import Tokenizer
from tests.test_server import TOOLS

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    from kimi.demo import ensure_demo_model

    tok = Tokenizer.from_pretrained(ensure_demo_model(tmp_path_factory.mktemp("tok") / "demo"))
    return GuideFactory(tok, tok.vocab_size + 64)  # a model vocabulary padded past the tokenizer's


def walk(guide, tok, seed, limit=400, eos_weight=0.0):
    """Sample uniformly among allowed tokens until the guide finishes or <|im_end|> is drawn."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    while not guide.is_finished() and len(ids) < limit:
        mask = guide.allowed_tokens()
        assert mask.dtype == torch.bool and mask.shape == (guide.vocab_size,)
        assert not mask[tok.vocab_size:].any(), "padding rows past the tokenizer must stay masked"
        allowed = mask.nonzero().flatten()
        assert len(allowed) > 0, "an unfinished guide must allow something"
        if eos_weight and mask[tok.im_end_id] and torch.rand(1, generator=g).item() < eos_weight:
            t = tok.im_end_id
        else:
            t = int(allowed[torch.randint(len(allowed), (1,), generator=g)])
        guide.accept(t)
        ids.append(t)
        if t == tok.im_end_id:
            break
    assert guide.error is None
    return ids


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_paths_validate(factory, seed):
    tok = factory.tokenizer
    guide = factory.json(PERSON)
    ids = walk(guide, tok, seed, eos_weight=0.5)
    assert ids[-1] == tok.im_end_id or guide.is_finished()
    text = tok.decode([t for t in ids if t != tok.im_end_id])
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_and_mask_is_tight(factory):
    tok = factory.tokenizer
    guide = factory.json()
    first = guide.allowed_tokens()
    assert 0 < first.sum() < tok.vocab_size / 4  # only tokens that can start an object
    assert all(tok.decode([int(t)]).lstrip().startswith("{") for t in first.nonzero().flatten())
    finished = 0
    for seed in range(8):  # free-form strings may run past the walk's limit; every walk that ends must parse
        guide = factory.json()
        ids = walk(guide, tok, seed, eos_weight=0.9)
        if ids[-1] == tok.im_end_id or guide.is_finished():
            finished += 1
            assert isinstance(json.loads(tok.decode([t for t in ids if t != tok.im_end_id])), dict)
    assert finished >= 2


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name, parallel", [(None, True), (None, False), ("add", True)])
def test_tool_call_paths_parse_and_validate(factory, seed, name, parallel):
    tok = factory.tokenizer
    guide = factory.tool_calls(TOOLS, name, parallel)
    first = guide.allowed_tokens().nonzero().flatten().tolist()
    assert first == [tok.special_id("<|tool_calls_section_begin|>")]  # the marker is one special token
    ids = walk(guide, tok, seed)
    assert guide.is_finished(), "the walk should close the section well within the limit"
    assert ids[-1] == tok.special_id("<|tool_calls_section_end|>")
    parsed = parse(ids, tok)
    assert parsed.content == "" and parsed.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in parsed.tool_calls:
        assert call.valid and call.id.startswith(f"functions.{call.name}:")
        assert validate_arguments(call.arguments, schemas[call.name]) is None
    if name is not None:
        assert [c.name for c in parsed.tool_calls] == [name]
    if not parallel:
        assert len(parsed.tool_calls) == 1


def test_bad_requests_raise_value_error(factory):
    with pytest.raises(ValueError, match="not in tools"):
        tool_call_grammar(TOOLS, "nope")
    with pytest.raises(ValueError, match="non-empty"):
        tool_call_grammar([])
    with pytest.raises(ValueError, match="tools"):
        tool_call_grammar([{"type": "function"}])
    with pytest.raises(ValueError, match="JSON object"):
        json_grammar(["not", "a", "schema"])
    with pytest.raises(ValueError, match="cannot build a grammar"):
        factory.json({"type": "object", "properties": {"x": {"type": "string", "pattern": "(unclosed"}}})


def test_validate_arguments():
    schema = TOOLS[0]["function"]["parameters"]
    assert validate_arguments('{"city": "Rome", "days": 3}', schema) is None
    assert "not valid JSON" in validate_arguments('{"city": ', schema)
    assert "JSON object" in validate_arguments('"Rome"', schema)
    assert "days" in validate_arguments('{"city": "Rome"}', schema)
    assert "at days" in validate_arguments('{"city": "Rome", "days": 0}', schema)
