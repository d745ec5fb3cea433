"""POST /v1/chat/completions: a validated request -> prompt ids + sampling params -> streamed or whole response.

`plan_chat` renders the conversation (kimi.tokenizer.chat, canonical `functions.{name}:{idx}` ids), sizes the
completion against the context window, and chooses the constraint (structured.py): a JSON grammar for
response_format, a tool-call-section grammar for tool_choice required / named; under tool_choice none (the default
without tools) the tokens that open a tool call are never sampled. A guided request with n > 1 becomes
n engine requests, because a guide follows one sequence.

`ChoiceState` turns one choice's growing token ids into OpenAI deltas with kimi.tokenizer.parser.StreamParser.
Reasoning and content stream as they come (stop strings cut by StopFilter). A tool call is released when it closes:
its arguments are checked against the tool's schema first, and a call that does not parse or validate goes to
`invalid_tool_calls` with the reason instead of `tool_calls` (k2.md §9.7). Streaming and whole responses are built
from the same ChoiceState, so they carry the same content, reasoning and calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kimi.engine.sampling_params import SamplingParams
from kimi.server.protocol import ChatCompletionRequest
from kimi.server.stream import StopFilter, chat_logprobs
from kimi.server.structured import tool_parameters, validate_arguments
from kimi.tokenizer.chat import render_ids
from kimi.tokenizer.parser import StreamParser, tool_call_opening_ids


@dataclass
class ChatPlan:
    prompt_ids: list[int]
    params: list[SamplingParams]
    n: int
    max_tokens: int
    starts_in_reasoning: bool
    tools: dict[str, dict]  # name -> parameter schema
    tool_choice: str  # none | auto | required | named
    parallel_tool_calls: bool
    stops: tuple[str, ...]
    logprobs: bool
    include_usage: bool
    guided: bool


def _sampling_fields(req, defaults: dict) -> dict:
    """Request sampling fields -> SamplingParams kwargs (unset fields take the model's generation defaults)."""
    out = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        value = getattr(req, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            out[name] = value
    out.update(seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens)
    return out


def context_check(prompt_len: int, max_tokens: int | None, max_model_len: int) -> int:
    """The completion budget; ValueError (400) saying both numbers when prompt + completion exceed the window."""
    if max_tokens is None:
        if prompt_len >= max_model_len:
            raise ValueError(f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                             f"{prompt_len} tokens, leaving none for the completion")
        return max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise ValueError(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                         f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
                         f"completion). Please reduce the length of the messages or the completion.")
    return max_tokens


def plan_chat(req: ChatCompletionRequest, tokenizer, max_model_len: int, guides, defaults: dict) -> ChatPlan:
    """Raises ValueError (-> 400) naming what is wrong."""
    messages = [m.model_dump(exclude_none=True, by_alias=True) for m in req.messages]
    prefix = None
    if messages[-1].get("partial"):
        if messages[-1]["role"] != "assistant":
            raise ValueError("'partial': true is only allowed on a final assistant message")
        prefix = messages.pop()
    for i, m in enumerate(messages):
        if m.pop("partial", False):
            raise ValueError(f"message {i}: 'partial' is only allowed on the last message (an assistant prefix)")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    named = None
    if not isinstance(choice, str):
        named, choice = choice.function.name, "named"
    if choice in ("required", "named") and not tools:
        raise ValueError(f"tool_choice {'required' if named is None else named!r} needs a non-empty 'tools' list")
    schemas = {t["function"]["name"]: tool_parameters(t) for t in tools or ()}
    if named is not None and named not in schemas:
        raise ValueError(f"tool_choice names function {named!r}, which is not in tools ({', '.join(schemas)})")
    kwargs = req.chat_template_kwargs or {}
    thinking = kwargs.get("thinking", kwargs.get("enable_thinking", True))
    if not isinstance(thinking, bool):
        raise ValueError(f"chat_template_kwargs.thinking must be true or false, got {thinking!r}")

    ids, _ = render_ids(messages, tokenizer, tools=tools, add_generation_prompt=prefix is None, thinking=thinking)
    if prefix is not None:  # Moonshot partial mode: the assistant turn is opened and its prefix written for it
        ids += [tokenizer.special_id("<|im_assistant|>"), *tokenizer.encode(prefix.get("name") or "assistant"),
                tokenizer.special_id("<|im_middle|>")]
        content = prefix.get("content") or ""
        if not isinstance(content, str):
            content = "".join(p.get("text", "") for p in content)
        ids += tokenizer.encode(content)
    think = tokenizer.special_tokens.get("<think>")
    starts_in_reasoning = prefix is None and think is not None and ids[-1] == think

    max_tokens = context_check(len(ids), req.max_completion_tokens or req.max_tokens, max_model_len)
    guide_for = None
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if choice in ("required", "named"):
            raise ValueError("response_format json_object/json_schema cannot be combined with tool_choice "
                             f"{choice!r}: both constrain the whole reply")
        schema = None
        if rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
            schema = rf.json_schema.schema_
        guides.json(schema)  # compile once now so a bad schema is a 400, not a failure inside the engine

        def guide_for():
            return guides.json(schema)
    elif choice in ("required", "named"):
        guides.tool_calls(tools, named, req.parallel_tool_calls)

        def guide_for():
            return guides.tool_calls(tools, named, req.parallel_tool_calls)

    fields = _sampling_fields(req, defaults)
    logprobs = req.top_logprobs or 0 if req.logprobs else None
    if req.top_logprobs and not req.logprobs:
        raise ValueError("top_logprobs needs logprobs: true")
    if req.stream_options is not None and not req.stream:
        raise ValueError("stream_options is only allowed with stream: true")
    base = dict(fields, max_tokens=max_tokens, logprobs=logprobs)
    if choice == "none":  # the reply is text: a tool-call section cannot even start
        base["banned_token_ids"] = tool_call_opening_ids(tokenizer)
    if guide_for is None:
        params = [SamplingParams(n=req.n, **base)]
    else:
        seed = base.pop("seed")
        params = [SamplingParams(**base, seed=seed if seed is None or i == 0 else hash((seed, i)) & (2 ** 63 - 1),
                                 guide=guide_for()) for i in range(req.n)]
    return ChatPlan(ids, params, req.n, max_tokens, starts_in_reasoning, schemas, choice, req.parallel_tool_calls,
                    tuple(params[0].stop), req.logprobs, bool(req.stream_options and req.stream_options.include_usage),
                    guide_for is not None)


@dataclass
class ChoiceState:
    """One choice of one request, from token ids to OpenAI deltas."""

    index: int
    plan: ChatPlan
    tokenizer: object
    parser: StreamParser = None
    stop: StopFilter = None
    seen: int = 0  # output tokens consumed
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)
    invalid: list[dict] = field(default_factory=list)
    closed_calls: int = 0  # calls of the parser already judged
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    num_tokens: int = 0

    def __post_init__(self):
        self.parser = StreamParser(self.tokenizer, starts_in_reasoning=self.plan.starts_in_reasoning)
        self.stop = StopFilter(self.plan.stops)
        st = self.tokenizer.special_tokens
        self._closers = {st.get(n) for n in ("<|tool_call_end|>", "<|tool_call_begin|>", "<|tool_calls_section_end|>",
                                             "<|tool_call_section_end|>")} - {None}

    def update(self, output) -> tuple[list[dict], list[dict]]:
        """Consume a CompletionOutput -> (deltas to send, new logprob items)."""
        new = output.token_ids[self.seen:]
        self.seen = len(output.token_ids)
        self.num_tokens = len(output.token_ids)
        deltas: list[dict] = []
        for piece in self.parser.push(new):
            for kind in ("reasoning_content", "content"):
                if kind in piece:
                    deltas += self._text(kind, piece[kind])
        if output.finish_reason is not None:
            for piece in self.parser.finish():
                for kind in ("reasoning_content", "content"):
                    if kind in piece:
                        deltas += self._text(kind, piece[kind])
            deltas += [{k: t} for k, t in self.stop.flush()]
        if output.finish_reason is not None or any(t in self._closers for t in new):
            deltas += self._judge_calls()
        items = []
        if self.plan.logprobs and output.logprobs is not None:
            fresh = output.logprobs[len(self.logprobs):]
            self.logprobs += fresh
            items = chat_logprobs(self.tokenizer, fresh)
        if output.finish_reason is not None and self.finish_reason is None:
            reason = output.finish_reason
            # OpenAI answers "tool_calls" when the model chose to call (auto, required) but "stop" when the request
            # forced a named function (vLLM follows it; serving.md §2.4)
            if reason == "stop" and self.calls and self.plan.tool_choice != "named":
                reason = "tool_calls"
            self.finish_reason = reason
        return deltas, items

    def _text(self, kind: str, text: str) -> list[dict]:
        out = []
        for k, t in self.stop.push(kind, text):
            (self.reasoning if k == "reasoning_content" else self.content).append(t)
            out.append({k: t})
        return out

    def _judge_calls(self) -> list[dict]:
        deltas = []
        for call in self.parser.result.tool_calls[self.closed_calls:]:  # the parser lists closed calls only
            self.closed_calls += 1
            error = self._check(call)
            if error is not None:
                self.invalid.append({"index": call.index, "id": call.id, "name": call.name,
                                     "arguments": call.arguments, "error": error})
                deltas.append({"invalid_tool_calls": [self.invalid[-1]]})
                continue
            k = len(self.calls)
            idx = call.id.rsplit(":", 1)[-1]
            canonical = idx.isdigit() and call.id == f"functions.{call.name}:{idx}"
            call_id = call.id if canonical else f"functions.{call.name}:{k}"
            self.calls.append({"id": call_id, "type": "function",
                               "function": {"name": call.name, "arguments": call.arguments}})
            deltas.append({"tool_calls": [{"index": k, "id": call_id, "type": "function",
                                           "function": {"name": call.name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]})
        return deltas

    def _check(self, call) -> str | None:
        plan = self.plan
        if plan.tool_choice == "none":
            return "tool_choice is 'none': the model was not allowed to call tools"
        if call.name not in plan.tools:
            return f"unknown function {call.name!r}; the request's tools are: {', '.join(plan.tools) or 'none'}"
        if not plan.parallel_tool_calls and self.calls:
            return "parallel_tool_calls is false: only the first call is kept"
        if not call.valid:
            return call.error
        return validate_arguments(call.arguments, plan.tools[call.name])

    def message(self) -> dict:
        msg = {"role": "assistant", "content": "".join(self.content) or None}
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            msg["tool_calls"] = self.calls
        if self.invalid:
            msg["invalid_tool_calls"] = self.invalid
        return msg


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def now() -> float:
    return time.perf_counter()
