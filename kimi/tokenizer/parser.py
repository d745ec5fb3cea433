"""Split a Kimi completion into reasoning, content and tool calls; whole (`parse`) or streaming.

Grammar (../shared/reference/k2.md §6.4, tolerant the way the field needs, §9):

    [<think>] reasoning [</think>] content
    <|tool_calls_section_begin|>
      ( <|tool_call_begin|> ID <|tool_call_argument_begin|> ARGS <|tool_call_end|> )*
    <|tool_calls_section_end|> content ...

* reasoning starts at a leading `<think>` (or at once with `starts_in_reasoning`, for prompts that
  open it) and ends at `</think>`, or implicitly at a tool-call section / call (K2-Thinking sometimes
  omits `</think>`).
* ID is `functions.{name}:{idx}`, tolerantly: any characters in the name (hyphens, dots), no
  `functions.` prefix, no `:idx`. Section markers may be singular (`<|tool_call_section_begin|>`).
* A call ends at its `<|tool_call_end|>`, or at the next `<|tool_call_begin|>`, the section end or the
  end of the text, so back-to-back and truncated calls are still reported, each on its own.
* ARGS are kept verbatim (whitespace-trimmed); a call whose ARGS are not a JSON object is reported with
  `valid=False` and the reason, never dropped.
* Text after the section is content again; text inside the section between calls is dropped; markers
  never reach reasoning or content.

`parse` is the plain reference; `StreamParser` is the incremental twin tested against it, fed token ids
(or text pieces) as they are sampled, emitting OpenAI-style deltas.
"""

import codecs
import json
import re
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
IM_END = "<|im_end|>"

# marker text -> what it does; the singular section markers are tolerated variants
_KIND = {THINK_OPEN: "think", THINK_CLOSE: "/think", SECTION_BEGIN: "section", "<|tool_call_section_begin|>": "section",
         SECTION_END: "/section", "<|tool_call_section_end|>": "/section", CALL_BEGIN: "call", ARG_BEGIN: "args",
         CALL_END: "/call", IM_END: "end"}
MARKERS = tuple(_KIND)
_MARKER_RE = re.compile("|".join(re.escape(m) for m in sorted(MARKERS, key=len, reverse=True)))
# every proper prefix of a marker: a text piece ending in one may be the start of a marker
_PREFIXES = frozenset(m[:k] for m in MARKERS for k in range(1, len(m)))
_MAX_MARKER = max(map(len, MARKERS))

REASONING, CONTENT, SECTION, CALL_ID, CALL_ARGS = range(5)
_IN_CALL = (CALL_ID, CALL_ARGS)
_CALL_INDEX = re.compile(r"(.*):[0-9]+", re.S)


def tool_call_opening_ids(tokenizer) -> tuple[int, ...]:
    """Ids of the special tokens that open a tool-call section or a call: never sampling them keeps a reply plain
    text (tool_choice "none", or no tools declared)."""
    ids = (tokenizer.special_tokens.get(m) for m, kind in _KIND.items() if kind in ("section", "call"))
    return tuple(i for i in ids if i is not None)


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str
    valid: bool
    error: str | None = None

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedCompletion:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def as_message(self) -> dict:
        """OpenAI assistant message (reasoning under Kimi's `reasoning_content`)."""
        message = {"role": "assistant", "content": self.content or None}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [c.as_openai() for c in self.tool_calls]
        return message


def call_name(call_id: str) -> str:
    """`functions.web.search:3` -> `web.search`; also `name:0`, `functions.name`, `name`."""
    m = _CALL_INDEX.fullmatch(call_id)
    name = m.group(1) if m else call_id
    if name.startswith("functions."):
        name = name[len("functions."):]
    return name.strip()


def make_call(index: int, raw_id: str, raw_args: str) -> ToolCall:
    call_id, args = raw_id.strip(), raw_args.strip()
    name = call_name(call_id)
    error = None
    if not name:
        error = f"tool call {index} has no function name (id {call_id!r})"
    else:
        try:
            value = json.loads(args)
        except ValueError as e:
            error = f"arguments of {name} are not valid JSON: {e}"
        else:
            if not isinstance(value, dict):
                error = f"arguments of {name} must be a JSON object, got {type(value).__name__}"
    return ToolCall(index, call_id, name, args, error is None, error)


def structural_ids(tokenizer) -> set[int]:
    """Special ids that carry parse structure; other special ids are skipped like skip_special_tokens."""
    return {i for name, i in tokenizer.special_tokens.items() if name in _KIND}


def _skipped_ids(tokenizer) -> set[int]:
    return set(tokenizer.id_to_special) - structural_ids(tokenizer)


def _as_text(completion, tokenizer) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (bytes, bytearray)):
        return bytes(completion).decode("utf-8", errors="replace")
    if not isinstance(completion, (list, tuple)) and not hasattr(completion, "tolist"):
        raise ValueError(f"parse expects text, bytes or a list of token ids, got {type(completion).__name__}")
    if tokenizer is None:
        raise ValueError("parse: token ids need a tokenizer (parse(ids, tokenizer)); or pass text")
    if hasattr(completion, "tolist"):  # numpy array / torch tensor of ids
        completion = completion.tolist()
    skipped = _skipped_ids(tokenizer)
    return tokenizer.decode([t for t in completion if t not in skipped])


def parse(completion, tokenizer=None, starts_in_reasoning: bool = False) -> ParsedCompletion:
    """Completion (str, bytes, or token ids with their tokenizer) -> ParsedCompletion."""
    text = _as_text(completion, tokenizer)
    events, pos = [], 0
    for m in _MARKER_RE.finditer(text):
        if m.start() > pos:
            events.append((None, text[pos:m.start()]))
        events.append((_KIND[m.group()], None))
        pos = m.end()
    if pos < len(text):
        events.append((None, text[pos:]))

    reasoning, content, calls = [], [], []
    state = REASONING if starts_in_reasoning else CONTENT
    call_id, call_args = [], []

    def close_call():
        calls.append(make_call(len(calls), "".join(call_id), "".join(call_args)))

    for kind, piece in events:
        if kind is None:
            target = {REASONING: reasoning, CONTENT: content, CALL_ID: call_id, CALL_ARGS: call_args}.get(state)
            if target is not None:
                target.append(piece)
        elif kind == "think":
            if state == CONTENT and not content and not calls:
                state = REASONING
        elif kind == "/think":
            if state == REASONING:
                state = CONTENT
        elif kind == "section":
            if state in (REASONING, CONTENT):
                state = SECTION
        elif kind == "call":
            if state in _IN_CALL:
                close_call()
            call_id, call_args, state = [], [], CALL_ID
        elif kind == "args":
            if state == CALL_ID:
                state = CALL_ARGS
        elif kind == "/call":
            if state in _IN_CALL:
                close_call()
                state = SECTION
        elif kind == "/section":
            if state in _IN_CALL:
                close_call()
            if state != REASONING:
                state = CONTENT
    if state in _IN_CALL:
        close_call()
    return ParsedCompletion("".join(reasoning), "".join(content), calls)


class StreamParser:
    """Incremental `parse`: `push` token ids (or str / bytes pieces) as they arrive, get a list of
    OpenAI-style deltas; `finish` flushes. Deltas are `{"reasoning_content": str}`, `{"content": str}`,
    `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}` once per call
    when its id is complete, then `{"tool_calls": [{"index", "function": {"arguments": fragment}}]}`.

    Text that could be the start of a marker is held back until it is known not to be one, so no
    part of a marker is ever emitted. After `finish`, `result` equals `parse` of the whole input.
    """

    def __init__(self, tokenizer=None, starts_in_reasoning: bool = False):
        self._ids = tokenizer.stream_decoder(_skipped_ids(tokenizer)) if tokenizer is not None else None
        self._bytes = codecs.getincrementaldecoder("utf-8")("replace")
        self._buf = ""
        self._state = REASONING if starts_in_reasoning else CONTENT
        self._reasoning, self._content, self._calls = [], [], []
        self._id, self._args, self._args_ws, self._args_started, self._announced = [], [], "", False, False
        self._out = []
        self.finished = False

    def push(self, piece) -> list[dict]:
        if isinstance(piece, str):
            text = piece
        elif isinstance(piece, (bytes, bytearray)):
            text = self._bytes.decode(bytes(piece))
        elif isinstance(piece, int):
            text = self._decode_id(piece)
        elif isinstance(piece, (list, tuple)):
            text = "".join(self._decode_id(t) for t in piece)
        else:
            raise ValueError(f"push expects a token id, a list of ids, str or bytes, got {type(piece).__name__}")
        self._feed(text)
        return self._take()

    def finish(self) -> list[dict]:
        """End of the completion: flush held text and close an unterminated call."""
        if not self.finished:
            self.finished = True
            tail = self._bytes.decode(b"", final=True) + (self._ids.flush() if self._ids is not None else "")
            self._feed(tail)
            if self._buf:
                self._text(self._buf)
                self._buf = ""
            if self._state in _IN_CALL:
                self._close_call()
        return self._take()

    @property
    def result(self) -> ParsedCompletion:
        return ParsedCompletion("".join(self._reasoning), "".join(self._content), list(self._calls))

    def _decode_id(self, token_id) -> str:
        if self._ids is None:
            raise ValueError("StreamParser was built without a tokenizer; push text, or pass tokenizer=")
        return self._ids.push(token_id)

    def _take(self) -> list[dict]:
        out, self._out = self._out, []
        return out

    def _emit(self, key, text):
        last = self._out[-1] if self._out else None
        if last is not None and key in last and len(last) == 1:
            last[key] += text
        else:
            self._out.append({key: text})

    def _feed(self, text):
        buf = self._buf + text
        while (m := _MARKER_RE.search(buf)) is not None:
            if m.start():
                self._text(buf[:m.start()])
            self._marker(_KIND[m.group()])
            buf = buf[m.end():]
        # hold back the longest tail that could still grow into a marker
        hold = len(buf)
        for p in range(max(0, len(buf) - _MAX_MARKER + 1), len(buf)):
            if buf[p] == "<" and buf[p:] in _PREFIXES:
                hold = p
                break
        if hold:
            self._text(buf[:hold])
        self._buf = buf[hold:]

    def _text(self, text):
        state = self._state
        if state == REASONING:
            self._reasoning.append(text)
            self._emit("reasoning_content", text)
        elif state == CONTENT:
            self._content.append(text)
            self._emit("content", text)
        elif state == CALL_ID:
            self._id.append(text)
        elif state == CALL_ARGS:
            if not self._args_started:
                text = text.lstrip()
                if not text:
                    return
                self._args_started = True
            text = self._args_ws + text
            body = text.rstrip()
            # trailing whitespace waits: it is emitted only if more arguments follow it
            self._args_ws = text[len(body):]
            if body:
                self._args.append(body)
                self._emit_args(body)

    def _emit_args(self, fragment):
        last = self._out[-1] if self._out else None
        index = len(self._calls)
        if last is not None and "tool_calls" in last and last["tool_calls"][-1]["index"] == index:
            last["tool_calls"][-1]["function"]["arguments"] += fragment
        else:
            self._out.append({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})

    def _announce(self):
        call_id = "".join(self._id).strip()
        self._announced = True
        self._out.append({"tool_calls": [{"index": len(self._calls), "id": call_id, "type": "function",
                                          "function": {"name": call_name(call_id), "arguments": ""}}]})

    def _open_call(self):
        self._id, self._args, self._args_ws, self._args_started, self._announced = [], [], "", False, False
        self._state = CALL_ID

    def _close_call(self):
        if not self._announced:
            self._announce()
        self._calls.append(make_call(len(self._calls), "".join(self._id), "".join(self._args)))

    def _marker(self, kind):
        state = self._state
        if kind == "think":
            if state == CONTENT and not self._content and not self._calls:
                self._state = REASONING
        elif kind == "/think":
            if state == REASONING:
                self._state = CONTENT
        elif kind == "section":
            if state in (REASONING, CONTENT):
                self._state = SECTION
        elif kind == "call":
            if state in _IN_CALL:
                self._close_call()
            self._open_call()
        elif kind == "args":
            if state == CALL_ID:
                self._announce()
                self._state = CALL_ARGS
        elif kind == "/call":
            if state in _IN_CALL:
                self._close_call()
                self._state = SECTION
        elif kind == "/section":
            if state in _IN_CALL:
                self._close_call()
            if state != REASONING:
                self._state = CONTENT
