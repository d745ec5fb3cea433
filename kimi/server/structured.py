"""Structured output: per-request grammars over Kimi's token vocabulary, enforced token by token (llguidance).

What each request asks for becomes one Lark grammar (llguidance's dialect, `%json{...}` embeds a JSON schema):

    response_format json_object          one JSON object
    response_format json_schema          one JSON value valid for the schema
    tool_choice required                 <|tool_calls_section_begin|> call+ <|tool_calls_section_end|>
    tool_choice {"function": {"name"}}   the same section with exactly one call of that function
    call                                 <|tool_call_begin|> "functions.NAME:" IDX <|tool_call_argument_begin|>
                                         {JSON for NAME's parameters} <|tool_call_end|>

The markers are single special tokens (k2.md §6.3-6.4), never spelt out as text. A `Guide` holds one matcher for one
sequence and speaks the engine's hook (`SamplingParams.guide`): `allowed_tokens()` before each sample, `accept(id)`
after it, `is_finished()` when nothing but the end of the turn may follow. Under tool_choice auto the arguments are
not constrained; `validate_arguments` checks them against the tool's schema afterwards so a broken call is reported.
"""

from __future__ import annotations

import json
import threading

import jsonschema
import llguidance
import torch
from llguidance.tiktoken import lltokenizer_from_encoding

SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
_ANY_OBJECT = {"type": "object"}


def _tool_function(tool) -> dict:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"tools: expected {{'type': 'function', 'function': {{'name': str, 'parameters': "
                         f"JSON schema}}}}, got {str(tool)[:120]}")
    return fn


def tool_parameters(tool) -> dict:
    """A tool's parameter schema; a tool without one takes any JSON object."""
    params = _tool_function(tool).get("parameters")
    if params is None:
        return _ANY_OBJECT
    if not isinstance(params, dict):
        raise ValueError(f"tool {_tool_function(tool)['name']!r}: parameters must be a JSON schema object")
    return params


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark string literal


def _embedded(schema: dict) -> str:
    """`%json{...}` for a schema, compact (no free whitespace, which a weak model fills with blanks) unless the
    schema's own `x-guidance` options say otherwise."""
    schema = {**schema, "x-guidance": {"whitespace_flexible": False, **schema.get("x-guidance", {})}}
    return "%json" + json.dumps(schema, separators=(",", ":"))


def _call_rule(name: str, schema: dict) -> str:
    call_id = _lark_string(f"functions.{name}:")
    return f"{CALL_BEGIN} {call_id} /[0-9]{{1,6}}/ {ARG_BEGIN} {_embedded(schema)} {CALL_END}"


def json_grammar(schema: dict | None) -> str:
    """One JSON value for `schema` (None: any JSON object)."""
    schema = _ANY_OBJECT if schema is None else schema
    if not isinstance(schema, dict):
        raise ValueError(f"response_format json_schema.schema must be a JSON object, got {type(schema).__name__}")
    return f"start: {_embedded(schema)}\n"


def tool_call_grammar(tools: list, name: str | None = None, parallel: bool = True) -> str:
    """A tool-call section: one call of `name`, or (name None) one or more calls (exactly one unless `parallel`)
    of any of `tools`, each with arguments valid for that tool's parameters."""
    if not tools:
        raise ValueError("tool_choice requires a non-empty 'tools' list")
    fns = {_tool_function(t)["name"]: tool_parameters(t) for t in tools}
    if name is not None:
        if name not in fns:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools ({', '.join(fns)})")
        fns = {name: fns[name]}
        parallel = False
    rules = [f"call_{i}: {_call_rule(n, s)}" for i, (n, s) in enumerate(fns.items())]
    calls = "call" + ("+" if parallel else "")
    return "\n".join([f"start: {SECTION_BEGIN} {calls} {SECTION_END}",
                      "call: " + " | ".join(f"call_{i}" for i in range(len(fns))), *rules]) + "\n"


def validate_arguments(arguments: str, schema: dict) -> str | None:
    """None when `arguments` is a JSON object valid for `schema`; otherwise the reason, for the client."""
    try:
        value = json.loads(arguments)
    except ValueError as e:
        return f"arguments are not valid JSON: {e}"
    if not isinstance(value, dict):
        return f"arguments must be a JSON object, got {type(value).__name__}"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(map(str, e.absolute_path))
        return f"arguments do not match the tool's schema{' at ' + where if where else ''}: {e.message}"
    except jsonschema.SchemaError as e:
        return f"the tool's parameter schema is invalid: {e.message}"
    return None


class GuideFactory:
    """Compiles request grammars against one tokenizer. The llguidance tokenizer is built once (about a second
    for a 160k vocabulary); each guide then costs one grammar compile."""

    def __init__(self, tokenizer, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or tokenizer.vocab_size
        if self.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"vocab_size {self.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
        self._ll = None
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll is None:
                # the end of a turn is <|im_end|>: a finished grammar allows exactly that
                self._ll = lltokenizer_from_encoding(self.tokenizer._enc, n_vocab=self.tokenizer.vocab_size,
                                                     eos_token=self.tokenizer.im_end_id)
            return self._ll

    def guide(self, grammar: str) -> "Guide":
        """Compile `grammar` (Lark, as built above); ValueError names the problem (e.g. an unsupported schema)."""
        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"cannot build a grammar for this request: {error}")
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"cannot build a grammar for this request: {matcher.get_error()}")
        return Guide(matcher, self.vocab_size, self.tokenizer.vocab_size)

    def json(self, schema: dict | None = None) -> "Guide":
        return self.guide(json_grammar(schema))

    def tool_calls(self, tools: list, name: str | None = None, parallel: bool = True) -> "Guide":
        return self.guide(tool_call_grammar(tools, name, parallel))


class Guide:
    """One sequence's constraint: the engine masks the logits with `allowed_tokens()` and reports each sampled
    token with `accept`. A token outside the mask puts it in an error state (`error`), which also finishes it."""

    def __init__(self, matcher, vocab_size: int, tokenizer_vocab: int):
        self._m = matcher
        self.vocab_size = vocab_size
        self._words = (tokenizer_vocab + 31) // 32
        self._bits = torch.arange(32, dtype=torch.int32)
        self.num_accepted = 0

    def allowed_tokens(self) -> torch.Tensor | None:
        """[vocab_size] bool: True where the next token may be sampled."""
        words = torch.frombuffer(bytearray(self._m.compute_bitmask()), dtype=torch.int32)[:self._words]
        allowed = ((words[:, None] >> self._bits) & 1).flatten().bool()  # bit j of word w is token 32w + j
        out = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(self.vocab_size, allowed.numel())
        out[:n] = allowed[:n]
        return out

    def accept(self, token_id: int) -> None:
        self._m.consume_token(int(token_id))
        self.num_accepted += 1

    def is_finished(self) -> bool:
        return self._m.is_stopped() or self._m.is_error()

    @property
    def error(self) -> str | None:
        return self._m.get_error() or None if self._m.is_error() else None

    def is_accepting(self) -> bool:
        return self._m.is_accepting()
